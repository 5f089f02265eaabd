"""Property tests (hypothesis): normalization and affine invariance over shapes, axes, dtypes."""

from __future__ import annotations

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxbn

# One compiled program per example is much faster than op-by-op dispatch on CPU.
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=("training", "axis", "epsilon"))

# Each example compiles a new program (~0.3 s on CPU), so the counts stay modest.
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.too_slow],
)

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
# Unit roundoff of each dtype: the output's only error beyond float32 arithmetic.
ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


@st.composite
def layouts(draw):
    """(shape, axis, dtype name, seed): rank 2-4, dims 2-5, feature axes leaving ≥ 1 reduced."""
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(2, 5), min_size=rank, max_size=rank)))
    n_features = draw(st.integers(1, rank - 1))
    feature_axes = sorted(draw(st.permutations(range(rank)))[:n_features])
    # Spell each axis positively or negatively; a single axis is sometimes a bare int.
    spelled = tuple(a - rank if draw(st.booleans()) else a for a in feature_axes)
    axis = spelled[0] if n_features == 1 and draw(st.booleans()) else spelled
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, axis, dtype, seed


def _axes(shape, axis):
    features = {a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,))}
    reduced = tuple(a for a in range(len(shape)) if a not in features)
    kept = tuple(1 if a in reduced else d for a, d in enumerate(shape))
    return reduced, kept


def _data(shape, axis, seed, loc_bound, std_range):
    """float64 data whose per-feature sample std is exactly the drawn std (≥ 0.5)."""
    rng = np.random.default_rng(seed)
    reduced, kept = _axes(shape, axis)
    z = rng.normal(size=shape)
    z = (z - z.mean(reduced, keepdims=True)) / z.std(reduced, keepdims=True)
    loc = rng.uniform(-loc_bound, loc_bound, size=kept)
    std = rng.uniform(*std_range, size=kept)
    return loc + std * z


def _kept_features(shape, axis):
    features = sorted({a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,))})
    return tuple(shape[a] for a in features)


@SETTINGS
@given(layouts())
def test_training_output_has_zero_mean_and_unit_variance(layout):
    shape, axis, dtype, seed = layout
    low_precision = dtype != "float32"
    x64 = _data(
        shape,
        axis,
        seed,
        loc_bound=2.0 if low_precision else 100.0,
        std_range=(0.5, 4.0) if low_precision else (0.5, 10.0),
    )
    x = jnp.asarray(x64, DTYPES[dtype])
    _, state = jaxbn.init(_kept_features(shape, axis))
    y, _ = batch_norm(x, None, state, training=True, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    mean, var, _ = ref.moments(y, axis)
    # float32: statistics of |mean| ≤ 100 data; otherwise the final rounding of y dominates.
    u = ROUNDOFF[dtype]
    mean_tol = max(1e-4, 2 * u)
    var_tol = max(1e-3, 5 * u)  # also covers var/(var + epsilon) ≥ 1 - 4e-5
    np.testing.assert_allclose(mean, 0.0, atol=mean_tol)
    np.testing.assert_allclose(var, 1.0, atol=var_tol)


def _affine_case(draw_sign):
    @st.composite
    def cases(draw):
        shape, axis, dtype, seed = draw(layouts())
        features = _kept_features(shape, axis)
        size = int(np.prod(features))
        magnitude = draw(st.lists(st.floats(0.1, 10.0), min_size=size, max_size=size))
        # Half precision cannot hold a shift of 100 next to a spread of 0.05: there the shift
        # is drawn relative to the scale, so the rescaled data keep some significant bits.
        if dtype == "float32":
            shift = draw(st.lists(st.floats(-100.0, 100.0), min_size=size, max_size=size))
        else:
            relative = draw(st.lists(st.floats(-2.0, 2.0), min_size=size, max_size=size))
            shift = [m * r for m, r in zip(magnitude, relative, strict=True)]
        a = draw_sign * np.reshape(magnitude, features)
        b = np.reshape(shift, features)
        return shape, axis, dtype, seed, a, b

    return cases()


def _bn_of_rescaled(shape, axis, dtype, seed, a, b):
    """(BN(x), BN(a*x + b)) with params=None and an epsilon too small to matter."""
    low_precision = dtype != "float32"
    x64 = _data(shape, axis, seed, loc_bound=1.0 if low_precision else 5.0, std_range=(0.5, 2.0))
    x = jnp.asarray(x64, DTYPES[dtype])
    x_exact = ref.as_float64(x)
    _, kept = _axes(shape, axis)
    rescaled = jnp.asarray(np.reshape(a, kept) * x_exact + np.reshape(b, kept), DTYPES[dtype])
    _, state = jaxbn.init(_kept_features(shape, axis))
    y, _ = batch_norm(x, None, state, training=True, axis=axis, epsilon=1e-10)
    y_rescaled, _ = batch_norm(rescaled, None, state, training=True, axis=axis, epsilon=1e-10)
    return ref.as_float64(y), ref.as_float64(y_rescaled)


# Rounding a*x + b to the dtype moves it by up to u * |a*x + b|, which is up to ~25 standard
# deviations of a*x (float32: 100 / (0.1 * 0.5) * 2**-24 ≈ 1.2e-4); y itself is rounded too.
AFFINE_TOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1.2e-1}


@settings(SETTINGS, max_examples=20)
@given(_affine_case(draw_sign=1.0))
def test_output_is_invariant_to_a_positive_per_feature_affine_map(case):
    shape, axis, dtype, seed, a, b = case
    y, y_rescaled = _bn_of_rescaled(shape, axis, dtype, seed, a, b)
    np.testing.assert_allclose(y_rescaled, y, rtol=0, atol=AFFINE_TOL[dtype])


@settings(SETTINGS, max_examples=20)
@given(_affine_case(draw_sign=-1.0))
def test_negative_scale_flips_the_sign_of_the_output(case):
    shape, axis, dtype, seed, a, b = case
    y, y_rescaled = _bn_of_rescaled(shape, axis, dtype, seed, a, b)
    np.testing.assert_allclose(y_rescaled, -y, rtol=0, atol=AFFINE_TOL[dtype])


# ----------------------------------------------------------------------------------------------
# No input leaves the running statistics non-finite or negative
# ----------------------------------------------------------------------------------------------

# A few shapes, so that examples share compiled programs: the batch axis may be empty.
# (Hypothesis starts from the first entry of each choice: the ordinary case comes first.)
SWEEP_SHAPES = [(4, 3), (3, 2, 3), (1, 3), (0, 3)]
# Finite values, or these mixed with the edges: NaN, ±inf, huge values whose squares overflow
# float32, tiny ones, and any float32.
FINITE_VALUES = st.floats(-10.0, 10.0, width=32)
EDGE_VALUES = st.one_of(
    FINITE_VALUES,
    st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e30, 1e-30, 0.0]),
    st.floats(width=32),
)


def _sweep_step(x, state, mask, momentum, epsilon, *, unbiased_running_var):
    return jaxbn.batch_norm(
        x,
        None,
        state,
        training=True,
        mask=mask,
        momentum=momentum,
        epsilon=epsilon,
        unbiased_running_var=unbiased_running_var,
    )


# momentum and epsilon are traced, so the compiled programs are shared across their values.
_sweep_step_jit = jax.jit(_sweep_step, static_argnames=("unbiased_running_var",))


@st.composite
def bad_batches(draw):
    """(x, state, mask, momentum, epsilon, unbiased_running_var): any batch, masked or not,
    against a valid running state."""
    shape = draw(st.sampled_from(SWEEP_SHAPES))
    size = int(np.prod(shape))
    values = draw(st.sampled_from([FINITE_VALUES, EDGE_VALUES]))
    x = np.array(draw(st.lists(values, min_size=size, max_size=size)), np.float32)
    x = x.reshape(shape)
    mask_kind = draw(st.sampled_from(["none", "random", "none-valid"]))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "random":
        mask = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool)
        mask = mask.reshape(shape)
    else:
        mask = np.zeros(shape, bool)
    state = jaxbn.BatchStats(
        mean=jnp.asarray(draw(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3)), jnp.float32),
        var=jnp.asarray(draw(st.lists(st.floats(0.0, 1e3), min_size=3, max_size=3)), jnp.float32),
        count=jnp.asarray(draw(st.integers(0, 5)), jnp.int32),
    )
    # Out-of-range values too: given as concrete arrays, they must be refused.
    in_range = draw(st.integers(0, 3)) < 3  # mostly
    momentum = draw(
        st.one_of(st.none(), st.floats(0.0, 0.999)) if in_range else st.floats(-1.0, 2.0)
    )
    epsilon = draw(st.floats(1e-8, 1.0) if in_range else st.floats(-1.0, 1.0))
    return x, state, mask, momentum, epsilon, draw(st.booleans())


@settings(SETTINGS, max_examples=30)
@given(bad_batches())
def test_no_input_leaves_the_running_statistics_non_finite_or_negative(case):
    x, state, mask, momentum, epsilon, unbiased = case
    hyper = (None if momentum is None else jnp.float32(momentum), jnp.float32(epsilon))
    if not (momentum is None or 0.0 <= hyper[0] < 1.0) or not hyper[1] > 0.0:
        # Concrete, so range-checked: refused before anything is computed.
        with pytest.raises(ValueError, match=r"`momentum`|`epsilon`"):
            _sweep_step(x, state, mask, *hyper, unbiased_running_var=unbiased)
        return
    # Traced in range: the program runs, whatever x and mask hold.
    y, new = _sweep_step_jit(x, state, mask, *hyper, unbiased_running_var=unbiased)
    assert np.isfinite(new.mean).all() and np.isfinite(new.var).all(), new
    assert (np.asarray(new.var) >= 0).all(), new
    assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)
    valid = np.broadcast_to(True if mask is None else mask, x.shape)
    if not valid.any() or not np.isfinite(x[valid]).all():
        # A batch with no valid entry or a non-finite one is rejected: nothing changes.
        assert int(new.count) == int(state.count)
    if int(new.count) == int(state.count):
        np.testing.assert_array_equal(new.mean, state.mean)
        np.testing.assert_array_equal(new.var, state.var)
    else:
        assert int(new.count) == int(state.count) + 1
    assert y.shape == x.shape

"""Property tests (hypothesis): normalization and affine invariance over shapes, axes, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


def _per_feature_moments(y, shape, axis):
    reduced, _ = _axes(shape, axis)
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    return y.mean(reduced), y.var(reduced)


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
    mean, var = _per_feature_moments(y, shape, axis)
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
    x_exact = np.asarray(x.astype(jnp.float32), np.float64)
    _, kept = _axes(shape, axis)
    rescaled = jnp.asarray(np.reshape(a, kept) * x_exact + np.reshape(b, kept), DTYPES[dtype])
    _, state = jaxbn.init(_kept_features(shape, axis))
    y, _ = batch_norm(x, None, state, training=True, axis=axis, epsilon=1e-10)
    y_rescaled, _ = batch_norm(rescaled, None, state, training=True, axis=axis, epsilon=1e-10)
    as64 = lambda v: np.asarray(v.astype(jnp.float32), np.float64)  # noqa: E731
    return as64(y), as64(y_rescaled)


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

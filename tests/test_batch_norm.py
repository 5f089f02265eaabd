"""jaxbn.batch_norm against the float64 numpy reference (tests/_reference.py).

Accuracy when |mean| >> std is tests/test_branch_free.py's, and every autodiff mode on a
plain and a masked batch is tests/test_autodiff.py's; the gradient tests here cover the
layouts, mask shapes and dtypes that matrix does not."""

from __future__ import annotations

import functools

import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import assert_grads_close

import jaxbn

# Compiling one program per case is several times faster on CPU than running op by op; the
# tests that need eager semantics (eval returns the very same state object) call
# jaxbn.batch_norm directly.
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=("training", "axis", "momentum", "epsilon"))


def _random_params(rng, feature_shape):
    scale = (0.5 + rng.random(feature_shape)).astype(np.float32)
    bias = rng.normal(size=feature_shape).astype(np.float32)
    return scale, bias


def _data(rng, shape, axis, loc_scale=3.0):
    """float32 data whose per-feature mean and std differ (so a wrong axis shows)."""
    feature_shape = ref.feature_shape(shape, axis)
    loc = ref.to_input(rng.normal(size=feature_shape) * loc_scale, shape, axis)
    std = ref.to_input(0.5 + 2 * rng.random(feature_shape), shape, axis)
    return (loc + std * rng.normal(size=shape)).astype(np.float32)


def _state(rng, feature_shape, count=3):
    """A non-trivial running state (not the zeros/ones of init)."""
    return jaxbn.BatchStats(
        mean=jnp.asarray(rng.normal(size=feature_shape), jnp.float32),
        var=jnp.asarray(0.5 + rng.random(feature_shape), jnp.float32),
        count=jnp.asarray(count, jnp.int32),
    )


def _assert_bits_equal(a, b):
    a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


SHAPES_AXES = [
    pytest.param((32, 5), -1, id="NC"),
    pytest.param((4, 6, 6, 3), -1, id="NHWC"),
    pytest.param((4, 3, 6, 6), 1, id="NCHW"),
    pytest.param((4, 3, 5, 6), (1, 2), id="features(1,2)"),
    pytest.param((6, 4, 3), (-2, -1), id="features(time,channel)"),
    pytest.param((3, 4, 5, 2), (1, 3), id="features(1,3)-non-contiguous"),
    pytest.param((5, 24), 0, id="features-first"),
]


# ----------------------------------------------------------------------------------------------
# Training outputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
def test_training_matches_float64_reference(shape, axis):
    # momentum=0.0 makes the new running statistics the batch statistics themselves.
    rng = np.random.default_rng(0)
    x = _data(rng, shape, axis)
    feature_shape = ref.feature_shape(shape, axis)
    scale, bias = _random_params(rng, feature_shape)
    _, state = jaxbn.init(feature_shape)
    y, new = batch_norm(
        x, {"scale": scale, "bias": bias}, state, training=True, axis=axis, momentum=0.0
    )
    expected, mean, var = ref.batch_norm(x, axis, scale, bias)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(new.mean), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var), var, rtol=1e-5)


AFFINE_CASES = [
    pytest.param(None, id="params=None"),
    pytest.param({}, id="params={}"),
    pytest.param({"scale": True}, id="scale-only"),
    pytest.param({"bias": True}, id="bias-only"),
    pytest.param({"scale": True, "bias": None}, id="bias=None"),
    pytest.param({"scale": None, "bias": True}, id="scale=None"),
]


@pytest.mark.parametrize("which", AFFINE_CASES)
def test_partial_or_missing_affine_params(which):
    rng = np.random.default_rng(2)
    x = _data(rng, (16, 4, 3), -1)
    scale, bias = _random_params(rng, (3,))
    _, state = jaxbn.init(3)
    if which is None:
        params = None
    else:
        params = {
            key: (None if on is None else {"scale": scale, "bias": bias}[key])
            for key, on in which.items()
        }
    use = params or {}
    y, _ = batch_norm(x, params, state, training=True)
    expected, _, _ = ref.batch_norm(x, -1, use.get("scale"), use.get("bias"))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Gradients against the analytic formula
# ----------------------------------------------------------------------------------------------


def _grads(x, dy, scale, bias, axis, mask=None):
    def loss(x, scale, bias):
        y, _ = batch_norm(
            x, {"scale": scale, "bias": bias}, state, training=True, axis=axis, mask=mask
        )
        return jnp.sum(y * dy)

    _, state = jaxbn.init(scale.shape)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)


# NC is tests/test_autodiff.py's float32 problem.
@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES[1:5])
def test_gradients_match_analytic_formula(shape, axis):
    rng = np.random.default_rng(3)
    x = _data(rng, shape, axis)
    dy = rng.normal(size=shape).astype(np.float32)
    scale, bias = _random_params(rng, ref.feature_shape(shape, axis))
    got = _grads(x, dy, scale, bias, axis)
    assert_grads_close(got, ref.grads(x, dy, axis, scale))


@pytest.mark.parametrize(
    ("shape", "mask_shape"),
    [
        pytest.param((24, 4), (24, 1), id="(N,1)"),
        pytest.param((24, 4), (24, 4), id="(N,C)"),
    ],
)
def test_gradients_with_mask_match_analytic_formula(shape, mask_shape):
    rng = np.random.default_rng(4)
    x = _data(rng, shape, -1)
    dy = rng.normal(size=shape).astype(np.float32)
    scale, bias = _random_params(rng, (shape[-1],))
    mask = _random_mask(rng, mask_shape)
    got = _grads(x, dy, scale, bias, -1, jnp.asarray(mask))
    assert_grads_close(got, ref.grads(x, dy, -1, scale, mask))


def test_masked_out_entries_get_only_the_direct_gradient():
    # One idea, stated on its own: a masked-out entry does not feed the statistics, so its
    # gradient is the direct path dy * scale / σ alone (ref.grads with m = 0).
    rng = np.random.default_rng(5)
    x = _data(rng, (20, 3), -1)
    dy = rng.normal(size=x.shape).astype(np.float32)
    scale, bias = _random_params(rng, (3,))
    mask = np.ones((20, 1), bool)
    mask[15:] = False
    dx, _, _ = _grads(x, dy, scale, bias, -1, jnp.asarray(mask))
    direct = ref.grads(x, dy, -1, scale, mask)[0][15:]
    np.testing.assert_allclose(np.asarray(dx)[15:], direct, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Running statistics: EMA, cumulative average, count
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_ema_update_over_several_steps(momentum):
    rng = np.random.default_rng(6)
    _, state = jaxbn.init(4)
    mean, var = np.zeros(4), np.ones(4)
    for _ in range(5):
        x = _data(rng, (16, 4), -1)
        _, state = batch_norm(x, None, state, training=True, momentum=momentum)
        batch_mean, batch_var, _ = ref.moments(x, -1)  # biased variance
        mean, var = ref.ema(mean, batch_mean, momentum), ref.ema(var, batch_var, momentum)
        np.testing.assert_allclose(np.asarray(state.mean), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.var), var, rtol=1e-5, atol=1e-6)


def test_running_variance_is_biased():
    # Two entries per feature: biased variance d²/4, unbiased d²/2 -- a factor 2 apart.
    x = np.array([[1.0, -3.0], [3.0, 5.0]], np.float32)
    _, state = jaxbn.init(2)
    _, new = batch_norm(x, None, state, training=True, momentum=0.0)
    np.testing.assert_allclose(np.asarray(new.var), [1.0, 16.0], rtol=1e-6)


def test_cumulative_average_with_momentum_none():
    # torch's momentum=None: the k-th batch is merged with weight 1/k, so after K batches the
    # running statistics are the plain (unweighted) average of the K batch statistics, whatever
    # the batch sizes and whatever the initial state.
    rng = np.random.default_rng(7)
    state = _state(rng, (3,), count=0)
    means, variances = [], []
    for size in (8, 20, 5, 13):
        x = _data(rng, (size, 3), -1)
        _, state = batch_norm(x, None, state, training=True, momentum=None)
        m, v, _ = ref.moments(x, -1)
        means.append(m)
        variances.append(v)
        np.testing.assert_allclose(np.asarray(state.mean), np.mean(means, 0), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(state.var), np.mean(variances, 0), rtol=1e-5)
    assert int(state.count) == 4


@pytest.mark.parametrize("momentum", [0.9, None])
def test_count_increments_once_per_training_step(momentum):
    rng = np.random.default_rng(8)
    _, state = jaxbn.init(2)
    for step in range(1, 4):
        _, state = batch_norm(_data(rng, (8, 2), -1), None, state, training=True, momentum=momentum)
        assert int(state.count) == step


# ----------------------------------------------------------------------------------------------
# Eval mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
def test_eval_uses_running_statistics(shape, axis):
    rng = np.random.default_rng(9)
    x = _data(rng, shape, axis)
    feature_shape = ref.feature_shape(shape, axis)
    scale, bias = _random_params(rng, feature_shape)
    state = _state(rng, feature_shape)
    y, _ = batch_norm(x, {"scale": scale, "bias": bias}, state, training=False, axis=axis)
    expected = ref.normalize(x, state.mean, state.var, axis, scale, bias)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_eval_returns_the_same_state_object():
    rng = np.random.default_rng(10)
    state = _state(rng, (3,))
    _, new = jaxbn.batch_norm(_data(rng, (8, 3), -1), None, state, training=False)
    assert new is state


def test_eval_ignores_mask():
    rng = np.random.default_rng(11)
    x = _data(rng, (10, 3), -1)
    state = _state(rng, (3,))
    mask = _random_mask(rng, (10, 1))
    y_masked, _ = batch_norm(x, None, state, training=False, mask=mask)
    expected = ref.normalize(x, state.mean, state.var, -1)
    np.testing.assert_allclose(np.asarray(y_masked), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def _random_mask(rng, shape):
    """A bool mask with the first two rows True (so every feature has ≥ 2 valid entries)."""
    mask = rng.random(shape) < 0.6
    mask[:2] = True
    return mask


MASK_CASES = [
    pytest.param((16, 5), (16, 1), id="x(N,C)-mask(N,1)"),
    pytest.param((16, 5), (16, 5), id="x(N,C)-mask(N,C)"),
    pytest.param((8, 6, 5), (8, 1, 1), id="x(N,T,C)-mask(N,1,1)"),
    pytest.param((8, 6, 5), (8, 6, 1), id="x(N,T,C)-mask(N,T,1)"),
    pytest.param((8, 6, 5), (8, 6, 5), id="x(N,T,C)-mask-full"),
]


@pytest.mark.parametrize(("shape", "mask_shape"), MASK_CASES)
def test_mask_statistics_count_only_true_entries(shape, mask_shape):
    rng = np.random.default_rng(12)
    x = _data(rng, shape, -1)
    mask = _random_mask(rng, mask_shape)
    # Masked-out entries hold garbage: if they leaked into the statistics it would show.
    x = np.where(np.broadcast_to(mask, shape), x, np.float32(1e4))
    scale, bias = _random_params(rng, (shape[-1],))
    _, state = jaxbn.init(shape[-1])
    y, new = batch_norm(
        x, {"scale": scale, "bias": bias}, state, training=True, momentum=0.0, mask=mask
    )
    expected, mean, var = ref.batch_norm(x, -1, scale, bias, mask)
    valid = np.broadcast_to(mask, shape)
    np.testing.assert_allclose(np.asarray(new.mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.var), var, rtol=1e-4)
    # Every entry is normalized with the valid entries' statistics (masked ones are huge).
    np.testing.assert_allclose(np.asarray(y)[valid], expected[valid], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(y)[~valid], expected[~valid], rtol=1e-5)


def test_feature_with_every_entry_masked_keeps_its_running_statistics():
    rng = np.random.default_rng(13)
    x = _data(rng, (12, 3), -1)
    mask = np.ones((12, 3), bool)
    mask[:, 1] = False
    state = _state(rng, (3,))
    y, new = batch_norm(x, None, state, training=True, momentum=0.9, mask=mask)
    assert np.all(np.isfinite(np.asarray(y)))
    _assert_bits_equal(new.mean[1], state.mean[1])
    _assert_bits_equal(new.var[1], state.var[1])
    kept = [0, 2]
    batch_mean, batch_var, _ = ref.moments(x[:, kept], -1)
    for got, old, batch in ((new.mean, state.mean, batch_mean), (new.var, state.var, batch_var)):
        np.testing.assert_allclose(
            np.asarray(got)[kept], ref.ema(np.asarray(old)[kept], batch, 0.9), rtol=1e-5
        )


@pytest.mark.parametrize("momentum", [0.9, None])
def test_whole_batch_masked_gives_finite_output_and_keeps_statistics(momentum):
    # BatchStats.count is "the number of batches merged into mean/var"; a batch with no valid
    # entry merges nothing, so it is not counted either (with momentum=None the count sets the
    # weight 1/k of the next batch).
    rng = np.random.default_rng(14)
    x = _data(rng, (10, 3), -1)
    state = _state(rng, (3,), count=2)
    y, new = batch_norm(
        x, None, state, training=True, momentum=momentum, mask=np.zeros((10, 1), bool)
    )
    chex.assert_tree_all_finite(y)
    _assert_bits_equal(new.mean, state.mean)
    _assert_bits_equal(new.var, state.var)
    assert int(new.count) == 2


def test_cumulative_average_skips_a_fully_masked_batch():
    # momentum=None after a fully masked batch: the running statistics are still the plain
    # average of the batches that had data.
    rng = np.random.default_rng(16)
    _, state = jaxbn.init(3)
    x1, x2 = _data(rng, (10, 3), -1), _data(rng, (10, 3), -1)
    _, state = batch_norm(x1, None, state, training=True, momentum=None)
    _, state = batch_norm(
        x2, None, state, training=True, momentum=None, mask=np.zeros((10, 1), bool)
    )
    x3 = _data(rng, (10, 3), -1)
    _, state = batch_norm(x3, None, state, training=True, momentum=None)
    expected = (ref.moments(x1, -1)[0] + ref.moments(x3, -1)[0]) / 2
    np.testing.assert_allclose(np.asarray(state.mean), expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(jnp.float16, 1e-3), (jnp.bfloat16, 8e-3)], ids=["float16", "bfloat16"]
)
def test_low_precision_input(dtype, tol, training):
    rng = np.random.default_rng(18)
    x = jnp.asarray(_data(rng, (64, 4), -1, loc_scale=5.0), dtype)
    scale, bias = _random_params(rng, (4,))
    state = _state(rng, (4,))
    y, new = batch_norm(x, {"scale": scale, "bias": bias}, state, training=training, momentum=0.0)
    assert y.dtype == dtype
    assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)
    x64 = ref.as_float64(x)  # the values jaxbn actually received
    if training:
        expected, mean, var = ref.batch_norm(x64, -1, scale, bias)
        # Statistics in float32: far tighter than a float16/bfloat16 reduction could be.
        np.testing.assert_allclose(np.asarray(new.mean), mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new.var), var, rtol=1e-5)
    else:
        expected = ref.normalize(x64, state.mean, state.var, -1, scale, bias)
    # Only the final rounding to `dtype` separates y from the exact value.
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["centred", "large-mean"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_low_precision_gradients_match_float64(dtype, offset, masked):
    # A narrow x and dy are read as they are and summed in float32 (on XLA:CPU through one
    # read per sum, see jaxbn._moments.separate_reads), in both conditioning regimes.
    rng = np.random.default_rng(27)
    x = jnp.asarray(offset + _data(rng, (64, 8), -1), dtype)
    dy = jnp.asarray(rng.normal(size=x.shape), dtype)
    scale, bias = _random_params(rng, (8,))
    mask = _random_mask(rng, (64, 1)) if masked else None
    got = _grads(x, dy, scale, bias, -1, None if mask is None else jnp.asarray(mask))
    x64, dy64 = ref.as_float64(x), ref.as_float64(dy)  # the values jaxbn received
    dx, dscale, dbias = ref.grads(x64, dy64, -1, scale, mask)
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == jnp.float32
    # The scale and bias gradients are float32 sums of the exact input values.
    for g, e in ((got[1], dscale), (got[2], dbias)):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-4, atol=1e-4 * np.max(np.abs(e)))
    # dx is computed in float32 and rounded to the narrow dtype once.
    tol = 8e-3 if dtype == jnp.bfloat16 else 1e-3
    np.testing.assert_allclose(
        np.asarray(got[0].astype(jnp.float32)), dx, rtol=tol, atol=tol * np.max(np.abs(dx))
    )


def test_low_precision_synchronized_statistics_under_vmap():
    # The per-sum reads of a narrow x also work when the statistics sync over a vmap axis.
    rng = np.random.default_rng(28)
    x = jnp.asarray(_data(rng, (4, 16, 3), -1), jnp.bfloat16)  # [device, N, C]
    _, state = jaxbn.init(3)
    y, new = jax.jit(
        jax.vmap(
            lambda xs: jaxbn.batch_norm(
                xs, None, state, training=True, momentum=0.0, axis_name="d"
            ),
            axis_name="d",
        )
    )(x)
    expected, mean, var = ref.batch_norm(ref.as_float64(x).reshape(-1, 3), -1)
    np.testing.assert_allclose(np.asarray(new.mean[0]), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var[0]), var, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(y.astype(jnp.float32)).reshape(-1, 3), expected, rtol=8e-3, atol=8e-3
    )


def test_float64_input_with_float64_state():
    rng = np.random.default_rng(19)
    x_np = rng.normal(3.0, 2.0, size=(32, 3))
    with jax.enable_x64(True):
        params, state = jaxbn.init(3, jnp.float64)
        y, new = batch_norm(jnp.asarray(x_np), params, state, training=True, momentum=0.0)
        assert y.dtype == jnp.float64 and new.mean.dtype == jnp.float64
        expected, _, var = ref.batch_norm(x_np, -1)
        np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(new.var), var, rtol=1e-12)


def test_float64_input_keeps_a_float32_state():
    # The state's dtype is fixed at init (float32 by default); float64 input must not change it,
    # and must work under strict dtype promotion (tests/conftest.py).
    rng = np.random.default_rng(20)
    x_np = rng.normal(3.0, 2.0, size=(32, 3))
    params, state = jaxbn.init(3)
    with jax.enable_x64(True):
        y, new = batch_norm(jnp.asarray(x_np), params, state, training=True, momentum=0.0)
        assert y.dtype == jnp.float64
        assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)
        _, _, var = ref.batch_norm(x_np, -1)
        np.testing.assert_allclose(np.asarray(new.var), var, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Non-finite batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.9, None])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_batch_leaves_state_unchanged(bad, momentum):
    rng = np.random.default_rng(21)
    x = _data(rng, (8, 3), -1)
    x[3, 1] = bad
    state = _state(rng, (3,), count=2)
    _, new = batch_norm(x, None, state, training=True, momentum=momentum)
    _assert_bits_equal(new.mean, state.mean)
    _assert_bits_equal(new.var, state.var)
    assert int(new.count) == 2


# ----------------------------------------------------------------------------------------------
# State type stability and init
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "momentum"), [(jnp.float32, 0.9), (jnp.float16, None), (jnp.bfloat16, 0.9)]
)
def test_training_never_changes_the_state_type(dtype, momentum):
    rng = np.random.default_rng(22)
    _, s0 = jaxbn.init((3, 2))
    x = jnp.asarray(_data(rng, (5, 3, 2), (1, 2)), dtype)
    _, s1 = batch_norm(
        x,
        None,
        s0,
        training=True,
        axis=(1, 2),
        momentum=momentum,
        mask=_random_mask(rng, (5, 1, 1)),
    )
    assert jax.tree.map(jax.typeof, s0) == jax.tree.map(jax.typeof, s1)


@pytest.mark.parametrize(
    ("feature_shape", "expected"), [(5, (5,)), ((3, 4), (3, 4))], ids=["int", "tuple"]
)
def test_init_works_under_eval_shape(feature_shape, expected):
    params, state = jax.eval_shape(functools.partial(jaxbn.init, feature_shape))
    assert params["scale"] == jax.ShapeDtypeStruct(expected, jnp.float32)
    assert params["bias"] == jax.ShapeDtypeStruct(expected, jnp.float32)
    assert state.mean == jax.ShapeDtypeStruct(expected, jnp.float32)
    assert state.var == jax.ShapeDtypeStruct(expected, jnp.float32)
    assert state.count == jax.ShapeDtypeStruct((), jnp.int32)


def test_init_values():
    params, state = jaxbn.init(3, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(params["scale"], np.float32), np.ones(3))
    np.testing.assert_array_equal(np.asarray(params["bias"], np.float32), np.zeros(3))
    assert params["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(state.mean), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(state.var), np.ones(3))
    assert state.mean.dtype == state.var.dtype == jnp.float32  # statistics ≥ float32
    assert int(state.count) == 0


# ----------------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_jit_matches_reference(training):
    rng = np.random.default_rng(23)
    x = _data(rng, (4, 3, 6, 6), 1)
    scale, bias = _random_params(rng, (3,))
    state = _state(rng, (3,))
    step = jax.jit(
        functools.partial(jaxbn.batch_norm, axis=1, momentum=0.0),
        static_argnames="training",
    )
    y, new = step(x, {"scale": scale, "bias": bias}, state, training=training)
    if training:
        expected, _, var = ref.batch_norm(x, 1, scale, bias)
        np.testing.assert_allclose(np.asarray(new.var), var, rtol=1e-5)
    else:
        expected = ref.normalize(x, state.mean, state.var, 1, scale, bias)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)


def test_jit_does_not_retrace_when_the_state_is_fed_back():
    traces = []

    @functools.partial(jax.jit, static_argnames="training")
    def step(x, state, training):
        traces.append(None)
        return jaxbn.batch_norm(x, None, state, training=training, momentum=None)

    rng = np.random.default_rng(24)
    _, state = jaxbn.init(3)
    for _ in range(3):
        _, state = step(_data(rng, (8, 3), -1), state, training=True)
    assert len(traces) == 1
    assert int(state.count) == 3


def test_vmap_normalizes_each_slice_independently():
    rng = np.random.default_rng(25)
    x = np.stack([_data(rng, (16, 4), -1) for _ in range(3)])  # [slice, N, C]
    scale, bias = _random_params(rng, (4,))
    _, state = jaxbn.init(4)
    y, new = jax.vmap(
        lambda xs: jaxbn.batch_norm(
            xs, {"scale": scale, "bias": bias}, state, training=True, momentum=0.9
        )
    )(x)
    for i in range(3):
        expected, mean, var = ref.batch_norm(x[i], -1, scale, bias)
        np.testing.assert_allclose(np.asarray(y[i]), expected, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(new.mean[i]), 0.1 * mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(new.var[i]), 0.9 + 0.1 * var, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(new.count), [1, 1, 1])


def test_scan_with_the_state_as_carry():
    rng = np.random.default_rng(26)
    xs = np.stack([_data(rng, (12, 3), -1) for _ in range(5)])  # [step, N, C]

    def body(state, x):
        y, state = jaxbn.batch_norm(x, None, state, training=True, momentum=0.8)
        return state, y

    _, state0 = jaxbn.init(3)
    state, ys = jax.lax.scan(body, state0, xs)
    mean, var = np.zeros(3), np.ones(3)
    for i in range(5):
        expected, batch_mean, batch_var = ref.batch_norm(xs[i], -1)
        np.testing.assert_allclose(np.asarray(ys[i]), expected, rtol=1e-5, atol=2e-5)
        mean, var = ref.ema(mean, batch_mean, 0.8), ref.ema(var, batch_var, 0.8)
    np.testing.assert_allclose(np.asarray(state.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.var), var, rtol=1e-5)
    assert int(state.count) == 5


def test_no_gradient_flows_into_the_new_state():
    rng = np.random.default_rng(27)
    x = _data(rng, (8, 3), -1)
    _, state = jaxbn.init(3)

    def running_mean_sum(x):
        _, new = batch_norm(x, None, state, training=True, momentum=0.0)
        return jnp.sum(new.mean)

    np.testing.assert_array_equal(np.asarray(jax.grad(running_mean_sum)(x)), np.zeros(x.shape))


def test_float64_eval_computes_in_float64_with_a_float32_state():
    # Regression: eval once computed in the state's float32, so float64 input with
    # |mean| >> std lost most of its digits ((x - mean) rounded to float32).
    rng = np.random.default_rng(22)
    x_np = rng.normal(1e3, 1e-3, size=(16, 3))
    params, state = jaxbn.init(3)
    mean, var, _ = ref.moments(x_np)
    state = state._replace(mean=jnp.asarray(mean, jnp.float32), var=jnp.asarray(var, jnp.float32))
    expected = ref.normalize(x_np, state.mean, state.var)
    with jax.enable_x64(True):
        y, _ = jaxbn.batch_norm(jnp.asarray(x_np), params, state, training=False)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-9, atol=1e-9)


# The centred regime is tests/test_autodiff.py's float32 problem.
@pytest.mark.parametrize("offset", [30.0, 1e3], ids=["borderline", "large-mean"])
def test_gradients_in_both_conditioning_regimes(offset):
    # The gradient sums are centred (Σ dy·(x - mean)), so they stay accurate as the mean
    # grows; regression test for the one-pass form Σ dy·x - mean·Σ dy, which loses them.
    rng = np.random.default_rng(24)
    x = (offset + rng.normal(size=(64, 4))).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    scale, bias = _random_params(rng, (4,))
    got = _grads(x, dy, scale, bias, -1)
    expected = ref.grads(x, dy, -1, scale)
    tol = 1e-4 if offset < 100 else 2e-3  # float32 x itself carries 6e-5 absolute at 1e3
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), e, rtol=tol, atol=tol)

"""Complex input: the pure function against the float64 reference extended to complex (a
complex mean and the real variance ``E|x - mean|²``), the drop-ins against flax, synchronized
statistics, and gradients against JAX's autodiff of flax's two-pass mode.

Intentional difference: ``jaxbn.nnx`` keeps the complex running mean that ``flax.nnx``
truncates to its real part with a warning. Flax does not run under the strict dtype promotion
conftest.py sets, so flax calls run under ``standard()``.
"""

from __future__ import annotations

import warnings

import _reference as ref
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import (
    GRAD_TOL,
    REF_TOL,
    REF_TOL_X64,
    TOL,
    batches,
    complex_loss,
    loss_and_grads,
    make_mask,
    single_run,
    standard,
    synchronized_run,
)
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

data = batches(2468)

C = 3
COMPLEX_SHAPE = (16, C)
COMPLEX_DTYPES = [
    pytest.param(jnp.complex64, id="complex64"),
    pytest.param(jnp.complex128, id="complex128"),
]


def complex_batch(shape, step, dtype=jnp.complex64):
    """A complex batch with mean about 2 - 1j and unequal real and imaginary spreads."""
    real, imag = data(shape, step), data(shape, step + 1000, loc=-1.0, scale=2.0)
    return jax.lax.complex(real, imag).astype(dtype)


def complex_params(dtype):
    return {
        "scale": jnp.asarray([1.5 - 0.5j, 0.5 + 1.0j, 2.0], dtype),
        "bias": jnp.asarray([0.3j, -1.0, 1.0 - 2.0j], dtype),
    }


@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
def test_complex_init_gives_complex_params_and_mean_and_a_real_variance(dtype):
    with jax.enable_x64(dtype == jnp.complex128):
        params, state = jaxbn.init(C, dtype=dtype)
    real = np.float32 if dtype == jnp.complex64 else np.float64
    assert params["scale"].dtype == params["bias"].dtype == state.mean.dtype == dtype
    assert state.var.dtype == real
    np.testing.assert_array_equal(state.var, np.ones(C, real))


@pytest.mark.parametrize("mask_kind", [None, "random"])
@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
def test_complex_pure_function_matches_float64_reference(dtype, mask_kind):
    """Training: complex output, complex running mean, real running variance E|x - mean|²,
    the state's types unchanged; evaluation with the new running statistics."""
    with jax.enable_x64(dtype == jnp.complex128):
        tol = REF_TOL if dtype == jnp.complex64 else REF_TOL_X64
        x, params = complex_batch(COMPLEX_SHAPE, 0, dtype), complex_params(dtype)
        mask = make_mask(mask_kind, COMPLEX_SHAPE)
        _, state = jaxbn.init(C, dtype=dtype)
        train = jax.jit(lambda x, params, state: jaxbn.batch_norm(
            x, params, state, training=True, momentum=0.9, mask=mask))
        y, new = train(x, params, state)
        y_eval, _ = jaxbn.batch_norm(x, params, new, training=False)
    assert y.dtype == y_eval.dtype == dtype
    assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)
    expected, mean, var = ref.batch_norm(x, -1, params["scale"], params["bias"], mask)
    chex.assert_trees_all_close(
        {"output": y, "running mean": new.mean, "running variance": new.var, "eval": y_eval},
        {"output": expected, "running mean": ref.ema(state.mean, mean, 0.9),
         "running variance": ref.ema(state.var, var, 0.9),
         "eval": ref.normalize(x, new.mean, new.var, -1, params["scale"], params["bias"])},
        **tol,
    )


def test_complex_training_works_under_strict_promotion():
    """jaxbn promotes explicitly, so complex input trains under conftest's strict promotion
    too (the other complex tests run under standard promotion until this passes)."""
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    x, params = complex_batch(COMPLEX_SHAPE, 0), complex_params(jnp.complex64)
    _, state = jaxbn.init(C, dtype=jnp.complex64)
    with standard():
        expected, expected_state = jaxbn.batch_norm(x, params, state, training=True)
    y, new = jaxbn.batch_norm(x, params, state, training=True)
    chex.assert_trees_all_close((y, new), (expected, expected_state), strict=True, **TOL)
    chex.assert_trees_all_close(
        jaxbn.nnx.BatchNorm(C, rngs=nnx.Rngs(0))(x).astype(jnp.complex64),
        jaxbn.batch_norm(x, None, state, training=True)[0], strict=True, **TOL,
    )


def test_complex_input_needs_a_complex_running_mean():
    x, params = complex_batch(COMPLEX_SHAPE, 0), complex_params(jnp.complex64)
    _, real_state = jaxbn.init(C)
    with pytest.raises(TypeError, match=r"`state.mean` must be complex .* got float32.*"
                                        r"jaxbn.init\(\(3,\), dtype=jnp.complex64\)"):
        jaxbn.batch_norm(x, params, real_state, training=True)


def _train_then_eval_linen(module, xs, mask):
    """Training steps on ``xs`` from init, then evaluation on ``xs[0]``: each step's output
    and batch_stats, and the eval output."""
    with standard():
        variables = module.init(jax.random.key(0), xs[0], False)
        outputs = []
        for x in xs:
            y, updates = module.apply(variables, x, False, mask=mask, mutable=["batch_stats"])
            variables = {**variables, **updates}
            outputs.append((y, updates["batch_stats"]))
        outputs.append(module.apply(variables, xs[0], True))
    return outputs


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.complex64])
def test_complex_linen_matches_flax(param_dtype, mask_kind):
    """Three training steps and an eval, against flax.linen's two-pass mode: the same
    outputs, and a running mean that becomes complex after the first training step in both
    (the running variance stays real)."""
    kwargs = {
        "momentum": 0.9,
        "param_dtype": param_dtype,
        "scale_init": nn.initializers.normal(1.0),
        "bias_init": nn.initializers.normal(1.0),
    }
    xs = [complex_batch(COMPLEX_SHAPE, step) for step in range(3)]
    mask = make_mask(mask_kind, COMPLEX_SHAPE)
    ours = _train_then_eval_linen(jaxbn.linen.BatchNorm(**kwargs), xs, mask)
    theirs = _train_then_eval_linen(nn.BatchNorm(use_fast_variance=False, **kwargs), xs, mask)
    first_stats = ours[0][1]
    assert (first_stats["mean"].dtype, first_stats["var"].dtype) == (jnp.complex64, jnp.float32)
    chex.assert_trees_all_close(ours, theirs, strict=True, **TOL)


def _train_complex_nnx(steps=3):
    """jaxbn.nnx and flax.nnx trained side by side on complex batches: both layers and the
    float64 EMA of the batch statistics; checks each step as it goes."""
    ours = jaxbn.nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))
    with standard():
        theirs = nnx.BatchNorm(C, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    mean, var = np.zeros(C), np.ones(C)
    for step in range(steps):
        x = complex_batch(COMPLEX_SHAPE, step)
        y = ours(x)
        with standard(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            expected = theirs(x)
        assert any("imaginary part" in str(w.message) for w in caught)
        assert theirs.mean[...].dtype == jnp.float32
        chex.assert_trees_all_close(
            (y, ours.var[...], jnp.real(ours.mean[...])),
            (expected, theirs.var[...], theirs.mean[...]), strict=True, **TOL,
        )
        _, batch_mean, batch_var = ref.batch_norm(x)
        mean, var = ref.ema(mean, batch_mean, 0.9), ref.ema(var, batch_var, 0.9)
        assert ours.mean[...].dtype == jnp.complex64
        chex.assert_trees_all_close((ours.mean[...], ours.var[...]), (mean, var), **REF_TOL)
    return ours, mean, var


def test_complex_nnx_keeps_the_complex_running_mean_that_flax_nnx_drops():
    """Training outputs and running variance as flax.nnx's. Intentional difference: flax.nnx
    stores the complex batch mean into its float32 ``mean`` (a warning, and the imaginary
    part is lost); jaxbn.nnx keeps the complex EMA of the batch means (the float64
    reference's), as flax.linen and jaxbn.linen do."""
    _train_complex_nnx()


def test_complex_nnx_evaluates_with_the_complex_running_mean():
    ours, mean, var = _train_complex_nnx(steps=1)
    ours.eval()
    x = complex_batch(COMPLEX_SHAPE, 9)
    with standard():
        y = ours(x)
    chex.assert_trees_all_close(
        y, ref.normalize(x, mean, var, -1, ours.scale[...], ours.bias[...]), **REF_TOL
    )


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.complex64])
def test_complex_gradients_match_flax_two_pass_autodiff(param_dtype, mask_kind):
    """d(real loss)/d(complex x, params) through the pure function and the linen drop-in,
    against JAX's autodiff of flax.linen's two-pass mode."""
    x = complex_batch(COMPLEX_SHAPE, 0)
    cotangent = complex_batch(COMPLEX_SHAPE, 1) - (2.0 - 1.0j)
    mask = make_mask(mask_kind, COMPLEX_SHAPE)
    kwargs = {
        "use_running_average": False,
        "param_dtype": param_dtype,
        "scale_init": nn.initializers.normal(1.0),
        "bias_init": nn.initializers.normal(1.0),
    }
    flax_module = nn.BatchNorm(use_fast_variance=False, **kwargs)
    with standard():
        variables = flax_module.init(jax.random.key(3), x)
    _, state = jaxbn.init(C, dtype=jnp.complex64)

    def module_loss(module):
        def loss(params, x):
            y, _ = module.apply({**variables, "params": params}, x, mask=mask,
                                mutable=["batch_stats"])
            return complex_loss(y, cotangent)

        return loss

    def pure_loss(params, x):
        y, _ = jaxbn.batch_norm(x, params, state, training=True, mask=mask)
        return complex_loss(y, cotangent)

    grad = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)  # noqa: E731
    with standard():  # flax promotes implicitly
        expected = grad(module_loss(flax_module))
    ours = [grad(pure_loss), grad(module_loss(jaxbn.linen.BatchNorm(**kwargs)))]
    for got in ours:
        chex.assert_trees_all_close(got, expected, strict=True, rtol=GRAD_TOL, atol=GRAD_TOL)


@pytest.mark.parametrize("mask_kind", ["full", "random"])
@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_complex_synchronized_training_equals_the_concatenated_batch(transform, mask_kind):
    """Synchronized over a named vmap axis or a shard_map mesh axis: every device's output
    and running statistics are the float64 reference's on the whole batch."""
    x, params = complex_batch(COMPLEX_SHAPE, 0), complex_params(jnp.complex64)
    mask = make_mask(mask_kind, COMPLEX_SHAPE)
    _, state = jaxbn.init(C, dtype=jnp.complex64)
    y, states = jax.jit(synchronized_run(transform, state, mask))(x, params)
    expected, mean, var = ref.batch_norm(x, -1, params["scale"], params["bias"], mask)
    devices = states.mean.shape[0]
    assert devices == (4 if transform == "vmap" else jax.device_count())
    chex.assert_trees_all_close(
        (y, states.mean, states.var),
        (expected, np.broadcast_to(ref.ema(0.0, mean, 0.9), (devices, C)),
         np.broadcast_to(ref.ema(1.0, var, 0.9), (devices, C))),
        **REF_TOL,
    )


@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_complex_synchronized_gradients_equal_the_concatenated_batch(transform):
    """The gradients of a real loss with respect to complex x and params, synchronized, are
    one device's on the whole batch (which match flax's autodiff, above)."""
    x, params = complex_batch(COMPLEX_SHAPE, 0), complex_params(jnp.complex64)
    cotangent = complex_batch(COMPLEX_SHAPE, 1)
    mask = make_mask("random", COMPLEX_SHAPE)
    _, state = jaxbn.init(C, dtype=jnp.complex64)
    run = synchronized_run(transform, state, mask)
    y, _, grads = loss_and_grads(run, x, params, cotangent)
    y_one, _, grads_one = loss_and_grads(single_run(state, mask), x, params, cotangent)
    chex.assert_trees_all_close(y, y_one, strict=True, **TOL)
    chex.assert_trees_all_close(grads, grads_one, strict=True, rtol=GRAD_TOL, atol=GRAD_TOL)



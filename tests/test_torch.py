"""``jaxbn.batch_norm`` against PyTorch's CPU batch norm (``torch.nn.functional.batch_norm``).

Conventions being converted (the table in docs/pure-function.md):
- momentum: torch keeps ``(1 - m) * old + m * batch``; jaxbn keeps ``m' * old + (1 - m') * batch``,
  so torch's ``m`` is jaxbn's ``m' = 1 - m`` (torch 0.1 == jaxbn 0.9);
- running variance: torch's EMA takes the *unbiased* batch variance (divide by n - 1), jaxbn's
  the biased one (divide by n). The tests recover torch's batch variance from its running
  variance and convert it, rather than recomputing it with jaxbn's own code.

The reference runs in float64 and in float32; jaxbn runs in float32 on the same (float32)
values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxbn

TOL = {"atol": 1e-5, "rtol": 1e-5}
STEPS = 3
# layout: (shape, jaxbn's feature axis). torch's channel axis is always 1.
LAYOUTS = {"NC": ((32, 5), -1), "NCHW": ((8, 3, 4, 5), 1)}
TORCH_DTYPES = {"torch64": torch.float64, "torch32": torch.float32}


def batch(shape, step):
    """float32 values with a per-channel mean in [-2, 2] and std in [0.5, 3]."""
    rng = np.random.default_rng(100 + step)
    channels = (1, shape[1]) + (1,) * (len(shape) - 2)
    loc = rng.uniform(-2, 2, channels)
    scale = rng.uniform(0.5, 3, channels)
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def affine(channels, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.normal(1.0, 0.5, channels).astype(np.float32)
    bias = rng.normal(0.0, 1.0, channels).astype(np.float32)
    return weight, bias


def to_torch(array, dtype):
    return torch.tensor(np.asarray(array), dtype=dtype)


def assert_close(ours, reference, tol=TOL):
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    np.testing.assert_allclose(
        np.asarray(ours, np.float64), np.asarray(reference, np.float64), **tol
    )


def reduced_count(shape):
    return math.prod(shape) // shape[1]


def biased_batch_var(new_running_var, old_running_var, factor, n):
    """The biased batch variance hidden in torch's update ``new = (1-f)*old + f*unbiased``."""
    unbiased = (new_running_var - (1 - factor) * old_running_var) / factor
    return unbiased * (n - 1) / n


@pytest.mark.parametrize("torch_momentum", [0.1, 0.5])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("torch_dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_steps_match_torch(layout, torch_dtype, eps, torch_momentum):
    shape, axis = LAYOUTS[layout]
    dtype = TORCH_DTYPES[torch_dtype]
    channels, n = shape[1], reduced_count(shape)
    weight, bias = affine(channels)
    params = {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)}
    _, state = jaxbn.init(channels)
    running_mean = torch.zeros(channels, dtype=dtype)
    running_var = torch.ones(channels, dtype=dtype)
    expected_var = np.ones(channels)  # jaxbn's biased-variance EMA, built from torch's values
    for step in range(STEPS):
        x = batch(shape, step)
        old_running_var = running_var.clone()
        y_torch = F.batch_norm(
            to_torch(x, dtype),
            running_mean,
            running_var,
            to_torch(weight, dtype),
            to_torch(bias, dtype),
            training=True,
            momentum=torch_momentum,
            eps=eps,
        )
        y, state = jaxbn.batch_norm(
            x, params, state, training=True, axis=axis, momentum=1 - torch_momentum, epsilon=eps
        )
        assert y.dtype == jnp.float32
        assert_close(y, y_torch)
        assert_close(state.mean, running_mean)
        var_biased = biased_batch_var(
            running_var.numpy(), old_running_var.numpy(), torch_momentum, n
        )
        expected_var = (1 - torch_momentum) * expected_var + torch_momentum * var_biased
        assert_close(state.var, expected_var)
    # The conventions really differ: jaxbn's running variance is not torch's.
    assert not np.allclose(np.asarray(state.var), running_var.numpy(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("torch_dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cumulative_average_matches_torch_momentum_none(layout, torch_dtype):
    """torch's momentum=None (in the nn modules) averages all batches seen with weight 1/k."""
    shape, axis = LAYOUTS[layout]
    dtype = TORCH_DTYPES[torch_dtype]
    channels, n = shape[1], reduced_count(shape)
    module_cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
    module = module_cls(channels, eps=1e-5, momentum=None, dtype=dtype).train()
    weight, bias = affine(channels)
    with torch.no_grad():
        module.weight.copy_(to_torch(weight, dtype))
        module.bias.copy_(to_torch(bias, dtype))
    params = {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)}
    _, state = jaxbn.init(channels)
    batch_vars = []
    for step in range(STEPS):
        x = batch(shape, step)
        old_running_var = module.running_var.clone()
        with torch.no_grad():
            y_torch = module(to_torch(x, dtype))
        factor = 1.0 / int(module.num_batches_tracked)
        assert factor == 1.0 / (step + 1)
        y, state = jaxbn.batch_norm(
            x, params, state, training=True, axis=axis, momentum=None, epsilon=1e-5
        )
        assert_close(y, y_torch)
        assert_close(state.mean, module.running_mean)
        batch_vars.append(
            biased_batch_var(module.running_var.numpy(), old_running_var.numpy(), factor, n)
        )
        assert_close(state.var, np.mean(batch_vars, axis=0))
        assert int(state.count) == int(module.num_batches_tracked) == step + 1


@pytest.mark.parametrize("use_affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("torch_dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_matches_torch(layout, torch_dtype, use_affine):
    shape, axis = LAYOUTS[layout]
    dtype = TORCH_DTYPES[torch_dtype]
    channels = shape[1]
    rng = np.random.default_rng(5)
    mean = rng.uniform(-2, 2, channels).astype(np.float32)
    var = rng.uniform(0.3, 8, channels).astype(np.float32)
    weight, bias = affine(channels, seed=1)
    x = batch(shape, 0)
    y_torch = F.batch_norm(
        to_torch(x, dtype),
        to_torch(mean, dtype),
        to_torch(var, dtype),
        to_torch(weight, dtype) if use_affine else None,
        to_torch(bias, dtype) if use_affine else None,
        training=False,
        eps=1e-3,
    )
    params = {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)} if use_affine else None
    _, state = jaxbn.init(channels)
    state = state._replace(mean=jnp.asarray(mean), var=jnp.asarray(var))
    y, new_state = jaxbn.batch_norm(x, params, state, training=False, axis=axis, epsilon=1e-3)
    assert_close(y, y_torch)
    assert new_state is state


@pytest.mark.parametrize("torch_dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_gradients_match_torch_autograd(layout, torch_dtype):
    shape, axis = LAYOUTS[layout]
    dtype = TORCH_DTYPES[torch_dtype]
    channels = shape[1]
    weight, bias = affine(channels, seed=2)
    x = batch(shape, 1)
    cotangent = np.random.default_rng(3).standard_normal(shape).astype(np.float32)

    x_t = to_torch(x, dtype).requires_grad_()
    weight_t = to_torch(weight, dtype).requires_grad_()
    bias_t = to_torch(bias, dtype).requires_grad_()
    y_t = F.batch_norm(x_t, None, None, weight_t, bias_t, training=True, momentum=0.1, eps=1e-5)
    torch.sum(torch.sin(y_t) * to_torch(cotangent, dtype)).backward()

    def loss(x, params):
        _, state = jaxbn.init(channels)
        y, _ = jaxbn.batch_norm(x, params, state, training=True, axis=axis, momentum=0.9)
        return jnp.sum(jnp.sin(y) * cotangent)

    params = {"scale": jnp.asarray(weight), "bias": jnp.asarray(bias)}
    grad_x, grad_params = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), params)
    assert_close(grad_x, x_t.grad)
    assert_close(grad_params["scale"], weight_t.grad)
    assert_close(grad_params["bias"], bias_t.grad)

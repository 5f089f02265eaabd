"""jaxbn.interop against PyTorch CPU modules and the Keras weight conventions.

Keras is not a test dependency: its side is checked through its documented conventions
(weights ``[gamma, beta, moving_mean, moving_variance]``, eval
``(x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta``) in float64 numpy.
"""

from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import interop

TOL = {"atol": 1e-5, "rtol": 1e-5}
C = 3


def nchw_batch(seed, n=4):
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-2, 2, (1, C, 1, 1))
    scale = rng.uniform(0.5, 3, (1, C, 1, 1))
    return (loc + scale * rng.standard_normal((n, C, 5, 5))).astype(np.float32)


@pytest.fixture(scope="module")
def trained_torch_bn():
    """A BatchNorm2d with random affine parameters and a few training steps of statistics."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(C, momentum=0.2, eps=1e-4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 2.0]))
    bn.train()
    for step in range(4):
        bn(torch.from_numpy(nchw_batch(step)))
    return bn.eval()


def torch_eval(module, x):
    with torch.no_grad():
        return module.eval()(torch.from_numpy(np.asarray(x))).numpy()


def test_torch_to_jaxbn_same_eval_output_nchw_and_nhwc(trained_torch_bn):
    bn = trained_torch_bn
    params, state = interop.from_torch(bn.state_dict())
    kwargs = interop.kwargs_from_torch(bn)
    assert kwargs == {"momentum": 0.8, "epsilon": 1e-4}
    assert int(state.count) == 4 and state.var.dtype == jnp.float32
    x = nchw_batch(10)
    expected = torch_eval(bn, x)
    y, same = jaxbn.batch_norm(x, params, state, training=False, axis=1, **kwargs)
    np.testing.assert_allclose(y, expected, **TOL)
    assert same is state
    y_nhwc, _ = jaxbn.batch_norm(
        np.transpose(x, (0, 2, 3, 1)), params, state, training=False, **kwargs
    )
    np.testing.assert_allclose(y_nhwc, np.transpose(expected, (0, 2, 3, 1)), **TOL)


def test_jaxbn_to_torch_round_trip():
    params, state = jaxbn.init(C)
    params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, -1.0, 1.0])}
    step = jax.jit(lambda x, s: jaxbn.batch_norm(x, params, s, training=True, axis=1,
                                                 momentum=0.9)[1])
    for seed in range(3):
        state = step(nchw_batch(seed), state)
    entries = interop.to_torch(params, state, prefix="1.")
    model = torch.nn.Sequential(
        torch.nn.Identity(), torch.nn.BatchNorm2d(C, **interop.kwargs_to_torch(momentum=0.9))
    )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in entries.items()})
    assert model[1].momentum == pytest.approx(0.1) and int(model[1].num_batches_tracked) == 3
    x = nchw_batch(11)
    y, _ = jaxbn.batch_norm(x, params, state, training=False, axis=1)
    np.testing.assert_allclose(torch_eval(model, x), y, **TOL)
    # and back: the same arrays
    params2, state2 = interop.from_torch(model.state_dict(), prefix="1.")
    chex.assert_trees_all_equal((params2, state2), (params, state))
    assert jax.tree.map(jax.typeof, state2) == jax.tree.map(jax.typeof, state)


def test_batch_entries_converts_the_training_convention(trained_torch_bn):
    """With batch_entries=n, one more training step in jaxbn, exported back, equals torch's
    own step: torch averages unbiased batch variances, jaxbn biased ones."""
    bn = torch.nn.BatchNorm2d(C, momentum=0.2, eps=1e-4)
    bn.load_state_dict(trained_torch_bn.state_dict())
    x = nchw_batch(20)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    params, state = interop.from_torch(bn.state_dict(), batch_entries=n)
    np.testing.assert_allclose(
        state.var, bn.running_var.numpy() * (n - 1) / n, rtol=1e-6
    )
    _, state = jaxbn.batch_norm(
        x, params, state, training=True, axis=1, **interop.kwargs_from_torch(bn)
    )
    bn.train()
    with torch.no_grad():
        bn(torch.from_numpy(x))
    exported = interop.to_torch(params, state, batch_entries=n)
    np.testing.assert_allclose(exported["running_var"], bn.running_var.numpy(), **TOL)
    np.testing.assert_allclose(exported["running_mean"], bn.running_mean.numpy(), **TOL)
    assert int(exported["num_batches_tracked"]) == int(bn.num_batches_tracked)


def test_torch_no_affine_and_cumulative_momentum():
    bn = torch.nn.BatchNorm1d(C, affine=False, momentum=None)
    bn(torch.from_numpy(np.random.default_rng(0).normal(size=(8, C)).astype(np.float32)))
    params, state = interop.from_torch(bn.state_dict())
    assert params is None
    assert interop.kwargs_from_torch(bn) == {"momentum": None, "epsilon": 1e-5}
    assert interop.kwargs_to_torch(momentum=None) == {"momentum": None, "eps": 1e-5}
    entries = interop.to_torch(None, state)
    assert sorted(entries) == ["num_batches_tracked", "running_mean", "running_var"]
    fresh = torch.nn.BatchNorm1d(C, affine=False)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in entries.items()})
    x = np.random.default_rng(1).normal(size=(5, C)).astype(np.float32)
    y, _ = jaxbn.batch_norm(x, None, state, training=False)
    np.testing.assert_allclose(torch_eval(fresh, x), y, **TOL)


def test_torch_float64_tensors_and_grad_parameters():
    bn = torch.nn.BatchNorm1d(C).double()  # weight/bias require grad: passed directly
    sd = dict(bn.state_dict(keep_vars=True))
    params, state = interop.from_torch(sd)
    expected = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32  # jax's widest
    assert state.mean.dtype == expected and params["scale"].dtype == expected
    np.testing.assert_array_equal(params["scale"], np.ones(C))


# ----------------------------------------------------------------------------------------------
# Keras
# ----------------------------------------------------------------------------------------------


def keras_eval(x, weights, epsilon):
    """Keras BatchNormalization(training=False), from its documented formula, in float64."""
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in weights)
    return (np.asarray(x, np.float64) - mean) / np.sqrt(var + epsilon) * gamma + beta


def test_keras_list_round_trip_and_eval():
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=C), rng.normal(size=C), rng.normal(size=C),
               rng.uniform(0.5, 2, C)]
    weights = [w.astype(np.float32) for w in weights]
    layer = SimpleNamespace(momentum=0.99, epsilon=1e-3, axis=-1)
    params, state = interop.from_keras(weights)
    assert int(state.count) == 0
    x = rng.normal(size=(4, 6, C)).astype(np.float32)
    y, _ = jaxbn.batch_norm(x, params, state, training=False, **interop.kwargs_from_keras(layer))
    np.testing.assert_allclose(y, keras_eval(x, weights, 1e-3), **TOL)
    exported = interop.to_keras(params, state)
    assert list(exported) == ["gamma", "beta", "moving_mean", "moving_variance"]
    for got, want in zip(exported.values(), weights, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable


def test_keras_dict_with_paths_and_missing_affine():
    sd = {
        "batch_normalization/beta:0": np.full(C, 0.5, np.float32),
        "batch_normalization/moving_mean:0": np.zeros(C, np.float32),
        "batch_normalization/moving_variance:0": np.ones(C, np.float32),
    }
    params, state = interop.from_keras(sd)
    assert sorted(params) == ["bias"]
    params_list, _ = interop.from_keras(list(sd.values()), scale=False)
    np.testing.assert_array_equal(params_list["bias"], params["bias"])
    assert list(interop.to_keras(params, state)) == ["beta", "moving_mean", "moving_variance"]
    none, _ = interop.from_keras([np.zeros(C), np.ones(C)], center=False, scale=False)
    assert none is None


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_errors(trained_torch_bn):
    sd = trained_torch_bn.state_dict()
    with pytest.raises(KeyError, match=r"`state_dict` has no 'bn\.running_mean'"):
        interop.from_torch(sd, prefix="bn.")
    with pytest.raises(KeyError, match="track_running_stats=False"):
        interop.from_torch({"weight": sd["weight"], "bias": sd["bias"]})
    with pytest.raises(KeyError, match="must hold both 'weight' and 'bias'"):
        interop.from_torch({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(ValueError, match=r"`state_dict` entries under '' must all have"):
        interop.from_torch({**sd, "running_var": torch.ones(C + 1)})
    with pytest.raises(ValueError, match="`batch_entries` must be None"):
        interop.from_torch(sd, batch_entries=1)
    _, state = jaxbn.init(C)
    with pytest.raises(ValueError, match=r"`params` must hold \"scale\" and \"bias\""):
        interop.to_torch({"scale": jnp.ones(C)}, state)
    with pytest.raises(ValueError, match=r"`state` must hold one feature axis"):
        interop.to_torch(None, jaxbn.init((2, 3))[1])
    with pytest.raises(TypeError, match="`module` must be a torch batch-norm module"):
        interop.kwargs_from_torch(object())
    with pytest.raises(TypeError, match="`layer` must be a keras BatchNormalization"):
        interop.kwargs_from_keras(object())
    with pytest.raises(ValueError, match=r"`weights` as a list must be \['gamma', 'beta'"):
        interop.from_keras([np.ones(C)] * 3)
    with pytest.raises(KeyError, match="`weights` has no"):
        interop.from_keras({"gamma": np.ones(C)})
    with pytest.raises(ValueError, match="`weights` must all have the same shape"):
        interop.from_keras([np.ones(C), np.ones(C), np.ones(C), np.ones(C + 1)])
    with pytest.raises(ValueError, match=r"`params\[\"scale\"\]` must have the statistics"):
        interop.to_keras({"scale": jnp.ones(C + 1)}, state)


@pytest.mark.parametrize(
    ("old", "new", "args", "kwargs"),
    [
        ("torch_kwargs", "kwargs_from_torch", (SimpleNamespace(momentum=0.2, eps=1e-3),), {}),
        ("torch_module_kwargs", "kwargs_to_torch", (), {"momentum": 0.8, "epsilon": 1e-3}),
        ("keras_kwargs", "kwargs_from_keras",
         (SimpleNamespace(momentum=0.9, epsilon=1e-2, axis=1),), {}),
    ],
)
def test_the_former_names_warn_and_convert_alike(old, new, args, kwargs):
    with pytest.warns(DeprecationWarning,
                      match=rf"`jaxbn\.interop\.{old}` is deprecated: use `jaxbn\.interop\.{new}`"):
        given = getattr(interop, old)(*args, **kwargs)
    assert given == getattr(interop, new)(*args, **kwargs)
    assert old not in interop.__all__ and new in interop.__all__

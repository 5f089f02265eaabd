"""What only ``jaxbn.nnx.BatchNorm`` has, against the real ``flax.nnx.BatchNorm``: its method
signatures, parameter metadata, ``.train()``/``.eval()``, the call-time
``use_running_average`` over the attribute, ``nnx.view``, and a jitted training loop.

What every drop-in promises (constructor, state, numerical parity over options and dtypes,
strict promotion, checkpoints) is tests/test_dropins.py, for linen and nnx together. Both
modules are built with the same arguments and the same ``nnx.Rngs`` seed; flax does not run
under the strict dtype promotion conftest.py sets, so flax calls run under ``standard()``.
"""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _parity import TOL, batches, standard
from flax import nnx

import jaxbn.nnx

FlaxBN = nnx.BatchNorm
JaxbnBN = jaxbn.nnx.BatchNorm

C = 6
ROW_SHAPE = (16, C)  # (N, C), feature axis -1

data = batches(4321)


def assert_stats_close(ours, theirs, tol=TOL):
    assert type(ours.mean) is type(theirs.mean) is nnx.BatchStat
    assert type(ours.var) is type(theirs.var) is nnx.BatchStat
    chex.assert_trees_all_close((ours.mean[...], ours.var[...]),
                                (theirs.mean[...], theirs.var[...]), strict=True, **tol)


def snapshot(model):
    return nnx.clone(nnx.state(model, nnx.BatchStat))


def pair(num_features=C, **kwargs):
    """flax's and jaxbn's module, same arguments, same seed (flax in its accurate mode)."""
    with standard():
        theirs = FlaxBN(num_features, use_fast_variance=False, **kwargs, rngs=nnx.Rngs(params=0))
        ours = JaxbnBN(num_features, **kwargs, rngs=nnx.Rngs(params=0))
    return ours, theirs


# ---------------------------------------------------------------- interface


@pytest.mark.parametrize("method", ["__call__", "set_view"])
def test_method_signatures_match_flax(method):
    ours = inspect.signature(getattr(JaxbnBN, method)).parameters
    theirs = inspect.signature(getattr(FlaxBN, method)).parameters
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        assert (ours[name].kind, ours[name].default) == (param.kind, param.default), name


def test_metadata_reaches_the_params_like_flax():
    kwargs = {"scale_metadata": {"tag": "s"}, "bias_metadata": {"tag": "b"}}
    ours, theirs = pair(**kwargs)
    assert ours.scale.get_metadata() == theirs.scale.get_metadata()
    assert ours.bias.get_metadata() == theirs.bias.get_metadata()


def train(model, steps=3):
    model.train()
    for step in range(steps):
        model(data(ROW_SHAPE, step))
    return model


# ---------------------------------------------------------------- modes


def test_train_and_eval_toggle_use_running_average_like_flax():
    ours, theirs = pair()
    assert ours.use_running_average is theirs.use_running_average is False
    ours.eval(), theirs.eval()
    assert ours.use_running_average is theirs.use_running_average is True
    ours.train(), theirs.train()
    assert ours.use_running_average is theirs.use_running_average is False
    with standard():
        ours_model = nnx.Sequential(JaxbnBN(C, rngs=nnx.Rngs(0)), nnx.relu)
    ours_model.eval()
    assert ours_model.layers[0].use_running_average is True


@pytest.mark.parametrize("mode, call", [("train", True), ("eval", False)])
def test_call_time_use_running_average_overrides_the_attribute(mode, call):
    ours, theirs = pair(momentum=0.9, scale_init=nnx.initializers.normal(1.0))
    x = data(ROW_SHAPE, 7)
    with standard():
        train(theirs, steps=1), train(ours, steps=1)
        getattr(theirs, mode)(), getattr(ours, mode)()
        before = snapshot(ours)
        expected = theirs(x, use_running_average=call)
        y = ours(x, use_running_average=call)
    chex.assert_trees_all_close(y, expected, strict=True, **TOL)
    assert_stats_close(ours, theirs)
    changed = not np.array_equal(ours.mean[...], before["mean"][...])
    assert changed is (not call)
    assert ours.use_running_average is (mode == "eval")  # the attribute itself is untouched


def test_view_sets_use_running_average_like_flax():
    assert hasattr(nnx, "view")
    ours, theirs = pair(momentum=0.9)
    x = data(ROW_SHAPE, 3)
    with standard():
        train(theirs), train(ours)
        theirs_view = nnx.view(theirs, use_running_average=True)
        ours_view = nnx.view(ours, use_running_average=True)
        assert ours_view.use_running_average is theirs_view.use_running_average is True
        assert ours.use_running_average is theirs.use_running_average is False
        before = snapshot(ours)
        chex.assert_trees_all_close(ours_view(x), theirs_view(x), strict=True, **TOL)
    np.testing.assert_array_equal(ours.mean[...], before["mean"][...])
    assert_stats_close(ours, theirs)


# ---------------------------------------------------------------- in a model, jitted


def make_model(bn_cls, **bn_kwargs):
    rngs = nnx.Rngs(0)
    return nnx.Sequential(
        nnx.Linear(4, 8, rngs=rngs),
        bn_cls(8, momentum=0.9, **bn_kwargs, rngs=rngs),
        nnx.relu,
        nnx.Linear(8, 1, rngs=rngs),
    )


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean(jnp.square(model(x) - y))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_training_loop_matches_flax():
    with standard():
        theirs = make_model(FlaxBN, use_fast_variance=False)
    ours = make_model(JaxbnBN)
    # Same seeds, same initial model.
    chex.assert_trees_all_equal(nnx.state(ours), nnx.state(theirs), strict=True)
    # SGD rather than Adam: Adam's first steps are ~lr*sign(grad), which would blow a
    # rounding-level gradient difference up to a whole step.
    ours_opt = nnx.Optimizer(ours, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    theirs_opt = nnx.Optimizer(theirs, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    key_x, key_w = jax.random.split(jax.random.key(0))
    w = jax.random.normal(key_w, (4, 1))
    ours_losses, theirs_losses = [], []
    for step in range(5):
        x = 1.0 + 2.0 * jax.random.normal(jax.random.fold_in(key_x, step), (32, 4))
        y = jnp.sin(x @ w)
        with standard():
            theirs_losses.append(train_step(theirs, theirs_opt, x, y))
        ours_losses.append(train_step(ours, ours_opt, x, y))
    np.testing.assert_allclose(np.array(ours_losses), np.array(theirs_losses), rtol=2e-5)
    assert ours_losses[-1] < ours_losses[0]
    assert_stats_close(ours.layers[1], theirs.layers[1], {"atol": 2e-5, "rtol": 2e-5})
    ours.eval(), theirs.eval()
    x = jax.random.normal(jax.random.key(9), (32, 4))
    with standard():
        expected = nnx.jit(lambda m, x: m(x))(theirs, x)
    chex.assert_trees_all_close(nnx.jit(lambda m, x: m(x))(ours, x), expected, strict=True,
                                rtol=1e-4, atol=1e-4)

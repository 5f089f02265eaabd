"""What tracing a model with jaxbn costs, pinned without a clock: a network's layers of one
shape and configuration trace batch norm's arithmetic once, not once per layer, and a jitted
call of a drop-in traces once per shape and mode, not once per call (the time itself is the
bench's: ``python -m experiments bench``, compile rows)."""

from __future__ import annotations

import functools

import _reference as ref
import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx
from jaxbn import _train


def _arithmetic_traces(monkeypatch, widths, depth=1):
    """How often the training arithmetic (``_train._forward``) runs while tracing the
    gradient of ``depth`` layers of each width in ``widths`` (every layer its own params)."""
    calls = []
    forward = _train._forward

    def counted(*args):
        calls.append(args[1].shape)
        return forward(*args)

    monkeypatch.setattr(_train, "_forward", counted)

    def loss(x, params, states):
        for p, state in zip(params, states, strict=True):
            y, _ = jaxbn.batch_norm(x, p, state, training=True, momentum=0.9)
            x = jnp.tanh(y)
        return jnp.sum(x)

    for width in widths:
        params, states = zip(*[jaxbn.init(width) for _ in range(depth)], strict=True)
        jax.jit(jax.grad(loss, argnums=(0, 1))).trace(jnp.ones((3, width)), params, states)
    return len(calls)


# Widths no other test uses, so that no earlier trace is in the cache.
def test_identical_layers_trace_the_arithmetic_once(monkeypatch):
    one_layer = _arithmetic_traces(monkeypatch, [101])
    eight_layers = _arithmetic_traces(monkeypatch, [103], depth=8)
    assert one_layer >= 1
    assert eight_layers == one_layer


def test_layers_of_different_shapes_each_trace_it(monkeypatch):
    # The negative control: the count does see every trace that is not shared.
    one_layer = _arithmetic_traces(monkeypatch, [107])
    assert _arithmetic_traces(monkeypatch, [109, 113, 127]) == 3 * one_layer


@pytest.mark.parametrize("as_arrays", [False, True], ids=["python-floats", "traced-arrays"])
def test_epsilon_and_momentum_as_numbers_or_arrays_match_the_reference(as_arrays):
    # Python numbers are constants of the traced program; arrays are its arguments.
    rng = np.random.default_rng(0)
    x = (2.0 + 3.0 * rng.normal(size=(16, 5))).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    scale = (0.5 + rng.random(5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    _, state = jaxbn.init(5)
    epsilon, momentum = 0.25, 0.75

    def step(x, params, epsilon, momentum):
        def loss(x, params):
            y, new = jaxbn.batch_norm(
                x, params, state, training=True, epsilon=epsilon, momentum=momentum
            )
            return jnp.sum(y * dy), (y, new)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)

    params = {"scale": scale, "bias": bias}
    if as_arrays:
        (dx, dparams), (y, new) = jax.jit(step)(x, params, epsilon, momentum)
    else:
        (dx, dparams), (y, new) = jax.jit(step, static_argnums=(2, 3))(
            x, params, epsilon, momentum
        )
    expected = ref.train_step(
        x, dy, scale=scale, bias=bias, running_mean=state.mean, running_var=state.var,
        momentum=momentum, eps=epsilon,
    )
    np.testing.assert_allclose(y, expected.y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, expected.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, expected.var, rtol=1e-5)
    np.testing.assert_allclose(dx, expected.dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["scale"], expected.dscale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["bias"], expected.dbias, rtol=1e-4, atol=1e-5)



# --------------------------------------------------------------------------- one trace per shape
# A jitted call of each drop-in, its function wrapped in ``chex.assert_max_traces``: new values
# of one shape reuse the trace, whether the call gets the state it returned last (threaded) or a
# freshly initialized one (a restart), and switching between training (the state updated) and
# evaluation (the state returned as given) back and forth traces each mode once; a new shape
# traces once more. A state whose type drifted between calls (a weak type, a dtype, a
# structure) would retrace on the threaded call, and a Python value that changed per call (a
# static argument) on every call. Training updates a step count too (``debias``; equinox's
# cumulative average).

C = 3
SHAPES = ((8, C), (5, C), (4, C))  # two shapes allowed; the third is one too many
MODES = (True, True, False, True, False, True)  # training?, in the order of the calls


def _linen():
    model = jaxbn.linen.BatchNorm(momentum=0.9, debias=True)
    variables = model.init(jax.random.key(0), jnp.zeros(SHAPES[0]), use_running_average=True)

    def step(variables, x, training):
        y, updates = model.apply(variables, x, use_running_average=not training,
                                 mutable=["batch_stats"])
        return y, {**variables, **updates}

    return jax.jit, step, lambda: variables


def _nnx():
    def step(model, x, training):  # the module's statistics are updated in place
        return model(x, use_running_average=not training), model

    def start():
        return jaxbn.nnx.BatchNorm(C, momentum=0.9, debias=True, rngs=nnx.Rngs(0))

    return nnx.jit, step, start


def _equinox():
    layer, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
        C, "batch", momentum=None, mode="batch")

    def step(state, x, training):
        call = functools.partial(layer, inference=not training)
        return jax.vmap(call, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    return jax.jit, step, lambda: state


@pytest.mark.parametrize("adapter", [_linen, _nnx, _equinox], ids=["linen", "nnx", "equinox"])
def test_a_drop_in_traces_once_per_shape_and_mode(adapter):
    chex.clear_trace_counter()
    jit, step, start = adapter()  # jit: jax.jit, or nnx.jit for a module argument
    traced = jit(chex.assert_max_traces(step, n=4), static_argnames="training")
    data = np.random.default_rng(0)
    for shape in SHAPES[:2]:
        state = start()
        for training in MODES:  # new values; the state the last call returned
            y, state = traced(state, jnp.asarray(data.normal(size=shape), jnp.float32),
                              training=training)
            chex.assert_shape(y, shape)
        traced(start(), jnp.asarray(data.normal(size=shape), jnp.float32), training=True)
    with pytest.raises(AssertionError, match="traced > 4 times"):
        traced(start(), jnp.zeros(SHAPES[2]), training=True)

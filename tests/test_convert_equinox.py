"""``jaxbn.equinox.convert_batch_norm``/``revert_batch_norm`` on models written with
``eqx.nn.BatchNorm``, against the same model left in equinox and the float64 reference.

The model has the shape of equinox's stateful example (Linear, BatchNorm, SpectralNorm,
Linear; made with ``eqx.nn.make_with_state``, trained under ``jax.vmap(axis_name="batch")``).
equinox does not run under the strict dtype promotion of conftest.py, so equinox calls are
wrapped in ``standard()``.
"""

from __future__ import annotations

import warnings

import _reference as ref
import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _parity import assert_close_to_largest
from jax.sharding import Mesh, PartitionSpec

import jaxbn.equinox
from jaxbn.equinox import convert_batch_norm, revert_batch_norm

C = 4
MOMENTUM = 0.9


def standard():
    return jax.numpy_dtype_promotion("standard")


def data(shape, seed, loc=2.0, scale=3.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(loc + scale * rng.standard_normal(shape), jnp.float32)


class Model(eqx.Module):
    """equinox's stateful example, with the BatchNorm mode chosen."""

    linear1: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    spectral: eqx.nn.SpectralNorm
    linear2: eqx.nn.Linear

    def __init__(self, key, mode="batch", **norm_kwargs):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.linear1 = eqx.nn.Linear(3, C, key=k1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mode="legacy" warns
            self.norm = eqx.nn.BatchNorm(C, "batch", momentum=MOMENTUM, mode=mode, **norm_kwargs)
        self.spectral = eqx.nn.SpectralNorm(eqx.nn.Linear(C, C, key=k2), "weight", key=k3)
        self.linear2 = eqx.nn.Linear(C, 2, key=k4)

    def __call__(self, x, state):
        x = self.linear1(x)
        x, state = self.norm(x, state)
        x = jax.nn.relu(x)
        x, state = self.spectral(x, state)
        return self.linear2(x), state


def make(mode="batch", **norm_kwargs):
    with standard():
        return eqx.nn.make_with_state(Model)(jax.random.key(0), mode, **norm_kwargs)


def batched(model, axis_name="batch", jit=True):
    """``model`` mapped over a batch of examples, as equinox's docs do; jitted unless it is
    to be differentiated (one compilation costs less than running each operation of a vmap
    on its own; and JAX cannot differentiate a jitted vmap of a custom_jvp with a
    collective, jaxbn's training mode: "unbound axis name")."""
    if jit:
        return lambda x, state: _batched_jit(model, x, state, axis_name)
    return jax.vmap(model, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


@eqx.filter_jit
def _batched_jit(model, x, state, axis_name):
    return batched(model, axis_name, jit=False)(x, state)


def loss_fn(model, state, x, y):
    pred, state = batched(model, jit=False)(x, state)
    return jnp.mean((pred - y) ** 2), (pred, state)


@eqx.filter_jit
def train_step(model, state, opt_state, x, y):
    with standard():
        (_, (pred, state)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, state, x, y)
        updates, opt_state = OPT.update(grads, opt_state)
        return eqx.apply_updates(model, updates), state, opt_state, pred, grads


OPT = optax.sgd(0.1)


def trained(mode, steps=2):
    """A model trained ``steps`` steps in equinox, and its state."""
    model, state = make(mode)
    opt_state = OPT.init(eqx.filter(model, eqx.is_array))
    for i in range(steps):
        model, state, opt_state, _, _ = train_step(model, state, opt_state, data((16, 3), i),
                                                   data((16, 2), 50 + i, 0.0, 1.0))
    return model, state


def predict(model, state, x):
    with standard():
        return batched(eqx.nn.inference_mode(model))(x, state)[0]


def equinox_statistics(layer, state):
    """What equinox's inference normalizes with (its ``__call__``, written out)."""
    if layer.mode == "ema":
        return state.get(layer.ema_state_index)
    counter = state.get(layer.batch_counter)
    hidden_mean, hidden_var = state.get(layer.batch_state_index)
    with standard():
        scale = jnp.where(counter == 0, 1, 1 - layer.momentum**counter)
        return hidden_mean / scale, hidden_var / scale


# ----------------------------------------------------------------------------------------------
# Right after conversion: the same arrays, the same predictions, the other state untouched
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_conversion_keeps_arrays_predictions_and_other_state(mode):
    model, state = trained(mode)
    x = data((16, 3), 9)
    y_equinox = predict(model, state, x)
    mean, var = equinox_statistics(model.norm, state)
    spectral = state.get(model.spectral.uv_index)

    new_model, new_state = convert_batch_norm(model, state)

    layer = new_model.norm
    assert type(layer) is jaxbn.equinox.BatchNorm and layer.mode == mode
    assert layer.weight is model.norm.weight and layer.bias is model.norm.bias
    assert (layer.axis_name, layer.eps, layer.momentum) == ("batch", 1e-5, MOMENTUM)
    stats = new_state.get(layer.state_index)
    np.testing.assert_array_equal(stats.mean, mean)  # equinox's own numbers, bit for bit
    np.testing.assert_array_equal(stats.var, var)
    assert all(a is b for a, b in zip(new_state.get(new_model.spectral.uv_index), spectral,
                                      strict=True))
    np.testing.assert_allclose(predict(new_model, new_state, x), y_equinox, rtol=1e-6,
                               atol=1e-6)
    # The keys: make_with_state's path names, as for the model built with jaxbn directly.
    assert layer.state_index.marker == "Model.norm.state_index"
    assert new_state.tree_flatten()[1] == ("Model.norm.state_index", "Model.spectral.uv_index")


def test_training_after_conversion_equals_equinox():
    """mode="batch", trained 2 steps in equinox, then 2 more steps on both sides: outputs,
    gradients and the statistics equinox's inference would use are equal."""
    theirs, their_state = trained("batch")
    ours, our_state = convert_batch_norm(theirs, their_state)
    their_opt = our_opt = OPT.init(eqx.filter(theirs, eqx.is_array))
    for i in range(2, 4):
        x, y = data((16, 3), i), data((16, 2), 50 + i, 0.0, 1.0)
        theirs, their_state, their_opt, their_pred, their_grads = train_step(
            theirs, their_state, their_opt, x, y)
        ours, our_state, our_opt, our_pred, our_grads = train_step(
            ours, our_state, our_opt, x, y)
        np.testing.assert_allclose(our_pred, their_pred, rtol=1e-5, atol=1e-5)
        assert_close_to_largest(eqx.filter(our_grads, eqx.is_array),
                                eqx.filter(their_grads, eqx.is_array), 1e-4, f"grads {i}",
                                same_classes=False)
        stats = our_state.get(ours.norm.state_index)
        mean, var = equinox_statistics(theirs.norm, their_state)
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var, var, rtol=1e-5)
        np.testing.assert_array_equal(our_state.get(ours.spectral.uv_index),
                                      their_state.get(theirs.spectral.uv_index))


def test_accurate_at_mean_1e4():
    """Data with mean 1e4 and std 1: the converted layer's output and statistics against the
    float64 reference. (equinox's moments are two-pass too, and accurate here as well; what
    it gets wrong is the first "batch" mode update, whose variance it inflates by
    momentum/(1-momentum): shown below.)"""
    with standard():
        layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, "batch", mode="batch",
                                                               momentum=MOMENTUM)
    ours, our_state = convert_batch_norm(layer, state)
    x = data((64, C, 5), 1, loc=1e4, scale=1.0)
    y_true, mean, var = ref.batch_norm(x, 1)
    y, our_state = batched(ours)(x, our_state)
    stats = our_state.get(ours.state_index)
    np.testing.assert_allclose(y, y_true, atol=2e-3)  # x itself is rounded by 1e-3
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(stats.var, var, rtol=1e-4)
    with standard():
        _, their_state = batched(layer)(x, state)
    _, their_var = equinox_statistics(layer, their_state)
    np.testing.assert_allclose(their_var, var + MOMENTUM / (1 - MOMENTUM), rtol=1e-4)


@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_axis_name_override_gives_the_full_batch_result(transform):
    """Converted with axis_name=("shards", "batch") and run on 4 shards of 4 examples, the
    model trains as equinox's does on the 16 examples under one vmap."""
    model, state = make("batch")
    x = data((16, 3), 3)
    with standard():
        y_full, full_state = batched(model)(x, state)
    ours, our_state = convert_batch_norm(model, state, axis_name=("shards", "batch"))
    shards = x.reshape(4, 4, 3)
    run = jax.vmap(ours, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    if transform == "vmap":
        y, our_state = jax.jit(jax.vmap(run, axis_name="shards", in_axes=(0, None),
                                        out_axes=(0, None)))(shards, our_state)
    else:
        # check_vma=False: with JAX's varying-axis checks on, the core's all_gather over a
        # vmap name inside shard_map (jaxbn/_moments.py, _all_gather) trips a JAX assertion.
        mesh = Mesh(np.array(jax.devices()[:4]), ("shards",))
        y, our_state = jax.jit(jax.shard_map(
            lambda xs, s: (lambda out: (out[0][None], out[1]))(run(xs[0], s)),
            mesh=mesh, in_specs=(PartitionSpec("shards"), PartitionSpec()),
            out_specs=(PartitionSpec("shards"), PartitionSpec()), check_vma=False,
        ))(shards, our_state)
    np.testing.assert_allclose(y.reshape(16, 2), y_full, rtol=1e-5, atol=1e-5)
    stats = our_state.get(ours.norm.state_index)
    # One batch from a fresh layer: jaxbn's running statistics are that batch's own;
    # equinox's hidden EMA divided by (1 - momentum) is the same for the mean.
    mean, _ = equinox_statistics(model.norm, full_state)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
    with standard():
        hidden = jax.vmap(model.linear1)(x)  # what the BatchNorm normalizes
    _, true_mean, true_var = ref.batch_norm(hidden)
    np.testing.assert_allclose(stats.mean, true_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, true_var, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# What the converted model works with
# ----------------------------------------------------------------------------------------------


def test_sequential_inference_mode_and_kept_initial_state():
    """An eqx.nn.Sequential whose state was made with eqx.nn.State directly (the layers keep
    their initial state, so eqx.nn.State can be called on the model again)."""
    with standard(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = eqx.nn.Sequential([eqx.nn.Linear(3, C, key=jax.random.key(0)),
                                   eqx.nn.BatchNorm(C, "batch", momentum=MOMENTUM),
                                   eqx.nn.Lambda(jax.nn.relu)])
    state = eqx.nn.State(model)
    ours, our_state = convert_batch_norm(model, state)
    x = data((8, 3), 4)
    y, our_state = batched(ours)(x, our_state)
    stats = our_state.get(ours.layers[1].state_index)
    assert int(stats.count) == 1
    y_eval, _ = batched(eqx.nn.inference_mode(ours))(x, our_state)
    np.testing.assert_allclose(y_eval, y, rtol=1e-4, atol=1e-4)  # one batch: its statistics
    fresh = eqx.nn.State(ours).get(ours.layers[1].state_index)
    assert int(fresh.count) == 0 and fresh.mean.shape == (C,)


class Block(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(C, C, key=key)
        self.norm = eqx.nn.BatchNorm(C, "batch", momentum=MOMENTUM, mode="batch")

    def __call__(self, x, state):
        x, state = self.norm(self.linear(x), state)
        return jax.nn.relu(x), state


@eqx.filter_jit
def run_stack(blocks, state, x):
    """Blocks stacked by eqx.filter_vmap, run one after the other by lax.scan."""
    params, static = eqx.partition(blocks, eqx.is_array)

    def body(x, params_and_state):
        block = eqx.combine(params_and_state[0], static)
        return batched(block)(x, params_and_state[1])

    with standard():
        return jax.lax.scan(body, x, (params, state))


def test_stacked_layers_keep_their_predictions():
    with standard():
        keys = jax.random.split(jax.random.key(0), 3)
        blocks, state = eqx.nn.make_with_state(lambda k: eqx.filter_vmap(Block)(k))(keys)
    x = data((8, C), 2)
    _, state = run_stack(blocks, state, x)  # one training step in equinox
    y_equinox, _ = run_stack(eqx.nn.inference_mode(blocks), state, x)
    ours, our_state = convert_batch_norm(blocks, state)
    assert our_state.get(ours.norm.state_index).count.shape == (3,)  # one per layer
    y_ours, _ = run_stack(eqx.nn.inference_mode(ours), our_state, x)
    np.testing.assert_allclose(y_ours, y_equinox, rtol=1e-6, atol=1e-6)
    back, back_state = revert_batch_norm(ours, our_state)
    assert eqx.tree_equal(back, blocks)
    chex.assert_trees_all_close(jax.tree.leaves(back_state), jax.tree.leaves(state), rtol=2e-7)


def test_inference_flag_carries_over():
    model, state = make("batch")
    ours, _ = convert_batch_norm(eqx.nn.inference_mode(model), state)
    assert ours.norm.inference is True
    ours, _ = convert_batch_norm(model, state, inference=True)
    assert ours.norm.inference is True


# ----------------------------------------------------------------------------------------------
# Overrides and what cannot be converted
# ----------------------------------------------------------------------------------------------


def test_overrides_are_set():
    model, state = make("batch")
    ours, _ = convert_batch_norm(model, state, momentum=None, eps=1e-3, mode="ema")
    assert (ours.norm.momentum, ours.norm.eps, ours.norm.mode) == (None, 1e-3, "ema")


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"virtual_batch_size": 4}, TypeError, r"`virtual_batch_size`=4, which is not a field "
                                               r"of jaxbn.equinox.BatchNorm"),
        ({"input_size": 3}, TypeError, r"cannot override `input_size`"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must lie in \[0, 1\)"),
        ({"eps": 0.0}, ValueError, r"Cannot convert the BatchNorm at model\.norm: `eps` must "
                                   r"be a number > 0"),
        ({"mode": "fast"}, ValueError, r"at model\.norm: `mode` must be 'batch', 'ema'"),
    ],
)
def test_bad_overrides_are_errors_at_conversion(overrides, error, match):
    model, state = make("batch")
    with pytest.raises(error, match=match):
        convert_batch_norm(model, state, **overrides)


def test_what_cannot_be_converted():
    model, state = make("batch")
    with pytest.raises(ValueError, match=r"`model` \(Linear\) holds no eqx.nn.BatchNorm"):
        convert_batch_norm(model.linear1, state)
    with pytest.raises(ValueError, match=r"`model` \(Model\) holds no jaxbn.equinox.BatchNorm"):
        revert_batch_norm(model, state)
    with pytest.raises(ValueError, match=r"`state` holds no running statistics for the "
                                         r"BatchNorm at model\[1\]"):
        convert_batch_norm([model.linear1, eqx.nn.BatchNorm(C, "b", mode="batch")], state)

    class ZooBatchNorm(eqx.nn.BatchNorm):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub = ZooBatchNorm(C, "batch")
    with pytest.raises(TypeError, match=r"model\.norm is a ZooBatchNorm, a subclass of "
                                        r"eqx.nn.BatchNorm"):
        convert_batch_norm(eqx.tree_at(lambda m: m.norm, model, sub), state)
    ours, our_state = convert_batch_norm(model, state, momentum=None)
    with pytest.raises(ValueError, match=r"model\.norm has `momentum`=None"):
        revert_batch_norm(ours, our_state)


# ----------------------------------------------------------------------------------------------
# Idempotence and the way back
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_converting_twice_changes_nothing(mode):
    ours, our_state = convert_batch_norm(*trained(mode))
    again, again_state = convert_batch_norm(ours, our_state)
    assert eqx.tree_equal(again, ours)
    assert eqx.tree_equal(again_state, our_state)


@pytest.mark.parametrize("mode", ["batch", "ema"])
@pytest.mark.parametrize("steps", [0, 2])
def test_convert_then_revert_round_trips(mode, steps):
    model, state = trained(mode, steps)
    back, back_state = revert_batch_norm(*convert_batch_norm(model, state))
    assert type(back.norm) is eqx.nn.BatchNorm
    assert eqx.tree_equal(back, model)  # the same arrays, fields and state keys
    assert back_state.tree_flatten()[1] == state.tree_flatten()[1]
    # hidden = (hidden / scale) * scale: one rounding in "batch" mode
    chex.assert_trees_all_close(jax.tree.leaves(back_state), jax.tree.leaves(state), rtol=2e-7,
                                strict=True)


def test_reverted_model_predicts_as_the_converted_one_and_equinox_trains_it():
    ours, our_state = convert_batch_norm(*trained("batch"))
    opt_state = OPT.init(eqx.filter(ours, eqx.is_array))
    x, y = data((16, 3), 7), data((16, 2), 57, 0.0, 1.0)
    ours, our_state, opt_state, _, _ = train_step(ours, our_state, opt_state, x, y)
    back, back_state = revert_batch_norm(ours, our_state)
    np.testing.assert_allclose(predict(back, back_state, x), predict(ours, our_state, x),
                               rtol=1e-5, atol=1e-5)
    # One more step on each side: equinox continues the statistics as jaxbn does.
    x = data((16, 3), 8)
    back, back_state, _, _, _ = train_step(back, back_state, opt_state, x, y)
    ours, our_state, _, _, _ = train_step(ours, our_state, opt_state, x, y)
    mean, var = equinox_statistics(back.norm, back_state)
    stats = our_state.get(ours.norm.state_index)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, var, rtol=1e-5)


def test_a_layer_the_pytree_does_not_reach_is_an_error():
    """A BatchNorm in a static field or a closure cannot be swapped: an error, not a layer
    silently left running equinox's code."""

    class Static(eqx.Module):
        norm: eqx.nn.BatchNorm
        frozen: eqx.nn.BatchNorm = eqx.field(static=True)

    model, state = make("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # equinox warns about a Module in a static field
        static = Static(model.norm, model.norm)
    with pytest.raises(TypeError, match=r"model\.frozen is a BatchNorm that convert_batch_norm "
                                        r"cannot reach: it is in a static field"):
        convert_batch_norm(static, state)
    layer = model.norm
    with pytest.raises(TypeError, match=r"model\[1\]\.<closure> is a BatchNorm"):
        convert_batch_norm([model, lambda x, s: layer(x, s)], state)

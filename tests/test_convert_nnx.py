"""``jaxbn.nnx.convert_batch_norm``/``revert_batch_norm`` on models written with
``flax.nnx.BatchNorm``, against the same model left in flax and the float64 reference.

The models are written as third-party code writes them: layers in attributes, ``nnx.List``,
``nnx.Dict``, ``nnx.Sequential``, a layer shared by two attributes, blocks stacked with
``nnx.vmap`` and run under ``nnx.scan``. flax does not run under the strict dtype promotion
of conftest.py, so both sides of each comparison run under ``standard()``.
"""

from __future__ import annotations

import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _parity import assert_close_to_largest, assert_tree_close, batches, standard
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import jaxbn.nnx
from jaxbn.nnx import convert_batch_norm, revert_batch_norm

C = 4  # features
LAYERS = 3  # stacked blocks
data = batches(1717)


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(C, C, rngs=rngs)
        self.bn = nnx.BatchNorm(C, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


class Zoo(nnx.Module):
    """A zoo model: every place nnx code keeps a BatchNorm."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Linear(3, C, rngs=rngs)
        self.norm = nnx.BatchNorm(C, momentum=0.8, epsilon=1e-3, rngs=rngs)
        self.post = self.norm  # shared: one layer, two attributes, run twice

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(rngs)

        self.blocks = make_blocks(rngs)  # stacked: Variables of shape (LAYERS, C)
        self.branches = nnx.List([nnx.BatchNorm(C, rngs=rngs), nnx.Linear(C, C, rngs=rngs)])
        self.named = nnx.Dict(gate=nnx.BatchNorm(C, use_bias=False, rngs=rngs))
        self.tail = nnx.Sequential(nnx.Linear(C, C, rngs=rngs), nnx.BatchNorm(C, rngs=rngs))
        self.frozen = nnx.BatchNorm(C, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(C, 2, rngs=rngs)

    def __call__(self, x):
        x = self.norm(self.stem(x))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        x = run(x, self.blocks)
        x = self.branches[1](self.branches[0](x))
        x = self.named["gate"](x) + self.tail(x)
        return self.head(self.frozen(self.post(x)))


# The BatchNorm layers of Zoo by the attribute path nnx gives them.
ZOO_LAYERS = [
    ("norm",), ("blocks", "bn"), ("branches", 0), ("named", "gate"), ("tail", "layers", 1),
    ("frozen",),
]


def at(model, path):
    for key in path:
        model = model[key] if isinstance(key, int) or isinstance(model, nnx.Dict) else getattr(
            model, key)
    return model


@nnx.jit
def call(model, x):
    """``model(x)`` (its state updated in place), compiled: one compilation costs less than
    running each operation on its own."""
    return model(x)


def zoo():
    with standard():
        return Zoo(nnx.Rngs(0))


def variables(model):
    """Every Variable object of ``model`` by path."""
    return {path: v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def flat_state(model):
    """``nnx.state(model)`` as (path, Variable type, value) triples."""
    return [(path, type(v), np.asarray(v[...])) for path, v in nnx.to_flat_state(
        nnx.state(model))]


def assert_same_state(actual, expected):
    """The same paths and Variable types, and values of the same shapes, dtypes and bits."""
    assert [(p, t) for p, t, _ in actual] == [(p, t) for p, t, _ in expected]
    chex.assert_trees_all_equal([a for _, _, a in actual], [e for _, _, e in expected],
                                strict=True)


# ----------------------------------------------------------------------------------------------
# The swap: every layer, the same Variables, the same state
# ----------------------------------------------------------------------------------------------


def test_every_layer_is_swapped_in_place_holding_the_same_variables():
    model = zoo()
    before_vars, before_state = variables(model), flat_state(model)
    old_layers = {path: at(model, path) for path in ZOO_LAYERS}

    assert convert_batch_norm(model) is model

    for path in ZOO_LAYERS:
        assert type(at(model, path)) is jaxbn.nnx.BatchNorm, path
    assert model.post is model.norm  # the shared layer is still one object
    after_vars = variables(model)
    assert after_vars.keys() == before_vars.keys()
    assert all(after_vars[p] is before_vars[p] for p in before_vars)
    assert_same_state(flat_state(model), before_state)
    assert model.blocks.bn.mean.shape == (LAYERS, C)
    # Every field of flax's layer carries over, the frozen flag included.
    for path, old in old_layers.items():
        new = at(model, path)
        for name in ("num_features", "use_running_average", "axis", "momentum", "epsilon",
                     "dtype", "param_dtype", "use_bias", "use_scale", "axis_name",
                     "axis_index_groups", "use_fast_variance", "promote_dtype"):
            assert getattr(new, name) == getattr(old, name), (path, name)
    assert model.frozen.use_running_average is True


def test_non_default_fields_carry_over():
    def promote(arrays, dtype=None):
        return nnx.nn.dtypes.promote_dtype(arrays, dtype=dtype)

    with standard():
        old = nnx.BatchNorm(
            C, use_running_average=None, axis=1, momentum=0.5, epsilon=0.1, dtype=jnp.bfloat16,
            param_dtype=jnp.float16, use_scale=False, axis_name="i",
            axis_index_groups=[[0, 1]], use_fast_variance=False, promote_dtype=promote,
            rngs=nnx.Rngs(0),
        )
    old.note = "kept"  # an attribute a user set on the layer
    fields = dict(vars(old))
    new = convert_batch_norm(old)
    for name, value in fields.items():
        if not name.startswith("_pytree__"):
            assert getattr(new, name) is value, name
    assert new.scale is None and new.count is None


def test_a_root_batch_norm_is_replaced_by_the_returned_layer():
    with standard():
        old = nnx.BatchNorm(C, rngs=nnx.Rngs(0))
    new = convert_batch_norm(old)
    assert type(new) is jaxbn.nnx.BatchNorm and type(old) is nnx.BatchNorm
    assert (new.mean, new.var, new.scale, new.bias) == (old.mean, old.var, old.scale, old.bias)
    assert all(a is b for a, b in zip((new.mean, new.var, new.scale, new.bias),
                                      (old.mean, old.var, old.scale, old.bias), strict=True))
    back = revert_batch_norm(new)
    assert type(back) is nnx.BatchNorm and back.mean is old.mean


def test_plain_lists_dicts_and_tuples_are_swapped():
    with standard():
        rngs = nnx.Rngs(0)
        model = nnx.Dict(
            listed=nnx.data([nnx.BatchNorm(C, rngs=rngs)]),
            paired=nnx.data((nnx.Linear(C, C, rngs=rngs), nnx.BatchNorm(C, rngs=rngs))),
        )
    listed = model["listed"]
    convert_batch_norm(model)
    assert model["listed"] is listed and type(listed[0]) is jaxbn.nnx.BatchNorm
    assert type(model["paired"][1]) is jaxbn.nnx.BatchNorm


# ----------------------------------------------------------------------------------------------
# Behaviour after conversion, against the model left in flax
# ----------------------------------------------------------------------------------------------


def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads


def test_training_outputs_gradients_and_statistics_equal_flax():
    """2 nnx.jit steps with an nnx.Optimizer made before the conversion, then eval. (SGD:
    Adam would scale the rounding noise of the biases before a BatchNorm, whose true
    gradient is 0, up to full steps.)"""
    theirs, ours = zoo(), zoo()
    with standard():
        their_opt = nnx.Optimizer(theirs, optax.sgd(0.1), wrt=nnx.Param)
        our_opt = nnx.Optimizer(ours, optax.sgd(0.1), wrt=nnx.Param)
    convert_batch_norm(ours)
    step = nnx.jit(train_step)
    for i in range(2):
        x, y = data((16, 3), i), data((16, 2), 100 + i, loc=0.0, scale=1.0)
        with standard():
            their_loss, their_grads = step(theirs, their_opt, x, y)
            our_loss, our_grads = step(ours, our_opt, x, y)
        np.testing.assert_allclose(our_loss, their_loss, rtol=1e-5)
        assert jax.tree.structure(our_grads) == jax.tree.structure(their_grads)
        assert_close_to_largest(our_grads, their_grads, 1e-4, f"gradients, step {i}",
                                same_classes=False)
        for kind in (nnx.Param, nnx.BatchStat):
            assert_close_to_largest(nnx.state(ours, kind), nnx.state(theirs, kind), 1e-4,
                                    f"{kind.__name__}, step {i}", same_classes=False)
    ours.eval()
    assert all(at(ours, p).use_running_average for p in ZOO_LAYERS)
    ours.train()
    assert not any(at(ours, p).use_running_average for p in ZOO_LAYERS)


def test_accurate_at_mean_1e4_where_flax_is_not():
    """Data with mean 1e4 and std 1: flax's one-pass variance E[x²] - E[x]² loses it."""
    x = data((256, C), 0, loc=1e4, scale=1.0)
    _, mean, var = ref.batch_norm(x)
    with standard():
        theirs = nnx.Sequential(nnx.BatchNorm(C, momentum=0.0, rngs=nnx.Rngs(0)))
        ours = convert_batch_norm(nnx.Sequential(nnx.BatchNorm(C, momentum=0.0,
                                                               rngs=nnx.Rngs(0))))
        their_y, our_y = call(theirs, x), call(ours, x)
    y_true, _, _ = ref.batch_norm(x)
    ours_err = np.max(np.abs(np.asarray(ours.layers[0].var[...]) - var) / var)
    theirs_err = np.max(np.abs(np.asarray(theirs.layers[0].var[...]) - var) / var)
    assert ours_err < 1e-4, ours_err
    assert theirs_err > 0.1, theirs_err  # flax's variance is wrong by O(1)
    np.testing.assert_allclose(np.asarray(ours.layers[0].mean[...]), mean, rtol=1e-6)
    np.testing.assert_allclose(our_y, y_true, atol=2e-3)  # x itself is rounded by 1e-3
    assert np.max(np.abs(np.asarray(their_y) - y_true)) > 0.1


def sync_model():
    with standard():
        return nnx.Sequential(nnx.Linear(3, C, rngs=nnx.Rngs(0)),
                              nnx.BatchNorm(C, momentum=0.5, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_axis_name_override_gives_the_full_batch_result(transform):
    """A model converted with axis_name= run on 4 shards equals flax on the whole batch."""
    x = data((16, 3), 3)
    theirs = sync_model()
    with standard():
        y_full = call(theirs, x)
    ours = convert_batch_norm(sync_model(), axis_name="shards")
    graphdef, state = nnx.split(ours)

    def shard_step(state, x_shard):
        model = nnx.merge(graphdef, state)
        return model(x_shard), nnx.state(model)

    shards = x.reshape(4, 4, 3)
    with standard():
        if transform == "vmap":
            y, new_state = jax.jit(jax.vmap(shard_step, in_axes=(None, 0), out_axes=(0, None),
                                            axis_name="shards"))(state, shards)
        else:
            mesh = Mesh(np.array(jax.devices()[:4]), ("shards",))
            y, new_state = jax.jit(jax.shard_map(
                lambda s, xs: (lambda out: (out[0][None], out[1]))(shard_step(s, xs[0])),
                mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("shards")),
                out_specs=(PartitionSpec("shards"), PartitionSpec()),
            ))(state, shards)
    nnx.update(ours, new_state)
    assert_tree_close(y.reshape(16, C), y_full, 1e-4, "output")
    assert_tree_close(nnx.state(ours), nnx.state(theirs), 1e-5, "state")


def test_overrides_are_set_on_every_layer():
    model = convert_batch_norm(zoo(), momentum=0.5, virtual_batch_size=4, debias=True)
    for path in ZOO_LAYERS:
        layer = at(model, path)
        assert (layer.momentum, layer.virtual_batch_size, layer.debias) == (0.5, 4, True)
        assert type(layer.count) is nnx.BatchStat  # debias keeps a count
    assert model.blocks.bn.count.shape == (LAYERS,)  # one per stacked layer
    # Ghost batches of 4 rows, each normalized with its own statistics.
    layer = convert_batch_norm(nnx.BatchNorm(C, use_scale=False, use_bias=False,
                                             rngs=nnx.Rngs(0)), virtual_batch_size=4)
    x = data((16, C), 5)
    np.testing.assert_allclose(call(layer, x), ref.ghost_batch_norm(x, 4)[0], atol=2e-5)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"axis_nmae": "i"}, TypeError, r"`axis_nmae`='i', which is not a field"),
        ({"use_scale": False}, TypeError, r"cannot override `use_scale`"),
        ({"num_features": 3}, TypeError, r"cannot override `num_features`"),
        ({"momentum": 1.5}, ValueError, r"`momentum` must lie in \[0, 1\).*1\.5"),
        ({"epsilon": 0.0}, ValueError, r"`epsilon` must be > 0, got 0\.0"),
        ({"virtual_batch_size": 0}, ValueError, r"`virtual_batch_size` must be a positive"),
        ({"debias": 1}, TypeError, r"`debias`"),
    ],
)
def test_bad_overrides_are_errors_at_conversion(overrides, error, match):
    model = zoo()
    with pytest.raises(error, match=match):
        convert_batch_norm(model, **overrides)
    assert type(model.norm) is nnx.BatchNorm  # nothing was swapped


def test_a_model_without_batch_norm_is_an_error():
    with pytest.raises(ValueError, match=r"`model` \(Linear\) holds no flax.nnx.BatchNorm"):
        convert_batch_norm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"`model` \(Linear\) holds no jaxbn.nnx.BatchNorm"):
        revert_batch_norm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_a_subclass_is_an_error_and_nothing_is_swapped():
    class ZooBatchNorm(nnx.BatchNorm):
        def __call__(self, x, use_running_average=None, *, mask=None):
            return 2 * super().__call__(x, use_running_average, mask=mask)

    model = zoo()
    model.custom = ZooBatchNorm(C, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"model\.custom is a ZooBatchNorm, a subclass of "
                                        r"flax\.nnx\.BatchNorm"):
        convert_batch_norm(model)
    assert type(model.norm) is nnx.BatchNorm


# ----------------------------------------------------------------------------------------------
# Idempotence and the way back
# ----------------------------------------------------------------------------------------------


def test_converting_twice_changes_nothing():
    model = convert_batch_norm(zoo())
    layers = {path: at(model, path) for path in ZOO_LAYERS}
    state = flat_state(model)
    assert convert_batch_norm(model) is model
    assert all(at(model, path) is layer for path, layer in layers.items())
    assert_same_state(flat_state(model), state)


def test_convert_then_revert_round_trips():
    original = zoo()
    fields = {path: dict(vars(at(original, path))) for path in ZOO_LAYERS}
    state, before_vars = flat_state(original), variables(original)
    model = revert_batch_norm(convert_batch_norm(original, debias=True, use_renorm=True))
    assert model is original
    for path in ZOO_LAYERS:
        layer = at(model, path)
        assert type(layer) is nnx.BatchNorm, path
        assert {k: v for k, v in vars(layer).items() if not k.startswith("_pytree__")} == {
            k: v for k, v in fields[path].items() if not k.startswith("_pytree__")}, path
    assert model.post is model.norm
    assert_same_state(flat_state(model), state)  # the `count` of debias is gone again
    assert all(variables(model)[p] is v for p, v in before_vars.items())


def test_eval_after_conversion_and_after_revert_equals_flax():
    """Trained 2 steps, then .eval() (nnx.view too): the converted model predicts as
    flax's; reverted, it predicts the same, and flax trains it with the converted layer's
    fields."""
    theirs, ours = sync_model(), convert_batch_norm(sync_model(), momentum=0.5)
    with standard():
        for i in range(2):
            call(theirs, data((16, 3), i))
            call(ours, data((16, 3), i))
        assert nnx.view(ours, use_running_average=True).layers[1].use_running_average
        theirs.eval()
        ours.eval()
        x = data((16, 3), 9)
        y_theirs = call(theirs, x)
        np.testing.assert_allclose(call(ours, x), y_theirs, rtol=1e-5, atol=1e-5)
        reverted = revert_batch_norm(ours)
        assert type(reverted.layers[1]) is nnx.BatchNorm and reverted.layers[1].momentum == 0.5
        np.testing.assert_allclose(call(reverted, x), y_theirs, rtol=1e-5, atol=1e-5)
        reverted.train()
        theirs.train()
        call(reverted, x)
        call(theirs, x)
    assert_tree_close(nnx.state(reverted), nnx.state(theirs), 1e-5, "state")

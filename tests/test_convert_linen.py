"""``jaxbn.linen.convert_batch_norm`` on models written the way third-party code writes them.

Every model here names ``flax.linen.BatchNorm`` itself, as a model zoo does: a
``functools.partial`` captured at import, layers built in ``setup`` or ``@nn.compact``,
stacked with ``nn.scan`` over ``nn.remat``, ensembled with ``nn.vmap``, jitted with
``nn.jit``, in a model with an unhashable field. The truth is flax itself on well-scaled
data, and the float64 reference (tests/_reference.py) on data with mean 1e4 and std 1,
where flax's one-pass variance fails and flax serves as the negative control.
"""

from __future__ import annotations

import functools

import _reference as ref
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import assert_close_to_largest, batches, standard
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn.linen
from jaxbn.linen import ConvertedModule, convert_batch_norm

Norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)  # a zoo's import-time norm
data = batches(17)
N, C, OUT = 16, 5, 3
TOL = 1e-4


class CompactNet(nn.Module):
    """Norms built in ``@nn.compact``; train/eval through their ``use_running_average`` field."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Norm(use_running_average=not train, name="bn_in")(x)
        x = Norm(use_running_average=not train)(nn.Dense(4)(x))
        return nn.Dense(OUT)(nn.relu(x))


class SetupNet(nn.Module):
    """Norms built in ``setup``; train/eval as a call argument; a second method."""

    def setup(self) -> None:
        self.bn_in = nn.BatchNorm(momentum=0.9)
        self.dense = nn.Dense(4)
        self.bn = Norm()
        self.head = nn.Dense(OUT)

    def encode(self, x: jax.Array, train: bool) -> jax.Array:
        x = self.bn_in(x, use_running_average=not train)
        return nn.relu(self.bn(self.dense(x), not train))

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.head(self.encode(x, train))


class Block(nn.Module):
    """A residual Dense → norm → relu block, in the carry-and-output form ``nn.scan`` takes."""

    train: bool

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        y = Norm(use_running_average=not self.train)(nn.Dense(x.shape[-1])(x))
        return x + nn.relu(y), None


class TransformsNet(nn.Module):
    """Two blocks stacked by ``nn.scan`` over ``nn.remat``, then an ensemble of two blocks
    made by ``nn.vmap``, averaged."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Norm(use_running_average=not train, name="bn_in")(x)
        blocks = nn.scan(
            nn.remat(Block), variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True}, length=2,
        )
        x, _ = blocks(train)(nn.Dense(4)(x), None)
        ensemble = nn.vmap(
            Block, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True},
            in_axes=(None, None), out_axes=(0, None), axis_size=2,
        )
        y, _ = ensemble(train)(x, None)
        return nn.Dense(OUT)(y.mean(0))


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return nn.relu(Norm(use_running_average=not train)(nn.Dense(4)(x)))


JitInner = nn.jit(_Inner, static_argnums=2)  # made once, at import: its trace cache persists


class JitNet(nn.Module):
    """Unhashable (its widths are a list); trains exactly when ``batch_stats`` is mutable;
    one block is wrapped in ``nn.jit``, which caches its trace by the block's fields and
    scope."""

    widths: list[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        train = self.is_mutable_collection("batch_stats")
        x = Norm(use_running_average=not train, name="bn_in")(x)
        x = JitInner(name="jitted")(x, train)
        for width in self.widths:
            x = nn.relu(Norm(use_running_average=not train)(nn.Dense(width)(x)))
        return nn.Dense(OUT)(x)


# name: (model, train keyword arguments, eval keyword arguments)
ZOO = {
    "compact": (CompactNet(), {"train": True}, {"train": False}),
    "setup": (SetupNet(), {"train": True}, {"train": False}),
    "scan_remat_vmap": (TransformsNet(), {"train": True}, {"train": False}),
    "jit_mutable_unhashable": (JitNet([4]), {}, {}),
}


def _init(model, x, eval_kw):
    with standard():
        return jax.jit(functools.partial(model.init, **eval_kw))(jax.random.key(0), x)


def _stepper(model, train_kw, eval_kw):
    """A jitted training step and evaluation: ``(variables, x, dy, x_eval) -> (y, gradients
    of sum(y * dy) for the params, new batch_stats, output on x_eval with those)``."""

    def loss(params, variables, x, dy):
        y, updates = model.apply(
            {**variables, "params": params}, x, **train_kw, mutable=["batch_stats"]
        )
        return jnp.sum(y * dy), (y, updates["batch_stats"])

    @jax.jit
    def step(variables, x, dy, x_eval):
        with standard():
            (_, (y, stats)), grads = jax.value_and_grad(loss, has_aux=True)(
                variables["params"], variables, x, dy)
            y_eval = model.apply({**variables, "batch_stats": stats}, x_eval, **eval_kw)
        return y, grads, stats, y_eval

    return step


def _far_from_zero(step=0):
    """Activations with mean 1e4 and std 1, where E[x²] - E[x]² loses every digit."""
    return data((N, C), step, loc=1e4, scale=1.0)


def _expected_bn_in(x, momentum=0.9):
    """The float64 truth for ``bn_in`` after one training step from a fresh init."""
    _, mean, var = ref.batch_norm(x, eps=1e-5)
    return {"mean": ref.ema(np.zeros(C), mean, momentum), "var": ref.ema(np.ones(C), var, momentum)}


# --------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("name", ZOO)
def test_a_zoo_model_converted_matches_flax_and_is_accurate_at_mean_1e4(name):
    # init makes exactly flax's variables. Then, from flax's variables: a training step on
    # well-scaled data gives flax's outputs, gradients and batch_stats, eval gives flax's
    # outputs; on data with mean 1e4 and std 1 the running statistics are the float64
    # truth's, and flax's are far from it.
    model, train_kw, eval_kw = ZOO[name]
    converted = convert_batch_norm(model)
    x = data((N, C), 0)
    variables = _init(model, x, eval_kw)
    with standard():
        ours = jax.eval_shape(functools.partial(converted.init, **eval_kw), jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, variables)

    step, flax_step = _stepper(converted, train_kw, eval_kw), _stepper(model, train_kw, eval_kw)
    dy, x_eval = data((N, OUT), 9, loc=0.0, scale=1.0), data((N, C), 1)
    ours, theirs = step(variables, x, dy, x_eval), flax_step(variables, x, dy, x_eval)
    for what, a, e in zip(("output", "gradients", "batch_stats", "eval output"), ours, theirs,
                          strict=True):
        assert_close_to_largest(a, e, TOL, what)

    far = _far_from_zero()
    expected = _expected_bn_in(far)
    stats = step(variables, far, dy, x_eval)[2]["bn_in"]
    stats_flax = flax_step(variables, far, dy, x_eval)[2]["bn_in"]
    np.testing.assert_allclose(stats["mean"], expected["mean"], rtol=1e-6)
    np.testing.assert_allclose(stats["var"], expected["var"], rtol=1e-5)
    assert np.max(np.abs(stats_flax["var"] - expected["var"])) > 0.1  # flax's variance is off


# ---------------------------------------------------------------------- axis_name


def test_axis_name_under_vmap_and_shard_map_equals_the_full_batch():
    # The model's author never set axis_name; the override synchronizes every layer, and
    # 8 shards of 4 examples train as the whole batch of 32 does.
    model = CompactNet()
    shards = jax.device_count()
    x, dy = data((shards * 4, C), 0), data((shards * 4, OUT), 1, loc=0.0, scale=1.0)
    variables = _init(model, x, {"train": False})
    full = _stepper(convert_batch_norm(model), {"train": True}, {"train": False})(
        variables, x, dy, x)[:3]
    synced = convert_batch_norm(model, axis_name="batch")

    def per_shard(params, x):
        with standard():
            y, updates = synced.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"])
        return y, updates["batch_stats"]

    def under_vmap(params, x):
        y, stats = jax.vmap(per_shard, in_axes=(None, 0), axis_name="batch")(
            params, x.reshape(shards, 4, C))
        return y.reshape(shards * 4, OUT), jax.tree.map(lambda a: a[0], stats)

    mesh = jax.make_mesh((shards,), ("batch",))
    under_shard_map = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("batch")),
                                    out_specs=(P("batch"), P()))
    for name, run, x_in in (
        ("vmap", under_vmap, x),
        ("shard_map", under_shard_map, jax.device_put(x, NamedSharding(mesh, P("batch")))),
    ):

        def loss(params, x, run=run):
            y, stats = run(params, x)
            return jnp.sum(y * dy), (y, stats)

        (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            variables["params"], x_in)
        assert_close_to_largest((y, grads, stats), full, TOL, name)


# ------------------------------------------------------------- caches and the original


def _train_apply(model, train_items, variables, x):
    with standard():
        return model.apply(variables, x, **dict(train_items), mutable=["batch_stats"])


TRAIN_APPLY_STATIC = jax.jit(_train_apply, static_argnums=(0, 1))


@pytest.mark.parametrize("name", ["compact", "jit_mutable_unhashable"])
def test_never_served_a_trace_made_for_the_original(name):
    # The original runs first, so its traces are cached (nn.jit's inside the model, and
    # jax.jit's with a hashable model as a static argument), then the converted model, then
    # the original again: the converted model gets jaxbn's numbers, the original flax's.
    model, train_kw, eval_kw = ZOO[name]
    converted = convert_batch_norm(model)
    runs = [_train_apply]
    if name == "compact":
        assert hash(converted) == hash(convert_batch_norm(model))
        assert converted == convert_batch_norm(model) and converted != model
        runs.append(TRAIN_APPLY_STATIC)
    x = _far_from_zero()
    variables = _init(model, x, eval_kw)
    items = tuple(train_kw.items())
    for run in runs:
        before = run(model, items, variables, x)
        after = run(converted, items, variables, x)
        again = run(model, items, variables, x)
        chex.assert_trees_all_close(after[1]["batch_stats"]["bn_in"], _expected_bn_in(x),
                                    rtol=1e-5)
        chex.assert_trees_all_equal(again, before)
        flax_var = again[1]["batch_stats"]["bn_in"]["var"]
        assert np.max(np.abs(flax_var - _expected_bn_in(x)["var"])) > 0.1  # flax's variance


def test_an_unhashable_model_converts_to_an_unhashable_one():
    model = ZOO["jit_mutable_unhashable"][0]
    with pytest.raises(TypeError, match="unhashable"):
        hash(model)
    with pytest.raises(TypeError, match="unhashable"):
        hash(convert_batch_norm(model))


def test_method_argument_runs_the_originals_method_converted():
    model = SetupNet()
    x = _far_from_zero()
    variables = _init(model, x, {"train": False})
    converted = convert_batch_norm(model, momentum=0.5)
    for method in ("encode", SetupNet.encode):
        with standard():
            _, updates = jax.jit(functools.partial(
                converted.apply, method=method, mutable=["batch_stats"]
            ), static_argnums=2)(variables, x, True)
        np.testing.assert_allclose(updates["batch_stats"]["bn_in"]["var"],
                                   _expected_bn_in(x, momentum=0.5)["var"], rtol=1e-5)


def test_a_converted_submodule_keeps_the_originals_place_in_the_tree():
    class Outer(nn.Module):
        convert: bool

        @nn.compact
        def __call__(self, x, train):
            inner = CompactNet(name="backbone")
            y = (convert_batch_norm(inner) if self.convert else inner)(x, train)
            return nn.Dense(2)(y)

    x = _far_from_zero()
    theirs = _init(Outer(False), x, {"train": False})
    with standard():
        ours = jax.eval_shape(functools.partial(Outer(True).init, train=False),
                              jax.random.key(0), x)
        _, updates = jax.jit(functools.partial(
            Outer(True).apply, train=True, mutable=["batch_stats"]))(theirs, x)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)
    np.testing.assert_allclose(updates["batch_stats"]["backbone"]["bn_in"]["var"],
                               _expected_bn_in(x)["var"], rtol=1e-5)


# ------------------------------------------------------------------------- overrides


def test_overrides_reach_every_layer_and_ours_too():
    # momentum=0.5 on flax's layers and on a jaxbn.linen.BatchNorm inside the same model.
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jaxbn.linen.BatchNorm(False, momentum=0.9, name="ours")(
                nn.BatchNorm(False, name="theirs")(x))

    x = data((N, C), 0)
    with standard():
        variables = Mixed().init(jax.random.key(0), x)
        _, updates = convert_batch_norm(Mixed(), momentum=0.5).apply(
            variables, x, mutable=["batch_stats"])
    y, _, var = ref.batch_norm(x, eps=1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["theirs"]["var"], ref.ema(np.ones(C), var, 0.5), rtol=1e-5)
    _, _, var_after = ref.batch_norm(y, eps=1e-5)
    np.testing.assert_allclose(stats["ours"]["var"], ref.ema(np.ones(C), var_after, 0.5),
                               rtol=1e-4)


def test_a_subclass_keeps_its_own_behaviour_around_the_converted_call():
    class Shifted(nn.BatchNorm):
        @nn.compact
        def __call__(self, x, use_running_average=None):
            return super().__call__(x, use_running_average) + 1.0

    x = _far_from_zero()
    layer = Shifted(use_running_average=False)
    variables = _init(layer, x, {})
    with standard():
        y, _ = convert_batch_norm(layer).apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref.batch_norm(x, eps=1e-5)[0] + 1.0, atol=2e-3)


def test_converting_twice_is_a_no_op():
    model = CompactNet()
    once = convert_batch_norm(model, axis_name="batch")
    assert convert_batch_norm(once) is once
    twice = convert_batch_norm(once, momentum=0.5)
    assert twice == convert_batch_norm(model, axis_name="batch", momentum=0.5)
    assert twice.module is model
    layer = convert_batch_norm(nn.BatchNorm(use_running_average=True))  # a root BatchNorm
    assert isinstance(layer, ConvertedModule) and convert_batch_norm(layer) is layer


def test_the_original_is_unchanged():
    model = CompactNet()
    x = _far_from_zero()
    variables = _init(model, x, {"train": False})
    train = (("train", True),)
    before = _train_apply(model, train, variables, x)
    converted = convert_batch_norm(model, momentum=0.5)
    _train_apply(converted, train, variables, x)
    assert converted.module is model and model == CompactNet()
    assert_close_to_largest(_train_apply(model, train, variables, x), before, 0.0, "original after")


@pytest.mark.parametrize(("module", "overrides", "error", "match"), [
    (CompactNet(), {"momentun": 0.5}, TypeError,
     r"`overrides` among the fields of jaxbn.linen.BatchNorm .*got \['momentun'\]"),
    (CompactNet(), {"name": "x"}, TypeError, r"`overrides`.*got \['name'\]"),
    (CompactNet(), {"axis_index_groups": [[0, 1], {2: 3}]}, TypeError,
     r"hashable value for the override `axis_index_groups`.*got \{2: 3\} of type dict"),
    (CompactNet, {}, TypeError, r"`module` to be a flax.linen.Module instance, got <class"),
    (nn.BatchNorm, {}, TypeError, r"ResNet50\(\) rather than ResNet50"),
    ("model", {}, TypeError, r"`module` to be a flax.linen.Module instance, got 'model'"),
])
def test_bad_arguments_are_refused_at_conversion(module, overrides, error, match):
    with pytest.raises(error, match=match):
        convert_batch_norm(module, **overrides)


def test_a_list_override_becomes_a_hashable_tuple():
    converted = convert_batch_norm(CompactNet(), axis_index_groups=[[0, 1], [2, 3]])
    assert converted.overrides == (("axis_index_groups", ((0, 1), (2, 3))),)
    hash(converted)


def test_a_model_without_batch_norm_is_refused_at_init():
    converted = convert_batch_norm(nn.Sequential([nn.Dense(3), nn.LayerNorm()]))
    with standard(), pytest.raises(ValueError, match=r"`module` \(Sequential\) ran no flax"):
        converted.init(jax.random.key(0), jnp.ones((2, 4)))


def test_init_answered_by_a_cached_trace_is_not_mistaken_for_no_batch_norm():
    # The only norm is inside nn.jit: a second init under the same overrides is served
    # from nn.jit's cache, and no layer is intercepted in it.
    converted = convert_batch_norm(JitInner(), momentum=0.5)
    x = data((N, C), 0)
    with standard():
        first = converted.init(jax.random.key(0), x, False)
        second = converted.init(jax.random.key(0), x, False)
    chex.assert_trees_all_equal(first, second)

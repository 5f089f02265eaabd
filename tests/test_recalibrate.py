"""Recalibration (PreciseBN): pooled population statistics against a float64 numpy truth.

The truth is the mean and biased variance, in float64, of every activation a batch-norm
layer saw over all K batches concatenated: what "exact population statistics" means.
"""

from __future__ import annotations

import _reference as ref
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

TOL = {"rtol": 2e-5, "atol": 1e-6}
SIZES = (6, 10, 16)  # unequal batch sizes: the weighting by count matters


def batches(features, sizes=SIZES, loc=1.5, seed=0, spatial=()):
    rng = np.random.default_rng(seed)
    return [
        (loc + rng.uniform(0.5, 2.0) * rng.standard_normal((n, *spatial, features))).astype(
            np.float32
        )
        for n in sizes
    ]


def population(arrays, feature_axis=-1):
    """The float64 mean and biased variance, per feature, of every entry of ``arrays``."""
    stacked = np.concatenate(
        [np.moveaxis(np.asarray(a), feature_axis, -1).reshape(-1, a.shape[feature_axis])
         for a in arrays]
    )
    return ref.moments(stacked)[:2]


# ----------------------------------------------------------------------------------------------
# The pure-function API
# ----------------------------------------------------------------------------------------------


def two_layer_net(x, weights, states, *, momentum):
    """Dense -> BN -> relu -> Dense -> BN (NCHW-free MLP); returns the states and the inputs."""
    h1 = x @ weights["w1"]
    a1, s1 = jaxbn.batch_norm(h1, None, states["bn1"], training=True, momentum=momentum)
    h2 = jax.nn.relu(a1) @ weights["w2"]
    _, s2 = jaxbn.batch_norm(h2, None, states["bn2"], training=True, momentum=momentum)
    return {"bn1": s1, "bn2": s2}, (h1, h2)


def numpy_two_layer_inputs(x, weights):
    """The float64 inputs of both batch norms in training mode (batch statistics)."""
    x = np.asarray(x, np.float64)
    h1 = x @ np.asarray(weights["w1"], np.float64)
    a1 = (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + 1e-5)
    h2 = np.maximum(a1, 0) @ np.asarray(weights["w2"], np.float64)
    return h1, h2


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(1)
    weights = {
        "w1": rng.standard_normal((5, 4)).astype(np.float32),
        "w2": rng.standard_normal((4, 3)).astype(np.float32),
    }
    states = {"bn1": jaxbn.init(4)[1], "bn2": jaxbn.init(3)[1]}
    return weights, states, batches(5)


def test_a_shared_fixture_groups_its_tests_on_one_xdist_worker(mlp, request):
    """tests/conftest.py marks the tests of a slow module-scoped fixture (SHARED_FIXTURES)
    with an ``xdist_group``; under ``--dist loadgroup`` xdist reads it into the node id, so
    only when conftest's hook runs before xdist's (it did not: every such fixture was built
    on both workers)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not under xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@test_recalibrate.py::mlp"), request.node.nodeid


def test_pure_function_matches_population_statistics(mlp):
    weights, states, data = mlp

    @jax.jit
    def batch_stats_fn(x):
        new_states, _ = two_layer_net(x, weights, states, momentum=0.0)
        return new_states, x.shape[0]

    precise = jaxbn.recalibrate(batch_stats_fn, data, states)
    inputs = [numpy_two_layer_inputs(x, weights) for x in data]
    for index, name in enumerate(("bn1", "bn2")):
        mean, var = population([pair[index] for pair in inputs])
        np.testing.assert_allclose(precise[name].mean, mean, **TOL)
        np.testing.assert_allclose(precise[name].var, var, **TOL)
        assert int(precise[name].count) == len(data)
    assert jax.tree.map(jax.typeof, precise) == jax.tree.map(jax.typeof, states)


def test_incremental_api_equals_recalibrate_and_jits(mlp):
    weights, states, data = mlp
    acc = jaxbn.recalibration_init(states)
    update = jax.jit(jaxbn.recalibration_update)
    net = jax.jit(lambda x: two_layer_net(x, weights, states, momentum=0.0)[0])
    for x in data:
        acc = update(acc, net(x), x.shape[0])
    assert jax.tree.map(jax.typeof, acc) == jax.tree.map(
        jax.typeof, jaxbn.recalibration_init(states)
    )

    def fn(x):
        return net(x), x.shape[0]

    expected = jaxbn.recalibrate(fn, data, states)
    result = jaxbn.recalibration_result(acc)
    chex.assert_trees_all_close(result, expected, rtol=1e-6)


def test_pooled_variance_includes_between_batch_spread():
    """Batches with different means: pooled var = mean within-batch var + var of the means."""
    _, state = jaxbn.init(2)
    data = [np.full((4, 2), value, np.float32) + np.float32([[0, 1]] * 2 + [[0, -1]] * 2)
            for value in (0.0, 10.0)]

    def fn(x):
        return jaxbn.batch_norm(x, None, state, training=True, momentum=0.0)[1], x.shape[0]

    precise = jaxbn.recalibrate(fn, data, state)
    mean, var = population(data)
    np.testing.assert_allclose(precise.mean, mean, **TOL)
    np.testing.assert_allclose(precise.var, var, **TOL)  # [25, 26]; averaged batch vars: [0, 1]


def test_accurate_at_large_mean():
    _, state = jaxbn.init(3)
    data = batches(3, sizes=(64,) * 8, loc=1e4, seed=3)

    def fn(x):
        return jaxbn.batch_norm(x, None, state, training=True, momentum=0.0)[1], x.shape[0]

    precise = jaxbn.recalibrate(fn, data, state)
    mean, var = population(data)
    np.testing.assert_allclose(precise.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(precise.var, var, rtol=1e-3)


def test_masked_per_feature_counts_and_unreached_features():
    """With a mask, the per-feature valid counts weight each batch; a feature no batch
    reaches keeps its old statistics."""
    _, state = jaxbn.init(3)
    state = state._replace(mean=jnp.full(3, 7.0), var=jnp.full(3, 5.0))
    data = batches(3, seed=4)
    rng = np.random.default_rng(5)
    masks = [rng.uniform(size=x.shape) < 0.6 for x in data]
    for mask in masks:
        mask[:, 2] = False  # feature 2 is never valid
        mask[:2, :2] = True  # features 0 and 1 always have entries

    def fn(batch):
        x, mask = batch
        _, new = jaxbn.batch_norm(x, None, state, training=True, momentum=0.0, mask=mask)
        return new, mask.sum(axis=0)

    precise = jaxbn.recalibrate(fn, list(zip(data, masks, strict=True)), state)
    valid = [np.concatenate([x[m[:, f], f] for x, m in zip(data, masks, strict=True)])
             for f in range(2)]
    np.testing.assert_allclose(
        precise.mean[:2], [v.astype(np.float64).mean() for v in valid], **TOL
    )
    np.testing.assert_allclose(
        precise.var[:2], [v.astype(np.float64).var() for v in valid], **TOL
    )
    np.testing.assert_array_equal(precise.mean[2], 7.0)
    np.testing.assert_array_equal(precise.var[2], 5.0)


def test_pooled_entries_count_entries_per_feature_and_count_is_their_deprecated_alias():
    """``PooledStats.entries`` counts the entries merged per feature (``batches`` counts
    batches, as ``BatchStats.count`` does); ``.count`` is the same array, with a warning."""
    _, state = jaxbn.init(2)
    acc = jaxbn.recalibration_init({"bn": state})
    for counts in (np.float32([3, 0]), np.float32([4, 5])):
        acc = jaxbn.recalibration_update(acc, {"bn": state}, counts)
    pooled = acc.pooled["bn"]
    assert pooled.entries.tolist() == [7.0, 5.0]
    assert int(pooled.batches) == 2
    with pytest.warns(DeprecationWarning,
                      match=r"`PooledStats.count` is deprecated: use `PooledStats.entries`"):
        count = pooled.count
    assert count is pooled.entries


def test_counts_as_a_tree_per_layer():
    _, state = jaxbn.init(2)
    acc = jaxbn.recalibration_init({"a": state, "b": state})
    first = {"a": state._replace(mean=jnp.zeros(2)), "b": state._replace(mean=jnp.zeros(2))}
    second = {"a": state._replace(mean=jnp.ones(2)), "b": state._replace(mean=jnp.ones(2))}
    acc = jaxbn.recalibration_update(acc, first, {"a": 1, "b": 3})
    acc = jaxbn.recalibration_update(acc, second, {"a": 3, "b": 1})
    result = jaxbn.recalibration_result(acc)
    np.testing.assert_allclose(result["a"].mean, 0.75)
    np.testing.assert_allclose(result["b"].mean, 0.25)
    # var: within-batch 1 plus the spread of the means, 3/16
    np.testing.assert_allclose(result["a"].var, 1 + 3 / 16, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# flax linen: the interceptor recipe of docs/recalibration-folding.md
# ----------------------------------------------------------------------------------------------


def momentum_zero(next_fun, args, kwargs, context):
    """Calls every batch-norm module with momentum 0, on the same variables."""
    module = context.module
    if (
        isinstance(module, (jaxbn.linen.BatchNorm, nn.BatchNorm))
        and context.method_name == "__call__"
        and module.momentum != 0.0
    ):
        return module.clone(parent=module.scope, momentum=0.0)(*args, **kwargs)
    return next_fun(*args, **kwargs)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = jaxbn.linen.BatchNorm(not train, momentum=0.9, name="bn1")(x)
        x = nn.Conv(3, (3, 3), strides=2, name="conv2")(nn.relu(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(x)
        return nn.Dense(2)(jnp.mean(nn.relu(x), axis=(1, 2)))


def test_linen_cnn_recipe():
    model = SmallCNN()
    data = batches(2, seed=6, spatial=(8, 8))
    variables = model.init(jax.random.key(0), data[0], train=False)
    # Train a few steps with the EMA so the stored statistics are not the answer.
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    for x in data:
        variables = {**variables, **train_apply(variables, x)[1]}

    @jax.jit
    def batch_stats_fn(x):
        with nn.intercept_methods(momentum_zero):
            _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return updates["batch_stats"], x.shape[0]

    precise = jaxbn.recalibrate(batch_stats_fn, data, variables["batch_stats"])

    def is_conv(module, method_name):
        return isinstance(module, nn.Conv) and method_name == "__call__"

    capture = jax.jit(
        lambda x: model.apply(
            variables, x, train=True, mutable=True, capture_intermediates=is_conv
        )[1]["intermediates"]
    )
    captured = [capture(x) for x in data]
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        mean, var = population([c[conv]["__call__"][0] for c in captured])
        np.testing.assert_allclose(precise[bn]["mean"], mean, **TOL)
        np.testing.assert_allclose(precise[bn]["var"], var, **TOL)
        assert jax.tree.map(jax.typeof, precise[bn]) == jax.tree.map(
            jax.typeof, variables["batch_stats"][bn]
        )
    variables = {**variables, "batch_stats": precise}  # eval with the precise statistics
    chex.assert_tree_all_finite(model.apply(variables, data[0], train=False))


# ----------------------------------------------------------------------------------------------
# flax nnx: the copy-with-momentum-0 recipe of docs/recalibration-folding.md
# ----------------------------------------------------------------------------------------------


class SmallMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 4, rngs=rngs)
        self.bn1 = jaxbn.nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.l2 = nnx.Linear(4, 3, rngs=rngs)
        self.bn2 = nnx.BatchNorm(3, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.l2(nnx.relu(self.bn1(self.l1(x)))))


def test_nnx_recipe():
    model = SmallMLP(nnx.Rngs(0))
    data = batches(5, seed=7)
    for x in data:  # a few EMA steps
        model(x)

    copy = nnx.clone(model)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, (jaxbn.nnx.BatchNorm, nnx.BatchNorm)):
            module.momentum = 0.0
    copy.train()

    def batch_stats_fn(x):
        copy(x)
        return nnx.to_pure_dict(nnx.state(copy, nnx.BatchStat)), x.shape[0]

    stats = nnx.state(model, nnx.BatchStat)
    precise = jaxbn.recalibrate(batch_stats_fn, data, nnx.to_pure_dict(stats))
    nnx.replace_by_pure_dict(stats, precise)
    nnx.update(model, stats)

    # float64 truth of the inputs of both batch norms (training mode, batch statistics)
    w1, b1 = (np.asarray(v[...], np.float64) for v in (model.l1.kernel, model.l1.bias))
    w2, b2 = (np.asarray(v[...], np.float64) for v in (model.l2.kernel, model.l2.bias))
    g1, be1 = (np.asarray(v[...], np.float64) for v in (model.bn1.scale, model.bn1.bias))
    h1s, h2s = [], []
    for x in data:
        h1 = np.asarray(x, np.float64) @ w1 + b1
        a1 = (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + 1e-5) * g1 + be1
        h1s.append(h1)
        h2s.append(np.maximum(a1, 0) @ w2 + b2)
    for bn, inputs in ((model.bn1, h1s), (model.bn2, h2s)):
        mean, var = population(inputs)
        np.testing.assert_allclose(bn.mean[...], mean, **TOL)
        np.testing.assert_allclose(bn.var[...], var, **TOL)
        assert bn.momentum == 0.9  # the model itself was not touched
        assert bn.mean[...].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_errors():
    _, state = jaxbn.init(3)
    with pytest.raises(ValueError, match=r"`stats` must contain batch-norm statistics: .* got "
                       r"a tree with none \(its leaves are at \['w'\]\)"):
        jaxbn.recalibration_init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"`stats` must contain .* \(it is empty\)"):
        jaxbn.recalibration_init({})
    acc = jaxbn.recalibration_init({"bn": state})
    with pytest.raises(ValueError, match=r"`batch_stats` must have the structure of the statistics "
                       r"given to recalibration_init, with statistics at \['bn'\], but it lacks "
                       r"\['bn'\] and has unexpected \['other'\]\."):
        jaxbn.recalibration_update(acc, {"other": state}, 4)
    with pytest.raises(ValueError, match=r"`batch_stats` at \['bn'\] must have the feature shape "
                       r"\(3,\) that recalibration_init was given there, got mean of shape \(4,\)"):
        jaxbn.recalibration_update(acc, {"bn": jaxbn.init(4)[1]}, 4)
    with pytest.raises(ValueError, match=r"`counts` for the layer at \['bn'\] must be a scalar or "
                       r"of its feature shape \(3,\), got shape \(2,\)"):
        jaxbn.recalibration_update(acc, {"bn": state}, np.ones(2))
    with pytest.raises(ValueError, match=r"`counts` must be a number or array .* statistics node "
                       r"of `batch_stats` \(\['bn'\]\), got a dict that lacks \['bn'\] and has "
                       r"unexpected \['bm'\]\."):
        jaxbn.recalibration_update(acc, {"bn": state}, {"bm": 3})
    with pytest.raises(ValueError, match="`batches` yielded no batch"):
        jaxbn.recalibrate(lambda x: (state, 1), [], state)
    with pytest.raises(TypeError, match="`batch_stats_fn` must return a pair"):
        jaxbn.recalibrate(lambda x: state, [0], state)


def test_errors_name_the_layer_by_its_path():
    """In a flax-shaped tree the messages say which layer, not a statistics-node index or two
    whole treedefs."""
    _, state = jaxbn.init(3)
    tree = {"params": {"BatchNorm_0": state, "BatchNorm_1": {"mean": state.mean, "var": state.var}}}
    acc = jaxbn.recalibration_init(tree)
    half = {"params": {"BatchNorm_0": state, "BatchNorm_1": {"mean": state.mean}}}
    with pytest.raises(ValueError, match=r"but it lacks \['params'\]\['BatchNorm_1'\] and has "
                       r"unexpected \['params'\]\['BatchNorm_1'\]\['mean'\]\. Pass"):
        jaxbn.recalibration_update(acc, half, 4)
    wrong = {"params": {"BatchNorm_0": state, "BatchNorm_1": jaxbn.init(5)[1]}}
    with pytest.raises(ValueError, match=r"`batch_stats` at \['params'\]\['BatchNorm_1'\] must "
                       r"have the feature shape \(3,\) .* got mean of shape \(5,\)"):
        jaxbn.recalibration_update(acc, wrong, 4)
    counts = {"params": {"BatchNorm_0": 4, "BatchNorm_1": np.ones(2)}}
    with pytest.raises(ValueError, match=r"`counts` for the layer at \['params'\]\['BatchNorm_1'\] "
                       r"must be a scalar"):
        jaxbn.recalibration_update(acc, tree, counts)
    with pytest.raises(ValueError, match=r"`batch_stats` at the root must have the feature shape"):
        jaxbn.recalibration_update(jaxbn.recalibration_init(state), jaxbn.init(4)[1], 4)
    many = jaxbn.recalibration_init({f"bn{i}": state for i in range(8)})
    with pytest.raises(ValueError, match=r"lacks \['bn0'\], .*, \['bn4'\] and 3 more\."):
        jaxbn.recalibration_update(many, {}, 4)


def test_errors_on_same_paths_in_other_containers_show_the_structure():
    _, state = jaxbn.init(3)
    acc = jaxbn.recalibration_init([state, state])
    with pytest.raises(ValueError, match=r"with statistics at \[0\], \[1\], but it has them in "
                       r"other containers: PyTreeDef\(\(\*, \*\)\)"):
        jaxbn.recalibration_update(acc, (state, state), 4)
    with pytest.raises(ValueError, match=r"got a tuple that has them in other containers\."):
        jaxbn.recalibration_update(acc, [state, state], (4, 4))

"""The benchmark's exact counters, and the benchmark itself at toy size (no timing asserts)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
from experiments import bench
from experiments.hlo import count_collectives, count_passes
from experiments.models import BottleneckResNetBlock, ResNet, ResNet18, ResNet50

SHAPE = (32, 8, 8, 16)
NUMEL = int(np.prod(SHAPE))


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_an_elementwise_op_is_one_read_and_one_write():
    x = jnp.ones(SHAPE)
    passes = count_passes(_hlo(lambda x: x * 2.0 + 1.0, x), NUMEL)
    assert (passes.reads, passes.writes) == (1, 1)


def test_a_reduction_is_one_read():
    x = jnp.ones(SHAPE)
    passes = count_passes(_hlo(lambda x: jnp.sum(x, axis=(0, 1, 2)), x), NUMEL)
    assert (passes.reads, passes.writes) == (1, 0)


def test_a_slice_counts_its_share_only():
    x = jnp.ones(SHAPE)
    passes = count_passes(_hlo(lambda x: jnp.sum(x[:1] * 3.0, axis=(0, 1, 2)), x), NUMEL)
    assert passes.reads == pytest.approx(1 / SHAPE[0], abs=1e-3)


def test_a_float32_copy_of_bfloat16_is_flagged():
    x = jnp.ones(SHAPE, jnp.bfloat16)
    passes = count_passes(_hlo(lambda x: x.astype(jnp.float32) * 2.0, x), NUMEL)
    assert passes.f32_copies == 1


def test_eval_is_one_fused_scale_and_shift():
    params, state = jaxbn.init(SHAPE[-1])
    x = jnp.ones(SHAPE)
    hlo = _hlo(lambda x: jaxbn.batch_norm(x, params, state, training=False)[0], x)
    passes = count_passes(hlo, NUMEL)
    assert (passes.reads, passes.writes) == (1, 1)


def _training_passes(shape, axis, dtype):
    params, state = jaxbn.init(shape[axis])
    x = jnp.ones(shape, dtype)

    def forward(x, p):
        return jaxbn.batch_norm(x, p, state, training=True, axis=axis)

    def forward_backward(x, p, dy):
        (y, new), vjp = jax.vjp(forward, x, p)
        return y, new, vjp((dy, jax.tree.map(jnp.zeros_like, new)))

    numel = int(np.prod(shape))
    return (
        count_passes(_hlo(forward, x, params), numel),
        count_passes(_hlo(forward_backward, x, params, x), numel),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("shape", "axis"), [(SHAPE, -1), ((32, 16, 8, 8), 1)], ids=["NHWC", "NCHW"]
)
def test_training_passes(shape, axis, dtype):
    # On XLA:CPU each sum is its own kernel (sibling reductions are not fused), so the
    # forward is Σx, Σx² (2 reads) + y (1 read, 1 write), and the backward Σdy, Σdy·x
    # (3 reads) + dx (2 reads, 1 write): 4 and 10, against flax's 4 and 15. bfloat16 is read
    # as bfloat16 inside every kernel: the same counts and no float32 copy of x or dy.
    forward, forward_backward = _training_passes(shape, axis, dtype)
    assert (forward.reads, forward.writes) == (3, 1)
    assert (forward_backward.reads, forward_backward.writes) == (8, 2)
    if dtype == jnp.bfloat16:
        assert forward.f32_copies == forward_backward.f32_copies == 0


def test_collectives_are_counted_once_each():
    mesh = jax.make_mesh((8,), ("b",))
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("b")))
    f = jax.shard_map(
        lambda v: jax.lax.psum(v, "b") + jax.lax.all_gather(v, "b", tiled=True)[:1],
        mesh=mesh,
        in_specs=P("b"),
        out_specs=P("b"),
        check_vma=False,
    )
    counts = count_collectives(_hlo(f, x))
    assert counts["all-reduce"] == 1
    assert counts["all-gather"] == 1


def test_the_benchmark_runs_at_toy_size(tmp_path):
    # Two timing processes: the layer timings run in fresh subprocesses and are merged.
    shapes = (("toy", (8, 4), -1, "float32"), ("toy bf16", (4, 2, 2, 4), -1, "bfloat16"))
    with jax.numpy_dtype_promotion("standard"):
        results = bench.run_bench(
            out=tmp_path,
            shapes=shapes,
            rounds=1,
            mlp={"depth": 2, "width": 8, "batch": 4},
            folding={"batch": 2, "size": 4, "channels": (4, 8)},
            processes=2,
        )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert [row["shape"] for row in saved["layers"]] == ["toy", "toy bf16"]
    for row in results["layers"]:
        for mode in bench.MODES:
            assert row[mode]["x_proxy"]["proxy"] == pytest.approx(1.0)
            assert set(row[mode]["passes"]) == set(bench.IMPLS)
            per_process = row[mode]["jaxbn_over_flax_per_process"]
            assert len(per_process) == 2 and all(r > 0 for r in per_process)
            assert row[mode]["jaxbn_over_flax"] == pytest.approx(sum(per_process) / 2)
    assert saved["collectives_per_layer_shard_map"]["jaxbn"] == {
        "forward": 1,
        "forward_backward": 2,
    }
    assert set(saved["mlp"]["step_ratio_vs_no_bn"]) == {"jaxbn", "flax"}
    assert len(saved["mlp"]["step_ratio_vs_no_bn_per_process"]["jaxbn"]) == 2
    assert saved["folding"]["max_abs_diff"] <= 1e-5


def test_a_conditional_counts_its_cheaper_branch():
    x = jnp.ones(SHAPE)

    def f(x, flag):
        return jax.lax.cond(
            flag,
            lambda: jnp.sum(x, axis=(0, 1, 2)),
            lambda: jnp.sum(x, axis=(0, 1, 2)) + jnp.sum(jnp.square(x - 1.0), axis=(0, 1, 2)),
        )

    passes = count_passes(_hlo(f, x, jnp.asarray(True)), NUMEL)
    assert (passes.reads, passes.writes) == (1, 0)


def test_the_cli_rejects_a_process_count_below_one(capsys):
    from experiments.__main__ import main

    with pytest.raises(SystemExit):
        main(["bench", "--processes", "0"])
    assert "--processes must be at least 1, got 0" in capsys.readouterr().err


def _param_count(model):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def test_resnets_have_the_standard_parameter_counts():
    # torchvision's resnet50 and resnet18 (1000 classes) have exactly these.
    assert _param_count(ResNet50(num_classes=1000)) == 25_557_032
    assert _param_count(ResNet18(num_classes=1000)) == 11_689_512


def _toy_resnet(norm):
    return ResNet(stage_sizes=(1, 1), block_cls=BottleneckResNetBlock, num_classes=10,
                  num_filters=8, norm=norm)


TOY_IMAGES = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


@pytest.fixture(scope="module")
def toy_resnet_variables():
    model = _toy_resnet(nn.BatchNorm)
    return jax.jit(lambda key: model.init(key, TOY_IMAGES, train=False))(jax.random.key(1))


def test_resnet_blocks_start_as_identity_maps(toy_resnet_variables):
    block = toy_resnet_variables["params"]["BottleneckResNetBlock_1"]
    assert sorted(block) == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2", "Conv_0", "Conv_1",
                             "Conv_2", "conv_proj", "norm_proj"]
    assert block["conv_proj"]["kernel"].shape == (1, 1, 32, 64)  # 4x filters of stage 2
    np.testing.assert_array_equal(block["BatchNorm_2"]["scale"], 0.0)
    np.testing.assert_array_equal(block["BatchNorm_1"]["scale"], 1.0)


def test_resnet_with_jaxbn_matches_resnet_with_flax_batchnorm(toy_resnet_variables):
    x, labels, variables = TOY_IMAGES, jnp.array([3, 7]), toy_resnet_variables
    flax_model, jaxbn_model = _toy_resnet(nn.BatchNorm), _toy_resnet(jaxbn.linen.BatchNorm)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, jax.eval_shape(lambda key: jaxbn_model.init(key, x, train=False),
                                  jax.random.key(1))
    )
    # Random BN scales, so that the zero-initialized ones do not hide a block's last BN.
    params = traverse_util.flatten_dict(variables["params"])
    for index, path in enumerate(p for p in params if p[-1] == "scale"):
        key = jax.random.fold_in(jax.random.key(2), index)
        params[path] = jax.random.uniform(key, params[path].shape, minval=0.5, maxval=1.5)
    params = traverse_util.unflatten_dict(params)

    def loss(model, params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                      x, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    results = [jax.jit(jax.value_and_grad(functools.partial(loss, model), has_aux=True))(params)
               for model in (flax_model, jaxbn_model)]
    (flax_loss, flax_stats), flax_grads = results[0]
    (jaxbn_loss, jaxbn_stats), jaxbn_grads = results[1]
    np.testing.assert_allclose(jaxbn_loss, flax_loss, rtol=1e-5)
    for ours, theirs in ((jaxbn_stats, flax_stats), (jaxbn_grads, flax_grads)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                     ours, theirs)

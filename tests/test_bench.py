"""The benchmark's exact counters, and the benchmark itself at toy size (no timing asserts)."""

import contextlib
import functools
import json
import re
import subprocess
import sys

import chex
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
from experiments.bench import command
from experiments.bench.command import _bandwidth, _merge
from experiments.bench.layers import _layers, layer_passes, residuals
from experiments.bench.networks import step_config
from experiments.bench.worker import run_in_fresh_process, run_in_this_process
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


# Passes over an x-sized array in training on XLA:CPU, where each sum is its own kernel
# (sibling reductions are not fused). The forward reads x for Σx, for Σ|x - mean|² and for y,
# and writes y: 3 reads, 1 write. The backward reads dy for Σdy, dy and x for Σdy·(x - mean),
# dy and x for dx, and writes dx: 5 reads, 1 write. A regression shows as more; a kernel that
# fuses sibling sums may give fewer, down to the floor: one read of x for both statistics, one
# for y (2 reads, 1 write forward), and one fused read of dy and x for both backward sums
# (6 reads, 2 writes forward and backward).
FORWARD_PASSES = {"floor": (2, 1), "now": (3, 1)}  # (reads, writes)
FORWARD_BACKWARD_PASSES = {"floor": (6, 2), "now": (8, 2)}


@pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="the counts are facts of XLA:CPU, which runs each sum as its own kernel",
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("shape", "axis"), [(SHAPE, -1), ((32, 16, 8, 8), 1)], ids=["NHWC", "NCHW"]
)
def test_training_passes(shape, axis, dtype):
    """At most today's passes, and no fewer than the floor (a counter that fails to see a
    kernel would pass the first bound alone). bfloat16 is read as bfloat16 inside every
    kernel: the same counts and no float32 copy of x or dy. tests/test_branch_free.py shows
    that an ensemble under vmap adds none."""
    forward, forward_backward = _training_passes(shape, axis, dtype)
    for passes, bounds in ((forward, FORWARD_PASSES), (forward_backward, FORWARD_BACKWARD_PASSES)):
        (floor_reads, floor_writes), (reads, writes) = bounds["floor"], bounds["now"]
        assert floor_reads <= passes.reads <= reads, passes
        assert floor_writes <= passes.writes <= writes, passes
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
    assert "argument --processes: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_importing_the_bench_imports_neither_jax_nor_the_command_line():
    # The command line reads its options before jax is imported (XLA_FLAGS), and the bench
    # must not import experiments.__main__ back (it once did: an import cycle).
    code = (
        "import sys, experiments.bench\n"
        "print(sorted(m for m in ('jax', 'experiments.__main__') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


TOY_SHAPES = (
    ("toy", (8, 4), -1, "float32", "float32"),
    ("toy NCHW bf16", (4, 4, 2, 2), 1, "bfloat16", "bfloat16"),
    ("toy mixed", (8, 4), -1, "bfloat16", "float32"),
)


@pytest.fixture(scope="module")
def toy_passes():
    with jax.numpy_dtype_promotion("standard"):  # the proxy and flax promote bfloat16 x
        return layer_passes(TOY_SHAPES, ensemble=4)


def test_vmap_passes_are_per_element_of_the_ensemble(toy_passes):
    # An elementwise op (the proxy) costs the same per element with or without vmap.
    assert [row["numel"] for row in toy_passes] == [32, 64, 32]
    assert [row["itemsize"] for row in toy_passes] == [4, 2, 2]
    for row in toy_passes:
        assert set(row["vmap_train_fwd_bwd"]) == set(bench.IMPLS)
        proxy = row["passes"]["train_fwd_bwd"]["proxy"]["total"]
        assert row["vmap_train_fwd_bwd"]["proxy"] == proxy == 7


def test_jaxbn_makes_no_more_passes_per_element_under_vmap(toy_passes):
    # Regression: with a lax.cond in training mode, vmap ran both branches (13 against 10).
    for row in toy_passes:
        without_vmap = row["passes"]["train_fwd_bwd"]["jaxbn"]["total"]
        assert row["vmap_train_fwd_bwd"]["jaxbn"] <= without_vmap


def test_jaxbn_keeps_only_x_for_the_backward(toy_passes):
    # Reverse mode keeps x itself, in its own dtype, and per-feature float32 vectors (mean,
    # 1/σ, scale): x's bytes plus O(features), and no float32 copy of a bfloat16 x, as the
    # custom VJP it replaced did. flax keeps two arrays of x's size, float32 ones for a
    # bfloat16 x (4x its bytes): the contrast shows the count can see a copy.
    for row, (_, shape, axis, dtype_name, _) in zip(toy_passes, TOY_SHAPES, strict=True):
        kept = row["residuals"]
        x_bytes = row["numel"] * row["itemsize"]
        print(f"{row['shape']}: residuals / x bytes: jaxbn {kept['jaxbn']['over_x']:.3f} "
              f"{kept['jaxbn']['arrays']}; flax {kept['flax']['over_x']:.3f} "
              f"{kept['flax']['arrays']}")
        assert kept["jaxbn"]["full_size"] == 1
        assert kept["jaxbn"]["f32_copies_of_bf16"] == 0
        assert [list(shape), dtype_name] in kept["jaxbn"]["arrays"]  # x itself
        assert kept["jaxbn"]["bytes"] <= x_bytes + 4 * shape[axis] * 4
        assert kept["flax"]["full_size"] == 2
        if dtype_name == "bfloat16":
            assert kept["flax"]["f32_copies_of_bf16"] == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["jaxbn", "flax"])
def test_residuals_are_what_linearize_saves_and_the_compiled_forward_returns(impl, dtype):
    # The bench's residuals (the arrays the vjp closure holds) are the arrays jax.linearize
    # saves, and the buffers XLA writes out when a jitted program returns them.
    layer = _layers(-1, len(SHAPE), SHAPE[-1])[impl]
    x = jax.ShapeDtypeStruct(SHAPE, dtype)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), jaxbn.init(16)[0])
    with jax.numpy_dtype_promotion("standard"):  # flax promotes a bfloat16 x
        measured = residuals(layer.train, x, params, layer.stats)["arrays"]

        def saved(x, params):
            _, linear = jax.linearize(lambda x, p: layer.train(x, p, layer.stats), x, params)
            return list({id(leaf): leaf for leaf in jax.tree.leaves(linear)}.values())

        def returned(x, params):
            _, backward = jax.vjp(lambda x, p: layer.train(x, p, layer.stats), x, params)
            return list({id(leaf): leaf for leaf in jax.tree.leaves(backward)}.values())

        linearized = jax.eval_shape(saved, x, params)
        hlo = _hlo(returned, x, params)
    entry = hlo[hlo.index("\nENTRY"):]
    root = next(line for line in entry.splitlines() if line.strip().startswith("ROOT"))
    xla_names = {"f32": "float32", "bf16": "bfloat16", "s32": "int32"}
    outputs = [[[int(d) for d in dims.split(",") if d], xla_names[name]]
               for name, dims in re.findall(r"(\w+)\[([\d,]*)\]", root.split(" tuple(")[0])]
    # The same arrays, in whatever order.
    assert sorted(outputs) == sorted(measured)
    assert sorted([list(a.shape), a.dtype.name] for a in linearized) == sorted(measured)


TOY_MLP = {"depth": 2, "width": 8, "batch": 4}
TOY_RESNET = {"stage_sizes": [1], "num_filters": 4, "batch": 2, "size": 16, "num_classes": 10}


def test_the_compile_time_worker_returns_positive_seconds():
    times = run_in_fresh_process("compile_time", model="resnet50", norm="jaxbn",
                                 config=TOY_RESNET)
    assert set(times) == {"trace_s", "lower_s", "compile_s"}
    assert all(0 < seconds < 600 for seconds in times.values())


def test_step_config_defaults_and_overrides():
    config = step_config("resnet50", {"batch": 2})
    assert config["stage_sizes"] == [3, 4, 6, 3] and config["batch"] == 2
    assert (config["size"], config["num_classes"]) == (32, 1000)  # the CPU default
    assert config["optimizer"].startswith("sgd")


@pytest.mark.parametrize(("model", "overrides", "match"), [
    ("resnet", None, r"`model`.*'mlp', 'resnet50'.*got 'resnet'"),
    ("mlp", {"bacth": 2}, r"`overrides` keys for 'mlp'.*got \['bacth'\]"),
    ("resnet50", {"optimizer": "adam"}, r"`overrides`.*got \['optimizer'\]"),
])
def test_step_config_rejects_bad_input(model, overrides, match):
    with pytest.raises(ValueError, match=match):
        step_config(model, overrides)


def test_unknown_worker_task_and_bad_process_counts_are_rejected():
    with pytest.raises(ValueError, match=r"`task` in .*got 'timings'"):
        run_in_fresh_process("timings")
    with pytest.raises(ValueError, match=r"`compile_processes` >= 1, got 0"):
        bench.measure(compile_processes=0)


def test_merge_takes_medians_and_keeps_each_processs_ratios():
    runs = [
        {"config": {"depth": 2}, "ms": {"a": 1.0}, "a_over_b": 0.5},
        {"config": {"depth": 2}, "ms": {"a": 3.0}, "a_over_b": 0.9},
        {"config": {"depth": 2}, "ms": {"a": 2.0}, "a_over_b": 0.7},
    ]
    assert _merge(runs) == {
        "config": {"depth": 2},
        "ms": {"a": 2.0},
        "a_over_b": 0.7,
        "a_over_b_per_process": [0.5, 0.9, 0.7],
    }


def _timed_row(numel, itemsize, passes, ms):
    timed = {"passes": {impl: {"total": passes} for impl in bench.IMPLS},
             "ms": dict.fromkeys(bench.IMPLS, ms)}
    return {"shape": f"n={numel}", "dtype": "float32", "numel": numel, "itemsize": itemsize,
            **dict.fromkeys(bench.MODES, timed)}


@pytest.mark.parametrize(("backend", "kind", "peak"), [
    ("gpu", "NVIDIA H200", 4.8e12), ("gpu", "a future GPU", None), ("cpu", "cpu", None),
])
def test_bandwidth_is_the_counted_bytes_over_the_time_at_the_largest_shape(backend, kind, peak):
    layers = [_timed_row(1000, 4, 10.0, 1e-3), _timed_row(10, 4, 10.0, 1e-6)]
    result = _bandwidth(layers, {"backend": backend, "device_kind": kind})
    assert result["shape"] == "n=1000" and result["bytes_per_pass"] == 4000
    assert result["bytes_per_s"]["eval"]["jaxbn"] == pytest.approx(10 * 4000 / 1e-6)
    assert result["peak_bytes_per_s"] == peak
    if peak is None:
        assert result["fraction_of_peak"] is None
    else:
        assert result["fraction_of_peak"]["train_fwd_bwd"]["flax"] == pytest.approx(4e10 / peak)


@pytest.mark.slow
def test_the_benchmark_runs_at_toy_size(tmp_path, capsys, monkeypatch):
    # In this process (the workers' own process start is tested above), under the default
    # promotion rules a fresh process would have (flax and the proxy rely on them).
    monkeypatch.setattr(command, "run_in_fresh_process", run_in_this_process)
    # The compile-time task turns the persistent compilation cache off in its process;
    # here that is this worker's, which gets it back for the tests that follow.
    cache = jax.config.jax_enable_compilation_cache
    with contextlib.ExitStack() as restore:
        restore.callback(jax.config.update, "jax_enable_compilation_cache", cache)
        restore.enter_context(jax.numpy_dtype_promotion("standard"))
        restore.enter_context(jax.numpy_rank_promotion("allow"))
        results = bench.run_bench(
            out=tmp_path,
            shapes=TOY_SHAPES,
            rounds=1,
            mlp=TOY_MLP,
            resnet=TOY_RESNET,
            folding={"batch": 2, "size": 4, "channels": (4, 8)},
            compile_processes=1,
            command="python -m experiments bench --toy",
        )
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert saved["meta"]["command"] == "python -m experiments bench --toy"
    assert saved["meta"]["jax_version"] == jax.__version__
    assert len(saved["meta"]["load_average"]) == 2
    assert [row["shape"] for row in saved["layers"]] == ["toy", "toy NCHW bf16", "toy mixed"]
    for row in saved["layers"]:
        for mode in bench.MODES:
            assert row[mode]["x_proxy"]["proxy"] == pytest.approx(1.0)
            assert set(row[mode]["passes"]) == set(bench.IMPLS)
            assert len(row[mode]["jaxbn_over_flax_per_process"]) == 1
        assert row["vmap_passes_train_fwd_bwd"]["proxy"] == {
            "without_vmap": 7.0, "under_vmap": 7.0
        }
        assert row["residuals"]["jaxbn"]["full_size"] == 1
    bandwidth = saved["bandwidth"]
    assert bandwidth["shape"] == "toy NCHW bf16" and bandwidth["bytes_per_pass"] == 128
    assert all(v > 0 for by_impl in bandwidth["bytes_per_s"].values() for v in by_impl.values())
    assert bandwidth["peak_bytes_per_s"] is None and "unknown peak" in printed
    assert saved["collectives_per_layer_shard_map"]["jaxbn"] == {
        "forward": 1,
        "forward_backward": 2,
    }
    norms = {"mlp": {"none", "jaxbn", "flax"}, "resnet50": {"none", "jaxbn", "flax", "converted"},
             "resnet50_bf16": {"none", "jaxbn", "flax"}}
    for model in ("mlp", "resnet50", "resnet50_bf16"):
        assert set(saved["steps"][model]["ms"]) == norms[model]
        assert saved["steps"][model]["jaxbn_over_flax"] > 0
        assert saved["steps"][model]["jaxbn_over_none"] > 0
        assert len(saved["steps"][model]["losses"]["jaxbn"]) == 5
    assert saved["steps"]["resnet50"]["config"]["stage_sizes"] == [1]
    assert saved["steps"]["resnet50_bf16"]["config"]["dtype"] == "bfloat16"
    for model in ("mlp", "resnet50", "resnet50_bf16"):
        assert set(saved["compile"][model]["compile_s"]) == norms[model]
        assert saved["compile"][model]["compile_jaxbn_over_flax"] > 0
        assert 0 < saved["compile"][model]["trace_s"]["jaxbn"] < saved["compile"][model][
            "lower_s"]["jaxbn"]
    assert saved["steps"]["resnet50"]["converted_over_jaxbn"] > 0
    assert saved["compile"]["resnet50"]["lower_converted_over_jaxbn"] > 0
    assert "converted_over_jaxbn" not in saved["steps"]["mlp"]
    assert "jaxbn/flax" in printed and "trace+lower" in printed and "residuals kept" in printed
    assert "    trace: " in printed and "converted/jaxbn" in printed
    assert saved["folding"]["max_abs_diff"] <= 1e-5


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
    chex.assert_trees_all_equal_shapes(variables, jax.eval_shape(
        lambda key: jaxbn_model.init(key, x, train=False), jax.random.key(1)))
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
    chex.assert_trees_all_close((jaxbn_stats, jaxbn_grads), (flax_stats, flax_grads),
                                rtol=1e-3, atol=1e-5)


def test_the_converted_resnet_lowers_to_the_same_program_as_the_direct_one():
    # ResNet written with flax's BatchNorm and converted, against the same network built
    # with jaxbn.linen.BatchNorm: the same StableHLO for the training step, so the bench's
    # converted/jaxbn step and compile ratios measure noise, and only tracing can differ.
    from experiments.bench.networks import _problem, _step_inputs, _train_step

    config = step_config("resnet50", TOY_RESNET)
    programs = {}
    with jax.numpy_dtype_promotion("standard"):
        for norm in ("jaxbn", "converted", "flax"):
            network, tx, x_shape = _problem("resnet50", norm, config)
            args = jax.eval_shape(
                functools.partial(_step_inputs, network, tx, x_shape, config["num_classes"])
            )
            lowered = jax.jit(_train_step(network, tx)).lower(*args)
            programs[norm] = lowered.as_text(debug_info=False)
    assert programs["converted"] == programs["jaxbn"]
    assert programs["flax"] != programs["jaxbn"]  # the comparison can tell them apart

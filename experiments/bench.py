"""``python -m experiments bench``: jaxbn against flax and an elementwise proxy.

Batch norm is memory-bound, so every time is reported as a multiple of an elementwise proxy
(``x * a + b`` per feature, and its VJP) timed side by side in the same process: the ratio
says how many "elementwise passes" a layer costs, and it survives a noisy shared machine far
better than raw milliseconds. Implementations are interleaved within every round and the
median over rounds is reported. Alongside the times, the optimized HLO gives exact counts:
full-tensor memory passes, float32 copies of a bfloat16 input, and collectives per layer
under ``shard_map`` (in a subprocess with 8 host devices). The ``folding`` check times the
inference of a small NHWC CNN (Conv → BN → ReLU blocks) with eval-mode BN against the same
CNN with every BN folded into its convolution by ``jaxbn.fold_conv``, and reports the largest
absolute difference between the two outputs.

Command: ``python -m experiments bench [--quick] [--out DIR] [--processes N]`` (about 4 minutes
on 2 CPU cores, 1 with --quick, plus about 2 per extra process). The same command runs
unchanged on a GPU. On a shared CPU a ratio moves by up to ±20% between runs at 15 rounds
(fresh output buffers are page-faulted in anew on every call, and the allocator's state
differs from process to process), hence 41 rounds, and ``--processes 3`` for numbers to quote.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn
import jaxbn.linen

from .hlo import count_passes

__all__ = ["main", "run_bench"]

# (label, shape, feature axis, dtype)
SHAPES: tuple[tuple[str, tuple[int, ...], int, str], ...] = (
    ("(256,1024)", (256, 1024), -1, "float32"),
    ("(64,32,32,64)", (64, 32, 32, 64), -1, "float32"),
    ("(32,56,56,256)", (32, 56, 56, 256), -1, "float32"),
    ("NCHW (64,64,32,32) axis=1", (64, 64, 32, 32), 1, "float32"),
    ("(64,32,32,64) bf16", (64, 32, 32, 64), -1, "bfloat16"),
)
QUICK_SHAPES = (SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4])
IMPLS = ("proxy", "jaxbn", "flax", "flax_two_pass")
MODES = ("train_fwd", "train_fwd_bwd", "eval")


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def _time_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, min_seconds: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of each function; the functions take turns within every round."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile and warm up
    calls = {}
    for name, fn in fns.items():
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds:
            jax.block_until_ready(fn())
            n += 1
        calls[name] = max(1, n)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def _layer_functions(shape: tuple[int, ...], axis: int, dtype: Any) -> dict[str, dict[str, Any]]:
    """For each implementation and mode: (jitted function, its arguments)."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype) * 2 + 1
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    features = shape[axis]
    bshape = tuple(features if a == axis % len(shape) else 1 for a in range(len(shape)))
    params, state = jaxbn.init(features)
    out: dict[str, dict[str, Any]] = {}

    def proxy(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
        return (x * p["scale"].reshape(bshape) + p["bias"].reshape(bshape)).astype(x.dtype)

    def jaxbn_train(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, Any]:
        return jaxbn.batch_norm(x, p, state, training=True, axis=axis, momentum=0.9)

    def jaxbn_eval(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
        return jaxbn.batch_norm(x, p, state, training=False, axis=axis)[0]

    impls: dict[str, tuple[Callable[..., Any], Callable[..., Any], Any]] = {
        "proxy": (lambda x, p: (proxy(x, p), None), proxy, params),
        "jaxbn": (jaxbn_train, jaxbn_eval, params),
    }
    for name, fast in (("flax", True), ("flax_two_pass", False)):
        module = nn.BatchNorm(axis=axis, momentum=0.9, use_fast_variance=fast)
        variables = module.init(jax.random.key(2), x, use_running_average=True)
        stats = variables["batch_stats"]

        def train(x: jax.Array, p: Any, module: nn.Module = module, stats: Any = stats) -> Any:
            y, updates = module.apply(
                {"params": p, "batch_stats": stats}, x, False, mutable=["batch_stats"]
            )
            return y, updates["batch_stats"]

        def evaluate(x: jax.Array, p: Any, module: nn.Module = module, stats: Any = stats) -> Any:
            return module.apply({"params": p, "batch_stats": stats}, x, True)

        impls[name] = (train, evaluate, variables["params"])

    for name, (train, evaluate, p) in impls.items():

        def fwd_bwd(x: jax.Array, p: Any, dy: jax.Array, train: Callable[..., Any] = train) -> Any:
            (y, new_stats), vjp = jax.vjp(lambda x, p: train(x, p), x, p, has_aux=False)
            return y, new_stats, vjp((dy.astype(y.dtype), jax.tree.map(jnp.zeros_like, new_stats)))

        out[name] = {
            "train_fwd": (jax.jit(train), (x, p)),
            "train_fwd_bwd": (jax.jit(fwd_bwd), (x, p, dy)),
            "eval": (jax.jit(evaluate), (x, p)),
        }
    return out


def _collectives_subprocess() -> dict[str, Any]:
    """Collectives per layer under shard_map over 8 host devices, jaxbn vs flax."""
    code = """
import json, os
import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
from jax.sharding import NamedSharding, PartitionSpec as P
from experiments.hlo import count_collectives
mesh = jax.make_mesh((8,), ("b",))
x = jax.device_put(jnp.ones((64, 16, 16, 32)), NamedSharding(mesh, P("b")))
dy = x
p, s = jaxbn.init(32)
def layer(name):
    if name == "jaxbn":
        return lambda x, p: jaxbn.batch_norm(x, p, s, training=True, axis_name="b")[0]
    m = nn.BatchNorm(use_running_average=False, axis_name="b",
                     use_fast_variance=(name == "flax"))
    stats = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
    return lambda x, p: m.apply({"params": p, "batch_stats": stats}, x,
                                mutable=["batch_stats"])[0]
out = {}
for name in ("jaxbn", "flax", "flax_two_pass"):
    f = jax.shard_map(layer(name), mesh=mesh, in_specs=(P("b"), P()), out_specs=P("b"))
    fwd = jax.jit(f).lower(x, p).compile().as_text()
    fb = jax.jit(lambda x, p, dy: jax.vjp(f, x, p)[1](dy)).lower(x, p, dy).compile().as_text()
    out[name] = {"forward": sum(count_collectives(fwd).values()),
                 "forward_backward": sum(count_collectives(fb).values())}
print(json.dumps(out))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
        timeout=600, check=False,
    )
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mlp_bench(rounds: int, depth: int = 20, width: int = 512, batch: int = 256) -> dict[str, Any]:
    """Step and compile time of a deep MLP (Dense → norm → relu), adam, per norm."""

    class MLP(nn.Module):
        norm: str

        @nn.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            for _ in range(depth):
                x = nn.Dense(width, use_bias=self.norm == "none")(x)
                if self.norm == "jaxbn":
                    x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
                elif self.norm == "flax":
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
                x = nn.relu(x)
            return nn.Dense(10)(x)

    x = jax.random.normal(jax.random.key(0), (batch, width))
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    tx = optax.adam(1e-3)
    steps, step_fns = {}, {}
    for norm in ("none", "jaxbn", "flax"):
        model = MLP(norm)
        variables = model.init(jax.random.key(2), x, train=False)
        params, stats = variables["params"], variables.get("batch_stats", {})
        opt_state = tx.init(params)

        def step(params: Any, stats: Any, opt_state: Any, model: MLP = model) -> Any:
            def loss_fn(params: Any) -> Any:
                logits, updates = model.apply(
                    {"params": params, "batch_stats": stats}, x, train=True,
                    mutable=["batch_stats"],
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                return loss, updates.get("batch_stats", {})

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state, loss

        step_fns[norm] = (step, (params, stats, opt_state))
    # Compile times: every repetition starts from empty caches (a cached executable would
    # come back in microseconds), and the three models take turns. "lower" is tracing and
    # lowering to StableHLO (Python); "compile" is XLA's optimization and code generation.
    lower_t: dict[str, list[float]] = {norm: [] for norm in step_fns}
    compile_t: dict[str, list[float]] = {norm: [] for norm in step_fns}
    for _ in range(min(7, max(3, rounds // 3))):
        for norm, (step, args) in step_fns.items():
            jax.clear_caches()
            start = time.perf_counter()
            lowered = jax.jit(step).lower(*args)
            middle = time.perf_counter()
            compiled = lowered.compile()
            lower_t[norm].append(middle - start)
            compile_t[norm].append(time.perf_counter() - middle)
            steps[norm] = (lambda c=compiled, a=args: c(*a))
    compile_s = {norm: statistics.median(t) for norm, t in compile_t.items()}
    lower_s = {norm: statistics.median(t) for norm, t in lower_t.items()}
    samples = _time_interleaved(steps, rounds)
    step_ms = {k: _median_ms(v) for k, v in samples.items()}
    ratio = {
        k: statistics.median(a / b for a, b in zip(samples[k], samples["none"], strict=True))
        for k in ("jaxbn", "flax")
    }
    return {
        "config": {"depth": depth, "width": width, "batch": batch, "optimizer": "adam"},
        "step_ms": step_ms,
        "step_ratio_vs_no_bn": ratio,
        "compile_s": compile_s,
        "compile_ratio_vs_no_bn": {k: compile_s[k] / compile_s["none"] for k in ("jaxbn", "flax")},
        "lower_s": lower_s,
        "lower_ratio_vs_no_bn": {k: lower_s[k] / lower_s["none"] for k in ("jaxbn", "flax")},
    }


def _folding_bench(
    rounds: int,
    batch: int = 64,
    size: int = 32,
    channels: tuple[int, ...] = (32, 64, 64, 128),
    in_channels: int = 3,
) -> dict[str, Any]:
    """Inference of a CNN with eval-mode BN vs with BN folded into the convs (fold_conv)."""

    class ConvNet(nn.Module):
        folded: bool

        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            for i, c in enumerate(channels):
                x = nn.Conv(c, (3, 3), strides=2 if i else 1, use_bias=self.folded,
                            name=f"conv{i}")(x)
                if not self.folded:
                    x = jaxbn.linen.BatchNorm(use_running_average=True, name=f"bn{i}")(x)
                x = nn.relu(x)
            return jnp.mean(x, axis=(1, 2))

    x = jax.random.normal(jax.random.key(0), (batch, size, size, in_channels))
    model = ConvNet(folded=False)
    variables = model.init(jax.random.key(1), x)
    # Trained-looking BN parameters and running statistics, so the folding is not trivial.
    keys = iter(jax.random.split(jax.random.key(2), 4 * len(channels)))
    params = dict(variables["params"])
    stats = dict(variables["batch_stats"])
    for i, c in enumerate(channels):
        params[f"bn{i}"] = {
            "scale": jax.random.uniform(next(keys), (c,), minval=0.5, maxval=1.5),
            "bias": 0.1 * jax.random.normal(next(keys), (c,)),
        }
        stats[f"bn{i}"] = {
            "mean": 0.5 * jax.random.normal(next(keys), (c,)),
            "var": jax.random.uniform(next(keys), (c,), minval=0.2, maxval=2.0),
        }
    folded_params = {}
    for i in range(len(channels)):
        kernel, bias = jaxbn.fold_conv(
            params[f"conv{i}"]["kernel"], None, params[f"bn{i}"], stats[f"bn{i}"]
        )
        folded_params[f"conv{i}"] = {"kernel": kernel, "bias": bias}
    folded_model = ConvNet(folded=True)
    bn_fn = jax.jit(lambda x: model.apply({"params": params, "batch_stats": stats}, x))
    folded_fn = jax.jit(lambda x: folded_model.apply({"params": folded_params}, x))
    y_bn, y_folded = np.asarray(bn_fn(x)), np.asarray(folded_fn(x))
    max_abs = float(np.max(np.abs(y_bn - y_folded)))
    samples = _time_interleaved({"bn": lambda: bn_fn(x), "folded": lambda: folded_fn(x)}, rounds)
    ms = {k: _median_ms(v) for k, v in samples.items()}
    return {
        "config": {"batch": batch, "size": size, "channels": list(channels),
                   "in_channels": in_channels, "layout": "NHWC", "dtype": "float32",
                   "blocks": "Conv3x3 (stride 2 after the first) -> BN -> ReLU, global mean"},
        "ms": ms,
        "folded_over_bn": statistics.median(
            a / b for a, b in zip(samples["folded"], samples["bn"], strict=True)
        ),
        "max_abs_diff": max_abs,
        "max_abs_output": float(np.max(np.abs(y_bn))),
    }


def _layer_timings(
    shapes: tuple[tuple[str, tuple[int, ...], int, str], ...], rounds: int
) -> list[dict[str, Any]]:
    """Per shape and mode: medians (ms), ratios to the proxy, and jaxbn/flax, in this process."""
    out = []
    for _, shape, axis, dtype_name in shapes:
        fns = _layer_functions(shape, axis, jnp.dtype(dtype_name))
        row = {}
        for mode in MODES:
            calls = {impl: (lambda f=fns[impl][mode]: f[0](*f[1])) for impl in IMPLS}
            samples = _time_interleaved(calls, rounds)
            row[mode] = {
                "ms": {impl: _median_ms(samples[impl]) for impl in IMPLS},
                "x_proxy": {
                    impl: statistics.median(
                        a / b for a, b in zip(samples[impl], samples["proxy"], strict=True)
                    )
                    for impl in IMPLS
                },
                "jaxbn_over_flax": statistics.median(
                    a / b for a, b in zip(samples["jaxbn"], samples["flax"], strict=True)
                ),
            }
        out.append(row)
    return out


def _timings_subprocess(
    shapes: tuple[tuple[str, tuple[int, ...], int, str], ...],
    rounds: int,
    mlp: dict[str, int] | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`_layer_timings` and :func:`_mlp_bench` in a fresh Python process."""
    code = (
        "import json, sys\n"
        "from experiments.bench import _layer_timings, _mlp_bench\n"
        "shapes = tuple((l, tuple(s), a, d) for l, s, a, d in json.loads(sys.argv[1]))\n"
        "rounds = int(sys.argv[2])\n"
        "layers = _layer_timings(shapes, rounds)\n"
        "print(json.dumps([layers, _mlp_bench(rounds, **json.loads(sys.argv[3]))]))\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(shapes), str(rounds), json.dumps(mlp or {})],
        cwd=root, capture_output=True, text=True, timeout=3600, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench timing process failed:\n{result.stderr[-2000:]}")
    layers, mlp_result = json.loads(result.stdout.strip().splitlines()[-1])
    return layers, mlp_result


def _median_mlp(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over processes of every MLP time and ratio, with the per-process ratios."""
    merged: dict[str, Any] = {"config": runs[0]["config"], "processes": len(runs)}
    for key in ("step_ms", "step_ratio_vs_no_bn", "compile_s", "compile_ratio_vs_no_bn",
                "lower_s", "lower_ratio_vs_no_bn"):
        merged[key] = {k: statistics.median(run[key][k] for run in runs) for k in runs[0][key]}
        if key.endswith("ratio_vs_no_bn"):
            merged[key + "_per_process"] = {
                k: [run[key][k] for run in runs] for k in runs[0][key]
            }
    return merged


def run_bench(
    quick: bool = False,
    out: str | os.PathLike[str] | None = None,
    *,
    shapes: tuple[tuple[str, tuple[int, ...], int, str], ...] | None = None,
    rounds: int | None = None,
    mlp: dict[str, int] | None = None,
    folding: dict[str, Any] | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """Runs the benchmark, prints its table and writes ``bench.json`` and ``bench.png``.

    ``shapes``, ``rounds``, ``mlp`` (depth/width/batch) and ``folding``
    (batch/size/channels/in_channels) override the defaults; the tests use them to run the
    whole benchmark at toy size. With ``processes > 1`` the layer timings run in that many
    fresh processes, one after the other: each reports its medians over rounds, and the
    table gives the median over processes, with the smallest and largest process's
    jaxbn/flax ratio beside it (a process's allocator and memory state move ratios more
    than rounds within one process do); the MLP step and compile ratios likewise.
    """
    rounds = rounds or (9 if quick else 41)
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    results: dict[str, Any] = {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "rounds": rounds,
        "processes": processes,
        "method": "per-call times, implementations interleaved within each round; medians "
        "over rounds; ratios are medians of per-round ratios; with several processes, the "
        "median over processes of those",
        "layers": [],
    }
    if processes > 1:
        runs = [_timings_subprocess(shapes, rounds, mlp) for _ in range(processes)]
        per_process = [layers for layers, _ in runs]
        mlp_result = _median_mlp([mlp_run for _, mlp_run in runs])
    else:
        per_process = [_layer_timings(shapes, rounds)]
        mlp_result = _mlp_bench(rounds, **(mlp or {}))
    for index, (label, shape, axis, dtype_name) in enumerate(shapes):
        dtype = jnp.dtype(dtype_name)
        fns = _layer_functions(shape, axis, dtype)
        numel = int(np.prod(shape))
        row: dict[str, Any] = {"shape": label, "dtype": dtype_name, "axis": axis}
        for mode in MODES:
            runs = [timings[index][mode] for timings in per_process]
            ratios = [run["jaxbn_over_flax"] for run in runs]
            row[mode] = {
                "ms": {impl: statistics.median(r["ms"][impl] for r in runs) for impl in IMPLS},
                "x_proxy": {
                    impl: statistics.median(r["x_proxy"][impl] for r in runs) for impl in IMPLS
                },
                "jaxbn_over_flax": statistics.median(ratios),
                "jaxbn_over_flax_per_process": ratios,
                "passes": {},
            }
            for impl in IMPLS:
                fn, args = fns[impl][mode]
                passes = count_passes(fn.lower(*args).compile().as_text(), numel)
                row[mode]["passes"][impl] = {
                    "total": passes.total,
                    "f32_copies_of_bf16": passes.f32_copies if dtype_name == "bfloat16" else 0,
                }
        results["layers"].append(row)
        _print_row(row)
    results["collectives_per_layer_shard_map"] = _collectives_subprocess()
    print("collectives per layer under shard_map (8 devices):",
          json.dumps(results["collectives_per_layer_shard_map"]))
    results["mlp"] = mlp_result

    def ratio(key: str, impl: str, digits: int) -> str:
        value = f"{mlp_result[key][impl]:.{digits}f}x"
        runs = mlp_result.get(key + "_per_process", {}).get(impl, [])
        return value + (f" [{min(runs):.{digits}f}-{max(runs):.{digits}f}]" if runs else "")

    print(
        f"{mlp_result['config']['depth']}-layer MLP step: jaxbn "
        f"{ratio('step_ratio_vs_no_bn', 'jaxbn', 3)}, flax "
        f"{ratio('step_ratio_vs_no_bn', 'flax', 3)} of no-BN; compile: jaxbn "
        f"{ratio('compile_ratio_vs_no_bn', 'jaxbn', 2)}, flax "
        f"{ratio('compile_ratio_vs_no_bn', 'flax', 2)} (XLA); trace+lower: jaxbn "
        f"{ratio('lower_ratio_vs_no_bn', 'jaxbn', 2)}, flax "
        f"{ratio('lower_ratio_vs_no_bn', 'flax', 2)}"
    )
    results["folding"] = _folding_bench(rounds, **(folding or {}))
    fold = results["folding"]
    print(
        f"folding ({fold['config']['batch']}x{fold['config']['size']}x"
        f"{fold['config']['size']} CNN {fold['config']['channels']}, eval): BN "
        f"{fold['ms']['bn']:.3f} ms, folded {fold['ms']['folded']:.3f} ms "
        f"({fold['folded_over_bn']:.3f}x); max |difference| {fold['max_abs_diff']:.2e} "
        f"(outputs up to {fold['max_abs_output']:.3g})"
    )
    if out is not None:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(results, indent=2))
        _plot(results, out / "bench.png")
        print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return results


def _print_row(row: dict[str, Any]) -> None:
    print(f"\n{row['shape']} {row['dtype']}  (time as a multiple of the proxy; passes)")
    print(f"  {'mode':15s}" + "".join(f"{impl:>22s}" for impl in IMPLS) + "   jaxbn/flax")
    for mode in MODES:
        cells = "".join(
            f"{row[mode]['x_proxy'][impl]:>13.2f}x {row[mode]['passes'][impl]['total']:>5.1f}p"
            for impl in IMPLS
        )
        ratios = row[mode].get("jaxbn_over_flax_per_process", [])
        spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else ""
        print(f"  {mode:15s}{cells}   {row[mode]['jaxbn_over_flax']:.2f}{spread}")


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results["layers"]
    fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 4), sharey=False)
    width = 0.8 / (len(IMPLS) - 1)
    for ax, mode in zip(axes, MODES, strict=True):
        for i, impl in enumerate(IMPLS[1:]):
            values = [row[mode]["x_proxy"][impl] for row in layers]
            ax.bar(np.arange(len(layers)) + i * width, values, width, label=impl)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(layers)) + width, [r["shape"] for r in layers],
                      rotation=30, ha="right", fontsize=7)
        ax.set_title(mode.replace("_", " "))
        ax.set_ylabel("time / elementwise proxy")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"batch norm cost on {results['device']} (median of {results['rounds']} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.bench [ARGS]``: the same as ``python -m experiments bench``."""
    from .__main__ import main as cli

    raise SystemExit(cli(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()

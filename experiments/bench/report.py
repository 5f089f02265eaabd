"""The bench's results as printed tables, ``bench.json`` and ``bench.png``.

Reads only the dict that :func:`experiments.bench.command.measure` returns; measures nothing
and imports no jax.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from .spec import ENSEMBLE, IMPLS, MODES

__all__ = ["print_report", "write_results"]


def _ratio(node: dict[str, Any], key: str, digits: int = 2, suffix: str = "x") -> str:
    """``node[key]`` with the range of its per-process values, when there are several."""
    value = f"{node[key]:.{digits}f}{suffix}"
    runs = node.get(f"{key}_per_process", [])
    return value + (f" [{min(runs):.{digits}f}-{max(runs):.{digits}f}]" if len(runs) > 1 else "")


def print_report(results: dict[str, Any]) -> None:
    """Prints every table of the bench."""
    print(f"{results['device']} ({results['device_kind']}, jax {results['jax']}); "
          f"{results['rounds']} rounds, {results['processes']} timing process(es)")
    for row in results["layers"]:
        _print_layer(row)
    _print_vmap_passes(results["layers"])
    _print_residuals(results["layers"])
    _print_bandwidth(results["bandwidth"])
    print("\ncollectives per layer under shard_map (8 devices):",
          json.dumps(results["collectives_per_layer_shard_map"]))
    _print_steps(results["steps"])
    _print_compile(results["compile"], results["steps"], results["compile_processes"])
    fold = results["folding"]
    print(
        f"\nfolding ({fold['config']['batch']}x{fold['config']['size']}x"
        f"{fold['config']['size']} CNN {fold['config']['channels']}, eval): BN "
        f"{fold['ms']['bn']:.3f} ms, folded {fold['ms']['folded']:.3f} ms "
        f"({fold['folded_over_bn']:.3f}x); max |difference| {fold['max_abs_diff']:.2e} "
        f"(outputs up to {fold['max_abs_output']:.3g})"
    )


def _print_layer(row: dict[str, Any]) -> None:
    dtypes = row["dtype"] if row["out_dtype"] == row["dtype"] else (
        f"{row['dtype']} in, {row['out_dtype']} out")
    print(f"\n{row['shape']} {dtypes}  (time as a multiple of the proxy; passes)")
    print(f"  {'mode':15s}" + "".join(f"{impl:>22s}" for impl in IMPLS) + "   jaxbn/flax")
    for mode in MODES:
        cells = "".join(
            f"{row[mode]['x_proxy'][impl]:>13.2f}x {row[mode]['passes'][impl]['total']:>5.1f}p"
            for impl in IMPLS
        )
        print(f"  {mode:15s}{cells}   {_ratio(row[mode], 'jaxbn_over_flax', suffix='')}")


def _print_vmap_passes(layers: list[dict[str, Any]]) -> None:
    print(f"\nfull-tensor passes per element, training forward+backward: without vmap -> "
          f"under vmap over an ensemble of {ENSEMBLE}")
    width = max(len(row["shape"]) for row in layers) + 2
    print(f"  {'shape':{width}s}" + "".join(f"{impl:>16s}" for impl in IMPLS))
    for row in layers:
        passes = row["vmap_passes_train_fwd_bwd"]
        cells = "".join(
            f"{passes[impl]['without_vmap']:>8.1f} ->{passes[impl]['under_vmap']:>5.1f}"
            for impl in IMPLS
        )
        print(f"  {row['shape']:{width}s}{cells}")


def _print_residuals(layers: list[dict[str, Any]]) -> None:
    print("\nresiduals kept from the training forward for the backward, in bytes of the input "
          "(arrays of its size; * marks a float32 one for a bfloat16 input)")
    width = max(len(row["shape"]) for row in layers) + 2
    print(f"  {'shape':{width}s}" + "".join(f"{impl:>16s}" for impl in IMPLS))
    for row in layers:
        cells = "".join(
            f"{kept['over_x']:>10.3f}x ({kept['full_size']}"
            f"{'*' * kept['f32_copies_of_bf16']:<2s})"
            for kept in (row["residuals"][impl] for impl in IMPLS)
        )
        print(f"  {row['shape']:{width}s}{cells}")


def _print_bandwidth(bandwidth: dict[str, Any]) -> None:
    peak = bandwidth["peak_bytes_per_s"]
    print(f"\nachieved memory bandwidth at {bandwidth['shape']} {bandwidth['dtype']}, GB/s "
          f"(counted passes x {bandwidth['bytes_per_pass'] / 1e6:.1f} MB / median time); "
          + (f"peak {peak / 1e9:.0f} GB/s" if peak else "unknown peak"))
    print(f"  {'mode':15s}" + "".join(f"{impl:>16s}" for impl in IMPLS))
    for mode, by_impl in bandwidth["bytes_per_s"].items():
        cells = "".join(
            f"{by_impl[impl] / 1e9:>10.1f}"
            + (f" ({bandwidth['fraction_of_peak'][mode][impl]:>3.0%})" if peak else " " * 6)
            for impl in IMPLS
        )
        print(f"  {mode:15s}{cells}".rstrip())


def _label(model: str, config: dict[str, Any]) -> str:
    """The network and its input, e.g. ``ResNet-50 step (batch 4, 32x32)``."""
    if model == "mlp":
        return (f"{config['depth']}-layer MLP step (batch {config['batch']}, width "
                f"{config['width']}, {config['optimizer']})")
    name = "ResNet-50" if config["stage_sizes"] == [3, 4, 6, 3] else (
        f"ResNet stages {config['stage_sizes']} filters {config['num_filters']}")
    return (f"{name} {config['dtype']} step (batch {config['batch']}, "
            f"{config['size']}x{config['size']}, {config['optimizer']})")


def _print_steps(steps: dict[str, Any]) -> None:
    print("\ntraining steps, norms interleaved (median ms; ratios with their range over "
          "processes)")
    for model, step in steps.items():
        times = ", ".join(f"{norm} {ms:.2f} ms" for norm, ms in step["ms"].items())
        ratios = "; ".join(
            f"{key.replace('_over_', '/')} {_ratio(step, key, 3)}"
            for key in step if key.endswith(("_over_flax", "_over_none", "_over_jaxbn"))
        )
        print(f"  {_label(model, step['config'])}: {times}; {ratios}; loss over "
              f"{len(step['losses']['flax'])} steps within {step['loss_max_rel_diff']:.1e} "
              f"of flax's (of its first loss)")


def _print_compile(compile_times: dict[str, Any], steps: dict[str, Any], processes: int) -> None:
    print(f"\ncompile time of the training step, XLA only (.compile()), from cold caches in "
          f"a fresh process each, median of {processes}; trace+lower (.lower()) and trace "
          f"(.trace()) beside it")
    for model, times in compile_times.items():
        parts = []
        for stage, name in (
            ("compile", "XLA compile"), ("lower", "trace+lower"), ("trace", "trace")
        ):
            seconds = ", ".join(f"{norm} {s:.2f} s" for norm, s in times[f"{stage}_s"].items())
            ratios = "; ".join(
                f"{key.removeprefix(stage + '_').replace('_over_', '/')} {_ratio(times, key)}"
                for key in times
                if key.startswith(stage + "_")
                and key.endswith(("_over_flax", "_over_none", "_over_jaxbn"))
            )
            parts.append(f"{name}: {seconds}; {ratios}")
        print(f"  {_label(model, steps[model]['config'])}\n    " + "\n    ".join(parts))


def write_results(results: dict[str, Any], out: str | os.PathLike[str]) -> None:
    """Writes ``out/bench.json`` and ``out/bench.png`` (the layer times against the proxy)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")


def _plot(results: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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

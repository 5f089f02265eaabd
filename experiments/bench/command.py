"""``python -m experiments bench``: the options, and which measurement runs where.

Every measurement runs in a fresh process (:mod:`experiments.bench.worker`) and returns a
plain dict; this module chooses them, merges the processes' results (medians, with the
per-process ratios beside them) and hands the whole to :mod:`experiments.bench.report`. It
imports no jax, so the command line can read its options before jax is imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

from . import report
from .spec import (
    IMPLS,
    MODES,
    PEAK_BYTES_PER_S,
    QUICK_SHAPES,
    RATIOS,
    SHAPES,
    STEP_NORMS,
    Shape,
)
from .worker import run_in_fresh_process

__all__ = ["DEFAULTS", "add_arguments", "measure", "run_bench", "run_from_args"]

DESCRIPTION = (
    "Times jaxbn, flax (fast and two-pass variance) and an elementwise proxy side by side "
    "(training forward, forward+backward, eval), counts full-tensor passes (also under vmap) "
    "and collectives in the optimized HLO, derives the achieved memory bandwidth, times the "
    "training steps of a 20-layer MLP and of ResNet-50 (also written with flax's BatchNorm and "
    "converted by jaxbn.linen.convert_batch_norm), their compile times (each in a fresh "
    "process), and BN folding. Writes DIR/bench.json and DIR/bench.png."
)


def _at_least_one(text: str) -> int:
    """An option's integer value, at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


# The bench's options when the command line leaves them out (add_arguments sets none, so a
# parser with ``argument_default=SUPPRESS`` holds only what was given).
DEFAULTS: dict[str, Any] = {"quick": False, "out": "results/bench", "processes": 1,
                            "compile_processes": 3, "resnet_batch": None, "resnet_size": None}


def add_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Adds the bench's options (and description) to ``parser``, without defaults
    (:data:`DEFAULTS`); returns them."""
    parser.description = DESCRIPTION
    return [
        parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds"),
        parser.add_argument("--out", metavar="DIR",
                            help="output directory (default results/bench)"),
        parser.add_argument("--processes", type=_at_least_one, metavar="N",
                            help="take the timings in N fresh processes and report the median "
                            "over them, with the range of the ratios (3 for numbers to quote; "
                            "default 1)"),
        parser.add_argument("--compile-processes", type=_at_least_one, metavar="N",
                            help="compile each training step in N fresh processes; the median "
                            "is reported (default 3)"),
        parser.add_argument("--resnet-batch", type=_at_least_one, metavar="N",
                            help="ResNet-50 batch size (default 64 on a GPU, 4 otherwise)"),
        parser.add_argument("--resnet-size", type=_at_least_one, metavar="N",
                            help="ResNet-50 image height and width (default 224 on a GPU, 32 "
                            "otherwise)"),
    ]


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the bench with the options :func:`add_arguments` parsed; returns the exit code."""
    resnet = {key: value for key, value in
              (("batch", args.resnet_batch), ("size", args.resnet_size)) if value is not None}
    run_bench(quick=args.quick, out=args.out, processes=args.processes,
              compile_processes=args.compile_processes, resnet=resnet,
              command=" ".join(["python -m experiments", *sys.argv[1:]]))
    return 0


def run_bench(
    quick: bool = False,
    out: str | os.PathLike[str] | None = None,
    command: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Measures (:func:`measure`), prints the tables, writes ``bench.json`` and ``bench.png``.

    Args:
      quick: fewer shapes and rounds.
      out: the output directory; None writes nothing.
      command: the command line, recorded in the results' ``meta``.
      **options: :func:`measure`'s keyword arguments.

    Returns:
      The results, as written to ``bench.json``; their ``meta`` holds the command, the
      provenance of :func:`experiments.suite.provenance` (commit, date, machine, versions)
      and the machine's 1-minute load average before and after, since other jobs on the
      machine move the timings.
    """
    load_before = os.getloadavg()[0]
    results = measure(quick, **options)
    from ..suite import provenance  # imports jax: only once every measurement is done

    results["meta"] = {"command": command, **provenance(),
                       "load_average": [load_before, os.getloadavg()[0]]}
    report.print_report(results)
    if out is not None:
        report.write_results(results, out)
    return results


def measure(
    quick: bool = False,
    *,
    shapes: tuple[Shape, ...] | None = None,
    rounds: int | None = None,
    mlp: dict[str, Any] | None = None,
    resnet: dict[str, Any] | None = None,
    folding: dict[str, Any] | None = None,
    processes: int = 1,
    compile_processes: int = 3,
) -> dict[str, Any]:
    """Every measurement of the bench, each in fresh processes, merged into one dict.

    ``shapes``, ``rounds``, ``mlp`` and ``resnet`` (overrides of
    :func:`experiments.bench.networks.step_config`) and ``folding`` (keyword arguments of
    :func:`experiments.bench.networks.folding`) override the defaults; the tests use them
    to run the whole bench at toy size.

    Args:
      quick: :data:`~experiments.bench.spec.QUICK_SHAPES` and 9 rounds instead of
        :data:`~experiments.bench.spec.SHAPES` and 41.
      shapes: the layer inputs.
      rounds: rounds of interleaved timing per measurement.
      mlp: MLP step configuration overrides.
      resnet: ResNet-50 step configuration overrides.
      folding: folding check configuration.
      processes: the layer and step timings are taken in this many fresh processes, one
        after the other; each reports its medians over rounds, and the results give the
        median over processes, with every ratio's per-process values beside it (a
        process's allocator and memory state move ratios more than rounds within one do).
      compile_processes: each training step is compiled in this many fresh processes (the
        models take turns); the results give the median.

    Returns:
      A JSON-able dict: the environment, ``layers`` (per shape: times, ratios, passes,
      passes under vmap, the residuals kept for the backward), ``bandwidth``,
      ``collectives_per_layer_shard_map``, ``steps``, ``compile`` and ``folding``.

    Raises:
      ValueError: if ``processes`` or ``compile_processes`` is below 1.
    """
    for name, value in (("processes", processes), ("compile_processes", compile_processes)):
        if value < 1:
            raise ValueError(f"Expected `{name}` >= 1, got {value}.")
    rounds = rounds or (9 if quick else 41)
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    environment = run_in_fresh_process("environment")
    passes = run_in_fresh_process("layer_passes", shapes=shapes)
    collectives = run_in_fresh_process("collectives")
    step_configs = {"mlp": mlp or {}, "resnet50": resnet or {}, "resnet50_bf16": resnet or {}}
    compile_times = _compile_times(compile_processes, step_configs)
    layer_runs, step_runs = [], []
    for _ in range(processes):
        layer_runs.append(run_in_fresh_process("layer_timings", shapes=shapes, rounds=rounds))
        step_runs.append(
            run_in_fresh_process("step_timings", rounds=rounds, mlp=mlp, resnet=resnet)
        )
    layers = [
        _layer_row(shape, counts, [run[index] for run in layer_runs])
        for index, (shape, counts) in enumerate(zip(shapes, passes, strict=True))
    ]
    return {
        **environment,
        "rounds": rounds,
        "processes": processes,
        "compile_processes": compile_processes,
        "method": "per-call times, implementations interleaved within each round; medians "
        "over rounds; ratios are medians of per-round ratios; with several processes, the "
        "median over processes of those, and each ratio's per-process values",
        "layers": layers,
        "bandwidth": _bandwidth(layers, environment),
        "collectives_per_layer_shard_map": collectives,
        "steps": _merge(step_runs),
        "compile": compile_times,
        "folding": run_in_fresh_process("folding", rounds=rounds, **(folding or {})),
    }


def _merge(runs: list[Any]) -> Any:
    """The median over processes of results that share one structure.

    Floats are measurements: each becomes its median, and a ratio (a key with ``_over_``)
    also keeps its per-process values as ``<key>_per_process``. Anything else (the
    configuration) is the same in every process and is kept from the first.
    """
    first = runs[0]
    if isinstance(first, dict):
        merged = {}
        for key in first:
            values = [run[key] for run in runs]
            merged[key] = _merge(values)
            if "_over_" in key and isinstance(first[key], float):
                merged[f"{key}_per_process"] = values
        return merged
    if isinstance(first, float):
        return statistics.median(runs)
    return first


def _layer_row(
    shape: Shape, passes: dict[str, Any], timings: list[dict[str, Any]]
) -> dict[str, Any]:
    """One shape's row: its timings merged over processes, its pass counts beside them."""
    label, _, axis, dtype_name, out_name = shape
    row: dict[str, Any] = {"shape": label, "dtype": dtype_name, "out_dtype": out_name, "axis": axis,
                           "numel": passes["numel"], "itemsize": passes["itemsize"]}
    merged = _merge(timings)
    for mode in MODES:
        row[mode] = merged[mode] | {"passes": passes["passes"][mode]}
    row["residuals"] = passes["residuals"]
    row["vmap_passes_train_fwd_bwd"] = {
        impl: {"without_vmap": passes["passes"]["train_fwd_bwd"][impl]["total"],
               "under_vmap": passes["vmap_train_fwd_bwd"][impl]}
        for impl in IMPLS
    }
    return row


def _bandwidth(layers: list[dict[str, Any]], environment: dict[str, str]) -> dict[str, Any]:
    """Achieved memory bandwidth at the largest shape: counted passes' bytes over the time.

    Every pass is counted at the input's item size (a float32 copy of a bfloat16 input is
    undercounted). On a GPU whose kind is in
    :data:`~experiments.bench.spec.PEAK_BYTES_PER_S`, also the fraction of its peak.
    """
    row = max(layers, key=lambda r: r["numel"])
    bytes_per_pass = row["numel"] * row["itemsize"]
    peak = (PEAK_BYTES_PER_S.get(environment["device_kind"])
            if environment["backend"] == "gpu" else None)
    bytes_per_s = {
        mode: {impl: row[mode]["passes"][impl]["total"] * bytes_per_pass
               / (row[mode]["ms"][impl] / 1e3) for impl in IMPLS}
        for mode in ("train_fwd_bwd", "eval")
    }
    return {
        "shape": row["shape"],
        "dtype": row["dtype"],
        "bytes_per_pass": bytes_per_pass,
        "bytes_per_s": bytes_per_s,
        "peak_bytes_per_s": peak,
        "fraction_of_peak": None if peak is None else {
            mode: {impl: value / peak for impl, value in by_impl.items()}
            for mode, by_impl in bytes_per_s.items()
        },
    }


def _compile_times(repeats: int, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per network: compile, trace+lower and trace seconds per norm, medians over the
    repetitions (each in a fresh process).

    In every repetition each network's norms take turns, starting from a different one, so
    that a drift of the machine's load does not favour one of them.
    """
    out = {}
    for model, norms in STEP_NORMS.items():
        runs = []
        for r in range(repeats):
            times = {
                norm: run_in_fresh_process(
                    "compile_time", model=model, norm=norm, config=configs[model]
                )
                for norm in norms[r % len(norms):] + norms[: r % len(norms)]
            }
            repetition: dict[str, Any] = {}
            for stage in ("compile", "lower", "trace"):
                seconds = {norm: times[norm][f"{stage}_s"] for norm in norms}
                repetition[f"{stage}_s"] = seconds
                repetition |= {f"{stage}_{a}_over_{b}": seconds[a] / seconds[b]
                               for a, b in RATIOS if a in seconds and b in seconds}
            runs.append(repetition)
        out[model] = _merge(runs)
    return out

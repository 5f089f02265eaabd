"""The command line: ``python -m experiments [list | run CLAIM... | plot DIR] [options]``.

Arguments are parsed before jax is imported, because ``--devices N`` (and the 8 host devices
the ``sync`` claim needs) must reach XLA_FLAGS first.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from typing import Any

from .bench import add_arguments as add_bench_arguments  # imports no jax, as .claims
from .bench import run_from_args as run_bench_from_args
from .claims import CLAIM_IDS  # imports no jax: parsing must precede XLA_FLAGS

SYNC_DEVICES = 8

DESCRIPTION = """\
Put the seed articles' claims about batch normalization to a measured test.

  python -m experiments                 every claim, quick mode (<= 15 min on 2 CPU cores)
  python -m experiments list            the claims, one line each
  python -m experiments run CLAIM...    some claims (--quick by default, or --full)
  python -m experiments plot DIR        remake the figures and report.md from DIR/results.json
  python -m experiments bench           jaxbn vs flax layer timings, HLO passes, collectives

Writes to --out (default results/<timestamp>/): report.md (verdict table, then a section per
claim with its figure), <claim>.png, results.json (per claim: metric, values with and without
BN, per-seed values, verdict, rule) and, per group of runs, <claim>/<arm>/config.json and
metrics.jsonl. Verdict rule: mean ± 95% t-interval over seeds per arm; holds / does not hold
if the intervals are apart, inconclusive if they overlap.
"""


def _add_run_options(parser: argparse.ArgumentParser, *, suite: bool) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false",
                      help="reduced sizes: 3 seeds, few hundred steps (default)")
    mode.add_argument("--full", dest="full", action="store_true",
                      help="full sizes: 5 seeds, thousands of steps, larger sweeps and data")
    parser.set_defaults(full=False)
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="number of seeds per arm (default 3 quick, 5 full; >= 3 for a "
                             "meaningful interval)")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="digits | mnist1d[:N] | idx:DIR (MNIST/Fashion-MNIST IDX files, "
                             ".gz allowed); default mnist1d:4000 quick, mnist1d:10000 full")
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="host CPU devices (sets XLA_FLAGS before jax is imported); runs "
                             "whose batch divides by N train data-parallel with shard_map and "
                             "synchronized BN. The sync claim always uses 8.")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default results/<timestamp>/)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files (needs tensorboardX: "
                             "pip install 'jaxbn[tensorboard]')")
    parser.add_argument("--budget", type=float, default=1.0, metavar="F",
                        help="multiply every step count by F (e.g. 0.1 for a smoke test)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    dist = parser.add_argument_group("multi-process (jax.distributed.initialize)")
    dist.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="address of process 0; with it every process runs the same command")
    dist.add_argument("--num-processes", type=int, default=None, metavar="N")
    dist.add_argument("--process-id", type=int, default=None, metavar="I")
    del suite


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(parser, suite=True)
    sub = parser.add_subparsers(dest="command", metavar="{list,run,plot,bench}")
    sub.add_parser("list", help="list the claims")
    run = sub.add_parser(
        "run",
        help="run some claims",
        description="Run the named claims and write their report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("claims", nargs="+", metavar="CLAIM",
                     help=f"claim ids, or 'all': {', '.join(CLAIM_IDS)}")
    _add_run_options(run, suite=False)
    plot = sub.add_parser("plot", help="remake figures and report.md from DIR/results.json")
    plot.add_argument("dir", metavar="DIR")
    add_bench_arguments(
        sub.add_parser("bench", help="benchmark the layer against flax and an elementwise proxy")
    )
    return parser


def _set_device_count(count: int | None) -> None:
    if not count:
        return
    if "jax" in sys.modules:
        import jax

        if jax.device_count() < count:
            raise RuntimeError(
                f"Expected to set {count} host devices before jax is imported, but jax is "
                f"already imported with {jax.device_count()}. Run from the command line or "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={count} yourself."
            )
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={count}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def list_claims() -> str:
    from .claims import load_claim

    width = max(map(len, CLAIM_IDS))
    return "\n".join(f"{c:<{width}}  {load_claim(c).CLAIM}" for c in CLAIM_IDS)


def run_claims(claim_ids: list[str], args: argparse.Namespace, command: str) -> str:
    """Runs the claims, writes results.json and the report; returns the output directory."""
    import jax

    from . import report
    from .claims import Context, Settings, load_claim

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts only
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    out = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    settings = Settings(
        quick=not args.full,
        seeds=args.seeds,
        dataset=args.dataset,
        tensorboard=args.tensorboard,
        budget=args.budget,
        devices=jax.device_count() if args.coordinator else (args.devices or 1),
    )
    ctx = Context(settings=settings, out=out, show_progress=args.progress)
    started = time.perf_counter()
    entries: dict[str, Any] = {}
    failed = False
    bar = None
    if args.progress and len(claim_ids) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(claim_ids), desc="claims", unit="claim")
    for claim_id in claim_ids:
        if bar is not None:
            bar.set_postfix_str(claim_id)
        ctx.claim = claim_id
        tic = time.perf_counter()
        try:
            entry = load_claim(claim_id).run(ctx)
        except Exception:  # a failed claim is reported, the others still run
            failed = True
            entry = {"id": claim_id, "claim": load_claim(claim_id).CLAIM,
                     "verdict": "inconclusive", "error": traceback.format_exc()}
        entry["runtime_s"] = time.perf_counter() - tic
        entries[claim_id] = entry
        if jax.process_index() == 0:  # after every claim, so an interrupted suite keeps results
            meta = {
                "command": command,
                "mode": "quick" if settings.quick else "full",
                "seeds": len(settings.seed_list),
                "dataset": settings.default_dataset(),
                "device_count": jax.device_count(),
                "process_count": jax.process_count(),
                "jax_version": jax.__version__,
                "runtime_s": time.perf_counter() - started,
                "budget": settings.budget,
                "complete": len(entries) == len(claim_ids),
            }
            report.write_results(out, entries, meta)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if jax.process_index() == 0:
        path = report.write_report(out)
        print(report.verdict_table(report.load_results(out)))
        print(f"\nreport: {path}")
    if failed:
        raise SystemExit(f"some claims failed; see {out}/report.md")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    command = "python -m experiments " + shlex.join(argv)
    if args.command == "list":
        print(list_claims())
        return 0
    if args.command == "bench":
        return run_bench_from_args(args)
    if args.command == "plot":
        from . import report

        print(f"report: {report.write_report(args.dir)}")
        return 0
    if args.command == "run":
        claim_ids = list(CLAIM_IDS) if args.claims == ["all"] else args.claims
        unknown = [c for c in claim_ids if c not in CLAIM_IDS]
        if unknown:
            make_parser().error(f"unknown claim(s) {unknown}; expected some of {CLAIM_IDS}")
    else:
        claim_ids = list(CLAIM_IDS)
    devices = args.devices
    if "sync" in claim_ids and not args.coordinator:
        devices = max(devices or 1, SYNC_DEVICES)
    _set_device_count(devices)
    run_claims(claim_ids, args, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

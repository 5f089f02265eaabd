"""The command line: ``python -m experiments [OPTIONS] [COMMAND [ARGUMENTS]]``.

Without a command it runs every claim. An option may stand before or after the command: the
words before the command are parsed again by the command's own parser, so an option takes
effect wherever it stands, and an option the command does not have is rejected in one line.
Every value is checked here, with the installed extras and every config of the chosen
claims, before anything trains; a bad one exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import data, peers  # neither imports jax at import time
from .bench import add_arguments as add_bench_arguments  # imports no jax, as .claims
from .bench import run_from_args as run_bench_from_args
from .claims import CLAIM_IDS  # imports neither jax nor the extras: checks come first

SYNC_DEVICES = 8
COMMANDS = ("list", "run", "plot", "bench", "readme")
# The options that shape a run: --resume takes them from the run it continues, so it keeps
# checkpointing as the run did (`checkpoint` is recorded as given or by the mode's default).
RUN_OPTIONS = ("claims", "full", "seeds", "dataset", "devices", "budget", "tensorboard",
               "num_processes", "checkpoint")
# The extras of pyproject.toml: the modules each one installs, by pip name
# (tests/test_packaging.py checks that they agree).
EXTRAS = {
    "experiments": {"optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
                    "matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn",
                    "scipy": "scipy", "mnist1d": "mnist1d"},
    "tensorboard": {"tensorboardX": "tensorboardX"},
}

DESCRIPTION = """\
Put the seed articles' claims about batch normalization to a measured test.

  python -m experiments [OPTIONS]       every claim, quick mode (~8 min on 2 CPU cores)
  python -m experiments list            the claims, one line each
  python -m experiments run CLAIM...    some claims (quick mode unless --full)
  python -m experiments plot DIR        remake the figures and report.md from DIR/results.json
  python -m experiments bench           jaxbn vs flax layer timings, HLO passes, collectives
  python -m experiments readme          rewrite README's results from experiments/reference/

The options below may stand before or after the command (`python -m experiments --full run
convergence` = `python -m experiments run convergence --full`); `COMMAND --help` lists a
command's own.

Writes to --out (default results/<timestamp>/): report.md (verdict table, then a section per
claim with its figure), <claim>.png, results.json (per claim: metric, values with and without
BN, per-seed values, verdict, rule; in meta: command, options, commit, date, machine) and, per
group of runs, <claim>/<arm>/config.json, metrics.jsonl and (--full or --checkpoint)
checkpoints/. Verdict rule: mean ± 95% t-interval over seeds per arm; holds / does not hold if
the intervals are apart, inconclusive if they overlap.

An interrupted run continues with `python -m experiments --resume DIR`: the claims complete in
DIR/results.json are kept, the others continue from their checkpoints, with the numbers of an
uninterrupted run. The run's options come from DIR; repeating them is allowed, changing them
is not.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no prefix matching of option names."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                         **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _dataset(text: str) -> str:
    try:
        data.check_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _coordinator(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not (host and port.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _add_suite_options(parser: argparse.ArgumentParser) -> None:
    """The options of a suite of claims: ``python -m experiments`` and ``run``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", default=False,
                      help="reduced sizes: 3 seeds, few hundred steps (default)")
    mode.add_argument("--full", dest="full", action="store_true", default=False,
                      help="full sizes: 5 seeds, thousands of steps, larger sweeps and data")
    parser.add_argument("--seeds", type=_at_least(1), default=None, metavar="N",
                        help="number of seeds per arm (default 3 quick, 5 full; >= 2 for an "
                             "interval, >= 3 for a meaningful one)")
    parser.add_argument("--dataset", type=_dataset, default=None, metavar="NAME",
                        help="digits | mnist1d[:N] | idx:DIR (MNIST/Fashion-MNIST IDX files, "
                             ".gz allowed); default mnist1d:4000 quick, mnist1d:10000 full")
    parser.add_argument("--devices", type=_at_least(1), default=1, metavar="N",
                        help="devices (on CPU: host devices, made before jax starts; with "
                             "--coordinator, per process); runs whose batch divides by the "
                             "device count train data-parallel with shard_map and synchronized "
                             "BN. The sync claim always uses 8 (on one process).")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default results/<timestamp>/)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the interrupted run in DIR (it writes there): completed "
                             "claims are kept, the others continue from their checkpoints; "
                             "the run's options come from DIR/results.json")
    checkpoint = parser.add_mutually_exclusive_group()
    checkpoint.add_argument("--checkpoint", dest="checkpoint", action="store_true",
                            default=None,
                            help="orbax checkpoints about 10 times per group of runs, so "
                                 "--resume loses little (default with --full)")
    checkpoint.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                            default=None, help="no checkpoints (default in quick mode)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files (needs the [tensorboard] extra)")
    parser.add_argument("--budget", type=_budget, default=1.0, metavar="F",
                        help="multiply every step count by F > 0 (e.g. 0.1 for a smoke test)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    dist = parser.add_argument_group("multi-process (jax.distributed.initialize)")
    dist.add_argument("--coordinator", type=_coordinator, default=None, metavar="HOST:PORT",
                      help="address of process 0; with it every process runs the same command")
    dist.add_argument("--num-processes", type=_at_least(1), default=None, metavar="N")
    dist.add_argument("--process-id", type=_at_least(0), default=None, metavar="I")


def _run_parser(parser: _Parser) -> None:
    parser.description = "Run the named claims (or 'all') and write their report."
    parser.add_argument("claims", nargs="+", metavar="CLAIM",
                        help=f"claim ids, or 'all': {', '.join(CLAIM_IDS)}")
    _add_suite_options(parser)


def _plot_parser(parser: _Parser) -> None:
    parser.description = "Remake the figures and report.md from DIR/results.json."
    parser.add_argument("dir", metavar="DIR")


def _readme_parser(parser: _Parser) -> None:
    parser.description = (
        "Rewrite README.md's results section from experiments/reference/*/results.json."
    )
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if README differs from the rendering")


_BUILDERS: dict[str, Callable[[_Parser], None]] = {
    "list": lambda parser: None,
    "run": _run_parser,
    "plot": _plot_parser,
    "bench": add_bench_arguments,  # experiments/bench owns its options
    "readme": _readme_parser,
}


def command_parser(command: str) -> _Parser:
    """The parser of one command's arguments."""
    parser = _Parser(prog=f"python -m experiments {command}")
    _BUILDERS[command](parser)
    return parser


def make_parser() -> _Parser:
    """The parser of the words before the command: the suite's options, then the command."""
    parser = _Parser(prog="python -m experiments", description=DESCRIPTION,
                     usage="python -m experiments [OPTIONS] [COMMAND [ARGUMENTS]]")
    _add_suite_options(parser)
    parser.add_argument("command", nargs="?", metavar="COMMAND",
                        help=f"one of {', '.join(COMMANDS)} (default: every claim)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _parse(
    argv: list[str], adjust: Callable[[_Parser], _Parser] = lambda parser: parser
) -> tuple[_Parser, argparse.Namespace, str | None]:
    """The parser that read the arguments, the arguments and the command (None: none given):
    the words before the command are parsed again by the command's parser. ``adjust`` is
    applied to each parser before it parses."""
    parser = adjust(make_parser())
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"{' '.join(unknown)} is not an option before the command; only the "
                     "options of --help may stand there")
    command = getattr(args, "command", None)
    if command is None:
        return parser, args, None
    if command not in COMMANDS:
        parser.error(f"expected a command in {COMMANDS}, got {command!r}")
    before = argv[: len(argv) - len(args.arguments) - 1]
    parser = adjust(command_parser(command))
    return parser, parser.parse_args([*before, *args.arguments]), command


def parse_args(argv: list[str]) -> tuple[_Parser, argparse.Namespace]:
    """The parser that read the command's arguments (for later errors) and the arguments,
    with ``command`` (``"suite"`` when none is given), wherever the options stand. Exits with
    status 2 and a one-line message for anything it cannot accept."""
    parser, args, command = _parse(argv)
    if command is None:
        args.command, args.claims = "suite", list(CLAIM_IDS)
    else:
        args.command = command
    if args.command in ("suite", "run"):
        _check_suite_options(parser, args)
    return parser, args


def _no_defaults(parser: _Parser) -> _Parser:
    for action in parser._actions:  # argparse keeps a parser's arguments only there
        action.default = argparse.SUPPRESS
    return parser


def _given_options(argv: list[str]) -> dict[str, Any]:
    """The values that ``argv`` (already accepted by :func:`parse_args`) sets itself, by
    destination: the defaults left out, ``claims`` only after ``run``, with 'all' expanded."""
    given = vars(_parse(argv, _no_defaults)[1])
    given.pop("command", None)
    given.pop("arguments", None)
    if given.get("claims") == ["all"]:
        given["claims"] = list(CLAIM_IDS)
    return given


def _check_suite_options(parser: _Parser, args: argparse.Namespace) -> None:
    """The checks that involve more than one option, and the claim names."""
    if args.claims == ["all"]:
        args.claims = list(CLAIM_IDS)
    unknown = [c for c in args.claims if c not in CLAIM_IDS]
    if unknown:
        parser.error(f"expected claims among {', '.join(CLAIM_IDS)} or 'all', got "
                     f"{', '.join(unknown)}")
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in distributed) and any(v is None for v in distributed):
        parser.error("expected --coordinator, --num-processes and --process-id together, got "
                     + ", ".join(f"{name} {value}" for name, value in
                                 zip(("--coordinator", "--num-processes", "--process-id"),
                                     distributed, strict=True)))
    if args.process_id is not None and args.process_id >= args.num_processes:
        parser.error(f"expected --process-id < --num-processes {args.num_processes}, "
                     f"got {args.process_id}")


def _describe(name: str, value: Any) -> str:
    """A run option as the command line writes it: ``--seeds 2``, ``--full``, ``no --seeds``."""
    if name == "claims":
        return f"claims {' '.join(value)}"
    if name == "full":
        return "--full" if value else "--quick"
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return f"no {flag}"
    return flag if value is True else f"{flag} {value}"


def _resume_options(parser: _Parser, args: argparse.Namespace, argv: list[str]) -> None:
    """``--resume DIR``: the run options of the run in DIR (``meta.options`` of its
    results.json) replace those of ``args``; ``argv`` may repeat them but not change them,
    and may give ``--out`` only as DIR. Exits in one line otherwise."""
    try:
        with open(os.path.join(args.resume, "results.json")) as f:
            options = json.load(f)["meta"]["options"]
        recorded = {name: options[name] for name in RUN_OPTIONS if name != "checkpoint"}
        # Recorded without `checkpoint`: the mode's default.
        recorded["checkpoint"] = options.get("checkpoint", recorded["full"])
    except (OSError, ValueError, KeyError, TypeError):
        parser.error(f"argument --resume: expected a directory with a run to continue "
                     f"(DIR/results.json written by python -m experiments), got {args.resume!r}")
    if args.out not in (None, args.resume):
        parser.error(f"expected no --out with --resume DIR (it writes to DIR), got --out "
                     f"{args.out} --resume {args.resume}")
    for name, value in _given_options(argv).items():
        if name in recorded and value != recorded[name]:
            parser.error(f"--resume: the run in {args.resume} has "
                         f"{_describe(name, recorded[name])}, got {_describe(name, value)}; "
                         "leave the run's options out or repeat them unchanged")
    vars(args).update(recorded, out=args.resume)
    _check_suite_options(parser, args)


def _require_extras(parser: _Parser, *extras: str) -> None:
    """Exits in one line naming the extra to install if a module of one is missing."""
    for extra in extras:
        missing = [pip for module, pip in EXTRAS[extra].items()
                   if importlib.util.find_spec(module) is None]
        if missing:
            parser.error(f"needs the [{extra}] extra, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not installed: "
                         f"pip install 'jaxbn[{extra}]' (in a checkout: pip install -e "
                         f"'.[{extra}]')")


def _use_cpu_devices(parser: _Parser, count: int) -> None:
    """Makes ``count`` host CPU devices, or checks that jax, already started, has them."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend has started (jax used in this process already)
        if jax.device_count() < count:
            parser.error(f"expected {count} devices, but jax has already started with "
                         f"{jax.device_count()}; run from a fresh process")


def _run(parser: _Parser, args: argparse.Namespace, argv: list[str]) -> int:
    """Runs the suite or some claims: every check, then the claims."""
    from .claims import Context, Settings

    if args.resume:
        _resume_options(parser, args, argv)
    extras = ("experiments", "tensorboard") if args.tensorboard else ("experiments",)
    _require_extras(parser, *extras)
    if args.coordinator:  # before jax starts: a process other than 0 runs in a child
        status = peers.supervise(argv, args.process_id, args.num_processes)
        if status is not None:
            return status
    sync_here = "sync" in args.claims and not args.coordinator  # several processes: as given
    needs = max(args.devices, SYNC_DEVICES) if sync_here else args.devices
    if needs > 1:  # with --coordinator, each process's own devices
        _use_cpu_devices(parser, needs)
    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts only
        jax.config.update("jax_enable_recoverability", True)  # a lost process: see peers
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id,
                                   heartbeat_timeout_seconds=peers.HEARTBEAT_TIMEOUT_S)
    devices = jax.device_count() if args.coordinator else args.devices
    if devices > jax.device_count():
        parser.error(f"expected --devices <= the {jax.device_count()} devices jax sees, "
                     f"got {devices}")
    if args.checkpoint is None:
        args.checkpoint = args.full
    settings = Settings(quick=not args.full, seeds=args.seeds, dataset=args.dataset,
                        tensorboard=args.tensorboard, budget=args.budget, devices=devices,
                        checkpoint=args.checkpoint, resume=bool(args.resume))
    out = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    ctx = Context(settings=settings, out=out, show_progress=args.progress)
    try:
        ctx.check(args.claims)
    except ValueError as error:
        parser.error(str(error))
    from . import suite

    options = {name: getattr(args, name) for name in RUN_OPTIONS}
    command = "python -m experiments " + shlex.join(argv)
    if args.coordinator:
        peers.watch(args.num_processes, out)
    completed = suite.run_suite(args.claims, ctx, command=command, options=options)
    if args.coordinator:  # a lost process ends this one here, in one line
        peers.finish(args.num_processes, out)
    if not completed:
        raise SystemExit(f"some claims failed; see {out}/report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, args = parse_args(argv)
    if args.command == "list":
        from .claims import load_claim

        width = max(map(len, CLAIM_IDS))
        print("\n".join(f"{c:<{width}}  {load_claim(c).CLAIM}" for c in CLAIM_IDS))
        return 0
    if args.command == "bench":
        _require_extras(parser, "experiments")
        return run_bench_from_args(args)
    if args.command == "plot":
        if not os.path.isfile(os.path.join(args.dir, "results.json")):
            parser.error(f"expected DIR/results.json, got DIR {args.dir!r} without one")
        _require_extras(parser, "experiments")
        from . import report

        print(f"report: {report.write_report(args.dir)}")
        return 0
    if args.command == "readme":
        from . import readme

        return readme.main(check=args.check)
    return _run(parser, args, argv)


if __name__ == "__main__":
    sys.exit(main())

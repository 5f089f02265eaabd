"""The command line: ``python -m experiments [OPTIONS] [COMMAND [ARGUMENTS]]``.

Without a command it runs every claim. An option may stand before or after the command: the
words before the command are parsed again by the command's own parser, so an option takes
effect wherever it stands, and an option the command does not have is rejected in one line.
Every value is checked here, with the installed extras and every config of the chosen
claims, before anything trains; a bad one exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import data, peers, report  # none imports jax at import time
from .bench import add_arguments as add_bench_arguments  # imports no jax, as .claims
from .bench import run_from_args as run_bench_from_args
from .claims import CLAIM_IDS  # imports neither jax nor the extras: checks come first

SYNC_DEVICES = 8
# The largest batch of any claim (batch-size's full sweep). A run trains data parallel only when
# its batch divides by the device count, so more devices than this would all go unused; and
# jax_num_cpu_devices grows the CPU client's start (measured: 256 devices in 6 s, 4,096 in
# 15 s and 600 MB) until, at 100,000, it segfaults.
MAX_DEVICES = 256
# The runs of a group (seeds x learning rates x init scales) are vmapped into one program, so
# its memory and step time grow with the seed count; a 95% t-interval over 100 seeds is
# already 0.2 standard deviations wide.
MAX_SEEDS = 100
COORDINATOR_TIMEOUT = 60  # seconds for every process to join; --coordinator-timeout
COMMANDS = ("list", "run", "plot", "bench", "docs")
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
  python -m experiments docs            rewrite the docs' results, bench tables and figures

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


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """The argparse type of an integer in [low, high] (no upper bound if ``high`` is None)."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= (value if high is None else high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _directory(text: str) -> str:
    """A directory path; the empty one (an unset ``$DIR``) is refused."""
    if not text:
        raise argparse.ArgumentTypeError(f"expected a directory, got {text!r}")
    return text


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
    if not (host and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a host and a port in [1, 65535], got {text!r}")
    return text


def _add_suite_options(parser: argparse.ArgumentParser) -> None:
    """The options of a suite of claims: ``python -m experiments`` and ``run``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", default=False,
                      help="reduced sizes: 3 seeds, few hundred steps (default)")
    mode.add_argument("--full", dest="full", action="store_true", default=False,
                      help="full sizes: 5 seeds, thousands of steps, larger sweeps and data")
    parser.add_argument("--seeds", type=_integer(1, MAX_SEEDS), default=None, metavar="N",
                        help="number of seeds per arm (default 3 quick, 5 full; >= 2 for an "
                             f"interval, >= 3 for a meaningful one; at most {MAX_SEEDS})")
    parser.add_argument("--dataset", type=_dataset, default=None, metavar="NAME",
                        help=f"digits | mnist1d[:N] (N in [{data.MNIST1D_MIN}, "
                             f"{data.MNIST1D_MAX}]) | idx:DIR (MNIST/Fashion-MNIST IDX files, "
                             ".gz allowed); default mnist1d:4000 quick, mnist1d:10000 full")
    parser.add_argument("--devices", type=_integer(1, MAX_DEVICES), default=1, metavar="N",
                        help="devices (on CPU: host devices, made before jax starts; with "
                             "--coordinator, per process); runs whose batch divides by the "
                             "device count train data-parallel with shard_map and synchronized "
                             "BN. The sync claim always uses 8 (on one process). At most "
                             f"{MAX_DEVICES}, the largest batch of any claim.")
    parser.add_argument("--out", type=_directory, default=None, metavar="DIR",
                        help="output directory (default results/<timestamp>/)")
    parser.add_argument("--resume", type=_directory, default=None, metavar="DIR",
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
    dist.add_argument("--num-processes", type=_integer(1), default=None, metavar="N")
    dist.add_argument("--process-id", type=_integer(0), default=None, metavar="I")
    dist.add_argument("--coordinator-timeout", type=_integer(1, 3600),
                      default=COORDINATOR_TIMEOUT, metavar="S",
                      help="seconds for every process to reach the coordinator before each "
                           f"gives up in one line (default {COORDINATOR_TIMEOUT})")


def _run_parser(parser: _Parser) -> None:
    parser.description = "Run the named claims (or 'all') and write their report."
    parser.add_argument("claims", nargs="+", metavar="CLAIM",
                        help=f"claim ids, or 'all': {', '.join(CLAIM_IDS)}")
    _add_suite_options(parser)


def _plot_parser(parser: _Parser) -> None:
    parser.description = "Remake the figures and report.md from DIR/results.json."
    parser.add_argument("dir", type=_directory, metavar="DIR")


def _docs_parser(parser: _Parser) -> None:
    parser.description = (
        "Rewrite the results and bench sections of docs/ and the figures in docs/figures/ "
        "from experiments/reference/."
    )
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the docs differ from the rendering")


_BUILDERS: dict[str, Callable[[_Parser], None]] = {
    "list": lambda parser: None,
    "run": _run_parser,
    "plot": _plot_parser,
    "bench": add_bench_arguments,  # experiments/bench owns its options
    "docs": _docs_parser,
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


class _Refusal(Exception):
    """The message of an argument that :class:`_Checker` refuses."""


class _Checker(_Parser):
    """The suite's options and its claims, to check the values a results.json records with
    the command line's own types: a refused value raises :class:`_Refusal`."""

    def __init__(self) -> None:
        super().__init__(prog="results.json", add_help=False)
        _add_suite_options(self)
        self.add_argument("claims", nargs="*")

    def error(self, message: str) -> NoReturn:
        raise _Refusal(message)


# The words that give each value of a run option that is a flag, by destination.
_FLAG_WORDS: dict[str, dict[bool | None, list[str]]] = {
    "full": {True: ["--full"], False: ["--quick"]},
    "tensorboard": {True: ["--tensorboard"], False: []},
    "checkpoint": {True: ["--checkpoint"], False: ["--no-checkpoint"], None: []},
}


def _recorded_words(name: str, value: Any) -> list[str]:
    """The command-line words that give run option ``name`` the ``value`` recorded in a
    results.json. Raises :class:`_Refusal` for a value no words give."""
    if name == "claims":
        if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
            raise _Refusal(f"expected a list of claim ids, got {json.dumps(value)}")
        return ["--", *value]
    if name in _FLAG_WORDS:
        words = _FLAG_WORDS[name].get(value) if isinstance(value, bool | None) else None
        if words is None:
            raise _Refusal(f"expected {' or '.join(map(json.dumps, _FLAG_WORDS[name]))}, "
                           f"got {json.dumps(value)}")
        return words
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Refusal(f"expected a number or a string, got {json.dumps(value)}")
    return [f"--{name.replace('_', '-')}={value}"]


def _recorded_options(options: Any) -> dict[str, Any]:
    """The run options a results.json records (its ``meta.options``), checked as the command
    line checks its own: each value is written as the words that give it and parsed by the
    same types, and must come back unchanged.

    Raises:
      ValueError: naming the field (``meta.options.NAME``), what was expected and what was
        recorded.
    """
    if not isinstance(options, dict):
        raise ValueError(f"meta.options: expected the run's options (an object), got "
                         f"{json.dumps(options)}")
    checker, recorded = _Checker(), {}
    for name in RUN_OPTIONS:
        if name == "checkpoint" and name not in options:  # recorded before it was an option
            value = options.get("full")
        elif name not in options:
            raise ValueError(f"meta.options.{name}: expected a value, got none")
        else:
            value = options[name]
        try:
            parsed = vars(checker.parse_args(_recorded_words(name, value)))[name]
        except _Refusal as refusal:
            raise ValueError(f"meta.options.{name}: {refusal}") from None
        unknown = [c for c in value if c not in CLAIM_IDS] if name == "claims" else []
        if unknown:
            raise ValueError(f"meta.options.claims: expected claims among "
                             f"{', '.join(CLAIM_IDS)}, got {', '.join(unknown)}")
        if parsed != value:
            raise ValueError(f"meta.options.{name}: expected {json.dumps(parsed)} (what the "
                             f"command line makes of it), got {json.dumps(value)}")
        recorded[name] = value
    return recorded


def _resume_options(parser: _Parser, args: argparse.Namespace, argv: list[str]) -> None:
    """``--resume DIR``: the run options of the run in DIR (``meta.options`` of its
    results.json, checked like the command line's) replace those of ``args``; ``argv`` may
    repeat them but not change them, and may give ``--out`` only as DIR. Exits in one line
    otherwise, naming DIR/results.json and the field."""
    try:
        results = report.load_results(args.resume)
    except OSError:
        parser.error(f"argument --resume: expected a directory with a run to continue "
                     f"(DIR/results.json written by python -m experiments), got {args.resume!r}")
    except ValueError as error:  # it names the file
        parser.error(f"argument --resume: {error}")
    try:
        recorded = _recorded_options(results["meta"].get("options"))
    except ValueError as error:
        parser.error(f"argument --resume: {os.path.join(args.resume, 'results.json')}: {error}")
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


def _check_output(parser: _Parser, option: str, path: str) -> None:
    """Exits in one line unless ``path`` is a directory where files can be made, or can be made
    one. It tries: it makes the missing directories and a file in ``path``, then removes them,
    so nothing is left if a later check fails."""
    made = []  # deepest first
    head = os.path.abspath(path)
    while not os.path.lexists(head):
        made.append(head)
        head = os.path.dirname(head)
    problem = None
    if not os.path.isdir(head):
        problem = "a file" if not made else f"under the file {head}"
    else:
        try:
            for directory in reversed(made):
                os.mkdir(directory)
            handle, probe = tempfile.mkstemp(dir=path)
            os.close(handle)
            os.remove(probe)
        except OSError as error:
            problem = f"where files cannot be made ({error.strerror})"
        finally:
            for directory in made:
                with contextlib.suppress(OSError):  # never made
                    os.rmdir(directory)
    if problem is not None:
        parser.error(f"argument {option}: expected a directory to write the results to, got "
                     f"{path!r}, {problem}")


def _exit_now(message: str) -> None:
    """Writes ``message`` and ends the process with status 2 at once: it runs on a watchdog
    thread while the main thread waits in the C++ distributed runtime, which a SystemExit
    cannot interrupt and which, left to its own timeout, aborts with a stack trace."""
    sys.stderr.write(message)
    sys.stderr.flush()
    os._exit(2)


def _wait_for_coordinator(parser: _Parser, args: argparse.Namespace) -> float:
    """Waits, in a process other than 0, for the coordinator's port to open (process 0 opens
    it), so that a missing coordinator is named as such, in one line and with status 2, after
    ``--coordinator-timeout`` seconds; returns the time (``time.monotonic``) by which every
    process must have joined."""
    timeout, address = args.coordinator_timeout, args.coordinator
    deadline = time.monotonic() + timeout
    host, _, port = address.rpartition(":")
    while args.process_id > 0:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            break
        except socket.gaierror as error:
            parser.error(f"argument --coordinator: expected a host this machine can resolve, "
                         f"got {address!r} ({error.strerror})")
        except OSError:
            if time.monotonic() >= deadline:
                parser.error(f"argument --coordinator: expected process 0 of "
                             f"{args.num_processes} listening at {address}, got no answer "
                             f"within {timeout} s (--coordinator-timeout)")
            time.sleep(0.25)
    return deadline


def _join(parser: _Parser, args: argparse.Namespace, deadline: float) -> None:
    """``jax.distributed.initialize``, given up in one line with status 2 if the processes
    have not all joined by ``deadline`` (from :func:`_wait_for_coordinator`): a watchdog
    ends the wait before the runtime's own timeout would abort the process."""
    import jax

    timeout, address = args.coordinator_timeout, args.coordinator
    message = (f"{parser.prog}: error: argument --coordinator: expected all "
               f"{args.num_processes} processes to join at {address} within {timeout} s "
               f"(--coordinator-timeout), got process {args.process_id} still waiting "
               "(see --help)\n")
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _exit_now, (message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts only
        jax.config.update("jax_enable_recoverability", True)  # a lost process: see peers
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   initialization_timeout=timeout + 60,  # the watchdog first
                                   heartbeat_timeout_seconds=peers.HEARTBEAT_TIMEOUT_S)
    finally:
        watchdog.cancel()


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

    if args.resume is not None:
        _resume_options(parser, args, argv)
    out = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    _check_output(parser, "--resume" if args.resume is not None else "--out", out)
    extras = ("experiments", "tensorboard") if args.tensorboard else ("experiments",)
    _require_extras(parser, *extras)
    if args.coordinator:  # before jax starts: a process other than 0 runs in a child
        status = peers.supervise(argv, args.process_id, args.num_processes)
        if status is not None:
            return status
    sync_here = "sync" in args.claims and not args.coordinator  # several processes: as given
    needs = max(args.devices, SYNC_DEVICES) if sync_here else args.devices
    deadline = _wait_for_coordinator(parser, args) if args.coordinator else 0.0  # before jax
    if needs > 1:  # with --coordinator, each process's own devices
        _use_cpu_devices(parser, needs)
    import jax

    if args.coordinator:
        _join(parser, args, deadline)
    devices = jax.device_count() if args.coordinator else args.devices
    if devices > jax.device_count():
        parser.error(f"expected --devices <= the {jax.device_count()} devices jax sees, "
                     f"got {devices}")
    if args.checkpoint is None:
        args.checkpoint = args.full
    settings = Settings(quick=not args.full, seeds=args.seeds, dataset=args.dataset,
                        tensorboard=args.tensorboard, budget=args.budget, devices=devices,
                        checkpoint=args.checkpoint, resume=args.resume is not None)
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
        try:  # the file is checked first, then each claim's details as it is plotted
            print(f"report: {report.write_report(args.dir)}")
        except ValueError as error:
            parser.error(f"argument DIR: {error}")
        return 0
    if args.command == "docs":
        _require_extras(parser, "experiments")
        from . import docs

        return docs.main(check=args.check)
    return _run(parser, args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The command line: ``python -m experiments [OPTIONS] [COMMAND [ARGUMENTS]]``.

Without a command it runs every claim. The suite's options may stand before or after the
command: they come from one parent parser, shared by the words before the command and ``run``,
and every parser leaves out what is not given (``argument_default=SUPPRESS``), so one parse
gives the values the command line sets itself, wherever they stand; the defaults are laid
under them afterwards. A suite option before another command takes effect if that command has
the same option, and is rejected in one line otherwise.
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
from typing import Any, NamedTuple, NoReturn

from . import data, peers, report  # none imports jax at import time
from .bench import DEFAULTS as BENCH_DEFAULTS  # imports no jax, as .claims
from .bench import add_arguments as add_bench_arguments
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


# The suite's options when the command line leaves them out. Every parser here is made with
# ``argument_default=SUPPRESS``, so a namespace holds only what was given, wherever it stood
# (argparse copies a command's namespace over the one of the words before it); the defaults are
# laid under it afterwards.
SUITE_DEFAULTS: dict[str, Any] = {
    "full": False, "seeds": None, "dataset": None, "devices": 1, "out": None, "resume": None,
    "checkpoint": None, "tensorboard": False, "budget": 1.0, "progress": True,
    "coordinator": None, "num_processes": None, "process_id": None,
    "coordinator_timeout": COORDINATOR_TIMEOUT,
}


def _suite_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Adds the options of a suite of claims (``python -m experiments`` and ``run``) to
    ``parser``, without defaults (:data:`SUITE_DEFAULTS`); returns them."""
    mode = parser.add_mutually_exclusive_group()
    dist = parser.add_argument_group("multi-process (jax.distributed.initialize)")
    checkpoint = parser.add_mutually_exclusive_group()
    return [
        mode.add_argument("--quick", dest="full", action="store_false",
                          help="reduced sizes: 3 seeds, few hundred steps (default)"),
        mode.add_argument("--full", dest="full", action="store_true",
                          help="full sizes: 5 seeds, thousands of steps, larger sweeps and data"),
        parser.add_argument("--seeds", type=_integer(1, MAX_SEEDS), metavar="N",
                            help="number of seeds per arm (default 3 quick, 5 full; >= 2 for an "
                                 "interval, >= 3 for a meaningful one; at most "
                                 f"{MAX_SEEDS})"),
        parser.add_argument("--dataset", type=_dataset, metavar="NAME",
                            help=f"digits | mnist1d[:N] (N in [{data.MNIST1D_MIN}, "
                                 f"{data.MNIST1D_MAX}]) | idx:DIR (MNIST/Fashion-MNIST IDX "
                                 "files, .gz allowed); default mnist1d:4000 quick, "
                                 "mnist1d:10000 full"),
        parser.add_argument("--devices", type=_integer(1, MAX_DEVICES), metavar="N",
                            help="devices (on CPU: host devices, made before jax starts; with "
                                 "--coordinator, per process); runs whose batch divides by the "
                                 "device count train data-parallel with shard_map and "
                                 "synchronized BN. The sync claim always uses 8 (on one "
                                 f"process). At most {MAX_DEVICES}, the largest batch of any "
                                 "claim. Default 1."),
        parser.add_argument("--out", type=_directory, metavar="DIR",
                            help="output directory (default results/<timestamp>/)"),
        parser.add_argument("--resume", type=_directory, metavar="DIR",
                            help="continue the interrupted run in DIR (it writes there): "
                                 "completed claims are kept, the others continue from their "
                                 "checkpoints; the run's options come from DIR/results.json"),
        checkpoint.add_argument("--checkpoint", dest="checkpoint", action="store_true",
                                help="orbax checkpoints about 10 times per group of runs, so "
                                     "--resume loses little (default with --full)"),
        checkpoint.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                                help="no checkpoints (default in quick mode)"),
        parser.add_argument("--tensorboard", action="store_true",
                            help="also write TensorBoard event files (needs the [tensorboard] "
                                 "extra)"),
        parser.add_argument("--budget", type=_budget, metavar="F",
                            help="multiply every step count by F > 0 (e.g. 0.1 for a smoke "
                                 "test)"),
        parser.add_argument("--no-progress", dest="progress", action="store_false",
                            help="no progress bars"),
        dist.add_argument("--coordinator", type=_coordinator, metavar="HOST:PORT",
                          help="address of process 0; with it every process runs the same "
                               "command"),
        dist.add_argument("--num-processes", type=_integer(1), metavar="N"),
        dist.add_argument("--process-id", type=_integer(0), metavar="I"),
        dist.add_argument("--coordinator-timeout", type=_integer(1, 3600), metavar="S",
                          help="seconds for every process to reach the coordinator before each "
                               f"gives up in one line (default {COORDINATOR_TIMEOUT})"),
    ]


def _suite_parent() -> tuple[_Parser, list[argparse.Action]]:
    """The parent parser of the suite's options, shared by the words before the command and
    ``run``, and its options."""
    parent = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    return parent, _suite_options(parent)


def _run_options(parser: _Parser) -> list[argparse.Action]:
    parser.description = "Run the named claims (or 'all') and write their report."
    return [parser.add_argument("claims", nargs="+", metavar="CLAIM",
                                help=f"claim ids, or 'all': {', '.join(CLAIM_IDS)}")]


def _plot_options(parser: _Parser) -> list[argparse.Action]:
    parser.description = "Remake the figures and report.md from DIR/results.json."
    return [parser.add_argument("dir", type=_directory, metavar="DIR")]


def _docs_options(parser: _Parser) -> list[argparse.Action]:
    parser.description = (
        "Rewrite the results and bench sections of docs/ and the figures in docs/figures/ "
        "from experiments/reference/."
    )
    return [parser.add_argument("--check", action="store_true",
                                help="change nothing; exit 1 if the docs differ from the "
                                     "rendering")]


# Each command: what adds its own arguments (returning them), and its defaults.
_COMMANDS: dict[str, tuple[Callable[[_Parser], list[argparse.Action]], dict[str, Any]]] = {
    "list": (lambda parser: [], {}),
    "run": (_run_options, SUITE_DEFAULTS),
    "plot": (_plot_options, {}),
    "bench": (add_bench_arguments, BENCH_DEFAULTS),  # experiments/bench owns its options
    "docs": (_docs_options, {"check": False}),
}
COMMANDS = tuple(_COMMANDS)


class _CommandWord:
    """The ``type`` of the COMMAND positional. argparse converts the command and every word
    after it with it; the first is the command, refused in one line unless it is one (an
    option of another command standing before it, whose value took its place, is named)."""

    def __init__(self, argv: list[str], suite: list[argparse.Action]) -> None:
        self.argv, self.suite, self.seen = argv, suite, False

    def __call__(self, word: str) -> str:
        if self.seen or word in COMMANDS:
            self.seen = True
            return word
        known = {option for action in self.suite for option in action.option_strings}
        before = self.argv[: self.argv.index(word)] if word in self.argv else []
        unknown = [w for w in before if w.startswith("-") and w.split("=")[0] not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"{' '.join(unknown)} is not an option before the command; only the options of "
                "--help may stand there")
        raise argparse.ArgumentTypeError(f"expected a command in {COMMANDS}, got {word!r}")


class _Cli(NamedTuple):
    """The command line's parsers."""

    parser: _Parser  # the words before the command: the suite's options, then the command
    commands: dict[str, _Parser]  # each command's own arguments
    suite: list[argparse.Action]  # the suite's options (before any command, and in run's)
    options: dict[str, dict[str, argparse.Action]]  # each command's options by option string


def _cli(argv: list[str] | None = None) -> _Cli:
    """The parsers, for ``argv`` (which only an unknown command's message reads)."""
    parent, suite = _suite_parent()
    parser = _Parser(prog="python -m experiments", description=DESCRIPTION, parents=[parent],
                     usage="python -m experiments [OPTIONS] [COMMAND [ARGUMENTS]]",
                     argument_default=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser,
        help=f"one of {', '.join(COMMANDS)} (default: every claim)")
    subparsers.type = _CommandWord(argv or [], suite)
    commands, options = {}, {}
    for command, (add_options, _) in _COMMANDS.items():
        shared = [parent] if command == "run" else []
        commands[command] = subparsers.add_parser(
            command, prog=f"python -m experiments {command}", parents=shared,
            argument_default=argparse.SUPPRESS)
        actions = add_options(commands[command]) + (suite if shared else [])
        options[command] = {option: action for action in actions
                            for option in action.option_strings}
    return _Cli(parser, commands, suite, options)


def command_parser(command: str) -> _Parser:
    """The parser of one command's arguments."""
    return _cli().commands[command]


def make_parser() -> _Parser:
    """The parser of the command line: the suite's options, then the command."""
    return _cli().parser


def _words(suite: list[argparse.Action], dest: str, value: Any) -> tuple[str, list[str]]:
    """The option of the suite that gives ``dest`` the ``value``, and the words that do."""
    for action in suite:
        if action.dest == dest and (action.nargs != 0 or action.const == value):
            option = action.option_strings[-1]
            return option, [option] if action.nargs == 0 else [option, str(value)]
    raise AssertionError(f"no option of the suite gives {dest} = {value!r}")


def _parse(argv: list[str]) -> tuple[_Parser, argparse.Namespace, dict[str, Any]]:
    """:func:`parse_args`, and the values ``argv`` gives itself by destination (``claims``
    only after ``run``, with 'all' expanded)."""
    cli = _cli(argv)
    given = vars(cli.parser.parse_args(argv))
    command = given.pop("command", None)
    if command is None:
        parser, defaults = cli.parser, {**SUITE_DEFAULTS, "claims": list(CLAIM_IDS)}
    else:
        parser, defaults = cli.commands[command], _COMMANDS[command][1]
    if command not in (None, "run"):
        # A suite option (necessarily before the command) takes effect if the command has
        # the same option, and is refused otherwise.
        own, unknown = cli.options[command], []
        own_dests = {action.dest for action in own.values()}
        suite_dests = {action.dest for action in cli.suite}
        for dest in [d for d in given if d in suite_dests and d not in own_dests]:
            option, words = _words(cli.suite, dest, given.pop(dest))
            if option not in own:
                unknown += words
            else:
                action = own[option]
                given[action.dest] = action.const if action.nargs == 0 else words[-1]
        if unknown:
            cli.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if given.get("claims") == ["all"]:
        given["claims"] = list(CLAIM_IDS)
    args = argparse.Namespace(**{**defaults, **given, "command": command or "suite"})
    if args.command in ("suite", "run"):
        _check_suite_options(parser, args)
    return parser, args, given


def parse_args(argv: list[str]) -> tuple[_Parser, argparse.Namespace]:
    """The parser that read the command's arguments (for later errors) and the arguments,
    with ``command`` (``"suite"`` when none is given), wherever the options stand. Exits with
    status 2 and a one-line message for anything it cannot accept."""
    parser, args, _ = _parse(argv)
    return parser, args


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
        super().__init__(prog="results.json", add_help=False, parents=[_suite_parent()[0]],
                         argument_default=argparse.SUPPRESS)
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
            parsed = {**SUITE_DEFAULTS,
                      **vars(checker.parse_args(_recorded_words(name, value)))}[name]
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


def _resume_options(parser: _Parser, args: argparse.Namespace, given: dict[str, Any]) -> None:
    """``--resume DIR``: the run options of the run in DIR (``meta.options`` of its
    results.json, checked like the command line's) replace those of ``args``; the command
    line (``given``: the values it gives itself) may repeat them but not change them, and
    may give ``--out`` only as DIR. Exits in one line otherwise, naming DIR/results.json and
    the field."""
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
    for name, value in given.items():
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


def _run(parser: _Parser, args: argparse.Namespace, argv: list[str],
         given: dict[str, Any]) -> int:
    """Runs the suite or some claims (``argv``, which gives ``given`` itself): every check,
    then the claims."""
    from .claims import Context, Settings

    if args.resume is not None:
        _resume_options(parser, args, given)
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
    parser, args, given = _parse(argv)
    if args.command == "list":
        from .claims import load_claim

        width = max(map(len, CLAIM_IDS))
        print("\n".join(f"{c:<{width}}  {load_claim(c).title}" for c in CLAIM_IDS))
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
    return _run(parser, args, argv, given)


if __name__ == "__main__":
    sys.exit(main())

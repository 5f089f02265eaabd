"""The command line: every option before or after its command, and bad input stopped in one line
before anything trains. Parsing only: nothing here trains (test_experiments.py runs a claim).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import data
from experiments.__main__ import (
    COMMANDS,
    MAX_DEVICES,
    MAX_SEEDS,
    command_parser,
    main,
    make_parser,
    parse_args,
)

# A valid value for every option that takes one. The three multi-process options are only
# valid together, so each brings the other two.
DISTRIBUTED = ["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "1"]
VALUES = {
    "--seeds": ["2"],
    "--dataset": ["digits"],
    "--devices": ["2"],
    "--out": ["somewhere"],
    "--resume": ["somewhere"],
    "--budget": ["0.5"],
    "--processes": ["2"],
    "--compile-processes": ["2"],
    "--resnet-batch": ["2"],
    "--resnet-size": ["16"],
    "--coordinator": DISTRIBUTED[1:],
    "--num-processes": ["2", "--coordinator", "localhost:1234", "--process-id", "1"],
    "--process-id": ["1", "--coordinator", "localhost:1234", "--num-processes", "2"],
    "--coordinator-timeout": ["5"],
}
POSITIONALS = {"list": [], "run": ["convergence"], "plot": ["somewhere"], "bench": [],
               "docs": []}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    # argparse lists a parser's arguments only in its private _actions.
    return {a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}


SUITE = _options(make_parser())


def _words(option: str) -> list[str]:
    return [option, *VALUES.get(option, [])]


def _rejected(argv: list[str], option: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.count("\n") == 1 and option in error, error


def test_every_option_has_a_value_to_test_with():
    for command in COMMANDS:
        for option in _options(command_parser(command)):
            flag = all(a.nargs == 0 for a in command_parser(command)._actions
                       if option in a.option_strings)
            assert flag or option in VALUES, f"add a value for {option} of {command}"


@pytest.mark.parametrize("option", sorted(SUITE))
def test_every_suite_option_takes_effect_without_a_command(option):
    _, args = parse_args(_words(option))
    _, default = parse_args([])
    assert args.command == "suite"
    assert vars(args) != vars(default) or option == "--quick"  # --quick is the default mode


@pytest.mark.parametrize(
    ("command", "option"),
    [(c, o) for c in COMMANDS for o in sorted(_options(command_parser(c)) | SUITE)],
)
def test_every_option_before_or_after_the_command(command, option, capsys):
    """After the command: taken if the command has it, rejected otherwise. Before: the same
    effect as after for the suite's options the command has; rejected for the others."""
    after = [command, *POSITIONALS[command], *_words(option)]
    before = [*_words(option), command, *POSITIONALS[command]]
    if option not in _options(command_parser(command)):
        _rejected(after, option, capsys)
        _rejected(before, option, capsys)
        return
    _, expected = parse_args(after)
    _, bare = parse_args([command, *POSITIONALS[command]])
    assert vars(expected) != vars(bare) or option == "--quick"
    if option in SUITE:
        assert vars(parse_args(before)[1]) == vars(expected)
    else:
        _rejected(before, option, capsys)


def test_the_issue_examples_keep_their_options():
    _, args = parse_args(["--full", "run", "convergence"])
    assert args.full
    _, args = parse_args(["--seeds", "2", "run", "convergence"])
    assert args.seeds == 2
    _, args = parse_args(["--full", "--seeds", "2", "run", "convergence", "--out", "DIR"])
    assert (args.full, args.seeds, args.out, args.claims) == (True, 2, "DIR", ["convergence"])
    _, args = parse_args(["run", "convergence", "--seeds", "4", "--devices", "2"])
    assert (args.seeds, args.devices) == (4, 2)  # after the command as before


# The options of the recorded run in the --resume tests (meta.options of its results.json).
RECORDED = {"claims": ["convergence"], "full": True, "seeds": 2, "dataset": "digits",
            "devices": 1, "budget": 0.01, "tensorboard": False, "num_processes": None,
            "checkpoint": True}


def _results(options=RECORDED, **claims) -> dict:
    """A results.json as the suite writes it: ``meta`` with ``options``, and claim entries."""
    return {"meta": {"command": "python -m experiments ...", "options": options,
                     "runtime_s": 1.5}, "claims": claims}


def _idx(tmp_path: Path, name: str, *, train=(50, 50), damage=None) -> str:
    """An IDX directory (``train`` images and labels, 10 test) with ``damage(directory)``."""
    directory = tmp_path / name
    directory.mkdir()
    rng = np.random.default_rng(0)
    for prefix, (images, labels) in (("train", train), ("t10k", (10, 10))):
        data.write_idx(str(directory / f"{prefix}-images-idx3-ubyte.gz"),
                       rng.integers(0, 256, (images, 28, 28)))
        data.write_idx(str(directory / f"{prefix}-labels-idx1-ubyte"),
                       rng.integers(0, 10, labels))
    if damage is not None:
        damage(directory)
    return str(directory)


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _run_dir(tmp_path: Path, results) -> str:
    """A directory with ``results`` as its results.json (text as it is, else as JSON)."""
    directory = tmp_path / "run"
    directory.mkdir()
    text = results if isinstance(results, str) else json.dumps(results)
    (directory / "results.json").write_text(text)
    return str(directory)


# The files some rows of BAD_INPUT need, made in tmp_path: a word "{name}" becomes the path
# that FILES[name](tmp_path) returns.
FILES = {
    "file": lambda t: (t / "file").write_text("") or str(t / "file"),
    "idx-50-images-40-labels": lambda t: _idx(t, "idx", train=(50, 40)),
    "idx-truncated": lambda t: _idx(t, "idx", damage=lambda d: _cut(
        d / "train-labels-idx1-ubyte", 30)),
    "idx-truncated-gzip": lambda t: _idx(t, "idx", damage=lambda d: _cut(
        d / "t10k-images-idx3-ubyte.gz", 100)),
    "idx-not-gzip": lambda t: _idx(t, "idx", damage=lambda d: (
        d / "train-images-idx3-ubyte.gz").write_bytes(b"\0\0\x08\x03 plain IDX bytes")),
    "idx-no-header": lambda t: _idx(t, "idx", damage=lambda d: (
        d / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 a zip")),
    "run-budget-minus-5": lambda t: _run_dir(t, _results({**RECORDED, "budget": -5})),
    "run-seeds-text": lambda t: _run_dir(t, _results({**RECORDED, "seeds": "2"})),
    "run-seeds-true": lambda t: _run_dir(t, _results({**RECORDED, "seeds": True})),
    "run-full-text": lambda t: _run_dir(t, _results({**RECORDED, "full": "yes"})),
    "run-unknown-claim": lambda t: _run_dir(t, _results({**RECORDED, "claims": ["nope"]})),
    "run-bad-dataset": lambda t: _run_dir(t, _results({**RECORDED, "dataset": "mnist1d:5"})),
    "run-no-devices": lambda t: _run_dir(t, _results({k: v for k, v in RECORDED.items()
                                                      if k != "devices"})),
    "run-options-list": lambda t: _run_dir(t, _results([1, 2])),
    "run-bad-entry": lambda t: _run_dir(t, _results(convergence={"id": "convergence",
                                                                 "verdict": "maybe"})),
    "run-not-json": lambda t: _run_dir(t, '{"meta": '),
    "plot-not-json": lambda t: _run_dir(t, "garbage"),
    "plot-list": lambda t: _run_dir(t, "[1, 2]"),
    "plot-no-claims": lambda t: _run_dir(t, json.dumps({"meta": {"runtime_s": 1}})),
    "plot-unknown-claim": lambda t: _run_dir(t, _results(nope={})),
    "plot-bad-mean": lambda t: _run_dir(t, _results(convergence=_entry(mean="high"))),
    "plot-bad-details": lambda t: _run_dir(t, _results(convergence=_entry(details={}))),
}


def _entry(*, mean=0.5, details=None) -> dict:
    """A convergence entry of results.json with every field the report reads."""
    arm = {"label": "BN", "mean": mean, "ci95": 0.1, "interval": [0.4, 0.6],
           "values": [0.4, 0.6]}
    return {"id": "convergence", "claim": "c", "sources": ["1"], "how": "h", "metric": "m",
            "higher_is_better": True, "claim_direction": "d", "with_bn": arm,
            "without_bn": {**arm, "label": "none"}, "verdict": "holds", "rule": "r",
            "reason": "r", "notes": "", "details": details or {}, "runtime_s": 1.0}


# Each bad input: the words, and what its one line must say. {out} is a directory that must
# not appear: nothing may run. Other {NAME}s are made by FILES.
RUN = ["--out", "{out}", "--no-progress"]
RESUMED = r"argument --resume: .*/run/results.json: "
BAD_INPUT = [
    (["--seeds", "0", *RUN], r"argument --seeds: expected an integer in \[1, 100\], got '0'"),
    (["run", "convergence", "--seeds", "-1", *RUN], r"--seeds: expected an integer in \[1, 100\], "
                                                    r"got '-1'"),
    (["--seeds", "two", *RUN], r"--seeds: expected an integer in \[1, 100\], got 'two'"),
    (["--seeds", "100000", *RUN], r"--seeds: expected an integer in \[1, 100\], got '100000'"),
    (["--devices", "0", *RUN], r"--devices: expected an integer in \[1, 256\], got '0'"),
    (["--devices", "100000", *RUN], r"--devices: expected an integer in \[1, 256\], "
                                    r"got '100000'"),
    (["--budget", "0", *RUN], r"--budget: expected a finite number > 0, got '0'"),
    (["--budget", "-0.5", *RUN], r"--budget: expected a finite number > 0, got '-0.5'"),
    (["--budget", "nan", *RUN], r"--budget: expected a finite number > 0, got 'nan'"),
    (["--dataset", "foo", *RUN], r"--dataset: Expected `dataset` to be one of .*, got 'foo'"),
    (["--dataset", "idx:/nonexistent", *RUN], r"--dataset: Expected train-images-idx3-ubyte .* "
                                        r"in '/nonexistent' .*; found no directory"),
    (["--dataset", "mnist1d:ten", *RUN], r"--dataset: Expected .*'mnist1d:N' with an integer N in "
                                         r"\[100, 100000\] .*, got 'mnist1d:ten'"),
    (["--dataset", "mnist1d:100000000", *RUN], r"--dataset: Expected .*'mnist1d:N' with an integer "
                                               r"N in \[100, 100000\] .*, got "
                                               r"'mnist1d:100000000'"),
    (["--dataset", "idx:{idx-50-images-40-labels}", *RUN],
     r"--dataset: Expected as many labels in '.*/train-labels-idx1-ubyte' as images in "
     r"'.*/train-images-idx3-ubyte.gz' \(50\), got 40"),
    (["--dataset", "idx:{idx-truncated}", *RUN],
     r"--dataset: Expected 58 bytes in '.*/train-labels-idx1-ubyte' \(shape \(50,\) of uint8\), "
     r"got 30: the file is truncated"),
    (["--dataset", "idx:{idx-truncated-gzip}", *RUN],
     r"--dataset: Expected a whole gzip file at '.*/t10k-images-idx3-ubyte.gz', got: Compressed "
     r"file ended before the end-of-stream marker was reached"),
    (["--dataset", "idx:{idx-not-gzip}", *RUN],
     r"--dataset: Expected a whole gzip file at '.*/train-images-idx3-ubyte.gz', got: Not a "
     r"gzipped file"),
    (["--dataset", "idx:{idx-no-header}", *RUN],
     r"--dataset: Expected an IDX file at '.*/t10k-labels-idx1-ubyte' \(magic 00 00, .*\), got "
     r"the bytes 50 4b 03 04"),
    (["run", "convergence", "nonsense", *RUN], r"expected claims among .*, got nonsense"),
    (["wat"], r"expected a command in .*, got 'wat'"),
    (["--num-processes", "2", *RUN], r"expected --coordinator, --num-processes and --process-id "
                               r"together, got --coordinator None, --num-processes 2"),
    (["--coordinator", "localhost", *RUN], r"--coordinator: expected HOST:PORT .*, got "
                                           r"'localhost'"),
    ([*DISTRIBUTED[:1], "127.0.0.1:99999", *DISTRIBUTED[2:], *RUN],
     r"--coordinator: expected HOST:PORT with a host and a port in \[1, 65535\], got "
     r"'127.0.0.1:99999'"),
    ([*DISTRIBUTED[:1], ":1234", *DISTRIBUTED[2:], *RUN],
     r"--coordinator: expected HOST:PORT with a host .*, got ':1234'"),
    ([*DISTRIBUTED, "--coordinator-timeout", "0", *RUN], r"--coordinator-timeout: expected an "
                                                         r"integer in \[1, 3600\], got '0'"),
    ([*DISTRIBUTED[:4], "--process-id", "2", *RUN], r"expected --process-id < --num-processes 2, "
                                              r"got 2"),
    (["--processes", "2", "bench"], r"--processes is not an option before the command"),
    (["--seeds", "2", "list"], r"unrecognized arguments: --seeds 2"),
    (["bench", "--processes", "0"], r"--processes: expected an integer >= 1, got .0."),
    (["plot", "{out}"], r"expected DIR/results.json, got DIR '.*' without one"),
    (["plot", ""], r"argument DIR: expected a directory, got ''"),
    (["plot", "{plot-not-json}"], r"argument DIR: .*/run/results.json: expected JSON, got "
                                  r"Expecting value: line 1"),
    (["plot", "{plot-list}"], r"argument DIR: .*/run/results.json: expected an object with meta "
                              r"and claims, got \[1, 2\]"),
    (["plot", "{plot-no-claims}"], r"argument DIR: .*/run/results.json: claims: expected an "
                                   r"object, got none"),
    (["plot", "{plot-unknown-claim}"], r"argument DIR: .*/run/results.json: claims.nope: "
                                       r"expected a claim among convergence, .*, got \"nope\""),
    (["plot", "{plot-bad-mean}"], r"argument DIR: .*/run/results.json: claims.convergence.with_bn"
                                  r".mean: expected a number or null, got \"high\""),
    (["plot", "{plot-bad-details}"], r"argument DIR: .*/run/results.json: claims.convergence."
                                     r"details: expected what the convergence claim records, got "
                                     r"details its report cannot use \(KeyError: "),
    (["--resume", "{out}"], r"argument --resume: expected a directory with a run to continue "
                            r"\(DIR/results.json written by python -m experiments\), got '.*'"),
    (["--resume", ""], r"argument --resume: expected a directory, got ''"),
    (["--out", ""], r"argument --out: expected a directory, got ''"),
    (["--out", "{file}"], r"argument --out: expected a directory to write the results to, got "
                          r"'.*/file', a file"),
    (["--out", "{file}/run"], r"argument --out: expected a directory to write the results to, "
                              r"got '.*/file/run', under the file .*/file \(see"),
    (["--out", "/proc/jaxbn/run"], r"argument --out: expected a directory to write the results "
                                   r"to, got '/proc/jaxbn/run', where files cannot be made"),
    (["--resume", "{run-budget-minus-5}"], RESUMED + r"meta.options.budget: argument --budget: "
                                                     r"expected a finite number > 0, got '-5'"),
    (["--resume", "{run-seeds-text}"], RESUMED + r"meta.options.seeds: expected 2 \(what the "
                                                 r"command line makes of it\), got \"2\""),
    (["--resume", "{run-seeds-true}"], RESUMED + r"meta.options.seeds: expected a number or a "
                                                 r"string, got true"),
    (["--resume", "{run-full-text}"], RESUMED + r"meta.options.full: expected true or false, got "
                                                r"\"yes\""),
    (["--resume", "{run-unknown-claim}"], RESUMED + r"meta.options.claims: expected claims among "
                                                    r"convergence, .*, got nope"),
    (["--resume", "{run-bad-dataset}"], RESUMED + r"meta.options.dataset: argument --dataset: "
                                                  r"Expected .*, got 'mnist1d:5'"),
    (["--resume", "{run-no-devices}"], RESUMED + r"meta.options.devices: expected a value, got "
                                                 r"none"),
    (["--resume", "{run-options-list}"], RESUMED + r"meta.options: expected the run's options "
                                                   r"\(an object\), got \[1, 2\]"),
    (["--resume", "{run-bad-entry}"], RESUMED + r"claims.convergence.verdict: expected one of "
                                                r"holds, does not hold, inconclusive, got "
                                                r"\"maybe\""),
    (["--resume", "{run-not-json}"], RESUMED + r"expected JSON, got Expecting value"),
    (["--checkpoint", "--no-checkpoint", *RUN], r"--no-checkpoint: not allowed with argument "
                                                r"--checkpoint"),
    (["--devices", "16", "run", "convergence", *RUN], r"expected 16 devices, but jax has already "
                                                r"started with 8"),
    (["run", "regularization", "--dataset", "mnist1d:100", *RUN],
     r"claim regularization, arm .*: Expected `train_size` in \[1, 80\]"),
    (["run", "batch-size", "--dataset", "mnist1d:100", *RUN],
     r"claim batch-size, arm none-batch128: Expected `batch_size` <= the training set size "
     r"80, got 128"),
]


def _stops_in_one_line(argv: list[str], pattern: str, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = [w.replace("{out}", str(out)) for w in argv]
    for name, make in FILES.items():
        if any(f"{{{name}}}" in word for word in argv):
            path = make(tmp_path)
            argv = [w.replace(f"{{{name}}}", path) for w in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.count("\n") == 1, error
    assert error.startswith("python -m experiments") and "Traceback" not in error
    assert re.search(pattern, error), error
    assert not out.exists()


@pytest.mark.parametrize(("argv", "pattern"), BAD_INPUT)
def test_bad_input_stops_before_anything_runs_in_one_line(argv, pattern, tmp_path, capsys):
    _stops_in_one_line(argv, pattern, tmp_path, capsys)


@pytest.mark.parametrize(
    ("argv", "module", "pattern"),
    [
        (["run", "convergence", *RUN], "mnist1d",
         r"needs the \[experiments\] extra, but mnist1d is not installed: "
         r"pip install 'jaxbn\[experiments\]'"),
        (RUN, "sklearn", r"needs the \[experiments\] extra, but scikit-learn is not installed"),
        (["run", "convergence", "--tensorboard", *RUN], "tensorboardX",
         r"needs the \[tensorboard\] extra, but tensorboardX is not installed"),
    ],
)
def test_a_missing_extra_is_named_before_anything_runs(argv, module, pattern, tmp_path,
                                                       capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    _stops_in_one_line(argv, pattern, tmp_path, capsys)


def test_the_bounds_themselves_are_accepted():
    _, args = parse_args(["--seeds", str(MAX_SEEDS), "--devices", str(MAX_DEVICES),
                          "--dataset", f"mnist1d:{data.MNIST1D_MAX}"])
    assert (args.seeds, args.devices, args.dataset) == (
        MAX_SEEDS, MAX_DEVICES, f"mnist1d:{data.MNIST1D_MAX}")


def test_the_device_bound_is_the_largest_batch_of_any_claim():
    """More devices than any batch could never train data parallel (MAX_DEVICES's reason)."""
    from experiments.claims import CLAIM_IDS, Settings, load_claim

    batches = [config.batch_size for quick in (True, False) for claim in CLAIM_IDS
               for config in load_claim(claim).configs(Settings(quick=quick)).values()]
    assert max(batches) == MAX_DEVICES


def test_a_writable_out_is_tried_and_left_as_it_was(tmp_path, monkeypatch):
    """The --out check makes the missing directories to try them, and removes them when a
    later check stops the run."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):  # devices: jax has already started with 8 here
        main(["--out", "a/b/c", "--devices", "16", "run", "convergence"])
    assert os.listdir(tmp_path) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_missing_coordinator_stops_in_bounded_time_in_one_line(tmp_path):
    """Process 1 with no coordinator: one line naming the address, status 2, no C++ stack,
    within --coordinator-timeout (the runtime alone aborts after 300 s)."""
    address = f"127.0.0.1:{_free_port()}"
    tic = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "experiments", "run", "convergence", "--coordinator", address,
         "--num-processes", "2", "--process-id", "1", "--coordinator-timeout", "2",
         "--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout)
    assert done.stderr.count("\n") == 1, done.stderr
    assert re.fullmatch(rf"python -m experiments run: error: argument --coordinator: expected "
                        rf"process 0 of 2 listening at {address}, got no answer within 2 s "
                        rf"\(--coordinator-timeout\) \(see --help\)\n", done.stderr), done.stderr
    assert 2 <= time.monotonic() - tic < 30
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_coordinator_whose_peers_never_come_stops_in_one_line(tmp_path):
    """Process 0 of 2 alone: the watchdog ends the wait in one line with status 2, before the
    runtime's own timeout would abort it with a C++ stack."""
    address = f"127.0.0.1:{_free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "experiments", "run", "convergence", "--coordinator", address,
         "--num-processes", "2", "--process-id", "0", "--coordinator-timeout", "3",
         "--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 2 and "Check failure" not in done.stderr, done.stderr
    assert re.search(rf"^python -m experiments run: error: argument --coordinator: expected all "
                     rf"2 processes to join at {address} within 3 s \(--coordinator-timeout\), "
                     rf"got process 0 still waiting \(see --help\)$", done.stderr,
                     re.MULTILINE), done.stderr


# ------------------------------------------------------------------ --resume DIR


@pytest.fixture
def suite_calls(monkeypatch) -> list:
    """The calls of run_suite (replaced: nothing trains here; test_experiments.py and
    test_resume.py resume real runs)."""
    from experiments import suite

    calls: list = []
    monkeypatch.setattr(suite, "run_suite", lambda claims, ctx, **kw: calls.append(
        (claims, ctx, kw)) or True)
    return calls


@pytest.fixture
def recorded_run(tmp_path, suite_calls):
    """A directory with an interrupted run's results.json (RECORDED), and the calls of
    run_suite."""
    return Path(_run_dir(tmp_path, _results())), suite_calls


@pytest.mark.parametrize("argv", [
    ["--resume", "{run}"],
    ["--full", "--seeds", "2", "run", "convergence", "--budget", "0.01", "--dataset", "digits",
     "--resume", "{run}", "--out", "{run}"],
    ["run", "convergence", "--resume", "{run}", "--no-progress"],
])
def test_resume_takes_the_run_options_from_the_run(argv, recorded_run):
    run, calls = recorded_run
    main([w.replace("{run}", str(run)) for w in argv])
    ((claims, ctx, kwargs),) = calls
    assert claims == ["convergence"] and ctx.out == str(run)
    settings = ctx.settings
    assert (settings.quick, settings.seeds, settings.dataset, settings.budget) == (
        False, 2, "digits", 0.01)
    assert settings.resume and settings.checkpoint  # full mode: checkpoints by default
    assert kwargs["options"] == RECORDED


@pytest.mark.parametrize(("changes", "checkpoint"), [
    ({"full": False, "checkpoint": True}, True),  # quick mode with --checkpoint
    ({"full": False, "checkpoint": False}, False),
    ({"full": True, "checkpoint": False}, False),  # full mode with --no-checkpoint
    ({"full": True, "checkpoint": "absent"}, True),  # not recorded: the mode's default
    ({"full": False, "checkpoint": "absent"}, False),
])
def test_resume_keeps_checkpointing_as_the_run_did(changes, checkpoint, tmp_path, suite_calls):
    """Issue 16: a quick run with --checkpoint, resumed, kept no checkpoints (it retrained
    from step 0 and wrote none)."""
    options = {k: v for k, v in {**RECORDED, **changes}.items() if v != "absent"}
    main(["--resume", _run_dir(tmp_path, _results(options)), "--no-progress"])
    ((_, ctx, kwargs),) = suite_calls
    assert ctx.settings.resume and ctx.settings.checkpoint is checkpoint
    assert kwargs["options"]["checkpoint"] is checkpoint and not ctx.show_progress


@pytest.mark.parametrize(("argv", "pattern"), [
    (["--seeds", "3"], r"--resume: the run in .* has --seeds 2, got --seeds 3; leave the run's "
                       r"options out or repeat them unchanged"),
    (["--quick"], r"has --full, got --quick"),
    (["run", "sync"], r"has claims convergence, got claims sync"),
    (["run", "all"], r"has claims convergence, got claims convergence covariate-shift"),
    (["--devices", "2"], r"has --devices 1, got --devices 2"),
    (["--tensorboard"], r"has no --tensorboard, got --tensorboard"),
    (["--no-checkpoint"], r"has --checkpoint, got no --checkpoint"),
    (["--out", "elsewhere"], r"expected no --out with --resume DIR \(it writes to DIR\), got "
                             r"--out elsewhere --resume "),
])
def test_resume_rejects_other_run_options_in_one_line(argv, pattern, recorded_run, capsys):
    run, calls = recorded_run
    before = (run / "results.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(run), *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1, error
    assert re.search(pattern, error), error
    assert calls == [] and os.listdir(run) == ["results.json"]
    assert (run / "results.json").read_text() == before


def test_resume_rejects_a_directory_without_recorded_options(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"runtime_s": 0}, "claims": {}}))
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path)])
    assert re.search(r"argument --resume: .*/results.json: meta.options: expected the run's "
                     r"options \(an object\), got null", capsys.readouterr().err)


def test_one_parse_gives_the_values_given_wherever_they_stand():
    """What --resume compares with the recorded run: the values the command line gives itself,
    before or after the command, without the defaults; 'all' expanded."""
    from experiments.__main__ import _parse
    from experiments.bench import DEFAULTS
    from experiments.claims import CLAIM_IDS

    _, args, given = _parse(["--seeds", "2", "run", "all", "--full", "--no-progress"])
    assert given == {"seeds": 2, "claims": list(CLAIM_IDS), "full": True, "progress": False}
    assert (args.devices, args.budget, args.checkpoint) == (1, 1.0, None)  # the defaults
    assert _parse([])[2] == {}
    _, args, given = _parse(["--quick", "bench"])  # the suite's --quick is the bench's
    assert given == {"quick": True} and vars(args) == {**DEFAULTS, "quick": True,
                                                       "command": "bench"}

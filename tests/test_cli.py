"""The command line: every option before or after its command, and bad input stopped in one line
before anything trains. Parsing only: nothing here trains (test_experiments.py runs a claim).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import pytest

from experiments.__main__ import COMMANDS, command_parser, main, make_parser, parse_args

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
}
POSITIONALS = {"list": [], "run": ["convergence"], "plot": ["somewhere"], "bench": [],
               "readme": []}


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


# Each bad input: the words, and what its one line must say. {out} is a directory that must
# not appear: nothing may run.
RUN = ["--out", "{out}", "--no-progress"]
BAD_INPUT = [
    (["--seeds", "0", *RUN], r"argument --seeds: expected an integer >= 1, got '0'"),
    (["run", "convergence", "--seeds", "-1", *RUN], r"--seeds: expected an integer >= 1, got '-1'"),
    (["--seeds", "two", *RUN], r"--seeds: expected an integer >= 1, got 'two'"),
    (["--devices", "0", *RUN], r"--devices: expected an integer >= 1, got '0'"),
    (["--budget", "0", *RUN], r"--budget: expected a finite number > 0, got '0'"),
    (["--budget", "-0.5", *RUN], r"--budget: expected a finite number > 0, got '-0.5'"),
    (["--budget", "nan", *RUN], r"--budget: expected a finite number > 0, got 'nan'"),
    (["--dataset", "foo", *RUN], r"--dataset: Expected `dataset` to be one of .*, got 'foo'"),
    (["--dataset", "idx:/nonexistent", *RUN], r"--dataset: Expected train-images-idx3-ubyte .* "
                                        r"in '/nonexistent' .*; found no directory"),
    (["--dataset", "mnist1d:ten", *RUN], r"--dataset: Expected .*'mnist1d:N' with an integer N >= "
                                   r"100 .*, got 'mnist1d:ten'"),
    (["run", "convergence", "nonsense", *RUN], r"expected claims among .*, got nonsense"),
    (["wat"], r"expected a command in .*, got 'wat'"),
    (["--num-processes", "2", *RUN], r"expected --coordinator, --num-processes and --process-id "
                               r"together, got --coordinator None, --num-processes 2"),
    (["--coordinator", "localhost", *RUN], r"--coordinator: expected HOST:PORT, got 'localhost'"),
    ([*DISTRIBUTED[:4], "--process-id", "2", *RUN], r"expected --process-id < --num-processes 2, "
                                              r"got 2"),
    (["--processes", "2", "bench"], r"--processes is not an option before the command"),
    (["--seeds", "2", "list"], r"unrecognized arguments: --seeds 2"),
    (["bench", "--processes", "0"], r"--processes: expected an integer >= 1, got .0."),
    (["plot", "{out}"], r"expected DIR/results.json, got DIR '.*' without one"),
    (["--resume", "{out}"], r"argument --resume: expected a directory with a run to continue "
                            r"\(DIR/results.json written by python -m experiments\), got '.*'"),
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


# ------------------------------------------------------------------ --resume DIR

# The options of the recorded run in every test below (meta.options of its results.json).
RECORDED = {"claims": ["convergence"], "full": True, "seeds": 2, "dataset": "digits",
            "devices": 1, "budget": 0.01, "tensorboard": False, "num_processes": None,
            "checkpoint": True}


def _record_run(run, options: dict) -> None:
    run.mkdir()
    (run / "results.json").write_text(json.dumps(
        {"meta": {"command": "python -m experiments ...", "options": options}, "claims": {}}))


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
    run = tmp_path / "run"
    _record_run(run, RECORDED)
    return run, suite_calls


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
    _record_run(tmp_path / "run", options)
    main(["--resume", str(tmp_path / "run"), "--no-progress"])
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
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "claims": {}}))
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path)])
    assert "expected a directory with a run to continue" in capsys.readouterr().err

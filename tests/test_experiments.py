"""Fast tests of the experiments package: data, models, the training loop, verdicts, report, CLI.

Tiny sizes throughout; conftest.py provides 8 host devices and strict dtype/rank promotion.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data, loop, verdict
from experiments.__main__ import main
from experiments.claims import overhead
from experiments.loop import train_and_evaluate
from experiments.models import BATCH_NORMS, NORMS, make_model
from experiments.train import Config, Trainer

TINY = Config(
    dataset="digits",
    widths=(16, 16),
    activation="relu",
    norm="bn",
    optimizer="sgd",
    learning_rates=(0.1,),
    batch_size=32,
    steps=40,
    eval_every=20,
    seeds=(0, 1),
)


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


# ------------------------------------------------------------------ data


def test_digits_split_and_standardized(digits):
    chex.assert_shape([digits.x_train, digits.x_test], [(1437, 8, 8, 1), (360, 8, 8, 1)])
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    assert abs(float(digits.x_train.mean())) < 1e-4
    assert abs(float(digits.x_train.std()) - 1) < 1e-3
    assert set(np.unique(digits.y_test)) == set(range(10))


def test_digits_read_from_the_file_are_scikit_learn_s_and_need_no_import_of_it(monkeypatch):
    """The digits come from the file scikit-learn ships, without importing it (seconds in
    every process of a run); they are load_digits' images and labels, and where the file is
    not found scikit-learn's loader gives the same dataset."""
    from sklearn.datasets import load_digits

    monkeypatch.delitem(sys.modules, "sklearn")  # importing it again would put it back
    path = data._digits_file()
    assert path is not None and "sklearn" not in sys.modules
    table = np.loadtxt(path, delimiter=",")
    bunch = load_digits()
    np.testing.assert_array_equal(table[:, :-1].reshape(-1, 8, 8), bunch.images)
    np.testing.assert_array_equal(table[:, -1].astype(int), bunch.target)
    from_file = data._digits()
    monkeypatch.setattr(data, "_digits_file", lambda: None)
    from_sklearn = data._digits()
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(from_file, field), getattr(from_sklearn, field))


def test_mnist1d_is_generated_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # get_dataset would leave a pickle here; make_dataset must not
    state = np.random.get_state()
    ds = data.load("mnist1d:200")
    chex.assert_shape([ds.x_train, ds.x_test], [(160, 40, 1), (40, 40, 1)])
    assert ds.num_classes == 10
    assert os.listdir(tmp_path) == []
    assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG left alone


def test_idx_reader_plain_and_gzipped(tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in
              (("train", 30), ("t10k", 10))}
    labels = {s: rng.integers(0, 10, len(images[s]), dtype=np.uint8) for s in images}
    data.write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images["train"])
    data.write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labels["train"])
    data.write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), images["t10k"])
    data.write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), labels["t10k"])
    assert np.array_equal(data.read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")),
                          images["train"])
    ds = data.load(f"idx:{tmp_path}")
    chex.assert_shape([ds.x_train, ds.x_test], [(30, 28, 28, 1), (10, 28, 28, 1)])
    assert np.array_equal(ds.y_test, labels["t10k"].astype(np.int32))
    # standardization is monotone, so the pixel order survives
    assert np.array_equal(np.argsort(ds.x_train[0].ravel(), kind="stable"),
                          np.argsort(images["train"][0].ravel(), kind="stable"))


def test_unknown_dataset_and_bad_train_size():
    with pytest.raises(ValueError, match="Expected `dataset`"):
        data.load("cifar")
    with pytest.raises(ValueError, match="Expected `train_size`"):
        data.load("digits", train_size=10_000)


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind, shape", [("mlp", (4, 8, 8, 1)), ("cnn", (4, 40, 1)),
                                         ("cnn", (4, 8, 8, 1))])
def test_models_build_for_every_norm(kind, shape, norm):
    model = make_model(kind, widths=(8, 8), num_classes=10, norm=norm, placement="after",
                       dropout=0.1)
    x = jnp.ones(shape, jnp.float32)
    variables = model.init({"params": jax.random.key(0)}, x, train=False)
    logits, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)},
                            mutable=["batch_stats"])
    chex.assert_shape(logits, (4, 10))
    assert ("batch_stats" in variables) == (norm in BATCH_NORMS)


def test_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="Expected `norm`"):
        make_model("mlp", widths=(4,), num_classes=2, norm="batch")
    with pytest.raises(ValueError, match="Expected `placement`"):
        make_model("mlp", widths=(4,), num_classes=2, placement="middle")


# ------------------------------------------------------------------ training loop


def test_loss_decreases_and_bn_state_moves_only_in_training(digits):
    trainer = Trainer(dataclasses.replace(TINY, steps=60), digits)
    state = trainer.init()
    stats0 = jax.tree.map(np.asarray, state.batch_stats)
    state, first = trainer.chunk(state, 0, 20)
    _, later = trainer.chunk(jax.tree.map(jnp.copy, state), 40, 20)
    assert np.all(np.asarray(later)[-10:].mean(0) < np.asarray(first)[:10].mean(0))
    moved = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), stats0,
                         state.batch_stats)
    assert all(jax.tree.leaves(moved))
    # evaluation (running statistics) leaves the statistics alone
    one = jax.tree.map(lambda a: a[0], {"params": state.params, "batch_stats": state.batch_stats})
    _, updates = trainer.eval_model.apply(one, jnp.asarray(digits.x_test[:50]), train=False,
                                          mutable=["batch_stats"])
    chex.assert_trees_all_equal(updates["batch_stats"], one["batch_stats"])


def test_a_run_traces_its_compiled_step_and_evaluation_once(monkeypatch, digits):
    # The jitted pieces of the loop: ``_chunk_impl`` (a ``scan`` of training steps) and
    # ``_evaluate_impl``. Three chunks and three evaluations of one shape trace each once: the
    # state a chunk returns has the types of the one it was given, and the step number is an
    # argument, not a constant of the program.
    chex.clear_trace_counter()
    for name in ("_chunk_impl", "_evaluate_impl"):
        monkeypatch.setattr(Trainer, name, chex.assert_max_traces(getattr(Trainer, name), n=1))
    trainers = []
    init = Trainer.init
    monkeypatch.setattr(Trainer, "init", lambda self: trainers.append(self) or init(self))
    result = train_and_evaluate(dataclasses.replace(TINY, steps=60), None, dataset=digits)
    assert result.steps.tolist() == [20, 40, 60]
    # A new chunk length or evaluation option is a new program: its trace is the second, one
    # too many here, which shows that the run's traces were counted.
    (trainer,) = trainers
    state = trainer.init()
    with pytest.raises(AssertionError, match="'_chunk_impl' is traced > 1 times"):
        trainer.chunk(state, 0, 10)
    with pytest.raises(AssertionError, match="'_evaluate_impl' is traced > 1 times"):
        trainer.evaluate(state, probe=True)


def test_train_and_evaluate_writes_plain_files_and_is_deterministic(tmp_path, digits):
    result = train_and_evaluate(TINY, str(tmp_path / "a"), dataset=digits)
    again = train_and_evaluate(TINY, None, dataset=digits)
    np.testing.assert_array_equal(result.metrics["test_accuracy"], again.metrics["test_accuracy"])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["norm"] == "bn" and len(config["runs"]) == 2
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [20, 40]
    assert len(lines[-1]["test_accuracy"]) == 2
    assert result.final("test_accuracy").min() > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_resume_gives_the_same_final_numbers(devices, tmp_path, digits):
    """With 2 devices the checkpoint is restored onto the mesh (issue 16: it sat on device 0
    alone, "Received incompatible devices for jitted computation")."""
    config = dataclasses.replace(TINY, checkpoint_every=20, optimizer="adam",
                                 learning_rates=(1e-2,), dropout=0.1, devices=devices)
    straight = train_and_evaluate(config, str(tmp_path / "straight"), dataset=digits)
    workdir = str(tmp_path / "interrupted")
    train_and_evaluate(config, workdir, dataset=digits, stop_at=20)
    resumed = train_and_evaluate(config, workdir, dataset=digits, resume=True)
    np.testing.assert_array_equal(resumed.steps, straight.steps)
    for name in ("train_loss", "test_accuracy", "test_loss"):
        np.testing.assert_array_equal(resumed.metrics[name], straight.metrics[name])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(x)["step"] for x in f]
    assert steps == [20, 40]
    trainer, checkpoints = Trainer(config, digits), loop.Checkpoints(workdir)
    restored, step = checkpoints.restore_latest(trainer.init())
    checkpoints.close()
    assert step == 40
    assert {leaf.sharding for leaf in jax.tree.leaves(restored)} == {trainer.state_sharding}


def test_a_nan_stops_the_run_and_records_where(digits):
    config = dataclasses.replace(TINY, norm="none", learning_rates=(float("inf"), 0.01),
                                 seeds=(0,), steps=60)
    result = train_and_evaluate(config, None, dataset=digits)
    assert result.diverged_at == [[0, 0], None]  # NaN at step 0, before any logged step
    assert np.isnan(result.metrics["test_accuracy"][:, 0]).all()
    chex.assert_tree_all_finite(result.metrics["test_accuracy"][:, 1])


def test_all_runs_stopped_ends_the_loop_early(digits):
    config = dataclasses.replace(TINY, norm="none", learning_rates=(float("inf"),), steps=100)
    result = train_and_evaluate(config, None, dataset=digits)
    assert result.steps.tolist() == [20]


def test_sharded_synchronized_bn_equals_one_device_on_the_same_batch(digits):
    config = dataclasses.replace(TINY, steps=20, eval_every=10)
    one = Trainer(config, digits)
    eight = Trainer(dataclasses.replace(config, devices=8, sync_bn=True), digits)
    s1, l1 = one.chunk(one.init(), 0, 20)
    s8, l8 = eight.chunk(eight.init(), 0, 20)
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close((s8.params, s8.batch_stats), (s1.params, s1.batch_stats),
                                rtol=1e-4, atol=1e-5)


def test_config_errors_are_explicit(digits):
    with pytest.raises(ValueError, match="multiple of `eval_every`"):
        Trainer(dataclasses.replace(TINY, steps=30), digits)
    with pytest.raises(ValueError, match="divisible by `devices`"):
        Trainer(dataclasses.replace(TINY, devices=3), digits)


def test_tensorboard_without_tensorboardx_says_how_to_install(tmp_path, digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install 'jaxbn\\[tensorboard\\]'"):
        train_and_evaluate(dataclasses.replace(TINY, tensorboard=True), str(tmp_path),
                           dataset=digits)


# ------------------------------------------------------------------ verdict rule


def test_verdict_rule():
    assert verdict.compare([1.0, 1.1, 0.9], [0.0, 0.1, -0.1], higher_is_better=True)[0] == "holds"
    assert verdict.compare([1.0, 1.1, 0.9], [0.0, 0.1, -0.1],
                           higher_is_better=False)[0] == "does not hold"
    assert verdict.compare([1.0, 2.0, 0.0], [0.5, 1.5, 0.2],
                           higher_is_better=True)[0] == "inconclusive"
    assert verdict.compare([1.0], [0.0], higher_is_better=True)[0] == "inconclusive"
    mean, half = verdict.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652729911275 / np.sqrt(3))


# ------------------------------------------------------------------ command line and report


def test_cli_list_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "experiments", "list"], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 12 and lines[0].startswith("convergence")


# Full mode, 2 seeds, 50 steps with an evaluation after each; checkpoints every 5 steps.
FULL_CONVERGENCE = ["--full", "--seeds", "2", "run", "convergence", "--budget", "0.01",
                    "--dataset", "digits", "--no-progress"]


@pytest.fixture(scope="module")
def full_convergence(tmp_path_factory) -> tuple[Path, str]:
    """The directory of one uninterrupted FULL_CONVERGENCE run, and what it printed."""
    out = tmp_path_factory.mktemp("full") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        main([*FULL_CONVERGENCE, "--out", str(out)])
    return out, printed.getvalue()


@pytest.mark.slow
def test_cli_run_writes_report_png_and_results(full_convergence):
    """The issue's example: options before the command reach the run (full mode, 2 seeds)."""
    out, printed = full_convergence
    assert "| convergence |" in printed and "report.md" in printed
    assert {"report.md", "results.json", "convergence.png"} <= set(os.listdir(out))
    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    assert (meta["mode"], meta["seeds"], meta["dataset"]) == ("full", 2, "digits")
    assert meta["command"].startswith("python -m experiments --full --seeds 2 run convergence")
    for key in ("commit", "date", "machine", "devices", "jax_version", "flax_version"):
        assert meta[key], key
    entry = results["claims"]["convergence"]
    assert entry["details"]["budget"] == 50  # full mode: 5000 steps x 0.01
    # These seeds: with BN both runs reach the target within the 50 steps, without BN neither
    # does; two seeds give a t-interval too wide to call it, and the rule says inconclusive.
    assert max(entry["with_bn"]["values"]) < 50 == min(entry["without_bn"]["values"])
    assert entry["verdict"] == "inconclusive", entry["reason"]
    assert entry["verdict"] == verdict.compare(
        entry["with_bn"]["values"], entry["without_bn"]["values"], higher_is_better=False
    )[0]
    for key in ("metric", "rule", "reason", "higher_is_better", "runtime_s", "details"):
        assert key in entry
    for arm in ("with_bn", "without_bn"):
        assert set(entry[arm]) == {"label", "mean", "ci95", "interval", "values"}
        assert len(entry[arm]["values"]) == 2
    assert (out / "convergence" / "bn" / "metrics.jsonl").exists()
    report = (out / "report.md").read_text()
    assert "| claim | verdict |" in report and "![convergence](convergence.png)" in report
    assert (out / "convergence" / "bn" / "checkpoints").is_dir()  # full mode: on by default
    # plots and report are remade from the files alone
    os.remove(out / "convergence.png")
    main(["plot", str(out)])
    assert (out / "convergence.png").exists()


def _without_times(value):
    """``value`` without its wall times (``runtime_s``, ``seconds``), which no rerun repeats."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in ("runtime_s",
                                                                             "seconds")}
    return value


@pytest.mark.slow
def test_an_interrupted_full_run_resumed_gives_the_same_results(full_convergence, tmp_path,
                                                                monkeypatch):
    """Issue 11: a full run interrupted in its second group of runs (at step 27, after the
    checkpoint at 25) and continued with ``--resume DIR`` writes the results.json values of
    the uninterrupted run; the finished group is not trained again, the other from step 25."""
    out = tmp_path / "run"
    real = loop.train_and_evaluate

    def interrupted(config, workdir, **kwargs):
        if config.name == "convergence/bn":
            real(config, workdir, stop_at=27, **kwargs)
            raise KeyboardInterrupt  # as Ctrl-C between two checkpoints
        return real(config, workdir, **kwargs)

    monkeypatch.setattr(loop, "train_and_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*FULL_CONVERGENCE, "--out", str(out)])
    interrupted_run = json.loads((out / "results.json").read_text())
    assert interrupted_run["claims"] == {} and not interrupted_run["meta"]["complete"]

    monkeypatch.setattr(loop, "train_and_evaluate", real)
    trained = collections.Counter()
    chunk = Trainer.chunk

    def counted(self, state, start, length):
        trained[self.config.name] += length
        return chunk(self, state, start, length)

    monkeypatch.setattr(Trainer, "chunk", counted)
    main(["--resume", str(out), "--no-progress"])
    assert trained == {"convergence/bn": 50 - 25}
    resumed = json.loads((out / "results.json").read_text())
    straight = json.loads((full_convergence[0] / "results.json").read_text())
    assert _without_times(resumed["claims"]) == _without_times(straight["claims"])
    assert resumed["meta"]["complete"] and len(resumed["meta"]["resumed"]) == 1
    assert resumed["meta"]["options"] == straight["meta"]["options"]
    lines = (out / "convergence" / "bn" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 51))

    main(["--resume", str(out), "--no-progress"])  # complete: nothing left to train
    assert trained == {"convergence/bn": 50 - 25}
    again = json.loads((out / "results.json").read_text())
    assert again["claims"] == resumed["claims"] and len(again["meta"]["resumed"]) == 2


def test_tensorboard_event_files_when_tensorboardx_is_installed(tmp_path, digits):
    pytest.importorskip("tensorboardX")
    train_and_evaluate(dataclasses.replace(TINY, tensorboard=True), str(tmp_path), dataset=digits)
    for run in ("run_0", "run_1"):
        files = os.listdir(tmp_path / "tensorboard" / run)
        assert any(f.startswith("events.out.tfevents") for f in files)


@pytest.mark.slow
def test_overhead_times_no_norm_jaxbn_and_flax_in_one_run(tmp_path, monkeypatch):
    monkeypatch.setattr(overhead, "CHUNK", 2)
    monkeypatch.setattr(overhead, "MODELS", {"mlp": "MLP"})
    out = tmp_path / "run"
    main(["run", "overhead", "--dataset", "digits", "--out", str(out), "--no-progress"])
    entry = json.loads((out / "results.json").read_text())["claims"]["overhead"]
    seconds = {arm: np.array(s) for arm, s in entry["details"]["seconds_per_step"].items()}
    assert set(seconds) == {"mlp-none", "mlp-bn", "mlp-flax-bn"}
    ratios = entry["details"]["ratios"]["mlp"]
    assert set(ratios) == {"bn/none", "flax-bn/none", "bn/flax-bn"}
    np.testing.assert_allclose(ratios["bn/flax-bn"]["values"],
                               seconds["mlp-bn"] / seconds["mlp-flax-bn"])
    for ratio in ratios.values():
        assert len(ratio["values"]) == 7  # one per round, quick mode
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert entry["verdict"] == verdict.compare(seconds["mlp-bn"], seconds["mlp-none"],
                                               higher_is_better=True)[0]
    report = (out / "report.md").read_text()
    assert ("| model | no norm ms | jaxbn ms | flax ms | jaxbn / no norm | flax / no norm | "
            "jaxbn / flax |") in report
    assert "| MLP | " in report


def test_every_claim_is_a_claim_record_under_its_own_id():
    from experiments.claims import CLAIM_IDS, Claim, load_claim

    claims = [load_claim(claim_id) for claim_id in CLAIM_IDS]
    assert all(isinstance(claim, Claim) for claim in claims)
    assert [claim.id for claim in claims] == list(CLAIM_IDS)
    assert all(claim.title and claim.sources and claim.how for claim in claims)
    with_tables = {claim.id for claim in claims if claim.report_table is not None}
    assert with_tables == {"batch-size", "recalibration", "overhead"}

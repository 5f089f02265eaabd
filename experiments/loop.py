"""The loop: ``train_and_evaluate(config, workdir)`` with its logging and checkpoints.

It trains every run of a :class:`~experiments.train.Config` with one
:class:`~experiments.train.Trainer`, ``eval_every`` steps (one compiled chunk) at a time,
evaluates after each chunk and writes, to ``workdir``:

- ``config.json``: the config, its runs, the dataset's sizes and the jax version;
- ``metrics.jsonl``: one line per evaluation, with per-run lists (NaN after a run stopped);
- ``checkpoints/``: the latest orbax checkpoint of the training state, every
  ``checkpoint_every`` steps and at the end (when it is > 0);
- ``tensorboard/run_<i>/``: TensorBoard event files, with ``tensorboard=True``.

``resume=True`` continues from the latest checkpoint: ``metrics.jsonl`` keeps its lines up
to that step and the final numbers equal an uninterrupted run's; a finished run restores its
last checkpoint and trains no further. A run whose loss or parameters stop being finite is
stopped (see :mod:`experiments.train`) and the step range where the NaN appeared is recorded
(``Result.diverged_at``); when every run has stopped the loop ends.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from . import data as data_lib
from .probes import Probes
from .train import Config, Trainer, TrainState

__all__ = ["Checkpoints", "MetricsLog", "Result", "train_and_evaluate"]

_BOOKKEEPING = ("step", "seconds", "alive", "nan_step")  # record fields that are not metrics


@dataclass
class Result:
    """What a group of runs produced; per-run arrays follow ``config.runs()``."""

    config: Config
    steps: np.ndarray  # (T,) the logged steps
    metrics: dict[str, np.ndarray]  # name -> (T, R, ...) NaN after a run stopped
    diverged_at: list[list[int] | None]  # per run: [last finite logged step, NaN step]
    seconds: float  # wall time, compilation included (a resumed run: all its sessions')
    step_seconds: float  # median seconds per step after this session's first chunk (no
    # compilation); NaN when this session trained none
    grad_norms_at_init: np.ndarray | None = None  # (R, layers)

    def final(self, name: str) -> np.ndarray:
        """The last logged value of ``name`` for every run (NaN for a stopped run)."""
        return self.metrics[name][-1]


def _summary_writer() -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "`--tensorboard` needs tensorboardX, which is not installed. Install it "
            "with `pip install 'jaxbn[tensorboard]'` (or `pip install tensorboardX`), "
            "or leave out `--tensorboard`: metrics.jsonl has the same scalars."
        ) from error
    return SummaryWriter


class MetricsLog:
    """``metrics.jsonl`` (and optionally TensorBoard) of one group of runs.

    Opening it keeps only the lines up to ``keep_until`` (the step a resumed run restarts
    from; 0 starts afresh): ``kept``, which every process reads, and the file, which only a
    writing log rewrites (in one atomic replace, so no reader sees it half written). Without
    a workdir, or with ``writes=False``, it writes nothing.
    """

    def __init__(self, workdir: str | None, num_runs: int, *, tensorboard: bool,
                 keep_until: int = 0, writes: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl") if workdir else None
        self.writes = writes
        self.writers: list[Any] = []
        self.kept = [r for r in self._history() if r["step"] <= keep_until]
        if self.path and writes and os.path.exists(self.path):
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r, allow_nan=True) + "\n" for r in self.kept)
            os.replace(self.path + ".tmp", self.path)
        if tensorboard and workdir and writes:
            writer = _summary_writer()
            self.writers = [
                writer(os.path.join(workdir, "tensorboard", f"run_{i}")) for i in range(num_runs)
            ]

    def _history(self) -> list[dict[str, Any]]:
        """The records written so far."""
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        if self.path and self.writes:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        for i, writer in enumerate(self.writers):
            for name, values in record.items():
                if isinstance(values, list) and np.ndim(values[i]) == 0:
                    writer.add_scalar(name, float(values[i]), record["step"])
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class Checkpoints:
    """The latest orbax checkpoint of a :class:`TrainState` under ``workdir/checkpoints``."""

    def __init__(self, workdir: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
        )

    def restore_latest(self, like: TrainState) -> tuple[TrainState, int]:
        """The latest checkpoint and its step, or ``(like, 0)`` when there is none yet.

        Every array is restored with the shape, dtype and sharding of its counterpart in
        ``like`` (the trainer's freshly initialised state): onto the same device, the same
        mesh, or, with several processes, as the same global array.
        """
        latest = self._manager.latest_step()
        if latest is None:
            return like, 0
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tuple(like)
        )
        restored = self._manager.restore(latest, args=self._ocp.args.StandardRestore(target))
        return TrainState(*restored), int(latest)

    def save(self, step: int, state: TrainState) -> None:
        self._manager.save(step, args=self._ocp.args.StandardSave(tuple(state)))
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _write_config(workdir: str, config: Config, dataset: data_lib.Dataset) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(
            {
                **config.to_json(),
                "runs": config.runs(),
                "dataset_name": dataset.name,
                "train_examples": len(dataset.y_train),
                "test_examples": len(dataset.y_test),
                "jax_version": jax.__version__,
                "platform": jax.devices()[0].platform,
            },
            f,
            indent=2,
        )


def _to_list(array: np.ndarray) -> list[Any]:
    return np.where(np.isfinite(array), array, np.nan).tolist()


def _record(
    step: int, seconds: float, losses: np.ndarray, metrics: dict[str, np.ndarray],
    state: TrainState,
) -> dict[str, Any]:
    """One line of metrics.jsonl: the chunk's mean training loss and the evaluation, per run,
    NaN for a run that has stopped."""
    alive = np.asarray(state.alive)
    record: dict[str, Any] = {
        "step": step,
        "seconds": seconds,
        "train_loss": _to_list(np.where(alive, losses.mean(0), np.nan)),
    }
    for name, values in metrics.items():
        per_run = alive.reshape((-1,) + (1,) * (values.ndim - 1))
        record[name] = _to_list(np.where(per_run, values, np.nan))
    record["alive"] = alive.tolist()
    record["nan_step"] = np.asarray(state.nan_step).tolist()
    return record


def _diverged_at(nan_steps: np.ndarray, steps: np.ndarray) -> list[list[int] | None]:
    """Per run, ``[last logged step before the NaN (0 if none), the NaN's step]`` or None."""
    out: list[list[int] | None] = []
    for nan_step in nan_steps.tolist():
        logged_before = [int(t) for t in steps if t <= nan_step]
        out.append(None if nan_step < 0 else [logged_before[-1] if logged_before else 0,
                                              int(nan_step)])
    return out


def train_and_evaluate(
    config: Config,
    workdir: str | None = None,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    dataset: data_lib.Dataset | None = None,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """Trains every run of ``config`` and evaluates it every ``eval_every`` steps.

    Args:
      config: what to train.
      workdir: where to write ``config.json``, ``metrics.jsonl`` and checkpoints (None:
        nothing is written and ``resume`` is not possible). Only process 0 writes the files.
      resume: continue from the latest checkpoint in ``workdir``, if there is one (needs
        ``checkpoint_every > 0``), restored onto the trainer's devices and shardings. The
        final numbers equal an uninterrupted run's.
      stop_at: stop after this step (to simulate an interruption; checkpoints included).
      dataset: an already loaded dataset (default: load ``config.dataset``).
      progress: called with the number of steps done after each chunk (e.g. a tqdm update).

    Returns:
      A :class:`Result`; the metrics of a run are NaN from the evaluation after the step at
      which it produced a non-finite loss or non-finite parameters.

    Raises:
      ValueError: for a config that cannot be trained, or ``resume`` without checkpoints.
      ImportError: for ``tensorboard=True`` without tensorboardX.
    """
    started = time.perf_counter()
    if resume and not (workdir and config.checkpoint_every > 0):
        raise ValueError("Expected `workdir` and `checkpoint_every > 0` to resume.")
    trainer = Trainer(config, dataset)
    probes = Probes(trainer)
    primary = jax.process_index() == 0  # the one process that writes files
    if workdir and primary:
        _write_config(workdir, config, trainer.dataset)
    state = trainer.init()
    grad_norms = probes.grad_norms(state) if config.grad_norms else None
    checkpoints = Checkpoints(workdir) if workdir and config.checkpoint_every > 0 else None
    step = 0
    if resume and checkpoints is not None:
        state, step = checkpoints.restore_latest(state)
    log = MetricsLog(workdir, trainer.num_runs, tensorboard=config.tensorboard,
                     keep_until=step, writes=primary)
    records = log.kept
    earlier = records[-1]["seconds"] if records else 0.0  # the interrupted sessions' time
    if progress and step:
        progress(step)
    chunk_seconds = []
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    try:
        while step < end and np.any(state.alive):  # a restored run may have stopped
            tic = time.perf_counter()
            state, losses = trainer.chunk(state, step, config.eval_every)
            losses = np.asarray(losses, dtype=np.float64)  # waits for the chunk
            chunk_seconds.append((time.perf_counter() - tic) / config.eval_every)
            step += config.eval_every
            metrics = trainer.evaluate(state, probe=config.probe)
            if config.recalibration_batches:
                metrics.update(probes.evaluate_recalibrated(state))
            seconds = earlier + time.perf_counter() - started
            records.append(_record(step, seconds, losses, metrics, state))
            log.write(records[-1])
            finished = step == config.steps or not np.any(state.alive)
            if checkpoints is not None and (step % config.checkpoint_every == 0 or finished):
                checkpoints.save(step, state)
            if progress:
                progress(config.eval_every)
    finally:
        log.close()
        if checkpoints is not None:
            checkpoints.close()
    steps = np.array([r["step"] for r in records])
    names = [k for k in (records[0] if records else {}) if k not in _BOOKKEEPING]
    later = chunk_seconds[1:] or chunk_seconds
    return Result(
        config=config,
        steps=steps,
        metrics={k: np.array([r[k] for r in records], dtype=np.float64) for k in names},
        diverged_at=_diverged_at(np.asarray(state.nan_step), steps),
        seconds=earlier + time.perf_counter() - started,
        step_seconds=float(np.median(later)) if later else float("nan"),
        grad_norms_at_init=grad_norms,
    )

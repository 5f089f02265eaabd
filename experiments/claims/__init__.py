"""One module per claim; each declares its runs (configs) and how its verdict is decided.

A claim module ends with its :class:`Claim` record, ``CLAIM``, which :func:`load_claim` returns;
the module's docstring gives the command, the runtime on 2 CPU cores and the expected result.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .. import verdict as verdict_lib

__all__ = ["CLAIM_IDS", "Claim", "Context", "Settings", "entry", "load_claim"]

CHECKPOINTS_PER_RUN = 10  # with checkpoints on: about this many per group of runs, + the last

CLAIM_IDS = (
    "convergence",
    "covariate-shift",
    "learning-rate",
    "initialization",
    "regularization",
    "depth",
    "batch-size",
    "recalibration",
    "placement",
    "sync",
    "cnn",
    "overhead",
)


class Claim(NamedTuple):
    """A claim of the seed articles and how it is put to the test."""

    id: str  # as the command line names it, e.g. "batch-size"
    title: str  # the claim in one line
    sources: Sequence[str]  # the seed articles that make it
    how: str  # how it is tested
    # Its runs by arm (Context.check checks them all before anything trains).
    configs: Callable[[Settings], dict[str, Any]]
    # Trains its configs through ctx.train; returns its entry of results.json (see entry).
    run: Callable[[Context], dict[str, Any]]
    # Draws its figure from that entry alone, so `python -m experiments plot DIR` remakes it.
    plot: Callable[[dict[str, Any], Any], None]
    # A markdown table of the entry for report.md (and docs/experiments.md), if the claim has one.
    report_table: Callable[[dict[str, Any]], str] | None = None


def load_claim(claim_id: str) -> Claim:
    """The claim ``claim_id``: the ``CLAIM`` of its module (e.g. ``"batch-size"`` →
    ``experiments.claims.batch_size``)."""
    if claim_id not in CLAIM_IDS:
        raise ValueError(f"Expected a claim in {CLAIM_IDS}, got {claim_id!r}.")
    claim: Claim = importlib.import_module(f"{__name__}.{claim_id.replace('-', '_')}").CLAIM
    return claim


@dataclass(frozen=True)
class Settings:
    """What the command line chose, shared by every claim."""

    quick: bool = True
    seeds: int | None = None  # None: 3 in quick mode, 5 in full mode
    dataset: str | None = None  # None: each claim's default
    tensorboard: bool = False
    budget: float = 1.0  # multiplies every step count (tests use a tiny budget)
    devices: int = 1  # > 1: single-device runs whose batch divides by it go data-parallel
    checkpoint: bool = False  # orbax checkpoints in every run's workdir (--full: on)
    resume: bool = False  # each run continues from its latest checkpoint, if it has one

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(range(self.seeds if self.seeds is not None else (3 if self.quick else 5)))

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    def steps(self, quick: int, full: int, eval_every: int) -> tuple[int, int]:
        """Steps (a multiple of the evaluation interval) and the interval, after ``budget``."""
        steps = self.pick(quick, full)
        interval = max(1, int(eval_every * self.budget)) if self.budget < 1 else eval_every
        steps = max(interval, round(steps * self.budget / interval) * interval)
        return steps, interval

    def default_dataset(self) -> str:
        return self.dataset or self.pick("mnist1d:4000", "mnist1d:10000")


@dataclass
class Context:
    """Runs configs for a claim: workdirs under ``out/<claim>/<arm>``, shared datasets/results."""

    settings: Settings
    out: str
    claim: str = ""
    show_progress: bool = True
    _datasets: dict[tuple[str, int | None], Any] = field(default_factory=dict)
    _results: dict[Any, tuple[Any, str]] = field(default_factory=dict)

    def dataset(self, name: str, train_size: int | None = None):
        from .. import data

        key = (name, train_size)
        if key not in self._datasets:
            self._datasets[key] = data.load(name, train_size=train_size)
        return self._datasets[key]

    def prepare(self, config, *, claim: str, arm: str):
        """``config`` as the command line's settings make it: named ``claim/arm``, with
        TensorBoard if asked, checkpoints at about ``CHECKPOINTS_PER_RUN`` evaluations if
        asked, and data parallel over ``settings.devices`` when the batch divides."""
        config = dataclasses.replace(
            config, name=f"{claim}/{arm}", tensorboard=self.settings.tensorboard
        )
        if self.settings.checkpoint:  # ~0.15 s each on 2 CPU cores, for an MLP 3x100
            evaluations = config.steps // config.eval_every
            every = config.eval_every * max(1, evaluations // CHECKPOINTS_PER_RUN)
            config = dataclasses.replace(config, checkpoint_every=every)
        devices = self.settings.devices
        if devices > 1 and config.devices == 1 and config.batch_size % devices == 0:
            config = dataclasses.replace(config, devices=devices, sync_bn=True)
        return config

    def check(self, claim_ids) -> None:
        """Checks every config of the claims against its dataset before anything trains.

        Raises:
          ValueError: naming the claim and the arm of the first config that cannot be trained.
        """
        from ..train import check_config

        for claim_id in claim_ids:
            for arm, config in load_claim(claim_id).configs(self.settings).items():
                config = self.prepare(config, claim=claim_id, arm=arm)
                try:  # the dataset is loaded here once, for the whole suite
                    check_config(config, self.dataset(config.dataset, config.train_size))
                except ValueError as error:
                    raise ValueError(f"claim {claim_id}, arm {arm}: {error}") from None

    def train(self, config, *, arm: str):
        """Trains ``config`` (once per process: an identical config is reused) in its workdir,
        from its latest checkpoint there with ``settings.resume``."""
        from ..loop import train_and_evaluate

        config = self.prepare(config, claim=self.claim, arm=arm)
        key = dataclasses.replace(config, name="")
        if key in self._results:
            return self._results[key][0]
        workdir = os.path.join(self.out, self.claim, arm)
        dataset = self.dataset(config.dataset, config.train_size)
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, desc=f"{self.claim}/{arm}", leave=False, unit="step")
        try:
            resume = self.settings.resume and config.checkpoint_every > 0
            result = train_and_evaluate(config, workdir, resume=resume, dataset=dataset,
                                        progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        self._results[key] = (result, workdir)
        return result


def finite_or(values: np.ndarray, fallback: float) -> np.ndarray:
    """``values`` with NaN (a stopped run) replaced by ``fallback``."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, fallback)


def entry(
    *,
    claim: Claim,
    metric: str,
    higher_is_better: bool,
    treatment: tuple[str, Any],
    reference: tuple[str, Any],
    details: dict[str, Any],
    notes: str = "",
    claim_direction: str = "",
) -> dict[str, Any]:
    """A claim's entry of results.json, its verdict decided by :func:`verdict.compare`.

    Non-finite numbers (a half-width from one seed, a stopped run) become ``null``: JSON has
    no NaN.
    """
    (t_label, t_values), (r_label, r_values) = treatment, reference
    verdict, reason = verdict_lib.compare(t_values, r_values, higher_is_better=higher_is_better)
    return _jsonable({
        "id": claim.id,
        "claim": claim.title,
        "sources": list(claim.sources),
        "how": claim.how,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "claim_direction": claim_direction
        or f"{t_label} {'higher' if higher_is_better else 'lower'} than {r_label}",
        "with_bn": verdict_lib.summary(t_label, t_values),
        "without_bn": verdict_lib.summary(r_label, r_values),
        "verdict": verdict,
        "rule": verdict_lib.RULE,
        "reason": reason,
        "notes": notes,
        "details": details,
    })


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def timed(function, *args, **kwargs) -> tuple[Any, float]:
    tic = time.perf_counter()
    out = function(*args, **kwargs)
    return out, time.perf_counter() - tic

"""covariate-shift: BN keeps the distribution of a layer's inputs stable (seed 002).

Command: ``python -m experiments run covariate-shift --quick`` (shares its runs with
``convergence``: 11 s alone on a shared 2-core CPU, nothing extra after convergence).

Setup: the paper's Figure 1(b, c): the 15th, 50th and 85th percentiles over the test set of
the input to each sigmoid of the last hidden layer, logged during training of the
``convergence`` MLPs. Metric: the shift, |last − first| logged value of each percentile,
averaged over the 100 units and 3 percentiles. (The path length, the sum of |change| between
evaluations, is reported alongside; it was the first metric tried, and it counts the
evaluation-to-evaluation jitter of BN's running statistics as drift, so it was replaced by the
net shift after the first quick run: see the notes in the report.)

Expected if the claim holds: a much smaller drift with BN.
"""

from __future__ import annotations

import numpy as np

from .. import verdict as verdict_lib
from . import Claim, entry
from .convergence import configs


def shift(percentiles: np.ndarray) -> np.ndarray:
    """(T, R, 3, U) → (R,): |last − first| of each percentile, averaged over percentiles/units."""
    return np.abs(percentiles[-1] - percentiles[0]).mean(axis=(-2, -1))


def path_length(percentiles: np.ndarray) -> np.ndarray:
    """(T, R, 3, U) → (R,): sum over time of |Δ percentile|, averaged over percentiles/units."""
    return np.abs(np.diff(percentiles, axis=0)).sum(0).mean(axis=(-2, -1))


def run(ctx):
    results = {arm: ctx.train(c, arm=arm) for arm, c in configs(ctx.settings).items()}
    pct = {arm: r.metrics["preact_percentiles"] for arm, r in results.items()}
    shifts = {arm: shift(p) for arm, p in pct.items()}
    paths = {arm: path_length(p) for arm, p in pct.items()}
    path_verdict, path_reason = verdict_lib.compare(
        paths["bn"], paths["none"], higher_is_better=False
    )
    return entry(
        claim=CLAIM,
        metric="net shift of the sigmoid-input percentiles over training (lower is more stable)",
        higher_is_better=False,
        treatment=("BN", shifts["bn"]),
        reference=("no BN", shifts["none"]),
        details={
            "steps": results["bn"].steps,
            "unit0_seed0": {arm: p[:, 0, :, 0] for arm, p in pct.items()},  # (T, 3)
            "path_length": paths,
            "path_length_verdict": {"verdict": path_verdict, "reason": path_reason},
            "dataset": results["bn"].config.dataset,
        },
        notes="Same runs as `convergence` (trained once when both claims run). Shifts are in "
        "units of the sigmoid's input; they also grow with how much a network learns, and "
        "without BN this MLP learns slowly at the same learning rate. The path length of the "
        f"percentiles (the metric first used, which counts the jitter of BN's running "
        f"statistics between evaluations): {path_verdict} ({path_reason}).",
    )


def plot(result, fig):
    d = result["details"]
    steps = np.asarray(d["steps"])
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (arm, label) in zip(axes, (("none", "no BN"), ("bn", "BN")), strict=True):
        p = np.asarray(d["unit0_seed0"][arm], dtype=np.float64)
        for i, q in enumerate((15, 50, 85)):
            ax.plot(steps, p[:, i], label=f"{q}th percentile")
        ax.set_title(f"sigmoid input, {label}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("input to one sigmoid (test set)")
    axes[0].legend(fontsize=8)


CLAIM = Claim(
    id="covariate-shift",
    title="BN reduces internal covariate shift: a layer's input distribution stays stable",
    sources=("002",),
    how="Figure 1(b,c) of the paper: 15/50/85th percentiles of the last hidden layer's sigmoid "
        "inputs over training; shift = |last - first|, mean over units and percentiles",
    configs=configs,
    run=run,
    plot=plot,
)

"""covariate-shift: BN keeps the distribution of a layer's inputs stable (seed 002).

Command: ``python -m experiments run covariate-shift --quick`` (shares its runs with
``convergence``: about 1 minute on 2 CPU cores alone, nothing extra after convergence).

Setup: the paper's Figure 1(b, c): the 15th, 50th and 85th percentiles over the test set of
the input to each sigmoid of the last hidden layer, logged during training of the
``convergence`` MLPs. Metric: the drift, the path length of those percentiles over training
(sum over evaluations of |change|), averaged over the 100 units and 3 percentiles.

Expected if the claim holds: a much smaller drift with BN.
"""

from __future__ import annotations

import sys

import numpy as np

from . import entry
from .convergence import configs

ID = "covariate-shift"
CLAIM = "BN reduces internal covariate shift: a layer's input distribution stays stable"
SOURCES = ["002"]
HOW = (
    "Figure 1(b,c) of the paper: 15/50/85th percentiles of the last hidden layer's sigmoid "
    "inputs over training; drift = their path length, mean over units"
)


def drift(percentiles: np.ndarray) -> np.ndarray:
    """(T, R, 3, U) → (R,): sum over time of |Δ percentile|, averaged over percentiles/units."""
    return np.abs(np.diff(percentiles, axis=0)).sum(0).mean(axis=(-2, -1))


def run(ctx):
    results = {arm: ctx.train(c, arm=arm) for arm, c in configs(ctx.settings).items()}
    pct = {arm: r.metrics["preact_percentiles"] for arm, r in results.items()}
    drifts = {arm: drift(p) for arm, p in pct.items()}
    return entry(
        module=sys.modules[__name__],
        metric="drift of the sigmoid-input percentiles over training (lower is more stable)",
        higher_is_better=False,
        treatment=("BN", drifts["bn"]),
        reference=("no BN", drifts["none"]),
        details={
            "steps": results["bn"].steps,
            "unit0_seed0": {arm: p[:, 0, :, 0] for arm, p in pct.items()},  # (T, 3)
            "dataset": results["bn"].config.dataset,
        },
        notes="Runs shared with `convergence` (same configs).",
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

"""convergence: BN trains faster, in fewer epochs (seeds 000, 001, 002, 004).

Command: ``python -m experiments run convergence --quick`` (measured on a shared 2-core
CPU: 15 s; ``--full``, 5 seeds × 5,000 steps on MNIST-1D with 10,000 samples: 63 s).

Setup: Ioffe & Szegedy's MNIST MLP (3×100 sigmoid, SGD lr 0.1, batch 60) with BN before each
sigmoid vs without, same seeds, same data order, same initial weights. Metric: steps until
the test accuracy (running statistics) first reaches a target, the target being 90% of the
better arm's final mean test accuracy; a run that never reaches it counts at the budget.

Expected if the claim holds: BN reaches the target in clearly fewer steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import Claim, entry
from ._common import ioffe, plot_accuracy_curves, steps_to_target


def configs(settings):
    base = dataclasses.replace(ioffe(settings), probe=True)  # shared with covariate-shift
    return {"none": base, "bn": dataclasses.replace(base, norm="bn")}


def run(ctx):
    results = {arm: ctx.train(c, arm=arm) for arm, c in configs(ctx.settings).items()}
    steps = results["bn"].steps
    acc = {arm: r.metrics["test_accuracy"] for arm, r in results.items()}
    finals = {arm: float(np.nanmean(a[-1])) for arm, a in acc.items()}
    target = 0.9 * max(finals.values())
    to_target = {arm: steps_to_target(steps, a, target) for arm, a in acc.items()}
    return entry(
        claim=CLAIM,
        metric="steps to reach the target test accuracy (lower is better)",
        higher_is_better=False,
        treatment=("BN", to_target["bn"]),
        reference=("no BN", to_target["none"]),
        details={
            "steps": steps,
            "target": target,
            "test_accuracy": acc,
            "final_test_accuracy": {arm: a[-1] for arm, a in acc.items()},
            "budget": int(steps[-1]),
            "dataset": results["bn"].config.dataset,
            "seconds": {arm: r.seconds for arm, r in results.items()},
        },
        notes="A run that never reaches the target is counted at the budget.",
    )


def plot(result, fig):
    plot_accuracy_curves(result, fig, {"none": "no BN", "bn": "BN"}, "convergence")


CLAIM = Claim(
    id="convergence",
    title="BN trains faster: fewer steps to reach a given accuracy",
    sources=("000", "001", "002", "004"),
    how="Ioffe & Szegedy's MLP (3x100 sigmoid, SGD lr 0.1, batch 60) with/without BN; steps to "
        "reach 90% of the better arm's final test accuracy",
    configs=configs,
    run=run,
    plot=plot,
)

"""learning-rate: BN allows higher learning rates (seeds 000, 002).

Command: ``python -m experiments run learning-rate --quick`` (measured on a shared 2-core
CPU: 35-45 s quick, 132 s ``--full``).

Setup: MLP 3×100 ReLU, plain SGD, batch 60, learning rate swept in half decades (quick: 7
values 0.01–10; full: 10 values 0.001–30), with and without BN before each ReLU; every
learning rate and seed trained at once. A run whose loss or parameters become non-finite is
stopped and counts as chance accuracy. Metric, per seed: log10 of the largest learning rate
whose final test accuracy reaches 90% of the best mean accuracy seen anywhere in the sweep;
if none does, one decade below the grid.

Expected if the claim holds: a larger usable learning rate with BN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import Claim, entry
from ._common import final_by_sweep, generic, plot_sweep


def configs(settings):
    lrs = settings.pick(
        (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
        (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
    )
    base = dataclasses.replace(generic(settings), optimizer="sgd", learning_rates=lrs)
    return {"none": base, "bn": dataclasses.replace(base, norm="bn")}


def run(ctx):
    cfgs = configs(ctx.settings)
    results = {arm: ctx.train(c, arm=arm) for arm, c in cfgs.items()}
    lrs = np.array(cfgs["bn"].learning_rates)
    chance = 1.0 / ctx.dataset(cfgs["bn"].dataset).num_classes
    final, diverged = final_by_sweep(results, len(lrs), chance)  # (lrs, seeds)
    target = 0.9 * max(float(f.mean(1).max()) for f in final.values())
    usable = {}
    for arm, f in final.items():
        ok = f >= target  # (lrs, seeds)
        largest = np.where(ok, np.log10(lrs)[:, None], -np.inf).max(0)
        usable[arm] = np.where(np.isfinite(largest), largest, np.log10(lrs[0]) - 1)
    return entry(
        claim=CLAIM,
        metric="log10 of the largest learning rate reaching the target accuracy (higher is better)",
        higher_is_better=True,
        treatment=("BN", usable["bn"]),
        reference=("no BN", usable["none"]),
        details={
            "learning_rates": lrs,
            "final_test_accuracy": final,
            "diverged": diverged,
            "target": target,
            "dataset": cfgs["bn"].dataset,
        },
    )


def plot(result, fig):
    plot_sweep(result, fig, "learning_rates", "learning rate (SGD)", "learning-rate sweep")


CLAIM = Claim(
    id="learning-rate",
    title="BN allows higher learning rates",
    sources=("000", "002"),
    how="MLP 3x100 ReLU, SGD, lr swept over >= 3 decades with/without BN; largest lr reaching "
        "90% of the best accuracy in the sweep (diverged = chance)",
    configs=configs,
    run=run,
    plot=plot,
)

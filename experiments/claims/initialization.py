"""initialization: BN reduces the dependence on initialization (seeds 000, 002).

Command: ``python -m experiments run initialization --quick`` (measured on a shared 2-core
CPU: 46 s quick, 75 s ``--full``).

Setup: MLP 3×100 ReLU, SGD lr 0.1, batch 60; every initial kernel (LeCun normal) multiplied
by a scale swept over 3 decades (quick: 0.01–10; full: 7 values), with and without BN. A
stopped (non-finite) run counts as chance. Metric, per seed: the spread (max − min) of the
final test accuracy across the init scales.

Expected if the claim holds: a much smaller spread with BN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import Claim, entry
from ._common import final_by_sweep, generic, plot_sweep


def configs(settings):
    scales = settings.pick((0.01, 0.1, 1.0, 10.0), (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0))
    base = dataclasses.replace(
        generic(settings), optimizer="sgd", learning_rates=(0.1,), init_scales=scales
    )
    return {"none": base, "bn": dataclasses.replace(base, norm="bn")}


def run(ctx):
    cfgs = configs(ctx.settings)
    results = {arm: ctx.train(c, arm=arm) for arm, c in cfgs.items()}
    scales = np.array(cfgs["bn"].init_scales)
    chance = 1.0 / ctx.dataset(cfgs["bn"].dataset).num_classes
    final, diverged = final_by_sweep(results, len(scales), chance)
    spread = {arm: f.max(0) - f.min(0) for arm, f in final.items()}
    return entry(
        claim=CLAIM,
        metric="spread of final test accuracy across init scales (lower is better)",
        higher_is_better=False,
        treatment=("BN", spread["bn"]),
        reference=("no BN", spread["none"]),
        details={
            "init_scales": scales,
            "final_test_accuracy": final,
            "diverged": diverged,
            "dataset": cfgs["bn"].dataset,
        },
    )


def plot(result, fig):
    plot_sweep(result, fig, "init_scales", "init scale (x LeCun normal)", "initialization sweep")


CLAIM = Claim(
    id="initialization",
    title="BN reduces the dependence on weight initialization",
    sources=("000", "002"),
    how="MLP 3x100 ReLU, SGD lr 0.1; initial kernels scaled over 3 decades with/without BN; "
        "spread (max - min) of final test accuracy across scales",
    configs=configs,
    run=run,
    plot=plot,
)

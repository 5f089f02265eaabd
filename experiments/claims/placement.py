"""placement: BN after the activation vs before it (seed 004; the paper puts it before).

Command: ``python -m experiments run placement --quick`` (measured on a shared 2-core CPU:
19 s quick, 27 s ``--full``).

Setup: MLP 3×100 ReLU, Adam 1e-3, batch 60, BN either before each ReLU (Ioffe & Szegedy) or
after it (seed 004's tip), same budget and seeds. Metric: final test accuracy.

Expected if seed 004's tip holds: a higher accuracy with BN after the activation.
"""

from __future__ import annotations

import dataclasses

from . import Claim, entry
from ._common import generic, plot_accuracy_curves


def configs(settings):
    base = dataclasses.replace(generic(settings, quick_steps=1000, full_steps=4000), norm="bn")
    return {
        "before": base,
        "after": dataclasses.replace(base, placement="after"),
    }


def run(ctx):
    results = {arm: ctx.train(c, arm=arm) for arm, c in configs(ctx.settings).items()}
    return entry(
        claim=CLAIM,
        metric="final test accuracy (higher is better)",
        higher_is_better=True,
        treatment=("BN after activation", results["after"].final("test_accuracy")),
        reference=("BN before activation", results["before"].final("test_accuracy")),
        details={
            "steps": results["after"].steps,
            "test_accuracy": {arm: r.metrics["test_accuracy"] for arm, r in results.items()},
            "dataset": results["after"].config.dataset,
        },
        notes="Both arms use BN: 'with_bn' is the tip's placement (after), "
        "'without_bn' the paper's (before).",
    )


def plot(result, fig):
    plot_accuracy_curves(
        result, fig, {"before": "BN before ReLU", "after": "BN after ReLU"}, "placement"
    )


CLAIM = Claim(
    id="placement",
    title="BN works better after the activation than before it (seed 004's tip)",
    sources=("004",),
    how="MLP 3x100 ReLU, Adam: BN before vs after each ReLU, same budget; final test accuracy",
    configs=configs,
    run=run,
    plot=plot,
)

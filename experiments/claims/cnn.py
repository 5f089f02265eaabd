"""cnn: BN after conv layers gives higher accuracy in fewer epochs (seeds 000, 003, 004).

Command: ``python -m experiments run cnn --quick`` (measured on a shared 2-core CPU: 57 s
quick, 820 s ``--full`` under heavy load).

Setup: a small CNN (quick: 2 conv layers of 32 channels; full: 32, 64, 64; kernel 3, average
pooling, global average pooling, linear classifier) on MNIST-1D as 1-D signals (or digits as
8×8 images with ``--dataset digits``), ReLU, Adam 1e-3, batch 60, with and without BN after
each convolution. Metric: final test accuracy; the steps to reach 90% of the better arm's
final accuracy are reported alongside.

Expected if the claim holds: a higher final accuracy with BN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import verdict as verdict_lib
from . import Claim, entry
from ._common import generic, plot_accuracy_curves, steps_to_target


def configs(settings):
    base = dataclasses.replace(
        generic(settings),
        model="cnn",
        widths=settings.pick((32, 32), (32, 64, 64)),
    )
    return {"none": base, "bn": dataclasses.replace(base, norm="bn")}


def run(ctx):
    results = {arm: ctx.train(c, arm=arm) for arm, c in configs(ctx.settings).items()}
    steps = results["bn"].steps
    acc = {arm: r.metrics["test_accuracy"] for arm, r in results.items()}
    target = 0.9 * max(float(np.nanmean(a[-1])) for a in acc.values())
    to_target = {arm: steps_to_target(steps, a, target) for arm, a in acc.items()}
    speed_verdict, speed_reason = verdict_lib.compare(
        to_target["bn"], to_target["none"], higher_is_better=False
    )
    return entry(
        claim=CLAIM,
        metric="final test accuracy (higher is better)",
        higher_is_better=True,
        treatment=("CNN with BN", acc["bn"][-1]),
        reference=("CNN without BN", acc["none"][-1]),
        details={
            "steps": steps,
            "test_accuracy": acc,
            "target": target,
            "steps_to_target": to_target,
            "fewer_steps": {"verdict": speed_verdict, "reason": speed_reason},
            "dataset": results["bn"].config.dataset,
        },
        notes=f"Fewer steps to 90% of the best final accuracy with BN: {speed_verdict} "
        f"({speed_reason}).",
    )


def plot(result, fig):
    plot_accuracy_curves(result, fig, {"none": "CNN, no BN", "bn": "CNN + BN"}, "cnn")


CLAIM = Claim(
    id="cnn",
    title="BN in convolutional networks gives higher accuracy in fewer epochs",
    sources=("000", "003", "004"),
    how="small CNN (1-D conv on MNIST-1D), Adam, with/without BN after each conv; final test "
    "accuracy",
    configs=configs,
    run=run,
    plot=plot,
)

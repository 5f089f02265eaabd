"""regularization: BN regularizes and may replace dropout (seeds 000, 002, 004).

Command: ``python -m experiments run regularization --quick`` (measured on a shared 2-core
CPU: 31 s quick, 89 s ``--full``).

Setup: MLP 3×100 ReLU, Adam 1e-3, batch 50, on a small training set (500 examples) so the
network overfits; four arms: none, dropout 0.5, BN, BN + dropout 0.5. Metric: the
generalization gap, train accuracy − test accuracy (both with running statistics) at the end.
The verdict compares BN with none; BN vs dropout test accuracy is reported alongside.

Expected if the claim holds: a smaller gap with BN than without.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import verdict as verdict_lib
from . import Claim, entry
from ._common import generic

ARMS = {"none": "no norm", "dropout": "dropout", "bn": "BN", "bn+dropout": "BN + dropout"}


def configs(settings):
    base = dataclasses.replace(
        generic(settings, quick_steps=1000, full_steps=4000), train_size=500, batch_size=50
    )
    return {
        "none": base,
        "dropout": dataclasses.replace(base, dropout=0.5),
        "bn": dataclasses.replace(base, norm="bn"),
        "bn+dropout": dataclasses.replace(base, norm="bn", dropout=0.5),
    }


def run(ctx):
    results = {arm: ctx.train(c, arm=arm) for arm, c in configs(ctx.settings).items()}
    test = {arm: r.final("test_accuracy") for arm, r in results.items()}
    train = {arm: r.final("train_accuracy") for arm, r in results.items()}
    gap = {arm: train[arm] - test[arm] for arm in results}
    replace_verdict, replace_reason = verdict_lib.compare(
        test["bn"], test["dropout"], higher_is_better=True
    )
    return entry(
        claim=CLAIM,
        metric="train accuracy - test accuracy at the end (lower is better)",
        higher_is_better=False,
        treatment=("BN", gap["bn"]),
        reference=("no BN", gap["none"]),
        details={
            "arms": ARMS,
            "gap": gap,
            "test_accuracy": test,
            "train_accuracy": train,
            "steps": results["bn"].steps,
            "test_curves": {arm: r.metrics["test_accuracy"] for arm, r in results.items()},
            "train_curves": {arm: r.metrics["train_accuracy"] for arm, r in results.items()},
            "bn_vs_dropout_test_accuracy": {"verdict": replace_verdict, "reason": replace_reason},
            "dataset": results["bn"].config.dataset + "[:500]",
        },
        notes=f"'BN may replace dropout' (BN test accuracy higher than dropout's): "
        f"{replace_verdict} ({replace_reason}).",
    )


def plot(result, fig):
    d = result["details"]
    ax1, ax2 = fig.subplots(1, 2)
    steps = np.asarray(d["steps"])
    for arm, label in d["arms"].items():
        tr = np.asarray(d["train_curves"][arm], dtype=np.float64).mean(1)
        te = np.asarray(d["test_curves"][arm], dtype=np.float64).mean(1)
        (line,) = ax1.plot(steps, te, label=f"{label} test")
        ax1.plot(steps, tr, linestyle="--", color=line.get_color())
    ax1.set_xlabel("step")
    ax1.set_ylabel("accuracy (solid test, dashed train)")
    ax1.legend(fontsize=7)
    labels = list(d["arms"].values())
    gaps = [np.asarray(d["gap"][arm], dtype=np.float64) for arm in d["arms"]]
    ax2.boxplot(gaps, showmeans=True)
    ax2.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax2.set_ylabel("train - test accuracy")
    ax2.set_title(f"gap ({d['dataset']})")


CLAIM = Claim(
    id="regularization",
    title="BN has a regularizing effect (smaller train/test gap) and may replace dropout",
    sources=("000", "002", "004"),
    how="MLP 3x100 ReLU, Adam, 500 training examples: none / dropout 0.5 / BN / BN+dropout; "
        "train - test accuracy gap at the end",
    configs=configs,
    run=run,
    plot=plot,
)

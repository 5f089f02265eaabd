"""batch-size: BN is sensitive to small batches (seeds 000, 003).

Command: ``python -m experiments run batch-size --quick`` (measured on a shared 2-core CPU:
65-200 s quick, 214 s ``--full``).

Setup: MLP 3×100 ReLU, Adam 1e-3, a fixed number of steps, batch sizes from 2 to 128 (quick:
2, 16, 128; full: 2, 4, 8, 16, 32, 64, 128, 256), with no norm, BN, LayerNorm and
GroupNorm. Metric, per seed: the degradation, final test accuracy at the largest batch minus
at the smallest. The verdict compares BN's degradation with no-norm's; LayerNorm and
GroupNorm (which do not use batch statistics) are shown for comparison.

Expected if the claim holds: BN loses clearly more accuracy at small batches than no norm.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from . import entry, finite_or
from ._common import errorbar, generic

ID = "batch-size"
CLAIM = "BN is sensitive to the batch size: it degrades with small batches"
SOURCES = ["000", "003"]
HOW = (
    "MLP 3x100 ReLU, Adam, fixed steps, batch 2 to 128/256: none / BN / LayerNorm / "
    "GroupNorm; accuracy(largest batch) - accuracy(smallest batch)"
)
NORMS = {"none": "no norm", "bn": "BN", "layer": "LayerNorm", "group": "GroupNorm"}


def configs(settings):
    sizes = settings.pick((2, 16, 128), (2, 4, 8, 16, 32, 64, 128, 256))
    base = generic(settings)
    return {
        f"{norm}-batch{b}": dataclasses.replace(base, norm=norm, batch_size=b)
        for b in sizes
        for norm in NORMS
    }, sizes


def run(ctx):
    cfgs, sizes = configs(ctx.settings)
    results = {arm: ctx.train(c, arm=arm) for arm, c in cfgs.items()}
    chance = 1.0 / ctx.dataset(next(iter(cfgs.values())).dataset).num_classes
    acc = {
        norm: np.stack(
            [finite_or(results[f"{norm}-batch{b}"].final("test_accuracy"), chance) for b in sizes]
        )
        for norm in NORMS
    }  # (sizes, seeds)
    degradation = {norm: a[-1] - a[0] for norm, a in acc.items()}
    return entry(
        module=sys.modules[__name__],
        metric=(
            f"test accuracy at batch {sizes[-1]} minus at batch {sizes[0]} "
            "(higher = more sensitive, as claimed for BN)"
        ),
        higher_is_better=True,
        treatment=("BN", degradation["bn"]),
        reference=("no norm", degradation["none"]),
        details={
            "batch_sizes": sizes,
            "norms": NORMS,
            "final_test_accuracy": acc,
            "degradation": degradation,
            "dataset": next(iter(cfgs.values())).dataset,
        },
        claim_direction="BN degrades more than no norm from the largest to the smallest batch",
    )


def plot(result, fig):
    d = result["details"]
    ax = fig.add_subplot(1, 1, 1)
    sizes = np.asarray(d["batch_sizes"])
    for norm, label in d["norms"].items():
        f = np.asarray(d["final_test_accuracy"][norm], dtype=np.float64)
        errorbar(ax, sizes, f, label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (same number of steps)")
    ax.set_ylabel("final test accuracy")
    ax.legend(fontsize=8)
    ax.set_title(f"batch size ({d['dataset']})")

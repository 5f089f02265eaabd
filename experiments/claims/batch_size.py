"""batch-size: BN is sensitive to small batches (seeds 000, 003).

Command: ``python -m experiments run batch-size --quick`` (measured on a shared 2-core CPU:
140 s quick with the six norms; ``--full`` not re-measured since renorm and ghost were added,
214 s before with four norms).

Setup: MLP 3×100 ReLU, Adam 1e-3, a fixed number of steps, batch sizes from 2 to 128 (quick:
2, 4, 8, 32, 128; full: 2, 4, 8, 16, 32, 64, 128, 256), with no norm, BN, LayerNorm,
GroupNorm, and two BN variants meant for small batches: Batch Renormalization (``renorm``,
r_max 3, d_max 5) and ghost batches (``ghost``, groups of the largest divisor of the batch
that is <= 8; see experiments/models.py). Metric, per seed: the degradation, final test
accuracy at the largest batch minus at the smallest. The verdict compares BN's degradation
with no-norm's; the other norms are extra arms: their accuracies per batch size (the table
``accuracy_table`` in results.json and report.md, mean over seeds at every batch size, with
batches 2, 4, 8 and 32 always included) and their degradations, not extra verdicts. At a
batch whose ghost size is the batch itself (2, 4, 8 here) ``ghost`` *is* BN and the BN runs
are reused (``ghost_is_bn_at`` in results.json).

Expected if the claim holds: BN loses clearly more accuracy at small batches than no norm;
LayerNorm and GroupNorm, which use no batch statistics, should not; renorm should lose less
than BN if its correction toward the running statistics helps at this scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..models import ghost_size
from . import Claim, entry, finite_or
from ._common import errorbar, generic

NORMS = {
    "none": "no norm",
    "bn": "BN",
    "renorm": "BatchRenorm",
    "ghost": "ghost BN",
    "layer": "LayerNorm",
    "group": "GroupNorm",
}
TABLE_SIZES = (2, 4, 8, 32)  # the batch sizes issue 5 asks the table for


def size_sweep(settings):
    """The batch sizes, smallest first."""
    return settings.pick((2, 4, 8, 32, 128), (2, 4, 8, 16, 32, 64, 128, 256))


def configs(settings):
    """The runs; ghost runs only where the ghost size is not the batch."""
    base = generic(settings)
    return {
        f"{norm}-batch{b}": dataclasses.replace(base, norm=norm, batch_size=b)
        for b in size_sweep(settings)
        for norm in NORMS
        if not (norm == "ghost" and ghost_size(b) == b)
    }


def run(ctx):
    cfgs, sizes = configs(ctx.settings), size_sweep(ctx.settings)
    results = {arm: ctx.train(c, arm=arm) for arm, c in cfgs.items()}
    ghost_is_bn_at = [b for b in sizes if f"ghost-batch{b}" not in cfgs]
    for b in ghost_is_bn_at:
        results[f"ghost-batch{b}"] = results[f"bn-batch{b}"]
    chance = 1.0 / ctx.dataset(next(iter(cfgs.values())).dataset).num_classes
    acc = {
        norm: np.stack(
            [finite_or(results[f"{norm}-batch{b}"].final("test_accuracy"), chance) for b in sizes]
        )
        for norm in NORMS
    }  # (sizes, seeds)
    degradation = {norm: a[-1] - a[0] for norm, a in acc.items()}
    table = {
        NORMS[norm]: {str(b): float(a[i].mean()) for i, b in enumerate(sizes)}
        for norm, a in acc.items()
    }
    return entry(
        claim=CLAIM,
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
            "accuracy_table": table,
            "table_batch_sizes": [b for b in sizes if b in TABLE_SIZES],
            "ghost_batch_sizes": {str(b): ghost_size(b) for b in sizes},
            "ghost_is_bn_at": ghost_is_bn_at,
            "dataset": next(iter(cfgs.values())).dataset,
        },
        notes=(
            "extra arms (numbers only, no verdict): BatchRenorm, ghost BN, LayerNorm, "
            "GroupNorm; ghost BN is BN at batch "
            + ", ".join(map(str, ghost_is_bn_at))
            + " (ghost size = batch)"
        ),
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


def report_table(result) -> str:
    """Mean final test accuracy per norm (rows) and batch size (columns), as markdown."""
    d = result["details"]
    sizes = [str(b) for b in d["batch_sizes"]]
    table = d["accuracy_table"]
    degradation = d["degradation"]
    lines = [
        "Mean final test accuracy over seeds (same number of steps at every batch size); "
        f"last column: degradation, accuracy at batch {sizes[-1]} minus at batch {sizes[0]}:",
        "",
        "| norm | " + " | ".join(f"batch {b}" for b in sizes) + " | degradation |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for norm, label in d["norms"].items():
        cells = " | ".join(f"{table[label][b]:.3f}" for b in sizes)
        lines.append(f"| {label} | {cells} | {np.mean(degradation[norm]):+.3f} |")
    return "\n".join(lines)


CLAIM = Claim(
    id="batch-size",
    title="BN is sensitive to the batch size: it degrades with small batches",
    sources=("000", "003"),
    how="MLP 3x100 ReLU, Adam, fixed steps, batch 2 to 128/256: none / BN / BatchRenorm / "
        "ghost BN / LayerNorm / GroupNorm; accuracy(largest batch) - accuracy(smallest batch), "
        "BN vs none",
    configs=configs,
    run=run,
    plot=plot,
    report_table=report_table,
)

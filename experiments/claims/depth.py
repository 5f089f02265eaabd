"""depth: BN helps gradients propagate so deeper networks train (seeds 000, 001, 002).

Command: ``python -m experiments run depth --quick`` (measured on a shared 2-core CPU: 41-105 s
quick, 199 s ``--full``).

Setup: MLPs of width 64, ReLU, LeCun-normal init, SGD with momentum 0.9, lr 0.01, batch 60,
with depth swept (quick: 2, 8, 20 hidden layers; full: 2, 5, 10, 20, 35, 50), with and
without BN before each ReLU. Recorded: final test accuracy per depth and each layer's kernel
gradient norm at initialization. Metric: final test accuracy at the deepest depth.

Expected if the claim holds: BN's deep network trains to a clearly higher accuracy, and its
gradient norms vary less across layers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import Claim, entry, finite_or
from ._common import errorbar, generic


def depth_sweep(settings):
    """The depths, shallowest first."""
    return settings.pick((2, 8, 20), (2, 5, 10, 20, 35, 50))


def configs(settings):
    base = dataclasses.replace(
        generic(settings), optimizer="momentum", learning_rates=(0.01,), grad_norms=True
    )
    return {
        f"{norm}-depth{d}": dataclasses.replace(base, widths=(64,) * d, norm=norm)
        for d in depth_sweep(settings)
        for norm in ("none", "bn")
    }


def run(ctx):
    cfgs, depths = configs(ctx.settings), depth_sweep(ctx.settings)
    results = {arm: ctx.train(c, arm=arm) for arm, c in cfgs.items()}
    chance = 1.0 / ctx.dataset(next(iter(cfgs.values())).dataset).num_classes
    acc = {
        norm: np.stack(
            [finite_or(results[f"{norm}-depth{d}"].final("test_accuracy"), chance) for d in depths]
        )
        for norm in ("none", "bn")
    }  # (depths, seeds)
    grads = {
        norm: np.nanmean(results[f"{norm}-depth{depths[-1]}"].grad_norms_at_init, 0)
        for norm in ("none", "bn")
    }
    return entry(
        claim=CLAIM,
        metric=f"final test accuracy at depth {depths[-1]} (higher is better)",
        higher_is_better=True,
        treatment=("BN", acc["bn"][-1]),
        reference=("no BN", acc["none"][-1]),
        details={
            "depths": depths,
            "final_test_accuracy": acc,
            "grad_norms_at_init_deepest": grads,
            "grad_norm_ratio_first_to_last_hidden": {
                norm: float(g[0] / g[-2]) for norm, g in grads.items()
            },
            "dataset": next(iter(cfgs.values())).dataset,
        },
        notes="Stopped (non-finite) runs count as chance accuracy.",
    )


def plot(result, fig):
    d = result["details"]
    ax1, ax2 = fig.subplots(1, 2)
    depths = np.asarray(d["depths"])
    for norm, label in (("none", "no BN"), ("bn", "BN")):
        f = np.asarray(d["final_test_accuracy"][norm], dtype=np.float64)
        errorbar(ax1, depths, f, label)
        g = np.asarray(d["grad_norms_at_init_deepest"][norm], dtype=np.float64)
        ax2.semilogy(np.arange(1, len(g) + 1), g, marker=".", label=label)
    ax1.set_xlabel("hidden layers")
    ax1.set_ylabel("final test accuracy")
    ax1.legend(fontsize=8)
    ax2.set_xlabel(f"layer (depth {depths[-1]}; last = classifier)")
    ax2.set_ylabel("kernel gradient norm at init")
    ax2.legend(fontsize=8)


CLAIM = Claim(
    id="depth",
    title="BN improves gradient propagation, so deeper networks train",
    sources=("000", "001", "002"),
    how="MLPs width 64 ReLU, SGD momentum lr 0.01, depth 2 to 20 (quick) / 50 (full) with/without "
        "BN; final test accuracy at the deepest depth; per-layer gradient norms at init",
    configs=configs,
    run=run,
    plot=plot,
)

"""overhead: BN costs extra computation (seed 000).

Command: ``python -m experiments run overhead --quick`` (measured on a shared 2-core CPU:
20 s quick, 43 s ``--full``).

Setup: the compiled training step (forward, backward, Adam update; one run) of the MLP
(3×100 ReLU, batch 60) and of the small CNN, with and without BN, timed in one process:
after a warm-up, repeats alternate between the arms, each timing a chunk of 50 steps.
Metric: seconds per MLP step (each repeat is one sample); the CNN's and both ratios are
reported alongside. Timings on a shared machine are noisy: the interval accounts for that.

Expected if the claim holds: BN's step is slower.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from . import entry
from ._common import generic

ID = "overhead"
CLAIM = "BN adds computational overhead"
SOURCES = ["000"]
HOW = (
    "step time of the MLP and the CNN with/without BN, one process, alternating repeats of "
    "50 compiled steps; seconds per MLP step"
)
CHUNK = 50


def configs(settings):
    base = dataclasses.replace(generic(settings), seeds=(0,), steps=CHUNK, eval_every=CHUNK)
    cnn = dataclasses.replace(base, model="cnn", widths=(32, 32))
    return {
        "mlp-none": base,
        "mlp-bn": dataclasses.replace(base, norm="bn"),
        "cnn-none": cnn,
        "cnn-bn": dataclasses.replace(cnn, norm="bn"),
    }


def run(ctx):
    from ..train import Trainer

    cfgs = configs(ctx.settings)
    repeats = ctx.settings.pick(7, 15)
    trainers, states = {}, {}
    for arm, config in cfgs.items():
        trainers[arm] = Trainer(config, ctx.dataset(config.dataset))
        state, losses = trainers[arm].chunk(trainers[arm].init(), 0, CHUNK)  # compile, warm up
        losses.block_until_ready()
        states[arm] = state
    times = {arm: [] for arm in cfgs}
    for _ in range(repeats):
        for arm in cfgs:
            tic = time.perf_counter()
            states[arm], losses = trainers[arm].chunk(states[arm], CHUNK, CHUNK)
            losses.block_until_ready()
            times[arm].append((time.perf_counter() - tic) / CHUNK)
    times = {arm: np.array(t) for arm, t in times.items()}
    ratio = {m: times[f"{m}-bn"] / times[f"{m}-none"] for m in ("mlp", "cnn")}
    return entry(
        module=sys.modules[__name__],
        metric="seconds per MLP training step (higher = more overhead, as claimed)",
        higher_is_better=True,
        treatment=("MLP with BN", times["mlp-bn"]),
        reference=("MLP without BN", times["mlp-none"]),
        details={
            "seconds_per_step": times,
            "ratio_bn_over_none": ratio,
            "median_ratio": {m: float(np.median(r)) for m, r in ratio.items()},
        },
        notes="Median step-time ratio BN/no BN: MLP "
        f"{np.median(ratio['mlp']):.2f}, CNN {np.median(ratio['cnn']):.2f}. "
        "Each 'seed' value is one timing repeat.",
        claim_direction="BN's step takes longer",
    )


def plot(result, fig):
    d = result["details"]
    ax = fig.add_subplot(1, 1, 1)
    arms = list(d["seconds_per_step"])
    data = [1e3 * np.asarray(d["seconds_per_step"][a], dtype=np.float64) for a in arms]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(arms) + 1), arms)
    ax.set_ylabel("ms per training step")
    ax.set_title("overhead (BN / none: " + ", ".join(
        f"{m} {r:.2f}x" for m, r in d["median_ratio"].items()) + ")")

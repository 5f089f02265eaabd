"""sync: synchronized statistics matter with small per-device batches.

Command: ``python -m experiments run sync --quick`` (measured on a shared 2-core CPU:
35-57 s quick, 116 s ``--full``; the command line provides 8 host devices, otherwise this
claim re-runs itself in a subprocess with ``--devices 8``).

Setup: MLP 3×100 ReLU with BN, Adam 1e-3, data parallel over 8 devices × 4 examples (global
batch 32) with ``jax.shard_map``: BN statistics per device (4 examples each; running
statistics averaged across devices after each step) vs synchronized over the 8 devices
(``axis_name``), and one device with batch 32 as the reference for the synchronized run,
which should match it to float rounding. Metric: final test accuracy, synchronized vs per
device.

Expected if the claim holds: synchronized BN reaches a higher accuracy than per-device BN.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from . import Claim, entry
from ._common import generic, plot_accuracy_curves

DEVICES = 8


def configs(settings):
    base = dataclasses.replace(generic(settings), norm="bn", batch_size=4 * DEVICES)
    return {
        "per-device": dataclasses.replace(base, devices=DEVICES, sync_bn=False),
        "synchronized": dataclasses.replace(base, devices=DEVICES, sync_bn=True),
        "one-device": base,
    }


def _in_subprocess(ctx):
    out = os.path.join(ctx.out, CLAIM.id, "subprocess")
    s = ctx.settings
    resumable = s.resume and os.path.isfile(os.path.join(out, "results.json"))
    command = [sys.executable, "-m", "experiments", "run", CLAIM.id, "--devices", str(DEVICES),
               "--resume" if resumable else "--out", out, "--quick" if s.quick else "--full",
               "--seeds", str(len(s.seed_list)), "--budget", str(s.budget), "--no-progress",
               "--checkpoint" if s.checkpoint else "--no-checkpoint"]
    if s.dataset:
        command += ["--dataset", s.dataset]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["claims"][CLAIM.id]


def run(ctx):
    import jax

    if jax.device_count() < DEVICES:
        return _in_subprocess(ctx)
    results = {arm: ctx.train(c, arm=arm) for arm, c in configs(ctx.settings).items()}
    acc = {arm: r.metrics["test_accuracy"] for arm, r in results.items()}
    diff = float(np.nanmax(np.abs(acc["synchronized"] - acc["one-device"])))
    return entry(
        claim=CLAIM,
        metric="final test accuracy (higher is better)",
        higher_is_better=True,
        treatment=("synchronized BN (8x4)", acc["synchronized"][-1]),
        reference=("per-device BN (8x4)", acc["per-device"][-1]),
        details={
            "steps": results["synchronized"].steps,
            "test_accuracy": acc,
            "one_device_final": acc["one-device"][-1],
            "max_abs_difference_synchronized_vs_one_device": diff,
            "dataset": results["synchronized"].config.dataset,
        },
        notes=f"Both arms use BN. Synchronized 8x4 vs one device with batch 32: largest test "
        f"accuracy difference over all logged steps and seeds {diff:.2g}.",
    )


def plot(result, fig):
    labels = {"per-device": "per-device BN (8x4)", "synchronized": "synchronized BN (8x4)",
              "one-device": "one device, batch 32"}
    plot_accuracy_curves(result, fig, labels, "sync")


CLAIM = Claim(
    id="sync",
    title="Synchronized BN statistics matter when each device holds a small batch",
    sources=("000",),
    how="MLP 3x100 ReLU + BN, Adam, 8 devices x 4 examples: per-device vs synchronized statistics "
        "(vs one device, batch 32); final test accuracy",
    configs=configs,
    run=run,
    plot=plot,
)

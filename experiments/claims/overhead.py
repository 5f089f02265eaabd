"""overhead: BN costs extra computation (seed 000); and what jaxbn costs next to flax's layer.

Command: ``python -m experiments run overhead --quick`` (measured on a shared 2-core CPU:
about 30 s quick, 60 s ``--full``).

Setup: the compiled training step (forward, backward, Adam update; one run) of the MLP
(3×100 ReLU, batch 60) and of the small CNN, each three ways: no norm, jaxbn's BatchNorm and
flax's ``flax.linen.BatchNorm``, timed in one process: after a warm-up, repeats go round the
six arms in turn, each timing a chunk of 50 steps. Metric: seconds per MLP step, jaxbn vs no
norm (each repeat is one sample). The ratios jaxbn / no norm, flax / no norm and jaxbn / flax
are taken within each round (the arms of a round ran back to back), and reported as the
median with the range over rounds, for the MLP and the CNN. Timings on a shared machine are
noisy: the interval and the ranges account for that.

Expected if the claim holds: BN's step is slower. Whether jaxbn's step is slower or faster
than flax's is reported, not judged.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import Claim, entry
from ._common import generic

CHUNK = 50
MODELS = {"mlp": "MLP", "cnn": "CNN"}
NORMS = {"none": "no norm", "bn": "jaxbn", "flax-bn": "flax"}
RATIOS = (("bn", "none"), ("flax-bn", "none"), ("bn", "flax-bn"))


def configs(settings):
    base = dataclasses.replace(generic(settings), seeds=(0,), steps=CHUNK, eval_every=CHUNK)
    cnn = dataclasses.replace(base, model="cnn", widths=(32, 32))
    return {
        f"{model}-{norm}": dataclasses.replace(base if model == "mlp" else cnn, norm=norm)
        for model in MODELS
        for norm in NORMS
    }


def _ratio_summary(values: np.ndarray) -> dict[str, float | list[float]]:
    return {"median": float(np.median(values)), "min": float(values.min()),
            "max": float(values.max()), "values": values.tolist()}


def run(ctx):
    from ..train import Trainer

    cfgs = configs(ctx.settings)
    repeats = ctx.settings.pick(7, 15)
    trainers, states = {}, {}
    for arm, config in cfgs.items():
        trainers[arm] = Trainer(ctx.prepare(config, claim=CLAIM.id, arm=arm),
                                ctx.dataset(config.dataset))
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
    ratios = {
        model: {f"{top}/{bottom}": _ratio_summary(times[f"{model}-{top}"]
                                                   / times[f"{model}-{bottom}"])
                for top, bottom in RATIOS}
        for model in MODELS
    }
    return entry(
        claim=CLAIM,
        metric="seconds per MLP training step (higher = more overhead, as claimed)",
        higher_is_better=True,
        treatment=("MLP with jaxbn", times["mlp-bn"]),
        reference=("MLP without norm", times["mlp-none"]),
        details={"seconds_per_step": times, "ratios": ratios},
        notes="Each 'seed' value is one timing round. Step-time ratios, median (range over "
        "rounds): " + "; ".join(
            f"{label} " + ", ".join(f"{_ratio_label(name)} {_median_range(r)}"
                                   for name, r in ratios[model].items())
            for model, label in MODELS.items()
        ) + ".",
        claim_direction="BN's step takes longer",
    )


def _ratio_label(name: str) -> str:
    top, bottom = name.split("/")
    return f"{NORMS[top]} / {NORMS[bottom]}"


def _median_range(ratio: dict) -> str:
    return f"{ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f})"


def report_table(result) -> str:
    """Milliseconds per step (median over rounds) and the ratios, per model, as markdown."""
    d = result["details"]
    names = [f"{top}/{bottom}" for top, bottom in RATIOS]
    lines = [
        "Training step, ms (median over rounds), and step-time ratios, median (range over "
        "rounds):",
        "",
        "| model | " + " | ".join(f"{label} ms" for label in NORMS.values()) + " | "
        + " | ".join(map(_ratio_label, names)) + " |",
        "|---|" + "---|" * (len(NORMS) + len(names)),
    ]
    for model, label in MODELS.items():
        ms = [1e3 * np.median(d["seconds_per_step"][f"{model}-{norm}"]) for norm in NORMS]
        lines.append(
            f"| {label} | " + " | ".join(f"{m:.3f}" for m in ms) + " | "
            + " | ".join(_median_range(d["ratios"][model][n]) for n in names) + " |"
        )
    return "\n".join(lines)


def plot(result, fig):
    d = result["details"]
    for i, (model, label) in enumerate(MODELS.items()):
        ax = fig.add_subplot(1, len(MODELS), i + 1)
        arms = [f"{model}-{norm}" for norm in NORMS]
        ax.boxplot([1e3 * np.asarray(d["seconds_per_step"][a], dtype=np.float64) for a in arms],
                   showmeans=True)
        ax.set_xticks(range(1, len(arms) + 1), list(NORMS.values()))
        ax.set_ylabel("ms per training step")
        ax.set_title(f"{label}: " + ", ".join(
            f"{_ratio_label(n)} {r['median']:.2f}x" for n, r in d["ratios"][model].items()),
            fontsize=8)


CLAIM = Claim(
    id="overhead",
    title="BN adds computational overhead",
    sources=("000",),
    how="step time of the MLP and the CNN with no norm, jaxbn and flax.linen.BatchNorm, one "
        "process, rounds of 50 compiled steps per arm; seconds per MLP step, jaxbn vs no norm",
    configs=configs,
    run=run,
    plot=plot,
    report_table=report_table,
)

"""Shared setups and helpers for the claim modules."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..train import Config
from . import Settings, finite_or

__all__ = ["errorbar", "final_by_sweep", "generic", "ioffe", "plot_accuracy_curves",
           "plot_curves", "plot_sweep", "steps_to_target"]


def _setup(
    settings: Settings, steps: tuple[int, int], eval_every: tuple[int, int], **fields: Any
) -> Config:
    """An MLP with 3 hidden layers of 100 units, batch 60, on the settings' dataset and seeds;
    ``steps`` and ``eval_every`` are (quick, full), scaled by the budget."""
    num_steps, every = settings.steps(*steps, settings.pick(*eval_every))
    return Config(
        dataset=settings.default_dataset(),
        widths=(100, 100, 100),
        batch_size=60,
        steps=num_steps,
        eval_every=every,
        seeds=settings.seed_list,
        **fields,
    )


def ioffe(settings: Settings, *, quick_steps: int = 1000, full_steps: int = 5000) -> Config:
    """Ioffe & Szegedy's MNIST setup: 3 hidden layers of 100 sigmoid units, SGD, batch 60.

    The learning rate (0.1) was fixed before any run and is the same with and without BN.
    """
    return _setup(settings, (quick_steps, full_steps), (50, 100), activation="sigmoid",
                  optimizer="sgd", learning_rates=(0.1,))


def generic(settings: Settings, *, quick_steps: int = 600, full_steps: int = 3000) -> Config:
    """A common modern setup: 3 hidden layers of 100 ReLU units, Adam 1e-3, batch 60."""
    return _setup(settings, (quick_steps, full_steps), (100, 250), activation="relu",
                  optimizer="adam", learning_rates=(1e-3,))


def final_by_sweep(results: dict[str, Any], sweep: int, chance: float):
    """Per arm, ``(sweep, seeds)`` arrays of the final test accuracy (a stopped run at
    ``chance``) and of whether each run diverged, for configs that sweep one setting
    (``Config.runs`` puts the seeds innermost)."""
    final = {
        arm: finite_or(r.final("test_accuracy"), chance).reshape(sweep, -1)
        for arm, r in results.items()
    }
    diverged = {
        arm: np.array([d is not None for d in r.diverged_at]).reshape(sweep, -1)
        for arm, r in results.items()
    }
    return final, diverged


def steps_to_target(steps: np.ndarray, accuracy: np.ndarray, target: float) -> np.ndarray:
    """Per run, the first logged step with accuracy >= target; the last step if never.

    ``accuracy`` is (T, R). A run that never reaches the target is counted at the budget (a
    lower bound on its true value, which favours that run).
    """
    reached = np.nan_to_num(accuracy, nan=0.0) >= target
    first = np.where(reached.any(0), reached.argmax(0), len(steps) - 1)
    return steps[first].astype(np.float64)


def plot_curves(ax, steps, arms: dict[str, Any], ylabel: str, target: float | None = None):
    """Mean over seeds with a min-max band, one line per arm."""
    for label, values in arms.items():
        values = np.asarray(values, dtype=np.float64)  # (T, seeds)
        ax.plot(steps, np.nanmean(values, 1), label=label)
        ax.fill_between(steps, np.nanmin(values, 1), np.nanmax(values, 1), alpha=0.2)
    if target is not None:
        ax.axhline(target, color="gray", linestyle=":", label=f"target {target:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def errorbar(ax, x, values, label: str) -> None:
    """Mean over seeds with min-max error bars; ``values`` is (len(x), seeds)."""
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean(1)
    yerr = np.maximum(0.0, [mean - values.min(1), values.max(1) - mean])
    ax.errorbar(x, mean, yerr=yerr, marker="o", capsize=3, label=label)


def plot_accuracy_curves(result: dict[str, Any], fig, labels: dict[str, str], title: str):
    """The test accuracy of each arm (``labels``: arm -> legend) against the step, with the
    target of ``details`` if it has one, titled ``title (dataset)``."""
    d = result["details"]
    ax = fig.add_subplot(1, 1, 1)
    curves = {label: d["test_accuracy"][arm] for arm, label in labels.items()}
    plot_curves(ax, d["steps"], curves, "test accuracy", d.get("target"))
    ax.set_title(f"{title} ({d['dataset']})")


def plot_sweep(result: dict[str, Any], fig, setting: str, xlabel: str, title: str):
    """Final test accuracy with and without BN against the swept ``setting`` of ``details``
    (log scale), a red x where a seed diverged, the target if there is one."""
    d = result["details"]
    ax = fig.add_subplot(1, 1, 1)
    x = np.asarray(d[setting])
    for arm, label in (("none", "no BN"), ("bn", "BN")):
        final = np.asarray(d["final_test_accuracy"][arm], dtype=np.float64)
        errorbar(ax, x, final, label)
        diverged = np.asarray(d["diverged"][arm]).any(1)
        ax.scatter(x[diverged], final.mean(1)[diverged], marker="x", color="red", zorder=3)
    if d.get("target") is not None:
        ax.axhline(d["target"], color="gray", linestyle=":", label="target")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy (x: a seed diverged)")
    ax.legend(fontsize=8)
    ax.set_title(f"{title} ({d['dataset']})")

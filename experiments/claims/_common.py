"""Shared setups and helpers for the claim modules."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..train import Config
from . import Settings

__all__ = ["generic", "ioffe", "plot_curves", "steps_to_target"]


def ioffe(settings: Settings, *, quick_steps: int = 1000, full_steps: int = 5000) -> Config:
    """Ioffe & Szegedy's MNIST setup: 3 hidden layers of 100 sigmoid units, SGD, batch 60.

    The learning rate (0.1) was fixed before any run and is the same with and without BN.
    """
    steps, every = settings.steps(quick_steps, full_steps, settings.pick(50, 100))
    return Config(
        dataset=settings.default_dataset(),
        widths=(100, 100, 100),
        activation="sigmoid",
        optimizer="sgd",
        learning_rates=(0.1,),
        batch_size=60,
        steps=steps,
        eval_every=every,
        seeds=settings.seed_list,
    )


def generic(settings: Settings, *, quick_steps: int = 600, full_steps: int = 3000) -> Config:
    """A common modern setup: 3 hidden layers of 100 ReLU units, Adam 1e-3, batch 60."""
    steps, every = settings.steps(quick_steps, full_steps, settings.pick(100, 250))
    return Config(
        dataset=settings.default_dataset(),
        widths=(100, 100, 100),
        activation="relu",
        optimizer="adam",
        learning_rates=(1e-3,),
        batch_size=60,
        steps=steps,
        eval_every=every,
        seeds=settings.seed_list,
    )


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

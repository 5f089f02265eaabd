"""Interleaved timing: the functions under comparison take turns within every round.

On a shared machine the load drifts; taking turns exposes every function to the same drift,
and the median over rounds of the per-round ratio is what the benchmark reports.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

__all__ = ["environment", "median_ms", "median_ratio", "time_interleaved"]


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], rounds: int, min_seconds: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round.

    Args:
      fns: the functions to compare, by name; each takes no argument and returns arrays.
      rounds: samples per function. Every round runs each function in turn, starting from a
        different one each round.
      min_seconds: each sample repeats its function as many times as fit in this long (as
        measured once after the warm-up), so that short calls are not lost in timer noise.

    Returns:
      For each name, the seconds per call in each round.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile and warm up
    calls = {}
    for name, fn in fns.items():
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds:
            jax.block_until_ready(fn())
            n += 1
        calls[name] = max(1, n)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def median_ms(samples: list[float]) -> float:
    """The median of ``samples`` (seconds), in milliseconds."""
    return 1e3 * statistics.median(samples)


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of the per-round ratio of two interleaved timings."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def environment() -> dict[str, str]:
    """The device the times are taken on: its name and kind, the backend, jax's version."""
    device = jax.devices()[0]
    return {
        "device": str(device),
        "device_kind": device.device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }

"""One measurement in a fresh Python process, with its result as JSON on stdout.

The parent calls :func:`run_in_fresh_process`, which runs
``python -m experiments.bench.worker TASK KWARGS`` (``KWARGS`` a JSON object of keyword
arguments) and reads the task's return value back from the last line of the child's stdout.
A fresh process is what a user starts from (cold caches: the compile times), what a
process-wide setting needs (the host device count of the collectives), and what gives a new
sample of the allocator's and memory's state (the timings, whose ratios move more between
processes than between rounds within one).

This module imports no jax at the top: the command line imports it before jax is imported.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import subprocess
import sys
from typing import Any

__all__ = ["TASKS", "main", "run_in_fresh_process", "run_in_this_process"]

# Each task is the function of that name in the module given here (imported in the child
# only, so that importing this module imports no jax).
TASKS = {
    "environment": "timing",
    "layer_timings": "layers",
    "layer_passes": "layers",
    "collectives": "layers",
    "step_timings": "networks",
    "compile_time": "networks",
    "folding": "networks",
}
TIMEOUT_S = 3600
_ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_in_fresh_process(task: str, **kwargs: Any) -> Any:
    """Runs ``task`` with ``kwargs`` in a fresh Python process and returns its result.

    Args:
      task: one of :data:`TASKS`.
      **kwargs: the task's keyword arguments; JSON turns their tuples into lists.

    Returns:
      The task's return value, through JSON.

    Raises:
      ValueError: for an unknown ``task``.
      RuntimeError: when the process fails; the message ends with its stderr.
    """
    if task not in TASKS:
        raise ValueError(f"Expected `task` in {tuple(TASKS)}, got {task!r}.")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.bench.worker", task, json.dumps(kwargs)],
        cwd=_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"bench task {task!r} failed with exit code {result.returncode}:\n"
            f"{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_in_this_process(task: str, **kwargs: Any) -> Any:
    """Runs ``task`` here, through the same JSON round trip as :func:`run_in_fresh_process`.

    For tests of the bench's plumbing at toy size, where a fresh process per measurement
    (a few seconds of start-up each) would dominate; the numbers are not a user's.
    """
    if task not in TASKS:
        raise ValueError(f"Expected `task` in {tuple(TASKS)}, got {task!r}.")
    return json.loads(_run(task, json.loads(json.dumps(kwargs))))


def _run(task: str, kwargs: dict[str, Any]) -> str:
    """The JSON text of ``task``'s result, with ``kwargs`` as they come back from JSON."""
    if "shapes" in kwargs:  # back from JSON lists to the (label, shape, axis, dtypes) tuples
        kwargs["shapes"] = [(lbl, tuple(s), axis, dt, out)
                            for lbl, s, axis, dt, out in kwargs["shapes"]]
    function = getattr(importlib.import_module(f"{__package__}.{TASKS[task]}"), task)
    return json.dumps(function(**kwargs))


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.bench.worker TASK [KWARGS]``: prints the result as JSON."""
    task, *rest = sys.argv[1:] if argv is None else argv
    if task not in TASKS:
        raise SystemExit(f"Expected TASK in {tuple(TASKS)}, got {task!r}.")
    print(_run(task, json.loads(rest[0]) if rest else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

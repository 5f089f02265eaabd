"""The suite: claims run one after the other into one output directory.

:func:`run_suite` records ``results.json`` before the first claim and after every claim, so
an interrupted suite keeps what it has, with the run's provenance in ``meta`` (command, mode,
seeds, commit, date, machine, versions) and the command line's options (``meta.options``,
which ``--resume`` reads); at the end it writes ``report.md`` and the figures. A claim that
fails is recorded with its traceback and the others still run. Bad input never gets this far:
the command line checks its options, the installed extras and (``Context.check``) every
config before the first claim starts.

Resumed (``ctx.settings.resume``), it keeps the entries of ``ctx.out/results.json`` whose
claims completed, runs the others (each run from its latest checkpoint) and appends this
session's provenance to ``meta.resumed``.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Sequence
from typing import Any

from . import report
from .claims import Context, load_claim

__all__ = ["provenance", "run_suite"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", _REPO, *args], capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown CPU"


def provenance() -> dict[str, Any]:
    """Where and when results come from: the commit (and whether tracked files other than
    the recorded results in ``experiments/reference/`` had changes), the date, the machine
    and the versions."""
    import flax
    import jax

    # A recorded results.json being rewritten is data, not a change to the code that ran.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)experiments/reference")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.machine()}",
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "python_version": platform.python_version(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
    }


def _meta(
    ctx: Context, command: str, options: dict[str, Any], recorded: dict[str, Any] | None
) -> dict[str, Any]:
    """A new run's ``meta``; resumed, the ``recorded`` one with this session's provenance
    appended to ``resumed``."""
    import jax

    if recorded is not None:
        meta = recorded["meta"]
        return {**meta, "resumed": [*meta.get("resumed", []),
                                    {"command": command, **provenance()}]}
    settings = ctx.settings
    return {
        "command": command,
        "options": options,
        "mode": "quick" if settings.quick else "full",
        "seeds": len(settings.seed_list),
        "dataset": settings.default_dataset(),
        "budget": settings.budget,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "runtime_s": 0.0,
        **provenance(),
    }


def run_suite(claim_ids: Sequence[str], ctx: Context, *, command: str,
              options: dict[str, Any] | None = None) -> bool:
    """Runs the claims in ``ctx``, writing ``ctx.out``; returns whether every claim ran.

    ``options``, the command line's, are recorded as ``meta.options`` for ``--resume``.
    With ``ctx.settings.resume`` the claims that completed in ``ctx.out/results.json`` are
    kept and not run again. Only process 0 writes files; every process runs every claim
    (multi-process runs).
    """
    import jax

    recorded = report.load_results(ctx.out) if ctx.settings.resume else None
    meta = _meta(ctx, command, options or {}, recorded)
    earlier = recorded["claims"] if recorded is not None else {}
    entries = {c: e for c, e in earlier.items() if c in claim_ids and "error" not in e}
    primary = jax.process_index() == 0
    started, earlier_runtime = time.perf_counter(), meta["runtime_s"]

    def record() -> None:
        if primary:
            meta["runtime_s"] = earlier_runtime + time.perf_counter() - started
            meta["complete"] = len(entries) == len(claim_ids)
            report.write_results(ctx.out, {c: entries[c] for c in claim_ids if c in entries},
                                 meta)

    record()  # before the first claim: an interrupted one leaves a run to resume
    bar = None
    if ctx.show_progress and len(claim_ids) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(claim_ids), desc="claims", unit="claim", initial=len(entries))
    for claim_id in claim_ids:
        if claim_id in entries:  # completed before an interruption
            continue
        if bar is not None:
            bar.set_postfix_str(claim_id)
        ctx.claim = claim_id
        tic = time.perf_counter()
        try:
            entry = load_claim(claim_id).run(ctx)
        except Exception:  # a failed claim is reported, the others still run
            entry = {"id": claim_id, "claim": load_claim(claim_id).title,
                     "verdict": "inconclusive", "error": traceback.format_exc()}
        entry["runtime_s"] = time.perf_counter() - tic
        entries[claim_id] = entry
        record()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if primary:
        path = report.write_report(ctx.out)
        print(report.verdict_table(report.load_results(ctx.out)))
        print(f"\nreport: {path}")
    return not any("error" in e for e in entries.values())

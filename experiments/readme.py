"""README's results, rendered from the recorded runs in ``experiments/reference/``.

Each mode that has been recorded keeps its ``results.json`` in
``experiments/reference/<mode>/`` (``quick``, ``full``; the rest of a run's output there is
ignored by git), with the command, commit, date and machine in its ``meta``.
``python -m experiments readme`` rewrites the part of README.md between :data:`BEGIN` and
:data:`END` from whichever modes exist: per mode its provenance, the verdict table and the
claims' own tables, then where the two modes' verdicts differ. ``--check`` only compares;
``tests/test_readme.py`` fails when README and the recorded runs disagree.

To record a mode, run the command in :data:`MODES`, then ``python -m experiments readme``.
"""

from __future__ import annotations

import pathlib
from typing import Any

from . import report

__all__ = ["BEGIN", "END", "MODES", "load_references", "main", "render", "rewrite"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REFERENCE = ROOT / "experiments" / "reference"
BEGIN = ("<!-- results: written by `python -m experiments readme` from "
         "experiments/reference/*/results.json; do not edit by hand -->")
END = "<!-- /results -->"
MODES = {  # the command that records each mode (~8 and ~35 minutes on 2 CPU cores)
    "quick": "python -m experiments --out experiments/reference/quick",
    "full": "python -m experiments --full --out experiments/reference/full",
}


def load_references(directory: pathlib.Path = REFERENCE) -> dict[str, dict[str, Any]]:
    """The recorded results by mode, for the modes that have a ``results.json``."""
    return {
        mode: report.load_results(str(directory / mode))
        for mode in MODES
        if (directory / mode / "results.json").is_file()
    }


def _provenance(meta: dict[str, Any]) -> str:
    commit = meta.get("commit") or "unknown"
    changes = " (with uncommitted changes)" if meta.get("uncommitted_changes") else ""
    minutes = (meta.get("runtime_s") or 0) / 60
    return (
        f"Recorded with `{meta.get('command')}`: {meta.get('seeds')} seeds, dataset "
        f"{meta.get('dataset')}, commit `{commit[:10]}`{changes}, {meta.get('date')}, "
        f"{meta.get('machine')}, {meta.get('devices')}, jax {meta.get('jax_version')}, flax "
        f"{meta.get('flax_version')}; {minutes:.0f} min."
    )


def _mode_section(mode: str, results: dict[str, Any] | None) -> list[str]:
    lines = [f"#### {mode.capitalize()} mode", ""]
    if results is None:
        return [*lines, f"Not recorded yet: `{MODES[mode]}` records it, then "
                        "`python -m experiments readme` puts it here.", ""]
    lines += [_provenance(results["meta"]), "", report.verdict_table(results, runtime=False), ""]
    for claim_id, entry in results["claims"].items():
        table = report.claim_table(claim_id, entry)
        if table is not None:
            lines += [f"`{claim_id}`, {mode} mode:", "", table, ""]
    return lines


def _disagreements(references: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["#### Where quick and full mode disagree", ""]
    if len(references) < len(MODES):
        return [*lines, "Known once both modes are recorded.", ""]
    quick, full = (references[mode]["claims"] for mode in MODES)
    differ = [c for c in quick if c in full and quick[c]["verdict"] != full[c]["verdict"]]
    if not differ:
        return [*lines, "Nowhere: every claim gets the same verdict in both modes.", ""]
    return [*lines, "| claim | quick mode | full mode |", "|---|---|---|",
            *(f"| {c} | {quick[c]['verdict']} | {full[c]['verdict']} |" for c in differ), ""]


def render(references: dict[str, dict[str, Any]]) -> str:
    """The results section, markers included, for the recorded ``references``."""
    lines = [BEGIN, ""]
    for mode in MODES:
        lines += _mode_section(mode, references.get(mode))
    lines += _disagreements(references)
    return "\n".join([*lines, END])


def rewrite(readme: str, references: dict[str, dict[str, Any]]) -> str:
    """``readme`` with its results section replaced by :func:`render`'s.

    Raises:
      ValueError: if ``readme`` lacks either marker.
    """
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"Expected README to hold the markers {BEGIN!r} and {END!r}.")
    return readme[:start] + render(references) + readme[end + len(END):]


def main(*, check: bool = False, readme: pathlib.Path = README,
         directory: pathlib.Path = REFERENCE) -> int:
    """Rewrites (or with ``check``, compares) README's results section; returns the exit
    status: 1 when ``check`` finds a difference."""
    text = readme.read_text()
    rendered = rewrite(text, load_references(directory))
    if check:
        if rendered != text:
            print(f"{readme} differs from the recorded runs; run `python -m experiments readme`")
            return 1
        print(f"{readme} matches the recorded runs")
        return 0
    readme.write_text(rendered)
    print(f"wrote the results section of {readme}")
    return 0

"""results.json → one PNG per claim and report.md; everything is made from the files.

``results.json``::

    {"meta": {...command, mode, seeds, devices, versions, runtime_s...},
     "claims": {"<id>": {"id", "claim", "sources", "how", "metric", "higher_is_better",
                         "claim_direction",
                         "with_bn": {"label", "mean", "ci95", "interval", "values"},
                         "without_bn": {...same...},
                         "verdict": "holds" | "does not hold" | "inconclusive",
                         "rule", "reason", "notes", "details": {...plot data...},
                         "runtime_s"}}}

``with_bn`` is the arm the claim favours (BN, or for ``placement``/``sync`` the favoured BN
variant) and ``without_bn`` the reference; ``values`` are per seed. A claim that failed has
``error`` (its traceback) in place of the results. ``python -m experiments plot DIR`` remakes
the figures and the report from ``DIR/results.json``; :func:`load_results` checks this layout,
so a damaged or hand-edited file is named with its first bad field.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["check_results", "claim_table", "load_results", "verdict_table", "write_report",
           "write_results"]

VERDICTS = ("holds", "does not hold", "inconclusive")


def write_results(out: str, claims: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """Writes ``out/results.json`` in one atomic replace: an interruption leaves the old one."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "claims": claims}, f, indent=1, allow_nan=False, default=_nan)
    os.replace(path + ".tmp", path)
    return path


def _nan(value: Any) -> Any:
    raise TypeError(f"Expected JSON-serializable values in results, got {type(value).__name__}.")


def load_results(out: str) -> dict[str, Any]:
    """``out/results.json``, checked by :func:`check_results`.

    Raises:
      OSError: if it cannot be read.
      ValueError: naming the file and its first bad field.
    """
    path = os.path.join(out, "results.json")
    with open(path) as f:
        try:
            results = json.load(f)
        except ValueError as error:  # not JSON, or not UTF-8
            raise ValueError(f"{path}: expected JSON, got {error}") from None
    try:
        check_results(results)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return results


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(ok: bool, field: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{field + ': ' if field else ''}expected {expected}, got "
                         f"{_shown(value)}")


def _is_number(value: Any, *, null: bool = False) -> bool:
    return (value is None and null) or (
        isinstance(value, int | float) and not isinstance(value, bool))


def _check_fields(entry: dict[str, Any], field: str, kinds: dict[str, str]) -> None:
    """Checks ``entry``'s fields by kind: "text", "number", "number?" (or null), "texts",
    "numbers?" (a list of numbers or nulls), "object"; a name ending in "?" is optional."""
    tests = {
        "text": (lambda v: isinstance(v, str), "a string"),
        "number": (_is_number, "a number"),
        "number?": (lambda v: _is_number(v, null=True), "a number or null"),
        "texts": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                  "a list of strings"),
        "numbers?": (lambda v: isinstance(v, list) and all(_is_number(x, null=True) for x in v),
                     "a list of numbers or nulls"),
        "object": (lambda v: isinstance(v, dict), "an object"),
        "list": (lambda v: isinstance(v, list), "a list"),
    }
    for name, kind in kinds.items():
        optional, name = name.endswith("?"), name.rstrip("?")
        test, expected = tests[kind]
        where = f"{field}.{name}" if field else name
        if name not in entry:
            if not optional:
                raise ValueError(f"{where}: expected {expected}, got none")
            continue
        _expect(test(entry[name]), where, expected, entry[name])


_ARM = {"label": "text", "mean": "number?", "ci95": "number?", "values": "numbers?"}
_ENTRY = {"claim": "text", "sources": "texts", "how": "text", "metric": "text",
          "claim_direction": "text", "reason": "text", "notes?": "text", "rule?": "text",
          "details": "object", "runtime_s?": "number?"}


def check_results(results: Any) -> None:
    """Checks that ``results`` has the layout of results.json (module docstring) that the
    report and ``--resume`` read; a claim's ``details`` are checked by its plot.

    Raises:
      ValueError: naming the first bad field (e.g. ``claims.depth.with_bn.mean``), what was
        expected and what was found.
    """
    from .claims import CLAIM_IDS  # imports no jax

    _expect(isinstance(results, dict), "", "an object with meta and claims", results)
    _check_fields(results, "", {"meta": "object", "claims": "object"})
    _check_fields(results["meta"], "meta", {"runtime_s": "number", "command?": "text",
                                            "resumed?": "list"})
    for claim_id, entry in results["claims"].items():
        field = f"claims.{claim_id}"
        _expect(claim_id in CLAIM_IDS, field, f"a claim among {', '.join(CLAIM_IDS)}",
                claim_id)
        _expect(isinstance(entry, dict), field, "an object", entry)
        _expect(entry.get("id") == claim_id, f"{field}.id", repr(claim_id), entry.get("id"))
        _expect(entry.get("verdict") in VERDICTS, f"{field}.verdict",
                f"one of {', '.join(VERDICTS)}", entry.get("verdict"))
        if "error" in entry:
            _expect(isinstance(entry["error"], str) and entry["error"].strip() != "",
                    f"{field}.error", "the failed claim's traceback", entry["error"])
            continue
        _check_fields(entry, field, _ENTRY)
        for arm in ("with_bn", "without_bn"):
            _check_fields(entry, field, {arm: "object"})
            _check_fields(entry[arm], f"{field}.{arm}", _ARM)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _arm(arm: dict[str, Any] | None) -> str:
    if not arm:
        return "n/a"
    return f"{_fmt(arm['mean'])} ± {_fmt(arm['ci95'], 2)}"


def verdict_table(results: dict[str, Any], *, runtime: bool = True) -> str:
    """The verdicts as a markdown table (also readable in a terminal); a failed claim shows
    the last line of its error."""
    lines = [
        "| claim | verdict | metric | favoured arm | reference |" + (" runtime |" * runtime),
        "|---|---|---|---|---|" + "---|" * runtime,
    ]
    for claim_id, c in results["claims"].items():
        favoured = c.get("with_bn") or {}
        reference = c.get("without_bn") or {}
        metric = c.get("metric") or "failed: " + c.get("error", "").strip().splitlines()[-1]
        lines.append(
            f"| {claim_id} | **{c['verdict']}** | {metric} | "
            f"{favoured.get('label', '')}: {_arm(favoured)} | "
            f"{reference.get('label', '')}: {_arm(reference)} |"
            + (f" {_fmt(c.get('runtime_s'), 3)} s |" if runtime else "")
        )
    return "\n".join(lines)


def claim_table(claim_id: str, entry: dict[str, Any]) -> str | None:
    """The claim's own markdown table of ``entry`` (its ``report_table``), if it has one."""
    from .claims import CLAIM_IDS, load_claim

    if claim_id not in CLAIM_IDS or "error" in entry:
        return None
    table = load_claim(claim_id).report_table
    return None if table is None else table(entry)


def plot_claim(entry: dict[str, Any], path: str, *, dpi: int = 110) -> None:
    """Draws the claim's figure from its results ``entry`` into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .claims import load_claim

    fig = plt.figure(figsize=(9, 4.2), layout="constrained")
    try:
        load_claim(entry["id"]).plot(entry, fig)
        fig.suptitle(f"{entry['id']}: {entry['verdict']}", fontsize=10)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def write_report(out: str) -> str:
    """Writes ``<claim>.png`` for each claim and ``report.md``; returns report.md's path."""
    results = load_results(out)
    meta = results["meta"]
    sections = []
    for claim_id, c in results["claims"].items():
        lines = [f"## {claim_id}: {c.get('claim', '')}", ""]
        if "error" in c:
            lines += [f"**{c['verdict']}**: the experiment failed.", "", "```", c["error"], "```"]
            sections.append("\n".join(lines))
            continue
        png = f"{claim_id}.png"
        try:
            plot_claim(c, os.path.join(out, png))
            table = claim_table(claim_id, c)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise ValueError(
                f"{os.path.join(out, 'results.json')}: claims.{claim_id}.details: expected what "
                f"the {claim_id} claim records, got details its report cannot use "
                f"({type(error).__name__}: {error})"
            ) from error
        favoured, reference = c["with_bn"], c["without_bn"]
        lines += [
            f"- **Verdict: {c['verdict']}**. {c['reason']}.",
            f"- Sources: seed articles {', '.join(c['sources'])}.",
            f"- How: {c['how']}.",
            f"- Metric: {c['metric']}; claimed: {c['claim_direction']}.",
            f"- {favoured['label']}: {_arm(favoured)} (per seed: "
            f"{', '.join(_fmt(v) for v in favoured['values'])})",
            f"- {reference['label']}: {_arm(reference)} (per seed: "
            f"{', '.join(_fmt(v) for v in reference['values'])})",
        ]
        if c.get("notes"):
            lines.append(f"- Notes: {c['notes']}")
        runs = f"; runs in `{claim_id}/`" if os.path.isdir(os.path.join(out, claim_id)) else ""
        lines.append(f"- Runtime: {_fmt(c.get('runtime_s'), 3)} s{runs}.")
        if table is not None:
            lines += ["", table]
        lines += ["", f"![{claim_id}]({png})"]
        sections.append("\n".join(lines))
    counts = {v: sum(c["verdict"] == v for c in results["claims"].values()) for v in VERDICTS}
    header = [
        "# Batch-normalization claims, measured",
        "",
        f"Command: `{meta.get('command', '')}` — mode **{meta.get('mode')}**, "
        f"{meta.get('seeds')} seeds, {meta.get('device_count')} device(s), "
        f"jax {meta.get('jax_version')}, total {_fmt(meta.get('runtime_s'), 3)} s.",
        "",
        f"Verdicts: {counts['holds']} hold, {counts['does not hold']} do not hold, "
        f"{counts['inconclusive']} inconclusive.",
        "",
        "**Rule** (the same for every claim): "
        + next(
            (c["rule"] for c in results["claims"].values() if "rule" in c),
            "see experiments/verdict.py",
        )
        + ". Values are mean ± 95% half-width over seeds.",
        "",
        verdict_table(results),
        "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(header) + "\n" + "\n\n".join(sections) + "\n")
    return path

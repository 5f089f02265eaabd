"""The docs' rendered sections and figures, from the recorded runs in ``experiments/reference/``.

Each mode of the suite that has been recorded keeps its ``results.json`` in
``experiments/reference/<mode>/`` (``quick``, ``full``), and the bench its ``bench.json`` in
``experiments/reference/bench/``; the rest of a run's output there is ignored by git. Each
file records its command, commit (or environment), date and machine.

``python -m experiments docs`` rewrites, from those files, the part of each page of
:data:`SECTIONS` between the section's markers (:func:`begin`, :func:`end`):

- ``results`` in ``docs/experiments.md``: per mode its provenance, the verdict table and the
  claims' own tables, where the two modes' verdicts differ, and one figure per claim;
- ``bench`` in ``docs/performance.md``: the layer and network tables of the bench,

and draws the figures, ``docs/figures/<claim>.png``, from :data:`FIGURE_MODE`'s results (or
the other mode's, when only it is recorded). Each PNG carries a digest of the results entry it
was drawn from, so ``--check`` finds a stale figure without drawing anything. ``--check``
only compares, and exits 1 on a difference; ``tests/test_docs.py`` fails the same way.

To record a mode, run the command in :data:`MODES` (or :data:`BENCH_COMMAND`), then
``python -m experiments docs``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

from . import report

__all__ = [
    "BENCH_COMMAND",
    "FIGURE_MODE",
    "MODES",
    "SECTIONS",
    "begin",
    "end",
    "figure_digest",
    "load_bench",
    "load_references",
    "main",
    "render",
    "render_bench",
    "rewrite",
]

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = ROOT / "experiments" / "reference"
MODES = {  # the command that records each mode (~8 and ~35 minutes on 2 CPU cores)
    "quick": "python -m experiments --out experiments/reference/quick",
    "full": "python -m experiments --full --out experiments/reference/full",
}
BENCH_COMMAND = "python -m experiments bench --quick --out experiments/reference/bench"
FIGURE_MODE = "full"  # the mode the figures are drawn from, when it is recorded
SECTIONS = {"results": "experiments.md", "bench": "performance.md"}  # section -> page
FIGURES = "figures"  # under docs/
_DIGEST_KEY = "Source"  # the PNG text chunk that holds the digest of the entry drawn


def begin(name: str) -> str:
    """The line that opens the rendered section ``name``."""
    return (f"<!-- {name}: written by `python -m experiments docs` from experiments/reference/; "
            "do not edit by hand -->")


def end(name: str) -> str:
    """The line that closes the rendered section ``name``."""
    return f"<!-- /{name} -->"


def load_references(directory: pathlib.Path = REFERENCE) -> dict[str, dict[str, Any]]:
    """The recorded results by mode, for the modes that have a ``results.json``."""
    return {
        mode: report.load_results(str(directory / mode))
        for mode in MODES
        if (directory / mode / "results.json").is_file()
    }


def load_bench(directory: pathlib.Path = REFERENCE) -> dict[str, Any] | None:
    """The recorded bench, or None when ``bench/bench.json`` is absent."""
    path = directory / "bench" / "bench.json"
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------- results


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
    lines = [f"### {mode.capitalize()} mode", ""]
    if results is None:
        return [*lines, f"Not recorded yet: `{MODES[mode]}` records it, then "
                        "`python -m experiments docs` puts it here.", ""]
    lines += [_provenance(results["meta"]), "", report.verdict_table(results, runtime=False), ""]
    for claim_id, entry in results["claims"].items():
        table = report.claim_table(claim_id, entry)
        if table is not None:
            lines += [f"`{claim_id}`, {mode} mode:", "", table, ""]
    return lines


def _disagreements(references: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["### Where quick and full mode disagree", ""]
    if len(references) < len(MODES):
        return [*lines, "Known once both modes are recorded.", ""]
    quick, full = (references[mode]["claims"] for mode in MODES)
    differ = [c for c in quick if c in full and quick[c]["verdict"] != full[c]["verdict"]]
    if not differ:
        return [*lines, "Nowhere: every claim gets the same verdict in both modes.", ""]
    return [*lines, "| claim | quick mode | full mode |", "|---|---|---|",
            *(f"| {c} | {quick[c]['verdict']} | {full[c]['verdict']} |" for c in differ), ""]


def _figure_entries(references: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, Any]]:
    """The mode the figures are drawn from and its claims that have a figure."""
    mode = FIGURE_MODE if FIGURE_MODE in references else next(iter(references), None)
    if mode is None:
        return None, {}
    claims = references[mode]["claims"]
    return mode, {c: entry for c, entry in claims.items() if "error" not in entry}


def _figures(references: dict[str, dict[str, Any]]) -> list[str]:
    mode, entries = _figure_entries(references)
    lines = ["### Figures", ""]
    if mode is None:
        return [*lines, "Drawn once a mode is recorded.", ""]
    lines += [f"One per claim, from the {mode} mode's recorded runs.", ""]
    for claim_id, entry in entries.items():
        lines += [f"#### {claim_id}", "", f"{entry.get('claim', '')}", "",
                  f"![{claim_id}, {mode} mode: {entry['verdict']}]({FIGURES}/{claim_id}.png)", ""]
    return lines


def render(references: dict[str, dict[str, Any]]) -> str:
    """The ``results`` section, markers included, for the recorded ``references``."""
    lines = [begin("results"), ""]
    for mode in MODES:
        lines += _mode_section(mode, references.get(mode))
    lines += _disagreements(references)
    lines += _figures(references)
    return "\n".join([*lines, end("results")])


# --------------------------------------------------------------------------- bench


def _range(node: dict[str, Any], key: str, digits: int = 2) -> str:
    """``node[key]``, with the range over processes when there are several."""
    runs = node.get(f"{key}_per_process", [])
    spread = f" ({min(runs):.{digits}f}–{max(runs):.{digits}f})" if len(runs) > 1 else ""
    return f"{node[key]:.{digits}f}{spread}"


def _passes(row: dict[str, Any], impl: str) -> str:
    return (f"{row['train_fwd']['passes'][impl]['total']:.0f} / "
            f"{row['train_fwd_bwd']['passes'][impl]['total']:.0f}")


def _kept(kept: dict[str, Any]) -> str:
    copies = kept["f32_copies_of_bf16"]
    return f"{kept['over_x']:.1f} x" + (f", {copies} float32 copies" if copies else "")


def _layer_table(bench: dict[str, Any]) -> list[str]:
    lines = [
        "| shape | train fwd+bwd, jaxbn / flax | train fwd, jaxbn / flax | eval, jaxbn / flax "
        "| passes fwd / fwd+bwd, jaxbn (flax) | passes under vmap, jaxbn (flax) "
        "| kept for the backward, jaxbn (flax) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in bench["layers"]:
        vmap = row["vmap_passes_train_fwd_bwd"]
        lines.append(
            f"| {row['shape']} | {_range(row['train_fwd_bwd'], 'jaxbn_over_flax')} "
            f"| {_range(row['train_fwd'], 'jaxbn_over_flax')} "
            f"| {_range(row['eval'], 'jaxbn_over_flax')} "
            f"| {_passes(row, 'jaxbn')} ({_passes(row, 'flax')}) "
            f"| {vmap['jaxbn']['under_vmap']:.0f} ({vmap['flax']['under_vmap']:.0f}) "
            f"| {_kept(row['residuals']['jaxbn'])} ({_kept(row['residuals']['flax'])}) |"
        )
    return lines


def _network_label(model: str, config: dict[str, Any]) -> str:
    if model == "mlp":
        return (f"{config['depth']} × (Dense {config['width']} → BN → relu), batch "
                f"{config['batch']}, {config['optimizer']}")
    half = model.endswith("_bf16")
    precision = " in bfloat16 (the model's and BatchNorm's dtype)" if half else ""
    return f"ResNet-50{precision}, batch {config['batch']} at {config['size']}×{config['size']}, " \
           f"{config['optimizer']}"


def _network_table(bench: dict[str, Any]) -> list[str]:
    lines = [
        "| network | step, jaxbn / flax | step, no norm / flax | XLA compile, jaxbn / flax "
        "| trace + lower, jaxbn / flax | trace, jaxbn / flax |",
        "|---|---|---|---|---|---|",
    ]
    for model, step in bench["steps"].items():
        compiled = bench["compile"][model]
        none_over_flax = step["ms"]["none"] / step["ms"]["flax"]
        lines.append(
            f"| {_network_label(model, step['config'])} | {_range(step, 'jaxbn_over_flax')} "
            f"| {none_over_flax:.2f} | {_range(compiled, 'compile_jaxbn_over_flax')} "
            f"| {_range(compiled, 'lower_jaxbn_over_flax')} "
            f"| {_range(compiled, 'trace_jaxbn_over_flax')} |"
        )
    return lines


def render_bench(bench: dict[str, Any] | None) -> str:
    """The ``bench`` section, markers included, for the recorded bench (or None)."""
    lines = [begin("bench"), ""]
    if bench is None:
        lines += [f"Not recorded yet: `{BENCH_COMMAND}` records it, then "
                  "`python -m experiments docs` puts it here.", ""]
        return "\n".join([*lines, end("bench")])
    meta = bench.get("meta", {})
    load = meta.get("load_average") or []
    lines += [
        f"Recorded with `{meta.get('command', BENCH_COMMAND)}`: commit "
        f"`{(meta.get('commit') or 'unknown')[:10]}`, {meta.get('date')}, "
        f"{meta.get('machine')}, {bench['device']} ({bench['device_kind']}), jax "
        f"{bench['jax']}, flax {meta.get('flax_version')}; {bench['rounds']} rounds, "
        f"{bench['processes']} timing process(es), compile times the median of "
        f"{bench['compile_processes']} fresh processes"
        + (f"; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after" if load else "")
        + ". Ratios below 1 favour jaxbn.",
        "",
        *([f"Note: {meta['note']}.", ""] if meta.get("note") else []),
        "One layer (NHWC and float32 unless noted; NCHW normalizes axis 1):",
        "",
        *_layer_table(bench),
        "",
        "Whole networks, training step:",
        "",
        *_network_table(bench),
        "",
    ]
    return "\n".join([*lines, end("bench")])


# --------------------------------------------------------------------------- pages, figures


def rewrite(text: str, name: str, section: str) -> str:
    """``text`` with its section ``name`` (markers included) replaced by ``section``.

    Raises:
      ValueError: if ``text`` lacks either marker of ``name``.
    """
    start, stop = text.find(begin(name)), text.find(end(name))
    if start < 0 or stop < start:
        raise ValueError(f"Expected the page to hold the markers {begin(name)!r} and "
                         f"{end(name)!r}, got a page without them.")
    return text[:start] + section + text[stop + len(end(name)):]


def _digest(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]


def figure_digest(path: pathlib.Path) -> str | None:
    """The digest a figure was drawn from, or None for a missing or unmarked file."""
    if not path.is_file():
        return None
    from PIL import Image

    with Image.open(path) as image:
        return getattr(image, "text", {}).get(_DIGEST_KEY)


def _draw(entry: dict[str, Any], path: pathlib.Path) -> None:
    """Draws the claim's figure into ``path``: 256 colours, the entry's digest inside."""
    from PIL import Image, PngImagePlugin

    report.plot_claim(entry, str(path), dpi=90)
    info = PngImagePlugin.PngInfo()
    info.add_text(_DIGEST_KEY, _digest(entry))
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True, pnginfo=info)


def _stale_figures(references: dict[str, dict[str, Any]], docs: pathlib.Path,
                   draw: bool) -> list[str]:
    """The figures that are missing, stale or left over; drawn (or removed) with ``draw``."""
    _, entries = _figure_entries(references)
    folder = docs / FIGURES
    stale = []
    for claim_id, entry in entries.items():
        path = folder / f"{claim_id}.png"
        if figure_digest(path) != _digest(entry):
            stale.append(str(path))
            if draw:
                folder.mkdir(parents=True, exist_ok=True)
                _draw(entry, path)
    for path in sorted(folder.glob("*.png")):
        if path.stem not in entries:
            stale.append(str(path))
            if draw:
                path.unlink()
    return stale


def main(*, check: bool = False, docs: pathlib.Path = DOCS,
         directory: pathlib.Path = REFERENCE) -> int:
    """Rewrites (or with ``check``, compares) the rendered sections and the figures; returns
    the exit status: 1 when ``check`` finds a difference."""
    references = load_references(directory)
    sections = {"results": render(references), "bench": render_bench(load_bench(directory))}
    stale = []
    for name, page in SECTIONS.items():
        path = docs / page
        text = path.read_text()
        rendered = rewrite(text, name, sections[name])
        if rendered != text:
            stale.append(str(path))
            if not check:
                path.write_text(rendered)
    stale += _stale_figures(references, docs, draw=not check)
    if check:
        for path in stale:
            print(f"{path} differs from the recorded runs; run `python -m experiments docs`")
        if not stale:
            print("the docs match the recorded runs")
        return 1 if stale else 0
    print("\n".join(f"wrote {path}" for path in stale) or "the docs were up to date")
    return 0

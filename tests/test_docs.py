"""README and docs/: every Python example runs as written and does what it says; the
rendered tables and figures are the rendering of the recorded runs.

A fenced block whose info string starts with ``python`` runs; one marked ``{.python .no-run}``
(shown highlighted, not run: multi-host code, say) is skipped. The blocks of one page run in
order in one namespace, under JAX's default promotion rules, as a reader runs them (the tests'
default is strict).
"""

import importlib
import importlib.util
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from experiments import docs

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   flags=re.MULTILINE | re.DOTALL)
NO_RUN = ".no-run"


def python_blocks(path: pathlib.Path) -> list[str]:
    """The Python blocks of a markdown file that run, in order, dedented."""
    blocks = []
    for match in FENCE.finditer(path.read_text()):
        info = match["info"].strip()
        if NO_RUN in info:
            continue
        if info.split(" ")[0] in ("python", "py"):
            indent = len(match["indent"])
            blocks.append("".join(line[indent:] for line in
                                  match["body"].splitlines(keepends=True)))
        elif "py" in info:
            raise ValueError(f"Expected a python block's fence to read ```python or "
                             f"```{{.python {NO_RUN}}}, got ```{info} in {path}.")
    return blocks


def run_blocks(path: pathlib.Path) -> dict:
    """Runs the Python blocks of ``path`` in order in one namespace; returns the namespace."""
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for block in python_blocks(path):
            exec(compile(block, str(path), "exec"), namespace)
    return namespace


def test_readme_python_blocks_run():
    assert len(python_blocks(README)) >= 1, "README lost its example"
    namespace = run_blocks(README)
    # The example's claims: the state advanced by one batch, eval kept it, outputs normalized.
    assert int(namespace["state"].count) == 1
    y = np.asarray(namespace["y"])
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, atol=1e-3)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_python_blocks_run(page):
    run_blocks(page)


def test_every_guide_has_runnable_examples():
    # Rendered pages (results, timings) and index pages hold no example of their own.
    guides = [p for p in PAGES if p.parent.name == "docs" and p.stem not in
              ("index", "changelog", "experiments", "converting")
              and not p.stem.startswith("performance")]
    assert guides, "docs/ lost its guides"
    assert [p.name for p in guides if not python_blocks(p)] == []


def test_block_rules(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n\n!!! note\n    ```python\n    y = x + 1\n"
                    "    ```\n\n```{.python .no-run}\nraise SystemExit\n```\n\n```bash\nls\n```\n")
    assert python_blocks(page) == ["x = 1\n", "y = x + 1\n"]
    assert run_blocks(page)["y"] == 2
    page.write_text("```python3\nx = 1\n```\n")
    with pytest.raises(ValueError, match=r"Expected a python block's fence .* got ```python3"):
        python_blocks(page)


def test_docs_match_the_recorded_runs():
    """docs/experiments.md, docs/performance.md and docs/figures/ are what
    `python -m experiments docs` renders from experiments/reference/: rerun it after
    recording a suite or the bench."""
    assert docs.main(check=True) == 0


def _entry(verdict: str) -> dict:
    arm = {"label": "BN", "mean": 0.5, "ci95": 0.01}
    return {"verdict": verdict, "metric": "final test accuracy", "with_bn": arm,
            "without_bn": {**arm, "label": "no BN", "ci95": None}, "claim": "BN helps"}


def _results(mode: str, verdicts: dict[str, str]) -> dict:
    meta = {"command": docs.MODES[mode], "mode": mode, "seeds": 3, "dataset": "mnist1d:4000",
            "commit": "0123456789abcdef", "uncommitted_changes": False,
            "date": "2030-01-02T03:04:05+00:00", "machine": "a CPU, 2 cores", "devices": "8 x cpu",
            "jax_version": "0.10.2", "flax_version": "0.12.8", "runtime_s": 300.0}
    return {"meta": meta, "claims": {c: _entry(v) for c, v in verdicts.items()}}


def test_results_rendering_names_each_mode_and_where_the_verdicts_differ():
    quick = _results("quick", {"convergence": "holds", "placement": "does not hold"})
    only_quick = docs.render({"quick": quick})
    assert "Recorded with `python -m experiments --out experiments/reference/quick`: 3 seeds" \
        in only_quick
    assert "commit `0123456789`, 2030-01-02T03:04:05+00:00, a CPU, 2 cores" in only_quick
    assert "| convergence | **holds** | final test accuracy | BN: 0.5 ± 0.01 | no BN: 0.5 ± n/a |" \
        in only_quick
    assert f"Not recorded yet: `{docs.MODES['full']}`" in only_quick
    assert "Known once both modes are recorded." in only_quick
    assert "![placement, quick mode: does not hold](figures/placement.png)" in only_quick
    full = _results("full", {"convergence": "inconclusive", "placement": "does not hold"})
    both = docs.render({"quick": quick, "full": full})
    assert "| convergence | holds | inconclusive |" in both
    assert "| placement |" not in both.split("disagree")[1].split("### Figures")[0]
    assert "![convergence, full mode: inconclusive](figures/convergence.png)" in both
    agree = docs.render({"quick": quick, "full": _results("full", {"convergence": "holds"})})
    assert "Nowhere: every claim gets the same verdict in both modes." in agree
    assert "Drawn once a mode is recorded." in docs.render({})


def test_bench_rendering_shows_the_recorded_ratios_and_counts():
    bench = docs.load_bench()
    assert bench is not None, f"record the bench: {docs.BENCH_COMMAND}"
    rendered = docs.render_bench(bench)
    for row in bench["layers"]:
        line = next(x for x in rendered.splitlines() if x.startswith(f"| {row['shape']} "))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        for cell, mode in zip(cells[1:4], ("train_fwd_bwd", "train_fwd", "eval"), strict=True):
            assert cell.startswith(f"{row[mode]['jaxbn_over_flax']:.2f}"), (cell, mode)
        passes = row["train_fwd_bwd"]["passes"]
        assert f"/ {passes['jaxbn']['total']:.0f} (" in cells[4], cells[4]
    for model, step in bench["steps"].items():
        assert f"| {step['jaxbn_over_flax']:.2f}" in rendered, model
    assert "Not recorded yet" in docs.render_bench(None)
    spread = {"jaxbn_over_flax": 0.9, "jaxbn_over_flax_per_process": [0.8, 0.9, 1.1]}
    assert docs._range(spread, "jaxbn_over_flax") == "0.90 (0.80–1.10)"


def test_docs_command_checks_then_rewrites(tmp_path):
    """Sections and figures: --check finds them stale, the command rewrites them, --check
    passes, and a changed result makes its figure stale again."""
    page_dir, reference = tmp_path / "docs", tmp_path / "reference"
    page_dir.mkdir()
    for name, page in docs.SECTIONS.items():
        (page_dir / page).write_text(
            f"# {name}\n\n{docs.begin(name)}\nstale\n{docs.end(name)}\n\nrest\n")
    recorded = docs.load_references()["quick"]
    results = {"meta": recorded["meta"], "claims": {"cnn": recorded["claims"]["cnn"]}}
    (reference / "quick").mkdir(parents=True)
    (reference / "quick" / "results.json").write_text(json.dumps(results))
    (page_dir / docs.FIGURES).mkdir()
    (page_dir / docs.FIGURES / "gone.png").write_bytes(b"not a figure of any claim")
    assert docs.main(check=True, docs=page_dir, directory=reference) == 1
    assert docs.main(docs=page_dir, directory=reference) == 0
    assert docs.main(check=True, docs=page_dir, directory=reference) == 0
    for name, page in docs.SECTIONS.items():
        text = (page_dir / page).read_text()
        assert "stale" not in text and text.startswith(f"# {name}") and text.endswith("\nrest\n")
    assert sorted(p.name for p in (page_dir / docs.FIGURES).iterdir()) == ["cnn.png"]
    results["claims"]["cnn"]["verdict"] = "does not hold"
    (reference / "quick" / "results.json").write_text(json.dumps(results))
    experiments_page = page_dir / docs.SECTIONS["results"]
    experiments_page.write_text(docs.rewrite(experiments_page.read_text(), "results",
                                             docs.render(docs.load_references(reference))))
    assert docs.main(check=True, docs=page_dir, directory=reference) == 1  # the figure alone


def test_rewrite_names_the_missing_markers():
    with pytest.raises(ValueError, match=r"Expected the page to hold the markers '<!-- bench: "):
        docs.rewrite("# no markers\n", "bench", "")


# --------------------------------------------------------------------------- API reference

API_PAGES = {"jaxbn": "jaxbn.md", "jaxbn.linen": "linen.md", "jaxbn.nnx": "nnx.md",
             "jaxbn.equinox": "equinox.md", "jaxbn.interop": "interop.md"}


def _griffe_extension():
    spec = importlib.util.spec_from_file_location(
        "griffe_docstrings", ROOT / "docs" / "griffe_docstrings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jaxbn_package():
    import griffe

    return griffe.load("jaxbn", search_paths=[str(ROOT)],
                       extensions=griffe.load_extensions(_griffe_extension().SphinxToMarkdown))


def test_api_reference_covers_every_public_module_and_name(jaxbn_package):
    """Each public module has a page; jaxbn's page places each name of jaxbn.__all__ under its
    topic, the submodules' pages hold a module-level directive (so a new name appears by
    itself); and every public name has a docstring to render."""
    import pkgutil

    import jaxbn

    public = {f"jaxbn.{m.name}" for m in pkgutil.iter_modules(jaxbn.__path__)
              if not m.name.startswith("_")} | {"jaxbn"}
    assert public == set(API_PAGES)
    directives = set(re.findall(r"^::: (\S+)$", (ROOT / "docs" / "api" / "jaxbn.md").read_text(),
                                flags=re.MULTILINE))
    assert directives == {f"jaxbn.{name}" for name in jaxbn.__all__}
    undocumented = []
    for module, page in API_PAGES.items():
        if module != "jaxbn":
            assert f"::: {module}\n" in (ROOT / "docs" / "api" / page).read_text(), page
        griffe_module = jaxbn_package[module.removeprefix("jaxbn.")] \
            if module != "jaxbn" else jaxbn_package
        names = importlib.import_module(module).__all__
        undocumented += [f"{module}.{name}" for name in names
                         if not griffe_module[name].docstring]
    assert undocumented == []


def test_sphinx_roles_become_links_or_code(jaxbn_package):
    rewrite = _griffe_extension().rewrite_roles
    assert rewrite(":func:`~jaxbn.batch_norm` and :class:`BatchStats`", "jaxbn._state",
                   jaxbn_package) == "[`batch_norm`][jaxbn.batch_norm] and " \
                                     "[`BatchStats`][jaxbn.BatchStats]"
    assert rewrite(":func:`from_torch`", "jaxbn.interop", jaxbn_package) == \
        "[`from_torch`][jaxbn.interop.from_torch]"
    assert rewrite(":mod:`jaxbn._train`, :func:`combine`", "jaxbn._moments", jaxbn_package) == \
        "`jaxbn._train`, `combine`"
    docstring = jaxbn_package["batch_norm"].docstring.value
    assert ":func:" not in docstring and ":class:" not in docstring
    assert "updated:\n\n```text\nμ_B = mean(x)" in docstring


def test_literal_blocks_become_fences():
    fence = _griffe_extension().fence_literal_blocks
    text = "Usage::\n\n  >>> x = 1\n  >>> x\n  1\n\nAfter."
    assert fence(text) == "Usage:\n\n```pycon\n>>> x = 1\n>>> x\n1\n```\n\nAfter."
    assert fence("Formula::\n\n    y = a * x\n") == "Formula:\n\n```text\ny = a * x\n```"
    assert fence("No block here.\nx: y") == "No block here.\nx: y"


def test_provenance_counts_code_changes_but_not_rewritten_reference_results(tmp_path, monkeypatch):
    """A suite recorded while another mode's results.json is being rewritten ran committed
    code; an edit to any other tracked file makes the recording 'with uncommitted changes'."""
    import subprocess

    from experiments import suite

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    results = tmp_path / "experiments" / "reference" / "quick" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    monkeypatch.setattr(suite, "_REPO", str(tmp_path))
    assert suite.provenance()["uncommitted_changes"] is False
    results.write_text('{"claims": {}}')
    assert suite.provenance()["uncommitted_changes"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert suite.provenance()["uncommitted_changes"] is True

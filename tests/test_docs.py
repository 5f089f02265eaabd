"""README: its Python examples run as written and do what they say; its results section is
the rendering of the recorded runs."""

import pathlib
import re

import jax
import numpy as np

from experiments import readme

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2, "README lost its quickstart examples"
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    # The quickstart's claims: the state advanced by one batch, eval kept it, outputs normalized.
    assert int(namespace["state"].count) == 1
    y = np.asarray(namespace["y"])
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, atol=1e-3)
    assert namespace["layer"].use_running_average is True


def test_readme_results_match_the_recorded_runs():
    """README's results section is what `python -m experiments readme` renders from
    experiments/reference/: rerun it after recording a suite."""
    text = README.read_text()
    assert readme.rewrite(text, readme.load_references()) == text


def _entry(verdict: str) -> dict:
    arm = {"label": "BN", "mean": 0.5, "ci95": 0.01}
    return {"verdict": verdict, "metric": "final test accuracy", "with_bn": arm,
            "without_bn": {**arm, "label": "no BN", "ci95": None}}


def _results(mode: str, verdicts: dict[str, str]) -> dict:
    meta = {"command": readme.MODES[mode], "mode": mode, "seeds": 3, "dataset": "mnist1d:4000",
            "commit": "0123456789abcdef", "uncommitted_changes": False,
            "date": "2030-01-02T03:04:05+00:00", "machine": "a CPU, 2 cores", "devices": "8 x cpu",
            "jax_version": "0.10.2", "flax_version": "0.12.8", "runtime_s": 300.0}
    return {"meta": meta, "claims": {c: _entry(v) for c, v in verdicts.items()}}


def test_readme_rendering_names_each_mode_and_where_the_verdicts_differ():
    quick = _results("quick", {"convergence": "holds", "placement": "does not hold"})
    only_quick = readme.render({"quick": quick})
    assert "Recorded with `python -m experiments --out experiments/reference/quick`: 3 seeds" \
        in only_quick
    assert "commit `0123456789`, 2030-01-02T03:04:05+00:00, a CPU, 2 cores" in only_quick
    assert "| convergence | **holds** | final test accuracy | BN: 0.5 ± 0.01 | no BN: 0.5 ± n/a |" \
        in only_quick
    assert f"Not recorded yet: `{readme.MODES['full']}`" in only_quick
    assert "Known once both modes are recorded." in only_quick
    full = _results("full", {"convergence": "inconclusive", "placement": "does not hold"})
    both = readme.render({"quick": quick, "full": full})
    assert "| convergence | holds | inconclusive |" in both
    assert "| placement |" not in both.split("disagree")[1]
    agree = readme.render({"quick": quick, "full": _results("full", {"convergence": "holds"})})
    assert "Nowhere: every claim gets the same verdict in both modes." in agree


def test_readme_command_checks_then_rewrites(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\n{readme.BEGIN}\nstale\n{readme.END}\n\nrest\n")
    assert readme.main(check=True, readme=path, directory=tmp_path) == 1
    assert readme.main(readme=path, directory=tmp_path) == 0
    assert readme.main(check=True, readme=path, directory=tmp_path) == 0
    text = path.read_text()
    assert "stale" not in text and text.startswith("# title") and text.endswith("\n\nrest\n")


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

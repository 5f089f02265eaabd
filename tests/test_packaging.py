"""The distribution: the sdist and the wheel build offline, and the wheel installs jaxbn only.

They are built as ``python -m build --no-isolation`` builds them (the sdist, then the wheel
from the unpacked sdist), with the backend that pyproject.toml names, in a fresh process where
jax, jaxlib and flax cannot be imported: the version must come from ``jaxbn/__init__.py``
without importing it. The sources are copied first, so the build leaves nothing in the checkout.
"""

from __future__ import annotations

import email
import email.message
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import jaxbn
from experiments.__main__ import EXTRAS

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LIBRARY = {"jax", "jaxlib", "flax"}  # what jaxbn imports (equinox: the [equinox] extra)

# Calls one PEP 517 hook: argv is the backend, the hook and the output directory.
HOOK = """
import importlib, sys
sys.modules.update(dict.fromkeys(["jax", "jaxlib", "flax"]))  # as if not installed
backend, hook, out = sys.argv[1:]
print(getattr(importlib.import_module(backend), hook)(out))
"""


def _hook(hook: str, source: Path, out: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-c", HOOK, PYPROJECT["build-system"]["build-backend"], hook, str(out)],
        cwd=source, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "checkout"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "dist", "results", "__pycache__", ".*_cache",
        ".hypothesis"))
    out = tmp / "out"
    out.mkdir()
    sdist = _hook("build_sdist", source, out)
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    return {"sdist": sdist, "wheel": _hook("build_wheel", unpacked, out)}


def _wheel_names(dist: dict[str, Path]) -> list[str]:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        return wheel.namelist()


def _metadata(dist: dict[str, Path]) -> email.message.Message:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        return email.message_from_bytes(
            wheel.read(f"jaxbn-{jaxbn.__version__}.dist-info/METADATA"))


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match.group().lower()


def test_the_wheel_installs_jaxbn_only(dist):
    names = _wheel_names(dist)
    info = f"jaxbn-{jaxbn.__version__}.dist-info/"
    assert [n for n in names if not n.startswith(("jaxbn/", info))] == []
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "jaxbn").glob("*.py")}
    assert modules <= set(names)
    assert "jaxbn/py.typed" in names


def test_the_library_requires_jax_jaxlib_and_flax_only(dist):
    requires = _metadata(dist).get_all("Requires-Dist")
    unconditional = {_name(r) for r in requires if "extra ==" not in r}
    assert unconditional == LIBRARY
    assert {_name(r) for r in requires if 'extra == "experiments"' in r} >= {"optax"}
    chex = [r for r in requires if _name(r) == "chex"]  # the tests' assertions, not the library's
    assert chex and all('extra == "test"' in r for r in chex), chex


def test_one_version_in_the_wheel_the_sdist_and_the_changelog(dist):
    assert _metadata(dist)["Version"] == jaxbn.__version__
    assert dist["sdist"].name == f"jaxbn-{jaxbn.__version__}.tar.gz"
    assert dist["wheel"].name.startswith(f"jaxbn-{jaxbn.__version__}-")
    assert "version" not in PYPROJECT["project"]  # dynamic, from jaxbn.__version__
    releases = re.findall(r"^## \[(\d[^\]]*)\]", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert releases[0] == jaxbn.__version__


def test_the_sdist_holds_the_library_and_its_description(dist):
    with tarfile.open(dist["sdist"]) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "jaxbn/__init__.py", "jaxbn/py.typed"} <= names
    assert not any(n.startswith("experiments/") for n in names)


def test_the_command_line_checks_the_experiments_extra_that_pyproject_declares():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert {m.lower() for m in modules.values()} == {_name(r) for r in extras[extra]}

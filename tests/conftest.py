"""Test configuration: 8 host CPU devices, strict JAX semantics, one compilation cache per run.

``jax_num_cpu_devices`` takes effect when the CPU backend starts; it is started here, so no
test can change the count afterwards (the command line's ``--devices`` then only checks it).
Subprocesses get their own count: tests/multihost_worker.py sets 2, ``python -m experiments
--devices N`` sets N.

The process that starts the run (pytest's, or xdist's controller) makes a temporary directory
for JAX's persistent compilation cache, and its environment gives it to the xdist workers and
to every subprocess a test starts, before any of them imports jax: a program that one process
compiled is read back by the others (and by the same process, when a test builds an identical
one again), whatever its size or compile time. The directory is removed when the run ends.

The same environment sets ``XLA_FLAGS`` for fast XLA:CPU code generation (tests/_codegen.py).
"""

import os
import shutil
import tempfile

import _codegen
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.update({} if "PYTEST_XDIST_WORKER" in os.environ else {  # workers inherit it
    "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="jaxbn-tests-xla-"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "XLA_FLAGS": _codegen.xla_flags(os.environ.get("XLA_FLAGS", "")),
})

import jax

_CACHE_OWNER = "PYTEST_XDIST_WORKER" not in os.environ  # the process that removes it

# The same here, in case jax was imported before this file (it reads the environment then).
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_num_cpu_devices", 8)
assert jax.device_count() == 8, jax.devices()
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# A script run in subprocesses by test_multihost.py, not a test module.
collect_ignore = ["multihost_worker.py"]

# The module-scoped fixtures that take seconds to build, by test file: a full command-line
# run, a two-process run, the sdist and the wheel, trained models. Under ``--dist loadgroup``
# every test that uses one runs on the same xdist worker, so it is built once per run instead
# of once per worker.
SHARED_FIXTURES = {
    "test_experiments.py": ("full_convergence",),
    "test_multihost.py": ("results",),
    "test_packaging.py": ("dist",),
    "test_bench.py": ("toy_passes", "toy_resnet_variables"),
    "test_interop.py": ("trained_torch_bn",),
    "test_recalibrate.py": ("mlp",),
    "test_resume.py": ("uninterrupted",),
}


# The files whose tests take minutes between them (subprocess runs, the toy bench), first:
# xdist hands out work in collection order, so a long group started last would leave one
# worker running it alone at the end.
LONG_FIRST = ("test_resume.py", "test_default_codegen.py", "test_bench.py", "test_experiments.py",
              "test_experiments_variants.py", "test_multihost.py", "test_packaging.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads xdist_group into the node ids
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONG_FIRST.index(item.path.name)  # stable: the rest in order
               if item.path.name in LONG_FIRST else len(LONG_FIRST))
    for item in items:
        if item.get_closest_marker("default_codegen") is not None:
            where = f"tests/{item.path.name}"
            assert where in _codegen.FILES, f"add {where} to tests/_codegen.py's FILES"
            if not _codegen.DEFAULT:
                item.add_marker(pytest.mark.skip(
                    reason="bitwise across programs: run at XLA's default code generation by "
                    "tests/test_default_codegen.py"))
        shared = [name for name in SHARED_FIXTURES.get(item.path.name, ())
                  if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.path.name}::{shared[0]}"))


def pytest_unconfigure(config):
    if _CACHE_OWNER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

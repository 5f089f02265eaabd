"""The tests marked ``default_codegen``, run at XLA's default code generation.

The suite compiles with fast XLA:CPU code generation (tests/_codegen.py). A test that asserts
bitwise equality between two different programs (flax's linen/nnx consistency cases) depends
on how the code generator rounds, so it runs here in a pytest subprocess whose environment
turns those flags off. Its assertions are unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import _codegen
import pytest


@pytest.mark.slow
@pytest.mark.skipif(_codegen.DEFAULT, reason="this run already is at the default code generation")
def test_default_codegen_tests_pass_at_xla_s_default_code_generation():
    env = dict(os.environ, JAXBN_TESTS_DEFAULT_CODEGEN="1")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if f not in _codegen.FAST)
    env.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "default_codegen",
         "-n", "0", *_codegen.FILES],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 16 and "skipped" not in summary, summary

"""XLA:CPU code generation for the test run (set up by tests/conftest.py).

The test programs are tiny and run once or a few times, so compiling them is most of the
suite's time: the run compiles with LLVM at -O0, without its expensive passes. The flags act
after XLA's HLO passes, so the optimized HLO that the pass and collective counts read is the
same as with the defaults. Tests marked ``default_codegen`` (bitwise equality of two different
programs, whose rounding the code generator decides) run at the defaults instead, in the
subprocess of tests/test_default_codegen.py, which sets ``JAXBN_TESTS_DEFAULT_CODEGEN=1``.
"""

from __future__ import annotations

import os

FAST = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
DEFAULT = os.environ.get("JAXBN_TESTS_DEFAULT_CODEGEN") == "1"
# The files holding the default_codegen tests (tests/test_default_codegen.py runs them).
FILES = ("tests/test_upstream_flax.py",)


def xla_flags(existing: str) -> str:
    """``existing`` XLA flags with the fast code generation's, unless this run is at the
    defaults (then without them)."""
    kept = [flag for flag in existing.split() if flag not in FAST]
    return " ".join(kept if DEFAULT else [*FAST, *kept])

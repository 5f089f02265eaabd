"""XLA:CPU code generation for the test run (set up by tests/conftest.py).

The test programs are tiny and run once or a few times, so compiling them is most of the
suite's time: the run compiles with LLVM at -O0, without its expensive passes, with XLA:CPU's
classic loop emitters instead of its MLIR fusion emitters, and in one LLVM module instead of
several compiled in parallel (on a sample of the suite's programs: 0.9 s to compile, against
3.7 s at XLA's defaults and 3.0 s with the first two flags alone). The flags act after XLA's
HLO fusion passes, so the optimized HLO that the pass and collective counts read has the same
fusions as with the defaults (the one difference: a lone broadcast is left unwrapped, not put
in a fusion of its own). Tests marked ``default_codegen`` (bitwise equality of two different
programs, whose rounding the code generator decides) run at the defaults instead, in the
subprocess of tests/test_default_codegen.py, which sets ``JAXBN_TESTS_DEFAULT_CODEGEN=1``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

FAST = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
        "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")
DEFAULT = os.environ.get("JAXBN_TESTS_DEFAULT_CODEGEN") == "1"
# The files holding the default_codegen tests (tests/test_default_codegen.py runs them).
FILES = ("tests/test_upstream_flax.py",)


# jaxlib's CPU client alone (0.3 s, where importing jax takes 2), or jax's where that is gone.
_START_CPU = """
try:
    from jaxlib import xla_client
    xla_client.make_cpu_client()
except (ImportError, AttributeError):
    import jax
    jax.devices()
"""


def _known(flags: tuple[str, ...]) -> bool:
    """Whether this jaxlib's XLA takes ``flags`` (it aborts on a flag it does not know, and a
    newer jaxlib may drop one): a CPU backend started with them in a subprocess."""
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", _START_CPU], env=env,
                          capture_output=True).returncode == 0


@functools.cache
def fast() -> tuple[str, ...]:
    """The flags of :data:`FAST` that this jaxlib knows (all of them, checked at once, in the
    usual case)."""
    if _known(FAST):
        return FAST
    return tuple(flag for flag in FAST if _known((flag,)))


def xla_flags(existing: str) -> str:
    """``existing`` XLA flags with the fast code generation's, unless this run is at the
    defaults (then without them)."""
    kept = [flag for flag in existing.split() if flag not in FAST]
    return " ".join(kept if DEFAULT else [*fast(), *kept])

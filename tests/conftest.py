"""Test configuration: 8 host CPU devices and strict JAX semantics.

XLA_FLAGS must be set before jax is imported anywhere, so this happens at the top of the
first module pytest loads.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# A script run in subprocesses by test_multihost.py, not a test module.
collect_ignore = ["multihost_worker.py"]

"""Test configuration: 8 host CPU devices and strict JAX semantics.

``jax_num_cpu_devices`` takes effect when the CPU backend starts; it is started here, so no
test can change the count afterwards (the command line's ``--devices`` then only checks it).
Subprocesses get their own count: tests/multihost_worker.py sets 2, ``python -m experiments
--devices N`` sets N.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)
assert jax.device_count() == 8, jax.devices()
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# A script run in subprocesses by test_multihost.py, not a test module.
collect_ignore = ["multihost_worker.py"]

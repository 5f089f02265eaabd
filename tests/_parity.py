"""Helpers shared by the parity tests of the Flax drop-ins (test_linen.py, test_nnx.py)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

TOL = {"atol": 2e-5, "rtol": 2e-5}
# A bfloat16 output is a float32 result rounded to 8 significant bits (one ulp is 2**-8, about
# 0.4% relative). jaxbn and flax round float32 results that differ in their last bits, which can
# land on neighbouring bfloat16 values: allow two bfloat16 ulps.
BF16_TOL = {"atol": 1e-2, "rtol": 1e-2}


def standard():
    """Flax does not run under strict dtype promotion: both sides of a parity test use this."""
    return jax.numpy_dtype_promotion("standard")


def batches(seed: int) -> Callable[..., jax.Array]:
    """``data(shape, step, dtype, loc, scale)``: a batch with nonzero mean and non-unit
    variance, different at every step, drawn from ``seed``."""

    def data(shape, step, dtype=jnp.float32, loc=2.0, scale=3.0):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return (loc + scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return data


def make_mask(kind, shape):
    if kind is None:
        return None
    if kind == "rows":  # (N, 1, ...): whole examples left out of the statistics
        mask = np.ones((shape[0],) + (1,) * (len(shape) - 1), bool)
        mask[::3] = False
    elif kind == "full":
        mask = np.ones(shape, bool)
    elif kind == "random":  # elementwise; every feature keeps many valid entries
        mask = np.random.default_rng(0).random(shape) < 0.7
    else:
        raise ValueError(kind)
    return jnp.asarray(mask)


def assert_close(actual, expected, tol=TOL):
    """Same dtype and shape, and values within ``tol`` (complex values compared as such)."""
    actual, expected = jnp.asarray(actual), jnp.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    wide = np.complex64 if jnp.iscomplexobj(actual) else np.float32
    np.testing.assert_allclose(np.asarray(actual, wide), np.asarray(expected, wide), **tol)

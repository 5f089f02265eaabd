"""Helpers shared by the parity tests of the Flax drop-ins (test_linen.py, test_nnx.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def assert_tree_close(actual: Any, expected: Any, tol: float, what: str) -> None:
    """Every leaf of ``actual`` within ``rtol=tol`` of ``expected``'s, and within ``tol`` times
    the largest entry of that expected leaf (a leaf's near-zero entries have no relative
    scale of their own); the same tree structure and shapes."""
    actual_leaves, actual_def = jax.tree.flatten(actual)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    assert actual_def == expected_def, (what, actual_def, expected_def)
    for index, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        a = np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)
        e = np.asarray(e, np.float64)
        assert a.shape == e.shape, (what, index, a.shape, e.shape)
        scale = np.max(np.abs(e), initial=0.0)
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale,
                                   err_msg=f"{what}, leaf {index}")

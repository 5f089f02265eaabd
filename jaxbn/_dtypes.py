"""Explicit float promotion that also works under strict dtype promotion."""

from __future__ import annotations

from typing import Any

import numpy as np


def wider_float(*dtypes: Any) -> np.dtype:
    """The narrowest floating dtype that holds each of ``dtypes`` exactly.

    ``jnp.promote_types`` refuses mixed floats under ``jax_numpy_dtype_promotion='strict'``;
    the library must work in users' strict mode too, so it promotes explicitly.
    """
    floats = [np.dtype(d) for d in dtypes if d is not None]
    widest = max(floats, key=lambda d: d.itemsize)
    if any(d.itemsize == widest.itemsize and d != widest for d in floats):
        return np.dtype(np.float32)  # float16 with bfloat16
    return widest


def stats_dtype(dtype: Any) -> np.dtype:
    """The dtype statistics are computed and stored in: float32, or float64 for float64."""
    return wider_float(dtype, np.float32)

"""Explicit dtype promotion that also works under strict dtype promotion.

``jnp.promote_types`` refuses mixed floats under ``jax_numpy_dtype_promotion='strict'``; the
library must work in users' strict mode too, so it promotes explicitly. Complex inputs are
normalized as flax does: a complex mean, a real variance ``E|x - mean|²``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_complex", "real_dtype", "stats_dtype", "wider_float", "with_kind"]


def is_complex(dtype: Any) -> bool:
    return np.dtype(dtype).kind == "c"


def real_dtype(dtype: Any) -> np.dtype:
    """The real dtype of the parts of ``dtype`` (complex64 → float32; reals unchanged)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32 if dtype == np.complex64 else np.float64) if is_complex(
        dtype
    ) else dtype


def with_kind(real: Any, complex_: bool) -> np.dtype:
    """``real`` (a real floating dtype), or the complex dtype with parts of that dtype."""
    real = np.dtype(real)
    if not complex_:
        return real
    return np.dtype(np.complex128 if real.itemsize > 4 else np.complex64)


def wider_float(*dtypes: Any) -> np.dtype:
    """The narrowest floating (or complex) dtype that holds each of ``dtypes`` exactly.

    Complex if any of ``dtypes`` is; its parts are then at least float32. None entries are
    skipped.
    """
    given = [np.dtype(d) for d in dtypes if d is not None]
    reals = [real_dtype(d) for d in given]
    widest = max(reals, key=lambda d: d.itemsize)
    if any(d.itemsize == widest.itemsize and d != widest for d in reals):
        widest = np.dtype(np.float32)  # float16 with bfloat16
    return with_kind(widest, any(is_complex(d) for d in given))


def stats_dtype(dtype: Any) -> np.dtype:
    """The real dtype statistics are computed and stored in: float32, or float64 for
    float64 and complex128 input. (A complex input's mean is :func:`with_kind` of it.)"""
    return wider_float(real_dtype(dtype), np.float32)

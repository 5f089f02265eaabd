"""The normalization arithmetic: per-feature coefficients, then one scale-and-shift.

Every normalizing path of the library (training in :mod:`jaxbn._train`, evaluation, Batch
Renormalization and inference folding) takes its coefficients from :func:`coefficients` and
:func:`multiplier` and applies them with :func:`scale_shift`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._dtypes import is_complex, real_dtype, stats_dtype, wider_float
from ._layout import Layout

__all__ = [
    "affine",
    "coefficients",
    "compute_dtype",
    "multiplier",
    "normalize_eval",
    "scale_shift",
    "y_dtype",
]


def affine(
    params: Mapping[str, ArrayLike | None] | None,
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(scale, bias)`` of ``params`` as arrays, None where absent."""
    params = params or {}
    scale, bias = params.get("scale"), params.get("bias")
    return (
        None if scale is None else jnp.asarray(scale),
        None if bias is None else jnp.asarray(bias),
    )


def compute_dtype(
    x_dtype: Any, *arrays: jax.Array | None, out_dtype: Any = None
) -> np.dtype:
    """The dtype the normalization runs in: float32 or wider, and at least each array's and
    ``out_dtype``'s (complex if any of them is). ``x`` is read in its own dtype and widened
    inside the kernels that use it: a bfloat16 ``x`` with float32 parameters is normalized
    in float32 and never copied to float32 in memory."""
    return wider_float(
        x_dtype, stats_dtype(x_dtype), out_dtype,
        *(None if a is None else a.dtype for a in arrays),
    )


def coefficients(
    var: jax.Array, scale: jax.Array | None, epsilon: Any, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """``(mul, inv_std)``: ``inv_std = rsqrt(var + epsilon)`` and ``mul = scale · inv_std``.

    ``scale`` (None: 1) broadcasts against ``var``. ``inv_std`` is real (the real dtype of
    ``dtype``); ``mul`` is in ``dtype``.
    """
    inv_std = jax.lax.rsqrt(var.astype(real_dtype(dtype)) + epsilon)
    return multiplier(inv_std, scale, dtype), inv_std


def multiplier(inv_std: jax.Array, scale: jax.Array | None, dtype: Any) -> jax.Array:
    """``scale · inv_std`` in ``dtype`` (``inv_std`` alone when there is no scale)."""
    mul = inv_std.astype(dtype)
    return mul if scale is None else mul * scale.astype(dtype)


def scale_shift(
    x: jax.Array,
    mean: jax.Array,
    mul: jax.Array,
    bias: jax.Array | None,
    dtype: Any,
    out_dtype: Any = None,
) -> jax.Array:
    """``y = (x - mean) · mul + bias`` in ``dtype``, returned in ``out_dtype``.

    ``out_dtype`` None is :func:`y_dtype`'s default: ``x``'s dtype (or ``dtype`` when
    only it is complex: a real ``x`` with complex parameters gives a complex ``y``).

    One fused elementwise pass. Subtracting the mean before scaling (rather than adding a
    precomputed ``bias - mean · mul``) keeps ``y`` exact to rounding when ``|mean| >> std``,
    at no cost in a memory-bound kernel.
    """
    y = (x.astype(dtype) - mean.astype(dtype)) * mul.astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.astype(y_dtype(x.dtype, dtype, out_dtype))


def y_dtype(x_dtype: Any, dtype: Any, out_dtype: Any = None) -> np.dtype:
    """The dtype of ``y``: ``out_dtype`` if given, else ``x_dtype``, made complex when the
    computation ``dtype`` is (a real ``x`` with complex parameters gives a complex ``y``)."""
    if out_dtype is not None:
        return np.dtype(out_dtype)
    real_x_complex_y = is_complex(dtype) and not is_complex(x_dtype)
    return np.dtype(dtype if real_x_complex_y else x_dtype)


def normalize_eval(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    params: Mapping[str, ArrayLike | None] | None,
    epsilon: Any,
    lay: Layout,
    out_dtype: Any = None,
) -> jax.Array:
    """Evaluation: ``(x - mean) · (scale · rsqrt(var + eps)) + bias`` in one fused pass,
    written in ``out_dtype`` (None: :func:`y_dtype`'s default).

    The feature-shaped ``mean``, ``var`` and ``params`` are reshaped to broadcast against
    ``x``; per-example ``params`` (of ``x``'s rank) broadcast as they are. Plain JAX
    operations, so every transformation (forward-mode AD included) applies.
    """
    scale, bias = (_placed(p, lay) for p in affine(params))
    shape = lay.broadcast_shape
    dtype = compute_dtype(x.dtype, mean, scale, bias, out_dtype=out_dtype)
    mul, _ = coefficients(var.reshape(shape), scale, epsilon, dtype)
    return scale_shift(x, mean.reshape(shape), mul, bias, dtype, out_dtype)


def _placed(value: jax.Array | None, lay: Layout) -> jax.Array | None:
    if value is None or value.shape != lay.feature_shape:
        return value
    return value.reshape(lay.broadcast_shape)

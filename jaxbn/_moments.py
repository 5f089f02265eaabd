"""Moments of a batch: local per-device moments and their combination across devices.

The single forward collective of a batch-norm layer lives here (:func:`combine`), and so
does the backward's (:func:`sync_sum`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._copies import cpu_copies, widened_reads
from ._dtypes import is_complex, with_kind
from ._layout import AxisName

__all__ = [
    "Moments",
    "abs_sq",
    "combine",
    "inverse_count",
    "local_moments",
    "masked_sum",
    "mean_and_var",
    "merge",
    "sync_sum",
]


class Moments(NamedTuple):
    """Per-feature moments of a set of values, in the statistics dtype (≥ float32)."""

    # Each field has x's rank, size 1 on the reduction axes, so it broadcasts against x.
    valid_count: jax.Array  # number of valid entries (a float, exact below 2**24)
    mean: jax.Array  # mean of the valid entries
    m2: jax.Array  # sum of squared deviations from `mean`


def local_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None,
    dtype: Any,
) -> Moments:
    """Count, mean and M2 of ``x`` over ``reduction_axes``, counting only ``mask``'s entries.

    Two passes, as in the textbook: ``mean = Σ x / n``, then ``M2 = Σ |x - mean|²``, both
    accumulated in ``dtype`` (real; the mean of a complex ``x`` is complex, M2 is real).
    No runtime branch and no reference value to choose: the variance is accurate at any
    mean (flax's default ``E[x²] - E[x]²`` loses it entirely at mean 1e4, std 1), and
    masked entries (which may hold NaN or inf) never enter a sum. XLA:CPU reads ``x`` once
    per sum anyway, so the second pass costs what a second one-pass sum ``Σ x²`` would (4
    passes with the normalization, forward). The results keep the feature axes and have
    size 1 on the reduction axes, so they broadcast against ``x``.
    """
    value_dtype = with_kind(dtype, is_complex(x.dtype))
    if not reduction_axes:  # every axis is a feature axis: one entry per feature (vmap sync)
        count = jnp.ones(x.shape, dtype) if mask is None else jnp.broadcast_to(mask, x.shape)
        count = count.astype(dtype)
        return Moments(count, x.astype(value_dtype) * count.astype(value_dtype),
                       jnp.zeros(x.shape, dtype))
    valid = None if mask is None else jnp.broadcast_to(mask, x.shape)
    if valid is None:
        kept = tuple(1 if a in reduction_axes else d for a, d in enumerate(x.shape))
        count = jnp.full(kept, math.prod(x.shape[a] for a in reduction_axes), dtype)
    else:
        count = jnp.sum(valid, axis=reduction_axes, keepdims=True, dtype=dtype)

    for_mean, for_m2 = widened_reads(x, value_dtype, 2)
    inv_count = inverse_count(count, value_dtype)
    mean = masked_sum(for_mean.astype(value_dtype), valid, reduction_axes) * inv_count
    (centre,) = cpu_copies(mean, 1)  # not shared with the normalization's broadcast
    m2 = masked_sum(abs_sq(for_m2.astype(value_dtype) - centre), valid, reduction_axes)
    return Moments(count, mean, m2)


def abs_sq(value: jax.Array) -> jax.Array:
    """``|value|²``, real (``real² + imag²`` for complex values)."""
    if is_complex(value.dtype):
        return jnp.square(value.real) + jnp.square(value.imag)
    return jnp.square(value)


def combine(
    local: Moments, axis_name: AxisName, axis_index_groups: Any = None
) -> Moments:
    """Combines per-device moments into the moments of the union, with one collective.

    Every device contributes ``(count, mean, M2)``; one ``all_gather`` gives each device all
    of them, and Chan et al.'s parallel formula merges them locally::

        n = Σ n_i,   mean = Σ n_i mean_i / n,   M2 = Σ M2_i + Σ n_i (mean_i - mean)²

    Devices are weighted by their true counts (a device whose entries are all masked out
    contributes nothing) and no sum of squares of large values is ever formed, so the result
    is as accurate as a single-device two-pass computation. This is the scheme of PyTorch's
    SyncBatchNorm; it moves ``3 * devices * features`` numbers, which is small next to any
    gradient all-reduce. The backward pass needs one collective too (:func:`sync_sum`).
    """
    complex_mean = is_complex(local.mean.dtype)
    parts = (local.mean.real, local.mean.imag) if complex_mean else (local.mean,)
    stacked = jnp.stack((local.valid_count, *parts, local.m2))  # [3 or 4, *feature_shape]
    gathered = _all_gather(stacked, axis_name, axis_index_groups)  # [devices, 3|4, ...]
    counts, m2s = gathered[:, 0], gathered[:, -1]
    means = lax.complex(gathered[:, 1], gathered[:, 2]) if complex_mean else gathered[:, 1]
    count = jnp.sum(counts, axis=0)
    weights = counts.astype(means.dtype)
    mean = jnp.sum(weights * means, axis=0) / jnp.maximum(count, 1).astype(means.dtype)
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * abs_sq(means - mean[None]), axis=0)
    return Moments(count, mean, m2)


def _all_gather(value: jax.Array, axis_name: AxisName, axis_index_groups: Any) -> jax.Array:
    """Stacks ``value`` from every device of ``axis_name`` along a new leading axis.

    Names bound by ``shard_map``/``pmap`` (manual mesh axes) are gathered with one
    ``all_gather(to='invarying')``: every device gets the same result, and JAX's type system
    knows it, so the new running statistics can leave ``shard_map`` with
    ``out_specs=P()``. Names bound by ``vmap`` are gathered one at a time; under ``vmap`` a
    collective is a local reshape, and gathering several vmap names at once trips a JAX
    assertion. ``axis_index_groups`` gives a result that differs between groups, so it keeps
    the plain (varying) ``all_gather`` over all names.
    """
    if axis_index_groups is not None:
        return lax.all_gather(value, axis_name, axis_index_groups=axis_index_groups)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    manual = frozenset(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
    out = value[None]
    for name in names:
        if name not in manual:
            out = lax.all_gather(out, name, axis=0, tiled=True)
    device_names = tuple(name for name in names if name in manual)
    if device_names:
        # `to="invarying"` where JAX types the value as varying over those names (shard_map
        # with check_vma=True). With check_vma=False nothing is typed, and JAX transposes
        # such a gather into a local slice, which a second reverse pass (reverse-over-reverse
        # Hessian-vector products) then gets wrong: a plain gather there.
        typed = set(device_names) <= set(jax.typeof(out).manual_axis_type.varying)
        to = "invarying" if typed else "varying"
        out = lax.all_gather(out, device_names, axis=0, tiled=True, to=to)
    return out


def sync_sum(value: jax.Array, axis_name: AxisName, axis_index_groups: Any) -> jax.Array:
    """Sums ``value`` over the devices of ``axis_name``: the backward pass's one collective.

    ``psum`` with ``axis_index_groups`` is not implemented under ``shard_map``; a grouped
    ``all_gather`` followed by a local sum is, so groups take that route.
    """
    if axis_index_groups is not None:
        gathered = lax.all_gather(value, axis_name, axis_index_groups=axis_index_groups)
        return jnp.sum(gathered, axis=0)
    return lax.psum(value, axis_name)


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s merge of the moments of two disjoint sets (either may be empty).

    The streaming form of :func:`combine`: ``n = n_a + n_b``, ``δ = mean_b - mean_a``,
    ``mean = mean_a + δ·n_b/n``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``.
    """
    count = a.valid_count + b.valid_count
    weight = b.valid_count / jnp.maximum(count, 1)
    delta = b.mean - a.mean
    m2 = a.m2 + b.m2 + abs_sq(delta) * a.valid_count * weight
    return Moments(count, a.mean + delta * weight.astype(delta.dtype), m2)


def mean_and_var(moments: Moments) -> tuple[jax.Array, jax.Array]:
    """The mean and the biased variance (M2 / n); both 0 for a feature with no entries."""
    return moments.mean, moments.m2 * inverse_count(moments.valid_count)


def masked_sum(
    values: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]
) -> jax.Array:
    """``Σ values`` over ``axes`` (kept, with size 1), counting only ``mask``'s entries.

    The others are replaced by 0 before the sum, so a NaN or inf there never enters it.
    ``mask`` is None (every entry counts) or broadcasts against ``values``.
    """
    if mask is not None:
        values = jnp.where(mask, values, 0)
    return jnp.sum(values, axis=axes, keepdims=True)


def inverse_count(count: jax.Array | int, dtype: Any = None) -> jax.Array:
    """``1 / max(count, 1)`` of a floating ``count`` or a Python int, cast to ``dtype``
    (None: ``count``'s dtype; float32 for an int).

    Multiplied, never divided by: XLA fuses a per-feature product into the kernel that
    consumes it but keeps a division as a kernel of its own. A Python int (a count known
    from the shape) gives a constant, computed here: no kernel at all. A count of 0 (no
    valid entry) gives 1, so whatever it multiplies (a sum of nothing, 0) stays 0.
    """
    if isinstance(count, int):
        return jnp.asarray(1.0 / max(count, 1), dtype)
    inverse = jnp.reciprocal(jnp.maximum(count, 1))
    return inverse if dtype is None else inverse.astype(dtype)

"""Moments of a batch: local per-device moments and their combination across devices.

The single cross-device collective of a batch-norm layer lives here (``combine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._checks import AxisName

__all__ = [
    "Moments",
    "combine",
    "local_moments",
    "mean_and_var",
    "reference",
    "sum_over",
    "sync_sum",
]


class Moments(NamedTuple):
    """Per-feature moments of a set of values, in the statistics dtype (≥ float32)."""

    # Each field has x's rank, size 1 on the reduction axes, so it broadcasts against x.
    valid_count: jax.Array  # number of valid entries (a float, exact below 2**24)
    mean: jax.Array  # mean of the valid entries
    m2: jax.Array  # sum of squared deviations from `mean`


def sum_over(operands: Sequence[jax.Array], axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Sums each operand over ``axes``, keeping them as size 1.

    Plain sums of fused producers (casts, subtractions, products): XLA:GPU and XLA:TPU merge
    sibling reductions of the same input into one multi-output kernel, so the input is read
    once; XLA:CPU runs each as its own vectorized kernel, which measures 5-15x faster there
    than one variadic ``lax.reduce`` (see ``python -m experiments bench``).
    """
    return tuple(jnp.sum(op, axis=axes, keepdims=True) for op in operands)


def reference(
    x: jax.Array, reduction_axes: tuple[int, ...], mask: jax.Array | None, dtype: Any
) -> jax.Array:
    """A per-feature value near the mean, to shift the data by before summing.

    The (masked) mean of the first slice of ``x`` along its first reduction axis: one
    example for ``(N, C)``, one image's pixels for NHWC. It reads ``1/N`` of ``x``. Sums of
    ``x - reference`` have the size of the standard deviation, so ``sum(d**2) - sum(d)**2/n``
    keeps its precision when ``|mean| >> std``. No gradient flows through it: the moments do
    not depend on the shift mathematically.
    """
    if x.shape[reduction_axes[0]] == 0:  # an empty batch: no first example, nothing to shift
        kept = tuple(1 if a in reduction_axes else d for a, d in enumerate(x.shape))
        return jnp.zeros(kept, dtype)
    if _sharded_explicitly(x, reduction_axes):
        # Under explicit sharding the first example lives on one device and JAX refuses
        # to slice it out implicitly; the mean itself (one more pass) is the safe shift.
        return lax.stop_gradient(_masked_mean(x, reduction_axes, mask, dtype))
    first = lax.slice_in_dim(x, 0, 1, axis=reduction_axes[0])
    first_mask = (
        None
        if mask is None
        else lax.slice_in_dim(jnp.broadcast_to(mask, x.shape), 0, 1, axis=reduction_axes[0])
    )
    return lax.stop_gradient(_masked_mean(first, reduction_axes, first_mask, dtype))


def _sharded_explicitly(x: jax.Array, axes: tuple[int, ...]) -> bool:
    """Whether ``x`` is typed as sharded (explicit sharding mode) along one of ``axes``."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(a < len(spec) and spec[a] is not None for a in axes)


def _masked_mean(
    x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, dtype: Any
) -> jax.Array:
    """The mean of the True entries of ``x`` over ``axes``, accumulated in ``dtype``."""
    if mask is None:
        return jnp.mean(x, axis=axes, keepdims=True, dtype=dtype)
    mask = jnp.broadcast_to(mask, x.shape)
    total = jnp.sum(jnp.where(mask, x, 0), axis=axes, keepdims=True, dtype=dtype)
    return total / jnp.maximum(jnp.sum(mask, axis=axes, keepdims=True, dtype=dtype), 1)


def local_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None,
    dtype: Any,
) -> Moments:
    """Count, mean and M2 of ``x`` over ``reduction_axes``, counting only ``mask``'s entries.

    The results keep the feature axes and have size 1 on the reduction axes, so they
    broadcast against ``x``. Two algorithms, both accurate when ``|mean| >> std``, chosen per
    platform when the program is lowered:

    - GPU/TPU (and the default): one shifted pass, ``S1 = Σ d`` and ``S2 = Σ d²`` with
      ``d = x - reference`` (see :func:`reference`), ``mean = reference + S1/n``,
      ``M2 = S2 - S1²/n``. XLA fuses the two sibling sums into one read of ``x``.
    - CPU: two passes, ``mean = Σ x / n`` then ``M2 = Σ (x - mean)²``. XLA:CPU does not fuse
      sibling reductions, and each of these fuses its producer into one fast vectorized
      kernel, which measures faster than the one-pass form there.
    """
    if not reduction_axes:  # every axis is a feature axis: one entry per feature (vmap sync)
        count = jnp.ones(x.shape, dtype) if mask is None else jnp.broadcast_to(mask, x.shape)
        count = count.astype(dtype)
        return Moments(count, x.astype(dtype) * count, jnp.zeros(x.shape, dtype))
    if mask is None:
        kept = tuple(1 if a in reduction_axes else d for a, d in enumerate(x.shape))
        count = jnp.full(kept, _prod([x.shape[a] for a in reduction_axes]), dtype)
        valid = None
    else:
        valid = jnp.broadcast_to(mask, x.shape)
        count = jnp.sum(valid, axis=reduction_axes, keepdims=True, dtype=dtype)
    safe_count = jnp.maximum(count, 1)

    def one_pass(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        ref = reference(x, reduction_axes, mask, dtype)
        centered = x.astype(dtype) - ref
        if valid is not None:
            centered = jnp.where(valid, centered, 0)
        sum_d, sum_d2 = sum_over((centered, centered * centered), reduction_axes)
        correction = sum_d / safe_count
        return ref + correction, jnp.maximum(sum_d2 - sum_d * correction, 0)

    def two_pass(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        values = x if valid is None else jnp.where(valid, x, 0)
        total = jnp.sum(values, axis=reduction_axes, keepdims=True, dtype=dtype)
        mean = total / safe_count
        # `mean - x`, not `x - mean`: the normalization computes `x - mean`, and XLA would
        # share that one subtraction, writing and re-reading an x-sized array.
        squares = jnp.square(mean - x.astype(dtype))
        if valid is not None:
            squares = jnp.where(valid, squares, 0)
        return mean, jnp.sum(squares, axis=reduction_axes, keepdims=True)

    mean, m2 = lax.platform_dependent(x, cpu=two_pass, default=one_pass)
    return Moments(count, mean, m2)


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


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
    stacked = jnp.stack(local)  # [3, *feature_shape]
    gathered = _all_gather(stacked, axis_name, axis_index_groups)  # [devices, 3, *feature_shape]
    counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    count = jnp.sum(counts, axis=0)
    mean = jnp.sum(counts * means, axis=0) / jnp.maximum(count, 1)
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * jnp.square(means - mean[None]), axis=0)
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
        out = lax.all_gather(out, device_names, axis=0, tiled=True, to="invarying")
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


def mean_and_var(moments: Moments) -> tuple[jax.Array, jax.Array]:
    """The mean and the biased variance (M2 / n); both 0 for a feature with no entries."""
    return moments.mean, moments.m2 / jnp.maximum(moments.valid_count, 1)

"""Moments of a batch: local per-device moments and their combination across devices.

The single cross-device collective of a batch-norm layer lives here (``combine``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._checks import AxisName

__all__ = ["Moments", "combine", "local_moments", "mean_and_var"]


class Moments(NamedTuple):
    """Per-feature moments of a set of values, in the statistics dtype (≥ float32)."""

    valid_count: jax.Array  # [*feature_shape]: number of valid entries (a float, exact below 2**24)
    mean: jax.Array  # [*feature_shape]: mean of the valid entries (0 where count == 0)
    m2: jax.Array  # [*feature_shape]: sum of squared deviations from `mean`


def local_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None,
    dtype: Any,
) -> Moments:
    """Count, mean and M2 of ``x`` over ``reduction_axes``, counting only ``mask``'s entries.

    Uses the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): a first pass gives an
    estimate ``m`` of the mean, the second sums ``d = x - m`` and ``d**2``, and
    ``M2 = sum(d**2) - sum(d)**2 / n``. The second pass works on values of the size of the
    standard deviation, so the variance stays accurate when ``|mean| >> std``, and the
    rounding error of the first pass is corrected instead of being added as ``n * err**2``.
    """
    x = x.astype(dtype)
    kept_shape = tuple(1 if a in reduction_axes else d for a, d in enumerate(x.shape))
    if mask is None:
        count = jnp.full(kept_shape, _prod([x.shape[a] for a in reduction_axes]), dtype)
        estimate = jnp.sum(x, axis=reduction_axes, keepdims=True) / jnp.maximum(count, 1)
        centered = x - estimate
        sum_d = jnp.sum(centered, axis=reduction_axes, keepdims=True)
        sum_d2 = jnp.sum(jnp.square(centered), axis=reduction_axes, keepdims=True)
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        count = jnp.sum(mask, axis=reduction_axes, keepdims=True, dtype=dtype)
        estimate = jnp.sum(jnp.where(mask, x, 0), axis=reduction_axes, keepdims=True)
        estimate = estimate / jnp.maximum(count, 1)
        centered = jnp.where(mask, x - estimate, 0)
        sum_d = jnp.sum(centered, axis=reduction_axes, keepdims=True)
        sum_d2 = jnp.sum(jnp.square(centered), axis=reduction_axes, keepdims=True)
    safe_count = jnp.maximum(count, 1)
    correction = sum_d / safe_count
    mean = estimate + correction
    m2 = jnp.maximum(sum_d2 - sum_d * correction, 0)
    squeeze = lambda a: jnp.squeeze(a, axis=reduction_axes)  # noqa: E731
    return Moments(squeeze(count), squeeze(mean), squeeze(m2))


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
    gradient all-reduce. Its transpose on the backward pass is one reduce-scatter.
    """
    stacked = jnp.stack(local)  # [3, *feature_shape]
    gathered = _all_gather(stacked, axis_name, axis_index_groups)  # [devices, 3, *feature_shape]
    counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    count = jnp.sum(counts, axis=0)
    mean = jnp.sum(counts * means, axis=0) / jnp.maximum(count, 1)
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * jnp.square(means - mean), axis=0)
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


def mean_and_var(moments: Moments) -> tuple[jax.Array, jax.Array]:
    """The mean and the biased variance (M2 / n); both 0 for a feature with no entries."""
    return moments.mean, moments.m2 / jnp.maximum(moments.valid_count, 1)

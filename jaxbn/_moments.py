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
    "local_moments_and_condition",
    "mean_and_var",
    "merge",
    "separate_reads",
    "sum_over",
    "sync_sum",
    "well_conditioned",
]


class Moments(NamedTuple):
    """Per-feature moments of a set of values, in the statistics dtype (≥ float32)."""

    # Each field has x's rank, size 1 on the reduction axes, so it broadcasts against x.
    valid_count: jax.Array  # number of valid entries (a float, exact below 2**24)
    mean: jax.Array  # mean of the valid entries
    m2: jax.Array  # sum of squared deviations from `mean`


# Below this ratio of mean² to variance, E[x²] - E[x]² in float32 keeps a relative error
# under ~1e-5; above it, the variance is recomputed from centred values.
CONDITION = 100.0


def sum_over(operands: Sequence[jax.Array], axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Sums each operand over ``axes``, keeping them as size 1.

    Plain sums of fused producers (casts, products): XLA:GPU and XLA:TPU merge sibling
    reductions of the same input into one multi-output kernel, so the input is read once;
    XLA:CPU runs each as its own vectorized kernel. Operands of ``x``'s full shape only: a
    per-feature vector broadcast inside a reduction makes XLA:CPU write the broadcast out.
    """
    return tuple(jnp.sum(op, axis=axes, keepdims=True) for op in operands)


def separate_reads(x: jax.Array, dtype: Any, n: int = 2) -> tuple[jax.Array, ...]:
    """``n`` times ``x`` itself, but on XLA:CPU as values that no other read of ``x`` merges with.

    Widening a bfloat16 ``x`` to the float32 statistics dtype is free inside a reduction:
    XLA:CPU's vectorized sum reads bfloat16 and accumulates in float32.
    But when two sums (``Σx`` and ``Σx²``), or a sum and the normalization, widen the same
    ``x``, XLA merges the identical converts into one with several users, and writes the
    float32 copy of ``x`` out to memory (a full-size write and reads of twice the bytes).
    Giving each sum its own copy of the value (the outputs of one ``optimization_barrier``,
    which costs nothing at run time) keeps each convert inside its own sum. Only on CPU:
    XLA:GPU and XLA:TPU fuse sibling reductions of the same value into one kernel that reads
    ``x`` once, which the barrier would prevent; ``lax.platform_dependent`` picks the
    branch when the program is lowered.
    """
    copies = (x,) * n
    if x.dtype != jnp.bfloat16 or jnp.dtype(dtype).itemsize <= 2:
        # float32 and wider need no widening. XLA:CPU's sums do not read float16 natively:
        # a float16 x is widened by a separate kernel either way, and one shared float32
        # copy is cheaper than one per sum.
        return copies
    return tuple(
        lax.platform_dependent(
            *copies, cpu=lambda *c: lax.optimization_barrier(c), default=lambda *c: c
        )
    )


def local_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None,
    dtype: Any,
) -> Moments:
    """Count, mean and M2 of ``x`` over ``reduction_axes``, counting only ``mask``'s entries.

    See :func:`local_moments_and_condition`, which also returns whether the batch is well
    conditioned.
    """
    return local_moments_and_condition(x, reduction_axes, mask, dtype)[0]


def local_moments_and_condition(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None,
    dtype: Any,
) -> tuple[Moments, jax.Array]:
    """``(moments, well_conditioned(mean, var))`` of ``x`` over ``reduction_axes``.

    The results keep the feature axes and have size 1 on the reduction axes, so they
    broadcast against ``x``. One pass gives ``S1 = Σ x`` and ``S2 = Σ x²`` (accumulated in
    ``dtype``), hence ``mean = S1/n`` and ``M2 = S2 - S1·mean``. That difference cancels
    catastrophically when ``mean² >> var`` (flax's default loses the variance entirely at
    mean 1e4, std 1), so whenever some feature has ``mean² > CONDITION · var`` the variance
    is recomputed from centred values, ``M2 = Σ (x - mean)²`` (``lax.cond``: that second pass
    runs only for such batches, typically raw inputs, never for normalized activations).
    """
    if not reduction_axes:  # every axis is a feature axis: one entry per feature (vmap sync)
        count = jnp.ones(x.shape, dtype) if mask is None else jnp.broadcast_to(mask, x.shape)
        count = count.astype(dtype)
        moments = Moments(count, x.astype(dtype) * count, jnp.zeros(x.shape, dtype))
        return moments, jnp.asarray(True)
    if mask is None:
        kept = tuple(1 if a in reduction_axes else d for a, d in enumerate(x.shape))
        count = jnp.full(kept, _prod([x.shape[a] for a in reduction_axes]), dtype)
    else:
        valid = jnp.broadcast_to(mask, x.shape)
        count = jnp.sum(valid, axis=reduction_axes, keepdims=True, dtype=dtype)

    def widen(v: jax.Array) -> jax.Array:  # in the statistics dtype, masked entries zeroed
        v = v.astype(dtype)
        return v if mask is None else jnp.where(valid, v, 0)

    safe_count = jnp.maximum(count, 1)
    values, values_too = (widen(v) for v in separate_reads(x, dtype))
    total, total_sq = sum_over((values, jnp.square(values_too)), reduction_axes)
    mean = total / safe_count
    m2_fast = jnp.maximum(total_sq - total * mean, 0)

    def centred() -> jax.Array:
        # Widens ``x`` itself, so a narrow ``x`` enters the branch as it is (a widened copy
        # closed over would be written out as the branch's operand). `mean - x`, not
        # `x - mean`: keeps XLA from sharing one subtraction with the normalization and
        # writing it out.
        squares = jnp.square(mean - x.astype(dtype))
        if mask is not None:
            squares = jnp.where(valid, squares, 0)
        return jnp.sum(squares, axis=reduction_axes, keepdims=True)

    # When the one-pass variance passes the test it is accurate, so the test on the final
    # variance would give the same answer: it is returned for the backward pass to reuse.
    conditioned = well_conditioned(mean, m2_fast / safe_count)
    m2 = lax.cond(conditioned, lambda: m2_fast, centred)
    return Moments(count, mean, m2), conditioned


def well_conditioned(mean: jax.Array, var: jax.Array) -> jax.Array:
    """Whether ``Σ x² - n·mean²``-style formulas are accurate for every feature (a bool)."""
    return jnp.all(jnp.square(mean) <= CONDITION * var)


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


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s merge of the moments of two disjoint sets (either may be empty).

    The streaming form of :func:`combine`: ``n = n_a + n_b``, ``δ = mean_b - mean_a``,
    ``mean = mean_a + δ·n_b/n``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``.
    """
    count = a.valid_count + b.valid_count
    weight = b.valid_count / jnp.maximum(count, 1)
    delta = b.mean - a.mean
    m2 = a.m2 + b.m2 + delta * delta * a.valid_count * weight
    return Moments(count, a.mean + delta * weight, m2)


def mean_and_var(moments: Moments) -> tuple[jax.Array, jax.Array]:
    """The mean and the biased variance (M2 / n); both 0 for a feature with no entries."""
    return moments.mean, moments.m2 / jnp.maximum(moments.valid_count, 1)

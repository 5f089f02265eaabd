"""The running-statistics update: EMA, cumulative average or zero-debiased EMA.

Per-feature arrays in, a :class:`~jaxbn.BatchStats` out. Ghost batches are the caller's
business: :func:`jaxbn._batch_norm.update_from_batch` averages their statistics over the
groups before :func:`ema_update` sees them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._moments import inverse_count
from ._state import BatchStats

__all__ = ["ema_update", "unbiased_var"]


def unbiased_var(batch_var: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The unbiased variance ``n/(n-1) · batch_var`` of ``n = count`` valid entries, and the
    count behind it: ``n`` where ``n >= 2``, 0 (no variance to merge) elsewhere."""
    var = batch_var * (count / jnp.maximum(count - 1, 1))
    return var, jnp.where(count > 1, count, 0)


def ema_update(
    state: BatchStats,
    batch_mean: jax.Array,
    batch_var: jax.Array,
    count: jax.Array,
    var_count: jax.Array | None,
    *,
    momentum: float | None,
    debias: bool,
) -> BatchStats:
    """Merges one batch's statistics into the running ones, an exponential moving average.

    ``batch_mean``, ``batch_var`` and ``count`` (the number of valid entries behind
    ``batch_mean``) have the feature shape; ``var_count`` (None: ``count``) is the number
    behind ``batch_var``. The ``k``-th accepted batch is merged with weight
    ``w = 1 - momentum``, ``w = 1/k`` with ``momentum=None`` (the cumulative average), or
    ``w = (1 - momentum)/(1 - momentum**k)`` with ``debias``::

        mean ← (1 - w) · mean + w · batch_mean,   var ← (1 - w) · var + w · batch_var

    State is never corrupted: a batch whose statistics are not finite, or that has no valid
    entry, leaves the state unchanged and is not counted; a feature with no valid entry
    keeps its running values. The caller stops the gradients (no gradient flows into the
    running statistics).
    """
    dtype = state.var.dtype  # real; the state's dtypes never change
    batch_mean = batch_mean.astype(state.mean.dtype)
    batch_var = batch_var.astype(state.var.dtype)
    # The variance is not finite whenever the mean is not (x - mean is then inf or NaN),
    # so one sum of the variances tells both: one reduction, where checking every entry
    # of both takes three kernels on XLA:CPU. (Finite variances whose sum overflows, above
    # 3e38 in float32, are rejected too: the state is kept, as for any suspect batch.)
    finite = jnp.isfinite(jnp.sum(batch_var))
    accepted = finite & jnp.any(count > 0)  # a batch with no valid entry is not counted
    merged = state.count + accepted.astype(state.count.dtype)
    if momentum is None:
        decay = 1.0 - inverse_count(merged.astype(dtype))
    elif debias:
        momentum_ = jnp.asarray(momentum, dtype)
        steps = jnp.maximum(merged, 1).astype(dtype)
        decay = 1.0 - (1.0 - momentum_) / (1.0 - momentum_**steps)
    else:
        decay = jnp.asarray(momentum, dtype)
    weight = 1 - decay
    # lax.select, not jnp.where: the operands already agree in shape and dtype, and it
    # traces faster.
    rejected = jnp.logical_not(accepted)
    keep = rejected | (count == 0)
    keep_var = keep if var_count is None else rejected | (var_count == 0)
    mean_decay, mean_weight = decay.astype(state.mean.dtype), weight.astype(state.mean.dtype)
    new_mean = jax.lax.select(keep, state.mean, mean_decay * state.mean + mean_weight * batch_mean)
    new_var = jax.lax.select(keep_var, state.var, decay * state.var + weight * batch_var)
    return BatchStats(
        mean=new_mean.astype(state.mean.dtype),
        var=new_var.astype(state.var.dtype),
        count=merged.astype(state.count.dtype),
    )

"""The running-statistics update: EMA, cumulative average or zero-debiased EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._ghost import Ghost
from ._state import BatchStats

__all__ = ["update_from_batch"]


def update_from_batch(
    state: BatchStats,
    ghost: Ghost,
    batch_mean: jax.Array,
    batch_var: jax.Array,
    valid_count: jax.Array,
    *,
    momentum: float | None,
    debias: bool,
    unbiased_running_var: bool,
) -> BatchStats:
    """The new running statistics from a batch's (or its ghost batches') moments.

    ``batch_mean``, ``batch_var`` (biased) and ``valid_count`` broadcast against the
    grouped ``x``. With ``unbiased_running_var`` each (ghost) batch's variance is scaled by
    ``n/(n-1)``, and only batches with ``n >= 2`` count toward the variance. Ghost batches
    are then averaged, each group with a valid entry weighing the same.

    The ``k``-th accepted batch is merged with weight ``1 - momentum``, ``1/k`` with
    ``momentum=None``, or ``(1 - momentum)/(1 - momentum**k)`` with ``debias``::

        mean ← (1 - w) · mean + w · batch_mean,   var ← (1 - w) · var + w · batch_var

    State is never corrupted: a batch whose statistics are not finite, or that has no valid
    entry, leaves the state unchanged and is not counted; a feature with no valid entry
    keeps its running values. No gradient flows into the result.
    """
    # Stopping gradients before the update's arithmetic, rather than after, lets autodiff
    # skip tracing tangents through all of it.
    batch_mean, batch_var, valid_count = jax.lax.stop_gradient((batch_mean, batch_var, valid_count))
    state = jax.lax.stop_gradient(state)
    feature_shape = ghost.layout.feature_shape
    mean = batch_mean.reshape(feature_shape)
    var = batch_var.reshape(feature_shape)
    count = valid_count.reshape(feature_shape)
    var_count = None
    if unbiased_running_var:
        var = var * (count / jnp.maximum(count - 1, 1))
        var_count = jnp.where(count > 1, count, 0)
    var, total_var_count = ghost.mean_over_groups(var, count if var_count is None else var_count)
    mean, count = ghost.mean_over_groups(mean, count)
    var_count = None if var_count is None else total_var_count
    return _merge(state, mean, var, count, var_count, momentum, debias)


def _merge(
    state: BatchStats,
    batch_mean: jax.Array,
    batch_var: jax.Array,
    count: jax.Array,
    var_count: jax.Array | None,
    momentum: float | None,
    debias: bool,
) -> BatchStats:
    """Merges one batch's statistics into the running ones.

    ``count`` (feature-shaped) is the number of valid entries behind ``batch_mean``;
    ``var_count`` (None: ``count``) the number behind ``batch_var``.
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
        decay = 1.0 - 1.0 / jnp.maximum(merged, 1).astype(dtype)
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

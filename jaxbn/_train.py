"""Training-mode normalization with a custom VJP: two sums forward, two sums backward."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import AxisName
from ._copies import cpu_copies
from ._dtypes import stats_dtype
from ._moments import (
    combine,
    local_moments,
    mean_and_var,
    sync_sum,
    widened_reads,
)
from ._normalize import coefficients, compute_dtype, scale_shift

__all__ = ["Sync", "normalize_training", "sync_config"]


class Sync(NamedTuple):
    """The static configuration of one training-mode call (hashable)."""

    reduction_axes: tuple[int, ...]
    axis_name: AxisName | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    scale_sync: tuple[Hashable, ...]  # axes to sum the scale's gradient over
    bias_sync: tuple[Hashable, ...]  # axes to sum the bias's gradient over


def sync_config(
    reduction_axes: tuple[int, ...],
    axis_name: AxisName | None,
    axis_index_groups: Any,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
) -> Sync:
    """The :class:`Sync` of a call: which axes the statistics and each gradient sum over."""
    groups = (
        None
        if axis_index_groups is None
        else tuple(tuple(int(i) for i in group) for group in axis_index_groups)
    )
    return Sync(
        reduction_axes=reduction_axes,
        axis_name=axis_name,
        axis_index_groups=groups,
        scale_sync=_param_sync_names(x, scale),
        bias_sync=_param_sync_names(x, bias),
    )


def _param_sync_names(x: jax.Array, param: jax.Array | None) -> tuple[Hashable, ...]:
    """The device axes over which ``param``'s gradient must be summed inside the VJP.

    Inside ``shard_map``, a parameter typed invariant over an axis that ``x`` varies over
    is shared by the devices, and JAX's own autodiff would give it the sum of their
    gradients; so do we (whether or not the statistics are synchronized). Everywhere else
    the gradient stays local, as JAX's would: a parameter that varies per device, every
    ``vmap`` axis (JAX sums over the batch for unbatched parameters), and ``pmap`` or
    ``shard_map(check_vma=False)``, which do not type-check replication.
    """
    if param is None:
        return ()
    x_varies = jax.typeof(x).manual_axis_type.varying
    param_varies = jax.typeof(param).manual_axis_type.varying
    return tuple(sorted(x_varies - param_varies, key=str))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def normalize_training(
    sync: Sync,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    epsilon: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Training-mode normalization: ``(y, batch_mean, batch_var, valid_count)``.

    ``scale`` and ``bias`` broadcast against ``x``; the statistics have ``x``'s rank with
    size 1 on the reduction axes. A custom VJP, so that the memory traffic is near its
    floor and there is no runtime branch:

    - forward: ``Σ x``, then ``Σ (x - mean)²`` (:func:`~jaxbn._moments.local_moments`), then
      ``y`` in one elementwise pass;
    - backward: ``Σ dy`` and ``Σ dy·(x - mean)`` (sibling sums over ``dy`` and ``x``, which
      are also the bias and scale gradients and travel in the one backward collective),
      then ``dx`` in one elementwise pass. Nothing of ``x``'s size is saved but ``x``
      itself, in its own dtype.

    On XLA:CPU, where each sum is its own kernel, that is 4 full-tensor passes forward and
    6 more backward (flax's autodiff: 4 and 11). The statistics outputs carry no gradient
    (``batch_norm`` stops gradients into the new state).
    """
    outputs, _ = _forward(sync, x, scale, bias, mask, epsilon)
    return outputs


def _forward(
    sync: Sync,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    epsilon: Any,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], tuple[Any, ...]]:
    moments = local_moments(x, sync.reduction_axes, mask, stats_dtype(x.dtype))
    if sync.axis_name is not None:
        moments = combine(moments, sync.axis_name, sync.axis_index_groups)
    mean, var = mean_and_var(moments)
    dtype = compute_dtype(x.dtype, mean, scale, bias)
    mul, inv_std = coefficients(var, scale, epsilon, dtype)
    y = scale_shift(x, mean, mul, bias, dtype)
    residuals = (x, scale, bias, mask, epsilon, mean, inv_std, mul, moments.valid_count)
    return (y, mean, var, moments.valid_count), residuals


def _backward(
    sync: Sync, residuals: tuple[Any, ...], cotangents: tuple[jax.Array, ...]
) -> tuple[Any, ...]:
    x, scale, bias, mask, epsilon, mean, inv_std, mul, valid_count = residuals
    dy = cotangents[0]  # the statistics outputs only feed the stop-gradient'ed state
    dtype = mul.dtype
    # Every output is normalized with the batch statistics, so Σ dy and Σ dy·x̂ run over all
    # entries; only the valid entries moved the statistics, so only they get that term.
    # The same two sums are the gradients of the bias and the scale.
    # Each kernel gets its own copy of the mean (one barrier: two would be merged by XLA).
    mean_for_sum, mean_for_dx = cpu_copies(mean, 2)
    sum_dy, sum_dy_xhat = _grad_sums(sync.reduction_axes, dy, x, mean_for_sum, inv_std)
    names = () if sync.axis_name is None else sync.axis_name
    names = names if isinstance(names, tuple) else (names,)
    param_syncs = [
        set(names_)
        for param, names_ in ((scale, sync.scale_sync), (bias, sync.bias_sync))
        if param is not None
    ]
    if names and sync.axis_index_groups is None and all(s == set(names) for s in param_syncs):
        # One collective: the global sums serve dx and the replicated params alike.
        stat_sums = param_sums = tuple(sync_sum(jnp.stack((sum_dy, sum_dy_xhat)), names, None))
    else:
        stat_sums = (sum_dy, sum_dy_xhat)
        if names:
            stacked = jnp.stack(stat_sums)
            stat_sums = tuple(sync_sum(stacked, sync.axis_name, sync.axis_index_groups))
        param_sums = (_psum_if(sum_dy, sync.bias_sync), _psum_if(sum_dy_xhat, sync.scale_sync))
    global_dy, global_dy_xhat = stat_sums
    x_hat = (x.astype(dtype) - mean_for_dx) * inv_std
    correction = (global_dy + x_hat * global_dy_xhat) / jnp.maximum(valid_count, 1)
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = mul * (dy.astype(dtype) - correction)
    d_scale = None if scale is None else _to_param(param_sums[1], scale)
    d_bias = None if bias is None else _to_param(param_sums[0], bias)
    d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return dx.astype(x.dtype), d_scale, d_bias, d_mask, jnp.zeros_like(epsilon)


normalize_training.defvjp(_forward, _backward)


def _grad_sums(
    axes: tuple[int, ...],
    dy: jax.Array,
    x: jax.Array,
    mean: jax.Array,
    inv_std: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(Σ dy, Σ dy·x̂)`` over ``axes``, with ``x̂ = (x - mean) · inv_std``, in mean's dtype.

    Centred, so accurate at any mean: ``Σ dy·(x - mean)`` rather than ``Σ dy·x - mean·Σ dy``.
    ``dy`` and ``x`` are widened inside each sum; a bfloat16 ``dy`` and ``x`` get their own
    copy per sum on XLA:CPU (see :func:`~jaxbn._copies.cpu_copies`).
    """
    dtype = mean.dtype
    if not axes:
        x_hat = (x.astype(dtype) - mean) * inv_std
        return dy.astype(dtype), dy.astype(dtype) * x_hat
    dy_sum, dy_prod = widened_reads(dy, dtype, 2)
    (x_prod,) = widened_reads(x, dtype, 1)
    sum_dy = jnp.sum(dy_sum.astype(dtype), axis=axes, keepdims=True)
    centred = dy_prod.astype(dtype) * (x_prod.astype(dtype) - mean)
    return sum_dy, jnp.sum(centred, axis=axes, keepdims=True) * inv_std


def _to_param(total: jax.Array, param: jax.Array) -> jax.Array:
    return total.reshape(param.shape).astype(param.dtype)


def _psum_if(value: jax.Array, names: tuple[Hashable, ...]) -> jax.Array:
    return jax.lax.psum(value, names) if names else value

"""batch_norm(): normalize with batch or running statistics and update the running ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks
from ._checks import AxisName, wider_float
from ._moments import combine, local_moments, mean_and_var
from ._state import BatchStats

__all__ = ["batch_norm"]


def batch_norm(
    x: ArrayLike,
    params: Mapping[str, ArrayLike | None] | None,
    state: BatchStats,
    *,
    training: bool,
    axis: int | Sequence[int] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, BatchStats]:
    r"""Batch normalization (Ioffe & Szegedy, 2015) as a pure function of explicit state.

    In training, each feature is normalized with the mean and biased variance of the batch,
    taken over every axis of ``x`` that is not in ``axis`` (and over the devices of
    ``axis_name``), and the running statistics are updated::

        μ_B = mean(x),  σ²_B = mean((x - μ_B)²)                 # biased (divide by n)
        y   = scale * (x - μ_B) / sqrt(σ²_B + epsilon) + bias
        mean ← momentum * mean + (1 - momentum) * μ_B              # flax/keras direction
        var  ← momentum * var  + (1 - momentum) * σ²_B

    PyTorch's ``momentum=m`` is ``momentum=1-m`` here (torch 0.1 == jaxbn 0.9), and torch
    stores the unbiased variance. With ``momentum=None`` the running statistics are the plain
    average of all batches seen (torch's ``momentum=None``): the ``k``-th batch is merged with
    weight ``1/k``. In evaluation (``training=False``) the running statistics are used and the
    state is returned as given.

    Statistics are computed in float32 (or wider, for float64 input) whatever the input
    dtype; the output has the dtype of ``x``. The variance uses a corrected two-pass
    algorithm, accurate when ``|mean| >> std``. A batch whose statistics are not finite
    (a NaN or inf in ``x``) leaves the running statistics unchanged and is not counted.

    Args:
      x: the input, of a floating dtype.
      params: ``{"scale": γ, "bias": β}`` of the feature shape, as made by :func:`init`;
        either key may be absent or None, and ``params=None`` means no affine transform.
      state: the running statistics, a :class:`BatchStats` from :func:`init`.
      training: keyword-only, no default. True: normalize with batch statistics and
        return an updated state. False: normalize with the running statistics.
      axis: the feature axis, or a tuple of feature axes (e.g. ``-1`` for NHWC, ``1`` for
        NCHW, ``(1, 2)`` for per-position features). Every other axis is reduced.
      momentum: EMA decay in ``[0, 1)``, or None for a cumulative average.
      epsilon: added to the variance before the square root; must be > 0.
      axis_name: a named axis (or tuple of names) bound by ``jax.shard_map``, ``jax.pmap``
        or ``jax.vmap`` over which the statistics are synchronized. The devices' statistics
        are combined with one collective, each weighted by its count of valid entries.
        Under sharded ``jax.jit`` (SPMD) pass None: XLA inserts the reductions itself.
      axis_index_groups: with ``axis_name``, groups of device indices that synchronize among
        themselves only, e.g. ``[[0, 1], [2, 3]]`` (pmap and shard_map).
      mask: bool, broadcastable to ``x``: only True entries count toward the statistics.
        Every entry is still normalized. Ignored in evaluation.

    Returns:
      ``(y, new_state)``: ``y`` of the shape and dtype of ``x``; ``new_state`` of the same
      structure, shapes and dtypes as ``state`` (``state`` itself when ``training=False``).
      No gradient flows into ``new_state``.

    Raises:
      TypeError: ``training`` is not a bool, ``x`` is not floating, ``state`` is not a
        :class:`BatchStats`, ``mask`` is not bool, or ``axis`` is not an int/tuple.
      ValueError: ``axis`` out of range or repeated, a feature-shape mismatch between ``x``
        and ``params``/``state``, ``momentum`` outside ``[0, 1)``, ``epsilon <= 0``, a mask
        that does not broadcast to ``x``, or ``axis_index_groups`` without ``axis_name``.
      NameError: ``axis_name`` is not bound by an enclosing transformation.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> params, state = jaxbn.init(4)
      >>> x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (32, 4))
      >>> y, state = jaxbn.batch_norm(x, params, state, training=True)
      >>> bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5)), int(state.count)
      (True, 1)
      >>> y_eval, same = jaxbn.batch_norm(x, params, state, training=False)
      >>> same is state
      True
    """
    with jax.named_scope("jaxbn.batch_norm"):
        training = _checks.check_training(training)
        x = jnp.asarray(x)
        _checks.check_input(x)
        lay = _checks.with_shape(_checks.layout(x.ndim, axis), x.shape)
        _checks.check_params(params, lay.feature_shape)
        _checks.check_state(state, lay.feature_shape)
        _checks.check_momentum(momentum)
        _checks.check_epsilon(epsilon)
        _checks.check_mask(mask, x.shape)
        compute_dtype = _checks.stats_dtype(x.dtype)

        if not training:
            y = _normalize(x, state.mean, state.var, params, epsilon, lay, compute_dtype)
            return y, state

        _checks.check_axis_name(axis_name, axis_index_groups)
        if not lay.reduction_axes and axis_name is None:
            raise ValueError(
                f"`axis` {axis!r} makes every axis of `x` (shape {x.shape}) a feature axis, so "
                f"training has no batch to take statistics over. Leave at least one axis out "
                f"of `axis`, or pass the `axis_name` of a vmap/shard_map/pmap over the batch."
            )
        moments = local_moments(
            x, lay.reduction_axes, None if mask is None else jnp.asarray(mask), compute_dtype
        )
        if axis_name is not None:
            moments = combine(moments, axis_name, axis_index_groups)
        batch_mean, batch_var = mean_and_var(moments)
        y = _normalize(x, batch_mean, batch_var, params, epsilon, lay, compute_dtype)
        new_state = _update(state, batch_mean, batch_var, moments.valid_count, momentum)
        return y, new_state


def _normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    params: Mapping[str, ArrayLike | None] | None,
    epsilon: float,
    lay: _checks.Layout,
    compute_dtype: Any,
) -> jax.Array:
    """``(x - mean) * (scale * rsqrt(var + eps)) + bias``: one fused elementwise pass.

    The per-feature multiplier is precomputed; subtracting the mean before scaling (rather
    than adding a precomputed ``bias - mean * mul``) keeps the output exact to rounding when
    ``|mean| >> std``, and costs nothing in a memory-bound kernel.
    """
    params = params or {}
    scale = None if params.get("scale") is None else jnp.asarray(params["scale"])
    bias = None if params.get("bias") is None else jnp.asarray(params["bias"])
    dtype = wider_float(
        compute_dtype, *(None if p is None else p.dtype for p in (scale, bias))
    )
    mul = jax.lax.rsqrt(var.astype(dtype) + epsilon)
    if scale is not None:
        mul = mul * scale.astype(dtype)
    y = (x.astype(dtype) - mean.astype(dtype).reshape(lay.broadcast_shape)) * mul.reshape(
        lay.broadcast_shape
    )
    if bias is not None:
        y = y + bias.astype(dtype).reshape(lay.broadcast_shape)
    return y.astype(x.dtype)


def _update(
    state: BatchStats,
    batch_mean: jax.Array,
    batch_var: jax.Array,
    count: jax.Array,
    momentum: float | None,
) -> BatchStats:
    """Merges one batch's statistics into the running ones, never corrupting them."""
    finite = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(jnp.isfinite(batch_var))
    merged = state.count + finite.astype(state.count.dtype)
    if momentum is None:
        decay = 1.0 - 1.0 / jnp.maximum(merged, 1).astype(state.mean.dtype)
    else:
        decay = jnp.asarray(momentum, state.mean.dtype)
    # A feature with no valid entry (all masked out) keeps its running values.
    keep = jnp.logical_not(finite) | (count == 0)
    new_mean = jnp.where(keep, state.mean, decay * state.mean + (1 - decay) * batch_mean)
    new_var = jnp.where(keep, state.var, decay * state.var + (1 - decay) * batch_var)
    new_state = BatchStats(
        mean=new_mean.astype(state.mean.dtype),
        var=new_var.astype(state.var.dtype),
        count=merged.astype(state.count.dtype),
    )
    return jax.lax.stop_gradient(new_state)

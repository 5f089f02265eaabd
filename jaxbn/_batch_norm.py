"""batch_norm(): normalize with batch or running statistics and update the running ones."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from . import _checks
from ._checks import AxisName, wider_float
from ._dtypes import stats_dtype
from ._moments import (
    combine,
    local_moments_and_condition,
    mean_and_var,
    separate_reads,
    sum_over,
    sync_sum,
    well_conditioned,
)
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
    virtual_batch_size: int | None = None,
    debias: bool = False,
    unbiased_running_var: bool = False,
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
    dtype; the output has the dtype of ``x``. The moments take one pass over ``x`` (``Σ x``
    and ``Σ x²``); when a feature has ``mean² > 100·var``, where that form loses precision,
    the variance is recomputed from centred values, so it stays accurate when
    ``|mean| >> std``. Devices are merged with Chan's formula. A batch whose statistics are
    not finite (a NaN or inf in ``x``) leaves the running statistics unchanged and is not
    counted.

    Training mode has a custom VJP whose backward needs two per-feature sums and one
    elementwise pass (on GPU/TPU, 3 passes over ``x`` forward and 5 backward). Reverse-mode
    AD works at any order (``jax.grad`` of ``jax.grad``, ``jax.hessian``); plain forward-mode
    AD (``jax.jvp``, ``jax.jacfwd``) of training mode does not, as for any
    ``jax.custom_vjp``. Evaluation mode is plain JAX.

    Variants (keyword-only; the defaults are plain batch normalization):

    - ``virtual_batch_size=k`` (ghost batch normalization, Hoffer et al. 2017; keras's
      ``virtual_batch_size``): the first reduction axis (the batch axis) is split into
      ``N/k`` consecutive groups of ``k``, and each group is normalized with its own
      statistics. The running statistics get one update per call, from the mean over the
      groups of the group means and of the group (biased) variances; with ``mask``, each
      group's statistics count only its valid entries and a group with none is left out of
      that mean. Ghost batches are local by construction, so ``axis_name`` is rejected.
    - ``debias=True``: a zero-debiased EMA (as Adam's and haiku's ``zero_debias``): the
      ``k``-th accepted batch is merged with weight
      ``w_k = (1 - momentum) / (1 - momentum**k)`` instead of ``1 - momentum``, so the
      first batch replaces the initial ``mean=0, var=1`` and the running statistics are
      unbiased from the first step (``w_k → 1 - momentum`` as ``k`` grows). ``k`` is
      ``state.count``; the state stays directly usable in evaluation. No effect with
      ``momentum=None`` (already an unbiased average).
    - ``unbiased_running_var=True`` (PyTorch parity): the running variance is updated with
      the unbiased batch variance ``n/(n-1) · σ²_B`` (``n``: valid entries per feature),
      while the batch is still normalized with the biased ``σ²_B``, exactly as
      ``torch.nn.BatchNorm`` does. A feature with fewer than 2 valid entries keeps its
      running variance (its mean is still updated).
    - A frozen layer for fine-tuning (keras ``trainable=False``, running statistics used
      and not updated) is ``training=False``: gradients still flow to ``x``, ``scale`` and
      ``bias``, and the state is returned as given.

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
        Every entry is still normalized. Ignored in evaluation. A batch with no valid
        entry (fully masked, or a batch axis of size 0) gives a finite output and leaves
        the state unchanged.
      virtual_batch_size: the size of the ghost batches the first reduction axis is split
        into, or None (one batch). Must divide that axis. Ignored in evaluation.
      debias: merge the ``k``-th batch with weight ``(1-momentum)/(1-momentum**k)``.
      unbiased_running_var: update the running variance with the unbiased batch variance.

    Returns:
      ``(y, new_state)``: ``y`` of the shape and dtype of ``x``; ``new_state`` of the same
      structure, shapes and dtypes as ``state`` (``state`` itself when ``training=False``).
      No gradient flows into ``new_state``.

    Raises:
      TypeError: ``training`` is not a bool, ``x`` is not floating, ``state`` is not a
        :class:`BatchStats`, ``mask`` is not bool, or ``axis`` is not an int/tuple.
      ValueError: ``axis`` out of range or repeated, a feature-shape mismatch between ``x``
        and ``params``/``state``, ``momentum`` outside ``[0, 1)``, ``epsilon <= 0``, a mask
        that does not broadcast to ``x``, ``axis_index_groups`` without ``axis_name``, or a
        ``virtual_batch_size`` that is not a positive divisor of the batch axis or comes with
        ``axis_name``.
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
        x, lay = _check_common(
            x, params, state, training=training, axis=axis, momentum=momentum,
            epsilon=epsilon, mask=mask, virtual_batch_size=virtual_batch_size,
            debias=debias, unbiased_running_var=unbiased_running_var,
        )

        if not training:
            y = _normalize(x, state.mean, state.var, params, epsilon, lay)
            return y, state

        ghost = _check_training_layout(
            x, lay, axis=axis, axis_name=axis_name, axis_index_groups=axis_index_groups,
            virtual_batch_size=virtual_batch_size,
        )
        scale, bias = _affine(params)
        x_g, scale_g, bias_g, mask_g = ghost.group(x, scale, bias, mask)
        sync = _Sync(
            reduction_axes=ghost.layout.reduction_axes,
            axis_name=axis_name,
            axis_index_groups=_groups(axis_index_groups),
            scale_sync=_param_sync_names(x_g, scale_g),
            bias_sync=_param_sync_names(x_g, bias_g),
        )
        y, batch_mean, batch_var, valid_count = _train(sync, x_g, scale_g, bias_g, mask_g, epsilon)
        new_state = update_from_batch(
            state, ghost, batch_mean, batch_var, valid_count,
            momentum=momentum, debias=debias, unbiased_running_var=unbiased_running_var,
        )
        return y.reshape(x.shape), new_state


def _check_common(
    x: ArrayLike,
    params: Mapping[str, ArrayLike | None] | None,
    state: BatchStats,
    *,
    training: Any,
    axis: Any,
    momentum: Any,
    epsilon: Any,
    mask: Any,
    virtual_batch_size: Any,
    debias: Any,
    unbiased_running_var: Any,
) -> tuple[jax.Array, _checks.Layout]:
    """The checks shared by batch_norm and batch_renorm, in both modes."""
    _checks.check_training(training)
    x = jnp.asarray(x)
    _checks.check_input(x)
    lay = _checks.with_shape(_checks.layout(x.ndim, axis), x.shape)
    _checks.check_params(params, lay.feature_shape)
    _checks.check_state(state, lay.feature_shape)
    _checks.check_momentum(momentum)
    _checks.check_epsilon(epsilon)
    _checks.check_mask(mask, x.shape)
    _checks.check_flag("debias", debias)
    _checks.check_flag("unbiased_running_var", unbiased_running_var)
    _checks.check_virtual_batch_size(virtual_batch_size)
    return x, lay


def _check_training_layout(
    x: jax.Array,
    lay: _checks.Layout,
    *,
    axis: Any,
    axis_name: AxisName | None,
    axis_index_groups: Any,
    virtual_batch_size: int | None,
) -> Ghost:
    """Training-mode checks (sync and batch axes); returns the ghost-batch layout."""
    _checks.check_axis_name(axis_name, axis_index_groups)
    if not lay.reduction_axes and axis_name is None:
        raise ValueError(
            f"`axis` {axis!r} makes every axis of `x` (shape {x.shape}) a feature axis, so "
            f"training has no batch to take statistics over. Leave at least one axis out "
            f"of `axis`, or pass the `axis_name` of a vmap/shard_map/pmap over the batch."
        )
    return ghost_layout(lay, x.shape, virtual_batch_size, axis_name)


class Ghost(NamedTuple):
    """How ``x`` is regrouped into ghost batches (the identity without ``virtual_batch_size``).

    The batch axis ``b`` (the first reduction axis) of size ``N`` becomes two axes
    ``(N/k, k)``; the group axis joins the feature axes, so every group gets its own
    statistics from the unchanged normalization code. ``group_axis`` is the position of the
    group axis in the grouped feature shape (None: no ghost batches).
    """

    x_shape: tuple[int, ...]
    grouped_shape: tuple[int, ...]
    layout: _checks.Layout  # of the grouped x
    group_axis: int | None

    def group(
        self,
        x: jax.Array,
        scale: jax.Array | None,
        bias: jax.Array | None,
        mask: ArrayLike | None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
        """``x`` and the mask regrouped; ``scale`` and ``bias`` broadcast over the groups."""
        if mask is not None:
            mask = jnp.asarray(mask)
        if self.group_axis is None:
            return x, scale, bias, mask
        if mask is not None:
            mask = jnp.broadcast_to(mask, self.x_shape).reshape(self.grouped_shape)
        return (
            x.reshape(self.grouped_shape),
            None if scale is None else self.per_group(scale),
            None if bias is None else self.per_group(bias),
            mask,
        )

    def per_group(self, value: jax.Array) -> jax.Array:
        """A feature-shaped array broadcast to the grouped feature shape."""
        if self.group_axis is None:
            return value
        expanded = jnp.expand_dims(value, self.group_axis)
        return jnp.broadcast_to(expanded, self.layout.feature_shape)


def ghost_layout(
    lay: _checks.Layout,
    x_shape: tuple[int, ...],
    virtual_batch_size: int | None,
    axis_name: AxisName | None,
) -> Ghost:
    """The ghost-batch layout of an input of ``x_shape``; checks ``virtual_batch_size``."""
    if virtual_batch_size is None:
        return Ghost(x_shape, x_shape, lay, None)
    if axis_name is not None:
        raise ValueError(
            f"`virtual_batch_size` cannot be combined with `axis_name` (got "
            f"virtual_batch_size={virtual_batch_size!r}, axis_name={axis_name!r}): ghost "
            f"batches are normalized with their own local statistics, so there is nothing to "
            f"synchronize. Drop `axis_name`, and average the new states over the devices "
            f"yourself if they must agree."
        )
    batch_axis = lay.reduction_axes[0]
    size = x_shape[batch_axis]
    if size % virtual_batch_size:
        raise ValueError(
            f"`virtual_batch_size` must divide the batch axis (axis {batch_axis} of `x`, size "
            f"{size}), got virtual_batch_size={virtual_batch_size}. Use a batch size that is a "
            f"multiple of it, or a divisor of {size}."
        )
    groups = size // virtual_batch_size
    grouped_shape = (*x_shape[:batch_axis], groups, virtual_batch_size, *x_shape[batch_axis + 1 :])
    feature_axes = tuple(a if a < batch_axis else a + 1 for a in lay.feature_axes)
    feature_axes = tuple(sorted((*feature_axes, batch_axis)))
    grouped = _checks.with_shape(
        _checks.Layout(
            feature_axes,
            tuple(a for a in range(len(grouped_shape)) if a not in feature_axes),
            (),
            (),
        ),
        grouped_shape,
    )
    return Ghost(x_shape, grouped_shape, grouped, feature_axes.index(batch_axis))


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
    """
    # No gradient flows into the running statistics. Stopping it here, before the update's
    # arithmetic rather than after, lets autodiff skip tracing tangents through all of it.
    batch_mean, batch_var, valid_count = jax.lax.stop_gradient((batch_mean, batch_var, valid_count))
    state = jax.lax.stop_gradient(state)
    feature_shape = ghost.layout.feature_shape
    mean = batch_mean.reshape(feature_shape)
    var = batch_var.reshape(feature_shape)
    count = valid_count.reshape(feature_shape)
    var_count = count
    if unbiased_running_var:
        var = var * (count / jnp.maximum(count - 1, 1))
        var_count = jnp.where(count > 1, count, 0)
    if ghost.group_axis is not None:
        mean, count = _mean_over_groups(mean, count, ghost.group_axis)
        var, var_count = _mean_over_groups(var, var_count, ghost.group_axis)
    return _update(state, mean, var, count, momentum, debias=debias, var_count=var_count)


def _mean_over_groups(
    value: jax.Array, count: jax.Array, group_axis: int
) -> tuple[jax.Array, jax.Array]:
    """The unweighted mean of ``value`` over the groups with ``count > 0``, and the total count."""
    has = count > 0
    total = jnp.sum(jnp.where(has, value, 0), axis=group_axis)
    groups = jnp.sum(has, axis=group_axis, dtype=value.dtype)
    return total / jnp.maximum(groups, 1), jnp.sum(count, axis=group_axis)


def _affine(
    params: Mapping[str, ArrayLike | None] | None,
) -> tuple[jax.Array | None, jax.Array | None]:
    params = params or {}
    scale, bias = params.get("scale"), params.get("bias")
    return (
        None if scale is None else jnp.asarray(scale),
        None if bias is None else jnp.asarray(bias),
    )


def _normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    params: Mapping[str, ArrayLike | None] | None,
    epsilon: Any,
    lay: _checks.Layout,
) -> jax.Array:
    """Evaluation: ``(x - mean) * (scale * rsqrt(var + eps)) + bias`` in one fused pass.

    The per-feature multiplier is precomputed; subtracting the mean before scaling (rather
    than adding a precomputed ``bias - mean * mul``) keeps the output exact to rounding when
    ``|mean| >> std``, and costs nothing in a memory-bound kernel. Plain JAX operations, so
    every transformation (forward-mode AD included) applies.
    """
    scale, bias = _affine(params)
    shape = lay.broadcast_shape
    return _scale_shift(x, mean.reshape(shape), var.reshape(shape), scale, bias, epsilon)[0]


def _scale_shift(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``y = (x - mean) * mul + bias`` with ``mul = scale * rsqrt(var + eps)``.

    ``mean`` and ``var`` broadcast against ``x``. Returns ``(y, mul, inv_std)``; the
    arithmetic runs in float32 or wider (the widest of x, the statistics and the params).
    """
    dtype = wider_float(
        stats_dtype(x.dtype), mean.dtype, *(None if p is None else p.dtype for p in (scale, bias))
    )
    inv_std = jax.lax.rsqrt(var.astype(dtype) + epsilon)
    mul = inv_std if scale is None else inv_std * scale.astype(dtype).reshape(mean.shape)
    y = (x.astype(dtype) - mean.astype(dtype)) * mul
    if bias is not None:
        y = y + bias.astype(dtype).reshape(mean.shape)
    return y.astype(x.dtype), mul, inv_std


class _Sync(NamedTuple):
    """The static configuration of one training-mode call (hashable)."""

    reduction_axes: tuple[int, ...]
    axis_name: AxisName | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    scale_sync: tuple[Hashable, ...]  # axes to sum the scale's gradient over
    bias_sync: tuple[Hashable, ...]  # axes to sum the bias's gradient over


def _groups(axis_index_groups: Any) -> tuple[tuple[int, ...], ...] | None:
    if axis_index_groups is None:
        return None
    return tuple(tuple(int(i) for i in group) for group in axis_index_groups)


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
    x_varies, param_varies = _varying_axes(x), _varying_axes(param)
    return tuple(sorted(x_varies - param_varies, key=str))


def _varying_axes(value: jax.Array) -> frozenset[Hashable]:
    """The manual mesh axes over which ``value`` is typed as differing between devices."""
    aval = jax.typeof(value)
    manual_type = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if manual_type is not None:
        return frozenset(manual_type.varying)
    return frozenset(getattr(aval, "vma", frozenset()))  # earlier releases


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(
    sync: _Sync,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    epsilon: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Training-mode normalization: ``(y, batch_mean, batch_var, valid_count)``.

    A custom VJP, so that the memory traffic is near its floor: the backward needs only
    ``Σ dy`` and ``Σ dy·x̂`` (sibling sums over ``x`` and ``dy``) and one elementwise pass
    for ``dx``, and saves nothing of ``x``'s size but ``x`` itself; those two sums are also
    the gradients of the bias and the scale, and the one backward collective. Where XLA
    fuses sibling reductions (GPU, TPU) that is 3 passes forward and 5 backward; XLA:CPU
    runs each sum as its own kernel (see :func:`~jaxbn._moments.local_moments_and_condition`).
    The statistics outputs carry no gradient (``batch_norm`` stops gradients into the new
    state).
    """
    outputs, _ = _train_fwd(sync, x, scale, bias, mask, epsilon)
    return outputs


def _train_fwd(
    sync: _Sync,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    epsilon: Any,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], tuple[Any, ...]]:
    moments, conditioned = local_moments_and_condition(
        x, sync.reduction_axes, mask, stats_dtype(x.dtype)
    )
    if sync.axis_name is not None:
        moments = combine(moments, sync.axis_name, sync.axis_index_groups)
    mean, var = mean_and_var(moments)
    y, mul, inv_std = _scale_shift(x, mean, var, scale, bias, epsilon)
    if sync.axis_name is not None:  # the backward's sums use the global mean and variance
        conditioned = well_conditioned(mean, var)
    count = moments.valid_count
    residuals = (x, scale, bias, mask, epsilon, mean, inv_std, mul, count, conditioned)
    return (y, mean, var, moments.valid_count), residuals


def _train_bwd(
    sync: _Sync, residuals: tuple[Any, ...], cotangents: tuple[jax.Array, ...]
) -> tuple[Any, ...]:
    x, scale, bias, mask, epsilon, mean, inv_std, mul, valid_count, conditioned = residuals
    dy = cotangents[0]  # the statistics outputs only feed the stop-gradient'ed state
    axes = sync.reduction_axes
    g = dy.astype(mul.dtype)
    values = x.astype(mul.dtype)
    mean = mean.astype(mul.dtype)
    x_hat = (values - mean) * inv_std
    # Every output is normalized with the batch statistics, so Σ dy and Σ dy·x̂ run over all
    # entries; only the valid entries moved the statistics, so only they get that term.
    # The same two sums are the gradients of the bias and the scale.
    local = _grad_sums(axes, dy, x, mean, inv_std, conditioned)
    names = () if sync.axis_name is None else sync.axis_name
    names = names if isinstance(names, tuple) else (names,)
    param_syncs = [
        set(names_)
        for param, names_ in ((scale, sync.scale_sync), (bias, sync.bias_sync))
        if param is not None
    ]
    if names and sync.axis_index_groups is None and all(s == set(names) for s in param_syncs):
        # One collective: the global sums serve dx and the replicated params alike.
        stat_sums = param_sums = tuple(sync_sum(jnp.stack(local), sync.axis_name, None))
    else:
        stat_sums = (
            tuple(sync_sum(jnp.stack(local), sync.axis_name, sync.axis_index_groups))
            if names
            else local
        )
        param_sums = (_psum_if(local[0], sync.bias_sync), _psum_if(local[1], sync.scale_sync))
    sum_dy, sum_dy_xhat = stat_sums
    correction = (sum_dy + x_hat * sum_dy_xhat) / jnp.maximum(valid_count, 1)
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = mul * (g - correction)
    d_scale = None if scale is None else param_sums[1].reshape(scale.shape).astype(scale.dtype)
    d_bias = None if bias is None else param_sums[0].reshape(bias.shape).astype(bias.dtype)
    d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return dx.astype(x.dtype), d_scale, d_bias, d_mask, jnp.zeros_like(epsilon)


_train.defvjp(_train_fwd, _train_bwd)


def _grad_sums(
    axes: tuple[int, ...],
    dy: jax.Array,
    x: jax.Array,
    mean: jax.Array,
    inv_std: jax.Array,
    conditioned: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(Σ g, Σ g·x̂)`` over ``axes``, with ``g = dy`` and ``x̂ = (x - mean) · inv_std``.

    When the batch is well conditioned (``mean² ≤ CONDITION·var``), ``Σ g·x̂`` is taken as
    ``inv_std · (Σ g·x - mean · Σ g)``: sums of full-shape operands only, which XLA:CPU
    reduces without writing out a broadcast ``mean``. Otherwise from centred values.
    ``dy`` and ``x`` enter in their own dtype and are widened inside each sum (see
    :func:`~jaxbn._moments.separate_reads`), so no widened copy is written out.
    """
    dtype = mean.dtype
    if not axes:
        g = dy.astype(dtype)
        return g, g * (x.astype(dtype) - mean) * inv_std
    if dy.dtype != jnp.bfloat16:
        # float16 (which XLA:CPU's sums do not read natively): one widened copy, shared by
        # both branches and the dx kernel, is cheaper than one inside the branch.
        dy, x = dy.astype(dtype), x.astype(dtype)

    def widened() -> tuple[jax.Array, jax.Array, jax.Array]:
        # Called inside each branch, so that the reads are the branch's own.
        g, g_too = (v.astype(dtype) for v in separate_reads(dy, dtype))
        (values,) = separate_reads(x, dtype, 1)
        return g, g_too, values.astype(dtype)

    def direct() -> tuple[jax.Array, jax.Array]:
        g, g_too, values = widened()
        sum_g, sum_gx = sum_over((g, g_too * values), axes)
        return sum_g, inv_std * (sum_gx - mean * sum_g)

    def centred() -> tuple[jax.Array, jax.Array]:
        g, g_too, values = widened()
        sum_g, sum_gx_hat = sum_over((g, g_too * ((values - mean) * inv_std)), axes)
        return sum_g, sum_gx_hat

    return jax.lax.cond(conditioned, direct, centred)


def _psum_if(value: jax.Array, names: tuple[Hashable, ...]) -> jax.Array:
    return jax.lax.psum(value, names) if names else value


def _update(
    state: BatchStats,
    batch_mean: jax.Array,
    batch_var: jax.Array,
    count: jax.Array,
    momentum: float | None,
    *,
    debias: bool = False,
    var_count: jax.Array | None = None,
) -> BatchStats:
    """Merges one batch's statistics into the running ones, never corrupting them.

    ``count`` (feature-shaped) is the number of valid entries behind ``batch_mean``;
    ``var_count`` (default ``count``) the number behind ``batch_var``. A feature whose count
    is 0 keeps its running value. The ``k``-th accepted batch has weight ``1 - momentum``,
    ``1/k`` with ``momentum=None``, or ``(1 - momentum)/(1 - momentum**k)`` with ``debias``.
    """
    batch_mean = batch_mean.astype(state.mean.dtype)  # the state's dtype never changes
    batch_var = batch_var.astype(state.var.dtype)
    finite = jnp.all(jnp.isfinite(batch_mean) & jnp.isfinite(batch_var))
    accepted = finite & jnp.any(count > 0)  # a batch with no valid entry is not counted
    merged = state.count + accepted.astype(state.count.dtype)
    dtype = state.mean.dtype
    if momentum is None:
        decay = 1.0 - 1.0 / jnp.maximum(merged, 1).astype(dtype)
    elif debias:
        momentum_ = jnp.asarray(momentum, dtype)
        steps = jnp.maximum(merged, 1).astype(dtype)
        decay = 1.0 - (1.0 - momentum_) / (1.0 - momentum_**steps)
    else:
        decay = jnp.asarray(momentum, dtype)
    weight = 1 - decay
    # A feature with no valid entry (all masked out) keeps its running values. lax.select,
    # not jnp.where: the operands already agree in shape and dtype, and it traces faster.
    rejected = jnp.logical_not(accepted)
    keep = rejected | (count == 0)
    keep_var = keep if var_count is None or var_count is count else rejected | (var_count == 0)
    new_mean = jax.lax.select(keep, state.mean, decay * state.mean + weight * batch_mean)
    new_var = jax.lax.select(keep_var, state.var, decay * state.var + weight * batch_var)
    # Every input is gradient-free (update_from_batch stops them), so the result is too.
    return BatchStats(
        mean=new_mean.astype(state.mean.dtype),
        var=new_var.astype(state.var.dtype),
        count=merged.astype(state.count.dtype),
    )

"""batch_renorm(): Batch Renormalization (Ioffe, 2017) on the batch_norm state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from ._batch_norm import grouped_inputs, update_from_batch
from ._checks import check_common, check_renorm_clipping, check_training_layout
from ._dtypes import is_complex, stats_dtype
from ._ghost import ghost_layout
from ._layout import AxisName
from ._moments import combine, local_moments, mean_and_var
from ._normalize import coefficients, compute_dtype, normalize_eval, scale_shift
from ._state import BatchStats

__all__ = ["batch_renorm"]


def batch_renorm(
    x: ArrayLike,
    params: Mapping[str, ArrayLike | None] | None,
    state: BatchStats,
    *,
    training: bool,
    r_max: ArrayLike,
    d_max: ArrayLike,
    axis: int | Sequence[int] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    mask: ArrayLike | None = None,
    virtual_batch_size: int | None = None,
    debias: bool = False,
    unbiased_running_var: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, BatchStats]:
    r"""Batch Renormalization (Ioffe, 2017): batch norm corrected toward the running statistics.

    In training, the batch moments ``μ_B, σ²_B`` are taken exactly as in
    :func:`~jaxbn.batch_norm` (same reduction axes, mask, synchronization over
    ``axis_name`` and ghost batches), and the output is corrected by the running
    statistics ``μ, σ²`` of ``state`` (their values before this batch's update)::

        σ_B = sqrt(σ²_B + epsilon),   σ = sqrt(var + epsilon)
        r   = stop_gradient(clip(σ_B / σ, 1/r_max, r_max))
        d   = stop_gradient(clip((μ_B - μ) / σ, -d_max, d_max))
        y   = scale * ((x - μ_B) / σ_B * r + d) + bias

    Without clipping, ``y`` equals the evaluation-mode output, so training and inference see
    the same function while gradients still flow through ``μ_B`` and ``σ_B``; with
    ``r_max=1, d_max=0`` it is plain batch normalization. The paper starts with
    ``r_max=1, d_max=0`` and relaxes them to ``r_max=3, d_max=5`` over training: both may be
    traced values (e.g. computed from the step inside ``jax.jit``). The running statistics
    are updated exactly as by :func:`~jaxbn.batch_norm` (same options: ``momentum=None``,
    ``debias``, ``unbiased_running_var``, non-finite batches skipped). Evaluation
    (``training=False``) is :func:`~jaxbn.batch_norm`'s evaluation and returns ``state``
    as given.

    Gradients are plain JAX autodiff (forward and reverse mode, any order).

    Args:
      x: the input, of a floating dtype.
      params: ``{"scale": γ, "bias": β}`` of the feature shape, or None.
      state: the running statistics, a :class:`~jaxbn.BatchStats`.
      training: keyword-only, no default: batch statistics with the r/d correction and an
        updated state (True), or the running statistics (False).
      r_max: the clipping bound of ``r``, ``>= 1``; a Python number or a (traced) scalar.
      d_max: the clipping bound of ``d``, ``>= 0``; a Python number or a (traced) scalar.
      axis: the feature axis or axes, as in :func:`~jaxbn.batch_norm`.
      momentum: EMA decay in ``[0, 1)``, or None for a cumulative average; a scalar,
        range-checked unless traced, as in :func:`~jaxbn.batch_norm`.
      epsilon: added to both variances before the square root; a scalar > 0, range-checked
        unless traced.
      axis_name: named axis (or tuple) over which the batch moments are synchronized.
      axis_index_groups: with ``axis_name``, groups of devices that synchronize separately.
      mask: bool, broadcastable to ``x``: only True entries count toward the statistics.
      virtual_batch_size: ghost batches, each with its own ``μ_B, σ_B`` (and so its own
        ``r, d``); see :func:`~jaxbn.batch_norm`.
      debias: zero-debiased EMA of the running statistics; see :func:`~jaxbn.batch_norm`.
      unbiased_running_var: store the unbiased batch variance (PyTorch's convention).
      dtype: the dtype of ``y``, as in :func:`~jaxbn.batch_norm` (None: ``x``'s).

    Returns:
      ``(y, new_state)`` as :func:`~jaxbn.batch_norm` returns them.

    Raises:
      TypeError: as :func:`~jaxbn.batch_norm`, or ``r_max``/``d_max`` not a real scalar.
      ValueError: as :func:`~jaxbn.batch_norm`, or a concrete ``r_max < 1`` or ``d_max < 0``.
      NameError: ``axis_name`` is not bound by an enclosing transformation.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> params, state = jaxbn.init(4)
      >>> x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (32, 4))
      >>> y, new = jaxbn.batch_renorm(x, params, state, training=True, r_max=1.0, d_max=0.0)
      >>> y_bn, _ = jaxbn.batch_norm(x, params, state, training=True)
      >>> bool(jnp.allclose(y, y_bn, atol=1e-5))
      True
      >>> y, new = jaxbn.batch_renorm(x, params, new, training=True, r_max=3.0, d_max=5.0)
    """
    with jax.named_scope("jaxbn.batch_renorm"):
        check_renorm_clipping(r_max, d_max)
        x, lay = check_common(
            x,
            params,
            state,
            training=training,
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            mask=mask,
            virtual_batch_size=virtual_batch_size,
            debias=debias,
            unbiased_running_var=unbiased_running_var,
            dtype=dtype,
        )
        if not training:
            return normalize_eval(x, state.mean, state.var, params, epsilon, lay, dtype), state
        if is_complex(x.dtype):
            raise TypeError(
                f"`x` must be real for batch_renorm in training (its r and d corrections are "
                f"clipped real ratios), got {x.dtype}. Use jaxbn.batch_norm for complex input."
            )

        check_training_layout(
            x.shape,
            lay,
            axis=axis,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            virtual_batch_size=virtual_batch_size,
        )
        ghost = ghost_layout(lay, x.shape, virtual_batch_size)
        x_g, scale_g, bias_g, mask_g = grouped_inputs(ghost, x, params, mask)
        moments = local_moments(
            x_g, ghost.layout.reduction_axes, mask_g, stats_dtype(x.dtype)
        )
        if axis_name is not None:
            moments = combine(moments, axis_name, axis_index_groups)
        batch_mean, batch_var = mean_and_var(moments)

        out_dtype = dtype
        dtype = compute_dtype(x.dtype, state.mean, scale_g, bias_g, out_dtype=out_dtype)
        shape = ghost.layout.broadcast_shape
        running_mean = ghost.per_group(state.mean.astype(dtype)).reshape(shape)
        running_var = ghost.per_group(state.var.astype(dtype)).reshape(shape)
        _, inv_sigma_batch = coefficients(batch_var, None, epsilon, dtype)
        _, inv_sigma = coefficients(running_var, None, epsilon, dtype)
        r_max_ = jnp.asarray(r_max).astype(dtype)
        d_max_ = jnp.asarray(d_max).astype(dtype)
        r = jax.lax.stop_gradient(
            jnp.clip(inv_sigma / inv_sigma_batch, 1.0 / r_max_, r_max_)  # σ_B / σ
        )
        d = jax.lax.stop_gradient(
            jnp.clip((batch_mean.astype(dtype) - running_mean) * inv_sigma, -d_max_, d_max_)
        )
        # y = scale · ((x - μ_B)/σ_B · r + d) + bias = (x - μ_B) · (scale·r/σ_B) + shift
        mul, _ = coefficients(batch_var, scale_g, epsilon, dtype)
        shift = d if scale_g is None else d * scale_g.astype(dtype)
        if bias_g is not None:
            shift = shift + bias_g.astype(dtype)
        y = scale_shift(x_g, batch_mean, mul * r, shift, dtype, out_dtype)

        new_state = update_from_batch(
            state,
            ghost,
            batch_mean,
            batch_var,
            moments.valid_count,
            momentum=momentum,
            debias=debias,
            unbiased_running_var=unbiased_running_var,
        )
        return y.reshape(x.shape), new_state

"""``jaxbn.linen.BatchNorm``: a drop-in replacement for ``flax.linen.BatchNorm``.

Same fields in the same order, same call signature, same variables
(``params/{scale,bias}``, ``batch_stats/{mean,var}``), so a model switches by changing one
import and its existing checkpoints load unchanged. The math is ``jaxbn.batch_norm``'s: an
accurate variance whatever ``use_fast_variance`` says, devices weighted by their true
counts under ``axis_name``, and a batch with non-finite statistics never corrupts the
running averages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers
from flax.typing import Dtype, Initializer

from ._adapter import (
    as_read,
    check_use_running_average,
    check_variables,
    normalize_with_fields,
    output_dtype,
    stored,
)
from ._checks import layout, with_shape
from ._dtypes import wider_float

__all__ = ["BatchNorm"]


class BatchNorm(nn.Module):
    """BatchNorm module with the interface of ``flax.linen.BatchNorm``.

    Usage::

      >>> import jax, jax.numpy as jnp
      >>> from jaxbn.linen import BatchNorm  # was: from flax.linen import BatchNorm
      >>> bn = BatchNorm(use_running_average=False, momentum=0.9)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = bn.init(jax.random.key(1), x)
      >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> sorted(updates["batch_stats"])
      ['mean', 'var']

    The fields after ``force_float32_reductions`` are jaxbn's own and keyword-only: the
    constructor takes all of flax's arguments first, in flax's order, so positional
    construction means what it means in flax. Their defaults give plain batch norm, with
    flax's variables.

    Attributes:
      use_running_average: if True, normalize with the stored running statistics.
      axis: the feature axis (or tuple of axes) of the input.
      momentum: EMA decay of the running statistics (``momentum*old + (1-momentum)*batch``).
      epsilon: a small float added to the variance to avoid dividing by zero.
      dtype: the dtype of the result (default: inferred from input and params).
      param_dtype: the dtype of the parameters.
      use_bias: if True, add a learned bias (β).
      use_scale: if True, multiply by a learned scale (γ).
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      axis_name: the named axis over which statistics are synchronized (pmap/shard_map).
      axis_index_groups: groups of device indices within that axis that sync separately.
      use_fast_variance: accepted for compatibility and not needed: jaxbn's variance is
        both accurate and computed in one fused reduction pass after the mean, so there is
        no fast-but-inaccurate mode to opt into.
      force_float32_reductions: accepted for compatibility. Statistics are always reduced in
        float32 or wider; when False the running statistics are *stored* in
        ``param_dtype`` as flax does, so checkpoints keep their dtypes.
      virtual_batch_size: ghost batches of this size, each normalized with its own
        statistics (see ``jaxbn.batch_norm``); None: one batch.
      debias: zero-debiased EMA of the running statistics. Adds a ``batch_stats/count``
        variable (int32, the number of batches merged), which it needs; the other
        variables are unchanged.
      unbiased_running_var: store the unbiased batch variance (PyTorch's convention).
      use_renorm: Batch Renormalization (``jaxbn.batch_renorm``) instead of batch norm.
      r_max: with ``use_renorm``, the bound of ``r`` (>= 1). A module field may hold a
        traced value, so a ramp works when the module is built inside the jitted function.
      d_max: with ``use_renorm``, the bound of ``d`` (>= 0).

    A frozen layer for fine-tuning (keras ``trainable=False``) is
    ``use_running_average=True``: the running statistics are used and not updated, and
    gradients still flow to ``scale``, ``bias`` and the input.
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    # jaxbn's own fields: keyword-only, so that in __init__ they follow all of flax's
    # parameters (its `parent` and `name` included) and positional use matches flax.
    virtual_batch_size: int | None = dataclasses.field(default=None, kw_only=True)
    debias: bool = dataclasses.field(default=False, kw_only=True)
    unbiased_running_var: bool = dataclasses.field(default=False, kw_only=True)
    use_renorm: bool = dataclasses.field(default=False, kw_only=True)
    r_max: Any = dataclasses.field(default=3.0, kw_only=True)
    d_max: Any = dataclasses.field(default=5.0, kw_only=True)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x`` with batch statistics (training) or the running ones.

        Args:
          x: the input.
          use_running_average: overrides the field of the same name if given.
          mask: bool, broadcastable to ``x``: the entries that count toward the statistics.

        Returns:
          The normalized input, of the same shape.

        During ``init`` the running statistics are not updated and the statistics are not
        synchronized across devices (``axis_name`` need not be bound), as in flax.
        """
        use_running_average = check_use_running_average(
            nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        )
        x = jnp.asarray(x)
        lay = with_shape(layout(x.ndim, self.axis), x.shape)
        stored_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, stored_dtype), lay.feature_shape
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda s: jnp.ones(s, stored_dtype), lay.feature_shape
        )
        scale = (
            self.param("scale", self.scale_init, lay.feature_shape, self.param_dtype)
            if self.use_scale
            else None
        )
        bias = (
            self.param("bias", self.bias_init, lay.feature_shape, self.param_dtype)
            if self.use_bias
            else None
        )
        check_variables(
            lay.feature_shape, "in `batch_stats`", mean=ra_mean.value, var=ra_var.value
        )
        check_variables(lay.feature_shape, "in `params`", scale=scale, bias=bias)
        out_dtype = output_dtype(self.dtype, x, scale, bias)
        count = (
            self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
            if self.debias
            else None
        )
        initializing = self.is_initializing()
        y, new_state = normalize_with_fields(
            self,
            as_read(x, wider_float(x.dtype, out_dtype)),
            scale,
            bias,
            ra_mean.value,
            ra_var.value,
            None if count is None else count.value,
            training=not use_running_average,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask,
            out_dtype=out_dtype,
        )
        if not use_running_average and not initializing:
            ra_mean.value = stored(new_state.mean, ra_mean.value)
            ra_var.value = stored(new_state.var, ra_var.value)
            if count is not None:
                count.value = new_state.count
        return y.astype(out_dtype)

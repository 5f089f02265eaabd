"""``jaxbn.nnx.BatchNorm``: a drop-in replacement for ``flax.nnx.BatchNorm``.

Same constructor, same ``nnx.Param`` (``scale``, ``bias``) and ``nnx.BatchStat``
(``mean``, ``var``) variables, same ``.train()``/``.eval()``/``nnx.view`` behaviour; the math
is ``jaxbn.batch_norm``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from ._adapter import (
    as_read,
    check_features,
    check_use_running_average,
    check_variables,
    normalize_with_fields,
    output_dtype,
    stored,
)
from ._dtypes import wider_float

__all__ = ["BatchNorm"]

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()


def _promote(arrays: tuple[Any, ...], dtype: Dtype | None) -> tuple[Any, Any]:
    """flax's default ``promote_dtype``, with explicit promotion that strict mode accepts:
    ``(promoted arrays, their dtype)``, where ``x`` (the first) is left in its own dtype
    when it is floating (:func:`~jaxbn._adapter.as_read`), and the output is written in
    the promoted dtype."""
    target = dtype or wider_float(*(None if a is None else a.dtype for a in arrays))
    x, *rest = arrays
    promoted = (as_read(jnp.asarray(x), target),
                *(None if a is None else jnp.asarray(a, target) for a in rest))
    return promoted, target


class BatchNorm(nnx.Module):
    """BatchNorm with the interface of ``flax.nnx.BatchNorm``.

    Usage::

      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.nnx import BatchNorm  # was: nnx.BatchNorm
      >>> bn = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
      >>> y = bn(jax.random.normal(jax.random.key(0), (8, 3)))  # training: updates bn.mean/var
      >>> bn.eval()  # now uses the running statistics
      >>> bn.use_running_average
      True

    Args:
      num_features: the number of input features.
      use_running_average: if True, normalize with the stored running statistics.
      axis: the feature axis of the input.
      momentum: EMA decay of the running statistics (``momentum*old + (1-momentum)*batch``).
      epsilon: a small float added to the variance to avoid dividing by zero.
      dtype: the dtype of the result (default: inferred from input and params).
      param_dtype: the dtype of the parameters.
      use_bias: if True, add a learned bias (β).
      use_scale: if True, multiply by a learned scale (γ).
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      axis_name: the named axis over which statistics are synchronized.
      axis_index_groups: groups of device indices within that axis that sync separately.
      use_fast_variance: accepted for compatibility and not needed (the variance is always
        the accurate one, at no extra cost).
      promote_dtype: promotes ``(x, mean, var, scale, bias)`` to a common dtype, as in flax.
      rngs: the random number generators for the parameter initializers.
      bias_metadata: metadata for the bias ``nnx.Param``.
      scale_metadata: metadata for the scale ``nnx.Param``.
      virtual_batch_size: jaxbn's own (this and the following arguments come after all of
        flax's, and their defaults give plain batch norm with flax's variables): ghost
        batches of this size, each normalized with its own statistics; None: one batch.
      debias: zero-debiased EMA of the running statistics. Adds an ``nnx.BatchStat``
        ``count`` (int32, the number of batches merged), which it needs.
      unbiased_running_var: store the unbiased batch variance (PyTorch's convention).
      use_renorm: Batch Renormalization (``jaxbn.batch_renorm``) instead of batch norm.
      r_max: with ``use_renorm``, the bound of ``r`` (>= 1). A plain attribute: changing it
        retraces under ``nnx.jit``; for a per-step ramp use ``jaxbn.batch_renorm``.
      d_max: with ``use_renorm``, the bound of ``d`` (>= 0).

    A frozen layer for fine-tuning (keras ``trainable=False``) is ``.eval()`` (or
    ``use_running_average=True``): the running statistics are used and not updated, and
    gradients still flow to ``scale``, ``bias`` and the input.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
        debias: bool = False,
        unbiased_running_var: bool = False,
        use_renorm: bool = False,
        r_max: float = 3.0,
        d_max: float = 5.0,
    ):
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        self.scale: nnx.Param[jax.Array] | None
        if use_scale:
            self.scale = nnx.Param(
                scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata
            )
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            self.bias = nnx.Param(
                bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata
            )
        else:
            self.bias = nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.count: nnx.BatchStat[jax.Array] | None
        if debias:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        else:
            self.count = nnx.data(None)
        self.virtual_batch_size = virtual_batch_size
        self.debias = debias
        self.unbiased_running_var = unbiased_running_var
        self.use_renorm = use_renorm
        self.r_max = r_max
        self.d_max = d_max

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; in training mode also updates ``self.mean`` and ``self.var``.

        Args:
          x: the input.
          use_running_average: overrides the attribute of the same name if given.
          mask: bool, broadcastable to ``x``: the entries that count toward the statistics.

        Returns:
          The normalized input, of the same shape.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "`use_running_average` is None both at call time and on the module: pass "
                "use_running_average=True/False to BatchNorm(...) or to the call, or call "
                "model.train() / model.eval() first."
            )
        use_running_average = check_use_running_average(use_running_average)
        x = jnp.asarray(x)
        check_features(x, self.axis, (self.num_features,), "num_features")
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        stored_mean, stored_var = self.mean[...], self.var[...]
        check_variables(
            (self.num_features,), "of the layer", mean=stored_mean, var=stored_var,
            scale=scale, bias=bias,
        )
        arrays = (jnp.asarray(x), stored_mean, stored_var, scale, bias)
        if self.promote_dtype is dtypes.promote_dtype:
            (x, mean, var, scale, bias), out_dtype = _promote(arrays, self.dtype)
        else:
            x, mean, var, scale, bias = self.promote_dtype(arrays, dtype=self.dtype)
            out_dtype = output_dtype(self.dtype, x, scale, bias)
        if not use_running_average:
            # The EMA runs on the stored (float32) statistics, as in flax.
            mean, var = stored_mean, stored_var
        y, new_state = normalize_with_fields(
            self,
            x,
            scale,
            bias,
            mean,
            var,
            None if self.count is None else self.count[...],
            training=not use_running_average,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            out_dtype=out_dtype,
        )
        if not use_running_average:
            # set_value replaces the array: the mean of a complex input stays complex
            # (flax.nnx warns and keeps its real part; flax.linen keeps it complex).
            self.mean.set_value(stored(new_state.mean, stored_mean))
            self.var.set_value(stored(new_state.var, stored_var))
            if self.count is not None:
                self.count[...] = new_state.count
        return y.astype(out_dtype)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` if given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

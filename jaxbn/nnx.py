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
from ._convert_nnx import copy_attributes, path_string, swap_layers
from ._dtypes import wider_float
from ._overrides import check_overrides

__all__ = ["BatchNorm", "convert_batch_norm", "revert_batch_norm"]

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
        the accurate two-pass one; there is no fast-but-inaccurate mode).
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


# ----------------------------------------------------------------------------------------------
# Converting the flax.nnx.BatchNorm layers of a model, and back
# ----------------------------------------------------------------------------------------------

# The fields of BatchNorm that convert_batch_norm may set on every converted layer.
_SETTABLE = frozenset({
    "use_running_average", "axis", "momentum", "epsilon", "dtype", "axis_name",
    "axis_index_groups", "use_fast_variance", "promote_dtype", "virtual_batch_size", "debias",
    "unbiased_running_var", "use_renorm", "r_max", "d_max",
})
_KEPT = "conversion keeps the model's Variables, and this decides which Variables there are"
_INIT_ONLY = "it is only used to create Variables, and conversion keeps the model's"
_FIXED = {
    "num_features": "it is the size of the model's Variables",
    "use_bias": _KEPT,
    "use_scale": _KEPT,
    "param_dtype": "it is the dtype of the model's Params, which conversion keeps",
    "bias_init": _INIT_ONLY,
    "scale_init": _INIT_ONLY,
    "bias_metadata": _INIT_ONLY,
    "scale_metadata": _INIT_ONLY,
    "rngs": _INIT_ONLY,
}
# jaxbn's own fields (and the Variable `count`), which flax.nnx.BatchNorm does not have.
_JAXBN_ONLY = frozenset({
    "count", "virtual_batch_size", "debias", "unbiased_running_var", "use_renorm", "r_max",
    "d_max",
})


def convert_batch_norm(model: Any, **overrides: Any) -> Any:
    """Replaces every ``flax.nnx.BatchNorm`` of ``model`` by a :class:`BatchNorm`, in place.

    Each new layer holds the *same* Variable objects (``mean``, ``var``, ``scale``,
    ``bias``) and every field of the old one (``use_running_average`` included), then the
    ``overrides``. ``nnx.state(model)`` keeps its paths, types and values (unless
    ``debias=True`` adds each layer's ``count``), so checkpoints and an ``nnx.Optimizer``
    made before the conversion keep working. The swap is made in the model's own
    attributes, ``nnx.List``, ``nnx.Dict``, ``nnx.Sequential`` and lists and dicts; a layer
    shared by several parents stays one (new) object; layers stacked with ``nnx.vmap`` keep
    their stacked Variables. Layers that are already :class:`BatchNorm` get the overrides, so
    converting twice changes nothing.

    Example::

      >>> import jax, jax.numpy as jnp, jaxbn.nnx
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> mean = model.layers[1].mean
      >>> model = jaxbn.nnx.convert_batch_norm(model, momentum=0.9)
      >>> type(model.layers[1]).__name__, model.layers[1].mean is mean
      ('BatchNorm', True)

    Args:
      model: an nnx graph (a Module, or a list, dict or tuple of them); a model that is
        itself a ``flax.nnx.BatchNorm`` is replaced by the return value.
      **overrides: fields of :class:`BatchNorm` set on every layer: ``axis_name``,
        ``axis_index_groups``, ``momentum``, ``epsilon``, ``use_running_average``,
        ``virtual_batch_size``, ``debias`` (adds a ``count`` BatchStat at 0, one per
        layer stacked along the leading axes: the next training batch replaces the
        running statistics), ``unbiased_running_var``,
        ``use_renorm``, ``r_max``, ``d_max``, ``axis``, ``dtype``, ``promote_dtype``,
        ``use_fast_variance``.

    Returns:
      ``model``, changed in place; or the new layer when ``model`` is a BatchNorm.

    Raises:
      TypeError: an override that is not a settable field of :class:`BatchNorm`, or a
        subclass of ``flax.nnx.BatchNorm`` in the model (converting it would drop what the
        subclass adds).
      ValueError: no BatchNorm in the model, or an override out of range.
    """
    check_overrides(overrides, _SETTABLE, _FIXED, "jaxbn.nnx.BatchNorm")
    if not _count_layers(model, (nnx.BatchNorm, BatchNorm), "convert"):
        raise ValueError(
            f"`model` ({type(model).__name__}) holds no flax.nnx.BatchNorm to convert: "
            f"convert_batch_norm looks through its attributes, nnx.List, nnx.Dict, "
            f"nnx.Sequential, lists, tuples and dicts."
        )

    def swap(path: tuple[Any, ...], node: Any) -> Any:
        if type(node) is nnx.BatchNorm:
            return _to_jaxbn(node, overrides)
        if type(node) is BatchNorm:
            _set_fields(node, overrides)
        return node

    return swap_layers(model, swap)


def revert_batch_norm(model: Any) -> Any:
    """Replaces every :class:`BatchNorm` of ``model`` by a ``flax.nnx.BatchNorm``, in place.

    The inverse of :func:`convert_batch_norm`: each ``flax.nnx.BatchNorm`` holds the same
    Variable objects and flax's fields of the jaxbn layer (its current ``momentum``,
    ``axis_name``, ...). jaxbn's own fields (ghost batches, ``debias`` and its ``count``,
    ``unbiased_running_var``, renorm) have no flax equivalent and are dropped; the running
    statistics are kept as they are, so the reverted model predicts as the converted one.

    Args:
      model: an nnx graph; a model that is itself a :class:`BatchNorm` is replaced by the
        return value.

    Returns:
      ``model``, changed in place; or the new layer when ``model`` is a BatchNorm.

    Raises:
      TypeError: a subclass of :class:`BatchNorm` in the model.
      ValueError: no :class:`BatchNorm` in the model.
    """
    if not _count_layers(model, (BatchNorm,), "revert"):
        raise ValueError(
            f"`model` ({type(model).__name__}) holds no jaxbn.nnx.BatchNorm to revert."
        )

    def swap(path: tuple[Any, ...], node: Any) -> Any:
        return _to_flax(node) if type(node) is BatchNorm else node

    return swap_layers(model, swap)


def _to_jaxbn(layer: nnx.BatchNorm, overrides: Mapping[str, Any]) -> BatchNorm:
    new = BatchNorm(
        layer.num_features,
        use_scale=layer.scale is not None,
        use_bias=layer.bias is not None,
        rngs=nnx.Rngs(0),  # the new Params are replaced by the layer's own right away
    )
    copy_attributes(layer, new, skip=frozenset())
    _set_fields(new, overrides)
    return new


def _to_flax(layer: BatchNorm) -> nnx.BatchNorm:
    new = nnx.BatchNorm(
        layer.num_features,
        use_scale=layer.scale is not None,
        use_bias=layer.bias is not None,
        rngs=nnx.Rngs(0),  # the new Params are replaced by the layer's own right away
    )
    copy_attributes(layer, new, skip=_JAXBN_ONLY)
    return new


def _set_fields(layer: BatchNorm, overrides: Mapping[str, Any]) -> None:
    for name, value in overrides.items():
        setattr(layer, name, value)
    if layer.debias and layer.count is None:
        # One count per layer: a layer stacked by nnx.vmap (leading axes) gets one for each.
        stacked = layer.mean.shape[:-1]
        layer.count = nnx.BatchStat(jnp.zeros(stacked, jnp.int32))
    elif not layer.debias and layer.count is not None:
        layer.count = nnx.data(None)


def _count_layers(model: Any, classes: tuple[type, ...], verb: str) -> int:
    """The number of layers of exactly these classes in ``model``, checked before anything
    is swapped: a subclass of one of them is an error, and leaves the model as it was."""
    found = 0
    for path, node in nnx.iter_graph(model, graph=True):
        if type(node) in classes:
            found += 1
        elif isinstance(node, classes):
            base = next(c for c in classes if isinstance(node, c))
            name = f"{base.__module__.split('.')[0]}.nnx.{base.__name__}"
            raise TypeError(
                f"{path_string(path)} is a {type(node).__name__}, a subclass of {name}: "
                f"{verb}_batch_norm only swaps {name} itself, since what a subclass adds "
                f"would be lost. Swap that layer by hand, or build it from {name}."
            )
    return found

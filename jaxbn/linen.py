"""``jaxbn.linen.BatchNorm``: a drop-in replacement for ``flax.linen.BatchNorm``.

Same fields in the same order, same call signature, same variables
(``params/{scale,bias}``, ``batch_stats/{mean,var}``), so a model switches by changing one
import and its existing checkpoints load unchanged. The math is ``jaxbn.batch_norm``'s: an
accurate variance whatever ``use_fast_variance`` says, devices weighted by their true
counts under ``axis_name``, and a batch with non-finite statistics never corrupts the
running averages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
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
from ._checks import checked_layout as layout
from ._dtypes import wider_float
from ._layout import with_shape

__all__ = ["BatchNorm", "ConvertedModule", "convert_batch_norm"]


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
        always the accurate two-pass one (a second sum over the centred ``x`` after the
        mean), so there is no fast-but-inaccurate mode to opt into.
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
        return _normalize(self, self, x, use_running_average, mask)


def _normalize(
    owner: nn.Module,
    fields: BatchNorm,
    x: jax.Array,
    use_running_average: bool | None,
    mask: jax.Array | None,
) -> jax.Array:
    """``BatchNorm.__call__`` with ``fields``' configuration on ``owner``'s variables.

    ``owner`` is the module inside whose compact method this runs: ``fields`` itself, or a
    ``flax.linen.BatchNorm`` that :func:`convert_batch_norm` intercepts, whose scope then
    holds the variables under the same names.
    """
    use_running_average = check_use_running_average(
        nn.merge_param("use_running_average", fields.use_running_average, use_running_average)
    )
    x = jnp.asarray(x)
    lay = with_shape(layout(x.ndim, fields.axis), x.shape)
    stored_dtype = jnp.float32 if fields.force_float32_reductions else fields.param_dtype
    ra_mean = owner.variable(
        "batch_stats", "mean", lambda s: jnp.zeros(s, stored_dtype), lay.feature_shape
    )
    ra_var = owner.variable(
        "batch_stats", "var", lambda s: jnp.ones(s, stored_dtype), lay.feature_shape
    )
    scale = (
        owner.param("scale", fields.scale_init, lay.feature_shape, fields.param_dtype)
        if fields.use_scale
        else None
    )
    bias = (
        owner.param("bias", fields.bias_init, lay.feature_shape, fields.param_dtype)
        if fields.use_bias
        else None
    )
    check_variables(
        lay.feature_shape, "in `batch_stats`", mean=ra_mean.value, var=ra_var.value
    )
    check_variables(lay.feature_shape, "in `params`", scale=scale, bias=bias)
    out_dtype = output_dtype(fields.dtype, x, scale, bias)
    count = (
        owner.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
        if fields.debias
        else None
    )
    initializing = owner.is_initializing()
    y, new_state = normalize_with_fields(
        fields,
        as_read(x, wider_float(x.dtype, out_dtype)),
        scale,
        bias,
        ra_mean.value,
        ra_var.value,
        None if count is None else count.value,
        training=not use_running_average,
        axis_name=None if initializing else fields.axis_name,
        axis_index_groups=None if initializing else fields.axis_index_groups,
        mask=mask,
        out_dtype=out_dtype,
    )
    if not use_running_average and not initializing:
        ra_mean.value = stored(new_state.mean, ra_mean.value)
        ra_var.value = stored(new_state.var, ra_var.value)
        if count is not None:
            count.value = new_state.count
    return y.astype(out_dtype)


# Conversion of models written with flax.linen.BatchNorm ------------------------------------
#
# Invariants (tests/test_convert_linen.py):
# - Inside a conversion, every call of flax.linen.BatchNorm.__call__ (and of our own
#   BatchNorm's) runs `_normalize` with the layer's fields and the overrides, on the layer's
#   own scope: the variables are the layer's, under flax's names, so `init` makes the
#   original's tree and `apply` takes the original's variables. Nothing outside a
#   conversion is touched: the original module still runs flax.
# - The overrides are part of every `jax.jit` cache key inside a conversion
#   (`jax.make_user_context`), so a trace made for the original (`nn.jit`'s own cache
#   included) is never served to the converted module, nor one made for other overrides.

_CONVERSION = jax.make_user_context(None)
"""The overrides of the conversion running now, as sorted ``(name, value)`` pairs; None
outside one."""
_FRESH_TRACE = jax.make_user_context(None)
"""A value no trace cache holds, to trace again what a cache would answer."""

_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(BatchNorm) if f.name not in (
    "parent", "name"))
_FLAX_FIELDS = tuple(f.name for f in dataclasses.fields(nn.BatchNorm) if f.name not in (
    "parent", "name"))
# The function behind each converted __call__ (what flax's interceptors see), and the
# fields that carry over from the layer.
_CONVERTED_CALLS = {
    inspect.unwrap(nn.BatchNorm.__call__): _FLAX_FIELDS,
    inspect.unwrap(BatchNorm.__call__): _OVERRIDABLE,
}


class _Counter(threading.local):
    """The layers converted in this thread so far (for the check that a model has any)."""

    layers = 0


_counter = _Counter()


def _call_arguments(
    x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
) -> tuple[jax.Array, bool | None, jax.Array | None]:
    """The arguments of ``BatchNorm.__call__`` (flax's and ours take the same)."""
    return x, use_running_average, mask


def _convert_call(
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: nn.module.InterceptorContext,
) -> Any:
    """A flax method interceptor: a BatchNorm's ``__call__`` runs jaxbn with the overrides;
    every other method call goes on unchanged."""
    carried = _CONVERTED_CALLS.get(getattr(context.orig_method, "func", None))
    overrides = _CONVERSION.value
    if carried is None or overrides is None:
        return next_fun(*args, **kwargs)
    layer = context.module
    fields = BatchNorm(
        **({name: getattr(layer, name) for name in carried} | dict(overrides)), parent=None
    )
    _counter.layers += 1
    return _normalize(layer, fields, *_call_arguments(*args, **kwargs))


@contextlib.contextmanager
def _converting(overrides: tuple[tuple[str, Any], ...]) -> Iterator[None]:
    """Runs the block with every BatchNorm converted with ``overrides``; inside another
    conversion, with the outer overrides updated by these."""
    outer = _CONVERSION.value
    merged = overrides if outer is None else tuple(sorted((dict(outer) | dict(overrides)).items()))
    with _CONVERSION(merged):
        if outer is None:
            with nn.intercept_methods(_convert_call):
                yield
        else:
            yield


class ConvertedModule(nn.Module):
    """A module written with ``flax.linen.BatchNorm``, run with jaxbn's.

    Made by :func:`convert_batch_norm`; see there. ``init``, ``init_with_output`` and
    ``apply`` are the original's (``method=`` included), run with every BatchNorm
    converted. Used as a submodule, its ``__call__`` is the original's, on the original's
    scope (``nn.share_scope``), so the variables stay where the original keeps them.

    Attributes:
      module: the original module, unchanged.
      overrides: the fields of :class:`BatchNorm` set on every converted layer, as sorted
        ``(name, value)`` pairs.
    """

    module: nn.Module
    overrides: tuple[tuple[str, Any], ...] = ()

    def setup(self) -> None:
        nn.share_scope(self, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The original's ``__call__``, with every BatchNorm converted."""
        with _converting(self.overrides):
            return self.module(*args, **kwargs)

    @nn.nowrap
    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """The original's ``apply`` (same arguments), with every BatchNorm converted."""
        with _converting(self.overrides):
            return self.module.apply(*args, **kwargs)

    @nn.nowrap
    def init_with_output(self, *args: Any, **kwargs: Any) -> Any:
        """The original's ``init_with_output`` (and so ``init``), with every BatchNorm
        converted.

        Raises:
          ValueError: if the original's ``__call__`` (no ``method=``) ran no BatchNorm.
        """
        before = _counter.layers
        with _converting(self.overrides):
            out = self.module.init_with_output(*args, **kwargs)
        if kwargs.get("method") is None and _counter.layers == before:
            self._check_has_batch_norm(*args, **kwargs)
        return out

    @nn.nowrap
    def _check_has_batch_norm(self, *args: Any, **kwargs: Any) -> None:
        """Raises unless ``init`` runs a BatchNorm when no trace cache can answer for it.

        An ``init`` that converted no layer may have been answered by a cached trace
        (``nn.jit``'s, made by an earlier ``init``); this traces it once more under a key
        no cache holds.
        """
        before = _counter.layers
        with _converting(self.overrides), _FRESH_TRACE(object()):
            jax.eval_shape(lambda: self.module.init_with_output(*args, **kwargs))
        if _counter.layers == before:
            raise ValueError(
                f"`module` ({type(self.module).__name__}) ran no flax.linen.BatchNorm in "
                f"`init`: there is nothing to convert. Pass the model that uses "
                f"flax.linen.BatchNorm (or jaxbn.linen.BatchNorm, to set `overrides`), or "
                f"use it unconverted."
            )


def _frozen(name: str, value: Any) -> Any:
    """An override's value, lists made tuples; it must be hashable (it keys the traces)."""
    if isinstance(value, list | tuple) and name in ("axis", "axis_name", "axis_index_groups"):
        value = tuple(_frozen(name, v) for v in value)
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"Expected a hashable value for the override `{name}` (it keys jax's trace "
            f"caches), got {value!r} of type {type(value).__name__}. Pass a Python value, "
            f"or build the layers with jaxbn.linen.BatchNorm to set it per call."
        ) from None
    return value


def convert_batch_norm(module: nn.Module, **overrides: Any) -> ConvertedModule:
    """The same model with every ``flax.linen.BatchNorm`` it uses run by jaxbn.

    The result takes the original's arguments (``method=`` too) and its variables: ``init``
    makes exactly the original's tree (paths, shapes, dtypes), and ``apply`` takes the
    original's variables and checkpoints. Every BatchNorm the model calls is converted,
    wherever it is built (``setup`` or ``@nn.compact``, a class captured at import with
    ``functools.partial``, inside ``nn.scan``, ``nn.remat``, ``nn.vmap`` or ``nn.jit``):
    flax's module interception (``nn.intercept_methods``) runs :class:`BatchNorm`'s math
    with that layer's fields, plus ``overrides``, on that layer's variables. The original
    is unchanged and still runs flax; the train/eval switch stays the model's own
    (``use_running_average`` as a field or an argument, or a mutable ``batch_stats``).

    Example::

      >>> import functools, jax, jax.numpy as jnp, flax.linen as nn
      >>> import jaxbn.linen
      >>> Norm = functools.partial(nn.BatchNorm, momentum=0.9)
      >>> class Model(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         return Norm(use_running_average=not train)(nn.Dense(4)(x))
      >>> model = jaxbn.linen.convert_batch_norm(Model(), epsilon=1e-3)
      >>> x = 1e4 + jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = model.init(jax.random.key(1), x, train=False)
      >>> y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      >>> sorted(updates["batch_stats"]["BatchNorm_0"])
      ['mean', 'var']

    Converting a converted module returns it (with any new ``overrides`` applied on top
    of its own). The result is hashable when ``module`` is (a ``jax.jit`` static argument),
    and never equal to it. A layer that subclasses ``flax.linen.BatchNorm`` is converted
    where it calls flax's ``__call__``; a subclass that replaces ``__call__`` with its own
    math keeps it.

    Args:
      module: the model (an instance of a ``flax.linen.Module``).
      **overrides: fields of :class:`BatchNorm` set on every converted layer, e.g.
        ``axis_name`` to synchronize statistics the model's author never synchronized,
        ``virtual_batch_size``, ``use_renorm``, ``momentum``. Values must be hashable
        (lists are made tuples). ``debias``, ``use_scale``, ``use_bias``, ``param_dtype``
        and ``force_float32_reductions`` change the variables the layers keep.

    Returns:
      A :class:`ConvertedModule`; its ``module`` is the original.

    Raises:
      TypeError: if ``module`` is not a flax.linen Module instance, an override is not a
        field of :class:`BatchNorm`, or its value is not hashable.
      ValueError: at ``init`` (without ``method=``), if the model ran no BatchNorm.
    """
    if isinstance(module, type) or not isinstance(module, nn.Module):
        raise TypeError(
            f"Expected `module` to be a flax.linen.Module instance, got {module!r}. Build "
            f"the model first (e.g. ResNet50() rather than ResNet50); for flax.nnx use "
            f"jaxbn.nnx.convert_batch_norm, for equinox jaxbn.equinox.convert_batch_norm."
        )
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(
            f"Expected `overrides` among the fields of jaxbn.linen.BatchNorm "
            f"{list(_OVERRIDABLE)}, got {unknown}."
        )
    frozen = {name: _frozen(name, value) for name, value in overrides.items()}
    if isinstance(module, ConvertedModule):
        if not frozen:
            return module
        frozen = dict(module.overrides) | frozen
        module = module.module
    return ConvertedModule(module, tuple(sorted(frozen.items())))

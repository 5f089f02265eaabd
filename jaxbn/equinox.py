"""``jaxbn.equinox.BatchNorm``: a drop-in replacement for ``equinox.nn.BatchNorm``.

Same constructor, same call ``(x, state, *, key=None, inference=None) -> (y, state)`` on one
example ``x`` of shape ``(input_size, *spatial)`` inside ``jax.vmap(..., axis_name=...)``,
same ``weight``/``bias`` fields, and it works with ``eqx.nn.make_with_state``,
``eqx.nn.inference_mode`` and ``eqx.nn.Sequential``. The math is ``jaxbn.batch_norm``'s
(``axis=0``, ``debias=True``); this module only translates arguments.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from ._adapter import output_dtype
from ._batch_norm import batch_norm
from ._checks import check_bool, check_momentum
from ._convert_equinox import (
    from_equinox,
    hidden_layer,
    index_like,
    path_string,
    rebuilt_state,
    renamed,
    to_equinox,
)
from ._layout import AxisName
from ._overrides import check_overrides
from ._state import BatchStats, init

__all__ = ["BatchNorm", "convert_batch_norm", "revert_batch_norm"]

_MODES = ("batch", "ema", "legacy")


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Batch normalization with the interface of ``equinox.nn.BatchNorm`` (equinox 0.13).

    Called on one example ``x`` of shape ``(input_size, *spatial)`` inside
    ``jax.vmap(..., axis_name=axis_name)`` (or ``pmap``/``shard_map``, or several nested
    ones with a tuple of names), it normalizes each channel with the mean and biased
    variance over the spatial axes and the named axes (Ioffe & Szegedy, 2015)::

        y = weight * (x - μ_B) / sqrt(σ²_B + eps) + bias

    and, in training, updates the running statistics in ``state`` with a zero-debiased EMA
    (``jaxbn.batch_norm(..., axis=0, debias=True)``): the ``k``-th batch is merged with
    weight ``(1 - momentum) / (1 - momentum**k)``, so after one step the running
    statistics are that batch's own, and inference is a fused scale-and-shift by them.

    ``mode`` takes equinox's names; none of them changes how a training batch is
    normalized:

    - ``"batch"``: what equinox's ``"batch"`` intends, with the debiasing done right.
      equinox starts its hidden variance at 1 but divides it by ``1 - momentum**k`` as if
      it had started at 0: with ``momentum=0.9``, one step gives an inference variance of
      ``9 + σ²_B``; here it is ``σ²_B``.
    - ``"ema"``, and ``"legacy"`` (equinox's default; stored as ``"ema"``, no warning):
      the same as ``"batch"``. equinox's ``"ema"`` normalizes training batches with a
      blend of running and batch statistics, which is not batch norm and is not copied;
      its filling of the running statistics from the first batch is what the
      zero-debiased EMA does.

    Differences from ``eqx.nn.BatchNorm``, all deliberate:

    - The running statistics live in ``state`` as one :class:`~jaxbn.BatchStats`
      (``mean``, biased ``var``, both float32 or wider, and the batch ``count``) under
      ``state_index``, already debiased: ``state.get(bn.state_index).mean`` is the
      running mean. equinox keeps ``(mean, var)`` tuples under ``batch_state_index`` or
      ``ema_state_index``, so states do not load across the two (``weight`` and ``bias``
      do).
    - Devices/examples are weighted by their true counts (with ``mask``); the variance is
      computed accurately at any mean (two passes, Chan's merge across the named axes);
      a batch whose statistics are not finite leaves the running statistics unchanged.
    - ``mask=`` at call time: which entries of ``x`` count toward the statistics (e.g.
      ``mask=False`` for a padding example). ``momentum=None``: a cumulative average.
    - The output has the dtype of ``x`` promoted with ``weight``/``bias`` (equinox also
      promotes with its running statistics' ``dtype``); statistics are float32 or wider.
    - Arguments are checked when the layer is built, with messages that name them.

    Args:
      input_size: the number of channels, ``x.shape[0]``.
      axis_name: the name of the batch axis (``jax.vmap``/``pmap``/``shard_map``) the
        statistics are taken over, or a sequence of names.
      eps: added to the variance before the square root; must be > 0.
      channelwise_affine: learn a per-channel ``weight`` (ones) and ``bias`` (zeros).
      momentum: EMA decay in ``[0, 1)`` (``momentum*old + (1-momentum)*batch``, debiased),
        or None for the cumulative average of all batches.
      inference: if True, normalize with the running statistics and leave ``state`` as
        given; toggled by ``eqx.nn.inference_mode`` or overridden at call time.
      dtype: the dtype of ``weight`` and ``bias`` (default: float32, or float64 in
        64-bit mode); the running statistics use it promoted to at least float32.
      mode: ``"batch"``, ``"ema"`` or ``"legacy"``: the same layer (see above).

    Raises:
      TypeError: ``input_size``, ``channelwise_affine`` or ``inference`` of the wrong
        type, ``axis_name`` not a name or sequence of names, or ``dtype`` not floating.
      ValueError: ``input_size`` not positive, ``axis_name`` None, ``eps`` not a number
        > 0, ``momentum`` outside ``[0, 1)``, or an unknown ``mode``.

    Example:
      >>> import jax, jax.numpy as jnp, equinox as eqx
      >>> from jaxbn.equinox import BatchNorm  # was: from equinox.nn import BatchNorm
      >>> bn, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", momentum=0.9, mode="batch")
      >>> x = 2.0 + jax.random.normal(jax.random.key(0), (16, 3, 5))  # 16 examples (C, W)
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> bool(jnp.allclose(y.mean(axis=(0, 2)), 0.0, atol=1e-5))
      True
      >>> infer = jax.vmap(eqx.nn.inference_mode(bn), in_axes=(0, None), out_axes=(0, None))
      >>> y_eval, _ = infer(x, state)  # one step: the running statistics are the batch's
      >>> bool(jnp.allclose(y_eval, y, atol=1e-4))
      True
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex[BatchStats]
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    mode: Literal["batch", "ema"] = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: DTypeLike | None = None,
        mode: Literal["batch", "ema", "legacy"] = "legacy",
    ):
        _check_constructor(input_size, axis_name, eps, channelwise_affine, momentum, mode)
        _check_inference(inference, "the constructor")
        if dtype is None:
            dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is on
        params, stats = init(input_size, dtype)
        self.weight = params["scale"] if channelwise_affine else None
        self.bias = params["bias"] if channelwise_affine else None
        self.state_index = eqx.nn.StateIndex(stats)
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = "ema" if mode == "legacy" else mode

    def __call__(
        self,
        x: ArrayLike,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
        mask: ArrayLike | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes one example; in training also returns the updated running statistics.

        Args:
          x: one example, of shape ``(input_size, *spatial)`` and a floating dtype.
          state: the ``eqx.nn.State`` holding this layer's running statistics.
          key: ignored, as in equinox.
          inference: overrides the ``inference`` field if given.
          mask: bool, broadcastable to ``x``: the entries that count toward the batch
            statistics (a scalar ``False`` leaves this example out). Ignored in inference.

        Returns:
          ``(y, state)``: ``y`` of the shape of ``x``; ``state`` updated in training, the
          given one in inference.

        Raises:
          TypeError: ``inference`` is not a Python bool (e.g. traced under ``jax.jit``).
          ValueError: ``x`` is not of shape ``(input_size, *spatial)``, or ``weight``/
            ``bias`` are not of shape ``(input_size,)``, or ``state`` does not hold this
            layer's statistics.
          NameError: in training, ``axis_name`` is not bound by an enclosing transform.
        """
        del key
        if inference is None:
            inference = self.inference
        _check_inference(inference, "the call (or the `inference` field)")
        x = jnp.asarray(x)
        self._check_shapes(x)
        axis_name = _core_axis_name(self.axis_name)
        if not inference:
            _check_bound(axis_name)
        stats = self._stats(state)
        with jax.named_scope("jaxbn.equinox.BatchNorm"):
            # x is read in its own dtype; y is written in x's dtype promoted with the
            # parameters'. Other dtypes reach the core, which rejects them.
            floating = jnp.issubdtype(x.dtype, jnp.floating)
            out_dtype = output_dtype(None, x, self.weight, self.bias) if floating else None
            y, stats = batch_norm(
                x,
                {"scale": self.weight, "bias": self.bias},
                stats,
                training=not inference,
                axis=0,
                momentum=self.momentum,
                epsilon=self.eps,
                axis_name=axis_name,
                mask=mask,
                debias=True,
                dtype=out_dtype,
            )
        if not inference:
            state = state.set(self.state_index, stats)
        return y, state

    def _stats(self, state: eqx.nn.State) -> BatchStats:
        try:
            return state.get(self.state_index)
        except KeyError:
            raise ValueError(
                f"`state` holds no running statistics for this BatchNorm (its `state_index` "
                f"is {self.state_index.marker!r}): make the model and its state together, "
                f"model, state = eqx.nn.make_with_state(Model)(...), and pass that state."
            ) from None

    def _check_shapes(self, x: jax.Array) -> None:
        n = self.input_size
        if x.ndim == 0 or x.shape[0] != n:
            fix = f"input_size={x.shape[0]}" if x.ndim else "a channel axis first"
            raise ValueError(
                f"`x` must have shape (input_size, *spatial) = ({n}, ...) for a BatchNorm "
                f"built with `input_size`={n}: one example, channels first, with the batch "
                f"mapped over by jax.vmap(..., axis_name={self.axis_name!r}); got shape "
                f"{x.shape}. If x.shape[0] is the channel count, build it with {fix}."
            )
        for name, value in (("weight", self.weight), ("bias", self.bias)):
            if value is not None and tuple(np.shape(value)) != (n,):
                raise ValueError(
                    f"`{name}` must have shape (input_size,) = ({n},), got shape "
                    f"{tuple(np.shape(value))}. Replace it (eqx.tree_at) with an array of "
                    f"shape ({n},), or build a BatchNorm with the matching `input_size`."
                )


def _check_constructor(
    input_size: Any,
    axis_name: Any,
    eps: Any,
    channelwise_affine: Any,
    momentum: Any,
    mode: Any,
) -> None:
    """Checks the static arguments of ``BatchNorm(...)``, naming them as equinox does."""
    if not isinstance(input_size, numbers.Integral) or isinstance(input_size, bool):
        raise TypeError(
            f"`input_size` must be a positive int (the number of channels, x.shape[0]), got "
            f"{type(input_size).__name__} {input_size!r}."
        )
    if input_size < 1:
        raise ValueError(
            f"`input_size` must be a positive int (the number of channels, x.shape[0]), got "
            f"{input_size!r}."
        )
    if axis_name is None:
        raise ValueError(
            "`axis_name` must name the batch axis the layer is mapped over, as in "
            "jax.vmap(bn, axis_name='batch', in_axes=(0, None), out_axes=(0, None)) with "
            "BatchNorm(input_size, 'batch'), or be a sequence of such names; got None."
        )
    names = list(axis_name) if isinstance(axis_name, (list, tuple)) else [axis_name]
    if not names or not all(isinstance(n, Hashable) and n is not None for n in names):
        raise TypeError(
            f"`axis_name` must be a hashable name (e.g. 'batch') or a non-empty sequence of "
            f"names, as passed to jax.vmap/jax.pmap, got {axis_name!r}."
        )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
        raise ValueError(
            f"`eps` must be a number > 0 (it is added to the variance before the square "
            f"root), got {eps!r}."
        )
    if not isinstance(channelwise_affine, (bool, np.bool_)):
        raise TypeError(
            f"`channelwise_affine` must be a bool (True: a learned `weight` and `bias` of "
            f"shape (input_size,)), got {type(channelwise_affine).__name__} "
            f"{channelwise_affine!r}."
        )
    check_momentum(momentum)
    if mode not in _MODES:
        raise ValueError(
            f"`mode` must be 'batch', 'ema' or 'legacy' (in jaxbn all three train with the "
            f"batch's statistics and keep zero-debiased running statistics), got {mode!r}."
        )


def _check_inference(inference: Any, where: str) -> None:
    check_bool(
        inference,
        "inference",
        f"True: the running statistics; False: the batch's, and a state update; from {where}",
        "under jax.jit use eqx.filter_jit, which keeps the layer's bool fields static, or "
        "pass inference=True/False at the call",
    )


def _core_axis_name(axis_name: Hashable | Sequence[Hashable]) -> AxisName:
    """equinox accepts a list of names; the collectives want a tuple."""
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def _check_bound(axis_name: AxisName) -> None:
    try:
        jax.lax.axis_size(axis_name)
    except NameError:
        raise NameError(
            f"`axis_name` {axis_name!r} of BatchNorm is not bound: in training, call the layer "
            f"on one example at a time inside jax.vmap(..., axis_name={axis_name!r}, "
            f"in_axes=(0, None), out_axes=(0, None)) over the batch (or jax.pmap/jax.shard_map "
            f"with that axis name). Inference (eqx.nn.inference_mode, or inference=True) "
            f"needs no batch axis."
        ) from None


# ----------------------------------------------------------------------------------------------
# Converting the eqx.nn.BatchNorm layers of a model and its state, and back
# ----------------------------------------------------------------------------------------------

_SETTABLE = frozenset({"axis_name", "eps", "momentum", "inference", "mode"})
_FIXED = {
    "input_size": "it is the size of the model's `weight`, `bias` and statistics",
    "channelwise_affine": "conversion keeps the model's `weight` and `bias` (or their absence)",
    "dtype": "it is the dtype of the model's `weight` and `bias`, which conversion keeps",
}


def convert_batch_norm(
    model: Any, state: eqx.nn.State, **overrides: Any
) -> tuple[Any, eqx.nn.State]:
    """Replaces every ``eqx.nn.BatchNorm`` of ``model`` by a :class:`BatchNorm`.

    Each new layer has the same ``weight`` and ``bias`` arrays and fields (``axis_name``,
    ``eps``, ``momentum``, ``inference``, ``mode``), then the ``overrides``. Its running
    statistics in the returned state are the ones equinox's inference uses, so right after
    conversion the model predicts exactly as before, in either equinox mode:

    - ``"batch"``: equinox's debiased statistics ``hidden / (1 - momentum**counter)``, with
      its counter: further training continues them as equinox would (jaxbn's debiased
      EMA merges the next batch with the same weight). A layer that has not trained yet
      starts from mean 0, variance 1 as in equinox, and its first batch then replaces
      them (equinox adds ``momentum/(1-momentum)`` to that first variance).
    - ``"ema"``: equinox's running statistics; once they have seen a batch, the next ones
      are merged with weight ``1 - momentum`` as equinox does (the count is set to
      ``2**30``, where the debiased weight equals it). Training batches are normalized
      with their own statistics, as in :class:`BatchNorm` (equinox blends in the running
      ones).

    The state keeps every other entry (``SpectralNorm``'s, ...) as it is; the keys
    ``make_with_state`` gave (``"Model.bn.batch_state_index"``) become the ones it gives
    the same model built with :class:`BatchNorm` (``"Model.bn.state_index"``). A layer that
    is already a :class:`BatchNorm` gets the overrides, so converting twice changes nothing.

    Example::

      >>> import equinox as eqx, jax, jaxbn.equinox
      >>> model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
      ...     [eqx.nn.Linear(2, 3, key=jax.random.key(0)),
      ...      eqx.nn.BatchNorm(3, "batch", mode="batch")])
      >>> model, state = jaxbn.equinox.convert_batch_norm(model, state, momentum=0.9)
      >>> type(model.layers[1]).__name__, model.layers[1].momentum
      ('BatchNorm', 0.9)

    Args:
      model: any pytree holding ``eqx.nn.BatchNorm`` layers (``eqx.nn.Sequential``, a
        Module, a list...); the layers must be pytree nodes of it (not in a static field,
        a ``functools.partial`` or a closure).
      state: the ``eqx.nn.State`` of ``model``.
      **overrides: fields of :class:`BatchNorm` set on every layer: ``axis_name``, ``eps``,
        ``momentum`` (None: a cumulative average), ``inference``, ``mode``.

    Returns:
      ``(model, state)``: new ones; the arguments are left as they were.

    Raises:
      TypeError: an override that is not a settable field of :class:`BatchNorm`, or a
        subclass of ``eqx.nn.BatchNorm`` in the model (converting it would drop what the
        subclass adds).
        A BatchNorm the model's pytree does not reach (in a static field, a
        ``functools.partial`` or a closure) is a TypeError too.
      ValueError: no BatchNorm in the model, a layer whose statistics ``state`` does not
        hold, or a field or override that :class:`BatchNorm` rejects (e.g. ``eps=0``).
    """
    check_overrides(overrides, _SETTABLE, _FIXED, "jaxbn.equinox.BatchNorm")
    replaced: dict[Hashable, list[tuple[Hashable, Any]]] = {}

    def convert(path: tuple[Any, ...], layer: Any) -> Any:
        if type(layer) is BatchNorm:
            fields = {name: getattr(layer, name) for name in _SETTABLE}
            new = _build(layer, fields | overrides, path)
            return eqx.tree_at(lambda bn: bn.state_index, new, layer.state_index)
        value_field, flag_field = _equinox_fields(layer.mode)
        value, flag = getattr(layer, value_field), getattr(layer, flag_field)
        stats = from_equinox(layer, _reader(state, path))
        marker = renamed(value.marker, value_field, "state_index")
        init = from_equinox(layer, lambda index: index.init) if _keeps_init(value) else stats
        replaced[value.marker] = [(marker, stats)]
        replaced[flag.marker] = []
        fields = {name: getattr(layer, name) for name in _SETTABLE}
        new = _build(layer, fields | overrides, path)
        return eqx.tree_at(lambda bn: bn.state_index, new, index_like(value, marker, init))

    model = _map_layers(model, (eqx.nn.BatchNorm, BatchNorm), "convert", convert)
    return model, rebuilt_state(state, replaced)


def revert_batch_norm(model: Any, state: eqx.nn.State) -> tuple[Any, eqx.nn.State]:
    """Replaces every :class:`BatchNorm` of ``model`` by an ``eqx.nn.BatchNorm``.

    The inverse of :func:`convert_batch_norm`: each equinox layer has the same ``weight``
    and ``bias`` arrays and fields, in the layer's ``mode``, and its state holds the
    running statistics in equinox's form (in ``"batch"`` mode the debiasing undone:
    ``hidden = stat * (1 - momentum**count)``, with the count as equinox's counter), so
    its inference outputs equal the jaxbn model's and equinox trains it from there. The
    state keeps every other entry as it is.

    Args:
      model: any pytree holding :class:`BatchNorm` layers.
      state: the ``eqx.nn.State`` of ``model``.

    Returns:
      ``(model, state)``: new ones; the arguments are left as they were.

    Raises:
      TypeError: a subclass of :class:`BatchNorm` in the model.
      ValueError: no :class:`BatchNorm` in the model, a layer whose statistics ``state``
        does not hold, or a layer with ``momentum=None`` (equinox has no cumulative
        average).
    """
    replaced: dict[Hashable, list[tuple[Hashable, Any]]] = {}

    def revert(path: tuple[Any, ...], layer: BatchNorm) -> eqx.nn.BatchNorm:
        if layer.momentum is None:
            raise ValueError(
                f"{path_string(path)} has `momentum`=None (a cumulative average), which "
                f"eqx.nn.BatchNorm does not offer: set a float first, e.g. "
                f"convert_batch_norm(model, state, momentum=0.99), then revert."
            )
        stats = _reader(state, path)(layer.state_index)
        dtype = stats.var.dtype if layer.weight is None else layer.weight.dtype
        new = eqx.nn.BatchNorm(
            layer.input_size, layer.axis_name, layer.eps, layer.channelwise_affine,
            layer.momentum, layer.inference, dtype, layer.mode,
        )
        if layer.weight is not None:
            new = eqx.tree_at(lambda bn: (bn.weight, bn.bias), new, (layer.weight, layer.bias))
        index = layer.state_index
        flag, values = to_equinox(stats, layer.mode, layer.momentum, dtype)
        init_flag, init_values = flag, values
        if isinstance(index.init, BatchStats):  # make_with_state deletes it
            init_flag, init_values = to_equinox(index.init, layer.mode, layer.momentum, dtype)
        value_field, flag_field = _equinox_fields(layer.mode)
        value_marker = renamed(index.marker, "state_index", value_field)
        flag_marker = renamed(index.marker, "state_index", flag_field)
        if flag_marker == value_marker:  # a key that is not make_with_state's path
            flag_marker = object()
        replaced[index.marker] = [(flag_marker, flag), (value_marker, values)]
        return eqx.tree_at(
            lambda bn: (getattr(bn, flag_field), getattr(bn, value_field)),
            new,
            (
                index_like(index, flag_marker, init_flag),
                index_like(index, value_marker, init_values),
            ),
        )

    model = _map_layers(model, (BatchNorm,), "revert", revert)
    return model, rebuilt_state(state, replaced)


def _equinox_fields(mode: str) -> tuple[str, str]:
    """The fields of eqx.nn.BatchNorm holding its statistics and its flag in ``mode``."""
    if mode == "batch":
        return "batch_state_index", "batch_counter"
    return "ema_state_index", "ema_first_time_index"


def _keeps_init(index: eqx.nn.StateIndex) -> bool:
    """Whether ``index`` still keeps its initial value (``make_with_state`` deletes it)."""
    return bool(jax.tree.leaves(index.init))


def _reader(state: eqx.nn.State, path: tuple[Any, ...]) -> Callable[[Any], Any]:
    def read(index: eqx.nn.StateIndex) -> Any:
        try:
            return state.get(index)
        except KeyError:
            raise ValueError(
                f"`state` holds no running statistics for the BatchNorm at "
                f"{path_string(path)} (key {index.marker!r}): pass the state made with this "
                f"model, as in model, state = eqx.nn.make_with_state(Model)(...)."
            ) from None

    return read


def _build(layer: Any, fields: dict[str, Any], path: tuple[Any, ...]) -> BatchNorm:
    """A :class:`BatchNorm` with ``fields`` and ``layer``'s ``weight`` and ``bias``; an
    error from its checks names the layer's path."""
    try:
        new = BatchNorm(
            layer.input_size,
            channelwise_affine=layer.channelwise_affine,
            dtype=None if layer.weight is None else layer.weight.dtype,
            **fields,
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"Cannot convert the BatchNorm at {path_string(path)}: {err}") from None
    if layer.weight is not None:
        new = eqx.tree_at(lambda bn: (bn.weight, bn.bias), new, (layer.weight, layer.bias))
    return new


def _map_layers(
    model: Any, classes: tuple[type, ...], verb: str, swap: Callable[[Any, Any], Any]
) -> Any:
    """``model`` with ``swap(path, layer)`` in place of each layer of these classes; a
    subclass of one of them, or no layer at all, is an error before anything is swapped."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        model, is_leaf=lambda node: isinstance(node, classes)
    )
    found = 0
    for path, leaf in leaves:
        if type(leaf) in classes:
            found += 1
        elif isinstance(leaf, classes):
            base = next(c for c in classes if isinstance(leaf, c))
            raise TypeError(
                f"{path_string(path)} is a {type(leaf).__name__}, a subclass of "
                f"{_qualified(base)}: {verb}_batch_norm only swaps {_qualified(base)} itself, "
                f"since what a subclass adds would be lost. Swap that layer by hand "
                f"(eqx.tree_at), or build it from {_qualified(base)}."
            )
    if (hidden := hidden_layer(model, classes)) is not None:
        raise TypeError(
            f"{path_string(hidden)} is a BatchNorm that {verb}_batch_norm cannot reach: it is "
            f"in a static field, a functools.partial or a closure, which are not pytree nodes "
            f"of the model, so it cannot be swapped. Keep the layer in a regular field of a "
            f"Module (or a list, tuple or dict in one)."
        )
    if not found:
        raise ValueError(
            f"`model` ({type(model).__name__}) holds no {_qualified(classes[0])} to {verb}: "
            f"{verb}_batch_norm looks through the model's pytree (Modules, eqx.nn.Sequential, "
            f"lists, tuples, dicts), not static fields or closures."
        )
    return jax.tree_util.tree_unflatten(
        treedef, [swap(path, leaf) if type(leaf) in classes else leaf for path, leaf in leaves]
    )


def _qualified(cls: type) -> str:
    return "eqx.nn.BatchNorm" if cls is eqx.nn.BatchNorm else "jaxbn.equinox.BatchNorm"

"""``jaxbn.equinox.BatchNorm``: a drop-in replacement for ``equinox.nn.BatchNorm``.

Same constructor, same call ``(x, state, *, key=None, inference=None) -> (y, state)`` on one
example ``x`` of shape ``(input_size, *spatial)`` inside ``jax.vmap(..., axis_name=...)``,
same ``weight``/``bias`` fields, and it works with ``eqx.nn.make_with_state``,
``eqx.nn.inference_mode`` and ``eqx.nn.Sequential``. The math is ``jaxbn.batch_norm``'s
(``axis=0``, ``debias=True``); this module only translates arguments.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from ._adapter import output_dtype
from ._batch_norm import batch_norm
from ._checks import AxisName, check_bool, check_momentum
from ._state import BatchStats, init

__all__ = ["BatchNorm"]

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

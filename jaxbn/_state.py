"""The running statistics of a batch-norm layer and the function that creates them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ._dtypes import is_complex, stats_dtype, with_kind

__all__ = ["BatchStats", "Params", "init", "is_stats_node", "mean_and_var_of"]

Params = dict[str, jax.Array | None]
"""Learned affine parameters: ``{"scale": γ, "bias": β}``, each of the feature shape.

Either key may be absent or ``None`` (no scale, no bias); ``params=None`` means neither.
"""


class BatchStats(NamedTuple):
    """Running statistics of one batch-norm layer: a pytree the caller threads through.

    The dtype of ``mean`` and ``var`` is fixed when the state is created (float32, or wider
    if the layer is created wider) and never changes: every update returns arrays of the
    same shapes and dtypes, so the state can be a ``jax.lax.scan`` carry or a ``jit``
    argument without retracing.
    """

    mean: jax.Array
    """float32 (or wider; complex64 or wider for complex input) ``[*feature_shape]``:
    running mean of the batch means."""
    var: jax.Array
    """float32 (or wider; real for complex input) ``[*feature_shape]``: running mean of the
    biased batch variances ``E|x - mean|²``."""
    # The contract names this field `count`; it intentionally shadows tuple.count.
    count: jax.Array  # type: ignore[assignment]
    """int32 ``[]``: number of batches merged into ``mean``/``var`` so far.

    Batches whose statistics were not finite, or that had no valid entry, are not counted
    (they are not merged). With ``momentum=None`` the running statistics are the plain
    average of the ``count`` batches. ``count`` is one number per layer: with a mask that
    empties some features but not others in a batch, those features keep their values while
    ``count`` advances, so their cumulative average weights the later batches less than
    ``1/count``. Use a float ``momentum`` with such per-feature masks.
    """


def _is_size(value: object) -> bool:
    """An int (Python or numpy), not a bool: True is no feature size."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _feature_shape(feature_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(feature_shape, (int, np.integer)) and _is_size(feature_shape):
        shape: tuple[int, ...] = (int(feature_shape),)
    elif isinstance(feature_shape, Sequence) and all(_is_size(d) for d in feature_shape):
        shape = tuple(int(d) for d in feature_shape)
    else:
        raise TypeError(
            f"`feature_shape` must be an int or a tuple of ints (the sizes of the feature axes), "
            f"got {feature_shape!r}."
        )
    if any(d <= 0 for d in shape):
        raise ValueError(f"`feature_shape` must contain positive sizes, got {shape}.")
    return shape


def init(
    feature_shape: int | Sequence[int], dtype: DTypeLike = jnp.float32
) -> tuple[Params, BatchStats]:
    """Creates the parameters and the running statistics of a batch-norm layer.

    Args:
      feature_shape: the size of the feature axis (``C`` for NHWC or NCHW input), or a
        tuple of sizes when several axes are features (``axis=(1, 2)`` in ``batch_norm``).
      dtype: floating dtype of the parameters (None: float32). The statistics use this
        dtype promoted to at least float32 (bfloat16 parameters get float32 statistics). A
        complex dtype (for complex input, as flax normalizes it) gives complex parameters, a
        complex running mean and a real running variance ``E|x - mean|²``.

    Returns:
      ``(params, state)``: ``params = {"scale": ones, "bias": zeros}`` and
      ``state = BatchStats(mean=zeros, var=ones, count=0)``.

    Raises:
      TypeError: ``feature_shape`` is not an int or tuple of ints (a bool is not a size),
        or ``dtype`` is not a dtype, or neither floating nor complex.
      ValueError: a size in ``feature_shape`` is not positive.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> params, state = jaxbn.init(3)
      >>> state.mean.shape, state.var.dtype, int(state.count)
      ((3,), dtype('float32'), 0)
    """
    shape = _feature_shape(feature_shape)
    try:
        dtype = np.dtype(jnp.float32 if dtype is None else dtype)
    except TypeError:
        raise TypeError(
            f"`dtype` must be a floating dtype such as jnp.float32 (or a complex one, for "
            f"complex input), got {type(dtype).__name__} {dtype!r}, which is no dtype."
        ) from None
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"`dtype` must be a floating dtype such as jnp.float32 (or a complex one, for "
            f"complex input), got {dtype}."
        )
    real = stats_dtype(dtype)
    params: Params = {"scale": jnp.ones(shape, dtype), "bias": jnp.zeros(shape, dtype)}
    state = BatchStats(
        mean=jnp.zeros(shape, with_kind(real, is_complex(dtype))),
        var=jnp.ones(shape, real),
        count=jnp.zeros((), jnp.int32),
    )
    return params, state


def is_stats_node(node: Any) -> bool:
    """A :class:`BatchStats`, or a mapping holding array-like ``"mean"`` and ``"var"`` (a
    flax ``batch_stats`` entry; not a collection of such entries)."""
    if isinstance(node, BatchStats):
        return True
    return (
        isinstance(node, Mapping)
        and "mean" in node
        and "var" in node
        and not isinstance(node["mean"], Mapping)
        and not isinstance(node["var"], Mapping)
    )


def mean_and_var_of(node: Any, name: str = "state") -> tuple[jax.Array, jax.Array]:
    """The running mean and variance that a statistics node (:func:`is_stats_node`) holds.

    Args:
      node: a :class:`BatchStats`, or a mapping with ``"mean"`` and ``"var"`` arrays.
      name: the argument ``node`` was given as, for the error message.

    Returns:
      ``(mean, var)`` as arrays, in their own dtypes.

    Raises:
      TypeError: ``node`` is neither.
    """
    if isinstance(node, BatchStats):
        return jnp.asarray(node.mean), jnp.asarray(node.var)
    if is_stats_node(node):
        return jnp.asarray(node["mean"]), jnp.asarray(node["var"])
    raise TypeError(
        f'`{name}` must be a jaxbn.BatchStats or a mapping with "mean" and "var" (a flax '
        f"batch_stats entry), got {type(node).__name__}."
    )

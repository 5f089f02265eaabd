"""equinox's BatchNorm state and jaxbn's, both ways, and a State rebuilt entry by entry.

Invariants (tests/test_convert_equinox.py):

- ``from_equinox`` gives the running statistics equinox's inference uses, bit for bit: in
  ``"batch"`` mode its debiasing ``hidden / (1 - momentum**counter)`` (``hidden`` itself
  at ``counter == 0``), evaluated by equinox's own expression; in ``"ema"`` mode its
  buffers. The count carries on the update equinox would make: in ``"batch"`` mode the
  counter, with which jaxbn's debiased merge of the next batch equals equinox's; in
  ``"ema"`` mode 0 before the first batch (both take the first batch as it is) and
  ``PLAIN_EMA_COUNT`` after it, where the debiased weight ``(1-m)/(1-m**count)`` is
  equinox's ``1-m`` to float precision.
- ``to_equinox`` is its inverse: equinox's inference on the result uses these statistics
  (up to one rounding of ``hidden = stat * (1 - momentum**count)``).
- ``hidden_layer`` finds a layer the pytree does not reach, so conversion never leaves one
  of equinox's running unseen.
- ``rebuilt_state`` keeps every other entry of the State (its arrays and its order) and
  puts each converted layer's entries where its old ones were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._dtypes import is_complex, stats_dtype, with_kind
from ._state import BatchStats

__all__ = [
    "PLAIN_EMA_COUNT",
    "from_equinox",
    "hidden_layer",
    "index_like",
    "path_string",
    "rebuilt_state",
    "renamed",
    "to_equinox",
]

# The count given to equinox "ema" statistics that have seen a batch: m**count is 0 in
# float32 for every float32 momentum below 1 (0.99999988**2**30 = e**-128), and 2**30 more
# batches fit in an int32 before it overflows.
PLAIN_EMA_COUNT = 2**30


def _debias_scale(counter: jax.Array, momentum: float, like: jax.Array) -> jax.Array:
    """equinox's ``"batch"`` mode inference divisor, by equinox's own expression, shaped to
    divide ``like`` (one per layer of a stack of layers made with ``eqx.filter_vmap``)."""
    with jax.numpy_dtype_promotion("standard"):
        scale = jnp.where(counter == 0, 1, 1 - momentum**counter)
    return scale.reshape(scale.shape + (1,) * (jnp.ndim(like) - scale.ndim))


def from_equinox(layer: eqx.nn.BatchNorm, read: Any) -> BatchStats:
    """The jaxbn statistics of an equinox ``layer`` whose state entries ``read(index)``
    returns (``state.get``, or an index's ``init``)."""
    if layer.mode == "batch":
        counter = jnp.asarray(read(layer.batch_counter))
        hidden_mean, hidden_var = read(layer.batch_state_index)
        scale = _debias_scale(counter, layer.momentum, hidden_mean)
        with jax.numpy_dtype_promotion("standard"):
            mean, var = hidden_mean / scale, hidden_var / scale
        count = counter
    else:
        first_time = jnp.asarray(read(layer.ema_first_time_index))
        mean, var = read(layer.ema_state_index)
        count = jnp.where(first_time, 0, PLAIN_EMA_COUNT)
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    real = stats_dtype(var.dtype)
    return BatchStats(
        mean=mean.astype(with_kind(real, is_complex(mean.dtype))),
        var=(var.real if is_complex(var.dtype) else var).astype(real),
        count=count.astype(jnp.int32),
    )


def to_equinox(stats: BatchStats, mode: str, momentum: float, dtype: Any) -> tuple[Any, Any]:
    """``(flag, (mean, var))``: equinox's state entries for ``stats`` in ``mode``, the flag
    being ``batch_counter``'s value (``"batch"``) or ``ema_first_time_index``'s (``"ema"``),
    the statistics in equinox's ``dtype``."""
    mean, var = stats.mean.astype(dtype), stats.var.astype(dtype)
    count = jnp.asarray(stats.count)
    if mode == "ema":
        return count == 0, (mean, var)
    counter = count.astype(jnp.asarray(0).dtype)  # equinox's counter: the default int
    scale = _debias_scale(counter, momentum, mean)
    with jax.numpy_dtype_promotion("standard"):
        return counter, ((mean * scale).astype(dtype), (var * scale).astype(dtype))


def renamed(marker: Hashable, old: str, new: str) -> Hashable:
    """A state key for field ``new`` from ``old``'s key: ``make_with_state`` names keys by
    path (``"Model.bn.batch_state_index"``), and the same path with the new field name is
    the key the same model built with the new layer gets. Another key is kept as is."""
    if isinstance(marker, str) and marker.endswith("." + old):
        return marker[: -len(old)] + new
    return marker


def index_like(
    source: eqx.nn.StateIndex, marker: Hashable, init: Any
) -> eqx.nn.StateIndex:
    """A StateIndex with key ``marker`` that keeps an initial value ``init`` only where
    ``source`` still keeps one (``make_with_state`` deletes them)."""
    index = eqx.nn.StateIndex(init)
    object.__setattr__(index, "marker", marker)  # as make_with_state names its indices
    if not jax.tree.leaves(source.init):
        index = eqx.nn.delete_init_state(index)
    return index


def rebuilt_state(
    state: eqx.nn.State, replaced: Mapping[Hashable, Sequence[tuple[Hashable, Any]]]
) -> eqx.nn.State:
    """``state`` with each key in ``replaced`` swapped for the ``(key, value)`` entries it
    maps to (at its place; none drops it); every other entry is kept as it is."""
    values, keys = state.tree_flatten()
    entries: list[tuple[Hashable, Any]] = []
    for key, value in zip(keys, values, strict=True):
        entries.extend(replaced.get(key, [(key, value)]))
    return eqx.nn.State.tree_unflatten(
        tuple(k for k, _ in entries), tuple(v for _, v in entries)
    )


def hidden_layer(model: Any, classes: tuple[type, ...]) -> tuple[Any, ...] | None:
    """The path of a layer of ``classes`` that ``model``'s pytree does not reach (in a
    static field, or in a ``functools.partial`` or a closure among its leaves), or None."""
    seen: set[int] = set()

    def find(node: Any, path: tuple[Any, ...], hidden: bool) -> tuple[Any, ...] | None:
        if isinstance(node, classes):
            return path if hidden else None
        if id(node) in seen:
            return None
        seen.add(id(node))
        children: list[tuple[Any, Any, bool]] = []
        if isinstance(node, eqx.Module):
            children = [
                (jax.tree_util.GetAttrKey(f.name), getattr(node, f.name, None),
                 hidden or bool(f.metadata.get("static", False)))
                for f in dataclasses.fields(node)
            ]
        elif isinstance(node, (list, tuple)):
            children = [(jax.tree_util.SequenceKey(i), v, hidden) for i, v in enumerate(node)]
        elif isinstance(node, dict):
            children = [(jax.tree_util.DictKey(k), v, hidden) for k, v in node.items()]
        elif isinstance(node, functools.partial):
            inside = [node.func, *node.args, *node.keywords.values()]
            children = [(jax.tree_util.GetAttrKey("<partial>"), v, True) for v in inside]
        elif isinstance(node, types.FunctionType) and node.__closure__:
            key = jax.tree_util.GetAttrKey("<closure>")
            children = [(key, v, True) for v in _cell_contents(node.__closure__)]
        for key, child, child_hidden in children:
            if (found := find(child, (*path, key), child_hidden)) is not None:
                return found
        return None

    return find(model, (), False)


def _cell_contents(cells: tuple[Any, ...]) -> list[Any]:
    contents = []
    for cell in cells:
        with contextlib.suppress(ValueError):  # a closure variable not assigned yet
            contents.append(cell.cell_contents)
    return contents


def path_string(path: tuple[Any, ...]) -> str:
    """``model.layers[1]`` style, for error messages."""
    return "model" + jax.tree_util.keystr(path)

"""Swapping every BatchNorm of a ``flax.nnx`` graph in place, keeping its Variables.

Invariants (tests/test_convert_nnx.py):

- The swap is in place: the parent's attribute, ``nnx.List``/``nnx.Dict`` entry or list/dict
  item is set to the new layer through the graph protocol (``set_key``), so every
  reference the user holds to the model or to a submodule sees the new layer. A layer
  reached twice (shared) is swapped once, and both references get the same new object.
- The new layer holds the old one's Variable objects and its other attributes, each with
  its data/static status, so ``nnx.state(model)`` keeps its paths, types and values.
- A subclass of the source class is never swapped: its extra behaviour would be lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx
from flax.nnx import graph

__all__ = ["copy_attributes", "path_string", "swap_layers"]

Path = tuple[Any, ...]
# Bookkeeping every nnx object keeps for itself, not the layer's own attributes.
_INTERNAL_PREFIX = "_pytree__"


def swap_layers(model: Any, swap: Callable[[Path, Any], Any]) -> Any:
    """Replaces, in place, each node of ``model``'s graph for which ``swap`` returns another
    object; returns ``model``, or what ``swap`` returned for it when it is itself replaced.

    ``swap(path, node)`` is called once per node (a shared node once) and returns the
    node itself to keep it.
    """
    done: dict[int, Any] = {}
    return _swap(model, (), swap, done)


def _swap(node: Any, path: Path, swap: Callable[[Path, Any], Any], done: dict[int, Any]) -> Any:
    if id(node) in done:
        return done[id(node)]
    new = swap(path, node)
    if new is not node:
        done[id(node)] = new
        return new
    impl = graph.get_node_impl(node)
    if impl is None:  # a leaf: a Variable, an array, a static value
        return node
    done[id(node)] = node  # before the children: a cycle comes back to this node as is
    changed = {}
    for key, child in impl.node_dict(node).items():
        if isinstance(key, str) and key.startswith(_INTERNAL_PREFIX):
            continue
        new_child = _swap(child, (*path, key), swap, done)
        if new_child is not child:
            changed[key] = new_child
    if not changed:
        return node
    if impl.set_key is not None:  # modules, nnx.List/Dict, lists and dicts
        for key, new_child in changed.items():
            impl.set_key(node, key, new_child)
        return node
    # An immutable pytree (a tuple, a NamedTuple): rebuilt with the new children.
    assert isinstance(impl, graph.PytreeNodeImpl)
    entries, aux = impl.flatten(node)
    rebuilt = impl.unflatten([(key, changed.get(key, child)) for key, child in entries], aux)
    done[id(node)] = rebuilt
    return rebuilt


def copy_attributes(source: Any, target: Any, skip: Mapping[str, Any] | frozenset[str]) -> None:
    """Sets each attribute of ``source`` but those in ``skip`` on ``target``: the same
    objects (Variables included), each as data or static as it is on ``source``."""
    impl = graph.get_node_impl(source)
    assert impl is not None
    entries, _ = impl.flatten(source)
    for key, entry in entries:
        name = str(key)
        if name.startswith(_INTERNAL_PREFIX) or name in skip:
            continue
        if isinstance(entry, graph.DataElem):
            setattr(target, name, nnx.data(entry.value))
        elif isinstance(entry, graph.StaticElem):
            setattr(target, name, nnx.static(entry.value))
        else:  # an nnx.Object that is not a pytree keeps no data/static status
            setattr(target, name, entry)


def path_string(path: Path) -> str:
    """``model.blocks[0].bn`` style, for error messages."""
    text = "model"
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else f".{key}"
    return text

"""Which axes of ``x`` are features and which are reduced: shapes only, no validation.

:func:`layout` takes an ``axis`` that :func:`jaxbn._checks.check_axis` has accepted (an int
or a non-empty tuple of distinct ints in ``[-ndim, ndim)``); an unchecked one gives an
unchecked result. The math modules import this module, never the checks.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

__all__ = ["AxisName", "Layout", "layout", "with_shape"]

AxisName = Hashable | tuple[Hashable, ...]
"""A named mesh/pmap/vmap axis, or a tuple of them, to synchronize statistics over."""


class Layout(NamedTuple):
    """Which axes of ``x`` are features and which are reduced."""

    feature_axes: tuple[int, ...]  # sorted, non-negative
    reduction_axes: tuple[int, ...]  # every other axis, sorted
    feature_shape: tuple[int, ...]  # () until with_shape
    broadcast_shape: tuple[int, ...]  # feature vectors reshaped to broadcast against x


def layout(ndim: int, axis: int | Sequence[int]) -> Layout:
    """The feature and reduction axes of an input of rank ``ndim`` for a checked ``axis``;
    the shapes stay empty until :func:`with_shape`."""
    raw = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    feature_axes = tuple(sorted({int(a) % ndim for a in raw}))
    reduction_axes = tuple(a for a in range(ndim) if a not in feature_axes)
    return Layout(feature_axes, reduction_axes, (), ())


def with_shape(lay: Layout, shape: tuple[int, ...]) -> Layout:
    """``lay`` with the feature shape and broadcast shape of an input of ``shape``."""
    feature_shape = tuple(shape[a] for a in lay.feature_axes)
    broadcast_shape = tuple(shape[a] if a in lay.feature_axes else 1 for a in range(len(shape)))
    return lay._replace(feature_shape=feature_shape, broadcast_shape=broadcast_shape)


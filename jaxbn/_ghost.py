"""Ghost batches (Hoffer et al., 2017): the batch axis regrouped into groups of ``k``.

The batch axis ``b`` (the first reduction axis) of size ``N`` becomes two axes ``(N/k, k)``;
the group axis joins the feature axes, so every group gets its own statistics from the
unchanged normalization code. Without ``virtual_batch_size`` the regrouping is the identity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._layout import Layout, with_shape

__all__ = ["Ghost", "ghost_layout"]


class Ghost(NamedTuple):
    """How ``x`` is regrouped into ghost batches.

    ``group_axis`` is the position of the group axis in the grouped feature shape, and
    ``batch_axis`` that of the batch axis in ``x`` (both None: no ghost batches).
    """

    x_shape: tuple[int, ...]
    grouped_shape: tuple[int, ...]
    layout: Layout  # of the grouped x
    group_axis: int | None
    feature_shape: tuple[int, ...]  # of x, before regrouping
    batch_axis: int | None

    def group(
        self,
        x: jax.Array,
        scale: jax.Array | None,
        bias: jax.Array | None,
        mask: ArrayLike | None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
        """``x``, the parameters and the mask regrouped, the parameters shaped to broadcast
        against the grouped ``x`` (see :meth:`param`)."""
        if mask is not None:
            mask = jnp.asarray(mask)
            if self.batch_axis is not None:
                mask = jnp.broadcast_to(mask, self.x_shape).reshape(self.grouped_shape)
        return (
            x.reshape(self.grouped_shape),
            None if scale is None else self.param(scale),
            None if bias is None else self.param(bias),
            mask,
        )

    def param(self, value: jax.Array) -> jax.Array:
        """A parameter shaped to broadcast against the grouped ``x``.

        A feature-shaped parameter is shared by the ghost batches; a per-example one (of
        ``x``'s rank, broadcastable to it) is regrouped as ``x`` is.
        """
        if value.shape == self.feature_shape:
            return self.per_group(value).reshape(self.layout.broadcast_shape)
        b = self.batch_axis
        if b is None:
            return value
        shape = value.shape
        split = (1, 1) if shape[b] == 1 else self.grouped_shape[b : b + 2]
        return value.reshape((*shape[:b], *split, *shape[b + 1 :]))

    def per_group(self, value: jax.Array) -> jax.Array:
        """A feature-shaped array broadcast to the grouped feature shape."""
        if self.group_axis is None:
            return value
        expanded = jnp.expand_dims(value, self.group_axis)
        return jnp.broadcast_to(expanded, self.layout.feature_shape)

    def mean_over_groups(
        self, value: jax.Array, count: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """The unweighted mean of grouped-feature-shaped ``value`` over the groups that have
        ``count > 0``, and the total count (the identity without ghost batches)."""
        if self.group_axis is None:
            return value, count
        has = count > 0
        total = jnp.sum(jnp.where(has, value, 0), axis=self.group_axis)
        groups = jnp.sum(has, axis=self.group_axis, dtype=value.dtype)
        return total / jnp.maximum(groups, 1), jnp.sum(count, axis=self.group_axis)


def ghost_layout(
    lay: Layout, x_shape: tuple[int, ...], virtual_batch_size: int | None
) -> Ghost:
    """The ghost-batch layout of an input of ``x_shape``, for a ``virtual_batch_size`` that
    divides the batch axis (:func:`jaxbn._checks.check_training_layout` checks it)."""
    if virtual_batch_size is None:
        return Ghost(x_shape, x_shape, lay, None, lay.feature_shape, None)
    batch_axis = lay.reduction_axes[0]
    groups = x_shape[batch_axis] // virtual_batch_size
    grouped_shape = (*x_shape[:batch_axis], groups, virtual_batch_size, *x_shape[batch_axis + 1 :])
    feature_axes = tuple(a if a < batch_axis else a + 1 for a in lay.feature_axes)
    feature_axes = tuple(sorted((*feature_axes, batch_axis)))
    reduction_axes = tuple(a for a in range(len(grouped_shape)) if a not in feature_axes)
    grouped = with_shape(Layout(feature_axes, reduction_axes, (), ()), grouped_shape)
    return Ghost(
        x_shape, grouped_shape, grouped, feature_axes.index(batch_axis), lay.feature_shape,
        batch_axis,
    )

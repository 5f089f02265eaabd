"""What the framework adapters share: one call into the core with a module's fields.

The adapters (``jaxbn.linen``, ``jaxbn.nnx``) translate their variables into a
:class:`~jaxbn.BatchStats` and their fields into keyword arguments here; no math.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._batch_norm import batch_norm
from ._dtypes import stats_dtype, wider_float
from ._renorm import batch_renorm
from ._state import BatchStats

__all__ = ["Fields", "bound_normalizer", "normalize_with_fields", "output_dtype"]


class Fields(Protocol):
    """The fields the flax adapters share (flax's names, then jaxbn's own)."""

    axis: Any
    momentum: float
    epsilon: float
    virtual_batch_size: int | None
    debias: bool
    unbiased_running_var: bool
    use_renorm: bool
    r_max: Any
    d_max: Any


def bound_normalizer(
    *,
    use_renorm: bool,
    r_max: ArrayLike,
    d_max: ArrayLike,
    virtual_batch_size: int | None,
    debias: bool,
    unbiased_running_var: bool,
) -> Callable[..., tuple[jax.Array, BatchStats]]:
    """``batch_norm``, or ``batch_renorm`` when ``use_renorm``, with the variant options bound."""
    options: dict[str, Any] = {
        "virtual_batch_size": virtual_batch_size,
        "debias": debias,
        "unbiased_running_var": unbiased_running_var,
    }
    if use_renorm:
        return functools.partial(batch_renorm, r_max=r_max, d_max=d_max, **options)
    return functools.partial(batch_norm, **options)


def normalize_with_fields(
    fields: Fields,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array | None,
    *,
    training: bool,
    axis_name: Any,
    axis_index_groups: Any,
    mask: jax.Array | None,
) -> tuple[jax.Array, BatchStats]:
    """Normalizes ``x`` as a module with ``fields`` does, from its stored statistics.

    ``mean`` and ``var`` are the stored running statistics (widened to float32 or more for
    the core); ``count`` is the stored batch count, or None when the module keeps none.
    """
    dtype = stats_dtype(mean.dtype)
    state = BatchStats(
        mean=mean.astype(dtype),
        var=var.astype(dtype),
        count=jnp.zeros((), jnp.int32) if count is None else count,
    )
    normalize = bound_normalizer(
        use_renorm=fields.use_renorm,
        r_max=fields.r_max,
        d_max=fields.d_max,
        virtual_batch_size=fields.virtual_batch_size,
        debias=fields.debias,
        unbiased_running_var=fields.unbiased_running_var,
    )
    return normalize(
        x,
        {"scale": scale, "bias": bias},
        state,
        training=training,
        axis=fields.axis,
        momentum=fields.momentum,
        epsilon=fields.epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
    )


def output_dtype(dtype: Any, x: jax.Array, *params: jax.Array | None) -> Any:
    """flax's output dtype: ``dtype`` if given, else the widest of ``x`` and the params.

    flax's ``canonicalize_dtype`` without ``jnp.result_type``, which strict dtype promotion
    rejects for mixed floats.
    """
    return dtype or wider_float(x.dtype, *(None if p is None else p.dtype for p in params))

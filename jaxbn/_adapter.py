"""What the framework adapters share: one call into the core with a module's fields.

The adapters (``jaxbn.linen``, ``jaxbn.nnx``) translate their variables into a
:class:`~jaxbn.BatchStats` and their fields into keyword arguments here; no math.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._batch_norm import batch_norm
from ._checks import check_bool
from ._checks import checked_layout as layout
from ._dtypes import is_complex, real_dtype, stats_dtype, wider_float, with_kind
from ._renorm import batch_renorm
from ._state import BatchStats

__all__ = [
    "Fields",
    "as_read",
    "bound_normalizer",
    "check_features",
    "check_use_running_average",
    "check_variables",
    "normalize_with_fields",
    "output_dtype",
    "stored",
]


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
    out_dtype: Any = None,
) -> tuple[jax.Array, BatchStats]:
    """Normalizes ``x`` as a module with ``fields`` does, from its stored statistics.

    ``y`` is written in ``out_dtype`` (None: ``x``'s) by the core itself, which reads ``x``
    in its own dtype: pass ``x`` unwidened (:func:`as_read`).

    ``mean`` and ``var`` are the stored running statistics (widened to float32 or more for
    the core; the mean made complex for a complex ``x``, as flax's becomes after a complex
    training step); ``count`` is the stored batch count, or None when the module keeps
    none. An input with no axis left to reduce (a single unbatched example) is normalized
    as flax does it, with statistics over zero axes: each value is its own mean, and the
    variance is 0.
    """
    # Integer (or bool) stored statistics are read as flax reads them: promoted, here to
    # the statistics dtype of `x` (flax's `momentum * ra_mean + ...` gives float32, or
    # float64 for float64 `x`); `stored` then keeps the promoted values.
    real = stats_dtype(var.dtype if jnp.issubdtype(var.dtype, jnp.inexact) else x.dtype)
    if is_complex(var.dtype):  # flax.nnx promotes every statistic to a complex x's dtype
        var = var.real
    state = BatchStats(
        mean=mean.astype(with_kind(real, is_complex(x.dtype) or is_complex(mean.dtype))),
        var=var.astype(real),
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
    axis = fields.axis
    unbatched = training and not layout(x.ndim, axis).reduction_axes
    if unbatched:  # a new axis of size 1 to reduce over: the mean of one value is itself
        axis = tuple(a % x.ndim + 1 for a in (axis if isinstance(axis, Sequence) else (axis,)))
        x = x[None]
        mask = None if mask is None else jnp.asarray(mask)[None]
    y, new_state = normalize(
        x,
        {"scale": scale, "bias": bias},
        state,
        training=training,
        axis=axis,
        momentum=fields.momentum,
        epsilon=fields.epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        dtype=out_dtype,
    )
    return (y[0] if unbatched else y), new_state


def as_read(x: jax.Array, promoted: Any) -> jax.Array:
    """``x`` as the core is to read it, where flax would promote it to ``promoted``.

    A floating or complex ``x`` that ``promoted`` holds exactly stays in its own dtype: the
    core widens it inside its kernels, so a bfloat16 ``x`` with float32 parameters keeps no
    float32 copy of itself for the backward. Any other ``x`` is cast to ``promoted`` as flax
    casts it (an integer ``x``, or a float32 ``x`` that ``dtype=bfloat16`` rounds first).
    """
    promoted = np.dtype(promoted)
    if jnp.issubdtype(x.dtype, jnp.inexact) and wider_float(x.dtype, promoted) == promoted:
        return x
    return x.astype(promoted)


def check_use_running_average(value: Any) -> bool:
    """``use_running_average`` is a Python bool (it picks the code path when tracing)."""
    return check_bool(
        value,
        "use_running_average",
        "True: running statistics; False: batch statistics and an update",
        "pass it as a static argument",
    )


def check_features(
    x: jax.Array, axis: Any, expected: tuple[int, ...], argument: str
) -> None:
    """The feature sizes of ``x`` along ``axis`` are ``expected``; errors name ``argument``."""
    lay = layout(x.ndim, axis)
    got = tuple(x.shape[a] for a in lay.feature_axes)
    if len(got) != len(expected):
        raise ValueError(
            f"`axis`={axis!r} names {len(got)} feature axes of `x` (shape {x.shape}), but "
            f"`{argument}` describes {len(expected)}: pass one feature axis, e.g. axis=-1."
        )
    if got != expected:
        value = expected[0] if len(expected) == 1 else expected
        raise ValueError(
            f"`{argument}`={value!r} does not match the input: `x` of shape {x.shape} has "
            f"{got[0] if len(got) == 1 else got} features along `axis`={axis!r}. Build the "
            f"layer with {argument}={got[0] if len(got) == 1 else got}, or pass `axis` for "
            f"the feature axis of `x`."
        )


def check_variables(
    expected: tuple[int, ...], where: str, **variables: jax.Array | None
) -> None:
    """Each of the module's ``variables`` has the feature shape ``expected``: a stale
    checkpoint, or a variable set by hand, is named as the module names it."""
    for name, value in variables.items():
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(
                f"`{name}` {where} has shape {tuple(value.shape)}, but `x` has "
                f"{expected[0] if len(expected) == 1 else expected} features along `axis`: it "
                f"belongs to a layer of another size. Load variables made for this input, or "
                f"re-initialize the layer."
            )


def stored(new: jax.Array, old: jax.Array) -> jax.Array:
    """A new running statistic in the dtype of the stored one, made complex where ``new``
    is (flax's running mean becomes complex after a training step on complex input).

    A stored integer or bool statistic is not truncated: the new one keeps its floating
    dtype, as flax.linen's assignment ``ra_mean.value = momentum * ra_mean.value + ...``
    promotes it."""
    if not jnp.issubdtype(old.dtype, jnp.inexact):
        return new
    return new.astype(with_kind(real_dtype(old.dtype), is_complex(new.dtype) or is_complex(
        old.dtype)))


def output_dtype(dtype: Any, x: jax.Array, *params: jax.Array | None) -> Any:
    """flax's output dtype: ``dtype`` if given, else the widest of ``x`` and the params.

    flax's ``canonicalize_dtype`` without ``jnp.result_type``, which strict dtype promotion
    rejects for mixed floats.
    """
    return dtype or wider_float(x.dtype, *(None if p is None else p.dtype for p in params))

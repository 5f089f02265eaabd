"""Argument validation for the public functions.

Every check runs at trace time on static information (shapes, dtypes, Python numbers) and
raises with a message that names the argument, what was expected and what was given.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._dtypes import is_complex
from ._state import BatchStats

AxisName = Hashable | tuple[Hashable, ...]


class Layout(NamedTuple):
    """Which axes of ``x`` are features and which are reduced."""

    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    broadcast_shape: tuple[int, ...]  # feature vectors reshaped to broadcast against x


def check_bool(value: Any, name: str, meaning: str, fix: str) -> bool:
    """``value`` is a Python bool: it picks a code path when tracing, so it cannot be traced.

    ``meaning`` says what True and False do, ``fix`` how to keep the value static; both go
    into the error, in the caller's own words.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{name}` must be a Python bool ({meaning}), got {type(value).__name__} "
            f"{value!r}. It selects the code path at trace time, so it cannot be a traced "
            f"value: {fix}."
        )
    return bool(value)


def check_training(training: Any) -> bool:
    return check_bool(
        training,
        "training",
        "True: batch statistics and a state update; False: running statistics",
        "mark it static (jax.jit(..., static_argnames='training'))",
    )


def check_input(x: jax.Array) -> None:
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating)):
        raise TypeError(
            f"`x` must have a floating dtype (float16, bfloat16, float32, float64) or a complex "
            f"one (complex64, complex128), got {x.dtype}. Cast it first, e.g. "
            f"x.astype(jnp.float32)."
        )


def layout(ndim: int, axis: Any) -> Layout:
    raw = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    integral = all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in raw)
    if not raw or not integral:
        raise TypeError(f"`axis` must be an int or a non-empty tuple of ints, got {axis!r}.")
    bad = [a for a in raw if not -ndim <= a < ndim]
    if bad:
        raise ValueError(
            f"`axis` must lie in [-{ndim}, {ndim}) for an input of rank {ndim}, got {axis!r}."
        )
    feature_axes = tuple(sorted({int(a) % ndim for a in raw}))
    if len(feature_axes) != len(raw):
        raise ValueError(f"`axis` must not name an axis twice, got {axis!r} for rank {ndim}.")
    reduction_axes = tuple(a for a in range(ndim) if a not in feature_axes)
    return Layout(feature_axes, reduction_axes, (), ())


def with_shape(lay: Layout, shape: tuple[int, ...]) -> Layout:
    feature_shape = tuple(shape[a] for a in lay.feature_axes)
    broadcast_shape = tuple(shape[a] if a in lay.feature_axes else 1 for a in range(len(shape)))
    return lay._replace(feature_shape=feature_shape, broadcast_shape=broadcast_shape)


def check_params(params: Mapping[str, Any] | None, lay: Layout, x_shape: tuple[int, ...]) -> None:
    """``params`` holds ``scale``/``bias`` of the feature shape, or of ``x``'s rank and
    broadcastable to ``x`` (per-example parameters, for conditional normalization)."""
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise TypeError(
            f'`params` must be a mapping {{"scale": ..., "bias": ...}} or None, got '
            f"{type(params).__name__}."
        )
    unknown = set(params) - {"scale", "bias"}
    if unknown:
        raise ValueError(
            f'`params` may only hold the keys "scale" and "bias", got extra keys {sorted(unknown)}.'
        )
    for key, value in params.items():
        if value is None:
            continue
        shape = tuple(np.shape(value))
        feature_shape = lay.feature_shape
        if shape != feature_shape and not is_broadcastable(shape, x_shape):
            raise ValueError(
                f'`params["{key}"]` must have the feature shape {feature_shape} of `x` along '
                f"`axis` (create it with jaxbn.init({feature_shape})), or, for per-example "
                f"(conditional) parameters, the rank of `x` and a shape that broadcasts to "
                f"its shape {x_shape}, such as {_conditional_example(lay, x_shape)}; "
                f"got shape {shape}."
            )


def is_broadcastable(shape: tuple[int, ...], x_shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` has ``x``'s rank and broadcasts to ``x_shape``."""
    return len(shape) == len(x_shape) and all(
        d in (1, n) for d, n in zip(shape, x_shape, strict=True)
    )


def _conditional_example(lay: Layout, x_shape: tuple[int, ...]) -> str:
    """A per-example parameter shape for ``x``: the batch size on the first reduced axis,
    the feature sizes on the feature axes, 1 elsewhere."""
    shape = list(lay.broadcast_shape)
    if lay.reduction_axes:
        batch_axis = lay.reduction_axes[0]
        shape[batch_axis] = x_shape[batch_axis]
    return str(tuple(shape))


def check_state(
    state: Any, feature_shape: tuple[int, ...], x_dtype: Any, *, training: bool
) -> None:
    if not isinstance(state, BatchStats):
        raise TypeError(
            f"`state` must be a jaxbn.BatchStats (from jaxbn.init), got {type(state).__name__}."
        )
    for name in ("mean", "var"):
        shape = tuple(np.shape(getattr(state, name)))
        if shape != feature_shape:
            raise ValueError(
                f"`state.{name}` must have the feature shape {feature_shape} of `x` along "
                f"`axis`, got shape {shape}. Create the state with jaxbn.init({feature_shape})."
            )
    mean_dtype, var_dtype = jnp.result_type(state.mean), jnp.result_type(state.var)
    for name, dtype in (("mean", mean_dtype), ("var", var_dtype)):
        if not jnp.issubdtype(dtype, jnp.inexact) or jnp.finfo(dtype).bits < 32:
            raise TypeError(
                f"`state.{name}` must be float32 or wider, got {dtype}. Keep the state that "
                f"jaxbn.init creates; it never narrows."
            )
    if is_complex(var_dtype):
        raise TypeError(
            f"`state.var` must be real (the variance E|x - mean|² of a complex `x` is), got "
            f"{var_dtype}. Create the state with jaxbn.init(..., dtype=jnp.complex64)."
        )
    if training and is_complex(x_dtype) and not is_complex(mean_dtype):
        raise TypeError(
            f"`state.mean` must be complex to hold the running mean of a complex `x` "
            f"({np.dtype(x_dtype)}), got {mean_dtype}; the state's dtypes never change. "
            f"Create the state with jaxbn.init({feature_shape}, dtype=jnp.{np.dtype(x_dtype)})."
        )


def _concrete(value: Any) -> float | None:
    """The Python value of a number, or None if it is traced."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_momentum(momentum: Any) -> None:
    if momentum is None:
        return
    value = _concrete(momentum)
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(
            f"`momentum` must lie in [0, 1) (the EMA keeps momentum*old + (1-momentum)*batch; "
            f"torch's momentum m is our 1-m) or be None for a cumulative average, got {momentum!r}."
        )


def check_epsilon(epsilon: Any) -> None:
    value = _concrete(epsilon)
    if value is not None and not value > 0.0:
        raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}.")


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
        raise TypeError(
            f"`mask` must be a bool array (True marks the entries that count toward the "
            f"statistics), got dtype {dtype}. Use mask.astype(bool)."
        )
    shape = tuple(np.shape(mask))
    try:
        broadcast = np.broadcast_shapes(shape, x_shape)
    except ValueError:
        broadcast = None
    if broadcast != x_shape:
        raise ValueError(
            f"`mask` must broadcast to the shape of `x` {x_shape}, got shape {shape}."
        )


def check_axis_name(axis_name: AxisName | None, axis_index_groups: Any) -> None:
    if axis_index_groups is not None:
        if axis_name is None:
            raise ValueError(
                "`axis_index_groups` needs `axis_name`: it splits the devices of that named "
                f"axis into groups, got axis_index_groups={axis_index_groups!r} and axis_name=None."
            )
        groups = [list(g) for g in axis_index_groups]
        if not groups or len({len(g) for g in groups}) != 1 or not groups[0]:
            raise ValueError(
                "`axis_index_groups` must be a non-empty list of equal-size, non-empty groups "
                f"of device indices, got {axis_index_groups!r}."
            )
    if axis_name is None:
        return
    try:
        jax.lax.axis_size(axis_name)
    except NameError as err:
        raise NameError(
            f"`axis_name` {axis_name!r} is not bound here: normalize inside a "
            f"transformation that binds it, such as jax.shard_map(..., mesh=Mesh(..., "
            f"axis_names=({axis_name!r},))), jax.pmap(..., axis_name={axis_name!r}) or "
            f"jax.vmap(..., axis_name={axis_name!r}). Under sharded jax.jit no `axis_name` "
            f"is needed: pass None and XLA inserts the reductions. ({err})"
        ) from None



def check_flag(name: str, value: Any) -> None:
    check_bool(value, name, "it selects the update rule", "pass True or False")


def check_virtual_batch_size(virtual_batch_size: Any) -> None:
    if virtual_batch_size is None:
        return
    if not isinstance(virtual_batch_size, numbers.Integral) or isinstance(
        virtual_batch_size, bool
    ):
        raise TypeError(
            f"`virtual_batch_size` must be a positive int (the size of each ghost batch) or "
            f"None, got {type(virtual_batch_size).__name__} {virtual_batch_size!r}."
        )
    if virtual_batch_size < 1:
        raise ValueError(
            f"`virtual_batch_size` must be a positive int (the size of each ghost batch) or "
            f"None, got {virtual_batch_size!r}."
        )


def check_renorm_clipping(r_max: Any, d_max: Any) -> None:
    """``r_max >= 1`` and ``d_max >= 0`` where they are concrete (traced values pass)."""
    for name, value in (("r_max", r_max), ("d_max", d_max)):
        if isinstance(value, bool) or not isinstance(
            value, (numbers.Real, jax.Array, np.ndarray, np.generic)
        ):
            raise TypeError(
                f"`{name}` must be a real scalar (a Python float or a 0-d array, which may be "
                f"traced), got {type(value).__name__} {value!r}."
            )
        dtype = jnp.result_type(value)
        real = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
        shape = tuple(getattr(value, "shape", ()))
        if shape or not real:
            raise TypeError(
                f"`{name}` must be a real scalar (a Python float or a 0-d array, which may be "
                f"traced), got {type(value).__name__} of shape {shape} and dtype "
                f"{dtype}."
            )
    r_value, d_value = _concrete(r_max), _concrete(d_max)
    if r_value is not None and not r_value >= 1.0:
        raise ValueError(
            f"`r_max` must be >= 1 (r is clipped to [1/r_max, r_max]; r_max=1 is plain batch "
            f"normalization), got {r_max!r}."
        )
    if d_value is not None and not d_value >= 0.0:
        raise ValueError(
            f"`d_max` must be >= 0 (d is clipped to [-d_max, d_max]; d_max=0 is plain batch "
            f"normalization), got {d_max!r}."
        )


def check_output_dtype(dtype: Any) -> None:
    """``dtype`` (the output's) is None or a floating or complex dtype."""
    if dtype is None:
        return
    try:
        inexact = bool(jnp.issubdtype(dtype, jnp.inexact))
    except TypeError:
        inexact = False
    if not inexact:
        raise TypeError(
            f"`dtype` (the output's) must be None (the dtype of `x`) or a floating or complex "
            f"dtype such as jnp.float32 or jnp.bfloat16, got {dtype!r}."
        )

"""Argument validation for the public functions and the drop-ins.

Every check runs at trace time on static information (shapes, dtypes, Python numbers) and
raises with a message that names the argument, what was expected and what was given.
The orchestration (``batch_norm``, ``batch_renorm``, the tools) and the drop-ins call these
checks before any math; the math modules never import this one, and run on checked input.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._dtypes import is_complex
from ._layout import AxisName, Layout, layout, with_shape
from ._state import BatchStats


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


def check_input(x: Any) -> jax.Array:
    """``x`` as an array of a floating or complex dtype; anything else is refused by name."""
    if x is None or isinstance(x, (str, bytes, Mapping)):
        raise TypeError(
            f"`x` must be an array of a floating dtype (a jax or numpy array), got "
            f"{type(x).__name__} {x!r}."
        )
    try:
        array = jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`x` must be an array of a floating dtype (a jax or numpy array), got "
            f"{type(x).__name__}, which jnp.asarray cannot convert: {err}"
        ) from None
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        raise TypeError(
            f"`x` must have a floating dtype (float16, bfloat16, float32, float64) or a complex "
            f"one (complex64, complex128), got {array.dtype}. Cast it first, e.g. "
            f"x.astype(jnp.float32)."
        )
    return array


def check_axis(ndim: int, axis: Any) -> None:
    """``axis`` is an int or a non-empty tuple of distinct ints in ``[-ndim, ndim)``."""
    raw = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    integral = all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in raw)
    if not raw or not integral:
        raise TypeError(f"`axis` must be an int or a non-empty tuple of ints, got {axis!r}.")
    bad = [a for a in raw if not -ndim <= a < ndim]
    if bad:
        raise ValueError(
            f"`axis` must lie in [-{ndim}, {ndim}) for an input of rank {ndim}, got {axis!r}."
        )
    if len({int(a) % ndim for a in raw}) != len(raw):
        raise ValueError(f"`axis` must not name an axis twice, got {axis!r} for rank {ndim}.")


def checked_layout(ndim: int, axis: Any) -> Layout:
    """:func:`jaxbn._layout.layout` of an ``axis`` that :func:`check_axis` accepts."""
    check_axis(ndim, axis)
    return layout(ndim, axis)


def check_common(
    x: Any,
    params: Mapping[str, Any] | None,
    state: Any,
    *,
    training: Any,
    axis: Any,
    momentum: Any,
    epsilon: Any,
    mask: Any,
    virtual_batch_size: Any,
    debias: Any,
    unbiased_running_var: Any,
    dtype: Any = None,
) -> tuple[jax.Array, Layout]:
    """The checks that batch_norm and batch_renorm share, in both modes; returns ``x`` as an
    array and its layout (with shapes)."""
    check_training(training)
    x = check_input(x)
    lay = with_shape(checked_layout(x.ndim, axis), x.shape)
    check_params(params, lay, x.shape)
    check_state(state, lay.feature_shape, x.dtype, training=bool(training))
    check_momentum(momentum)
    check_epsilon(epsilon)
    check_mask(mask, x.shape)
    check_flag("debias", debias)
    check_flag("unbiased_running_var", unbiased_running_var)
    check_virtual_batch_size(virtual_batch_size)
    check_output_dtype(dtype)
    return x, lay


def check_training_layout(
    x_shape: tuple[int, ...],
    lay: Layout,
    *,
    axis: Any,
    axis_name: AxisName | None,
    axis_index_groups: Any,
    virtual_batch_size: int | None,
) -> None:
    """The training-mode checks: the sync axis is bound, there is a batch to reduce, and
    the ghost batches (if any) are local and divide the batch axis."""
    check_axis_name(axis_name, axis_index_groups)
    if not lay.reduction_axes and axis_name is None:
        raise ValueError(
            f"`axis` {axis!r} makes every axis of `x` (shape {x_shape}) a feature axis, so "
            f"training has no batch to take statistics over. Leave at least one axis out "
            f"of `axis`, or pass the `axis_name` of a vmap/shard_map/pmap over the batch."
        )
    if virtual_batch_size is None:
        return
    if axis_name is not None:
        raise ValueError(
            f"`virtual_batch_size` cannot be combined with `axis_name` (got "
            f"virtual_batch_size={virtual_batch_size!r}, axis_name={axis_name!r}): ghost "
            f"batches are normalized with their own local statistics, so there is nothing to "
            f"synchronize. Drop `axis_name`, and average the new states over the devices "
            f"yourself if they must agree."
        )
    batch_axis = lay.reduction_axes[0]
    size = x_shape[batch_axis]
    if size % virtual_batch_size:
        raise ValueError(
            f"`virtual_batch_size` must divide the batch axis (axis {batch_axis} of `x`, size "
            f"{size}), got virtual_batch_size={virtual_batch_size}. Use a batch size that is a "
            f"multiple of it, or a divisor of {size}."
        )


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
    check_count(state.count)
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


def check_count(count: Any) -> None:
    """``state.count`` is a 0-d integer array (it may be traced): the batches merged so far."""
    if isinstance(count, (jax.Array, np.ndarray, np.generic)):
        if jnp.issubdtype(count.dtype, jnp.integer) and np.shape(count) == ():
            return
        given = f"an array of shape {np.shape(count)} and dtype {count.dtype}"
    else:
        given = f"{type(count).__name__} {count!r}"
    raise TypeError(
        f"`state.count` must be a 0-d integer array (int32, the number of batches merged so "
        f"far, as jaxbn.init makes it), got {given}. Keep the count of the state that "
        f"jaxbn.init or batch_norm returned, or set it with jnp.asarray(n, jnp.int32)."
    )


def _concrete(value: Any) -> float | None:
    """The Python value of a number, or None if it is traced."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _hyperparameter(value: Any, name: str, meaning: str) -> np.ndarray | None:
    """``value`` is a real scalar: a Python int or float (not a bool), or a 0-d array of a
    floating dtype, which may be traced. Returns its value where it is concrete (a Python
    number, or an array outside a transformation), None where it is traced."""
    expected = (
        f"`{name}` must be a real scalar ({meaning}): a Python float or a 0-d floating "
        f"array, which may be traced"
    )
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Real, jax.Array, np.ndarray, np.generic)
    ):
        raise TypeError(f"{expected}; got {type(value).__name__} {value!r}.")
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        shape = tuple(np.shape(value))
        if shape or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(
                f"{expected} (one value for all features); got an array of shape {shape} "
                f"and dtype {value.dtype}."
            )
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value, np.float64)


def check_momentum(momentum: Any) -> None:
    """``momentum`` is None or a real scalar, in ``[0, 1)`` where it is concrete."""
    if momentum is None:
        return
    value = _hyperparameter(momentum, "momentum", "the EMA decay, in [0, 1)")
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(
            f"`momentum` must lie in [0, 1) (the EMA keeps momentum*old + (1-momentum)*batch; "
            f"torch's momentum m is our 1-m) or be None for a cumulative average, got {momentum!r}."
        )


def check_epsilon(epsilon: Any) -> None:
    """``epsilon`` is a real scalar, > 0 where it is concrete."""
    value = _hyperparameter(epsilon, "epsilon", "added to the variance, > 0")
    if value is not None and not value > 0.0:
        raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}.")


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    if not isinstance(mask, (jax.Array, np.ndarray, np.generic, bool)):
        raise TypeError(
            f"`mask` must be a bool array (jax or numpy) or None, got {type(mask).__name__}. "
            f"Convert it first, e.g. jnp.asarray(mask, bool)."
        )
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
    """``axis_name`` is bound here; ``axis_index_groups`` (with it) partitions its indices
    ``range(axis_size)`` into groups of one size."""
    if axis_index_groups is not None and axis_name is None:
        raise ValueError(
            "`axis_index_groups` needs `axis_name`: it splits the devices of that named "
            f"axis into groups, got axis_index_groups={axis_index_groups!r} and axis_name=None."
        )
    groups = None if axis_index_groups is None else _groups(axis_index_groups)
    if axis_name is None:
        return
    try:
        axis_size = jax.lax.axis_size(axis_name)
    except NameError as err:
        raise NameError(
            f"`axis_name` {axis_name!r} is not bound here: normalize inside a "
            f"transformation that binds it, such as jax.shard_map(..., mesh=Mesh(..., "
            f"axis_names=({axis_name!r},))), jax.pmap(..., axis_name={axis_name!r}) or "
            f"jax.vmap(..., axis_name={axis_name!r}). Under sharded jax.jit no `axis_name` "
            f"is needed: pass None and XLA inserts the reductions. ({err})"
        ) from None
    if groups is not None and isinstance(axis_size, numbers.Integral):
        _check_partition(groups, int(axis_size), axis_name, axis_index_groups)


def _groups(axis_index_groups: Any) -> list[list[int]]:
    """``axis_index_groups`` as lists of ints: a non-empty sequence of equal-size, non-empty
    sequences of device indices."""
    expected = (
        "`axis_index_groups` must be a non-empty list of equal-size, non-empty lists of "
        "device indices (ints), e.g. [[0, 1], [2, 3]]"
    )
    if isinstance(axis_index_groups, np.ndarray):
        axis_index_groups = axis_index_groups.tolist()
    if not isinstance(axis_index_groups, Sequence) or isinstance(axis_index_groups, str) or not all(
        isinstance(g, Sequence) and not isinstance(g, str) for g in axis_index_groups
    ):
        raise TypeError(f"{expected}, got {axis_index_groups!r}.")
    groups = [list(g) for g in axis_index_groups]
    if not all(
        isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_))
        for g in groups
        for i in g
    ):
        raise TypeError(f"{expected}, got {axis_index_groups!r}.")
    if not groups or len({len(g) for g in groups}) != 1 or not groups[0]:
        raise ValueError(f"{expected}, got {axis_index_groups!r}.")
    return [[int(i) for i in g] for g in groups]


def _check_partition(
    groups: list[list[int]], axis_size: int, axis_name: Any, given: Any
) -> None:
    """Every index of the axis is in exactly one group (XLA fails with a C++ stack if not)."""
    indices = [i for g in groups for i in g]
    outside = sorted({i for i in indices if not 0 <= i < axis_size})
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    missing = sorted(set(range(axis_size)) - set(indices))
    problems = (
        ([f"indices outside [0, {axis_size}): {outside}"] if outside else [])
        + ([f"indices in more than one place: {repeated}"] if repeated else [])
        + ([f"indices in no group: {missing}"] if missing else [])
    )
    if problems:
        raise ValueError(
            f"`axis_index_groups` must split the {axis_size} indices of `axis_name` "
            f"{axis_name!r} (0 to {axis_size - 1}) into groups of equal size, each index in "
            f"exactly one group, e.g. {_example_partition(axis_size)}; got {given!r}, with "
            f"{'; '.join(problems)}."
        )


def _example_partition(axis_size: int) -> list[list[int]]:
    half = axis_size // 2 if axis_size % 2 == 0 and axis_size > 1 else axis_size
    return [list(range(start, start + half)) for start in range(0, axis_size, half)]


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

"""Batch-norm parameters and statistics to and from PyTorch and Keras.

=====================  ========================  ==========================  ===================
jaxbn                  PyTorch state_dict        Keras weights               note
=====================  ========================  ==========================  ===================
``params["scale"]``    ``weight``                ``gamma``
``params["bias"]``     ``bias``                  ``beta``
``state.mean``         ``running_mean``          ``moving_mean``
``state.var``          ``running_var``           ``moving_variance``         see below
``state.count``        ``num_batches_tracked``   (none: 0 on load)
``momentum=m``         ``momentum=1-m``          ``momentum=m``              EMA direction
``epsilon`` (1e-5)     ``eps`` (1e-5)            ``epsilon`` (1e-3)          defaults differ
=====================  ========================  ==========================  ===================

**The variance.** Every framework's evaluation normalizes with the stored variance as it
is: ``(x - mean) / sqrt(var + eps)``. So by default the stored value is copied unchanged and
a converted layer gives *identical* eval outputs. What differs is only how training updates
it: jaxbn and Keras average the biased batch variance (divide by ``n``), PyTorch the unbiased
one (divide by ``n - 1``). To re-express a PyTorch running variance in jaxbn's convention
(e.g. to continue training and compare), pass ``batch_entries=n``, the number of entries per
feature in each training batch (``N*H*W``): the variance is then scaled by ``(n - 1)/n`` on
load and ``n/(n - 1)`` on export, and eval outputs change slightly.

Arrays are accepted as anything ``numpy.asarray`` takes (``torch.Tensor`` included, also on
a GPU or with gradients) and returned as writable numpy arrays; this module imports neither
torch nor keras. ``torch.nn.Module.load_state_dict`` wants tensors: wrap the values with
``torch.from_numpy``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._state import BatchStats, Params

__all__ = [
    "from_keras",
    "from_torch",
    "kwargs_from_keras",
    "kwargs_from_torch",
    "kwargs_to_torch",
    "to_keras",
    "to_torch",
]

_KERAS_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


def _numpy(value: Any) -> np.ndarray:
    """A numpy copy of an array-like, detaching and moving torch tensors to the CPU."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.array(value, copy=True)


def _check_entries(batch_entries: int | None) -> None:
    if batch_entries is not None and (
        not isinstance(batch_entries, (int, np.integer)) or batch_entries < 2
    ):
        raise ValueError(
            "`batch_entries` must be None (keep the variance as stored) or an int >= 2, the "
            f"entries per feature in each training batch (N*H*W), got {batch_entries!r}."
        )


def _check_state_dict(state_dict: Any) -> None:
    if isinstance(state_dict, Mapping):
        return
    fix = (
        " Pass its entries: from_torch(module.state_dict())."
        if callable(getattr(state_dict, "state_dict", None))
        else ""
    )
    raise TypeError(
        f"`state_dict` must be a mapping of a torch batch-norm layer's entries "
        f"(running_mean, running_var, ...), got {type(state_dict).__name__}.{fix}"
    )


def _state_dtype(*arrays: np.ndarray) -> Any:
    return np.float64 if any(a.dtype == np.float64 for a in arrays) else np.float32


def from_torch(
    state_dict: Mapping[str, Any], *, prefix: str = "", batch_entries: int | None = None
) -> tuple[Params | None, BatchStats]:
    """Loads a ``torch.nn.BatchNorm*d`` layer's ``state_dict`` entries as jaxbn's.

    ``weight → scale``, ``bias → bias``, ``running_mean → mean``, ``running_var → var``,
    ``num_batches_tracked → count`` (0 if absent). The variance is copied as stored, so
    ``jaxbn.batch_norm(x, params, state, training=False, axis=1, epsilon=module.eps)`` on
    NCHW input equals ``module.eval()(x)`` (see the module docstring for ``batch_entries``).
    Statistics are float32 (float64 if torch's are); count is int32.

    Args:
      state_dict: a mapping holding the layer's entries, e.g. ``module.state_dict()`` or a
        whole model's, with ``prefix`` naming the layer.
      prefix: prepended to each key, e.g. ``"layer1.0.bn1."`` (with the trailing dot).
      batch_entries: None, or the entries per feature of each training batch to convert
        torch's EMA of unbiased variances into jaxbn's biased one (``var * (n-1)/n``).

    Returns:
      ``(params, state)``: ``params`` is ``{"scale", "bias"}`` (float32 numpy arrays turned
      into jax arrays), or None when the layer has no affine parameters (``affine=False``).

    Raises:
      TypeError: ``state_dict`` is not a mapping (a module, say: pass ``module.state_dict()``).
      KeyError: ``running_mean`` or ``running_var`` is missing (``track_running_stats=False``
        layers keep no statistics), or only one of ``weight``/``bias`` is present.
      ValueError: the entries' shapes differ, or ``batch_entries`` is not an int >= 2.

    Example:
      >>> import numpy as np
      >>> from jaxbn import interop
      >>> sd = {"bn.weight": np.ones(3), "bn.bias": np.zeros(3), "bn.running_mean": np.zeros(3),
      ...       "bn.running_var": np.full(3, 2.0), "bn.num_batches_tracked": np.array(7)}
      >>> params, state = interop.from_torch(sd, prefix="bn.")
      >>> state.var.tolist(), int(state.count)
      ([2.0, 2.0, 2.0], 7)
    """
    _check_state_dict(state_dict)
    _check_entries(batch_entries)
    missing = [k for k in ("running_mean", "running_var") if prefix + k not in state_dict]
    if missing:
        raise KeyError(
            f"`state_dict` has no {', '.join(repr(prefix + k) for k in missing)} (keys with "
            f"`prefix` {prefix!r}: {sorted(k for k in state_dict if k.startswith(prefix))}). "
            f"Check `prefix`; a layer built with track_running_stats=False keeps no statistics."
        )
    mean = _numpy(state_dict[prefix + "running_mean"])
    var = _numpy(state_dict[prefix + "running_var"])
    dtype = _state_dtype(mean, var)
    has = [prefix + k in state_dict for k in ("weight", "bias")]
    if has[0] != has[1]:
        raise KeyError(
            f"`state_dict` must hold both {prefix + 'weight'!r} and {prefix + 'bias'!r} "
            f"(affine=True) or neither (affine=False), got only one of them."
        )
    params: Params | None = None
    arrays = {"running_mean": mean, "running_var": var}
    if has[0]:
        weight, bias = _numpy(state_dict[prefix + "weight"]), _numpy(state_dict[prefix + "bias"])
        arrays.update(weight=weight, bias=bias)
        params = {
            "scale": jnp.asarray(weight.astype(dtype)),
            "bias": jnp.asarray(bias.astype(dtype)),
        }
    shapes = {k: a.shape for k, a in arrays.items()}
    if len(set(shapes.values())) != 1 or mean.ndim != 1:
        raise ValueError(
            f"`state_dict` entries under {prefix!r} must all have the shape (C,), got {shapes}."
        )
    if batch_entries is not None:
        var = var * ((batch_entries - 1) / batch_entries)
    tracked_key = prefix + "num_batches_tracked"
    count = int(_numpy(state_dict[tracked_key])) if tracked_key in state_dict else 0
    state = BatchStats(
        mean=jnp.asarray(mean.astype(dtype)),
        var=jnp.asarray(var.astype(dtype)),
        count=jnp.asarray(min(count, np.iinfo(np.int32).max), jnp.int32),
    )
    return params, state


def to_torch(
    params: Mapping[str, Any] | None,
    state: BatchStats,
    *,
    prefix: str = "",
    batch_entries: int | None = None,
) -> dict[str, np.ndarray]:
    """Exports jaxbn's parameters and statistics as ``torch.nn.BatchNorm*d`` entries.

    The inverse of :func:`from_torch`. Values are writable numpy arrays in the statistics'
    dtype, ``num_batches_tracked`` is int64 as in torch. Load them with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in entries.items()})``; build
    the module with :func:`kwargs_to_torch` for the same momentum and epsilon.

    Args:
      params: ``{"scale", "bias"}`` (both present), or None for ``affine=False``.
      state: the :class:`~jaxbn.BatchStats`; its features must be one axis ``(C,)``.
      prefix: prepended to each key, e.g. ``"bn1."``.
      batch_entries: None (copy the variance, identical eval outputs), or the entries per
        feature of each training batch to export torch's unbiased convention
        (``var * n/(n-1)``).

    Returns:
      ``{prefix+"weight", prefix+"bias", prefix+"running_mean", prefix+"running_var",
      prefix+"num_batches_tracked"}`` (no weight/bias when ``params`` is None).

    Raises:
      ValueError: the statistics are not one feature axis, ``params`` lacks scale or bias
        or has another shape, or ``batch_entries`` is not an int >= 2.

    Example:
      >>> import jaxbn
      >>> from jaxbn import interop
      >>> params, state = jaxbn.init(4)
      >>> sorted(interop.to_torch(params, state, prefix="bn."))  # doctest: +NORMALIZE_WHITESPACE
      ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var',
       'bn.weight']
    """
    _check_entries(batch_entries)
    mean, var = _numpy(state.mean), _numpy(state.var)
    if mean.ndim != 1 or var.shape != mean.shape:
        raise ValueError(
            f"`state` must hold one feature axis (C,) for a torch BatchNorm, got mean shape "
            f"{mean.shape} and var shape {var.shape}."
        )
    if batch_entries is not None:
        var = var * (batch_entries / (batch_entries - 1))
    entries: dict[str, np.ndarray] = {}
    if params is not None:
        scale, bias = params.get("scale"), params.get("bias")
        if scale is None or bias is None or np.shape(scale) != mean.shape or np.shape(
            bias
        ) != mean.shape:
            raise ValueError(
                f'`params` must hold "scale" and "bias" of shape {mean.shape} (torch\'s '
                f"affine=True has both), or be None for affine=False, got "
                f"{ {k: None if v is None else np.shape(v) for k, v in params.items()} }."
            )
        entries[prefix + "weight"] = _numpy(scale)
        entries[prefix + "bias"] = _numpy(bias)
    entries[prefix + "running_mean"] = mean
    entries[prefix + "running_var"] = var.astype(mean.dtype)
    entries[prefix + "num_batches_tracked"] = np.array(int(state.count), np.int64)
    return entries


def kwargs_from_torch(module: Any) -> dict[str, Any]:
    """The ``batch_norm`` keyword arguments that reproduce a torch batch-norm module.

    Torch's ``momentum=m`` (EMA ``(1-m)*old + m*batch``) is jaxbn's ``1 - m``; torch's
    ``momentum=None`` (cumulative average) is jaxbn's None. The channel axis is 1 in torch:
    add ``axis=1`` for NCHW input.

    Args:
      module: a ``torch.nn.BatchNorm1d/2d/3d`` (anything with ``momentum`` and ``eps``).

    Returns:
      ``{"momentum": 1 - module.momentum (or None), "epsilon": module.eps}``.

    Raises:
      TypeError: ``module`` has no ``momentum`` or ``eps`` attribute.

    Example:
      >>> from types import SimpleNamespace
      >>> from jaxbn import interop
      >>> interop.kwargs_from_torch(SimpleNamespace(momentum=0.1, eps=1e-5))  # torch's defaults
      {'momentum': 0.9, 'epsilon': 1e-05}
    """
    if not (hasattr(module, "momentum") and hasattr(module, "eps")):
        raise TypeError(
            "`module` must be a torch batch-norm module with `momentum` and `eps` attributes, "
            f"got {type(module).__name__}."
        )
    momentum = None if module.momentum is None else _complement(float(module.momentum))
    return {"momentum": momentum, "epsilon": float(module.eps)}


def kwargs_to_torch(*, momentum: float | None = 0.99, epsilon: float = 1e-5) -> dict[str, Any]:
    """The ``torch.nn.BatchNorm*d`` keyword arguments for jaxbn's ``momentum``/``epsilon``.

    Args:
      momentum: jaxbn's EMA decay (``momentum*old + (1-momentum)*batch``) or None.
      epsilon: jaxbn's epsilon.

    Returns:
      ``{"momentum": 1 - momentum (or None), "eps": epsilon}``.

    Example:
      >>> from jaxbn import interop
      >>> interop.kwargs_to_torch(momentum=0.9, epsilon=1e-5)
      {'momentum': 0.1, 'eps': 1e-05}
    """
    return {"momentum": None if momentum is None else _complement(momentum), "eps": epsilon}


def _complement(momentum: float) -> float:
    """``1 - momentum`` rounded to 15 digits, so torch's 0.1 maps to 0.9 and back to 0.1."""
    return float(f"{1.0 - momentum:.15g}")


def from_keras(
    weights: Mapping[str, Any] | Sequence[Any], *, center: bool = True, scale: bool = True
) -> tuple[Params | None, BatchStats]:
    """Loads Keras ``BatchNormalization`` weights as jaxbn's parameters and statistics.

    Keras keeps jaxbn's conventions: the EMA ``momentum*old + (1-momentum)*batch`` with the
    biased batch variance, so ``moving_variance`` is ``var`` unchanged and keras's
    ``momentum`` is ours. Its default ``epsilon`` is 1e-3 (pass :func:`kwargs_from_keras`). Keras
    counts no batches: ``count`` is 0.

    Args:
      weights: a mapping with ``"gamma"``, ``"beta"``, ``"moving_mean"``,
        ``"moving_variance"`` (keys may carry a path prefix such as
        ``"batch_normalization/gamma"``), or the list ``layer.get_weights()`` returns:
        ``[gamma, beta, moving_mean, moving_variance]`` without gamma when ``scale=False``
        and without beta when ``center=False``.
      center: whether the layer has ``beta`` (used to read a list).
      scale: whether the layer has ``gamma`` (used to read a list).

    Returns:
      ``(params, state)``; ``params`` lacks ``"scale"`` (``"bias"``) without gamma (beta),
      and is None with neither.

    Raises:
      KeyError: a mapping lacks ``moving_mean`` or ``moving_variance``.
      ValueError: a list of the wrong length for ``center``/``scale``, or shapes differ.

    Example:
      >>> import numpy as np
      >>> from jaxbn import interop
      >>> params, state = interop.from_keras([np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)])
      >>> sorted(params), state.var.tolist()
      (['bias', 'scale'], [1.0, 1.0])
    """
    found: dict[str, np.ndarray] = {}
    if isinstance(weights, Mapping):
        for key, value in weights.items():
            name = str(key).rsplit("/", 1)[-1].split(":", 1)[0]
            if name in _KERAS_KEYS:
                found[name] = _numpy(value)
        missing = [k for k in ("moving_mean", "moving_variance") if k not in found]
        if missing:
            raise KeyError(
                f"`weights` has no {missing} (got keys {sorted(map(str, weights))}); expected "
                f"gamma, beta, moving_mean, moving_variance."
            )
    else:
        names = [k for k, present in zip(_KERAS_KEYS, (scale, center, True, True), strict=True)
                 if present]
        values = list(weights)
        if len(values) != len(names):
            raise ValueError(
                f"`weights` as a list must be {names} for center={center}, scale={scale}, got "
                f"{len(values)} arrays."
            )
        found = {name: _numpy(value) for name, value in zip(names, values, strict=True)}
    shapes = {k: a.shape for k, a in found.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"`weights` must all have the same shape, got {shapes}.")
    dtype = _state_dtype(found["moving_mean"], found["moving_variance"])
    params: Params = {}
    if "gamma" in found:
        params["scale"] = jnp.asarray(found["gamma"].astype(dtype))
    if "beta" in found:
        params["bias"] = jnp.asarray(found["beta"].astype(dtype))
    state = BatchStats(
        mean=jnp.asarray(found["moving_mean"].astype(dtype)),
        var=jnp.asarray(found["moving_variance"].astype(dtype)),
        count=jnp.zeros((), jnp.int32),
    )
    return (params or None), state


def to_keras(params: Mapping[str, Any] | None, state: BatchStats) -> dict[str, np.ndarray]:
    """Exports jaxbn's parameters and statistics as Keras ``BatchNormalization`` weights.

    The inverse of :func:`from_keras` (the conventions are the same; ``count`` is dropped).
    The dict is in ``layer.get_weights()`` order, so ``layer.set_weights(list(d.values()))``
    loads it into a layer built with ``scale``/``center`` matching the presence of
    ``params["scale"]``/``params["bias"]``.

    Args:
      params: ``{"scale", "bias"}`` (either may be absent or None), or None.
      state: the :class:`~jaxbn.BatchStats`.

    Returns:
      ``{"gamma", "beta", "moving_mean", "moving_variance"}`` as writable numpy arrays,
      without gamma (beta) when there is no scale (bias).

    Raises:
      ValueError: a parameter's shape differs from the statistics'.

    Example:
      >>> import jaxbn
      >>> from jaxbn import interop
      >>> list(interop.to_keras(*jaxbn.init(3)))
      ['gamma', 'beta', 'moving_mean', 'moving_variance']
    """
    mean, var = _numpy(state.mean), _numpy(state.var)
    out: dict[str, np.ndarray] = {}
    for key, name in (("scale", "gamma"), ("bias", "beta")):
        value = None if params is None else params.get(key)
        if value is None:
            continue
        if np.shape(value) != mean.shape:
            raise ValueError(
                f'`params["{key}"]` must have the statistics\' shape {mean.shape}, got '
                f"{np.shape(value)}."
            )
        out[name] = _numpy(value)
    out["moving_mean"] = mean
    out["moving_variance"] = var
    return out


def kwargs_from_keras(layer: Any) -> dict[str, Any]:
    """The ``batch_norm`` keyword arguments that reproduce a Keras BatchNormalization layer.

    Keras's ``momentum`` has jaxbn's direction and is copied; its ``epsilon`` (default 1e-3,
    jaxbn's 1e-5) and ``axis`` (default -1) are copied too.

    Args:
      layer: a ``keras.layers.BatchNormalization`` (anything with ``momentum``,
        ``epsilon`` and, optionally, ``axis``).

    Returns:
      ``{"momentum": layer.momentum, "epsilon": layer.epsilon, "axis": layer.axis}``.

    Raises:
      TypeError: ``layer`` has no ``momentum`` or ``epsilon`` attribute.

    Example:
      >>> from types import SimpleNamespace
      >>> from jaxbn import interop
      >>> interop.kwargs_from_keras(SimpleNamespace(momentum=0.99, epsilon=1e-3, axis=-1))
      {'momentum': 0.99, 'epsilon': 0.001, 'axis': -1}
    """
    if not (hasattr(layer, "momentum") and hasattr(layer, "epsilon")):
        raise TypeError(
            "`layer` must be a keras BatchNormalization layer with `momentum` and `epsilon` "
            f"attributes, got {type(layer).__name__}."
        )
    axis = getattr(layer, "axis", -1)
    axis = tuple(axis) if isinstance(axis, (list, tuple)) else int(axis)
    return {"momentum": float(layer.momentum), "epsilon": float(layer.epsilon), "axis": axis}


# Deprecated aliases of the functions above, under their former names.


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"`jaxbn.interop.{old}` is deprecated: use `jaxbn.interop.{new}`, the same function "
        f"under a name that says which way it converts.",
        DeprecationWarning,
        stacklevel=3,
    )


def torch_kwargs(module: Any) -> dict[str, Any]:
    """Deprecated: :func:`kwargs_from_torch`."""
    _deprecated("torch_kwargs", "kwargs_from_torch")
    return kwargs_from_torch(module)


def torch_module_kwargs(*, momentum: float | None = 0.99, epsilon: float = 1e-5) -> dict[str, Any]:
    """Deprecated: :func:`kwargs_to_torch`."""
    _deprecated("torch_module_kwargs", "kwargs_to_torch")
    return kwargs_to_torch(momentum=momentum, epsilon=epsilon)


def keras_kwargs(layer: Any) -> dict[str, Any]:
    """Deprecated: :func:`kwargs_from_keras`."""
    _deprecated("keras_kwargs", "kwargs_from_keras")
    return kwargs_from_keras(layer)

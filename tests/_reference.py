"""The float64 numpy reference for batch normalization, written from the formulas.

It shares no code with jaxbn. Every test that compares jaxbn with an independent truth uses it,
and ``tests/test_reference.py`` checks it in turn: gradients against central finite
differences, statistics and outputs against closed forms, and a negative control that shows
the finite-difference check rejects a wrong gradient.

It also differentiates any float64 function numerically (:func:`directional_derivative`,
:func:`jacobian`): the truth for forward-mode derivatives and, applied to :func:`grads`, for
second-order ones.

Conventions (jaxbn's): ``axis`` is the feature axis or a tuple of feature axes, every other
axis is reduced. ``mask`` is bool and broadcastable to ``x``; only its True entries count
toward the statistics, but every entry is normalized. Variances are biased (divide by the
count) unless ``ddof`` says otherwise. The running statistics follow the EMA
``new = momentum * old + (1 - momentum) * batch``.

``scale`` and ``bias`` are feature-shaped, or per-example (conditional batch norm): of ``x``'s
rank and broadcastable to it, such as ``(N, 1, 1, C)`` for NHWC input. A complex ``x`` (as
flax normalizes it) has a complex mean and the real variance ``E|x - mean|²``; the forward
functions compute in complex128 then, everything else in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-5
# Central differences of float64 functions of values of size ~1-10: the truncation error
# (step^2 |f'''| / 6) and the rounding error (1e-16 |f| / step) are both 1e-9 or less.
STEP = 1e-6

Axis = int | tuple[int, ...]


def feature_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """The feature axes, non-negative and sorted."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def reduction_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """Every axis that is not a feature axis."""
    features = feature_axes(ndim, axis)
    return tuple(a for a in range(ndim) if a not in features)


def feature_shape(shape: tuple[int, ...], axis: Axis) -> tuple[int, ...]:
    """The shape of the per-feature statistics of an input of ``shape``."""
    return tuple(shape[a] for a in feature_axes(len(shape), axis))


def to_input(values: ArrayLike, shape: tuple[int, ...], axis: Axis) -> np.ndarray:
    """A feature-shaped array reshaped to broadcast against an input of ``shape``."""
    features = feature_axes(len(shape), axis)
    return np.reshape(values, [d if a in features else 1 for a, d in enumerate(shape)])


def per_example_shape(shape: tuple[int, ...], axis: Axis) -> tuple[int, ...]:
    """The shape of per-example (conditional) parameters for an input of ``shape`` whose
    batch axis is 0: one value per example and feature, ``(N, 1, 1, C)`` for NHWC."""
    features = feature_axes(len(shape), axis)
    return (shape[0], *(d if a in features else 1 for a, d in enumerate(shape) if a))


def as_float64(values: ArrayLike) -> np.ndarray:
    """``values`` in float64, or in complex128 when they are complex."""
    values = np.asarray(values)
    return values.astype(np.complex128 if np.iscomplexobj(values) else np.float64)


def placed(values: ArrayLike, shape: tuple[int, ...], axis: Axis) -> np.ndarray:
    """A parameter (``scale`` or ``bias``) shaped to broadcast against an input of ``shape``:
    a feature-shaped one is reshaped by :func:`to_input`, a per-example one (of the input's
    rank) is used as it is."""
    values = as_float64(values)
    return values if values.ndim == len(shape) else to_input(values, shape, axis)


def reduced_to(values: np.ndarray, like: ArrayLike | None, axis: Axis) -> np.ndarray:
    """An elementwise gradient (shaped like ``x``) summed down to the shape of the parameter
    ``like``: over the axes where a per-example parameter has size 1, or over every
    reduction axis for a feature-shaped one (also when ``like`` is None)."""
    if like is not None and np.ndim(like) == values.ndim:
        kept = np.shape(like)
        return values.sum(axis=tuple(a for a, d in enumerate(kept) if d == 1), keepdims=True)
    return values.sum(axis=reduction_axes(values.ndim, axis))


def _weights(x: np.ndarray, mask: ArrayLike | None) -> np.ndarray:
    """1.0 for the entries that count toward the statistics, 0.0 for the others."""
    return np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask), x.shape) * 1.0


def moments(
    x: ArrayLike, axis: Axis = -1, mask: ArrayLike | None = None, ddof: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature: the mean, the variance (``Σ(x - mean)² / (n - ddof)``) and the count ``n``
    of the valid entries. A feature with ``n <= ddof`` valid entries gets the sum itself
    (mean 0 and variance 0 when nothing is valid); its count says so."""
    x = as_float64(x)
    reduce = reduction_axes(x.ndim, axis)
    weights = _weights(x, mask)
    count = weights.sum(axis=reduce)
    mean = (x * weights).sum(axis=reduce) / np.maximum(count, 1)
    centred = x - to_input(mean, x.shape, axis)
    var = (np.abs(centred) ** 2 * weights).sum(axis=reduce) / np.maximum(count - ddof, 1)
    return mean, var, count


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    axis: Axis = -1,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = EPS,
) -> np.ndarray:
    """``scale * (x - mean) / sqrt(var + eps) + bias`` with per-feature statistics and
    feature-shaped or per-example ``scale`` and ``bias``."""
    x = as_float64(x)
    y = (x - placed(mean, x.shape, axis)) / np.sqrt(placed(var, x.shape, axis) + eps)
    if scale is not None:
        y = y * placed(scale, x.shape, axis)
    if bias is not None:
        y = y + placed(bias, x.shape, axis)
    return y


def inv_std(var: ArrayLike, eps: float = EPS) -> np.ndarray:
    """``1 / sqrt(var + eps)``: what evaluation multiplies ``x - mean`` by, per feature (and
    what a fold multiplies a preceding kernel by, with ``scale``)."""
    return 1 / np.sqrt(as_float64(var) + eps)


def eval_grads(
    x: ArrayLike,
    dy: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    axis: Axis = -1,
    scale: ArrayLike | None = None,
    eps: float = EPS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradients of ``sum(dy * y)``, ``y`` from :func:`normalize` with fixed (running)
    statistics, with respect to ``x``, ``scale`` and ``bias``: ``dy · scale / sqrt(var +
    eps)``, ``Σ dy · (x - mean) / sqrt(var + eps)`` and ``Σ dy`` over the reduction axes."""
    x, dy = as_float64(x), as_float64(dy)
    dx = dy * placed(inv_std(var, eps), x.shape, axis)
    if scale is not None:
        dx = dx * placed(scale, x.shape, axis)
    x_hat = normalize(x, mean, var, axis, eps=eps)
    return dx, reduced_to(dy * x_hat, scale, axis), reduced_to(dy, None, axis)


def batch_norm(
    x: ArrayLike,
    axis: Axis = -1,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    eps: float = EPS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training mode: the output normalized with the batch statistics, and those statistics
    (mean, biased variance)."""
    mean, var, _ = moments(x, axis, mask)
    return normalize(x, mean, var, axis, scale, bias, eps), mean, var


def grads(
    x: ArrayLike,
    dy: ArrayLike,
    axis: Axis = -1,
    scale: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    eps: float = EPS,
    bias: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradients of ``sum(dy * y)``, ``y`` from :func:`batch_norm` (real ``x``), with
    respect to ``x``, ``scale`` and ``bias``; ``dscale`` and ``dbias`` have the shapes of
    ``scale`` and ``bias`` (feature-shaped when None; only the shape of ``bias`` matters).

    μ and σ = sqrt(var + eps) depend only on the valid entries (m = 1), but every entry is
    normalized with them, so for entry i (n = number of valid entries, x̂ = (x - μ)/σ,
    g = dy · scale, the gradient with respect to x̂)::

        dx_i = 1/σ · (g_i − m_i · Σ g / n − m_i · x̂_i · Σ g·x̂ / n)

    the textbook ``scale/σ · (dy − mean(dy) − x̂·mean(dy·x̂))`` without a mask and with a
    feature-shaped scale, and the direct path ``g/σ`` alone for a masked-out entry. A
    per-example scale differs between the entries of a feature, so it stays inside the sums.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    reduce = reduction_axes(x.ndim, axis)
    weights = _weights(x, mask)
    mean, var, count = moments(x, axis, mask)

    def per_feature(values: ArrayLike) -> np.ndarray:
        return to_input(values, x.shape, axis)

    sigma = np.sqrt(var + eps)
    x_hat = (x - per_feature(mean)) / per_feature(sigma)
    g = dy if scale is None else dy * placed(scale, x.shape, axis)
    sum_g = per_feature(g.sum(axis=reduce))
    sum_g_x_hat = per_feature((g * x_hat).sum(axis=reduce))
    n = per_feature(count)
    dx = (g - weights * sum_g / n - weights * x_hat * sum_g_x_hat / n) / per_feature(sigma)
    return dx, reduced_to(dy * x_hat, scale, axis), reduced_to(dy, bias, axis)


def epsilon_grad(
    x: ArrayLike,
    dy: ArrayLike,
    axis: Axis = -1,
    scale: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    eps: float = EPS,
) -> float:
    """The gradient of ``sum(dy * y)``, ``y`` from :func:`batch_norm` (real ``x``), with
    respect to ``eps``: ``Σ dy · ∂y/∂eps`` with ``∂y/∂eps = -scale · (x - mean) ·
    (var + eps)^(-3/2) / 2`` (the batch mean and variance do not depend on ``eps``)."""
    x, dy = as_float64(x), as_float64(dy)
    mean, var, _ = moments(x, axis, mask)
    inv_std_cubed = to_input(var + eps, x.shape, axis) ** -1.5
    dy_deps = -0.5 * (x - to_input(mean, x.shape, axis)) * inv_std_cubed
    if scale is not None:
        dy_deps = dy_deps * placed(scale, x.shape, axis)
    return float(np.sum(dy * dy_deps))


def ema(old: ArrayLike, batch: ArrayLike, momentum: float) -> np.ndarray:
    """The running-statistics update ``momentum * old + (1 - momentum) * batch``."""
    return momentum * as_float64(old) + (1 - momentum) * as_float64(batch)


class TrainStep(NamedTuple):
    """One training step of an affine batch norm and the gradients of ``sum(y * dy)``."""

    y: np.ndarray  # like x
    mean: np.ndarray  # the new running mean (feature-shaped)
    var: np.ndarray  # the new running variance (feature-shaped)
    dx: np.ndarray  # like x
    dscale: np.ndarray  # like scale (feature-shaped or per-example)
    dbias: np.ndarray  # like bias


def train_step(
    x: ArrayLike,
    dy: ArrayLike,
    *,
    scale: ArrayLike,
    bias: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    momentum: float,
    axis: Axis = -1,
    mask: ArrayLike | None = None,
    eps: float = EPS,
) -> TrainStep:
    """:func:`batch_norm`, :func:`ema` and :func:`grads` together: what one training step of
    ``jaxbn.batch_norm`` computes, and what the gradient of a linear loss is."""
    y, mean, var = batch_norm(x, axis, scale, bias, mask, eps)
    dx, dscale, dbias = grads(x, dy, axis, scale, mask, eps, bias)
    return TrainStep(
        y=y,
        mean=ema(running_mean, mean, momentum),
        var=ema(running_var, var, momentum),
        dx=dx,
        dscale=dscale,
        dbias=dbias,
    )


def _ghost_groups(x: np.ndarray, size: int, mask: ArrayLike | None):
    """``(rows, mask of those rows)`` for each ghost batch of ``size`` along axis 0."""
    mask = None if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    for start in range(0, x.shape[0], size):
        rows = slice(start, start + size)
        yield rows, None if mask is None else mask[rows]


def _rows_of(param: ArrayLike | None, rows: slice, x: np.ndarray) -> ArrayLike | None:
    """The part of a per-example parameter that goes with ``rows`` of ``x`` (all of a
    feature-shaped one, or of one with size 1 on axis 0)."""
    if param is None or np.ndim(param) != x.ndim or np.shape(param)[0] == 1:
        return param
    return np.asarray(param)[rows]


def ghost_batch_norm(
    x: ArrayLike,
    size: int,
    axis: Axis = -1,
    mask: ArrayLike | None = None,
    eps: float = EPS,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ghost batches of ``size`` along axis 0, each normalized with its own statistics, then
    ``scale`` and ``bias`` (both may be None); also the mean over the groups with a valid entry
    of their means and variances, which is what the running statistics are updated with."""
    x = np.asarray(x, np.float64)
    outputs, means, variances = [], [], []
    for rows, group_mask in _ghost_groups(x, size, mask):
        mean, var, count = moments(x[rows], axis, group_mask)
        outputs.append(normalize(x[rows], mean, var, axis, _rows_of(scale, rows, x),
                                 _rows_of(bias, rows, x), eps))
        if np.all(count > 0):
            means.append(mean)
            variances.append(var)
    return np.concatenate(outputs), np.mean(means, axis=0), np.mean(variances, axis=0)


def ghost_grads(
    x: ArrayLike,
    dy: ArrayLike,
    size: int,
    axis: Axis = -1,
    scale: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    eps: float = EPS,
    bias: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`grads` of :func:`ghost_batch_norm`: each ghost batch is its own batch norm, so
    ``dx`` is :func:`grads` group by group, and ``dscale``, ``dbias`` reduce ``dy·x̂`` and
    ``dy`` (each group's x̂) to the shapes of ``scale`` and ``bias``."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    dx, x_hat = [], []
    for rows, group_mask in _ghost_groups(x, size, mask):
        dx.append(grads(x[rows], dy[rows], axis, _rows_of(scale, rows, x), group_mask, eps)[0])
        mean, var, _ = moments(x[rows], axis, group_mask)
        x_hat.append(normalize(x[rows], mean, var, axis, eps=eps))
    x_hat = np.concatenate(x_hat)
    return np.concatenate(dx), reduced_to(dy * x_hat, scale, axis), reduced_to(dy, bias, axis)


class Renorm(NamedTuple):
    """The intermediate values of Batch Renormalization, per feature (``x_tilde`` like x)."""

    mean: np.ndarray  # the batch mean μ_B
    var: np.ndarray  # the biased batch variance
    r: np.ndarray  # clip(σ_B / σ, 1/r_max, r_max)
    d: np.ndarray  # clip((μ_B - μ) / σ, -d_max, d_max)
    x_tilde: np.ndarray  # (x - μ_B) / σ_B
    sigma: np.ndarray  # σ_B = sqrt(var + eps)


def batch_renorm(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    scale: ArrayLike,
    bias: ArrayLike,
    r_max: float,
    d_max: float,
    axis: Axis = -1,
    mask: ArrayLike | None = None,
    eps: float = EPS,
) -> tuple[np.ndarray, Renorm]:
    """Batch Renormalization (Ioffe 2017) in training mode:
    ``y = scale * (x̃ · r + d) + bias``; also returns the intermediate values."""
    x = np.asarray(x, np.float64)
    mean, var, _ = moments(x, axis, mask)
    sigma_batch = np.sqrt(var + eps)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    r = np.clip(sigma_batch / sigma, 1 / r_max, r_max)
    d = np.clip((mean - np.asarray(running_mean, np.float64)) / sigma, -d_max, d_max)
    x_tilde = normalize(x, mean, var, axis, eps=eps)
    y = normalize(x, mean, var, axis, np.asarray(scale, np.float64) * r, eps=eps)
    y = y + to_input(np.asarray(scale, np.float64) * d + np.asarray(bias, np.float64),
                     x.shape, axis)
    return y, Renorm(mean, var, r, d, x_tilde, sigma_batch)


def directional_derivative(
    fn: Callable[..., Any],
    primals: Sequence[ArrayLike],
    tangents: Sequence[ArrayLike],
    step: float = STEP,
) -> Any:
    """``(fn(p + step·t) - fn(p - step·t)) / (2·step)`` in float64: the derivative of ``fn``
    at ``primals`` along ``tangents`` (one per argument). ``fn`` returns an array or a tuple
    of arrays, and so does this."""
    primals = [np.asarray(p, np.float64) for p in primals]
    tangents = [np.asarray(t, np.float64) for t in tangents]
    plus = fn(*(p + step * t for p, t in zip(primals, tangents, strict=True)))
    minus = fn(*(p - step * t for p, t in zip(primals, tangents, strict=True)))
    if isinstance(plus, tuple):
        return tuple(
            (np.asarray(a) - np.asarray(b)) / (2 * step) for a, b in zip(plus, minus, strict=True)
        )
    return (np.asarray(plus) - np.asarray(minus)) / (2 * step)


def jacobian(fn: Callable[..., Any], primals: Sequence[ArrayLike], argnum: int) -> Any:
    """The Jacobian of ``fn`` with respect to argument ``argnum``, by central differences,
    laid out as ``jax.jacfwd`` lays it out: ``output.shape + primals[argnum].shape`` (for
    each output, when ``fn`` returns a tuple)."""
    primals = [np.asarray(p, np.float64) for p in primals]
    shape = primals[argnum].shape
    columns = []
    for index in np.ndindex(*shape):
        tangents = [np.zeros_like(p) for p in primals]
        tangents[argnum][index] = 1.0
        columns.append(directional_derivative(fn, primals, tangents))

    def stacked(parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(parts, axis=-1).reshape(parts[0].shape + shape)

    if isinstance(columns[0], tuple):
        return tuple(stacked(parts) for parts in zip(*columns, strict=True))
    return stacked(columns)

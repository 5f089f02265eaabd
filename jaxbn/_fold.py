"""Inference folding: an eval-mode batch norm merged into the Dense or Conv before it.

In evaluation a batch norm is a per-channel affine map, so ``BN(W x + b)`` is one linear
layer ``W' x + b'``: inference then runs without the normalization (one kernel less, and no
statistics to read).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._checks import check_epsilon
from ._dtypes import wider_float
from ._normalize import coefficients, scale_shift
from ._state import BatchStats, mean_and_var_of

__all__ = ["fold_conv", "fold_dense"]


def fold_dense(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    params: Mapping[str, ArrayLike | None] | None,
    state: BatchStats | Mapping[str, ArrayLike],
    *,
    epsilon: float = 1e-5,
    kernel_layout: str = "IO",
) -> tuple[jax.Array, jax.Array]:
    r"""Folds an eval-mode batch norm into the dense layer before it.

    With ``m = scale / sqrt(var + epsilon)`` per output feature::

        BN(x @ W + b) = (x @ W + b - mean) * m + beta = x @ W' + b'
        W' = W * m  (each output column scaled),   b' = (b - mean) * m + beta

    The folded layer matches the batch norm of :func:`~jaxbn.batch_norm` with
    ``training=False`` and the same ``epsilon``. The arithmetic runs in float32 or wider;
    the results have the kernel's dtype (an integer or bool kernel or bias is promoted, as
    flax promotes it: the folded one is floating, the widest floating dtype given, at least
    float32). (When ``|mean| >> std`` the folded bias cancels a
    large term, as any folding does; the unfolded layer keeps that precision.)

    Args:
      kernel: the dense kernel: ``[in, out]`` (``"IO"``, flax ``nn.Dense``) or ``[out, in]``
        (``"OI"``, ``torch.nn.Linear``).
      bias: the dense bias ``[out]``, or None for a layer without bias.
      params: the batch norm's ``{"scale": γ, "bias": β}`` (either may be absent or None),
        or None for a batch norm without affine parameters.
      state: its running statistics, a :class:`~jaxbn.BatchStats` or a mapping with
        ``"mean"`` and ``"var"`` (a flax ``batch_stats`` entry).
      epsilon: the batch norm's epsilon (flax and jaxbn: 1e-5; keras: 1e-3).
      kernel_layout: ``"IO"`` or ``"OI"``.

    Returns:
      ``(new_kernel, new_bias)``: same kernel shape and dtype (an integer or bool one
      promoted to floating); ``new_bias`` of shape ``[out]`` and the bias's dtype (the new
      kernel's when ``bias`` is None or not floating).

    Raises:
      ValueError: a bad ``kernel_layout``, a kernel that is not 2-D, a shape mismatch
        between the kernel's output features and ``bias``, ``params`` or ``state``, or
        ``epsilon <= 0``.
      TypeError: ``state`` is neither a BatchStats nor a mapping with mean and var, or
        ``epsilon`` is not a real scalar.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> kernel, bias = jnp.full((3, 2), 0.5), jnp.zeros(2)
      >>> params, state = jaxbn.init(2)
      >>> state = state._replace(mean=jnp.array([1.0, -1.0]), var=jnp.array([4.0, 0.25]))
      >>> k2, b2 = jaxbn.fold_dense(kernel, bias, params, state)
      >>> x = jax.random.normal(jax.random.key(0), (5, 3))
      >>> y, _ = jaxbn.batch_norm(x @ kernel + bias[None], params, state, training=False)
      >>> bool(jnp.allclose(x @ k2 + b2[None], y, atol=1e-5))
      True
    """
    if kernel_layout not in ("IO", "OI"):
        raise ValueError(
            f'`kernel_layout` must be "IO" ([in, out], flax nn.Dense) or "OI" ([out, in], '
            f"torch.nn.Linear), got {kernel_layout!r}."
        )
    return _fold(kernel, bias, params, state, epsilon, kernel_layout)


def fold_conv(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    params: Mapping[str, ArrayLike | None] | None,
    state: BatchStats | Mapping[str, ArrayLike],
    *,
    epsilon: float = 1e-5,
    kernel_layout: str = "HWIO",
) -> tuple[jax.Array, jax.Array]:
    r"""Folds an eval-mode batch norm into the convolution before it.

    A convolution is linear in its kernel and each output channel has its own filter, so,
    with ``m = scale / sqrt(var + epsilon)`` per output channel::

        BN(conv(x, W) + b) = conv(x, W') + b'
        W'[..., o] = W[..., o] * m[o],   b' = (b - mean) * m + beta

    It holds for any stride, padding, dilation and ``feature_group_count`` (grouped and
    depthwise convolutions: the ``O`` axis still indexes output channels), and for
    transposed convolutions whose ``O`` axis is the output channels.

    Args:
      kernel: the convolution kernel, laid out as ``kernel_layout`` says.
      bias: the convolution bias ``[out]``, or None for a convolution without bias.
      params: the batch norm's ``{"scale": γ, "bias": β}`` (either may be absent or None),
        or None.
      state: its running statistics, a :class:`~jaxbn.BatchStats` or a mapping with
        ``"mean"`` and ``"var"``.
      epsilon: the batch norm's epsilon (flax and jaxbn: 1e-5; keras: 1e-3).
      kernel_layout: one letter per kernel axis, with exactly one ``"O"`` (output channels)
        and one ``"I"`` (input channels): ``"HWIO"`` for flax ``nn.Conv`` and NHWC
        ``lax.conv_general_dilated`` (the default), ``"OIHW"`` for NCHW and
        ``torch.nn.Conv2d``; ``"WIO"``/``"OIW"`` in 1-D, ``"DHWIO"``/``"OIDHW"`` in 3-D.

    Returns:
      ``(new_kernel, new_bias)``: same kernel shape and dtype (an integer or bool one
      promoted to floating); ``new_bias`` of shape ``[out]`` and the bias's dtype (the new
      kernel's when ``bias`` is None or not floating).

    Raises:
      ValueError: a bad ``kernel_layout`` (letters, or length other than the kernel's
        rank), a shape mismatch between the output channels and ``bias``, ``params`` or
        ``state``, or ``epsilon <= 0``.
      TypeError: ``state`` is neither a BatchStats nor a mapping with mean and var, or
        ``epsilon`` is not a real scalar.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))   # HWIO
      >>> params, state = jaxbn.init(4)
      >>> state = state._replace(mean=jnp.arange(4.0), var=jnp.arange(1.0, 5.0))
      >>> k2, b2 = jaxbn.fold_conv(kernel, None, params, state)
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))          # NHWC
      >>> conv = lambda k: jax.lax.conv_general_dilated(
      ...     x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> y, _ = jaxbn.batch_norm(conv(kernel), params, state, training=False)
      >>> bool(jnp.allclose(conv(k2) + b2.reshape(1, 1, 1, 4), y, atol=1e-5))
      True
    """
    ndim = np.ndim(kernel)
    if (
        not isinstance(kernel_layout, str)
        or len(kernel_layout) != ndim
        or kernel_layout.count("O") != 1
        or kernel_layout.count("I") != 1
        or len(set(kernel_layout)) != len(kernel_layout)
    ):
        raise ValueError(
            f"`kernel_layout` must name each of the kernel's {ndim} axes with a distinct "
            f'letter, exactly one "O" (output channels) and one "I" (input channels), e.g. '
            f'"HWIO" (flax, NHWC) or "OIHW" (torch, NCHW), got {kernel_layout!r} for a '
            f"kernel of shape {np.shape(kernel)}."
        )
    return _fold(kernel, bias, params, state, epsilon, kernel_layout)


def _fold(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    params: Mapping[str, ArrayLike | None] | None,
    state: Any,
    epsilon: float,
    kernel_layout: str,
) -> tuple[jax.Array, jax.Array]:
    kernel = jnp.asarray(kernel)
    if kernel.ndim != len(kernel_layout):
        raise ValueError(
            f"`kernel` must have one axis per letter of `kernel_layout` {kernel_layout!r}, "
            f"got shape {kernel.shape}."
        )
    check_epsilon(epsilon)
    out_axis = kernel_layout.index("O")
    channels = (kernel.shape[out_axis],)
    mean, var = mean_and_var_of(state)
    params = params or {}
    scale, beta = params.get("scale"), params.get("bias")
    named = {
        "bias": bias,
        'params["scale"]': scale,
        'params["bias"]': beta,
        "state.mean": mean,
        "state.var": var,
    }
    for name, value in named.items():
        if value is not None and tuple(np.shape(value)) != channels:
            raise ValueError(
                f"`{name}` must have one entry per output channel of `kernel` (axis "
                f"{out_axis}, {kernel_layout[out_axis]!r} of {kernel_layout!r}), shape "
                f"{channels}, got shape {tuple(np.shape(value))}."
            )
    arrays = [jnp.asarray(a) for a in (kernel, bias, scale, beta, mean, var) if a is not None]
    # Integer and bool arrays are promoted, as flax promotes them: the arithmetic runs in
    # the widest floating dtype given (float32 at least), and an integer kernel or bias
    # comes back floating, never truncated.
    dtype = wider_float(
        np.float32, *(a.dtype for a in arrays if jnp.issubdtype(a.dtype, jnp.inexact))
    )
    multiplier, _ = coefficients(
        var, None if scale is None else jnp.asarray(scale), jnp.asarray(epsilon, dtype), dtype
    )
    broadcast = tuple(channels[0] if a == out_axis else 1 for a in range(kernel.ndim))
    new_kernel = kernel.astype(dtype) * multiplier.reshape(broadcast)
    # The new bias is the batch norm of the old one (a zero vector when there is none).
    old_bias = jnp.zeros(channels, dtype) if bias is None else jnp.asarray(bias).astype(dtype)
    beta_ = None if beta is None else jnp.asarray(beta)
    new_bias = scale_shift(old_bias, mean, multiplier, beta_, dtype)
    kernel_dtype = _promoted(kernel.dtype, dtype)
    bias_dtype = kernel_dtype if bias is None else _promoted(jnp.asarray(bias).dtype, kernel_dtype)
    return new_kernel.astype(kernel_dtype), new_bias.astype(bias_dtype)


def _promoted(given: Any, floating: Any) -> Any:
    """``given`` if it is a floating (or complex) dtype, else ``floating``."""
    return given if jnp.issubdtype(given, jnp.inexact) else floating

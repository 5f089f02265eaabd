"""batch_norm(): normalize with batch or running statistics and update the running ones.

Orchestration only: the checks (:mod:`jaxbn._checks`), the ghost regrouping
(:mod:`jaxbn._ghost`), then training (:mod:`jaxbn._train`) and the running-statistics update
(:mod:`jaxbn._update`), or evaluation (:mod:`jaxbn._normalize`). The math modules get plain,
checked arrays: grouped ones to normalize, and per-feature ones to merge into the state.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from ._checks import check_common, check_training_layout
from ._copies import enabled as cpu_copies_enabled
from ._ghost import Ghost, ghost_layout
from ._layout import AxisName
from ._normalize import affine, normalize_eval
from ._state import BatchStats
from ._train import Sync, normalize_training
from ._update import ema_update, unbiased_var

__all__ = ["batch_norm"]


def batch_norm(
    x: ArrayLike,
    params: Mapping[str, ArrayLike | None] | None,
    state: BatchStats,
    *,
    training: bool,
    axis: int | Sequence[int] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    mask: ArrayLike | None = None,
    virtual_batch_size: int | None = None,
    debias: bool = False,
    unbiased_running_var: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, BatchStats]:
    r"""Batch normalization (Ioffe & Szegedy, 2015) as a pure function of explicit state.

    In training, each feature is normalized with the mean and biased variance of the batch,
    taken over every axis of ``x`` that is not in ``axis`` (and over the devices of
    ``axis_name``), and the running statistics are updated::

        μ_B = mean(x),  σ²_B = mean((x - μ_B)²)                 # biased (divide by n)
        y   = scale * (x - μ_B) / sqrt(σ²_B + epsilon) + bias
        mean ← momentum * mean + (1 - momentum) * μ_B              # flax/keras direction
        var  ← momentum * var  + (1 - momentum) * σ²_B

    PyTorch's ``momentum=m`` is ``momentum=1-m`` here (torch 0.1 == jaxbn 0.9), and torch
    stores the unbiased variance. With ``momentum=None`` the running statistics are the plain
    average of all batches seen (torch's ``momentum=None``): the ``k``-th batch is merged with
    weight ``1/k``. In evaluation (``training=False``) the running statistics are used and the
    state is returned as given.

    Statistics are computed in float32 (or wider, for float64 input) whatever the input
    dtype; the output has the dtype of ``x``, or ``dtype`` when given. Mixed precision
    (a bfloat16 or float16 ``x`` with float32 ``params``, ``dtype=jnp.float32``, what
    flax's ``BatchNorm()`` gives such an input) reads ``x`` in its own dtype, normalizes in
    float32, writes the float32 ``y`` directly, and keeps only ``x``, in its own dtype, for
    the backward: the result is a float32 computation on the bfloat16 values, and no
    float32 copy of ``x`` is made. Each device takes two passes over ``x``
    (``mean = Σx/n``, then ``Σ(x - mean)²``), so the variance is accurate at any mean
    (|mean|/std = 1e4 included), with no runtime branch: nothing in training mode stops the
    host on a GPU, and ``vmap`` (a model ensemble) costs no extra pass. Devices are merged
    with Chan's formula in one collective. A batch whose statistics are not finite (a NaN
    or inf in ``x``) leaves the running statistics unchanged and is not counted.

    Training mode has a custom JVP whose transpose, which reverse mode uses, is a short
    backward: two per-feature sums and one elementwise pass, saving nothing of ``x``'s
    size but ``x`` itself. Every autodiff mode works, in both modes: ``jax.grad``,
    ``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``, ``jax.hessian`` and
    forward-over-reverse Hessian-vector products.

    Variants (keyword-only; the defaults are plain batch normalization):

    - ``virtual_batch_size=k`` (ghost batch normalization, Hoffer et al. 2017; keras's
      ``virtual_batch_size``): the first reduction axis (the batch axis) is split into
      ``N/k`` consecutive groups of ``k``, and each group is normalized with its own
      statistics. The running statistics get one update per call, from the mean over the
      groups of the group means and of the group (biased) variances; with ``mask``, each
      group's statistics count only its valid entries and a group with none is left out of
      that mean. Ghost batches are local by construction, so ``axis_name`` is rejected.
    - ``debias=True``: a zero-debiased EMA (as Adam's and haiku's ``zero_debias``): the
      ``k``-th accepted batch is merged with weight
      ``w_k = (1 - momentum) / (1 - momentum**k)`` instead of ``1 - momentum``, so the
      first batch replaces the initial ``mean=0, var=1`` and the running statistics are
      unbiased from the first step (``w_k → 1 - momentum`` as ``k`` grows). ``k`` is
      ``state.count``; the state stays directly usable in evaluation. No effect with
      ``momentum=None`` (already an unbiased average).
    - ``unbiased_running_var=True`` (PyTorch parity): the running variance is updated with
      the unbiased batch variance ``n/(n-1) · σ²_B`` (``n``: valid entries per feature),
      while the batch is still normalized with the biased ``σ²_B``, exactly as
      ``torch.nn.BatchNorm`` does. A feature with fewer than 2 valid entries keeps its
      running variance (its mean is still updated).
    - A frozen layer for fine-tuning (keras ``trainable=False``, running statistics used
      and not updated) is ``training=False``: gradients still flow to ``x``, ``scale`` and
      ``bias``, and the state is returned as given.

    Args:
      x: the input, an array (or nested list) of a floating or complex dtype.
      params: ``{"scale": γ, "bias": β}`` of the feature shape, as made by :func:`init`;
        either key may be absent or None, and ``params=None`` means no affine transform.
      state: the running statistics, a :class:`BatchStats` from :func:`init`: ``mean``
        and ``var`` of the feature shape, float32 or wider; ``count`` a 0-d integer array.
      training: keyword-only, no default. True: normalize with batch statistics and
        return an updated state. False: normalize with the running statistics.
      axis: the feature axis, or a tuple of feature axes (e.g. ``-1`` for NHWC, ``1`` for
        NCHW, ``(1, 2)`` for per-position features). Every other axis is reduced.
      momentum: EMA decay in ``[0, 1)``, or None for a cumulative average. One value for
        all features: a Python float or a 0-d floating array. A concrete value (a number,
        or an array outside a transformation) is range-checked; a traced one (an argument
        of a jitted function) is not, and keeping it in ``[0, 1)`` is the caller's part.
      epsilon: added to the variance before the square root; must be > 0. A scalar like
        ``momentum``, range-checked where concrete and unchecked where traced.
      axis_name: a named axis (or tuple of names) bound by ``jax.shard_map``, ``jax.pmap``
        or ``jax.vmap`` over which the statistics are synchronized. The devices' statistics
        are combined with one collective, each weighted by its count of valid entries.
        Under sharded ``jax.jit`` (SPMD) pass None: XLA inserts the reductions itself.
      axis_index_groups: with ``axis_name``, groups of device indices that synchronize among
        themselves only, e.g. ``[[0, 1], [2, 3]]`` (pmap and shard_map): lists of ints of
        one size, each index of the axis in exactly one group (checked against the axis
        size when tracing).
      mask: a bool array (jax or numpy), broadcastable to ``x``: only True entries count
        toward the statistics.
        Every entry is still normalized. Ignored in evaluation. A batch with no valid
        entry (fully masked, or a batch axis of size 0) gives a finite output and leaves
        the state unchanged.
      virtual_batch_size: the size of the ghost batches the first reduction axis is split
        into, or None (one batch). Must divide that axis. Ignored in evaluation.
      debias: merge the ``k``-th batch with weight ``(1-momentum)/(1-momentum**k)``.
      unbiased_running_var: update the running variance with the unbiased batch variance.
      dtype: the dtype of ``y``; None: ``x``'s (complex when ``params`` are complex). The
        normalization runs in the widest of float32, ``x``'s, the parameters' and this
        dtype.

    Returns:
      ``(y, new_state)``: ``y`` of the shape of ``x`` and the dtype ``dtype`` (None:
      ``x``'s); ``new_state`` of the same
      structure, shapes and dtypes as ``state`` (``state`` itself when ``training=False``).
      No gradient flows into ``new_state``.

    Raises:
      TypeError: ``training`` is not a bool, ``x`` is not an array of a floating dtype,
        ``dtype`` is not a floating or complex dtype,
        ``state`` is not a :class:`BatchStats` (or its ``count`` not a 0-d integer array),
        ``mask`` is not a bool array, ``axis`` is not an int/tuple, ``momentum``/``epsilon``
        are not real scalars (a bool is not), or ``axis_index_groups`` are not lists of ints.
      ValueError: ``axis`` out of range or repeated, a feature-shape mismatch between ``x``
        and ``params``/``state``, a concrete ``momentum`` outside ``[0, 1)`` or
        ``epsilon <= 0``, a mask that does not broadcast to ``x``, ``axis_index_groups``
        without ``axis_name`` or not a partition of its indices into equal groups, or a
        ``virtual_batch_size`` that is not a positive divisor of the batch axis or comes with
        ``axis_name``.
      NameError: ``axis_name`` is not bound by an enclosing transformation.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> params, state = jaxbn.init(4)
      >>> x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (32, 4))
      >>> y, state = jaxbn.batch_norm(x, params, state, training=True)
      >>> bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5)), int(state.count)
      (True, 1)
      >>> y_eval, same = jaxbn.batch_norm(x, params, state, training=False)
      >>> same is state
      True
    """
    with jax.named_scope("jaxbn.batch_norm"):
        x, lay = check_common(
            x, params, state, training=training, axis=axis, momentum=momentum,
            epsilon=epsilon, mask=mask, virtual_batch_size=virtual_batch_size,
            debias=debias, unbiased_running_var=unbiased_running_var, dtype=dtype,
        )
        if not training:
            return normalize_eval(x, state.mean, state.var, params, epsilon, lay, dtype), state

        check_training_layout(
            x.shape, lay, axis=axis, axis_name=axis_name, axis_index_groups=axis_index_groups,
            virtual_batch_size=virtual_batch_size,
        )
        ghost = ghost_layout(lay, x.shape, virtual_batch_size)
        static_epsilon, epsilon_ = _static_or_argument(epsilon)
        static_momentum, momentum_ = _static_or_argument(momentum)
        config = _Training(
            Sync.of(ghost.layout.reduction_axes, axis_name, axis_index_groups, dtype),
            ghost,
            static_epsilon, static_momentum, bool(debias), bool(unbiased_running_var),
            cpu_copies_enabled(),
        )
        scale, bias = affine(params)
        return _train(
            config, x, scale, bias, None if mask is None else jnp.asarray(mask), state,
            epsilon_, momentum_,
        )


def grouped_inputs(
    ghost: Ghost,
    x: jax.Array,
    params: Mapping[str, ArrayLike | None] | None,
    mask: ArrayLike | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    """``x``, ``scale``, ``bias`` and ``mask`` regrouped into ghost batches, the parameters
    shaped to broadcast against the grouped ``x``."""
    scale, bias = affine(params)
    return ghost.group(x, scale, bias, mask)


def update_from_batch(
    state: BatchStats,
    ghost: Ghost,
    batch_mean: jax.Array,
    batch_var: jax.Array,
    valid_count: jax.Array,
    *,
    momentum: float | None,
    debias: bool,
    unbiased_running_var: bool,
) -> BatchStats:
    """The new running statistics from a batch's (or its ghost batches') moments.

    ``batch_mean``, ``batch_var`` (biased) and ``valid_count`` broadcast against the
    grouped ``x``. With ``unbiased_running_var`` each (ghost) batch's variance is scaled by
    ``n/(n-1)``, and only batches with ``n >= 2`` count toward the variance. Ghost batches
    are then averaged, each group with a valid entry weighing the same, and the result is
    merged into ``state`` by :func:`~jaxbn._update.ema_update`. No gradient flows into the
    result.
    """
    # Stopping gradients before the update's arithmetic, rather than after, lets autodiff
    # skip tracing tangents through all of it.
    batch_mean, batch_var, valid_count = jax.lax.stop_gradient((batch_mean, batch_var, valid_count))
    state = jax.lax.stop_gradient(state)
    feature_shape = ghost.layout.feature_shape
    mean = batch_mean.reshape(feature_shape)
    var = batch_var.reshape(feature_shape)
    count = valid_count.reshape(feature_shape)
    var_count = None
    if unbiased_running_var:
        var, var_count = unbiased_var(var, count)
    var, total_var_count = ghost.mean_over_groups(var, count if var_count is None else var_count)
    mean, count = ghost.mean_over_groups(mean, count)
    var_count = None if var_count is None else total_var_count
    return ema_update(state, mean, var, count, var_count, momentum=momentum, debias=debias)


Static = tuple[type, Any]
"""A Python or NumPy number (or None) and its type: part of a traced program's key."""


def _static_or_argument(value: Any) -> tuple[Static | None, Any]:
    """``((type, value), None)`` for a Python or NumPy number (or None), which the traced
    program holds as a constant, as it would without the ``jit``; ``(None, value)`` for an
    array, which it takes as an argument. The type is part of the key: ``1e-5`` is weakly
    typed and ``np.float64(1e-5)`` is not, and they promote differently."""
    if value is None or (isinstance(value, numbers.Number) and not isinstance(value, jax.Array)):
        return (type(value), value), None
    return None, value


class _Training(NamedTuple):
    """What a training-mode call's traced program depends on beyond its arguments' types
    (hashable): the static argument of :func:`_train`."""

    sync: Sync
    ghost: Ghost
    epsilon: Static | None  # None: an argument of _train
    momentum: Static | None
    debias: bool
    unbiased_running_var: bool
    cpu_copies: bool  # jaxbn._copies.enabled() when traced: the off switch is part of the key


@functools.partial(jax.jit, static_argnums=0, inline=True)
def _train(
    config: _Training,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    state: BatchStats,
    epsilon: Any,
    momentum: Any,
) -> tuple[jax.Array, BatchStats]:
    """Training-mode normalization and the state update, after the checks.

    Traced once per configuration and argument types, and inlined where it is called
    (``inline=True``: the caller's program holds the same equations as without the
    ``jit``): a network whose batch norms share shapes, such as the blocks of a ResNet
    stage or the layers of an MLP, traces the arithmetic, its JVP and its transpose once
    rather than once per layer, which is most of a model's time to trace.
    """
    if config.epsilon is not None:
        epsilon = config.epsilon[1]
    if config.momentum is not None:
        momentum = config.momentum[1]
    ghost = config.ghost
    x_g, scale_g, bias_g, mask_g = ghost.group(x, scale, bias, mask)
    y, batch_mean, batch_var, valid_count = normalize_training(
        config.sync, x_g, scale_g, bias_g, mask_g, epsilon
    )
    new_state = update_from_batch(
        state, ghost, batch_mean, batch_var, valid_count, momentum=momentum,
        debias=config.debias, unbiased_running_var=config.unbiased_running_var,
    )
    return y.reshape(x.shape), new_state

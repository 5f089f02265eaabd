"""Training-mode normalization: a custom JVP whose tangent transposes into a two-sum backward.

The forward takes two sums over ``x`` (:func:`~jaxbn._moments.local_moments`) and one
elementwise pass for ``y``. The tangent rule is written so that JAX's own transposition of
it, which reverse mode uses, is the short backward a hand-written VJP would be: ``Σ dy`` and
``Σ dy·x̂`` (also the bias and scale gradients, and the one backward collective), then one
elementwise pass for ``dx``. Because it is a JVP, every autodiff mode works: ``jax.jvp``,
``jax.jacfwd``, ``jax.linearize``, ``jax.grad``, ``jax.hessian``, forward-over-reverse.

Invariants. What must stay true when this file changes, and the test of
tests/test_train_invariants.py that fails if it does not:

1. **The tangent is linear in** ``(dx, dscale, dbias)`` (and ``depsilon``): every term of
   ``dy``, ``d_mean`` and ``d_var`` is one tangent times primal values, with no product of
   two tangents and no term free of them. Reverse mode is the transpose of this map, and
   only a linear map has one. ``test_the_tangent_is_linear``: superposition, and
   ``jax.linear_transpose`` of the linearized map equal to the float64 gradient.
2. **The residuals are** ``x`` **(in its own dtype) and per-feature vectors only.**
   :func:`_tangent` is checkpointed, so linearizing saves its primal inputs (``x``,
   ``mean``, ``inv_std``, ``scale``, ``mask``, ``count``) and nothing of ``x``'s size
   computed from ``x``: ``x̂`` and the float32 reads of a bfloat16 ``x`` are recomputed
   inside the backward's kernels. ``test_the_residuals_are_x_and_per_feature_vectors``.
3. **u and v share one collective**, and so do ``a = Σ dx`` and ``b = Σ x̂·dx``. Forward
   mode: ``a`` and ``b`` cross the devices in one stacked ``psum`` (:func:`_synced`).
   Reverse mode: ``u`` and ``v`` are cast to vary over the devices as one stack
   (:func:`_vary_like`), whose transpose is the backward's one ``psum``; cast apart, they
   would be two. (Under ``shard_map(check_vma=False)`` nothing is cast, and the backward's
   one ``psum`` is the transpose of :func:`_synced`'s.) ``test_u_and_v_share_one_collective``.
4. **The two dy paths agree.** :func:`_per_feature_dy` (``s = scale·inv_std`` is one value
   per feature: ``dy = s·dx + u + x̂·v``, the short backward) and :func:`_per_entry_dy` (``s``
   differs within a feature: per-example scale, or complex ``x``) compute the same ``dy``
   where both apply. ``test_the_two_dy_paths_agree``: a feature-shaped scale and the same
   scale repeated per example give the same derivatives, equal to float64's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from ._copies import cpu_copies, sum_then_cast, widened_reads
from ._dtypes import is_complex, stats_dtype
from ._layout import AxisName
from ._moments import combine, inverse_count, local_moments, masked_sum, mean_and_var, sync_sum
from ._normalize import coefficients, compute_dtype, multiplier, scale_shift

__all__ = ["Sync", "normalize_training"]


class Sync(NamedTuple):
    """The static configuration of one training-mode call (hashable)."""

    reduction_axes: tuple[int, ...]
    axis_name: AxisName | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    out_dtype: np.dtype | None = None  # y's dtype; None: x's (complex with complex params)

    @classmethod
    def of(
        cls,
        reduction_axes: tuple[int, ...],
        axis_name: AxisName | None,
        axis_index_groups: Any,
        out_dtype: Any = None,
    ) -> Sync:
        groups = (
            None
            if axis_index_groups is None
            else tuple(tuple(int(i) for i in group) for group in axis_index_groups)
        )
        return cls(
            reduction_axes, axis_name, groups, None if out_dtype is None else np.dtype(out_dtype)
        )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def normalize_training(
    sync: Sync,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    epsilon: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Training-mode normalization: ``(y, batch_mean, batch_var, valid_count)``.

    ``scale`` and ``bias`` broadcast against ``x`` (feature-shaped ones reshaped to do so,
    or per-example ones for conditional normalization); the statistics have ``x``'s rank
    with size 1 on the reduction axes.

    Memory traffic near its floor, and no runtime branch: on XLA:CPU, where each sum is its
    own kernel, 4 full-tensor passes forward and 6 more backward (flax's autodiff: 4 and
    11); nothing of ``x``'s size is saved for the backward but ``x`` itself, in its own
    dtype (``x̂`` is recomputed inside the backward's kernels).
    """
    outputs, _ = _forward(sync, x, scale, bias, mask, epsilon)
    return outputs


def _forward(
    sync: Sync,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    epsilon: Any,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]:
    """The outputs and ``inv_std``."""
    moments = local_moments(x, sync.reduction_axes, mask, stats_dtype(x.dtype))
    if sync.axis_name is not None:
        moments = combine(moments, sync.axis_name, sync.axis_index_groups)
    mean, var = mean_and_var(moments)
    dtype = compute_dtype(x.dtype, mean, scale, bias, out_dtype=sync.out_dtype)
    mul, inv_std = coefficients(var, scale, epsilon, dtype)
    y = scale_shift(x, mean, mul, bias, dtype, sync.out_dtype)
    return (y, mean, var, moments.valid_count), inv_std


_Outputs = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


@functools.partial(normalize_training.defjvp, symbolic_zeros=True)
def _jvp(
    sync: Sync, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[_Outputs, _Outputs]:
    x, scale, bias, mask, epsilon = primals
    dx, dscale, dbias = (None if isinstance(t, SymbolicZero) else t for t in tangents[:3])
    depsilon = None if isinstance(tangents[4], SymbolicZero) else tangents[4]
    (y, mean, var, count), inv_std = _forward(sync, x, scale, bias, mask, epsilon)
    # Checkpointed: linearizing saves only this function's primal inputs (x in its own
    # dtype, and per-feature vectors), and the backward recomputes x̂ inside its kernels.
    tangent = jax.checkpoint(functools.partial(_tangent, sync, y.dtype))
    dy, dmean, dvar = tangent(
        x, mean, inv_std, scale, mask, count, dx, dscale, dbias, depsilon
    )
    return (y, mean, var, count), (dy, dmean, dvar, jnp.zeros_like(count))


def _tangent(
    sync: Sync,
    y_dtype: Any,
    x: jax.Array,
    mean: jax.Array,
    inv_std: jax.Array,
    scale: jax.Array | None,
    mask: jax.Array | None,
    count: jax.Array,
    dx: jax.Array | None,
    dscale: jax.Array | None,
    dbias: jax.Array | None,
    depsilon: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dy, d_mean, d_var)``, linear in ``(dx, dscale, dbias, depsilon)`` (None: zero).

    With ``x̂ = (x - mean)·inv_std`` and the sums over the valid entries (and devices)::

        a = Σ dx,   b = Σ Re(conj(x̂)·dx),   d_mean = a/n,   d_var = 2b/(n·inv_std)
        dy = s·(dx - a/n - x̂·b/n) + dscale·x̂ + dbias - x̂·s·inv_std·depsilon/2,
        s = scale·inv_std

    (the last term is ``∂y/∂epsilon``: ``inv_std = (var + epsilon)^(-1/2)``, so
    ``∂inv_std/∂epsilon = -inv_std³/2``; epsilon moves neither the mean nor the variance).

    When ``s`` is per-feature (the usual feature-shaped scale), :func:`_per_feature_dy`
    gathers the per-feature terms first, ``dy = s·dx + u + x̂·v`` with
    ``u = dbias - s·a/n`` and ``v = dscale - s·b/n - s·inv_std·depsilon/2``: transposed,
    ``u`` and ``v`` need ``Σ ȳ`` and ``Σ ȳ·x̂``, the very sums of the bias and scale
    gradients (and of epsilon's), so the backward takes two sums, not four, and one
    collective (``u`` and ``v`` cross to the devices through one stacked ``pcast``, whose
    transpose is one ``psum``). Otherwise :func:`_per_entry_dy` adds the terms as written.
    """
    dtype = compute_dtype(x.dtype, mean, scale, dbias)
    inv_n = _inverse_count(sync, x, mask, count)
    s = multiplier(inv_std, scale, dtype)
    # Σ x̂·dx and the output's x̂ are different kernels: each gets its own copy of x, mean
    # and inv_std on XLA:CPU (cpu_copies), so that no shared widening or broadcast is
    # written out.
    x_for_sum, x_for_output = widened_reads(x, dtype, 2)
    for_sum, for_output = cpu_copies((mean, inv_std), 2)
    if dx is None:
        a = jnp.zeros_like(mean)
        b = jnp.zeros_like(inv_n)
    else:
        dx_for_a, dx_for_b = widened_reads(dx, dtype, 2)
        x_hat_for_b = _x_hat(x_for_sum, *for_sum, dtype)
        a = masked_sum(dx_for_a.astype(dtype), mask, sync.reduction_axes)
        b = masked_sum(_real_dot(x_hat_for_b, dx_for_b.astype(dtype)), mask, sync.reduction_axes)
        a, b = _synced(sync, a.astype(mean.dtype), b.astype(inv_n.dtype))
    d_mean = a * inv_n.astype(a.dtype)
    d_var = 2 * b * inv_n / inv_std
    x_hat = _x_hat(x_for_output, *for_output, dtype)
    # ∂y/∂epsilon per unit of x̂: -s·inv_std/2 (per feature, or per example with
    # per-example scale).
    d_by_epsilon = (
        None if depsilon is None
        else -0.5 * s * (inv_std * depsilon.astype(inv_std.dtype)).astype(dtype)
    )
    per_feature = not is_complex(dtype) and all(s.shape[i] == 1 for i in sync.reduction_axes)
    dy_terms = _per_feature_dy if per_feature else _per_entry_dy
    terms = dy_terms(x, x_hat, s, inv_n, a, b, dx, dscale, dbias, d_by_epsilon, dtype)
    # Every term with x's shape and sharding type (explicit-sharding jit types them).
    sharding = jax.typeof(x).sharding
    full = [jnp.broadcast_to(t, x.shape, out_sharding=sharding) for t in terms]
    dy = sum_then_cast(full, y_dtype)
    return dy, d_mean, d_var


def _per_feature_dy(
    x: jax.Array,
    x_hat: jax.Array,
    s: jax.Array,
    inv_n: jax.Array,
    a: jax.Array,
    b: jax.Array,
    dx: jax.Array | None,
    dscale: jax.Array | None,
    dbias: jax.Array | None,
    d_by_epsilon: jax.Array | None,
    dtype: Any,
) -> list[jax.Array]:
    """The terms of ``dy`` when ``s`` is one value per feature (real): ``s·dx + u + x̂·v``.

    ``u = dbias - s·a/n`` and ``v = dscale - s·b/n + d_by_epsilon`` are per-feature, so
    transposed they need only ``Σ ȳ`` and ``Σ ȳ·x̂``; they cross to the devices as one
    stack (:func:`_vary_like`), whose transpose is one ``psum``.
    """
    u = -s * (a * inv_n)
    v = -s * (b * inv_n)
    if dbias is not None:
        u = u + dbias.astype(dtype)
    if dscale is not None:
        v = v + dscale.astype(dtype)
    if d_by_epsilon is not None:
        v = v + d_by_epsilon
    if _varying(x) - (_varying(u) | _varying(v)):  # one cast for both: one collective
        u, v = _vary_like(x, jnp.stack((u, v)))
    return ([] if dx is None else [s * dx.astype(dtype)]) + [u, x_hat * v]


def _per_entry_dy(
    x: jax.Array,
    x_hat: jax.Array,
    s: jax.Array,
    inv_n: jax.Array,
    a: jax.Array,
    b: jax.Array,
    dx: jax.Array | None,
    dscale: jax.Array | None,
    dbias: jax.Array | None,
    d_by_epsilon: jax.Array | None,
    dtype: Any,
) -> list[jax.Array]:
    """The terms of ``dy`` when ``s`` differs within a feature (per-example scale) or is
    complex: ``s·(dx - a/n - x̂·b/n) + x̂·dscale + x̂·d_by_epsilon + dbias``, term by term."""
    terms = [] if dx is None else [s * dx.astype(dtype)]
    terms.append(-s * (a.astype(dtype) + x_hat * b.astype(dtype)) * inv_n.astype(dtype))
    if dscale is not None:
        terms.append(x_hat * dscale.astype(dtype))
    if d_by_epsilon is not None:
        terms.append(x_hat * d_by_epsilon)
    if dbias is not None:
        terms.append(_vary_like(x, dbias.astype(dtype)))
    return terms


def _inverse_count(
    sync: Sync, x: jax.Array, mask: jax.Array | None, count: jax.Array
) -> jax.Array:
    """``1/n`` (real). Without a mask or devices, ``n`` is known from the shape: a constant,
    and no kernel at all (XLA does not fold arithmetic on a broadcast constant such as
    ``count``)."""
    if mask is None and sync.axis_name is None:
        entries = math.prod(x.shape[a] for a in sync.reduction_axes)
        return inverse_count(entries, count.dtype)
    return inverse_count(count)


def _x_hat(x: jax.Array, mean: jax.Array, inv_std: jax.Array, dtype: Any) -> jax.Array:
    return (x.astype(dtype) - mean.astype(dtype)) * inv_std.astype(dtype)


def _real_dot(u: jax.Array, v: jax.Array) -> jax.Array:
    """``Re(conj(u)·v)``: ``u·v`` for real values."""
    if is_complex(u.dtype):
        return u.real * v.real + u.imag * v.imag
    return u * v


def _synced(sync: Sync, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a`` and ``b`` summed over the devices in one collective (unchanged without sync)."""
    if sync.axis_name is None:
        return a, b
    if is_complex(a.dtype):
        total = sync_sum(jnp.stack((a.real, a.imag, b)), sync.axis_name, sync.axis_index_groups)
        return lax.complex(total[0], total[1]), total[2]
    total = sync_sum(jnp.stack((a, b)), sync.axis_name, sync.axis_index_groups)
    return total[0], total[1]


def _vary_like(x: jax.Array, value: jax.Array) -> jax.Array:
    """``value`` cast to vary over every manual mesh axis ``x`` varies over, in one op.

    Combining a device-invariant value with ``x`` inserts that cast implicitly, once per
    operand; its transpose is a ``psum``. The per-feature terms ``u`` and ``v`` are cast as
    one stack, which keeps the backward at one collective (stacked only then: a stack costs
    kernels).
    """
    missing = _varying(x) - _varying(value)
    if not missing:
        return value
    return lax.pcast(value, tuple(sorted(missing, key=str)), to="varying")


def _varying(value: jax.Array) -> frozenset[Hashable]:
    """The manual mesh axes over which ``value`` is typed as differing between devices."""
    return frozenset(jax.typeof(value).manual_axis_type.varying)

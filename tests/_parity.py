"""What the parity tests of the drop-ins share: the tolerances, the data, the masks and the
dtype promotion flax needs.

The tolerances are the tests' only ones: each test names one of these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

# Two float32 computations of the same function (jaxbn against flax or equinox).
TOL = {"atol": 2e-5, "rtol": 2e-5}
# A bfloat16 output is a float32 result rounded to 8 significant bits (one ulp is 2**-8, about
# 0.4% relative). jaxbn and flax round float32 results that differ in their last bits, which can
# land on neighbouring bfloat16 values: allow two bfloat16 ulps.
BF16_TOL = {"atol": 1e-2, "rtol": 1e-2}
# With dtype=bfloat16, flax.nnx evaluates in bfloat16 arithmetic (x - mean and the multiply
# each round to 8 bits, on inputs up to ~12), while jaxbn evaluates in float32 and rounds once.
# The difference is a few bfloat16 ulps of the input scale: |x - mean| ~ 10 has an ulp of 2**-4.
BF16_EVAL_TOL = {"atol": 5e-2, "rtol": 2e-2}
# The float64 reference against float32 results on values of size ~10: a few float32 ulps.
REF_TOL = {"atol": 5e-5, "rtol": 5e-5}
# The float64 reference against complex128/float64 results.
REF_TOL_X64 = {"atol": 1e-10, "rtol": 1e-10}
# Gradients: float32 sums over the batch divided by σ, against flax's autodiff or the
# float64 reference, relative to the largest entry of each expected leaf.
GRAD_TOL = 1e-4
# Gradients of a bfloat16 x against the float64 reference at the values received: the rounding
# of y, dx and the cotangent to 8 significant bits, where the sums of dx cancel part of dy.
BF16_GRAD_TOL = 2e-2


# jaxbn's own constructor arguments of the flax drop-ins (linen fields, nnx keywords), after
# flax's, keyword-only, with defaults that give plain batch norm.
EXTRA_ARGS = {
    "virtual_batch_size": None,
    "debias": False,
    "unbiased_running_var": False,
    "use_renorm": False,
    "r_max": 3.0,
    "d_max": 5.0,
}


def standard():
    """Flax does not run under strict dtype promotion: both sides of a parity test use this."""
    return jax.numpy_dtype_promotion("standard")


def batches(seed: int) -> Callable[..., jax.Array]:
    """``data(shape, step, dtype, loc, scale)``: a batch with nonzero mean and non-unit
    variance, different at every step, drawn from ``seed``."""

    def data(shape, step, dtype=jnp.float32, loc=2.0, scale=3.0):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return (loc + scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return data


def make_mask(kind, shape):
    if kind is None:
        return None
    if kind == "rows":  # (N, 1, ...): whole examples left out of the statistics
        mask = np.ones((shape[0],) + (1,) * (len(shape) - 1), bool)
        mask[::3] = False
    elif kind == "full":
        mask = np.ones(shape, bool)
    elif kind == "random":  # elementwise; every feature keeps many valid entries
        mask = np.random.default_rng(0).random(shape) < 0.7
    else:
        raise ValueError(kind)
    return jnp.asarray(mask)


def assert_tree_close(actual: Any, expected: Any, tol: float, what: str = "") -> None:
    """The same tree structure and shapes, and leaf by leaf: within ``rtol=tol``, and within
    ``tol`` times the largest entry of that expected leaf (a leaf's near-zero entries, such
    as a derivative's, have no relative scale of their own). ``actual`` is compared in
    float32 or wider, so a bfloat16 result meets a float64 truth."""
    chex.assert_trees_all_equal_structs(actual, expected)
    for index, (a, e) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected),
                                       strict=True)):
        a, e = jnp.asarray(a), np.asarray(e)
        a = np.asarray(a.astype(jnp.float32) if a.dtype.itemsize < 4 else a)
        chex.assert_equal_shape((a, e), custom_message=f"{what}, leaf {index}")
        chex.assert_trees_all_close(a, e, rtol=tol, atol=tol * np.max(np.abs(e), initial=0.0),
                                    custom_message=f"{what}, leaf {index}")


def assert_grads_close(actual: Any, expected: Any, tol: float = GRAD_TOL, what: str = "") -> None:
    """:func:`assert_tree_close` at the gradients' tolerance."""
    assert_tree_close(actual, expected, tol, what)


def assert_close_to_largest(actual: Any, expected: Any, tol: float, what: str,
                            *, same_classes: bool = True) -> None:
    """The same shapes and dtypes, every leaf within ``rtol=tol`` and within ``tol`` times
    the largest entry of the whole expected tree (a gradient that is zero in exact
    arithmetic, such as a bias's before a norm, is rounding noise on both sides, with no
    scale of its own). With ``same_classes=False`` the two trees' leaves are compared in
    order (two models whose BatchNorms are different classes holding the same arrays)."""
    largest = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(expected))
    if not same_classes:
        actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol * largest, strict=True,
                                custom_message=what)


# ------------------------------------------------------------------ synchronized training


def complex_loss(y, cotangent):
    """A real loss of a (complex or real) output, not linear in it: its gradient in a real y is
    ``cotangent + 0.2 * y``."""
    return jnp.sum(jnp.real(y * jnp.conj(cotangent))) + 0.1 * jnp.sum(jnp.abs(y) ** 2)


def synchronized_run(transform, state, mask, split=()):
    """Training synchronized over the axis "batch" of a vmap (4 chunks of the batch) or of a
    shard_map (one chunk per device), as a function of the global ``(x, params)``: the global
    output and each chunk's new state. The ``params`` named in ``split`` are per-example and
    split like ``x``; the others are replicated."""

    def per_device(x, params, mask):
        y, new = jaxbn.batch_norm(x, params, state, training=True, momentum=0.9,
                                  axis_name="batch", mask=mask)
        return y, jax.tree.map(lambda a: a[None], new)

    def specs(params, split_spec, replicated):
        return {key: split_spec if key in split else replicated for key in params}

    if transform == "vmap":
        chunks = 4

        def run(x, params):
            chunk = lambda a: None if a is None else a.reshape(chunks, -1, *a.shape[1:])  # noqa: E731
            split_params = {k: chunk(v) if k in split else v for k, v in params.items()}
            in_axes = (0, specs(params, 0, None), None if mask is None else 0)
            y, new = jax.vmap(per_device, in_axes=in_axes, axis_name="batch")(
                chunk(x), split_params, chunk(mask)
            )
            return y.reshape(x.shape), jax.tree.map(lambda a: a[:, 0], new)

        return run
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Explicit,))

    def run(x, params):
        param_specs = specs(params, P("batch"), P())
        put = lambda a, spec: None if a is None else jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
        x, mask_ = put(x, P("batch")), put(mask, P("batch"))
        params = {k: put(v, param_specs[k]) for k, v in params.items()}
        return jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("batch"), param_specs, P("batch")),
            out_specs=(P("batch"), P("batch")),
        )(x, params, mask_)

    return run


def single_run(state, mask):
    """The same training step on one device and the whole batch."""

    def run(x, params):
        y, new = jaxbn.batch_norm(x, params, state, training=True, momentum=0.9, mask=mask)
        return y, jax.tree.map(lambda a: a[None], new)

    return run


def loss_and_grads(run, x, params, cotangent):
    """``run``'s output and states, and the gradients of :func:`complex_loss` of its output."""

    def loss(x, params):
        y, states = run(x, params)
        return complex_loss(y, cotangent), (y, states)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, states)), grads = grad(x, params)
    return y, states, grads

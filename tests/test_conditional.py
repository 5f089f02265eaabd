"""Conditional batch norm: per-example ``scale`` and ``bias`` (of ``x``'s rank, broadcastable
to it), against the float64 reference, gradients, ghost batches and synchronization included.
"""

from __future__ import annotations

import re

import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import (
    BF16_GRAD_TOL,
    BF16_TOL,
    REF_TOL,
    TOL,
    assert_grads_close,
    batches,
    loss_and_grads,
    make_mask,
    synchronized_run,
)

import jaxbn

data = batches(2468)

CONDITIONAL_LAYOUTS = {
    "NHWC": ((6, 3, 2, 4), -1),  # params (6, 1, 1, 4)
    "NC": ((8, 4), -1),  # params (8, 4)
    "NCHW": ((6, 4, 3, 2), 1),  # params (6, 4, 1, 1)
}
# (scale, bias): per-example, feature-shaped, or of x's rank with size 1 on the batch axis.
PARAM_KINDS = {
    "per-example": ("example", "example"),
    "per-example-scale": ("example", "feature"),
    "per-example-bias": ("feature", "example"),
    "shared-rank-n": ("shared", "shared"),
}


def conditional_params(shape, axis, kinds, dtype=np.float32, seed=0):
    """Random ``{"scale", "bias"}`` of the ``kinds`` of PARAM_KINDS."""
    rng = np.random.default_rng(seed)

    def make(kind, center):
        per_example = ref.per_example_shape(shape, axis)
        param_shape = {
            "feature": ref.feature_shape(shape, axis),
            "example": per_example,
            "shared": (1, *per_example[1:]),
        }[kind]
        return jnp.asarray(center + rng.normal(size=param_shape), dtype)

    return {"scale": make(kinds[0], 1.0), "bias": make(kinds[1], 0.0)}


def _train_with_grads(x, params, dy, **kwargs):
    """One jitted training step from init (momentum 0.9): output, new state, and the
    gradients of ``sum(y * dy)`` with respect to x and params."""
    _, state = jaxbn.init(ref.feature_shape(x.shape, kwargs.get("axis", -1)))

    def loss(x, params):
        y, new = jaxbn.batch_norm(x, params, state, training=True, momentum=0.9, **kwargs)
        return jnp.sum(y.astype(jnp.float32) * dy), (y, new)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, new)), (dx, dparams) = grad(x, params)
    return y, new, (dx, dparams["scale"], dparams["bias"])


@pytest.mark.parametrize("mask_kind", [None, "random"])
@pytest.mark.parametrize("kinds", list(PARAM_KINDS))
@pytest.mark.parametrize("layout", list(CONDITIONAL_LAYOUTS))
def test_conditional_params_match_float64_reference(layout, kinds, mask_kind):
    """Training with per-example scale and bias: the output, the running statistics (those
    of plain batch norm: the parameters do not enter them), the gradients with respect to x,
    scale and bias (of the parameters' shapes), and evaluation."""
    shape, axis = CONDITIONAL_LAYOUTS[layout]
    x, dy = data(shape, 0), data(shape, 1, loc=0.0, scale=1.0)
    params = conditional_params(shape, axis, PARAM_KINDS[kinds])
    scale, bias = params["scale"], params["bias"]
    mask = make_mask(mask_kind, shape)
    y, new, grads = _train_with_grads(x, params, dy, axis=axis, mask=mask)
    expected, mean, var = ref.batch_norm(x, axis, scale, bias, mask)
    y_eval, _ = jaxbn.batch_norm(x, params, new, training=False, axis=axis)
    chex.assert_trees_all_close(
        {"output": y, "mean": new.mean, "var": new.var, "eval": y_eval},
        {"output": expected, "mean": ref.ema(0.0, mean, 0.9), "var": ref.ema(1.0, var, 0.9),
         "eval": ref.normalize(x, new.mean, new.var, axis, scale, bias)},
        **REF_TOL,
    )
    assert_grads_close(grads, ref.grads(x, dy, axis, scale, mask, bias=bias))


def test_conditional_params_shared_by_all_examples_equal_feature_shaped_params():
    """Params of x's rank with size 1 on every reduction axis are the feature-shaped ones."""
    shape, axis = CONDITIONAL_LAYOUTS["NHWC"]
    x, dy = data(shape, 0), data(shape, 1)
    shared = conditional_params(shape, axis, PARAM_KINDS["shared-rank-n"])
    flat = {k: v.reshape(ref.feature_shape(shape, axis)) for k, v in shared.items()}
    y, new, grads = _train_with_grads(x, shared, dy)
    y_flat, new_flat, grads_flat = _train_with_grads(x, flat, dy)
    flat_grads = (grads[0], *(g.reshape(want.shape) for g, want in zip(grads[1:],
                                                                       grads_flat[1:],
                                                                       strict=True)))
    chex.assert_trees_all_close((y, new, flat_grads), (y_flat, new_flat, grads_flat),
                                strict=True, **TOL)


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("kinds", ["per-example", "per-example-scale"])
def test_conditional_params_with_ghost_batches(kinds, mask_kind):
    """Ghost batches of 4: each group normalized with its own statistics, then each example's
    own scale and bias; the gradients against the reference's group by group."""
    shape, axis = (8, 3, 2, 4), -1
    x, dy = data(shape, 0), data(shape, 1, loc=0.0, scale=1.0)
    params = conditional_params(shape, axis, PARAM_KINDS[kinds])
    scale, bias = params["scale"], params["bias"]
    mask = make_mask(mask_kind, shape)
    y, new, grads = _train_with_grads(x, params, dy, mask=mask, virtual_batch_size=4)
    expected, mean, var = ref.ghost_batch_norm(x, 4, axis, mask, scale=scale, bias=bias)
    chex.assert_trees_all_close(
        {"output": y, "mean": new.mean, "var": new.var},
        {"output": expected, "mean": ref.ema(0.0, mean, 0.9), "var": ref.ema(1.0, var, 0.9)},
        **REF_TOL,
    )
    assert_grads_close(grads, ref.ghost_grads(x, dy, 4, axis, scale, mask, bias=bias))


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_conditional_params_in_bfloat16(param_dtype):
    """bfloat16 input (and params): the output keeps x's dtype, each gradient its input's;
    against the float64 reference on the very values jaxbn received, within bfloat16
    rounding."""
    shape, axis = CONDITIONAL_LAYOUTS["NHWC"]
    x, dy = data(shape, 0, jnp.bfloat16), data(shape, 1, loc=0.0, scale=1.0)
    params = conditional_params(shape, axis, PARAM_KINDS["per-example"], param_dtype)
    y, new, grads = _train_with_grads(x, params, dy)
    assert y.dtype == jnp.bfloat16 and new.mean.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16, param_dtype, param_dtype]
    scale, bias = ref.as_float64(params["scale"]), ref.as_float64(params["bias"])
    expected, mean, var = ref.batch_norm(x, axis, scale, bias)
    chex.assert_trees_all_close(ref.as_float64(y), expected, **BF16_TOL)
    chex.assert_trees_all_close(
        (new.mean, new.var), (ref.ema(0.0, mean, 0.9), ref.ema(1.0, var, 0.9)), **REF_TOL
    )
    assert_grads_close(grads, ref.grads(x, dy, axis, scale, bias=bias), BF16_GRAD_TOL)


@pytest.mark.parametrize(
    ("transform", "split"),
    [
        ("vmap", ("scale", "bias")),
        ("vmap", ("scale",)),
        ("shard_map", ("scale", "bias")),
        ("shard_map", ("scale",)),
    ],
    ids=["vmap", "vmap-feature-bias", "shard_map", "shard_map-feature-bias"],
)
def test_conditional_params_synchronized_equal_the_concatenated_batch(transform, split):
    """Per-example params split over the devices with the batch (a feature-shaped bias
    replicated): output and gradients are the float64 reference's on the whole batch."""
    shape, axis = (16, 4), -1
    x, dy = data(shape, 0), data(shape, 1, loc=0.0, scale=1.0)
    kinds = ("example", "example" if "bias" in split else "feature")
    params = conditional_params(shape, axis, kinds)
    scale, bias = params["scale"], params["bias"]
    _, state = jaxbn.init(4)
    mask = make_mask("random", shape)
    run = synchronized_run(transform, state, mask, split)
    y, states, (dx, dparams) = loss_and_grads(run, x, params, dy)
    expected, mean, var = ref.batch_norm(x, axis, scale, bias, mask)
    chex.assert_trees_all_close(
        (y, states.mean, states.var),
        (expected, np.broadcast_to(ref.ema(0.0, mean, 0.9), states.mean.shape),
         np.broadcast_to(ref.ema(1.0, var, 0.9), states.var.shape)),
        **REF_TOL,
    )
    # complex_loss of a real y is sum(y * dy) + 0.1 * sum(y²): its gradient in y is
    # dy + 0.2 * y.
    assert_grads_close((dx, dparams["scale"], dparams["bias"]),
                       ref.grads(x, np.asarray(dy) + 0.2 * expected, axis, scale, mask,
                                 bias=bias))


@pytest.mark.parametrize(
    ("key", "param_shape"),
    [
        ("scale", (6, 4)),  # per-example, but not of x's rank
        ("scale", (6, 2, 1, 4)),  # x's rank, but 2 does not broadcast to x's 3
        ("bias", (5,)),  # another feature size
    ],
)
def test_conditional_param_shape_errors_name_the_param_and_the_accepted_shapes(key, param_shape):
    x = data((6, 3, 2, 4), 0)
    params, state = jaxbn.init(4)
    params = {**params, key: jnp.ones(param_shape)}
    for training in (True, False):
        with pytest.raises(ValueError, match=(
            rf'`params\["{key}"\]` must have the feature shape \(4,\) of `x` along `axis` '
            rf"\(create it with jaxbn.init\(\(4,\)\)\), or, for per-example \(conditional\) "
            rf"parameters, the rank of `x` and a shape that broadcasts to its shape "
            rf"\(6, 3, 2, 4\), such as \(6, 1, 1, 4\); got shape "
            rf"{re.escape(str(param_shape))}\."
        )):
            jaxbn.batch_norm(x, params, state, training=training)


def test_conditional_param_shape_error_suggests_the_feature_axes_whatever_the_sizes():
    x = jnp.ones((8, 4, 4, 4))
    params, state = jaxbn.init(4)
    with pytest.raises(ValueError, match=r"such as \(8, 1, 1, 4\);"):
        jaxbn.batch_norm(x, {**params, "scale": jnp.ones((8, 4))}, state, training=True)



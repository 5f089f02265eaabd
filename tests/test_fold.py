"""Inference folding: conv(x, W') + b' == BN(conv(x, W) + b) in eval mode, within 1e-5.

The truth is a float64 numpy evaluation of the unfolded layer: the (float64) convolution or
matrix product, then ``(y - mean) / sqrt(var + eps) * scale + beta``.
"""

from __future__ import annotations

import _reference as ref
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
import jaxbn.linen

TOL = {"atol": 1e-5, "rtol": 1e-5}


def bn_variables(channels, seed):
    rng = np.random.default_rng(seed)
    params = {
        "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "bias": rng.normal(0, 0.5, channels).astype(np.float32),
    }
    state = jaxbn.BatchStats(
        mean=jnp.asarray(rng.normal(0, 0.5, channels).astype(np.float32)),
        var=jnp.asarray(rng.uniform(0.5, 2.0, channels).astype(np.float32)),
        count=jnp.asarray(3, jnp.int32),
    )
    return params, state


def numpy_bn(y, params, state, eps, axis=-1):
    """Evaluation-mode batch norm of ``y`` in float64: the reference's."""
    scale, bias = (None, None) if params is None else (params["scale"], params["bias"])
    return ref.normalize(y, state.mean, state.var, axis, scale, bias, eps)


def numpy_conv_nchw(x, kernel_oihw, padding):
    """float64 cross-correlation, stride 1, NCHW x OIHW."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2))
    k = np.asarray(kernel_oihw, np.float64)
    o, _, kh, kw = k.shape
    n, _, h, w = x.shape
    out = np.zeros((n, o, h - kh + 1, w - kw + 1))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + out.shape[2], j : j + out.shape[3]]
            out += np.einsum("nchw,oc->nohw", patch, k[:, :, i, j])
    return out


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_dense_with_flax_dense(use_bias, affine):
    dense = nn.Dense(6, use_bias=use_bias)
    x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    variables = dense.init(jax.random.key(0), x)["params"]
    params, state = bn_variables(6, seed=1)
    params = params if affine else None
    kernel, bias = jaxbn.fold_dense(variables["kernel"], variables.get("bias"), params, state)
    folded = nn.Dense(6).apply({"params": {"kernel": kernel, "bias": bias}}, x)
    y64 = np.asarray(x, np.float64) @ np.asarray(variables["kernel"], np.float64)
    if use_bias:
        y64 = y64 + np.asarray(variables["bias"], np.float64)
    np.testing.assert_allclose(folded, numpy_bn(y64, params, state, 1e-5), **TOL)
    assert kernel.dtype == jnp.float32
    chex.assert_shape([kernel, bias], [(5, 6), (6,)])


def test_fold_dense_torch_layout_and_epsilon():
    rng = np.random.default_rng(2)
    kernel_oi = rng.normal(size=(4, 3)).astype(np.float32)  # torch.nn.Linear: [out, in]
    bias = rng.normal(size=4).astype(np.float32)
    params, state = bn_variables(4, seed=3)
    x = rng.normal(size=(7, 3)).astype(np.float32)
    kernel, new_bias = jaxbn.fold_dense(
        kernel_oi, bias, params, state, epsilon=1e-3, kernel_layout="OI"
    )
    y64 = np.asarray(x, np.float64) @ np.asarray(kernel_oi, np.float64).T + bias
    folded = x @ kernel.T + new_bias[None]
    np.testing.assert_allclose(folded, numpy_bn(y64, params, state, 1e-3), **TOL)


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_conv_with_flax_conv_and_linen_batch_norm(groups):
    """flax nn.Conv (NHWC, HWIO) followed by jaxbn.linen.BatchNorm in eval mode."""

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(6, (3, 3), strides=2, feature_group_count=groups, name="conv")(x)
            return jaxbn.linen.BatchNorm(use_running_average=True, name="bn")(x)

    x = np.random.default_rng(4).normal(size=(2, 9, 9, 4)).astype(np.float32)
    model = ConvBN()
    variables = model.init(jax.random.key(0), x)
    params, state = bn_variables(6, seed=5)
    variables = {
        "params": {"conv": variables["params"]["conv"], "bn": params},
        "batch_stats": {"bn": {"mean": state.mean, "var": state.var}},
    }
    expected = model.apply(variables, x)
    conv = variables["params"]["conv"]
    kernel, bias = jaxbn.fold_conv(
        conv["kernel"], conv["bias"], variables["params"]["bn"], variables["batch_stats"]["bn"]
    )
    folded = nn.Conv(6, (3, 3), strides=2, feature_group_count=groups).apply(
        {"params": {"kernel": kernel, "bias": bias}}, x
    )
    np.testing.assert_allclose(folded, expected, **TOL)


@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_conv_nchw_oihw_against_float64(use_bias):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    kernel = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)  # OIHW
    bias = rng.normal(size=5).astype(np.float32) if use_bias else None
    params, state = bn_variables(5, seed=7)
    new_kernel, new_bias = jaxbn.fold_conv(kernel, bias, params, state, kernel_layout="OIHW")
    folded = jax.lax.conv_general_dilated(
        x, new_kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    ) + new_bias.reshape(1, 5, 1, 1)
    y64 = numpy_conv_nchw(x, kernel, padding=1)
    if use_bias:
        y64 = y64 + np.asarray(bias, np.float64).reshape(1, 5, 1, 1)
    np.testing.assert_allclose(folded, numpy_bn(y64, params, state, 1e-5, axis=1), **TOL)
    # and jaxbn's own eval batch norm (axis=1) on the unfolded conv agrees
    unfolded = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    if use_bias:
        unfolded = unfolded + jnp.asarray(bias).reshape(1, 5, 1, 1)
    y, _ = jaxbn.batch_norm(unfolded, params, state, training=False, axis=1)
    np.testing.assert_allclose(folded, y, **TOL)


def test_fold_conv_1d_and_dtype_kept():
    kernel = jnp.ones((3, 2, 4), jnp.bfloat16)  # WIO
    params, state = bn_variables(4, seed=8)
    new_kernel, new_bias = jaxbn.fold_conv(kernel, None, params, state, kernel_layout="WIO")
    assert new_kernel.dtype == jnp.bfloat16 and new_bias.dtype == jnp.bfloat16
    multiplier = ref.as_float64(params["scale"]) * ref.inv_std(state.var, 1e-5)
    np.testing.assert_allclose(
        np.asarray(new_kernel[0, 0], np.float64), multiplier, rtol=1e-2
    )


def test_errors():
    params, state = bn_variables(4, seed=9)
    kernel = jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="`kernel_layout` must name each of the kernel's 4 axes"):
        jaxbn.fold_conv(kernel, None, params, state, kernel_layout="NHWC")
    with pytest.raises(ValueError, match="`kernel_layout` must name each"):
        jaxbn.fold_conv(kernel, None, params, state, kernel_layout="HWI")
    with pytest.raises(ValueError, match="`kernel_layout` must be \"IO\""):
        jaxbn.fold_dense(jnp.ones((2, 4)), None, params, state, kernel_layout="HWIO")
    with pytest.raises(ValueError, match="`kernel` must have one axis per letter"):
        jaxbn.fold_dense(kernel, None, params, state)
    with pytest.raises(ValueError, match=r"`state.mean` must have one entry per output channel"):
        jaxbn.fold_conv(jnp.ones((3, 3, 2, 5)), None, None, state)
    with pytest.raises(ValueError, match=r"`bias` must have one entry per output channel"):
        jaxbn.fold_conv(kernel, jnp.ones(3), params, state)
    with pytest.raises(ValueError, match=r'`params\["scale"\]` must have one entry'):
        jaxbn.fold_dense(jnp.ones((2, 4)), None, {"scale": jnp.ones(2)}, state)
    with pytest.raises(TypeError, match=r"`state` must be a jaxbn\.BatchStats or a mapping"):
        jaxbn.fold_dense(jnp.ones((2, 4)), None, params, (state.mean, state.var))
    with pytest.raises(ValueError, match="`epsilon` must be > 0"):
        jaxbn.fold_dense(jnp.ones((2, 4)), None, params, state, epsilon=0.0)

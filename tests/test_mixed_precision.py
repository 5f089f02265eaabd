"""Mixed precision: a bfloat16 or float16 ``x`` with float32 parameters and a float32 output.

What must hold (docs/mixed-precision.md):

- the output dtype is flax's (``BatchNorm()`` on a bfloat16 input with float32 parameters
  gives float32) in the pure function (``dtype=``) and in the three drop-ins;
- the backward keeps ``x`` itself, in its own dtype, as its only full-size residual: no
  float32 copy (flax keeps two, the contrast that shows the count can see one);
- the result is a float32 computation on the low-precision values: against the float64
  reference evaluated on the same bfloat16/float16 values, with masks, ghost batches,
  statistics synced over a named axis and per-example (conditional) parameters.
"""

from __future__ import annotations

import pathlib
import re

import _reference as ref
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import assert_tree_close, standard
from flax import nnx

import jaxbn
import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx
from experiments.bench.layers import residuals

FEATURES = 4
SHAPE = (16, 3, FEATURES)
MOMENTUM = 0.9
LOW = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
# A float32 computation against float64 on the same inputs: every step rounds to float32
# (6e-8 relative), the sums over 48 entries and the division by σ add a few ulps; measured
# below 1e-6 of the largest entry, allowed 1e-5.
F32_TOL = 1e-5
# dx is written in x's dtype (the cotangent of a bfloat16 x is bfloat16): half an ulp of
# 8 (float16: 11) significant bits, 2e-3 relative; allowed 1e-2 of the largest entry.
LOW_TOL = 1e-2


def _data(dtype, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 1.5, size=shape) + 3 * rng.normal(size=shape[-1])
    return jnp.asarray(x, dtype)


def _params():
    rng = np.random.default_rng(1)
    return {"scale": jnp.asarray(rng.uniform(0.5, 2.0, FEATURES), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=FEATURES), jnp.float32)}


# ------------------------------------------------------------------ the training layers
#
# Each subject: ``(train, params, stats, reference)``, ``train(x, params, stats) -> (y, new)``
# as the bench's residual count takes it, and the framework layer it replaces, built alike.


def _pure(x):
    params, stats = _params(), jaxbn.init(FEATURES)[1]

    def train(x, params, stats):
        return jaxbn.batch_norm(x, params, stats, training=True, momentum=MOMENTUM,
                                dtype=jnp.float32)

    return train, params, stats, None


def _linen(module_cls):
    module = module_cls(use_running_average=False, momentum=MOMENTUM)

    def train(x, params, stats):
        y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                  mutable=["batch_stats"])
        return y, updates["batch_stats"]

    return train


def _linen_subject(x):
    variables = jaxbn.linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    variables = {"params": _params(), "batch_stats": variables["batch_stats"]}
    return (_linen(jaxbn.linen.BatchNorm), variables["params"], variables["batch_stats"],
            _linen(nn.BatchNorm))


def _nnx(module_cls):
    graphdef, state = nnx.split(module_cls(FEATURES, momentum=MOMENTUM, rngs=nnx.Rngs(0)))

    def train(x, params, state):
        module = nnx.merge(graphdef, state, copy=True)
        module.scale[...] = params["scale"]
        module.bias[...] = params["bias"]
        y = module(x, use_running_average=False)
        return y, (module.mean[...], module.var[...])

    return train, state


def _nnx_subject(x):
    train, state = _nnx(jaxbn.nnx.BatchNorm)
    theirs, _ = _nnx(nnx.BatchNorm)
    return train, _params(), state, theirs


def _equinox(module_cls):
    module, state = eqx.nn.make_with_state(module_cls)(FEATURES, "batch", momentum=MOMENTUM,
                                                       mode="batch")
    leaves, treedef = jax.tree.flatten(state)

    def train(x, params, leaves):
        bn = eqx.tree_at(lambda m: (m.weight, m.bias), module, (params["scale"], params["bias"]))
        state = jax.tree.unflatten(treedef, leaves)
        y, new = jax.vmap(lambda e: bn(e, state), axis_name="batch", out_axes=(0, None))(
            jnp.moveaxis(x, -1, 1))
        return jnp.moveaxis(y, 1, -1), jax.tree.leaves(new)

    return train, leaves


def _equinox_subject(x):
    # No counterpart: equinox's own BatchNorm fails on a low-precision x in training
    # (equinox 0.13: its new running variance is bfloat16 where the state holds float32,
    # and eqx.nn.State.set refuses the change of dtype).
    train, leaves = _equinox(jaxbn.equinox.BatchNorm)
    return train, _params(), leaves, None


SUBJECTS = {"pure": _pure, "linen": _linen_subject, "nnx": _nnx_subject,
            "equinox": _equinox_subject}


@pytest.mark.parametrize("low", list(LOW))
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_the_backward_keeps_only_x_in_its_own_dtype(subject, low):
    x = _data(LOW[low])
    train, params, stats, theirs = SUBJECTS[subject](x)
    y, _ = train(x, params, stats)
    assert y.dtype == jnp.float32, (subject, y.dtype)
    kept = residuals(train, x, params, stats)
    full = [dtype for shape, dtype in kept["arrays"] if np.prod(shape) == x.size]
    assert full == [low], (subject, kept["arrays"])  # x itself, and nothing else of its size
    assert kept["over_x"] < 1.5, kept  # x plus per-feature vectors
    if theirs is not None:
        with standard():  # flax and equinox promote bfloat16 with float32
            y_theirs, _ = theirs(x, params, stats)
            their_kept = residuals(theirs, x, params, stats)
        assert y_theirs.dtype == y.dtype  # flax's output dtype, unchanged
        # The contrast: flax and equinox widen x first and keep float32 copies of its size.
        assert any(dtype == "float32" and np.prod(shape) == x.size
                   for shape, dtype in their_kept["arrays"]), their_kept["arrays"]


@pytest.mark.parametrize(
    ("x_dtype", "dtype", "param_dtype"),
    [("bfloat16", None, "float32"), ("bfloat16", "bfloat16", "float32"),
     ("float16", None, "float32"), ("float32", "bfloat16", "float32"),
     ("bfloat16", None, "bfloat16"), ("float16", "float32", "bfloat16")],
)
def test_the_output_dtype_is_flaxs(x_dtype, dtype, param_dtype):
    x = _data(jnp.dtype(x_dtype))
    fields = {"dtype": dtype and jnp.dtype(dtype), "param_dtype": jnp.dtype(param_dtype)}
    for use_running_average in (False, True):
        got = {}
        for name, cls in (("jaxbn", jaxbn.linen.BatchNorm), ("flax", nn.BatchNorm)):
            module = cls(use_running_average=use_running_average, **fields)
            with standard():
                variables = module.init(jax.random.key(0), x)
                got[name] = module.apply(variables, x, mutable=["batch_stats"])[0].dtype
        for name, cls in (("jaxbn.nnx", jaxbn.nnx.BatchNorm), ("flax.nnx", nnx.BatchNorm)):
            module = cls(FEATURES, use_running_average=use_running_average, rngs=nnx.Rngs(0),
                         **fields)
            with standard():
                got[name] = module(x).dtype
        assert got["jaxbn"] == got["flax"] and got["jaxbn.nnx"] == got["flax.nnx"], got


# ------------------------------------------------------------------ accuracy against float64


def _conditional_params(shape):
    rng = np.random.default_rng(2)
    per_example = (shape[0],) + (1,) * (len(shape) - 2) + (FEATURES,)
    return {"scale": jnp.asarray(rng.uniform(0.5, 2.0, per_example), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=per_example), jnp.float32)}


OPTIONS = ("plain", "mask", "ghost", "sync", "conditional")


def _case(option, low):
    """``(x, params, mask, run)``; ``run(x, params, mask)`` gives ``(y, new_state)`` of the
    whole batch, and the float64 truth follows from ``option``."""
    x = _data(LOW[low])
    params = _conditional_params(SHAPE) if option == "conditional" else _params()
    mask = None
    if option == "mask":
        mask = jnp.asarray(np.random.default_rng(3).random(SHAPE) < 0.7).at[0].set(True)
    state = jaxbn.init(FEATURES)[1]
    options = {"virtual_batch_size": 4} if option == "ghost" else {}

    def run(x, params, mask):
        if option != "sync":
            return jaxbn.batch_norm(x, params, state, training=True, momentum=MOMENTUM,
                                    mask=mask, dtype=jnp.float32, **options)
        # 4 "devices" of 4 examples each under vmap, synced over its name.
        devices = x.reshape(4, -1, *x.shape[1:])
        y, new = jax.vmap(
            lambda d: jaxbn.batch_norm(d, params, state, training=True, momentum=MOMENTUM,
                                       axis_name="devices", dtype=jnp.float32),
            axis_name="devices", out_axes=(0, None),
        )(devices)
        return y.reshape(x.shape), new

    return x, params, mask, run


def _truth(option, x, params, mask, dy):
    """float64: the output, the new running mean and variance, and the gradients."""
    x64 = ref.as_float64(x)
    scale, bias = (ref.as_float64(params[k]) for k in ("scale", "bias"))
    if option == "ghost":
        y, mean, var = ref.ghost_batch_norm(x64, 4, -1, None, ref.EPS, scale, bias)
        grads = None  # the ghost gradients are tests/test_variants.py's
    else:
        y, mean, var = ref.batch_norm(x64, -1, scale, bias, mask)
        grads = ref.grads(x64, dy, -1, scale, mask, ref.EPS, bias)
    return y, ref.ema(0.0, mean, MOMENTUM), ref.ema(1.0, var, MOMENTUM), grads


@pytest.mark.parametrize("low", list(LOW))
@pytest.mark.parametrize("option", OPTIONS)
def test_mixed_precision_is_a_float32_computation_on_the_low_precision_values(option, low):
    x, params, mask, run = _case(option, low)
    dy = np.random.default_rng(4).normal(size=SHAPE)

    def loss(x, params):
        y, new = run(x, params, mask)
        return jnp.sum(y * jnp.asarray(dy, jnp.float32)), (y, new)

    (_, (y, new)), (dx, dparams) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
    y_true, mean_true, var_true, grads = _truth(option, x, params, mask, dy)
    assert y.dtype == jnp.float32 and dx.dtype == x.dtype
    what = f"{option}, {low}"
    assert_tree_close((y, new.mean, new.var), (y_true, mean_true, var_true), F32_TOL, what)
    if grads is not None:
        dx_true, dscale_true, dbias_true = grads
        assert_tree_close((dparams["scale"], dparams["bias"]), (dscale_true, dbias_true),
                          F32_TOL, f"dscale, dbias: {what}")
        assert_tree_close(dx, dx_true, LOW_TOL, f"dx: {what}")


@pytest.mark.parametrize("subject", ["linen", "nnx", "equinox"])
def test_the_drop_ins_are_float32_computations_on_bfloat16_values(subject):
    x = _data(jnp.bfloat16)
    train, params, stats, _ = SUBJECTS[subject](x)
    y, _ = jax.jit(train)(x, params, stats)
    y_true, _, _ = ref.batch_norm(ref.as_float64(x), -1,
                                  np.asarray(params["scale"]), np.asarray(params["bias"]))
    assert y.dtype == jnp.float32
    assert_tree_close(y, y_true, F32_TOL, subject)


def test_an_output_dtype_that_is_not_floating_is_rejected():
    x = _data(jnp.bfloat16)
    params, state = jaxbn.init(FEATURES)
    with pytest.raises(TypeError, match=r"`dtype` \(the output's\) must be None .* got .*int32"):
        jaxbn.batch_norm(x, params, state, training=True, dtype=jnp.int32)


def test_the_guide_example_runs_and_keeps_only_x():
    guide = pathlib.Path(__file__).resolve().parents[1] / "docs" / "mixed-precision.md"
    (block,) = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.DOTALL)
    namespace: dict = {}
    with standard():
        exec(compile(block, str(guide), "exec"), namespace)  # its asserts are the claims
    assert namespace["y"].dtype == jnp.float32 and namespace["y16"].dtype == jnp.bfloat16

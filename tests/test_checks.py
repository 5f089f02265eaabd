"""Every bad input raises a clear error that names the argument, eagerly and at trace time."""

from __future__ import annotations

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import interop

C = 3


def _args(**overrides):
    """Valid arguments for a (4, 5, 3) NHWC-like input, with some replaced."""
    params, state = jaxbn.init(C)
    args = {
        "x": jnp.ones((4, 5, C), jnp.float32),
        "params": params,
        "state": state,
        "training": True,
    }
    args.update(overrides)
    return args


def _call(**overrides):
    args = _args(**overrides)
    return jaxbn.batch_norm(args.pop("x"), args.pop("params"), args.pop("state"), **args)


def _with_params(**entries):
    params, _ = jaxbn.init(C)
    return {**params, **entries}


def _with_state(**fields):
    _, state = jaxbn.init(C)
    return state._replace(**fields)


# (overrides, exception type, regex the message must match). Each regex names the argument in
# backticks and, where it makes sense, the value that was given.
BAD_INPUTS = {
    "training=None": ({"training": None}, TypeError, r"`training`.*NoneType None"),
    "training=jnp-array": ({"training": jnp.array(True)}, TypeError, r"`training`.*static"),
    "training=int": ({"training": 1}, TypeError, r"`training`.*int 1"),
    "x-int32": ({"x": jnp.ones((4, 5, C), jnp.int32)}, TypeError, r"`x`.*int32"),
    "x-bool": ({"x": jnp.ones((4, 5, C), jnp.bool_)}, TypeError, r"`x`.*bool"),
    "params-scale-size": (
        {"params": _with_params(scale=jnp.ones(C + 1))},
        ValueError,
        r'`params\["scale"\]`.*\(3,\).*got shape \(4,\)',
    ),
    "params-bias-size": (
        {"params": _with_params(bias=jnp.zeros((1, C)))},
        ValueError,
        r'`params\["bias"\]`.*\(3,\).*got shape \(1, 3\)',
    ),
    "state-mean-size": (
        {"state": _with_state(mean=jnp.zeros(C + 2))},
        ValueError,
        r"`state\.mean`.*\(3,\).*got shape \(5,\)",
    ),
    "state-var-size": (
        {"state": _with_state(var=jnp.ones(C - 1))},
        ValueError,
        r"`state\.var`.*\(3,\).*got shape \(2,\)",
    ),
    "axis=3-out-of-range": ({"axis": 3}, ValueError, r"`axis`.*\[-3, 3\).*got 3"),
    "axis=-4-out-of-range": ({"axis": -4}, ValueError, r"`axis`.*\[-3, 3\).*got -4"),
    "axis-tuple-out-of-range": ({"axis": (1, 5)}, ValueError, r"`axis`.*got \(1, 5\)"),
    "axis-repeated": ({"axis": (1, -2)}, ValueError, r"`axis`.*twice.*\(1, -2\)"),
    "axis=1.0": ({"axis": 1.0}, TypeError, r"`axis`.*got 1\.0"),
    "axis='a'": ({"axis": "a"}, TypeError, r"`axis`.*got 'a'"),
    "axis=True": ({"axis": True}, TypeError, r"`axis`.*got True"),
    "axis=()": ({"axis": ()}, TypeError, r"`axis`.*got \(\)"),
    "axis=None": ({"axis": None}, TypeError, r"`axis`.*got None"),
    "momentum=1.0": ({"momentum": 1.0}, ValueError, r"`momentum`.*\[0, 1\).*got 1\.0"),
    "momentum=-0.1": ({"momentum": -0.1}, ValueError, r"`momentum`.*got -0\.1"),
    "momentum=1.5": ({"momentum": 1.5}, ValueError, r"`momentum`.*got 1\.5"),
    "epsilon=0": ({"epsilon": 0}, ValueError, r"`epsilon`.*> 0.*got 0"),
    "epsilon=-1": ({"epsilon": -1.0}, ValueError, r"`epsilon`.*got -1\.0"),
    "mask-not-broadcastable": (
        {"mask": jnp.ones((4, 5, 2), jnp.bool_)},
        ValueError,
        r"`mask`.*\(4, 5, 3\).*got shape \(4, 5, 2\)",
    ),
    "mask-broadcasts-larger": (
        {"mask": jnp.ones((2, 4, 5, C), jnp.bool_)},
        ValueError,
        r"`mask`.*got shape \(2, 4, 5, 3\)",
    ),
    "mask-int": ({"mask": jnp.ones((4, 1, 1), jnp.int32)}, TypeError, r"`mask`.*int32"),
    "mask-float": ({"mask": jnp.ones((4, 5, C), jnp.float32)}, TypeError, r"`mask`.*float32"),
    "state-dict": (
        {"state": {"mean": jnp.zeros(C), "var": jnp.ones(C), "count": jnp.zeros((), jnp.int32)}},
        TypeError,
        r"`state`.*BatchStats.*got dict",
    ),
    "params-unknown-key": (
        {"params": _with_params(offset=jnp.zeros(C))},
        ValueError,
        r"`params`.*\['offset'\]",
    ),
    "axis_index_groups-without-axis_name": (
        {"axis_index_groups": [[0, 1], [2, 3]]},
        ValueError,
        r"`axis_index_groups`.*`axis_name`",
    ),
    # Hyperparameters are real scalars; concrete arrays are range-checked like numbers.
    "momentum-concrete-0d-array=1.5": (
        {"momentum": jnp.array(1.5)},
        ValueError,
        r"`momentum`.*\[0, 1\).*got Array\(1\.5",
    ),
    "momentum-feature-vector": (
        {"momentum": jnp.full(C, 1.5)},
        TypeError,
        r"`momentum`.*real scalar.*got an array of shape \(3,\)",
    ),
    "momentum-wrong-shape-vector": (
        {"momentum": jnp.full(C + 1, 0.5)},
        TypeError,
        r"`momentum`.*real scalar.*got an array of shape \(4,\)",
    ),
    "momentum-int-array": (
        {"momentum": jnp.array(0, jnp.int32)},
        TypeError,
        r"`momentum`.*floating.*shape \(\) and dtype int32",
    ),
    "momentum=False": ({"momentum": False}, TypeError, r"`momentum`.*got bool False"),
    "momentum='0.9'": ({"momentum": "0.9"}, TypeError, r"`momentum`.*got str '0\.9'"),
    "epsilon-concrete-0d-array=-1": (
        {"epsilon": np.float32(-1.0)},
        ValueError,
        r"`epsilon`.*> 0.*got np\.float32\(-1\.0\)",
    ),
    "epsilon-feature-vector": (
        {"epsilon": jnp.full(C, -1.0)},
        TypeError,
        r"`epsilon`.*real scalar.*got an array of shape \(3,\)",
    ),
    "epsilon-wrong-shape-vector": (
        {"epsilon": jnp.full((2, C), 1e-5)},
        TypeError,
        r"`epsilon`.*real scalar.*got an array of shape \(2, 3\)",
    ),
    "epsilon=None": ({"epsilon": None}, TypeError, r"`epsilon`.*got NoneType None"),
    "epsilon='1e-5'": ({"epsilon": "1e-5"}, TypeError, r"`epsilon`.*got str '1e-5'"),
    "epsilon=True": ({"epsilon": True}, TypeError, r"`epsilon`.*got bool True"),
    "epsilon=nan": ({"epsilon": float("nan")}, ValueError, r"`epsilon`.*> 0.*got nan"),
    "x='abc'": ({"x": "abc"}, TypeError, r"`x`.*array.*got str 'abc'"),
    "x=None": ({"x": None}, TypeError, r"`x`.*array.*got NoneType None"),
    "x-ragged-list": ({"x": [[1.0, 2.0, 3.0], [1.0]]}, TypeError, r"`x`.*got list"),
    "mask-list": ({"mask": [[[True] * C] * 5] * 4}, TypeError, r"`mask`.*bool array.*got list"),
    "state-count=None": (
        {"state": _with_state(count=None)},
        TypeError,
        r"`state\.count`.*0-d integer.*got NoneType None",
    ),
    "state-count-float": (
        {"state": _with_state(count=jnp.zeros((), jnp.float32))},
        TypeError,
        r"`state\.count`.*got an array of shape \(\) and dtype float32",
    ),
    "state-count-shaped": (
        {"state": _with_state(count=jnp.zeros((C,), jnp.int32))},
        TypeError,
        r"`state\.count`.*got an array of shape \(3,\) and dtype int32",
    ),
    "state-count-python-int": (
        {"state": _with_state(count=0)},
        TypeError,
        r"`state\.count`.*got int 0",
    ),
    "state-mean-int": (
        {"state": _with_state(mean=jnp.zeros(C, jnp.int32))},
        TypeError,
        r"`state\.mean`.*float32 or wider.*got int32",
    ),
    "every-axis-a-feature": (
        {
            "x": jnp.ones((4, C), jnp.float32),
            "axis": (0, 1),
            "params": None,
            "state": jaxbn.init((4, C))[1],
        },
        ValueError,
        r"`axis`.*every axis.*`axis_name`",
    ),
}


@pytest.mark.parametrize(
    ("overrides", "error", "match"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS)
)
def test_bad_input_raises(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


# Errors that a jitted caller gets when tracing: the static configuration is closed over
# (`training`, `axis`, `momentum`, `epsilon`) and the arrays are traced arguments.
TRACE_TIME = [
    "x-int32",
    "x-bool",
    "params-scale-size",
    "params-bias-size",
    "state-mean-size",
    "state-var-size",
    "axis=3-out-of-range",
    "axis-repeated",
    "axis=1.0",
    "momentum=1.0",
    "epsilon=0",
    "mask-not-broadcastable",
    "mask-int",
    "params-unknown-key",
    "axis_index_groups-without-axis_name",
    "every-axis-a-feature",
    "momentum-feature-vector",
    "epsilon-feature-vector",
    "state-count-float",
    "state-count-shaped",
]


@pytest.mark.parametrize("case", TRACE_TIME)
def test_bad_input_raises_at_trace_time_under_jit(case):
    overrides, error, match = BAD_INPUTS[case]
    args = _args(**overrides)
    arrays = {k: args.pop(k) for k in ("x", "params", "state", "mask") if k in args}
    calls = []

    def f(arrays):
        calls.append(None)
        return jaxbn.batch_norm(
            arrays["x"], arrays["params"], arrays["state"], mask=arrays.get("mask"), **args
        )

    with pytest.raises(error, match=match):
        jax.jit(f).trace(arrays)  # raised while tracing: nothing is compiled or run
    with pytest.raises(error, match=match):
        jax.jit(f)(arrays)
    assert len(calls) == 2


def test_traced_mask_is_checked_too():
    # Guard against the check above passing only because the mask was concrete.
    with pytest.raises(TypeError, match=r"`mask`"):
        jax.jit(lambda m: _call(mask=m))(jnp.ones((4, 1, 1), jnp.int32))
    y, _ = jax.jit(lambda m: _call(mask=m))(jnp.ones((4, 1, 1), jnp.bool_))
    chex.assert_shape(y, (4, 5, C))


def test_traced_hyperparameters_are_shape_checked_but_not_range_checked():
    # A traced momentum or epsilon has no value at trace time: its shape and dtype are
    # checked, its range is the caller's (the docstring says so).
    step = jax.jit(lambda momentum, epsilon: _call(momentum=momentum, epsilon=epsilon))
    with pytest.raises(TypeError, match=r"`momentum`.*got an array of shape \(3,\)"):
        step(jnp.full(C, 0.5), jnp.array(1e-3))
    with pytest.raises(TypeError, match=r"`epsilon`.*got an array of shape \(3,\)"):
        step(jnp.array(0.5), jnp.full(C, 1e-3))
    # x is all ones: batch mean 1, variance 0, so the EMA gives 0.5·0 + 0.5·1 and 0.5·1 + 0.
    _, state = step(jnp.array(0.5), jnp.array(1e-3))
    np.testing.assert_allclose(state.mean, 0.5)
    np.testing.assert_allclose(state.var, 0.5)


# axis_index_groups against the size of a bound axis (4 here): each row a bad partition.
BAD_GROUPS = {
    "index-twice": (
        [[0, 1], [1, 2]],
        ValueError,
        r"`axis_index_groups`.*got \[\[0, 1\], \[1, 2\]\].*more than one.*\[1\]",
    ),
    "out-of-range": (
        [[0, 1], [2, 5]],
        ValueError,
        r"`axis_index_groups`.*4 indices.*outside \[0, 4\): \[5\]",
    ),
    "not-covering": (
        [[0, 1]],
        ValueError,
        r"`axis_index_groups`.*got \[\[0, 1\]\].*in no group: \[2, 3\]",
    ),
    "unequal-sizes": (
        [[0, 1, 2], [3]],
        ValueError,
        r"`axis_index_groups`.*equal-size.*got \[\[0, 1, 2\], \[3\]\]",
    ),
    "empty": ([], ValueError, r"`axis_index_groups`.*non-empty.*got \[\]"),
    "bool-index": ([[True, 1], [2, 3]], TypeError, r"`axis_index_groups`.*ints.*got \[\[True, 1\]"),
    "float-index": (
        [[0, 1], [2, 3.0]],
        TypeError,
        r"`axis_index_groups`.*ints.*got \[\[0, 1\], \[2, 3\.0\]\]",
    ),
    "not-nested": ([0, 1, 2, 3], TypeError, r"`axis_index_groups`.*lists.*got \[0, 1, 2, 3\]"),
    "string": ("0123", TypeError, r"`axis_index_groups`.*got '0123'"),
}


@pytest.mark.parametrize(
    ("groups", "error", "match"), list(BAD_GROUPS.values()), ids=list(BAD_GROUPS)
)
def test_bad_axis_index_groups_raise_naming_the_axis_size(groups, error, match):
    x = jnp.ones((4, 2, C))
    with pytest.raises(error, match=match):
        jax.vmap(
            lambda xs: _call(x=xs, axis_name="batch", axis_index_groups=groups),
            axis_name="batch",
        )(x)


def test_axis_index_groups_that_miss_a_device_raise_ours_under_pmap_not_an_xla_crash():
    # Regression: [[0, 1]] over 4 devices reached XLA, which failed a RET_CHECK with a C++
    # stack. The valid partition runs, so the check is not what fails.
    x = jnp.ones((4, 2, C))

    def run(groups):
        return jax.pmap(
            lambda xs: _call(x=xs, axis_name="batch", axis_index_groups=groups)[0],
            axis_name="batch",
            devices=jax.devices()[:4],
        )(x)

    with pytest.raises(ValueError, match=r"`axis_index_groups`.*in no group: \[2, 3\]"):
        run([[0, 1]])
    assert run([[0, 1], [2, 3]]).shape == x.shape


@pytest.mark.parametrize("axis_name", ["batch", ("data", "model")])
def test_unbound_axis_name_raises_a_name_error_that_says_how_to_bind_it(axis_name):
    with pytest.raises(NameError, match=r"`axis_name`") as info:
        _call(axis_name=axis_name)
    message = str(info.value)
    for transform in ("shard_map", "pmap", "vmap"):
        assert transform in message, message


def test_unbound_axis_name_raises_at_trace_time_under_jit():
    with pytest.raises(NameError, match=r"`axis_name` 'batch'.*shard_map.*pmap.*vmap"):
        jax.jit(lambda x: _call(x=x, axis_name="batch"))(jnp.ones((4, 5, C)))


def test_bound_axis_name_is_accepted():
    # The counterpart of the unbound case: inside vmap(axis_name=...) the same call works.
    x = jnp.ones((2, 4, 5, C))
    y, _ = jax.vmap(lambda xs: _call(x=xs, axis_name="batch"), axis_name="batch")(x)
    assert y.shape == x.shape


def test_eval_does_not_require_a_bound_axis_name():
    # axis_name only matters for batch statistics; eval mode never synchronizes.
    y, _ = _call(training=False, axis_name="batch")
    np.testing.assert_allclose(np.asarray(y), np.ones((4, 5, C)) / np.sqrt(1 + 1e-5), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# jaxbn.init
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feature_shape", "error", "match"),
    [
        (0, ValueError, r"`feature_shape`.*positive.*\(0,\)"),
        (-3, ValueError, r"`feature_shape`.*positive.*\(-3,\)"),
        ((4, 0), ValueError, r"`feature_shape`.*positive.*\(4, 0\)"),
        ("a", TypeError, r"`feature_shape`.*got 'a'"),
        (2.0, TypeError, r"`feature_shape`.*got 2\.0"),
        ((2, "b"), TypeError, r"`feature_shape`.*got \(2, 'b'\)"),
        (True, TypeError, r"`feature_shape`.*got True"),
        ((2, True), TypeError, r"`feature_shape`.*got \(2, True\)"),
    ],
    ids=["0", "-3", "(4,0)", "'a'", "2.0", "(2,'b')", "True", "(2,True)"],
)
def test_init_rejects_bad_feature_shape(feature_shape, error, match):
    with pytest.raises(error, match=match):
        jaxbn.init(feature_shape)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, np.uint8], ids=["int32", "bool", "uint8"])
def test_init_rejects_non_floating_dtype(dtype):
    with pytest.raises(TypeError, match=r"`dtype`.*floating.*got " + np.dtype(dtype).name):
        jaxbn.init(3, dtype)


@pytest.mark.parametrize(
    ("dtype", "match"),
    [("nope", r"`dtype`.*got str 'nope', which is no dtype"), (3.5, r"`dtype`.*got float 3\.5")],
    ids=["'nope'", "3.5"],
)
def test_init_rejects_what_is_no_dtype(dtype, match):
    with pytest.raises(TypeError, match=match):
        jaxbn.init(3, dtype)


def test_init_errors_raise_under_eval_shape():
    with pytest.raises(ValueError, match=r"`feature_shape`"):
        jax.eval_shape(functools.partial(jaxbn.init, 0))


# ----------------------------------------------------------------------------------------------
# The other public functions: one row per bad input, (call, exception type, regex).
# ----------------------------------------------------------------------------------------------


def _torch_module():
    torch = pytest.importorskip("torch")
    return torch.nn.BatchNorm1d(C)


def _accumulator():
    _, state = jaxbn.init(C)
    return jaxbn.recalibration_init(state)


BAD_CALLS = {
    "from_torch-given-the-module": (
        lambda: interop.from_torch(_torch_module()),
        TypeError,
        r"`state_dict`.*mapping.*got BatchNorm1d.*from_torch\(module\.state_dict\(\)\)",
    ),
    "from_torch-None": (
        lambda: interop.from_torch(None),
        TypeError,
        r"`state_dict`.*mapping.*got NoneType",
    ),
    "recalibration_update-given-BatchStats": (
        lambda: jaxbn.recalibration_update(jaxbn.init(C)[1], jaxbn.init(C)[1], 4),
        TypeError,
        r"`acc`.*RecalibrationState.*got BatchStats.*recalibration_init",
    ),
    "recalibration_result-given-BatchStats": (
        lambda: jaxbn.recalibration_result(jaxbn.init(C)[1]),
        TypeError,
        r"`acc`.*RecalibrationState.*got BatchStats",
    ),
    "recalibration_update-given-pooled": (
        lambda: jaxbn.recalibration_update(_accumulator().pooled, jaxbn.init(C)[1], 4),
        TypeError,
        r"`acc`.*got PooledStats",
    ),
    "fold_dense-epsilon-vector": (
        lambda: jaxbn.fold_dense(
            jnp.ones((2, C)), None, None, jaxbn.init(C)[1], epsilon=jnp.full(C, 1e-5)
        ),
        TypeError,
        r"`epsilon`.*real scalar.*shape \(3,\)",
    ),
}


@pytest.mark.parametrize(("call", "error", "match"), list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_call_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Inputs that get the correct result (promoted or skipped) rather than an error, each checked
# against a peer or a float64 closed form.
# ----------------------------------------------------------------------------------------------


def _data(shape, seed=0):
    return np.asarray(1.5 + jax.random.normal(jax.random.key(seed), shape), np.float32)


def test_linen_integer_batch_stats_are_promoted_as_flax_linen_promotes_them():
    # Regression: jaxbn.linen cast the new statistics to the stored int32 (mean [1 1 1],
    # var [0 0 0]); flax.linen stores the float32 result.
    import flax.linen as nn

    import jaxbn.linen

    x = _data((6, C))
    integer = {"mean": jnp.array([0, 1, 2], jnp.int32), "var": jnp.array([1, 2, 3], jnp.int32)}

    def run(module):
        variables = module(use_running_average=False).init(jax.random.key(0), x)
        variables = {"params": variables["params"], "batch_stats": integer}
        y, updates = module(use_running_average=False, momentum=0.9).apply(
            variables, x, mutable=["batch_stats"]
        )
        return y, updates["batch_stats"], module(use_running_average=True).apply(variables, x)

    with jax.numpy_dtype_promotion("standard"):  # flax multiplies int32 by a float
        y_flax, stats_flax, eval_flax = run(nn.BatchNorm)
    y, stats, y_eval = run(jaxbn.linen.BatchNorm)  # under the tests' strict promotion
    chex.assert_type(jax.tree.leaves(stats), jnp.float32)
    chex.assert_trees_all_close(stats, stats_flax, rtol=1e-5, atol=1e-6, strict=True)
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_eval, eval_flax, rtol=1e-6, atol=1e-6)


def test_nnx_integer_batch_stats_are_promoted_not_truncated():
    # flax.nnx truncates them into the int32 variable (and JAX warns that this will become
    # an error); jaxbn.nnx stores the float32 result, as flax.linen does. The truth is
    # flax.nnx given the same values as float32.
    from flax import nnx

    import jaxbn.nnx

    x = _data((6, C), seed=1)
    peer = nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))
    peer.mean.set_value(jnp.array([0.0, 1.0, 2.0]))
    peer.var.set_value(jnp.array([1.0, 2.0, 3.0]))
    ours = jaxbn.nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))
    ours.mean.set_value(jnp.array([0, 1, 2], jnp.int32))
    ours.var.set_value(jnp.array([1, 2, 3], jnp.int32))
    np.testing.assert_allclose(ours(x, use_running_average=True), peer(x, True), rtol=1e-6)
    y, y_peer = ours(x, use_running_average=False), peer(x, use_running_average=False)
    np.testing.assert_allclose(y, y_peer, rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
        value, truth = getattr(ours, name)[...], getattr(peer, name)[...]
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["dense-IO", "conv-HWIO"])
@pytest.mark.parametrize("bias_kind", ["int32", "float32", "none"])
def test_fold_promotes_an_integer_kernel_and_bias(layout, bias_kind):
    # Regression: an int32 kernel came back all zeros and an int32 bias truncated.
    rng = np.random.default_rng(0)
    shape = (4, C) if layout == "dense-IO" else (3, 3, 2, C)
    kernel = rng.integers(-5, 6, shape).astype(np.int32)
    bias = {"int32": np.array([1, -2, 3], np.int32), "float32": np.array([0.5, -1, 2], np.float32)}
    bias = bias.get(bias_kind)
    params = {"scale": np.array([1.5, -0.5, 2.0], np.float32), "bias": np.zeros(C, np.float32)}
    state = jaxbn.BatchStats(
        mean=jnp.array([1.0, -1.0, 0.25]), var=jnp.array([4.0, 0.25, 9.0]), count=jnp.array(3)
    )
    fold = jaxbn.fold_dense if layout == "dense-IO" else jaxbn.fold_conv
    new_kernel, new_bias = fold(kernel, bias, params, state)
    multiplier = params["scale"] / np.sqrt(np.asarray(state.var, np.float64) + 1e-5)
    old_bias = np.zeros(C) if bias is None else bias.astype(np.float64)
    assert new_kernel.dtype == new_bias.dtype == jnp.float32
    np.testing.assert_allclose(new_kernel, kernel * multiplier, rtol=1e-6)
    np.testing.assert_allclose(
        new_bias, (old_bias - np.asarray(state.mean)) * multiplier, rtol=1e-6, atol=1e-6
    )


def _recalibration_batches():
    """Three batches, the middle one with a NaN in feature 0: the population of the others."""
    good = [_data((16, C), seed=s) * 3 for s in (2, 3)]
    bad = good[1].copy()
    bad[0, 0] = np.nan
    return [good[0], bad, good[1]], np.concatenate(good).astype(np.float64)


RECALIBRATION_LAYERS = {
    # The recipe of recalibrate's docstring: batch_norm rejects the NaN batch, its count does
    # not advance.
    "BatchStats": lambda state: (
        lambda x: (
            jaxbn.batch_norm(x, None, state, training=True, momentum=0.0)[1],
            x.shape[0],
        )
    ),
    # A statistics mapping without count (jaxbn.linen's batch_stats): the rejected batch's
    # statistics come back unchanged.
    "mapping-without-count": lambda state: (
        lambda x: (
            dict(
                mean=(new := jaxbn.batch_norm(x, None, state, training=True, momentum=0.0)[1]).mean,
                var=new.var,
            ),
            x.shape[0],
        )
    ),
}


@pytest.mark.parametrize("layer", list(RECALIBRATION_LAYERS))
def test_recalibrate_skips_a_batch_the_layer_rejected_and_names_it(layer):
    # Regression: the NaN batch's unchanged state (mean 0, var 1) was pooled as data.
    _, state = jaxbn.init(C)
    stats = state if layer == "BatchStats" else {"mean": state.mean, "var": state.var}
    batches, population = _recalibration_batches()
    fn = RECALIBRATION_LAYERS[layer](state)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 3 batches.*batch 1 at the root"):
        precise = jaxbn.recalibrate(fn, batches, stats)
    mean, var = (
        (precise.mean, precise.var) if layer == "BatchStats" else (precise["mean"], precise["var"])
    )
    np.testing.assert_allclose(mean, population.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, population.var(0), rtol=1e-5)
    if layer == "BatchStats":
        assert int(precise.count) == 2


def test_recalibrate_skips_the_non_finite_features_of_a_layer_that_does_not_reject():
    # A layer that returns whatever it computed (flax's BatchNorm): the NaN feature of the
    # middle batch is left out there, its other features are pooled.
    _, state = jaxbn.init(C)
    batches, population = _recalibration_batches()
    everything = np.concatenate(batches).astype(np.float64)

    def fn(x):
        return {"mean": jnp.mean(x, 0), "var": jnp.var(x, 0)}, x.shape[0]

    stats = {"bn": {"mean": state.mean, "var": state.var}}
    with pytest.warns(RuntimeWarning, match=r"batch 1 at \['bn'\]"):
        precise = jaxbn.recalibrate(lambda x: ({"bn": fn(x)[0]}, x.shape[0]), batches, stats)
    np.testing.assert_allclose(precise["bn"]["mean"][0], population[:, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(precise["bn"]["var"][0], population[:, 0].var(), rtol=1e-5)
    np.testing.assert_allclose(precise["bn"]["mean"][1:], everything[:, 1:].mean(0), rtol=1e-5)
    np.testing.assert_allclose(precise["bn"]["var"][1:], everything[:, 1:].var(0), rtol=1e-5)


def test_recalibrate_warns_about_nothing_when_every_batch_is_data():
    _, state = jaxbn.init(C)
    batches = [_data((8, C), seed=s) for s in (4, 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxbn.recalibrate(RECALIBRATION_LAYERS["BatchStats"](state), batches, state)

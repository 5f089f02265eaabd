"""``jaxbn.linen.BatchNorm`` against the real ``flax.linen.BatchNorm``.

The drop-in must match flax's fields, call signature, variables and numbers, so every test
here runs both modules on the same input and compares. Flax itself does not run under the
strict dtype promotion that conftest.py sets, so flax calls are wrapped in
``jax.numpy_dtype_promotion("standard")``. The parity tests wrap jaxbn the same way, so
that they compare numerics under identical promotion rules; that jaxbn also works under
strict promotion is its own test (``test_works_under_strict_promotion``).
"""

from __future__ import annotations

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import BF16_TOL, TOL, assert_close, batches, make_mask, standard

import jaxbn.linen

FlaxBN = nn.BatchNorm
JaxbnBN = jaxbn.linen.BatchNorm

ROW_SHAPE = (16, 6)  # (N, C), feature axis -1
NCHW_SHAPE = (4, 3, 2, 5)  # feature axis 1, or axes (1, 2)
SHAPE_FOR_AXIS = {-1: ROW_SHAPE, 1: NCHW_SHAPE, (1, 2): NCHW_SHAPE}
STEPS = 3

data = batches(1234)


def assert_trees_close(actual, expected, tol=TOL):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert_close(a, e, tol)


def run(module, variables, xs, masks, x_eval):
    """Trains on ``xs`` (one apply per batch), then evaluates on ``x_eval``.

    Returns the training outputs, the batch_stats after each step and the eval output.
    """
    ys, stats = [], []
    for x, mask in zip(xs, masks, strict=True):
        y, updates = module.apply(
            variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
        )
        variables = {**variables, **updates}
        ys.append(y)
        stats.append(updates["batch_stats"])
    y_eval = module.apply(variables, x_eval, use_running_average=True)
    return ys, stats, y_eval, variables


def check_parity(kwargs, *, axis=-1, mask_kind=None, x_dtype=jnp.float32, tol=TOL, **data_kw):
    shape = SHAPE_FOR_AXIS[axis]
    flax_kwargs = {"use_fast_variance": False, **kwargs}
    flax_module = FlaxBN(axis=axis, **flax_kwargs)
    jaxbn_module = JaxbnBN(axis=axis, **kwargs)
    xs = [data(shape, step, x_dtype, **data_kw) for step in range(STEPS)]
    masks = [make_mask(mask_kind, shape)] * STEPS
    x_eval = data(shape, 99, x_dtype, **data_kw)
    key = jax.random.key(7)
    with standard():
        flax_vars = flax_module.init(key, xs[0], use_running_average=False)
        jaxbn_vars = jaxbn_module.init(key, xs[0], use_running_average=False)
        # Same initial variables (initializers, shapes, dtypes): compared exactly.
        assert_trees_close(jaxbn_vars, flax_vars, {"atol": 0, "rtol": 0})
        flax_out = run(flax_module, flax_vars, xs, masks, x_eval)
        jaxbn_out = run(jaxbn_module, jaxbn_vars, xs, masks, x_eval)
    for step in range(STEPS):
        assert_close(jaxbn_out[0][step], flax_out[0][step], tol)
        # Statistics are float32 whatever the input dtype, in both: always the tight tolerance.
        assert_trees_close(jaxbn_out[1][step], flax_out[1][step])
    assert_close(jaxbn_out[2], flax_out[2], tol)


# ---------------------------------------------------------------- interface


# jaxbn's own fields, appended after flax's, with defaults that give plain batch norm.
EXTRA_FIELDS = {
    "virtual_batch_size": None,
    "debias": False,
    "unbiased_running_var": False,
    "use_renorm": False,
    "r_max": 3.0,
    "d_max": 5.0,
}


def test_flax_fields_are_an_ordered_prefix_of_ours_with_the_same_defaults():
    # The constructor: flax's parameters (its trailing `parent` and `name` included) come
    # first, in flax's order and kinds, so positional construction means the same; ours
    # follow, keyword-only.
    ours_init = inspect.signature(JaxbnBN.__init__).parameters
    theirs_init = inspect.signature(FlaxBN.__init__).parameters
    assert list(ours_init)[: len(theirs_init)] == list(theirs_init)
    assert list(ours_init)[len(theirs_init) :] == list(EXTRA_FIELDS)
    for name, param in theirs_init.items():
        assert ours_init[name].kind == param.kind, name
    # The dataclass fields: flax's, in flax's order, with flax's defaults, plus ours.
    flax_fields = dataclasses.fields(FlaxBN)
    jaxbn_fields = [f for f in dataclasses.fields(JaxbnBN) if f.name not in EXTRA_FIELDS]
    assert [f.name for f in jaxbn_fields] == [f.name for f in flax_fields]
    for ours, theirs in zip(jaxbn_fields, flax_fields, strict=True):
        assert (ours.init, ours.kw_only) == (theirs.init, theirs.kw_only), ours.name
        assert (ours.default_factory is dataclasses.MISSING) == (
            theirs.default_factory is dataclasses.MISSING
        ), ours.name
        if ours.name in ("scale_init", "bias_init"):
            # Initializers compare by what they produce.
            key = jax.random.key(0)
            for shape, dtype in [((3,), jnp.float32), ((2, 4), jnp.bfloat16)]:
                assert_close(
                    ours.default(key, shape, dtype),
                    theirs.default(key, shape, dtype),
                    {"atol": 0, "rtol": 0},
                )
        else:
            assert ours.default == theirs.default, ours.name
    extra_fields = [f for f in dataclasses.fields(JaxbnBN) if f.name in EXTRA_FIELDS]
    for field in extra_fields:
        assert field.init and field.kw_only, field.name
        assert field.default == EXTRA_FIELDS[field.name], field.name
    # The first positional field is use_running_average, as in flax.
    assert JaxbnBN(True).use_running_average is True


def test_extra_field_defaults_reproduce_plain_batch_norm():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    explicit = JaxbnBN(use_running_average=False, **EXTRA_FIELDS)
    default = JaxbnBN(use_running_average=False)
    variables = default.init(jax.random.key(1), x)
    assert jax.tree.structure(explicit.init(jax.random.key(1), x)) == jax.tree.structure(
        variables
    )
    ours = explicit.apply(variables, x, mutable=["batch_stats"])
    theirs = default.apply(variables, x, mutable=["batch_stats"])
    jax.tree.map(lambda a, b: assert_close(a, b, {"atol": 0, "rtol": 0}), ours, theirs)


def test_call_signature_matches_flax():
    ours = inspect.signature(JaxbnBN.__call__).parameters
    theirs = inspect.signature(FlaxBN.__call__).parameters
    assert list(ours) == list(theirs) == ["self", "x", "use_running_average", "mask"]
    for name in theirs:
        assert ours[name].kind == theirs[name].kind, name
        assert ours[name].default == theirs[name].default, name
    assert ours["use_running_average"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert ours["mask"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"axis": 1},
        {"axis": (1, 2)},
        {"use_scale": False},
        {"use_bias": False, "use_scale": False},
        {"param_dtype": jnp.bfloat16},
        {"dtype": jnp.bfloat16},
        {"param_dtype": jnp.bfloat16, "force_float32_reductions": False},
    ],
    ids=lambda kw: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items()) or "default",
)
def test_init_variables_match_flax(kwargs):
    shape = SHAPE_FOR_AXIS[kwargs.get("axis", -1)]
    x = data(shape, 0)
    key = jax.random.key(3)
    with standard():  # mixed dtypes: see test_works_under_strict_promotion for strict mode
        theirs = FlaxBN(use_running_average=False, **kwargs).init(key, x)
        ours = JaxbnBN(use_running_average=False, **kwargs).init(key, x)
    describe = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert describe(ours) == describe(theirs)
    assert_trees_close(ours, theirs, {"atol": 0, "rtol": 0})
    assert set(ours["batch_stats"]) == {"mean", "var"}


# ---------------------------------------------------------------- numerical parity


@pytest.mark.parametrize("mask_kind", [None, "rows", "full", "random"])
@pytest.mark.parametrize("axis", [-1, 1, (1, 2)], ids=["axis-1", "axis1", "axis12"])
def test_train_then_eval_matches_flax_over_axes_and_masks(axis, mask_kind):
    check_parity({}, axis=axis, mask_kind=mask_kind)


@pytest.mark.parametrize("affine", ["both", "scale", "bias", "none"])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-3])
@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_train_then_eval_matches_flax_over_momentum_epsilon_affine(momentum, epsilon, affine):
    kwargs = {
        "momentum": momentum,
        "epsilon": epsilon,
        "use_scale": affine in ("both", "scale"),
        "use_bias": affine in ("both", "bias"),
        # Non-trivial parameters, so that a swapped or dropped scale/bias shows.
        "scale_init": nn.initializers.normal(1.0),
        "bias_init": nn.initializers.normal(1.0),
    }
    check_parity(kwargs, mask_kind="rows")


@pytest.mark.parametrize("axis", [-1, 1, (1, 2)], ids=["axis-1", "axis1", "axis12"])
def test_non_default_initializers_match_flax(axis):
    kwargs = {
        "scale_init": nn.initializers.normal(0.5),
        "bias_init": nn.initializers.uniform(2.0),
    }
    check_parity(kwargs, axis=axis)


DTYPE_COMBOS = {
    # name: (x dtype, module kwargs, tolerance of the output)
    "x32-p32": (jnp.float32, {}, TOL),
    # bfloat16 input with float32 params: both compute and return float32, so tight.
    "x16-p32": (jnp.bfloat16, {}, TOL),
    "dtype16": (jnp.float32, {"dtype": jnp.bfloat16}, BF16_TOL),
    # bfloat16 params with float32 input: the output is float32, computed in float32.
    "param16": (jnp.float32, {"param_dtype": jnp.bfloat16}, TOL),
    "x16-param16": (jnp.bfloat16, {"param_dtype": jnp.bfloat16}, BF16_TOL),
}


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("combo", list(DTYPE_COMBOS))
def test_dtypes_match_flax(combo, mask_kind):
    x_dtype, kwargs, tol = DTYPE_COMBOS[combo]
    kwargs = {**kwargs, "scale_init": nn.initializers.normal(1.0)}
    check_parity(kwargs, mask_kind=mask_kind, x_dtype=x_dtype, tol=tol)


@pytest.mark.parametrize("combo", list(DTYPE_COMBOS))
def test_works_under_strict_promotion(combo):
    """jaxbn promotes explicitly, so it runs under conftest's strict promotion (flax does not)."""
    x_dtype, kwargs, tol = DTYPE_COMBOS[combo]
    x = data(ROW_SHAPE, 0, x_dtype)
    key = jax.random.key(0)
    with standard():
        flax_vars = FlaxBN(use_fast_variance=False, **kwargs).init(key, x, False)
        expected, expected_stats = FlaxBN(use_fast_variance=False, **kwargs).apply(
            flax_vars, x, False, mutable=["batch_stats"]
        )
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    variables = JaxbnBN(**kwargs).init(key, x, False)
    y, stats = JaxbnBN(**kwargs).apply(variables, x, False, mutable=["batch_stats"])
    assert_close(y, expected, tol)
    assert_trees_close(stats, expected_stats)


def test_matches_flax_fast_variance_on_well_conditioned_data():
    """flax's default E[x²]-E[x]² is accurate enough when |mean| is not >> std."""
    flax_module = FlaxBN(momentum=0.9)  # use_fast_variance=True, the default
    jaxbn_module = JaxbnBN(momentum=0.9)
    assert flax_module.use_fast_variance
    xs = [data(ROW_SHAPE, step, loc=0.0, scale=1.0) for step in range(STEPS)]
    x_eval = data(ROW_SHAPE, 99, loc=0.0, scale=1.0)
    masks = [None] * STEPS
    key = jax.random.key(0)
    with standard():
        flax_out = run(flax_module, flax_module.init(key, xs[0], False), xs, masks, x_eval)
        jaxbn_out = run(jaxbn_module, jaxbn_module.init(key, xs[0], False), xs, masks, x_eval)
    for step in range(STEPS):
        assert_close(jaxbn_out[0][step], flax_out[0][step])
        assert_trees_close(jaxbn_out[1][step], flax_out[1][step])
    assert_close(jaxbn_out[2], flax_out[2])


# ---------------------------------------------------------------- checkpoints


def train_with(module, variables, steps=STEPS):
    for step in range(steps):
        _, updates = module.apply(variables, data(ROW_SHAPE, step), False, mutable=["batch_stats"])
        variables = {**variables, **updates}
    return variables


def test_flax_trained_variables_load_into_jaxbn():
    kwargs = {"momentum": 0.9, "scale_init": nn.initializers.normal(1.0)}
    flax_module, jaxbn_module = FlaxBN(use_fast_variance=False, **kwargs), JaxbnBN(**kwargs)
    x = data(ROW_SHAPE, 50)
    with standard():
        flax_vars = train_with(flax_module, flax_module.init(jax.random.key(1), x, False))
        # Eval with flax's statistics, and one more training step from flax's state.
        expected_eval = flax_module.apply(flax_vars, x, True)
        expected_train, expected_stats = flax_module.apply(
            flax_vars, x, False, mutable=["batch_stats"]
        )
    assert_close(jaxbn_module.apply(flax_vars, x, True), expected_eval)
    y, stats = jaxbn_module.apply(flax_vars, x, False, mutable=["batch_stats"])
    assert_close(y, expected_train)
    assert_trees_close(stats, expected_stats)


def test_jaxbn_trained_variables_load_into_flax():
    kwargs = {"momentum": 0.9, "scale_init": nn.initializers.normal(1.0)}
    flax_module, jaxbn_module = FlaxBN(use_fast_variance=False, **kwargs), JaxbnBN(**kwargs)
    x = data(ROW_SHAPE, 50)
    jaxbn_vars = train_with(jaxbn_module, jaxbn_module.init(jax.random.key(1), x, False))
    ours_eval = jaxbn_module.apply(jaxbn_vars, x, True)
    ours_train, ours_stats = jaxbn_module.apply(jaxbn_vars, x, False, mutable=["batch_stats"])
    with standard():
        assert_close(flax_module.apply(jaxbn_vars, x, True), ours_eval)
        y, stats = flax_module.apply(jaxbn_vars, x, False, mutable=["batch_stats"])
    assert_close(y, ours_train)
    assert_trees_close(stats, ours_stats)


# ---------------------------------------------------------------- init and axis_name


def test_init_does_not_update_statistics():
    x = data(ROW_SHAPE, 0, loc=5.0)  # batch mean 5, variance 9: far from (0, 1)
    key = jax.random.key(0)
    with standard():
        theirs = FlaxBN(use_running_average=False).init(key, x)
    ours = JaxbnBN(use_running_average=False).init(key, x)
    assert_trees_close(ours["batch_stats"], theirs["batch_stats"], {"atol": 0, "rtol": 0})
    np.testing.assert_array_equal(ours["batch_stats"]["mean"], np.zeros(6, np.float32))
    np.testing.assert_array_equal(ours["batch_stats"]["var"], np.ones(6, np.float32))


def test_init_with_axis_name_needs_no_bound_axis():
    x = data(ROW_SHAPE, 0)
    key = jax.random.key(0)
    with standard():
        theirs = FlaxBN(use_running_average=False, axis_name="batch").init(key, x)
    ours = JaxbnBN(use_running_average=False, axis_name="batch").init(key, x)
    assert_trees_close(ours, theirs, {"atol": 0, "rtol": 0})


def test_axis_name_under_vmap_matches_flax():
    """Equal shards and no mask: flax's equal device weighting equals jaxbn's count weighting."""
    xs = data((4, 8, 6), 0)  # 4 shards of (8, 6)
    key = jax.random.key(0)

    def train(module):
        variables = module.init(key, xs[0])

        def step(x):
            return module.apply(variables, x, mutable=["batch_stats"])

        return jax.vmap(step, axis_name="batch")(xs)

    with standard():
        y_theirs, stats_theirs = train(
            FlaxBN(use_running_average=False, axis_name="batch", use_fast_variance=False)
        )
    y_ours, stats_ours = train(JaxbnBN(use_running_average=False, axis_name="batch"))
    assert_close(y_ours, y_theirs)
    assert_trees_close(stats_ours, stats_theirs)


# ---------------------------------------------------------------- use_running_average


@pytest.mark.parametrize("call", [False, True], ids=["call-train", "call-eval"])
def test_call_time_use_running_average_when_field_unset(call):
    x = data(ROW_SHAPE, 0)
    key = jax.random.key(0)
    with standard():
        flax_module = FlaxBN(momentum=0.9, use_fast_variance=False)
        flax_vars = train_with(FlaxBN(momentum=0.9), flax_module.init(key, x, False), steps=1)
        expected, expected_stats = flax_module.apply(flax_vars, x, call, mutable=["batch_stats"])
    y, stats = JaxbnBN(momentum=0.9).apply(flax_vars, x, call, mutable=["batch_stats"])
    assert_close(y, expected)
    assert_trees_close(stats, expected_stats)
    if call:  # evaluation: the statistics are left as they were
        assert_trees_close(stats["batch_stats"], flax_vars["batch_stats"], {"atol": 0, "rtol": 0})
    else:
        assert not np.allclose(stats["batch_stats"]["mean"], flax_vars["batch_stats"]["mean"])


@pytest.mark.parametrize("field, call", [(True, False), (False, True), (True, True)])
def test_use_running_average_in_field_and_call_raises_like_flax(field, call):
    """flax.linen does not let the call override the field: it raises (nn.merge_param)."""
    x = data(ROW_SHAPE, 0)
    variables = JaxbnBN(False).init(jax.random.key(0), x)
    with standard(), pytest.raises(ValueError, match="passed just once") as flax_error:
        FlaxBN(field).apply(variables, x, call, mutable=["batch_stats"])
    with pytest.raises(flax_error.type, match="passed just once"):
        JaxbnBN(field).apply(variables, x, call, mutable=["batch_stats"])


def test_use_running_average_unset_everywhere_raises_like_flax():
    x = data(ROW_SHAPE, 0)
    with standard(), pytest.raises(Exception) as flax_error:
        FlaxBN().init(jax.random.key(0), x)
    with pytest.raises(flax_error.type):
        JaxbnBN().init(jax.random.key(0), x)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("axis", [-1, 1], ids=["axis-1", "axis1"])
def test_gradients_match_flax(axis, train):
    shape = SHAPE_FOR_AXIS[axis]
    kwargs = {
        "axis": axis,
        "momentum": 0.9,
        "scale_init": nn.initializers.normal(1.0),
        "bias_init": nn.initializers.normal(1.0),
    }
    flax_module, jaxbn_module = FlaxBN(use_fast_variance=False, **kwargs), JaxbnBN(**kwargs)
    x = data(shape, 5)
    weights = data(shape, 6, loc=0.0, scale=1.0)
    mask = make_mask("rows", shape)
    with standard():
        variables = flax_module.init(jax.random.key(2), x, False)
        # Running statistics away from (0, 1), so the eval gradient depends on them.
        _, updates = flax_module.apply(variables, data(shape, 7), False, mutable=["batch_stats"])
        variables = {**variables, **updates}

    def loss(module, params, x):
        y, _ = module.apply(
            {**variables, "params": params},
            x,
            not train,
            mask=mask if train else None,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(y) * weights)

    grad = jax.grad(loss, argnums=(1, 2))
    with standard():
        expected = grad(flax_module, variables["params"], x)
    ours = grad(jaxbn_module, variables["params"], x)
    assert_trees_close(ours, expected)

"""``jaxbn.nnx.BatchNorm`` against the real ``flax.nnx.BatchNorm``.

Both modules are built with the same arguments and the same ``nnx.Rngs`` seed and fed the
same batches; everything is compared to flax. Flax does not run under the strict dtype
promotion that conftest.py sets, so flax calls are wrapped in
``jax.numpy_dtype_promotion("standard")``; the parity tests wrap jaxbn the same way (same
promotion rules on both sides), and ``test_works_under_strict_promotion`` checks jaxbn alone
under strict promotion.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _parity import BF16_TOL, TOL, assert_close, batches, make_mask, standard
from flax import nnx

import jaxbn.nnx

FlaxBN = nnx.BatchNorm
JaxbnBN = jaxbn.nnx.BatchNorm

# With dtype=bfloat16, flax.nnx evaluates in bfloat16 arithmetic (x - mean and the multiply
# each round to 8 bits, on inputs up to ~12), while jaxbn evaluates in float32 and rounds once.
# The difference is a few bfloat16 ulps of the input scale: |x - mean| ~ 10 has an ulp of 2**-4.
BF16_EVAL_TOL = {"atol": 5e-2, "rtol": 2e-2}

C = 6
ROW_SHAPE = (16, C)  # (N, C), feature axis -1
NCHW_SHAPE = (4, C, 2, 5)  # feature axis 1
SHAPE_FOR_AXIS = {-1: ROW_SHAPE, 1: NCHW_SHAPE}
STEPS = 3

data = batches(4321)


def assert_stats_close(ours, theirs, tol=TOL):
    assert type(ours.mean) is type(theirs.mean) is nnx.BatchStat
    assert type(ours.var) is type(theirs.var) is nnx.BatchStat
    assert_close(ours.mean[...], theirs.mean[...], tol)
    assert_close(ours.var[...], theirs.var[...], tol)


def snapshot(model):
    return nnx.clone(nnx.state(model, nnx.BatchStat))


def pair(num_features=C, **kwargs):
    """flax's and jaxbn's module, same arguments, same seed (flax in its accurate mode)."""
    with standard():
        theirs = FlaxBN(num_features, use_fast_variance=False, **kwargs, rngs=nnx.Rngs(params=0))
        ours = JaxbnBN(num_features, **kwargs, rngs=nnx.Rngs(params=0))
    return ours, theirs


def run(model, xs, masks, x_eval):
    """Trains on ``xs`` (one call per batch), then evaluates on ``x_eval`` after ``.eval()``."""
    model.train()
    ys, stats = [], []
    for x, mask in zip(xs, masks, strict=True):
        ys.append(model(x, mask=mask))
        stats.append((model.mean[...], model.var[...]))
    model.eval()
    y_eval = model(x_eval)
    # Evaluation leaves the statistics alone.
    np.testing.assert_array_equal(model.mean[...], stats[-1][0])
    np.testing.assert_array_equal(model.var[...], stats[-1][1])
    return ys, stats, y_eval


def check_parity(*, axis=-1, mask_kind=None, x_dtype=jnp.float32, tol=TOL, eval_tol=None, **kwargs):
    shape = SHAPE_FOR_AXIS[axis]
    ours, theirs = pair(shape[axis], axis=axis, **kwargs)
    assert_close(ours.mean[...], theirs.mean[...], {"atol": 0, "rtol": 0})
    for name in ("scale", "bias"):
        if getattr(theirs, name) is None:
            assert getattr(ours, name) is None
        else:
            assert_close(
                getattr(ours, name)[...], getattr(theirs, name)[...], {"atol": 0, "rtol": 0}
            )
    xs = [data(shape, step, x_dtype) for step in range(STEPS)]
    masks = [make_mask(mask_kind, shape)] * STEPS
    x_eval = data(shape, 99, x_dtype)
    with standard():
        flax_out = run(theirs, xs, masks, x_eval)
        jaxbn_out = run(ours, xs, masks, x_eval)
    for step in range(STEPS):
        assert_close(jaxbn_out[0][step], flax_out[0][step], tol)
        # Statistics are float32 whatever the input dtype, in both: always the tight tolerance.
        for ours_stat, theirs_stat in zip(jaxbn_out[1][step], flax_out[1][step], strict=True):
            assert_close(ours_stat, theirs_stat)
    assert_close(jaxbn_out[2], flax_out[2], eval_tol or tol)
    assert ours.use_running_average is theirs.use_running_average is True


# ---------------------------------------------------------------- interface


# jaxbn's own constructor arguments, after flax's, with defaults that give plain batch norm.
EXTRA_ARGS = {
    "virtual_batch_size": None,
    "debias": False,
    "unbiased_running_var": False,
    "use_renorm": False,
    "r_max": 3.0,
    "d_max": 5.0,
}


def test_flax_constructor_is_an_ordered_prefix_of_ours_with_the_same_defaults():
    ours = inspect.signature(JaxbnBN.__init__).parameters
    theirs = inspect.signature(FlaxBN.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert list(ours)[len(theirs) :] == list(EXTRA_ARGS)
    key = jax.random.key(0)
    for name, param in theirs.items():
        assert ours[name].kind == param.kind, name
        if name in ("scale_init", "bias_init"):
            # Initializers compare by what they produce.
            for shape, dtype in [((3,), jnp.float32), ((2, 4), jnp.bfloat16)]:
                assert_close(
                    ours[name].default(key, shape, dtype),
                    param.default(key, shape, dtype),
                    {"atol": 0, "rtol": 0},
                )
        else:
            assert ours[name].default == param.default, name
    for name, default in EXTRA_ARGS.items():
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert ours[name].default == default, name


def test_extra_argument_defaults_reproduce_plain_batch_norm():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    explicit = JaxbnBN(3, rngs=nnx.Rngs(0), **EXTRA_ARGS)
    default = JaxbnBN(3, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(explicit)) == jax.tree.structure(nnx.state(default))
    assert_close(explicit(x), default(x), {"atol": 0, "rtol": 0})
    for a, b in zip(jax.tree.leaves(nnx.state(explicit)), jax.tree.leaves(nnx.state(default)),
                    strict=True):
        assert_close(a, b, {"atol": 0, "rtol": 0})


@pytest.mark.parametrize("method", ["__call__", "set_view"])
def test_method_signatures_match_flax(method):
    ours = inspect.signature(getattr(JaxbnBN, method)).parameters
    theirs = inspect.signature(getattr(FlaxBN, method)).parameters
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        assert (ours[name].kind, ours[name].default) == (param.kind, param.default), name


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_scale": False},
        {"use_bias": False, "use_scale": False},
        {"param_dtype": jnp.bfloat16},
        {"dtype": jnp.bfloat16},
        {"scale_init": nnx.initializers.normal(1.0), "bias_init": nnx.initializers.normal(1.0)},
    ],
    ids=["default", "no-scale", "no-affine", "param16", "dtype16", "normal-init"],
)
def test_state_matches_flax(kwargs):
    ours, theirs = pair(**kwargs)
    ours_state, theirs_state = nnx.state(ours), nnx.state(theirs)
    # The treedef holds the keys, the Variable types (Param / BatchStat) and their metadata.
    assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)
    for a, b in zip(jax.tree.leaves(ours_state), jax.tree.leaves(theirs_state), strict=True):
        assert_close(a, b, {"atol": 0, "rtol": 0})
    assert set(nnx.state(ours, nnx.BatchStat)) == {"mean", "var"}
    assert set(nnx.state(ours, nnx.Param)) == set(nnx.state(theirs, nnx.Param))
    for name in ("scale", "bias"):
        assert (getattr(ours, name) is None) == (getattr(theirs, name) is None)


def test_metadata_reaches_the_params_like_flax():
    kwargs = {"scale_metadata": {"tag": "s"}, "bias_metadata": {"tag": "b"}}
    ours, theirs = pair(**kwargs)
    assert ours.scale.get_metadata() == theirs.scale.get_metadata()
    assert ours.bias.get_metadata() == theirs.bias.get_metadata()


# ---------------------------------------------------------------- numerical parity


@pytest.mark.parametrize("mask_kind", [None, "rows", "full", "random"])
@pytest.mark.parametrize("axis", [-1, 1], ids=["axis-1", "axis1"])
def test_train_then_eval_matches_flax_over_axes_and_masks(axis, mask_kind):
    check_parity(axis=axis, mask_kind=mask_kind)


@pytest.mark.parametrize("affine", ["both", "scale", "bias", "none"])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-3])
@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_train_then_eval_matches_flax_over_momentum_epsilon_affine(momentum, epsilon, affine):
    check_parity(
        mask_kind="rows",
        momentum=momentum,
        epsilon=epsilon,
        use_scale=affine in ("both", "scale"),
        use_bias=affine in ("both", "bias"),
        # Non-trivial parameters, so that a swapped or dropped scale/bias shows.
        scale_init=nnx.initializers.normal(1.0),
        bias_init=nnx.initializers.normal(1.0),
    )


DTYPE_COMBOS = {
    # name: (x dtype, module kwargs, output tolerance in training, in eval)
    "x32-p32": (jnp.float32, {}, TOL, TOL),
    # bfloat16 input, float32 params: everything is promoted to float32 in both; tight.
    "x16-p32": (jnp.bfloat16, {}, TOL, TOL),
    "dtype16": (jnp.float32, {"dtype": jnp.bfloat16}, BF16_TOL, BF16_EVAL_TOL),
    # bfloat16 params, float32 input: promoted to float32 in both; tight.
    "param16": (jnp.float32, {"param_dtype": jnp.bfloat16}, TOL, TOL),
    "x16-param16": (jnp.bfloat16, {"param_dtype": jnp.bfloat16}, BF16_TOL, BF16_EVAL_TOL),
}


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("combo", list(DTYPE_COMBOS))
def test_dtypes_match_flax(combo, mask_kind):
    x_dtype, kwargs, tol, eval_tol = DTYPE_COMBOS[combo]
    check_parity(
        mask_kind=mask_kind,
        x_dtype=x_dtype,
        tol=tol,
        eval_tol=eval_tol,
        scale_init=nnx.initializers.normal(1.0),
        **kwargs,
    )


@pytest.mark.parametrize("combo", list(DTYPE_COMBOS))
def test_works_under_strict_promotion(combo):
    """jaxbn promotes explicitly, so it runs under conftest's strict promotion (flax does not)."""
    x_dtype, kwargs, tol, eval_tol = DTYPE_COMBOS[combo]
    ours, theirs = pair(**kwargs)
    x = data(ROW_SHAPE, 0, x_dtype)
    with standard():
        expected = theirs(x)
        expected_eval = theirs(x, use_running_average=True)
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    assert_close(ours(x), expected, tol)
    assert_stats_close(ours, theirs)
    assert_close(ours(x, use_running_average=True), expected_eval, eval_tol)


def test_matches_flax_fast_variance_on_well_conditioned_data():
    """flax's default E[x²]-E[x]² is accurate enough when |mean| is not >> std."""
    with standard():
        theirs = FlaxBN(C, momentum=0.9, rngs=nnx.Rngs(0))  # use_fast_variance=True
        ours = JaxbnBN(C, momentum=0.9, rngs=nnx.Rngs(0))
    assert theirs.use_fast_variance
    xs = [data(ROW_SHAPE, step, loc=0.0, scale=1.0) for step in range(STEPS)]
    x_eval = data(ROW_SHAPE, 99, loc=0.0, scale=1.0)
    with standard():
        flax_out = run(theirs, xs, [None] * STEPS, x_eval)
        jaxbn_out = run(ours, xs, [None] * STEPS, x_eval)
    for step in range(STEPS):
        assert_close(jaxbn_out[0][step], flax_out[0][step])
        for a, b in zip(jaxbn_out[1][step], flax_out[1][step], strict=True):
            assert_close(a, b)
    assert_close(jaxbn_out[2], flax_out[2])


# ---------------------------------------------------------------- state interchange


def train(model, steps=STEPS):
    model.train()
    for step in range(steps):
        model(data(ROW_SHAPE, step))
    return model


@pytest.mark.parametrize("direction", ["flax-to-jaxbn", "jaxbn-to-flax"])
def test_trained_state_loads_into_the_other(direction):
    # The target starts from default parameters; the source's normal-initialized ones and
    # trained statistics must all arrive.
    ours, theirs = pair(momentum=0.9, scale_init=nnx.initializers.normal(1.0))
    if direction == "flax-to-jaxbn":
        ours = pair(momentum=0.9)[0]
    else:
        theirs = pair(momentum=0.9)[1]
    source, target = (theirs, ours) if direction == "flax-to-jaxbn" else (ours, theirs)
    with standard():
        train(source)
        nnx.update(target, nnx.state(source))
        x = data(ROW_SHAPE, 50)
        source.eval(), target.eval()
        assert_close(target(x), source(x))
        # One more training step from the same state.
        source.train(), target.train()
        assert_close(target(x), source(x))
    assert_stats_close(target, source)


# ---------------------------------------------------------------- modes


def test_train_and_eval_toggle_use_running_average_like_flax():
    ours, theirs = pair()
    assert ours.use_running_average is theirs.use_running_average is False
    ours.eval(), theirs.eval()
    assert ours.use_running_average is theirs.use_running_average is True
    ours.train(), theirs.train()
    assert ours.use_running_average is theirs.use_running_average is False
    with standard():
        ours_model = nnx.Sequential(JaxbnBN(C, rngs=nnx.Rngs(0)), nnx.relu)
    ours_model.eval()
    assert ours_model.layers[0].use_running_average is True


@pytest.mark.parametrize("mode, call", [("train", True), ("eval", False)])
def test_call_time_use_running_average_overrides_the_attribute(mode, call):
    ours, theirs = pair(momentum=0.9, scale_init=nnx.initializers.normal(1.0))
    x = data(ROW_SHAPE, 7)
    with standard():
        train(theirs, steps=1), train(ours, steps=1)
        getattr(theirs, mode)(), getattr(ours, mode)()
        before = snapshot(ours)
        expected = theirs(x, use_running_average=call)
        y = ours(x, use_running_average=call)
    assert_close(y, expected)
    assert_stats_close(ours, theirs)
    changed = not np.array_equal(ours.mean[...], before["mean"][...])
    assert changed is (not call)
    assert ours.use_running_average is (mode == "eval")  # the attribute itself is untouched


def test_use_running_average_unset_everywhere_raises_like_flax():
    ours, theirs = pair(use_running_average=None)
    x = data(ROW_SHAPE, 0)
    with standard(), pytest.raises(Exception) as flax_error:
        theirs(x)
    with pytest.raises(flax_error.type):
        ours(x)


def test_view_sets_use_running_average_like_flax():
    assert hasattr(nnx, "view")
    ours, theirs = pair(momentum=0.9)
    x = data(ROW_SHAPE, 3)
    with standard():
        train(theirs), train(ours)
        theirs_view = nnx.view(theirs, use_running_average=True)
        ours_view = nnx.view(ours, use_running_average=True)
        assert ours_view.use_running_average is theirs_view.use_running_average is True
        assert ours.use_running_average is theirs.use_running_average is False
        before = snapshot(ours)
        assert_close(ours_view(x), theirs_view(x))
    np.testing.assert_array_equal(ours.mean[...], before["mean"][...])
    assert_stats_close(ours, theirs)


# ---------------------------------------------------------------- in a model, jitted


def make_model(bn_cls, **bn_kwargs):
    rngs = nnx.Rngs(0)
    return nnx.Sequential(
        nnx.Linear(4, 8, rngs=rngs),
        bn_cls(8, momentum=0.9, **bn_kwargs, rngs=rngs),
        nnx.relu,
        nnx.Linear(8, 1, rngs=rngs),
    )


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean(jnp.square(model(x) - y))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_training_loop_matches_flax():
    with standard():
        theirs = make_model(FlaxBN, use_fast_variance=False)
    ours = make_model(JaxbnBN)
    for a, b in zip(
        jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(theirs)), strict=True
    ):
        assert_close(a, b, {"atol": 0, "rtol": 0})  # same seeds, same initial model
    # SGD rather than Adam: Adam's first steps are ~lr*sign(grad), which would blow a
    # rounding-level gradient difference up to a whole step.
    ours_opt = nnx.Optimizer(ours, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    theirs_opt = nnx.Optimizer(theirs, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    key_x, key_w = jax.random.split(jax.random.key(0))
    w = jax.random.normal(key_w, (4, 1))
    ours_losses, theirs_losses = [], []
    for step in range(5):
        x = 1.0 + 2.0 * jax.random.normal(jax.random.fold_in(key_x, step), (32, 4))
        y = jnp.sin(x @ w)
        with standard():
            theirs_losses.append(train_step(theirs, theirs_opt, x, y))
        ours_losses.append(train_step(ours, ours_opt, x, y))
    np.testing.assert_allclose(np.array(ours_losses), np.array(theirs_losses), rtol=2e-5)
    assert ours_losses[-1] < ours_losses[0]
    assert_stats_close(ours.layers[1], theirs.layers[1], {"atol": 2e-5, "rtol": 2e-5})
    ours.eval(), theirs.eval()
    x = jax.random.normal(jax.random.key(9), (32, 4))
    with standard():
        expected = nnx.jit(lambda m, x: m(x))(theirs, x)
    assert_close(nnx.jit(lambda m, x: m(x))(ours, x), expected, {"atol": 1e-4, "rtol": 1e-4})

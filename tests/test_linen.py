"""What only ``jaxbn.linen.BatchNorm`` has, against the real ``flax.linen.BatchNorm``: its
dataclass fields, its call signature, ``init`` with an unbound ``axis_name``, ``axis_name``
under ``vmap``, the call-time ``use_running_average`` and flax's ``merge_param`` errors, and
gradients in the cases tests/test_autodiff.py does not cover (axis 1, evaluation).

What every drop-in promises (constructor, variables, numerical parity over options and
dtypes, strict promotion, checkpoints) is tests/test_dropins.py, for linen and nnx together.
Flax does not run under the strict dtype promotion conftest.py sets: both sides of a parity
test run under ``standard()``.
"""

from __future__ import annotations

import dataclasses
import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import EXTRA_ARGS, TOL, batches, make_mask, standard

import jaxbn.linen

FlaxBN = nn.BatchNorm
JaxbnBN = jaxbn.linen.BatchNorm

ROW_SHAPE = (16, 6)  # (N, C), feature axis -1
NCHW_SHAPE = (4, 3, 2, 5)  # feature axis 1
SHAPE_FOR_AXIS = {-1: ROW_SHAPE, 1: NCHW_SHAPE}

data = batches(1234)


# ---------------------------------------------------------------- interface


def test_dataclass_fields_are_flax_s_then_ours_with_the_same_defaults():
    """flax's fields, in flax's order, with flax's defaults, then ours (keyword-only). The
    constructor's signature is tests/test_dropins.py's."""
    flax_fields = dataclasses.fields(FlaxBN)
    jaxbn_fields = [f for f in dataclasses.fields(JaxbnBN) if f.name not in EXTRA_ARGS]
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
                chex.assert_trees_all_equal(ours.default(key, shape, dtype),
                                            theirs.default(key, shape, dtype), strict=True)
        else:
            assert ours.default == theirs.default, ours.name
    extra_fields = [f for f in dataclasses.fields(JaxbnBN) if f.name in EXTRA_ARGS]
    assert [f.name for f in extra_fields] == list(EXTRA_ARGS)
    for field in extra_fields:
        assert field.init and field.kw_only, field.name
        assert field.default == EXTRA_ARGS[field.name], field.name
    # The first positional field is use_running_average, as in flax.
    assert JaxbnBN(True).use_running_average is True


def test_call_signature_matches_flax():
    ours = inspect.signature(JaxbnBN.__call__).parameters
    theirs = inspect.signature(FlaxBN.__call__).parameters
    assert list(ours) == list(theirs) == ["self", "x", "use_running_average", "mask"]
    for name in theirs:
        assert ours[name].kind == theirs[name].kind, name
        assert ours[name].default == theirs[name].default, name
    assert ours["use_running_average"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert ours["mask"].kind is inspect.Parameter.KEYWORD_ONLY


def train_with(module, variables, steps=3):
    for step in range(steps):
        _, updates = module.apply(variables, data(ROW_SHAPE, step), False, mutable=["batch_stats"])
        variables = {**variables, **updates}
    return variables


# ---------------------------------------------------------------- init and axis_name


def test_init_with_axis_name_needs_no_bound_axis():
    x = data(ROW_SHAPE, 0)
    key = jax.random.key(0)
    with standard():
        theirs = FlaxBN(use_running_average=False, axis_name="batch").init(key, x)
    ours = JaxbnBN(use_running_average=False, axis_name="batch").init(key, x)
    chex.assert_trees_all_equal(ours, theirs, strict=True)


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
    chex.assert_trees_all_close((y_ours, stats_ours), (y_theirs, stats_theirs), strict=True,
                                **TOL)


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
    chex.assert_trees_all_close((y, stats), (expected, expected_stats), strict=True, **TOL)
    if call:  # evaluation: the statistics are left as they were
        chex.assert_trees_all_equal(stats["batch_stats"], flax_vars["batch_stats"], strict=True)
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


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("axis", "train"), [(1, True), (-1, False), (1, False)],
    ids=["axis1-train", "axis-1-eval", "axis1-eval"],
)
def test_gradients_match_flax(axis, train):
    """Feature axis -1 in training is tests/test_autodiff.py's (every mode, masked or not)."""
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
    chex.assert_trees_all_close(ours, expected, strict=True, **TOL)

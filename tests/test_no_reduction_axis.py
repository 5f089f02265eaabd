"""Inputs with no reduction axis: one unbatched example, every axis a feature axis.

The drop-ins compute them as flax does (each value is its own mean, the variance is 0); the
pure function refuses them in training, where they are almost always a missing batch axis.
"""

from __future__ import annotations

import _reference as ref
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import REF_TOL, TOL, batches, standard
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

data = batches(2468)

UNBATCHED_INIT = {"scale_init": nn.initializers.normal(1.0),
                  "bias_init": nn.initializers.normal(1.0)}


def _check_unbatched_step(x, y, stats, bias):
    """flax's arithmetic with statistics over no axis: each value is its own mean and the
    variance is 0, so the output is the bias and the EMA (momentum 0.9, from 0 and 1) takes
    x as the batch mean and 0 as the batch variance."""
    chex.assert_trees_all_close(y, np.broadcast_to(bias, x.shape), atol=1e-6, rtol=0)
    chex.assert_trees_all_close(
        (stats["mean"], stats["var"]),
        (0.1 * np.asarray(x, np.float64), np.full(x.shape, 0.9)), **REF_TOL,
    )


@pytest.mark.parametrize(("shape", "axis"), [((3,), -1), ((2, 3), (0, 1))],
                         ids=["vector", "every-axis-a-feature"])
def test_no_reduction_axis_linen_trains_as_flax(shape, axis):
    """A training call on an input whose every axis is a feature axis (one unbatched example,
    as in flax's test_bind_stateful) normalizes as flax.linen does; evaluation too."""
    x = data(shape, 0)
    results = {}
    for name, module in (
        ("ours", jaxbn.linen.BatchNorm(axis=axis, momentum=0.9, **UNBATCHED_INIT)),
        ("flax", nn.BatchNorm(axis=axis, momentum=0.9, use_fast_variance=False,
                              **UNBATCHED_INIT)),
    ):
        with standard():
            variables = module.init(jax.random.key(0), x, False)
            y, updates = module.apply(variables, x, False, mutable=["batch_stats"])
            y_eval = module.apply({**variables, **updates}, x, True)
        _check_unbatched_step(x, y, updates["batch_stats"], variables["params"]["bias"])
        results[name] = (y, updates, y_eval)
    chex.assert_trees_all_close(results["ours"], results["flax"], strict=True, **TOL)


def test_no_reduction_axis_nnx_trains_as_flax():
    x = data((3,), 0)
    ours = jaxbn.nnx.BatchNorm(3, momentum=0.9, **UNBATCHED_INIT, rngs=nnx.Rngs(0))
    with standard():
        theirs = nnx.BatchNorm(3, momentum=0.9, use_fast_variance=False, **UNBATCHED_INIT,
                               rngs=nnx.Rngs(0))
        expected = theirs(x)
    y = ours(x)
    _check_unbatched_step(x, y, {"mean": ours.mean[...], "var": ours.var[...]}, ours.bias[...])
    chex.assert_trees_all_close(
        (y, ours.mean[...], ours.var[...]), (expected, theirs.mean[...], theirs.var[...]),
        strict=True, **TOL,
    )
    ours.eval(), theirs.eval()
    with standard():
        chex.assert_trees_all_close(ours(x), theirs(x), strict=True, **TOL)


def test_no_reduction_axis_masked_out_example_leaves_the_state_unchanged():
    """Intentional difference: the one example masked out is a batch with no valid entry,
    which gives a finite output and leaves the running statistics as they were; flax's
    statistics over no valid entry are NaN."""
    x = data((3,), 0)
    mask = jnp.asarray(False)
    module = jaxbn.linen.BatchNorm(momentum=0.9)
    variables = module.init(jax.random.key(0), x, False)
    y, updates = module.apply(variables, x, False, mask=mask, mutable=["batch_stats"])
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"], strict=True)
    with standard():
        _, flax_updates = nn.BatchNorm(momentum=0.9).apply(
            variables, x, False, mask=mask, mutable=["batch_stats"]
        )
    assert np.all(np.isnan(flax_updates["batch_stats"]["mean"]))


def test_pure_function_refuses_to_train_on_one_unbatched_example():
    """The pure function keeps its error: a training call whose every axis is a feature axis
    is almost always a bug (a missing batch axis). Evaluation needs no batch, and a batch
    made of the examples of a named vmap axis is accepted (tests/test_distributed.py)."""
    x = data((3,), 0)
    params, state = jaxbn.init(3)
    with pytest.raises(ValueError, match=r"`axis` -1 makes every axis of `x` \(shape \(3,\)\) "
                                         r"a feature axis, so training has no batch to take "
                                         r"statistics over\. Leave at least one axis out of "
                                         r"`axis`, or pass the `axis_name`"):
        jaxbn.batch_norm(x, params, state, training=True)
    y, same = jaxbn.batch_norm(x, params, state, training=False)
    assert same is state
    chex.assert_trees_all_close(y, ref.normalize(x, state.mean, state.var), **REF_TOL)



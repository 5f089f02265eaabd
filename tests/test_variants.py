"""batch_norm's options against the float64 reference (tests/_reference.py), and torch where
torch has them.

Ghost batches (``virtual_batch_size``), the zero-debiased EMA (``debias``), the unbiased
running variance (``unbiased_running_var``), the frozen mode (``training=False``), and the
fully masked / empty batch.
"""

from __future__ import annotations

import _reference as ref
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn

STATIC = ("training", "axis", "momentum", "virtual_batch_size", "debias", "unbiased_running_var")
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=STATIC)
batch_renorm = jax.jit(jaxbn.batch_renorm, static_argnames=STATIC)


def assert_state(state, mean, var, count, atol=1e-5):
    np.testing.assert_allclose(np.asarray(state.mean), mean, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.var), var, atol=atol, rtol=1e-5)
    assert int(state.count) == count


def data(shape, seed=0, loc=1.0, spread=2.0):
    return loc + spread * jax.random.normal(jax.random.key(seed), shape)


# ----------------------------------------------------------------------------------------------
# ghost batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis", "k"),
    [((12, 3), -1, 4), ((8, 3, 2, 2), 1, 2), ((6, 2, 2, 3), -1, 3)],
    ids=["NC", "NCHW", "NHWC"],
)
def test_ghost_batches_match_numpy_per_group(shape, axis, k):
    x = data(shape)
    _, state = jaxbn.init(shape[axis])
    y, new = batch_norm(
        x, None, state, training=True, axis=axis, momentum=0.9, virtual_batch_size=k
    )
    y_ref, mean_ref, var_ref = ref.ghost_batch_norm(x, k, axis)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=1e-5)
    assert_state(new, ref.ema(0.0, mean_ref, 0.9), ref.ema(1.0, var_ref, 0.9), 1)


def test_ghost_batches_with_mask_use_per_group_masked_statistics():
    x = data((12, 3), seed=1)
    mask = np.ones((12, 1), bool)
    mask[[0, 5, 6]] = False
    mask[8:12] = False  # the last group has no valid entry: left out of the running update
    _, state = jaxbn.init(3)
    y, new = batch_norm(
        x, None, state, training=True, momentum=0.5, mask=mask, virtual_batch_size=4
    )
    y_ref, mean_ref, var_ref = ref.ghost_batch_norm(x, 4, -1, mask)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=1e-5)
    chex.assert_tree_all_finite(y)
    assert_state(new, ref.ema(0.0, mean_ref, 0.5), ref.ema(1.0, var_ref, 0.5), 1)


def test_ghost_batches_gradients_equal_per_group_batch_norm():
    x = data((8, 3), seed=2)
    params = {"scale": jnp.array([1.5, -0.5, 2.0]), "bias": jnp.array([0.1, 0.2, 0.3])}
    _, state = jaxbn.init(3)
    dy = data((8, 3), seed=3)

    def ghost(x, params):
        return jnp.sum(
            jaxbn.batch_norm(x, params, state, training=True, virtual_batch_size=4)[0] * dy
        )

    def per_group(x, params):
        ys = [jaxbn.batch_norm(x[i : i + 4], params, state, training=True)[0] for i in (0, 4)]
        return jnp.sum(jnp.concatenate(ys) * dy)

    ours = jax.jit(jax.grad(ghost, argnums=(0, 1)))(x, params)
    theirs = jax.jit(jax.grad(per_group, argnums=(0, 1)))(x, params)
    chex.assert_trees_all_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_one_ghost_batch_is_batch_norm_and_eval_ignores_it():
    x = data((8, 3))
    params, state = jaxbn.init(3)
    one = batch_norm(x, params, state, training=True, virtual_batch_size=8)
    plain = batch_norm(x, params, state, training=True)
    chex.assert_trees_all_close(one, plain, atol=1e-6, rtol=1e-7)
    y_eval, same = jaxbn.batch_norm(x, params, state, training=False, virtual_batch_size=3)
    assert same is state
    np.testing.assert_allclose(y_eval, batch_norm(x, params, state, training=False)[0])


def test_ghost_batch_size_must_divide_the_batch():
    params, state = jaxbn.init(3)
    with pytest.raises(ValueError, match=r"`virtual_batch_size` must divide the batch axis"):
        jaxbn.batch_norm(jnp.ones((10, 3)), params, state, training=True, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"`virtual_batch_size` must divide"):
        jaxbn.batch_renorm(
            jnp.ones((10, 3)), params, state, training=True, r_max=1, d_max=0, virtual_batch_size=3
        )


@pytest.mark.parametrize(
    ("k", "error"),
    [(0, ValueError), (2.0, TypeError), (True, TypeError)],
)
def test_ghost_batch_size_must_be_a_positive_int(k, error):
    params, state = jaxbn.init(3)
    with pytest.raises(error, match=r"`virtual_batch_size` must be a positive int"):
        jaxbn.batch_norm(jnp.ones((4, 3)), params, state, training=True, virtual_batch_size=k)


def test_ghost_batches_reject_axis_name():
    params, state = jaxbn.init(3)

    def call(x):
        return jaxbn.batch_norm(
            x, params, state, training=True, axis_name="batch", virtual_batch_size=2
        )[0]

    with pytest.raises(
        ValueError,
        match=r"`virtual_batch_size` cannot be combined with `axis_name`",
    ):
        jax.vmap(call, axis_name="batch")(jnp.ones((2, 4, 3)))


# ----------------------------------------------------------------------------------------------
# debias
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0])
def test_debiased_ema_over_several_steps(momentum):
    _, state = jaxbn.init(3)
    mean, var = np.zeros(3), np.ones(3)
    for step in range(5):
        x = data((16, 3), seed=step, loc=float(step))
        state = batch_norm(x, None, state, training=True, momentum=momentum, debias=True)[1]
        batch_mean, batch_var, _ = ref.moments(x, -1)
        k = step + 1
        weight = (1 - momentum) / (1 - momentum**k)
        mean = (1 - weight) * mean + weight * batch_mean
        var = (1 - weight) * var + weight * batch_var
        assert_state(state, mean, var, k, atol=1e-4)
        if step == 0:  # unbiased from the first step: the batch replaces the initial values
            assert_state(state, batch_mean, batch_var, 1)


def test_debiased_ema_skips_rejected_batches_without_advancing_k():
    _, state = jaxbn.init(2)
    x0, x1 = data((8, 2), seed=0), data((8, 2), seed=1)
    state = batch_norm(x0, None, state, training=True, momentum=0.9, debias=True)[1]
    bad = x1.at[0, 0].set(jnp.nan)
    skipped = batch_norm(bad, None, state, training=True, momentum=0.9, debias=True)[1]
    chex.assert_trees_all_equal(skipped, state)
    state = batch_norm(x1, None, skipped, training=True, momentum=0.9, debias=True)[1]
    w = 0.1 / (1 - 0.9**2)
    m0, v0, _ = ref.moments(x0, -1)
    m1, v1, _ = ref.moments(x1, -1)
    mean, var = (1 - w) * m0 + w * m1, (1 - w) * v0 + w * v1
    assert_state(state, mean, var, 2)


def test_debias_has_no_effect_on_the_cumulative_average():
    _, state = jaxbn.init(2)
    plain, debiased = state, state
    for step in range(3):
        x = data((8, 2), seed=step)
        plain = batch_norm(x, None, plain, training=True, momentum=None)[1]
        debiased = batch_norm(x, None, debiased, training=True, momentum=None, debias=True)[1]
    chex.assert_trees_all_equal(plain, debiased)


@pytest.mark.parametrize("name", ["debias", "unbiased_running_var"])
def test_flags_must_be_bools(name):
    params, state = jaxbn.init(3)
    with pytest.raises(TypeError, match=rf"`{name}` must be a Python bool"):
        jaxbn.batch_norm(jnp.ones((4, 3)), params, state, training=True, **{name: 1})


# ----------------------------------------------------------------------------------------------
# unbiased running variance: torch's convention
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.9, None], ids=["momentum", "cumulative"])
def test_unbiased_running_var_matches_torch_over_steps(momentum):
    params, state = jaxbn.init(3)
    params = {"scale": jnp.array([1.5, 0.5, -1.0]), "bias": jnp.array([0.0, 1.0, 2.0])}
    torch_bn = torch.nn.BatchNorm2d(
        3, eps=ref.EPS, momentum=None if momentum is None else 1 - momentum, dtype=torch.float64
    )
    with torch.no_grad():
        torch_bn.weight.copy_(torch.tensor(np.asarray(params["scale"])))
        torch_bn.bias.copy_(torch.tensor(np.asarray(params["bias"])))
    for step in range(4):
        x = data((4, 3, 2, 2), seed=step, loc=float(step), spread=1.0 + step)
        y, state = batch_norm(
            x, params, state, training=True, axis=1, momentum=momentum, unbiased_running_var=True
        )
        with torch.no_grad():
            y_torch = torch_bn(torch.tensor(np.asarray(x), dtype=torch.float64))
        np.testing.assert_allclose(np.asarray(y), y_torch.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(state.mean, torch_bn.running_mean.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(state.var, torch_bn.running_var.numpy(), atol=1e-5, rtol=1e-5)
        assert int(state.count) == int(torch_bn.num_batches_tracked)


def test_unbiased_running_var_with_mask_counts_valid_entries():
    x = data((6, 3), seed=4)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0]], bool)
    _, state = jaxbn.init(3)
    _, new = batch_norm(
        x, None, state, training=True, momentum=0.5, mask=mask, unbiased_running_var=True
    )
    mean, var, n = ref.moments(x, -1, mask, ddof=1)
    assert n.tolist() == [5, 5, 1]
    expected_var = np.where(n > 1, 0.5 + 0.5 * var, 1.0)  # n=1: variance kept
    np.testing.assert_allclose(new.mean, 0.5 * mean, atol=1e-5)
    np.testing.assert_allclose(new.var, expected_var, atol=1e-5)


def test_unbiased_running_var_with_ghost_batches():
    x = data((8, 2), seed=5)
    _, state = jaxbn.init(2)
    _, new = batch_norm(
        x, None, state, training=True, momentum=0.0, virtual_batch_size=4, unbiased_running_var=True
    )
    groups = [ref.moments(x[i : i + 4], -1, ddof=1) for i in (0, 4)]
    np.testing.assert_allclose(new.mean, np.mean([g[0] for g in groups], 0), atol=1e-5)
    np.testing.assert_allclose(new.var, np.mean([g[1] for g in groups], 0), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# frozen mode (keras trainable=False) is training=False
# ----------------------------------------------------------------------------------------------


def test_frozen_mode_is_eval_gradients_flow_and_state_is_kept():
    x = data((6, 3), seed=6)
    params = {"scale": jnp.array([1.5, 0.5, -1.0]), "bias": jnp.array([0.0, 1.0, 2.0])}
    _, state = jaxbn.init(3)
    state = batch_norm(x, params, state, training=True, momentum=0.5)[1]
    dy = data((6, 3), seed=7)

    def loss(x, params):
        y, new = jaxbn.batch_norm(x, params, state, training=False)
        return jnp.sum(y * dy), new

    (dx, dparams), new = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    chex.assert_trees_all_equal(new, state)
    dx_ref, dscale_ref, dbias_ref = ref.eval_grads(x, dy, state.mean, state.var,
                                                   scale=params["scale"])
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5)
    np.testing.assert_allclose(dparams["scale"], dscale_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dparams["bias"], dbias_ref, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# fully masked and empty batches: finite output, state unchanged (flax gives NaN)
# ----------------------------------------------------------------------------------------------


def _trained_state():
    _, state = jaxbn.init(3)
    return batch_norm(data((8, 3)), None, state, training=True, momentum=0.5)[1]


CALLS = {
    "batch_norm": lambda x, p, s, **kw: batch_norm(x, p, s, training=True, **kw),
    "batch_renorm": lambda x, p, s, **kw: batch_renorm(
        x, p, s, training=True, r_max=3.0, d_max=5.0, **kw
    ),
    "ghost": lambda x, p, s, **kw: batch_norm(x, p, s, training=True, virtual_batch_size=2, **kw),
    "debias": lambda x, p, s, **kw: batch_norm(
        x, p, s, training=True, debias=True, unbiased_running_var=True, **kw
    ),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("case", ["fully-masked", "empty"])
def test_fully_masked_or_empty_batch_is_finite_and_keeps_the_state(call, case):
    params, _ = jaxbn.init(3)
    state = _trained_state()
    if case == "empty":
        x, kwargs = jnp.zeros((0, 3)), {}
    else:
        x, kwargs = data((4, 3)), {"mask": jnp.zeros((4, 1), bool)}
    y, new = CALLS[call](x, params, state, **kwargs)
    assert y.shape == x.shape
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_equal(new, state)
    grad = jax.grad(lambda x: jnp.sum(CALLS[call](x, params, state, **kwargs)[0]))(x)
    chex.assert_tree_all_finite(grad)


def test_flax_gives_nan_on_a_fully_masked_batch_for_the_record():
    x, mask = data((4, 3)), jnp.zeros((4, 3), bool)
    bn = nn.BatchNorm(use_running_average=False, momentum=0.5)
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    assert np.any(np.isnan(np.asarray(y))) or np.any(
        np.isnan(np.asarray(updates["batch_stats"]["mean"]))
    )
    y_ours, state = jaxbn.batch_norm(x, None, jaxbn.init(3)[1], training=True, mask=mask)
    chex.assert_tree_all_finite(y_ours)
    assert int(state.count) == 0


# ----------------------------------------------------------------------------------------------
# the flax drop-ins translate the options to the core functions
# ----------------------------------------------------------------------------------------------

DROP_IN_OPTIONS = [
    {"virtual_batch_size": 2},
    {"debias": True},
    {"unbiased_running_var": True},
    {"use_renorm": True, "r_max": 1.5, "d_max": 1.0},
]


def _core(x, state, options):
    options = dict(options)
    if options.pop("use_renorm", False):
        return jaxbn.batch_renorm(x, None, state, training=True, momentum=0.9, **options)
    return jaxbn.batch_norm(x, None, state, training=True, momentum=0.9, **options)


@pytest.mark.parametrize("options", DROP_IN_OPTIONS, ids=lambda o: ",".join(o))
def test_linen_options_match_the_core_over_two_steps(options):
    from jaxbn.linen import BatchNorm

    xs = [data((4, 3), seed=s) for s in range(2)]
    bn = BatchNorm(False, -1, 0.9, use_scale=False, use_bias=False, **options)
    variables = bn.init(jax.random.key(0), xs[0])
    assert ("count" in variables["batch_stats"]) == options.get("debias", False)
    state = jaxbn.init(3)[1]
    for x in xs:
        y, updates = bn.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        y_core, state = _core(x, state, options)
        np.testing.assert_allclose(y, y_core, atol=1e-6)
        np.testing.assert_allclose(updates["batch_stats"]["mean"], state.mean, atol=1e-6)
        np.testing.assert_allclose(updates["batch_stats"]["var"], state.var, atol=1e-6)
    if options.get("debias"):
        assert int(variables["batch_stats"]["count"]) == 2


@pytest.mark.parametrize("options", DROP_IN_OPTIONS, ids=lambda o: ",".join(o))
def test_nnx_options_match_the_core_over_two_steps(options):
    from flax import nnx

    from jaxbn.nnx import BatchNorm

    xs = [data((4, 3), seed=s) for s in range(2)]
    layer = BatchNorm(3, momentum=0.9, use_scale=False, use_bias=False, rngs=nnx.Rngs(0), **options)
    assert (layer.count is not None) == options.get("debias", False)
    state = jaxbn.init(3)[1]
    for x in xs:
        y = layer(x)
        y_core, state = _core(x, state, options)
        np.testing.assert_allclose(y, y_core, atol=1e-6)
        np.testing.assert_allclose(layer.mean[...], state.mean, atol=1e-6)
        np.testing.assert_allclose(layer.var[...], state.var, atol=1e-6)
    if options.get("debias"):
        assert int(layer.count[...]) == 2


def test_linen_renorm_bounds_may_be_traced_inside_a_parent_module():
    from jaxbn.linen import BatchNorm

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, r_max, d_max):
            return BatchNorm(False, use_renorm=True, r_max=r_max, d_max=d_max)(x)

    x = data((8, 3))
    variables = Model().init(jax.random.key(0), x, 1.0, 0.0)
    apply = jax.jit(lambda v, r, d: Model().apply(v, x, r, d, mutable=["batch_stats"])[0])
    y = apply(variables, jnp.float32(1.0), jnp.float32(0.0))
    np.testing.assert_allclose(y, jaxbn.batch_norm(x, *jaxbn.init(3), training=True)[0], atol=1e-6)
    assert apply(variables, jnp.float32(3.0), jnp.float32(5.0)).shape == x.shape

"""jaxbn.batch_renorm against the float64 reference (tests/_reference.py): outputs, gradients,
state, options."""

from __future__ import annotations

import functools

import _reference as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

STATIC = ("training", "axis", "momentum", "virtual_batch_size", "debias", "unbiased_running_var")
batch_renorm = jax.jit(jaxbn.batch_renorm, static_argnames=STATIC)
batch_norm = jax.jit(jaxbn.batch_norm, static_argnames=STATIC)

# Running statistics chosen so that, with r_max=1.5 and d_max=1, feature 0 is unclipped,
# feature 1 has r clipped below (σ_B/σ = 0.5) and feature 2 both r and d clipped above.
STATE = jaxbn.BatchStats(
    mean=jnp.array([0.5, 1.0, -3.0]), var=jnp.array([1.0, 4.0, 0.01]), count=jnp.array(3, jnp.int32)
)
PARAMS = {"scale": jnp.array([1.5, -0.5, 2.0]), "bias": jnp.array([0.1, 0.2, 0.3])}


def data(shape, seed=0):
    z = np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float64)
    red = tuple(range(z.ndim - 1))
    z = (z - z.mean(red)) / z.std(red)  # exactly mean 0, std 1 per feature
    return jnp.asarray(z * np.array([1.2, 1.0, 1.0]) + np.array([1.0, 1.0, 0.0]), jnp.float32)


def reference(x, r_max, d_max, mask=None):
    """The float64 reference with this file's running statistics and parameters."""
    return ref.batch_renorm(x, STATE.mean, STATE.var, PARAMS["scale"], PARAMS["bias"], r_max,
                            d_max, mask=mask)


def test_output_matches_numpy_with_clipped_and_unclipped_features():
    x = data((32, 3))
    y, new = batch_renorm(x, PARAMS, STATE, training=True, r_max=1.5, d_max=1.0, momentum=0.9)
    y_ref, (mean_b, var_b, r, d, _, _) = reference(x, 1.5, 1.0)
    np.testing.assert_allclose(r, [1.2, 1 / 1.5, 1.5], rtol=1e-4)  # the cases are as intended
    np.testing.assert_allclose(d, [0.5, 0.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=3e-5, rtol=1e-5)
    # The running statistics are updated exactly as batch_norm updates them.
    np.testing.assert_allclose(new.mean, ref.ema(STATE.mean, mean_b, 0.9), atol=1e-6)
    np.testing.assert_allclose(new.var, ref.ema(STATE.var, var_b, 0.9), rtol=1e-5)
    assert int(new.count) == 4


def test_unclipped_renorm_equals_the_eval_output():
    x = data((32, 3))
    y, _ = batch_renorm(x, PARAMS, STATE, training=True, r_max=1e3, d_max=1e3)
    y_eval, _ = batch_norm(x, PARAMS, STATE, training=False)
    np.testing.assert_allclose(y, y_eval, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"axis": 1, "momentum": None},
        {"mask": "rows"},
        {"virtual_batch_size": 4, "unbiased_running_var": True, "debias": True},
    ],
    ids=["NHWC", "NCHW-cumulative", "mask", "ghost-unbiased-debias"],
)
def test_r_max_1_d_max_0_is_batch_norm(kwargs):
    kwargs = dict(kwargs)
    x = data((8, 4, 4, 3), seed=1)
    params, state = PARAMS, STATE
    if kwargs.get("axis") == 1:
        x = jnp.moveaxis(x, -1, 1)
    if kwargs.get("mask") == "rows":
        kwargs["mask"] = jnp.arange(8).reshape(8, 1, 1, 1) % 3 != 0
    dy = jax.random.normal(jax.random.key(2), x.shape)

    def loss(fn, x, params, **extra):
        y, new = fn(x, params, state, training=True, **extra, **kwargs)
        return jnp.sum(y * dy), (y, new)

    renorm = jax.jit(
        jax.grad(
            lambda x, p: loss(jaxbn.batch_renorm, x, p, r_max=1.0, d_max=0.0),
            argnums=(0, 1),
            has_aux=True,
        )
    )
    plain = jax.jit(
        jax.grad(lambda x, p: loss(jaxbn.batch_norm, x, p), argnums=(0, 1), has_aux=True)
    )
    ours, theirs = renorm(x, params), plain(x, params)
    chex.assert_trees_all_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_gradients_match_the_numpy_analytic_formula():
    x = data((16, 3), seed=3)
    dy = np.asarray(jax.random.normal(jax.random.key(4), x.shape), np.float64)

    def loss(x, params):
        return jnp.sum(
            jaxbn.batch_renorm(x, params, STATE, training=True, r_max=1.5, d_max=1.0)[0] * dy
        )

    dx, dparams = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, PARAMS)
    _, (_, _, r, d, x_tilde, _) = reference(x, 1.5, 1.0)
    # r and d are constants: y = scale·(r·x̃ + d) + bias is batch norm with gain scale·r.
    dx_ref = ref.grads(x, dy, -1, np.asarray(PARAMS["scale"], np.float64) * r)[0]
    np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dparams["scale"], (dy * (x_tilde * r + d)).sum(0), rtol=1e-4)
    np.testing.assert_allclose(dparams["bias"], dy.sum(0), rtol=1e-5)


def test_gradients_match_finite_differences_in_float64_with_r_and_d_held():
    x = np.asarray(data((6, 3), seed=5), np.float64)
    dy = np.asarray(jax.random.normal(jax.random.key(6), x.shape), np.float64)
    _, (_, _, r, d, _, _) = reference(x, 1.5, 1.0)
    scale, bias = (np.asarray(PARAMS[k], np.float64) for k in ("scale", "bias"))

    def f(x):  # r and d held at their values: stop_gradient
        return np.sum(ref.normalize(x, x.mean(0), x.var(0), -1, scale * r, scale * d + bias) * dy)

    fd = ref.jacobian(f, [x], 0)
    dx = jax.grad(
        lambda x: jnp.sum(
            jaxbn.batch_renorm(x, PARAMS, STATE, training=True, r_max=1.5, d_max=1.0)[0] * dy
        )
    )(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(dx, fd, atol=2e-4, rtol=1e-3)


def test_traced_r_max_d_max_ramp_under_jit_compiles_once():
    traces = []

    @jax.jit
    def step(x, state, r_max, d_max):
        traces.append(None)
        return jaxbn.batch_renorm(x, PARAMS, state, training=True, r_max=r_max, d_max=d_max)

    x = data((32, 3))
    for r_max, d_max in [(1.0, 0.0), (1.5, 1.0), (3.0, 5.0)]:
        y, _ = step(x, STATE, jnp.float32(r_max), jnp.float32(d_max))
        y_ref, _ = reference(x, r_max, d_max)
        np.testing.assert_allclose(np.asarray(y), y_ref, atol=3e-5, rtol=1e-5)
    assert len(traces) == 1


def test_ramp_inside_scan_with_a_traced_schedule():
    xs = jnp.stack([data((16, 3), seed=s) for s in range(4)])

    def body(state, inputs):
        x, t = inputs
        r_max = 1.0 + 2.0 * t  # the paper's ramp, computed from the step
        d_max = 5.0 * t
        y, state = jaxbn.batch_renorm(x, PARAMS, state, training=True, r_max=r_max, d_max=d_max)
        return state, y

    final, ys = jax.jit(lambda s: jax.lax.scan(body, s, (xs, jnp.linspace(0.0, 1.0, 4))))(STATE)
    state = STATE
    for i in range(4):
        t = i / 3
        y, state = batch_renorm(xs[i], PARAMS, state, training=True, r_max=1 + 2 * t, d_max=5 * t)
        np.testing.assert_allclose(ys[i], y, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(final, state, rtol=1e-6)


def test_eval_is_batch_norm_eval_and_returns_the_state():
    x = data((8, 3))
    y, same = jaxbn.batch_renorm(x, PARAMS, STATE, training=False, r_max=3.0, d_max=5.0)
    assert same is STATE
    np.testing.assert_allclose(y, jaxbn.batch_norm(x, PARAMS, STATE, training=False)[0])


def test_mask_and_ghost_batches_match_numpy():
    x = data((8, 3), seed=7)
    mask = jnp.arange(8).reshape(8, 1) % 4 != 1
    y, _ = batch_renorm(x, PARAMS, STATE, training=True, r_max=1.5, d_max=1.0, mask=mask)
    np.testing.assert_allclose(y, reference(x, 1.5, 1.0, mask)[0], atol=3e-5)
    y, _ = batch_renorm(x, PARAMS, STATE, training=True, r_max=1.5, d_max=1.0, virtual_batch_size=4)
    y_ref = np.concatenate([reference(x[i : i + 4], 1.5, 1.0)[0] for i in (0, 4)])
    np.testing.assert_allclose(y, y_ref, atol=3e-5, rtol=1e-5)


def test_synchronized_split_batch_equals_the_full_batch():
    x = data((16, 3), seed=8)

    def per_device(x):
        return jaxbn.batch_renorm(
            x, PARAMS, STATE, training=True, r_max=1.5, d_max=1.0, axis_name="batch"
        )

    ys, states = jax.jit(jax.vmap(per_device, axis_name="batch"))(x.reshape(4, 4, 3))
    y, state = batch_renorm(x, PARAMS, STATE, training=True, r_max=1.5, d_max=1.0)
    np.testing.assert_allclose(ys.reshape(16, 3), y, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(states.mean[0], state.mean, atol=1e-6)
    np.testing.assert_allclose(states.var[3], state.var, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_keeps_its_dtype_and_float32_state(dtype):
    x = data((16, 3)).astype(dtype)
    y, new = batch_renorm(x, PARAMS, STATE, training=True, r_max=1.5, d_max=1.0)
    assert y.dtype == dtype
    assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, STATE)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), reference(x, 1.5, 1.0)[0], atol=0.05, rtol=0.02
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r_max": 0.5, "d_max": 0.0}, ValueError, r"`r_max` must be >= 1"),
        ({"r_max": 1.0, "d_max": -1.0}, ValueError, r"`d_max` must be >= 0"),
        ({"r_max": [2.0, 3.0], "d_max": 0.0}, TypeError, r"`r_max` must be a real scalar"),
        ({"r_max": 2.0, "d_max": None}, TypeError, r"`d_max` must be a real scalar"),
        ({"r_max": 2.0, "d_max": "5"}, TypeError, r"`d_max` must be a real scalar"),
        ({"r_max": 2.0, "d_max": 1.0, "momentum": 1.0}, ValueError, r"`momentum` must lie"),
        ({"r_max": 2.0, "d_max": 1.0, "virtual_batch_size": 3}, ValueError, r"must divide"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxbn.batch_renorm(data((8, 3)), PARAMS, STATE, training=True, **kwargs)


def test_concrete_bounds_are_checked_in_eval_too_and_traced_ones_pass():
    with pytest.raises(ValueError, match=r"`r_max` must be >= 1"):
        jaxbn.batch_renorm(data((8, 3)), PARAMS, STATE, training=False, r_max=0.0, d_max=0.0)
    # A traced bound cannot be checked at trace time; it is simply used.
    x = data((8, 3))
    f = jax.jit(
        lambda r: jaxbn.batch_renorm(x, PARAMS, STATE, training=True, r_max=r, d_max=0.0)[0]
    )
    assert f(jnp.float32(2.0)).shape == (8, 3)


def test_shard_map_outputs_state_and_gradients_equal_the_full_batch():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("batch",))
    x = data((16, 3), seed=9)

    def per_device(x, params, state):
        return jaxbn.batch_renorm(
            x, params, state, training=True, r_max=1.5, d_max=1.0, axis_name="batch"
        )

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=(P("batch"), P())
    )
    placed = jax.device_put(x, NamedSharding(mesh, P("batch")))
    params, state = jax.device_put((PARAMS, STATE), NamedSharding(mesh, P()))
    y, new = jax.jit(sharded)(placed, params, state)
    y_ref, new_ref = batch_renorm(x, PARAMS, STATE, training=True, r_max=1.5, d_max=1.0)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(new, new_ref, rtol=1e-5, atol=1e-6)

    def loss(fn, x, params, state):
        return jnp.sum(fn(x, params, state)[0] ** 3)

    grads = jax.jit(jax.grad(lambda x, p: loss(sharded, x, p, state), argnums=(0, 1)))(
        placed, params
    )
    full = functools.partial(batch_renorm, training=True, r_max=1.5, d_max=1.0)
    grads_ref = jax.grad(lambda x, p: loss(full, x, p, STATE), argnums=(0, 1))(x, PARAMS)
    chex.assert_trees_all_close(grads, grads_ref, atol=1e-4, rtol=1e-4)

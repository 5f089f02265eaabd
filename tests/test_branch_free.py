"""Training mode has no runtime branch, and its accuracy comes from the arithmetic.

A conditional on a GPU copies its predicate to the host and waits for the device, and under
``vmap`` it runs both branches; so training mode must lower to straight-line code on every
platform, while the variance stays accurate at |mean|/std = 1e4 (where flax's default
E[x²] - E[x]² loses it entirely).
"""

import _reference as ref
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from experiments.hlo import count_passes

PLATFORMS = ("cpu", "cuda", "tpu")
CONDITIONALS = ("stablehlo.case", "stablehlo.if", "stablehlo.while")


def _conditionals(function, *args, platform):
    """Conditional and loop ops in ``function`` exported (lowered) for ``platform``."""
    module = jax.export.export(jax.jit(function), platforms=[platform])(*args).mlir_module()
    return {op: module.count(op) for op in CONDITIONALS if op in module}


def _training_loss(x, params, state, **kwargs):
    y, new_state = jaxbn.batch_norm(x, params, state, training=True, **kwargs)
    return jnp.sum(jnp.square(y.astype(jnp.float32))) + jnp.sum(new_state.mean)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_training_gradient_lowers_without_conditionals(platform, dtype, masked):
    params, state = jaxbn.init(16)
    x = jnp.ones((8, 4, 16), dtype)
    mask = jnp.arange(8)[:, None, None] < 5 if masked else None
    grad = jax.grad(lambda x, p: _training_loss(x, p, state, mask=mask), argnums=(0, 1))
    assert _conditionals(grad, x, params, platform=platform) == {}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_synchronized_training_lowers_without_conditionals(platform):
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
    params, state = jaxbn.init(16)

    def per_device(x, params, mask):
        y, new_state = jaxbn.batch_norm(
            x, params, state, training=True, axis_name="batch", mask=mask
        )
        return jnp.sum(jnp.square(y))[None], new_state

    def loss(x, params, mask):
        sums, new_state = jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("batch"), P(), P("batch")),
            out_specs=(P("batch"), P()),
        )(x, params, mask)
        return jnp.sum(sums) + jnp.sum(new_state.var)

    x = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("batch")))
    mask = jax.device_put(jnp.arange(64)[:, None] % 3 > 0, NamedSharding(mesh, P("batch")))
    grad = jax.grad(loss, argnums=(0, 1))
    assert _conditionals(grad, x, params, mask, platform=platform) == {}


def _forward_backward(shape, axis, dtype):
    params, state = jaxbn.init(shape[axis])

    def forward_backward(x, params, state, dy):
        def layer(x, params):
            return jaxbn.batch_norm(x, params, state, training=True, axis=axis)

        (y, new_state), vjp = jax.vjp(layer, x, params)
        return y, new_state, vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))

    return forward_backward, params, state


@pytest.mark.parametrize(
    ("shape", "axis", "dtype"),
    [((32, 8, 8, 16), -1, jnp.float32), ((32, 16, 8, 8), 1, jnp.float32),
     ((32, 8, 8, 16), -1, jnp.bfloat16), ((256, 64), -1, jnp.float32)],
    ids=["NHWC", "NCHW", "bfloat16", "dense"],
)
def test_vmap_over_an_ensemble_adds_no_pass(shape, axis, dtype):
    # A cond under vmap becomes a select that runs both branches; straight-line code
    # vectorizes to the same kernels with one more batch axis.
    members = 4
    step, params, state = _forward_backward(shape, axis, dtype)
    x = jnp.ones(shape, dtype)
    single = count_passes(
        jax.jit(step).lower(x, params, state, x).compile().as_text(), x.size
    )
    stack = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * members), tree)  # noqa: E731
    xs = stack(x)
    ensemble = count_passes(
        jax.jit(jax.vmap(step)).lower(xs, stack(params), stack(state), xs).compile().as_text(),
        xs.size,
    )
    # Per element of the ensemble: no more reads, writes or float32 copies than one member's
    # (whose counts on XLA:CPU tests/test_bench.py bounds).
    assert ensemble.reads <= single.reads, (ensemble, single)
    assert ensemble.writes <= single.writes, (ensemble, single)
    assert ensemble.f32_copies <= single.f32_copies, (ensemble, single)


# Accuracy at |mean|/std = 1e4: the variance's relative error against float64, < 1e-3.
TOLERANCE = 1e-3


def _relative_error(value, reference):
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(value - reference) / reference))


def _batch_var(x, state, **kwargs):
    """The batch variance, read off a state updated with momentum 0."""
    _, new_state = jaxbn.batch_norm(x, None, state, training=True, momentum=0.0, **kwargs)
    return new_state.var


def _large_mean_data(seed, shape, scale=1.0):
    rng = np.random.default_rng(seed)
    features = shape[-1]
    means = 1e4 * scale * (1.0 + np.arange(features))  # |mean|/std from 1e4 up
    return (means + scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(512, 6), (16, 8, 8, 6)], ids=["dense", "conv"])
def test_first_batch_from_a_fresh_state(shape):
    x = _large_mean_data(0, shape)
    _, state = jaxbn.init(6)
    var = _batch_var(x, state)
    assert _relative_error(var, ref.moments(x)[1]) < TOLERANCE


def test_batch_far_from_the_running_mean():
    _, state = jaxbn.init(6)
    state = state._replace(mean=jnp.full(6, -1e4), var=jnp.full(6, 1e-2))
    x = _large_mean_data(1, (512, 6))
    for shift in (0.0, -2e4):  # far on either side of the running mean
        var = _batch_var(x + np.float32(shift), state)
        reference = ref.moments(x + np.float32(shift))[1]
        assert _relative_error(var, reference) < TOLERANCE


def test_masked_entries_holding_nan():
    x = _large_mean_data(2, (256, 6))
    valid = np.arange(256) >= 40  # the first rows are padding
    x[~valid] = np.nan
    _, state = jaxbn.init(6)
    var = _batch_var(x, state, mask=valid[:, None])
    assert np.all(np.isfinite(var))
    assert _relative_error(var, ref.moments(x[valid])[1]) < TOLERANCE


def test_bfloat16_within_its_own_rounding():
    # bfloat16 keeps 8 significant bits, so x itself is rounded to steps of 64 near 1e4, and
    # |mean|/std ≈ 270 is about the most it can hold (one-pass float32 is off by 75% there).
    # The reference is the float64 variance of the bfloat16 values the layer receives.
    rng = np.random.default_rng(3)
    x = jnp.asarray(1e4 + 32.0 * rng.standard_normal((2048, 4)), jnp.bfloat16)
    _, state = jaxbn.init(4)
    var = _batch_var(x, state)
    reference = ref.moments(x)[1]
    assert _relative_error(var, reference) < TOLERANCE


def test_devices_with_uneven_counts():
    devices, rows = 8, 16
    mesh = jax.make_mesh((devices,), ("batch",), axis_types=(AxisType.Auto,))
    x = _large_mean_data(4, (devices * rows, 6))
    valid = (np.arange(devices * rows) % rows) < np.repeat(np.arange(1, devices + 1), rows)
    x[~valid] = np.nan
    _, state = jaxbn.init(6)

    def per_device(x, mask):
        return _batch_var(x, state, mask=mask, axis_name="batch")

    sharded = NamedSharding(mesh, P("batch"))
    var = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P())
    )(jax.device_put(x, sharded), jax.device_put(valid[:, None], sharded))
    assert _relative_error(var, ref.moments(x[valid])[1]) < TOLERANCE


@pytest.mark.parametrize("shape", [(512, 6), (16, 8, 8, 6)], ids=["dense", "conv"])
def test_flax_fast_variance_fails_where_we_do_not(shape):
    # Negative control: flax.linen.BatchNorm with its defaults (the one-pass
    # E[x²] - E[x]², clipped at 0) is far off on the same data, so the tests above would
    # catch a return to that formula.
    x = _large_mean_data(0, shape)
    module = nn.BatchNorm(use_running_average=False, momentum=0.0)
    assert module.use_fast_variance
    with jax.numpy_dtype_promotion("standard"):
        variables = module.init(jax.random.key(0), x)
        _, updates = module.apply(variables, x, mutable=["batch_stats"])
    assert _relative_error(updates["batch_stats"]["var"], ref.moments(x)[1]) > 0.5

"""Cross-device batch norm on 8 host CPU devices equals batch norm on the concatenated batch.

The truth is the float64 reference of tests/_reference.py (outputs, running statistics and the
analytic gradient of a linear loss), evaluated over the valid rows of the whole global batch
(or of each group with ``axis_index_groups``). The same problem runs under ``jax.shard_map``
(1-D and 2-D meshes), ``jax.pmap``, ``jax.vmap(axis_name=...)`` and sharded ``jax.jit``
without ``axis_name``. Also here: uneven masks across devices next to ``flax.linen.BatchNorm``,
and the number of collectives in the compiled HLO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import _reference as ref
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from experiments.hlo import count_collectives

DEVICES = 8
ROWS = 8  # rows per device
FEATURES = 6
MOMENTUM = 0.9
EPSILON = 1e-5
GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]

# Valid rows per device. "uneven": device i keeps i+1 of its 8 rows (no device is empty, so
# flax's per-device masked mean stays finite). "empty": two devices are fully masked.
MASKS = {
    "none": None,
    "uneven": [1, 2, 3, 4, 5, 6, 7, 8],
    "empty": [3, 0, 8, 1, 0, 5, 2, 7],
}

# float32 against float64 on values of size ~20: a few ulps of the largest intermediate.
ATOL = 2e-5
GRAD_ATOL = 1e-4


# --------------------------------------------------------------------------- the problem


class Problem(NamedTuple):
    x: np.ndarray  # float32 [DEVICES * ROWS, FEATURES]; device d's rows have mean ~3d
    scale: np.ndarray  # float32 [FEATURES]
    bias: np.ndarray  # float32 [FEATURES]
    mean0: np.ndarray  # float32 [FEATURES]: initial running mean
    var0: np.ndarray  # float32 [FEATURES]: initial running variance
    cotangent: np.ndarray  # float32 like x: the loss is sum(y * cotangent)
    valid: np.ndarray  # bool [DEVICES * ROWS]: which rows count toward the statistics


def make_problem(mask_kind: str, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    device = np.repeat(np.arange(DEVICES), ROWS)[:, None]
    # Devices differ in mean and spread, so weighting devices equally (rather than by their
    # valid counts) gives visibly wrong statistics.
    x = rng.normal(size=(DEVICES * ROWS, FEATURES)) * (1.0 + 0.25 * device) + 3.0 * device
    counts = MASKS[mask_kind]
    if counts is None:
        valid = np.ones(DEVICES * ROWS, bool)
    else:
        valid = np.concatenate([np.arange(ROWS) < c for c in counts])
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return Problem(
        x=f32(x),
        scale=f32(rng.uniform(0.5, 2.0, FEATURES)),
        bias=f32(rng.normal(size=FEATURES)),
        mean0=f32(rng.normal(size=FEATURES)),
        var0=f32(rng.uniform(0.5, 2.0, FEATURES)),
        cotangent=f32(rng.normal(size=x.shape)),
        valid=valid,
    )


def reference_bn(p: Problem, rows: slice = slice(None)) -> ref.TrainStep:
    """The float64 reference over ``rows`` of the problem, statistics over the valid rows."""
    return ref.train_step(
        p.x[rows],
        p.cotangent[rows],
        scale=p.scale,
        bias=p.bias,
        running_mean=p.mean0,
        running_var=p.var0,
        momentum=MOMENTUM,
        mask=p.valid[rows, None],
        eps=EPSILON,
    )


def grouped_reference(p: Problem, groups: list[list[int]] | None) -> ref.TrainStep:
    """The reference when each group of devices normalizes its own concatenated batch."""
    if groups is None:
        return reference_bn(p)
    parts = []
    for group in groups:
        assert group == list(range(group[0], group[-1] + 1)), "contiguous groups only"
        parts.append(reference_bn(p, slice(group[0] * ROWS, (group[-1] + 1) * ROWS)))
    per_row = lambda field: np.concatenate([getattr(r, field) for r in parts])  # noqa: E731
    return ref.TrainStep(
        y=per_row("y"),
        mean=np.stack([r.mean for r in parts]),
        var=np.stack([r.var for r in parts]),
        dx=per_row("dx"),
        dscale=sum(r.dscale for r in parts),
        dbias=sum(r.dbias for r in parts),
    )


# --------------------------------------------------------------------------- the transforms
#
# Each runner takes global arrays (x [64, C], params, state, mask [64, 1] or None) and returns
# the global output [64, C] and the new state of every replica, stacked on a leading axis, so
# the test sees each device's copy (a replicated out_spec would silently keep device 0's).


def _bn(x, params, state, mask, **kwargs):
    return jaxbn.batch_norm(
        x, params, state, training=True, momentum=MOMENTUM, epsilon=EPSILON, mask=mask, **kwargs
    )


def _stacked(state: jaxbn.BatchStats) -> jaxbn.BatchStats:
    return jax.tree.map(lambda a: a[None], state)


def _mesh(shape: tuple[int, ...], names: tuple[str, ...], axis_type=AxisType.Explicit):
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def _placer(mesh, batch_spec):
    """Places x and mask split over the batch by ``batch_spec``, params and state replicated."""

    def place(x, params, state, mask):
        batch = NamedSharding(mesh, batch_spec)
        replicated = NamedSharding(mesh, P())
        return (
            jax.device_put(x, batch),
            jax.device_put(params, replicated),
            jax.device_put(state, replicated),
            None if mask is None else jax.device_put(mask, batch),
        )

    return place


def _shard_map_runner(mesh, batch_axes, axis_name, groups=None, check_vma=True):
    # check_vma=True is JAX's default; with False, JAX inserts no implicit psum/pvary, so the
    # gradient must come from the collectives jaxbn itself emits (and their transposes).
    spec = P(batch_axes)

    def per_device(x, params, state, mask):
        y, new_state = _bn(x, params, state, mask, axis_name=axis_name, axis_index_groups=groups)
        return y, _stacked(new_state)

    def run(x, params, state, mask):
        mask_spec = None if mask is None else spec
        return jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(spec, P(), P(), mask_spec),
            out_specs=(spec, spec),
            check_vma=check_vma,
        )(x, params, state, mask)

    return run, _placer(mesh, spec)


def _unplaced(x, params, state, mask):
    return x, params, state, mask


def _pmap_runner(groups=None):
    def run(x, params, state, mask):
        chunk = lambda a: a.reshape(DEVICES, ROWS, *a.shape[1:])  # noqa: E731
        mapped = jax.pmap(
            lambda x, params, state, mask: _bn(
                x, params, state, mask, axis_name="batch", axis_index_groups=groups
            ),
            axis_name="batch",
            in_axes=(0, None, None, None if mask is None else 0),
        )
        y, states = mapped(chunk(x), params, state, None if mask is None else chunk(mask))
        return y.reshape(x.shape), states

    return run, _unplaced


def _vmap_chunks_runner():
    def run(x, params, state, mask):
        chunk = lambda a: a.reshape(DEVICES, ROWS, *a.shape[1:])  # noqa: E731
        mapped = jax.vmap(
            lambda x, params, state, mask: _bn(x, params, state, mask, axis_name="batch"),
            in_axes=(0, None, None, None if mask is None else 0),
            axis_name="batch",
        )
        y, states = mapped(chunk(x), params, state, None if mask is None else chunk(mask))
        return y.reshape(x.shape), states

    return run, _unplaced


def _vmap_examples_runner():
    # One example per vmapped instance: x is [C], every axis a feature axis, and all the
    # reduction happens across the named axis.
    def run(x, params, state, mask):
        mapped = jax.vmap(
            lambda x, params, state, mask: _bn(x, params, state, mask, axis_name="batch"),
            in_axes=(0, None, None, None if mask is None else 0),
            axis_name="batch",
        )
        return mapped(x, params, state, mask)

    return run, _unplaced


def _vmap_nested_runner():
    # Tuple axis names under nested vmap: the batch is split [2, 4, rows] over names a and b.
    def run(x, params, state, mask):
        chunk = lambda a: a.reshape(2, 4, ROWS, *a.shape[1:])  # noqa: E731
        in_axes = (0, None, None, None if mask is None else 0)
        inner = jax.vmap(
            lambda x, params, state, mask: _bn(x, params, state, mask, axis_name=("a", "b")),
            in_axes=in_axes,
            axis_name="b",
        )
        mapped = jax.vmap(inner, in_axes=in_axes, axis_name="a")
        y, states = mapped(chunk(x), params, state, None if mask is None else chunk(mask))
        return y.reshape(x.shape), jax.tree.map(lambda a: a.reshape(DEVICES, *a.shape[2:]), states)

    return run, _unplaced


def _sharded_jit_runner(axis_type):
    mesh = _mesh((DEVICES,), ("batch",), axis_type)

    def run(x, params, state, mask):
        y, new_state = _bn(x, params, state, mask)  # no axis_name: XLA inserts the reductions
        return y, _stacked(new_state)

    return run, _placer(mesh, P("batch"))


RUNNERS: dict[str, Callable[[], tuple[Callable, Callable]]] = {
    "shard_map": lambda: _shard_map_runner(_mesh((DEVICES,), ("batch",)), "batch", "batch"),
    "shard_map_unchecked": lambda: _shard_map_runner(
        _mesh((DEVICES,), ("batch",)), "batch", "batch", check_vma=False
    ),
    # Tuple axis names: the batch is split over both axes of a (2, 4) mesh.
    "shard_map_2d": lambda: _shard_map_runner(_mesh((2, 4), ("a", "b")), ("a", "b"), ("a", "b")),
    "pmap": _pmap_runner,
    "vmap_chunks": _vmap_chunks_runner,
    "vmap_examples": _vmap_examples_runner,
    # A tuple of vmapped names (a plain all_gather over both trips an assertion in JAX's
    # batching rule; jaxbn gathers vmap names one at a time).
    "vmap_nested_2d": _vmap_nested_runner,
    "sharded_jit_explicit": lambda: _sharded_jit_runner(AxisType.Explicit),
    "sharded_jit_auto": lambda: _sharded_jit_runner(AxisType.Auto),
}


# --------------------------------------------------------------------------- harness


def run_with_grads(
    run: Callable, place: Callable, p: Problem, mask_kind: str, jit: bool = True, dtype=jnp.float32
):
    """Outputs, stacked new states and d(sum(y * g))/d(x, scale, bias) through ``run``."""
    params, state = jaxbn.init(FEATURES)
    params = {"scale": jnp.asarray(p.scale), "bias": jnp.asarray(p.bias)}
    state = state._replace(mean=jnp.asarray(p.mean0), var=jnp.asarray(p.var0))
    mask = None if MASKS[mask_kind] is None else jnp.asarray(p.valid[:, None])
    x, params, state, mask = place(jnp.asarray(p.x, dtype), params, state, mask)
    cotangent = jnp.asarray(p.cotangent)

    def loss(x, params):
        y, states = run(x, params, state, mask)
        return jnp.sum(y.astype(jnp.float32) * cotangent), (y, states)

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if jit:
        grad_fn = jax.jit(grad_fn)
    (_, (y, states)), (dx, dparams) = grad_fn(x, params)
    return y, states, dx, dparams


def assert_matches(
    y, states, dx, dparams, expected: ref.TrainStep, replicas_per_state: int | None = None
):
    """Compares everything with the reference; states are [replicas, C] (or per group)."""
    np.testing.assert_allclose(np.asarray(y), expected.y, atol=ATOL, rtol=0, err_msg="output")
    mean, var = np.asarray(states.mean), np.asarray(states.var)
    if expected.mean.ndim == 1:
        expected_mean = np.broadcast_to(expected.mean, mean.shape)
        expected_var = np.broadcast_to(expected.var, var.shape)
    else:  # one row per group, repeated for each device of the group
        expected_mean = np.repeat(expected.mean, replicas_per_state, axis=0)
        expected_var = np.repeat(expected.var, replicas_per_state, axis=0)
    np.testing.assert_allclose(mean, expected_mean, atol=ATOL, rtol=0, err_msg="running mean")
    np.testing.assert_allclose(var, expected_var, atol=ATOL, rtol=0, err_msg="running var")
    np.testing.assert_array_equal(np.asarray(states.count), 1, err_msg="count")
    np.testing.assert_allclose(np.asarray(dx), expected.dx, atol=GRAD_ATOL, rtol=0, err_msg="dx")
    np.testing.assert_allclose(
        np.asarray(dparams["scale"]), expected.dscale, atol=GRAD_ATOL, rtol=1e-5, err_msg="dscale"
    )
    np.testing.assert_allclose(
        np.asarray(dparams["bias"]), expected.dbias, atol=GRAD_ATOL, rtol=1e-5, err_msg="dbias"
    )


# --------------------------------------------------------------------------- tests


def test_eight_host_devices():
    assert jax.device_count() == DEVICES, jax.devices()


@pytest.mark.parametrize("mask_kind", ["none", "empty"])
@pytest.mark.parametrize("runner", list(RUNNERS))
def test_equals_single_device_on_concatenated_batch(runner, mask_kind):
    """Outputs, every replica's new state and gradients equal float64 BN on the whole batch.

    With the "empty" mask, two devices contribute no row to the statistics at all (their rows
    are still normalized), and the others contribute between 1 and 8 rows.
    """
    p = make_problem(mask_kind)
    run, place = RUNNERS[runner]()
    y, states, dx, dparams = run_with_grads(run, place, p, mask_kind)
    assert_matches(y, states, dx, dparams, reference_bn(p))
    if runner.startswith("sharded_jit"):
        # The work really was split: the output stays sharded over the 8 devices.
        assert len(y.sharding.device_set) == DEVICES
        assert not y.sharding.is_fully_replicated


def test_single_device_jaxbn_equals_reference():
    """The same harness without any distribution: guards the reference and the harness."""
    p = make_problem("uneven")

    def run(x, params, state, mask):
        y, new_state = _bn(x, params, state, mask)
        return y, _stacked(new_state)

    y, states, dx, dparams = run_with_grads(run, _unplaced, p, "uneven")
    assert_matches(y, states, dx, dparams, reference_bn(p))


def test_unsynchronized_shards_do_not_match():
    """Negative control: per-device statistics (no axis_name) differ from the reference."""
    p = make_problem("none")
    mesh = _mesh((DEVICES,), ("batch",))
    run, place = _shard_map_runner(mesh, "batch", axis_name=None)
    y, _, _, _ = run_with_grads(run, place, p, "none")
    assert np.max(np.abs(np.asarray(y) - reference_bn(p).y)) > 0.5


@pytest.mark.parametrize("mask_kind", ["none", "uneven"])
@pytest.mark.parametrize("transform", ["pmap", "shard_map"])
def test_axis_index_groups(transform, mask_kind):
    """Each group of 4 devices normalizes over its own 32-row concatenated batch."""
    p = make_problem(mask_kind)
    if transform == "pmap":
        run, place = _pmap_runner(groups=GROUPS)
    else:
        mesh = _mesh((DEVICES,), ("batch",))
        run, place = _shard_map_runner(mesh, "batch", "batch", groups=GROUPS)
    y, states, dx, dparams = run_with_grads(run, place, p, mask_kind)
    assert_matches(
        y, states, dx, dparams, grouped_reference(p, GROUPS), replicas_per_state=len(GROUPS[0])
    )
    # The groups really are separate: the whole-batch statistics are something else.
    assert np.max(np.abs(np.asarray(y) - reference_bn(p).y)) > 0.1


@pytest.mark.parametrize("mask_kind", ["none", "uneven"])
def test_bfloat16_under_shard_map(mask_kind):
    # bfloat16 x and dy (read as bfloat16 by every sum on CPU, see _moments.separate_reads)
    # against the float64 reference on the same, bfloat16-representable, values.
    def bf16(a):
        return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))

    p = make_problem(mask_kind)
    p = p._replace(x=bf16(p.x), cotangent=bf16(p.cotangent))
    run, place = _shard_map_runner(_mesh((DEVICES,), ("batch",)), "batch", "batch")
    y, states, dx, dparams = run_with_grads(run, place, p, mask_kind, dtype=jnp.bfloat16)
    truth = reference_bn(p)
    assert y.dtype == dx.dtype == jnp.bfloat16
    # Outputs and dx are float32 results rounded once to bfloat16 (8 significant bits).
    np.testing.assert_allclose(np.asarray(y, np.float32), truth.y, rtol=8e-3, atol=8e-3)
    np.testing.assert_allclose(
        np.asarray(dx, np.float32), truth.dx, rtol=8e-3, atol=8e-3 * np.max(np.abs(truth.dx))
    )
    # Statistics and parameter gradients are float32 sums of exact values.
    for got, want in ((states.mean, truth.mean), (states.var, truth.var)):
        np.testing.assert_allclose(np.asarray(got), np.broadcast_to(want, got.shape), atol=ATOL)
    for name, want in (("scale", truth.dscale), ("bias", truth.dbias)):
        np.testing.assert_allclose(np.asarray(dparams[name]), want, atol=GRAD_ATOL, rtol=1e-5)


def test_shard_map_replicated_state_out_spec_with_default_check_vma():
    """The natural shard_map spelling: state in and out as P(), JAX's default check_vma=True.

    Regression: with a plain (device-varying) lax.all_gather, shard_map refused
    ``out_specs=P()`` for the new state ("could not infer replication") unless the user
    disabled check_vma; flax.linen.BatchNorm (pmean, device-invariant) never had that problem.
    """
    p = make_problem("uneven")
    mesh = _mesh((DEVICES,), ("batch",))
    params = {"scale": jnp.asarray(p.scale), "bias": jnp.asarray(p.bias)}
    state = jaxbn.BatchStats(jnp.asarray(p.mean0), jnp.asarray(p.var0), jnp.zeros((), jnp.int32))
    batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    x = jax.device_put(jnp.asarray(p.x), batch)
    mask = jax.device_put(jnp.asarray(p.valid[:, None]), batch)
    params, state = jax.device_put((params, state), replicated)
    step = jax.jit(
        jax.shard_map(
            lambda x, params, state, mask: _bn(x, params, state, mask, axis_name="batch"),
            mesh=mesh,
            in_specs=(P("batch"), P(), P(), P("batch")),
            out_specs=(P("batch"), P()),
        )
    )
    y, new_state = step(x, params, state, mask)
    expected = reference_bn(p)
    np.testing.assert_allclose(np.asarray(y), expected.y, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(new_state.mean), expected.mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(new_state.var), expected.var, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- vs flax


def _flax_shard_map(p: Problem, mesh):
    """flax.linen.BatchNorm with the same mask and axis_name under the same shard_map."""
    module = nn.BatchNorm(
        use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON, axis_name="batch"
    )
    variables = {
        "params": {"scale": jnp.asarray(p.scale), "bias": jnp.asarray(p.bias)},
        "batch_stats": {"mean": jnp.asarray(p.mean0), "var": jnp.asarray(p.var0)},
    }

    def per_device(x, variables, mask):
        y, updates = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    fn = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P("batch"), P(), P("batch")),
            out_specs=(P("batch"), P()),
        )
    )
    args = (
        jax.device_put(jnp.asarray(p.x), batch),
        jax.device_put(variables, replicated),
        jax.device_put(jnp.asarray(p.valid[:, None]), batch),
    )
    return fn, args


def test_uneven_masks_weight_devices_by_count_unlike_flax():
    """Device i has i+1 valid rows: jaxbn matches the reference; flax (equal weights) does not.

    flax averages the per-device masked means with pmean, so a device with 1 valid row counts
    as much as one with 8; the true global statistics weight each device by its valid count.
    """
    p = make_problem("uneven")
    expected = reference_bn(p)
    mesh = _mesh((DEVICES,), ("batch",))
    run, place = _shard_map_runner(mesh, "batch", "batch")
    y, states, _, _ = run_with_grads(run, place, p, "uneven")
    jaxbn_error = float(np.max(np.abs(np.asarray(y) - expected.y)))
    jaxbn_mean_error = float(np.max(np.abs(np.asarray(states.mean) - expected.mean)))

    flax_fn, flax_args = _flax_shard_map(p, mesh)
    flax_y, flax_stats = flax_fn(*flax_args)
    flax_error = float(np.max(np.abs(np.asarray(flax_y) - expected.y)))
    flax_mean_error = float(np.max(np.abs(np.asarray(flax_stats["mean"]) - expected.mean)))

    report = (
        f"uneven masks (valid rows per device {MASKS['uneven']}), max |y - y_float64|: "
        f"jaxbn {jaxbn_error:.3g}, flax.linen.BatchNorm {flax_error:.3g}; "
        f"running-mean error: jaxbn {jaxbn_mean_error:.3g}, flax {flax_mean_error:.3g}"
    )
    print(report)
    assert jaxbn_error < 1e-5, report
    assert jaxbn_mean_error < 1e-5, report
    assert flax_error > 0.05, report


def test_fully_masked_devices_are_ignored_by_jaxbn_and_make_flax_nan():
    """Two devices have no valid row: jaxbn leaves them out of the statistics; flax averages
    the per-device masked means with pmean, and a device's 0/0 mean makes every output NaN."""
    p = make_problem("empty")
    expected = reference_bn(p)
    mesh = _mesh((DEVICES,), ("batch",))
    run, place = _shard_map_runner(mesh, "batch", "batch")
    y, _, _, _ = run_with_grads(run, place, p, "empty")
    flax_fn, flax_args = _flax_shard_map(p, mesh)
    flax_y = np.asarray(flax_fn(*flax_args)[0])
    np.testing.assert_allclose(np.asarray(y), expected.y, atol=ATOL, rtol=0)
    assert np.isnan(flax_y).all(), flax_y


# --------------------------------------------------------------------------- collectives

def _layer_stack(layers: int, mesh, use_flax: bool = False, check_vma: bool = True):
    """Collectives in a jitted shard_map of ``layers`` BN layers: forward and gradients."""
    p = make_problem("none")
    params = {"scale": jnp.asarray(p.scale), "bias": jnp.asarray(p.bias)}
    state = jaxbn.BatchStats(jnp.asarray(p.mean0), jnp.asarray(p.var0), jnp.zeros((), jnp.int32))
    module = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name="batch")

    def per_device(x, params):
        for _ in range(layers):
            if use_flax:
                variables = {
                    "params": params,
                    "batch_stats": {"mean": state.mean, "var": state.var},
                }
                x, _ = module.apply(variables, x, mutable=["batch_stats"])
            else:
                x, _ = _bn(x, params, state, None, axis_name="batch")
        return x

    forward = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P("batch"), P()),
        out_specs=P("batch"),
        check_vma=check_vma,
    )
    cotangent = jnp.asarray(p.cotangent)
    loss = lambda x, params: jnp.sum(forward(x, params) * cotangent)  # noqa: E731
    args = (
        jax.device_put(jnp.asarray(p.x), NamedSharding(mesh, P("batch"))),
        jax.device_put(params, NamedSharding(mesh, P())),
    )

    def collectives(fn) -> dict[str, int]:
        return count_collectives(jax.jit(fn).lower(*args).compile().as_text())

    return {
        "forward": collectives(forward),
        "grad_x": collectives(jax.grad(loss, argnums=0)),
        "grad_x_params": collectives(jax.grad(loss, argnums=(0, 1))),
    }


def test_collectives_in_compiled_hlo():
    """One collective per layer forward and exactly one more backward, from optimized HLO.

    The counts are asserted, not the kinds (an all-gather of per-device moments and an
    all-reduce of sums are both one collective). One layer under shard_map (default
    check_vma=True): the forward has 1 all-gather of the per-device (count, mean, M2); the
    gradient with respect to x has 1 all-gather and 1 all-reduce (the cross-device sums Σdy
    and Σdy·x̂ that dx needs); the gradient with respect to x and (scale, bias) still has 2 in
    all: those two sums are the gradients of bias and scale, so the psum that replicated (P())
    params need is that same all-reduce. The custom JVP (jaxbn/_train.py) psums its
    tangent's (Σdy, Σdy·x̂) once; transposed, that psum is the backward's only collective, with
    or without the params' gradients and in every layer of a stack (1 forward, 2 forward and
    backward per layer). With check_vma=False JAX inserts no psum of its own, so that
    collective is jaxbn's: dx needs sums over all devices, and a backward pass with no
    collective would give a wrong gradient. flax.linen.BatchNorm (fast variance) is printed
    beside ours (1 all-reduce forward, 2 backward), not asserted.
    """
    mesh = _mesh((DEVICES,), ("batch",))
    one = _layer_stack(1, mesh)
    three = _layer_stack(3, mesh)
    unchecked = _layer_stack(1, mesh, check_vma=False)
    flax_one = _layer_stack(1, mesh, use_flax=True)
    total = lambda counts: sum(counts.values())  # noqa: E731
    report = (
        f"collectives, jaxbn 1 layer: {one}; jaxbn 3 layers: {three}; "
        f"jaxbn 1 layer, check_vma=False: {unchecked}; "
        f"flax.linen.BatchNorm (fast variance) 1 layer: {flax_one}"
    )
    print(report)
    for layers, counts in ((1, one), (3, three), (1, unchecked)):
        assert total(counts["forward"]) == layers, report
        assert total(counts["grad_x"]) == 2 * layers, report
        assert total(counts["grad_x_params"]) == 2 * layers, report

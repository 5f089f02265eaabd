"""One of two JAX processes for tests/test_multihost.py (not a test module).

Usage: python multihost_worker.py PORT PROCESS_ID OUT.npz

Joins a 2-process ``jax.distributed`` job on 127.0.0.1:PORT with gloo CPU collectives, two
host CPU devices per process. Every process builds the same global problem from a fixed seed
(``make_problem``), places its own shards on its own devices, runs ``jaxbn.batch_norm`` under
``jax.shard_map`` over a mesh of all 4 devices with ``axis_name="batch"`` and an uneven mask,
takes the gradient of ``sum(y * cotangent)`` with respect to x, scale and bias, and writes what
it can address to OUT.npz: the rows of y and dx held by its devices (NaN elsewhere), the new
running statistics, and the parameter gradients.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PROCESSES = 2
LOCAL_DEVICES = 2
DEVICES = PROCESSES * LOCAL_DEVICES
ROWS = 8  # rows per device
FEATURES = 5
MOMENTUM = 0.9
EPSILON = 1e-5
# Valid rows per device (in mesh order): uneven, and one device entirely masked out.
VALID_ROWS = (3, 0, 8, 5)


def make_problem(seed: int = 0) -> dict[str, np.ndarray]:
    """The global problem, identical in every process and in the test."""
    rng = np.random.default_rng(seed)
    device = np.repeat(np.arange(DEVICES), ROWS)[:, None]
    x = rng.normal(size=(DEVICES * ROWS, FEATURES)) * (1.0 + 0.5 * device) + 4.0 * device
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {
        "x": f32(x),
        "valid": np.concatenate([np.arange(ROWS) < n for n in VALID_ROWS]),
        "scale": f32(rng.uniform(0.5, 2.0, FEATURES)),
        "bias": f32(rng.normal(size=FEATURES)),
        "mean0": f32(rng.normal(size=FEATURES)),
        "var0": f32(rng.uniform(0.5, 2.0, FEATURES)),
        "cotangent": f32(rng.normal(size=(DEVICES * ROWS, FEATURES))),
    }


def _global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from the shards this process's devices hold."""
    shards = [
        jax.device_put(value[index], device)
        for device, index in sharding.addressable_devices_indices_map(value.shape).items()
    ]
    return jax.make_array_from_single_device_arrays(value.shape, sharding, shards)


def _local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array held here; NaN where another process holds them."""
    out = np.full(array.shape, np.nan, np.float32)
    for shard in array.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


def _replicated(array: jax.Array) -> np.ndarray:
    return np.asarray(array.addressable_shards[0].data)


def main(port: int, process_id: int, out_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=PROCESSES,
        process_id=process_id,
        initialization_timeout=60,
    )
    import jaxbn  # after initialize, like any user program

    assert jax.process_count() == PROCESSES, jax.process_count()
    assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
    assert jax.device_count() == DEVICES, jax.devices()

    mesh = jax.make_mesh((DEVICES,), ("batch",))
    batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    problem = make_problem()
    x = _global_array(problem["x"], batch)
    mask = _global_array(problem["valid"][:, None], batch)
    cotangent = _global_array(problem["cotangent"], batch)
    params = {
        "scale": _global_array(problem["scale"], replicated),
        "bias": _global_array(problem["bias"], replicated),
    }
    state = jaxbn.BatchStats(
        mean=_global_array(problem["mean0"], replicated),
        var=_global_array(problem["var0"], replicated),
        count=_global_array(np.zeros((), np.int32), replicated),
    )

    def per_device(x, params, state, mask):
        return jaxbn.batch_norm(
            x,
            params,
            state,
            training=True,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            axis_name="batch",
            mask=mask,
        )

    step = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P("batch"), P(), P(), P("batch")),
        out_specs=(P("batch"), P()),
    )

    def loss(x, params, state, mask, cotangent):
        # Global arrays spanning both processes cannot be closed over: all are arguments.
        y, new_state = step(x, params, state, mask)
        return jnp.sum(y * cotangent), (y, new_state)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, new_state)), (dx, dparams) = grad_fn(x, params, state, mask, cotangent)

    np.savez(
        out_path,
        process_index=jax.process_index(),
        y=_local_rows(y),
        dx=_local_rows(dx),
        mean=_replicated(new_state.mean),
        var=_replicated(new_state.var),
        count=_replicated(new_state.count),
        dscale=_replicated(dparams["scale"]),
        dbias=_replicated(dparams["bias"]),
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    # Two host CPU devices in this process: the setting takes effect when the backend starts
    # (in main, after jax.distributed.initialize). Only when run as a script: test_multihost.py
    # imports this module for make_problem and must not be affected.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

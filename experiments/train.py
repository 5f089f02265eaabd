"""The jitted step and its trainer: one :class:`Config` → compiled ``init``, ``chunk`` of steps,
``evaluate``.

One :class:`Config` describes a group of runs that differ only in seed, learning rate and
initialization scale: their product is trained *at once* by one compiled program (``vmap``
over runs), so three seeds cost little more than one on a CPU. Everything else (the model,
its norm, the optimizer, the batch size) is fixed by the config; a claim compares configs.
The loop around it (logging, checkpoints, ``train_and_evaluate``) is in
:mod:`experiments.loop`.

What one step does, for every run: draw the batch (uniformly with replacement, keyed by
``(seed, step)``, so the data order is the same across arms of a claim), compute
the loss in training mode, which updates the BN running statistics (the ``batch_stats``
collection, threaded through explicitly), take an optax step, and check that the loss and the
new parameters are finite. A run whose loss or parameters stop being finite is *stopped*: its
state stays at its last finite value and ``nan_step`` records the step.

Evaluation uses the running statistics (``train=False``) on the whole test set and on up to
2,000 training examples. The recalibrated statistics (``recalibration_batches``) and the
gradient norms (``grad_norms``) are measured by :mod:`experiments.probes`.

With ``devices > 1`` the step runs under ``jax.shard_map`` over a ``"data"`` mesh axis: each
device holds ``batch_size / devices`` examples, gradients are averaged with ``pmean``, and BN
statistics are synchronized over ``"data"`` (``sync_bn=True``)
or computed per device (``sync_bn=False``; the running statistics are then averaged across
devices after each step, as flax's ImageNet example does).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import data as data_lib
from .models import BATCH_NORMS, make_model

__all__ = ["Config", "TrainState", "Trainer", "check_config"]

TRAIN_EVAL_EXAMPLES = 2000
OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class Config:
    """One group of runs (the product of ``seeds × learning_rates × init_scales``)."""

    name: str = "run"
    dataset: str = "digits"
    train_size: int | None = None  # keep only the first N training examples
    model: str = "mlp"  # "mlp" or "cnn"
    widths: tuple[int, ...] = (100, 100, 100)  # hidden widths (MLP) or channels (CNN)
    activation: str = "sigmoid"
    norm: str = "none"  # one of experiments.models.NORMS
    placement: str = "before"  # norm before or after the activation
    dropout: float = 0.0
    bn_momentum: float = 0.9  # EMA decay of the running statistics (keras' default)
    optimizer: str = "sgd"  # "sgd", "momentum" (0.9) or "adam"
    learning_rates: tuple[float, ...] = (0.1,)
    init_scales: tuple[float, ...] = (1.0,)  # multiplies every initial kernel
    batch_size: int = 60
    steps: int = 1000
    eval_every: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    devices: int = 1  # > 1: data parallel with shard_map over this many devices
    sync_bn: bool = True  # with devices > 1: synchronize BN statistics over devices
    probe: bool = False  # record percentiles of the last hidden layer's pre-activations
    grad_norms: bool = False  # record per-layer gradient norms at initialization
    recalibration_batches: int = 0  # > 0: also evaluate with stats pooled over K batches
    checkpoint_every: int = 0  # steps between orbax checkpoints (0: none)
    tensorboard: bool = False  # also write TensorBoard event files (needs tensorboardX)

    def runs(self) -> list[dict[str, float]]:
        """The runs of this group, in the order of every per-run array."""
        return [
            {"learning_rate": lr, "init_scale": scale, "seed": seed}
            for lr, scale, seed in itertools.product(
                self.learning_rates, self.init_scales, self.seeds
            )
        ]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_config(config: Config, dataset: data_lib.Dataset) -> None:
    """Raises ``ValueError`` naming the field if ``config`` cannot be trained on ``dataset``."""
    if config.batch_size > len(dataset.y_train):
        raise ValueError(
            f"Expected `batch_size` <= the training set size {len(dataset.y_train)}, "
            f"got {config.batch_size}."
        )
    if config.steps % config.eval_every:
        raise ValueError(
            f"Expected `steps` ({config.steps}) to be a multiple of `eval_every` "
            f"({config.eval_every})."
        )
    if config.devices > 1 and config.batch_size % config.devices:
        raise ValueError(
            f"Expected `batch_size` ({config.batch_size}) divisible by `devices` "
            f"({config.devices})."
        )
    if config.devices > jax.device_count():
        raise ValueError(
            f"Expected `devices` <= {jax.device_count()} available devices, got "
            f"{config.devices}. On CPU pass `--devices N` on the command line (it sets "
            "jax_num_cpu_devices before jax starts its backend)."
        )
    if config.recalibration_batches and config.norm not in BATCH_NORMS:
        raise ValueError(
            f"Expected a norm with running statistics {BATCH_NORMS} with "
            f"`recalibration_batches`, got norm={config.norm!r}."
        )
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"Expected `optimizer` in {OPTIMIZERS}, got {config.optimizer!r}.")


class TrainState(NamedTuple):
    """Everything a step changes, stacked over runs (leading axis R)."""

    params: Any
    batch_stats: Any  # the BN running statistics ({} without BN)
    opt_state: Any
    alive: jax.Array  # (R,) bool: False once the run produced a non-finite loss/params
    nan_step: jax.Array  # (R,) int32: the step whose result was not finite (-1: none)


class DeviceData(NamedTuple):
    """The dataset's arrays on the devices (replicated over the mesh, if any)."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    x_train_eval: jax.Array  # the first TRAIN_EVAL_EXAMPLES training examples
    y_train_eval: jax.Array

    @classmethod
    def place(cls, dataset: data_lib.Dataset, mesh: Mesh | None) -> DeviceData:
        def put(array: np.ndarray) -> jax.Array:
            if mesh is None:
                return jnp.asarray(array)
            return jax.device_put(array, NamedSharding(mesh, P()))

        return cls(
            *map(put, (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)),
            put(dataset.x_train[:TRAIN_EVAL_EXAMPLES]),
            put(dataset.y_train[:TRAIN_EVAL_EXAMPLES]),
        )


class RunKeys(NamedTuple):
    """Per run (leading axis R), the keys derived from its seed."""

    init: jax.Array  # initial parameters
    data: jax.Array  # training batch `step` is drawn with fold_in(data, step)
    dropout: jax.Array
    recalibration: jax.Array  # the recalibration batches: fold_in(data, 2**31 - 1)

    @classmethod
    def of(cls, seeds: list[int]) -> RunKeys:
        keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(
            jnp.array(seeds, dtype=jnp.uint32)
        )
        # Training steps are < 2**31 - 1, so this key is never a training batch's.
        recalibration = jax.vmap(lambda k: jax.random.fold_in(k, 2**31 - 1))(keys[:, 1])
        return cls(keys[:, 0], keys[:, 1], keys[:, 2], recalibration)


def _optimizer(name: str) -> optax.GradientTransformation:
    # The learning rate is applied outside the transform (updates * -lr), so it can differ
    # between the vmapped runs without recompiling: every transform here is linear in it.
    return {
        "sgd": optax.identity,
        "momentum": lambda: optax.trace(decay=0.9),
        "adam": optax.scale_by_adam,
    }[name]()


def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _batch_indices(key: jax.Array, step: jax.Array, num_examples: int, batch: int) -> jax.Array:
    # Uniform sampling with replacement, keyed by (seed, step): the same data order in every
    # arm of a claim, and 9x cheaper on CPU than a fresh permutation per step.
    return jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, num_examples)


def _standard_promotion(function: Callable) -> Callable:
    """Traces ``function`` with standard dtype promotion: optax (Adam's ``decay**count``) and
    flax need it, and the tests run under ``jax_numpy_dtype_promotion="strict"``."""

    def wrapped(*args: Any) -> Any:
        with jax.numpy_dtype_promotion("standard"):
            return function(*args)

    return wrapped


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The flax variables of one run (no ``batch_stats`` collection for a model without BN)."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _training_loss(
    model: nn.Module, params: Any, batch_stats: Any, x: jax.Array, y: jax.Array, key: jax.Array
) -> tuple[jax.Array, Any]:
    """The mean cross-entropy in training mode and the updated running statistics."""
    logits, updates = model.apply(
        _variables(params, batch_stats), x, train=True, rngs={"dropout": key},
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates.get("batch_stats", {})


class Trainer:
    """The compiled pieces of one config: ``init``, ``chunk`` of steps, ``evaluate``; every
    method works on all runs at once."""

    def __init__(self, config: Config, dataset: data_lib.Dataset | None = None):
        self.config = config
        self.dataset = dataset or data_lib.load(config.dataset, train_size=config.train_size)
        check_config(config, self.dataset)
        runs = config.runs()
        self.num_runs = len(runs)
        sharded = config.devices > 1
        self.mesh = Mesh(np.array(jax.devices()[: config.devices]), ("data",)) if sharded else None
        # Where every array of the training state lives, restored checkpoints included
        # (experiments.loop.Checkpoints): replicated over the mesh (with several processes, a
        # global array), or on this process's first device.
        self.state_sharding: jax.sharding.Sharding = (
            NamedSharding(self.mesh, P()) if self.mesh is not None
            else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        )
        model_fields = dict(
            widths=config.widths,
            num_classes=self.dataset.num_classes,
            norm=config.norm,
            placement=config.placement,
            activation=config.activation,
            dropout=config.dropout,
            bn_momentum=config.bn_momentum,
        )
        axis_name = "data" if sharded and config.sync_bn else None
        self.model = make_model(config.model, axis_name=axis_name, **model_fields)
        self.eval_model = make_model(config.model, axis_name=None, **model_fields)
        self.tx = _optimizer(config.optimizer)
        self.data = DeviceData.place(self.dataset, self.mesh)
        self.keys = RunKeys.of([run["seed"] for run in runs])
        self.learning_rates = jnp.array([run["learning_rate"] for run in runs], jnp.float32)
        self.init_scales = jnp.array([run["init_scale"] for run in runs], jnp.float32)

        def jit(function: Callable, **options: Any) -> Callable:
            return jax.jit(_standard_promotion(function), **options)

        self._init = jit(self._init_impl, out_shardings=self.state_sharding)
        self._chunk = jit(self._chunk_impl, static_argnums=2, donate_argnums=0)
        self._evaluate = jit(self._evaluate_impl, static_argnums=2)

    # ---------------------------------------------------------------- init
    def init(self) -> TrainState:
        """The initial state of every run (kernels multiplied by the run's init scale), every
        array placed by ``state_sharding``."""
        return self._init(self.keys.init, self.init_scales)

    def _init_impl(self, init_keys: jax.Array, init_scales: jax.Array) -> TrainState:
        example = jnp.zeros((2, *self.dataset.input_shape), jnp.float32)

        def init_one(key: jax.Array, init_scale: jax.Array):
            variables = self.model.init({"params": key}, example, train=False)
            params = jax.tree_util.tree_map_with_path(
                lambda path, p: p * init_scale if path[-1].key == "kernel" else p,
                variables["params"],
            )
            return params, variables.get("batch_stats", {}), self.tx.init(params)

        params, batch_stats, opt_state = jax.vmap(init_one)(init_keys, init_scales)
        return TrainState(
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            alive=jnp.ones(self.num_runs, bool),
            nan_step=jnp.full(self.num_runs, -1, jnp.int32),
        )

    # ---------------------------------------------------------------- training
    def training_batch(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every run's batch ``step``: ``(R, B, ...)`` inputs and ``(R, B)`` labels."""
        n, b = self.data.x_train.shape[0], self.config.batch_size
        idx = jax.vmap(_batch_indices, (0, None, None, None))(self.keys.data, step, n, b)
        return self.data.x_train[idx], self.data.y_train[idx]

    def _local_step(self, state_one, x, y, dropout_key, learning_rate, step):
        """One step of one run on this device's share of the batch."""
        params, batch_stats, opt_state, alive, nan_step = state_one
        sharded = self.mesh is not None
        key = jax.random.fold_in(dropout_key, step)
        if sharded:
            key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        loss_fn = functools.partial(_training_loss, self.model)
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y, key
        )
        if sharded:
            grads, loss = jax.lax.pmean((grads, loss), "data")
            new_stats = jax.lax.pmean(new_stats, "data")  # no-op when synchronized
        updates, new_opt_state = self.tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
        finite = jnp.isfinite(loss) & _all_finite(new_params)
        keep = alive & finite

        def choose(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)

        new_state = (
            choose(new_params, params),
            choose(new_stats, batch_stats),
            choose(new_opt_state, opt_state),
            keep,
            jnp.where(alive & ~finite, step, nan_step),
        )
        return new_state, loss

    def _step(self, state: TrainState, step: jax.Array) -> tuple[TrainState, jax.Array]:
        x, y = self.training_batch(step)
        runs_step = jax.vmap(self._local_step, in_axes=(0, 0, 0, 0, 0, None))
        if self.mesh is not None:
            runs_step = jax.shard_map(
                runs_step,
                mesh=self.mesh,
                in_specs=(P(), P(None, "data"), P(None, "data"), P(), P(), P()),
                out_specs=(P(), P()),
                check_vma=False,
            )
        new_state, loss = runs_step(
            tuple(state), x, y, self.keys.dropout, self.learning_rates, step
        )
        return TrainState(*new_state), loss

    def _chunk_impl(self, state: TrainState, start: jax.Array, length: int):
        def body(carry, offset):
            return self._step(carry, start + offset)

        return jax.lax.scan(body, state, jnp.arange(length, dtype=jnp.int32))

    def chunk(self, state: TrainState, start: int, length: int) -> tuple[TrainState, jax.Array]:
        """``length`` steps from step ``start``; returns the new state and (length, R) losses.

        ``state`` is donated: do not use it afterwards.
        """
        return self._chunk(state, jnp.int32(start), length)

    # ---------------------------------------------------------------- evaluation
    def _evaluate_impl(self, params, batch_stats, probe: bool):
        def split(x, y, params, batch_stats, with_probe):
            logits, inter = self.eval_model.apply(
                _variables(params, batch_stats), x, train=False, mutable=["intermediates"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
            out = {"loss": loss, "accuracy": accuracy}
            if with_probe:
                preact = jax.tree.leaves(inter["intermediates"])[-1]
                preact = preact.reshape(-1, preact.shape[-1])
                out["percentiles"] = jnp.percentile(
                    preact, jnp.array([15.0, 50.0, 85.0]), axis=0
                )
            return out

        def one(params, batch_stats):
            test = split(self.data.x_test, self.data.y_test, params, batch_stats, probe)
            train = split(
                self.data.x_train_eval, self.data.y_train_eval, params, batch_stats, False
            )
            out = {
                "test_accuracy": test["accuracy"],
                "test_loss": test["loss"],
                "train_accuracy": train["accuracy"],
                "train_eval_loss": train["loss"],
            }
            if probe:
                out["preact_percentiles"] = test["percentiles"]  # (3, units): 15/50/85th
            return out

        return jax.vmap(one)(params, batch_stats)

    def evaluate(
        self, state: TrainState, *, probe: bool = False, batch_stats: Any = None
    ) -> dict[str, np.ndarray]:
        """Test and train metrics per run (numpy), with the running statistics of ``state``
        or, if given, with ``batch_stats`` instead."""
        stats = state.batch_stats if batch_stats is None else batch_stats
        out = self._evaluate(state.params, stats, probe)
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

"""The one training loop: ``train_and_evaluate(config, workdir)``.

One :class:`Config` describes a group of runs that differ only in seed, learning rate and
initialization scale: their product is trained *at once* by one compiled program (``vmap``
over runs), so three seeds cost little more than one on a CPU. Everything else (the model,
its norm, the optimizer, the batch size) is fixed by the config; a claim compares configs.

What one step does, for every run: draw the batch (uniformly with replacement, keyed by
``(seed, step)``, so the data order is the same across arms of a claim), compute
the loss in training mode, which updates the BN running statistics (the ``batch_stats``
collection, threaded through explicitly), take an optax step, and check that the loss and the
new parameters are finite. A run whose loss or parameters stop being finite is *stopped*: its
state stays at its last finite value, its later metrics are NaN, and the step range where the
NaN appeared is recorded (``diverged_at``). When every run has stopped the loop ends.

Evaluation uses the running statistics (``train=False``) on the whole test set and on up to
2,000 training examples. With ``recalibration_batches = K > 0`` every evaluation is also done
a second time with *recalibrated* statistics (PreciseBN, Wu & Johnson 2021): the current
weights run K training-mode forwards of ``batch_size`` training examples each (drawn as
training draws them, from a key of their own, the same K batches at every evaluation) with
every batch norm's momentum forced to 0 (``flax.linen.intercept_methods``, as in the README),
and ``jaxbn.recalibration_update`` pools the K batches' statistics exactly; those metrics get
the suffix ``_recalibrated``. The training state itself keeps its running statistics.

With ``devices > 1`` the step runs under ``jax.shard_map`` over a ``"data"`` mesh axis: each
device holds ``batch_size / devices`` examples, gradients are averaged with ``pmean``, and BN
statistics are synchronized over ``"data"`` (``sync_bn=True``)
or computed per device (``sync_bn=False``; the running statistics are then averaged across
devices after each step, as flax's ImageNet example does).

Files written to ``workdir``: ``config.json``, ``metrics.jsonl`` (one line per evaluation,
per-run lists), ``checkpoints/`` (orbax, when ``checkpoint_every > 0``) and, with
``tensorboard=True``, TensorBoard event files under ``tensorboard/run_<i>/``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen

from . import data as data_lib
from .models import BATCH_NORMS, make_model

__all__ = ["Config", "Result", "TrainState", "Trainer", "train_and_evaluate", "with_changes"]

TRAIN_EVAL_EXAMPLES = 2000


@dataclass(frozen=True)
class Config:
    """One group of runs (the product of ``seeds × learning_rates × init_scales``)."""

    name: str = "run"
    dataset: str = "digits"
    train_size: int | None = None  # keep only the first N training examples
    model: str = "mlp"  # "mlp" or "cnn"
    widths: tuple[int, ...] = (100, 100, 100)  # hidden widths (MLP) or channels (CNN)
    activation: str = "sigmoid"
    norm: str = "none"  # "none", "bn", "layer", "group", "renorm", "ghost"
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


@dataclass
class Result:
    """What a group of runs produced; per-run arrays follow ``config.runs()``."""

    config: Config
    steps: np.ndarray  # (T,) the logged steps
    metrics: dict[str, np.ndarray]  # name -> (T, R, ...) NaN after a run stopped
    diverged_at: list[list[int] | None]  # per run: [last finite logged step, NaN step]
    seconds: float  # wall time, compilation included
    step_seconds: float  # median seconds per step after the first chunk (no compilation)
    grad_norms_at_init: np.ndarray | None = None  # (R, layers)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def runs(self) -> list[dict[str, float]]:
        return self.config.runs()

    def final(self, name: str) -> np.ndarray:
        """The last logged value of ``name`` for every run (NaN for a stopped run)."""
        return self.metrics[name][-1]


class TrainState(NamedTuple):
    """Everything a step changes, stacked over runs (leading axis R)."""

    params: Any
    batch_stats: Any  # the BN running statistics ({} without BN)
    opt_state: Any
    alive: jax.Array  # (R,) bool: False once the run produced a non-finite loss/params
    nan_step: jax.Array  # (R,) int32: the step whose result was not finite (-1: none)


def _optimizer(name: str) -> optax.GradientTransformation:
    # The learning rate is applied outside the transform (updates * -lr), so it can differ
    # between the vmapped runs without recompiling: every transform here is linear in it.
    if name == "sgd":
        return optax.identity()
    if name == "momentum":
        return optax.trace(decay=0.9)
    if name == "adam":
        return optax.scale_by_adam()
    raise ValueError(f"Expected `optimizer` in ('sgd', 'momentum', 'adam'), got {name!r}.")


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


def _momentum_zero(next_fun, args, kwargs, context):
    """Interceptor: every batch norm runs with momentum 0 (its new running statistics are
    the batch's own), on the same variables; the README's recalibration recipe."""
    module = context.module
    if (
        isinstance(module, jaxbn.linen.BatchNorm)
        and context.method_name == "__call__"
        and module.momentum != 0.0
    ):
        return module.clone(parent=module.scope, momentum=0.0)(*args, **kwargs)
    return next_fun(*args, **kwargs)


class Trainer:
    """The compiled pieces of one config: ``init``, ``chunk`` of steps, ``evaluate``."""

    def __init__(self, config: Config, dataset: data_lib.Dataset | None = None):
        self.config = config
        self.dataset = dataset or data_lib.load(config.dataset, train_size=config.train_size)
        ds = self.dataset
        if config.batch_size > len(ds.y_train):
            raise ValueError(
                f"Expected `batch_size` <= the training set size {len(ds.y_train)}, "
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
                "XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported)."
            )
        if config.recalibration_batches and config.norm not in BATCH_NORMS:
            raise ValueError(
                f"Expected a norm with running statistics {BATCH_NORMS} with "
                f"`recalibration_batches`, got norm={config.norm!r}."
            )
        runs = config.runs()
        self.num_runs = len(runs)
        sharded = config.devices > 1
        axis_name = "data" if sharded and config.sync_bn else None
        model_fields = dict(
            widths=config.widths,
            num_classes=ds.num_classes,
            norm=config.norm,
            placement=config.placement,
            activation=config.activation,
            dropout=config.dropout,
            bn_momentum=config.bn_momentum,
        )
        self.model = make_model(config.model, axis_name=axis_name, **model_fields)
        self.eval_model = make_model(config.model, axis_name=None, **model_fields)
        self.tx = _optimizer(config.optimizer)
        if sharded:
            self.mesh = Mesh(np.array(jax.devices()[: config.devices]), ("data",))
            put = lambda a: jax.device_put(a, NamedSharding(self.mesh, P()))  # noqa: E731
        else:
            self.mesh = None
            put = jnp.asarray
        self.x_train = put(ds.x_train)
        self.y_train = put(ds.y_train)
        self.x_test = put(ds.x_test)
        self.y_test = put(ds.y_test)
        self.x_train_eval = put(ds.x_train[:TRAIN_EVAL_EXAMPLES])
        self.y_train_eval = put(ds.y_train[:TRAIN_EVAL_EXAMPLES])
        keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(
            jnp.array([run["seed"] for run in runs], dtype=jnp.uint32)
        )
        self.init_keys, self.data_keys, self.dropout_keys = keys[:, 0], keys[:, 1], keys[:, 2]
        # Training draws batch `step` with fold_in(data_key, step), step < 2**31 - 1.
        self.recalibration_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2**31 - 1))(
            self.data_keys
        )
        self.learning_rates = jnp.array([run["learning_rate"] for run in runs], jnp.float32)
        self.init_scales = jnp.array([run["init_scale"] for run in runs], jnp.float32)
        self._chunk = jax.jit(
            _standard_promotion(self._chunk_impl), static_argnums=2, donate_argnums=0
        )
        self._evaluate = jax.jit(_standard_promotion(self._evaluate_impl), static_argnums=2)
        self._grad_norms = jax.jit(_standard_promotion(self._grad_norms_impl))
        self._recalibrated = jax.jit(_standard_promotion(self._recalibrated_impl))

    # ---------------------------------------------------------------- init
    def init(self) -> TrainState:
        """The initial state of every run (kernels multiplied by the run's init scale)."""
        return jax.jit(_standard_promotion(self._init_impl))(self.init_keys, self.init_scales)

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
    def _loss(self, params, batch_stats, x, y, dropout_key):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, updates = self.model.apply(
            variables, x, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates.get("batch_stats", {})

    def _local_step(self, state_one, x, y, dropout_key, learning_rate, step):
        """One step of one run on this device's share of the batch."""
        params, batch_stats, opt_state, alive, nan_step = state_one
        sharded = self.config.devices > 1
        key = jax.random.fold_in(dropout_key, step)
        if sharded:
            key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        (loss, new_stats), grads = jax.value_and_grad(self._loss, has_aux=True)(
            params, batch_stats, x, y, key
        )
        if sharded:
            grads, loss = jax.lax.pmean((grads, loss), "data")
            new_stats = jax.lax.pmean(new_stats, "data")  # no-op when synchronized
        updates, new_opt_state = self.tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
        finite = jnp.isfinite(loss) & _all_finite(new_params)
        keep = alive & finite
        choose = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(keep, a, b), new, old
        )
        new_state = (
            choose(new_params, params),
            choose(new_stats, batch_stats),
            choose(new_opt_state, opt_state),
            keep,
            jnp.where(alive & ~finite, step, nan_step),
        )
        return new_state, loss

    def _step(self, state: TrainState, step: jax.Array) -> tuple[TrainState, jax.Array]:
        n, b = self.x_train.shape[0], self.config.batch_size
        idx = jax.vmap(_batch_indices, (0, None, None, None))(self.data_keys, step, n, b)
        x, y = self.x_train[idx], self.y_train[idx]  # (R, B, ...), (R, B)
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
            tuple(state), x, y, self.dropout_keys, self.learning_rates, step
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
            variables = {"params": params}
            if batch_stats:
                variables["batch_stats"] = batch_stats
            logits, inter = self.eval_model.apply(
                variables, x, train=False, mutable=["intermediates"]
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
            test = split(self.x_test, self.y_test, params, batch_stats, probe)
            train = split(self.x_train_eval, self.y_train_eval, params, batch_stats, False)
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

    def evaluate(self, state: TrainState, *, probe: bool = False) -> dict[str, np.ndarray]:
        """Test and train metrics with the running statistics, per run (numpy); with
        ``recalibration_batches`` also with recalibrated ones (suffix ``_recalibrated``)."""
        out = self._evaluate(state.params, state.batch_stats, probe)
        if self.config.recalibration_batches:
            stats = self.recalibrated_stats(state)
            again = self._evaluate(state.params, stats, False)
            out = {**out, **{f"{k}_recalibrated": v for k, v in again.items()}}
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    def recalibrated_stats(self, state: TrainState) -> Any:
        """Per run, the BN statistics pooled exactly over ``recalibration_batches`` batches."""
        return self._recalibrated(state.params, state.batch_stats)

    def _recalibrated_impl(self, params, batch_stats):
        n, b = self.x_train.shape[0], self.config.batch_size

        def one(params, batch_stats, key):
            def batch_stats_fn(x):
                with nn.intercept_methods(_momentum_zero):
                    _, updates = self.eval_model.apply(
                        {"params": params, "batch_stats": batch_stats}, x, train=True,
                        rngs={"dropout": key}, mutable=["batch_stats"],
                    )
                return updates["batch_stats"]

            def body(acc, k):
                x = self.x_train[_batch_indices(key, k, n, b)]
                return jaxbn.recalibration_update(acc, batch_stats_fn(x), b), None

            acc, _ = jax.lax.scan(
                body,
                jaxbn.recalibration_init(batch_stats),
                jnp.arange(self.config.recalibration_batches, dtype=jnp.int32),
            )
            return jaxbn.recalibration_result(acc)

        return jax.vmap(one)(params, batch_stats, self.recalibration_keys)

    def _grad_norms_impl(self, state: TrainState):
        n, b = self.x_train.shape[0], self.config.batch_size
        idx = jax.vmap(_batch_indices, (0, None, None, None))(
            self.data_keys, jnp.int32(0), n, b
        )
        x, y = self.x_train[idx], self.y_train[idx]

        def one(params, batch_stats, x, y, key):
            model = self.eval_model

            def loss(params):
                variables = {"params": params}
                if batch_stats:
                    variables["batch_stats"] = batch_stats
                logits, _ = model.apply(
                    variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
                )
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            grads = jax.grad(loss)(params)
            blocks = sorted((k for k in grads if k.startswith("block")), key=lambda k: int(k[5:]))
            names = [*blocks, "head"]
            norms = []
            for name in names:
                kernels = [
                    g for path, g in jax.tree_util.tree_leaves_with_path(grads[name])
                    if path[-1].key == "kernel"
                ]
                norms.append(jnp.sqrt(sum(jnp.sum(k**2) for k in kernels)))
            return jnp.stack(norms)

        return jax.vmap(one)(state.params, state.batch_stats, x, y, self.dropout_keys)

    def grad_norms(self, state: TrainState) -> np.ndarray:
        """(R, layers): the norm of each layer's kernel gradient on the first batch."""
        return np.asarray(self._grad_norms(state), dtype=np.float64)


# -------------------------------------------------------------------- the loop


def _require_tensorboardx() -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "`--tensorboard` needs tensorboardX, which is not installed. Install it "
            "with `pip install 'jaxbn[tensorboard]'` (or `pip install tensorboardX`), "
            "or leave out `--tensorboard`: metrics.jsonl has the same scalars."
        ) from error
    return SummaryWriter


class _Logger:
    """metrics.jsonl (and optionally TensorBoard) for one group of runs."""

    def __init__(self, workdir: str | None, num_runs: int, tensorboard: bool, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl") if workdir else None
        self.writers: list[Any] = []
        if self.path and os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    if line.strip() and json.loads(line)["step"] <= resume_step:
                        kept.append(line)
            with open(self.path, "w") as f:
                f.writelines(kept)
        if tensorboard and workdir:
            SummaryWriter = _require_tensorboardx()
            self.writers = [
                SummaryWriter(os.path.join(workdir, "tensorboard", f"run_{i}"))
                for i in range(num_runs)
            ]

    def history(self) -> list[dict[str, Any]]:
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        for i, writer in enumerate(self.writers):
            for name, values in record.items():
                if isinstance(values, list) and np.ndim(values[i]) == 0:
                    writer.add_scalar(name, float(values[i]), record["step"])
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _checkpointer(workdir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
    )


def _to_list(array: np.ndarray) -> list[Any]:
    return np.where(np.isfinite(array), array, np.nan).tolist()


_TRAINERS: dict[Any, Trainer] = {}
_MAX_TRAINERS = 8


def _trainer(config: Config, dataset: data_lib.Dataset | None) -> Trainer:
    """A Trainer for ``config``, reused (compiled programs included) for an identical config."""
    key = (
        dataclasses.replace(config, name="", checkpoint_every=0, tensorboard=False),
        None if dataset is None else id(dataset),
    )
    if key not in _TRAINERS:
        if len(_TRAINERS) >= _MAX_TRAINERS:
            _TRAINERS.pop(next(iter(_TRAINERS)))
        _TRAINERS[key] = Trainer(config, dataset)
    return _TRAINERS[key]


def train_and_evaluate(
    config: Config,
    workdir: str | None = None,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    dataset: data_lib.Dataset | None = None,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """Trains every run of ``config`` and evaluates it every ``eval_every`` steps.

    Args:
      config: what to train.
      workdir: where to write ``config.json``, ``metrics.jsonl`` and checkpoints (None:
        nothing is written and ``resume`` is not possible).
      resume: continue from the latest checkpoint in ``workdir`` (needs
        ``checkpoint_every > 0``). The final numbers equal an uninterrupted run's.
      stop_at: stop after this step (to simulate an interruption; checkpoints included).
      dataset: an already loaded dataset (default: load ``config.dataset``).
      progress: called with the number of steps done after each chunk (e.g. a tqdm update).

    Returns:
      A :class:`Result`; the metrics of a run are NaN from the evaluation after the step at
      which it produced a non-finite loss or non-finite parameters.
    """
    started = time.perf_counter()
    if config.tensorboard and workdir:
        _require_tensorboardx()
    trainer = _trainer(config, dataset)
    primary = jax.process_index() == 0
    if workdir and primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(
                {
                    **config.to_json(),
                    "runs": config.runs(),
                    "dataset_name": trainer.dataset.name,
                    "train_examples": len(trainer.dataset.y_train),
                    "test_examples": len(trainer.dataset.y_test),
                    "jax_version": jax.__version__,
                    "platform": jax.devices()[0].platform,
                },
                f,
                indent=2,
            )
    state = trainer.init()
    grad_norms = trainer.grad_norms(state) if config.grad_norms else None
    manager = _checkpointer(workdir) if workdir and config.checkpoint_every > 0 else None
    step = 0
    if resume:
        if manager is None:
            raise ValueError("Expected `workdir` and `checkpoint_every > 0` to resume.")
        latest = manager.latest_step()
        if latest is not None:
            import orbax.checkpoint as ocp

            restored = manager.restore(latest, args=ocp.args.StandardRestore(tuple(state)))
            state = TrainState(*restored)
            step = int(latest)
    logger = _Logger(workdir if primary else None, trainer.num_runs, config.tensorboard, step)
    records = logger.history() if resume else []
    if progress and step:
        progress(step)
    chunk_times = []
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    try:
        while step < end:
            tic = time.perf_counter()
            state, losses = trainer.chunk(state, step, config.eval_every)
            losses = np.asarray(losses, dtype=np.float64)
            chunk_times.append((time.perf_counter() - tic) / config.eval_every)
            step += config.eval_every
            alive = np.asarray(state.alive)
            metrics = trainer.evaluate(state, probe=config.probe)
            record: dict[str, Any] = {"step": step, "seconds": time.perf_counter() - started}
            record["train_loss"] = _to_list(np.where(alive, losses.mean(0), np.nan))
            for name, values in metrics.items():
                mask = alive.reshape((-1,) + (1,) * (values.ndim - 1))
                record[name] = _to_list(np.where(mask, values, np.nan))
            record["alive"] = alive.tolist()
            record["nan_step"] = np.asarray(state.nan_step).tolist()
            records.append(record)
            logger.write(record) if primary else None
            if manager is not None and step % config.checkpoint_every == 0:
                import orbax.checkpoint as ocp

                manager.save(step, args=ocp.args.StandardSave(tuple(state)))
                manager.wait_until_finished()
            if progress:
                progress(config.eval_every)
            if not alive.any():
                break
    finally:
        logger.close()
        if manager is not None:
            manager.close()
    steps = np.array([r["step"] for r in records])
    names = [k for k in records[0] if k not in ("step", "seconds", "alive", "nan_step")]
    metrics_out = {k: np.array([r[k] for r in records], dtype=np.float64) for k in names}
    nan_steps = np.asarray(state.nan_step)
    diverged_at: list[list[int] | None] = []
    for s in nan_steps.tolist():
        if s < 0:
            diverged_at.append(None)
        else:
            logged_before = [int(t) for t in steps if t <= s]
            diverged_at.append([logged_before[-1] if logged_before else 0, int(s)])
    later = chunk_times[1:] or chunk_times
    return Result(
        config=config,
        steps=steps,
        metrics=metrics_out,
        diverged_at=diverged_at,
        seconds=time.perf_counter() - started,
        step_seconds=float(np.median(later)) if later else float("nan"),
        grad_norms_at_init=grad_norms,
    )


def with_changes(config: Config, **changes: Any) -> Config:
    """``dataclasses.replace`` for configs (a name that reads well at call sites)."""
    return dataclasses.replace(config, **changes)


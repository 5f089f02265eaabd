"""Whole networks: training steps of a deep MLP and of ResNet-50, and BN folding in a CNN.

The MLP (20 blocks of Dense → norm → relu, adam) is where per-layer overhead shows; ResNet-50
(:data:`experiments.models.ResNet50`, SGD with Nesterov momentum, as flax's ImageNet example)
is the network users train, in float32 and (``"resnet50_bf16"``) in half precision as flax's
ImageNet example runs it: the model's ``dtype`` bfloat16 with float32 parameters, and every
BatchNorm given the model's dtype (so both norms read and write bfloat16). Each is built with
:class:`jaxbn.linen.BatchNorm` or :class:`flax.linen.BatchNorm` (the MLP also with no norm;
float32 ResNet-50 also with flax's BatchNorm and then converted by
:func:`jaxbn.linen.convert_batch_norm`), and trained by the same step: cross-entropy loss (on
float32 logits), ``batch_stats`` mutable, one optimizer update.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn
import jaxbn.linen

from ..models import ResNet50
from .spec import RATIOS, STEP_NORMS
from .timing import median_ms, median_ratio, time_interleaved

__all__ = ["compile_time", "folding", "step_config", "step_timings"]

class NoNorm(nn.Module):
    """The identity in place of a batch norm: the step with no norm, which bounds what any
    batch norm implementation can save. Takes (and ignores) batch norm's fields."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    scale_init: Any = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


NORM_CLASSES = {"jaxbn": jaxbn.linen.BatchNorm, "flax": nn.BatchNorm, "none": NoNorm}


class DeepMLP(nn.Module):
    """``depth`` blocks of Dense → norm → relu (no norm: ``norm="none"``), then a classifier."""

    depth: int
    width: int
    num_classes: int
    norm: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for _ in range(self.depth):
            x = nn.Dense(self.width, use_bias=self.norm == "none")(x)
            if self.norm != "none":
                x = NORM_CLASSES[self.norm](use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)


# The optimizer of each model's step: (description for the results, constructor).
_SGD = (
    "sgd(0.1, momentum=0.9, nesterov=True)",
    functools.partial(optax.sgd, 0.1, momentum=0.9, nesterov=True),
)
OPTIMIZERS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
    "mlp": ("adam(1e-3)", functools.partial(optax.adam, 1e-3)),
    "resnet50": _SGD,
    "resnet50_bf16": _SGD,
}
# Training steps whose losses are recorded, from the same start, for every norm but "none".
TRAJECTORY_STEPS = 5


def step_config(model: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The configuration of ``model``'s training step: its defaults, then ``overrides``.

    ``"mlp"``: ``depth`` 20, ``width`` 512, ``batch`` 256, 10 classes. ``"resnet50"``:
    ``stage_sizes`` [3, 4, 6, 3] and ``num_filters`` 64 (ResNet-50 itself; smaller for
    tests), 1000 classes, and ``batch``/``size`` 64 images of 224x224 on a GPU, 4 of 32x32
    elsewhere (a CPU); ``dtype`` float32, or bfloat16 for ``"resnet50_bf16"``. The result
    also names the ``optimizer``, which is fixed per model.

    Raises:
      ValueError: for an unknown ``model`` or an unknown key in ``overrides``.
    """
    if model == "mlp":
        config: dict[str, Any] = {"depth": 20, "width": 512, "batch": 256, "num_classes": 10}
    elif model in ("resnet50", "resnet50_bf16"):
        gpu = jax.default_backend() == "gpu"
        config = {"stage_sizes": [3, 4, 6, 3], "num_filters": 64, "batch": 64 if gpu else 4,
                  "size": 224 if gpu else 32, "num_classes": 1000,
                  "dtype": "bfloat16" if model == "resnet50_bf16" else "float32"}
    else:
        raise ValueError(f"Expected `model` in {tuple(STEP_NORMS)}, got {model!r}.")
    unknown = sorted(set(overrides or {}) - set(config))
    if unknown:
        raise ValueError(
            f"Expected `overrides` keys for {model!r} among {sorted(config)}, got {unknown}."
        )
    return config | (overrides or {}) | {"optimizer": OPTIMIZERS[model][0]}


def _problem(
    model: str, norm: str, config: dict[str, Any]
) -> tuple[nn.Module, optax.GradientTransformation, tuple[int, ...]]:
    """The network, its optimizer and the shape of its input batch."""
    if norm not in STEP_NORMS[model]:
        raise ValueError(f"Expected `norm` in {STEP_NORMS[model]} for {model!r}, got {norm!r}.")
    tx = OPTIMIZERS[model][1]()
    network: nn.Module
    if model == "mlp":
        network = DeepMLP(config["depth"], config["width"], config["num_classes"], norm)
        return network, tx, (config["batch"], config["width"])
    network = ResNet50(
        stage_sizes=tuple(config["stage_sizes"]),
        num_filters=config["num_filters"],
        num_classes=config["num_classes"],
        norm=NORM_CLASSES["flax" if norm == "converted" else norm],
        dtype=jnp.dtype(config["dtype"]),
    )
    if norm == "converted":  # written with flax's BatchNorm, run with jaxbn's
        network = jaxbn.linen.convert_batch_norm(network)
    return network, tx, (config["batch"], config["size"], config["size"], 3)


def _train_step(network: nn.Module, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``(params, stats, opt_state, x, labels) -> (params, stats, opt_state, loss)``."""

    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array, labels: jax.Array) -> Any:
        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            logits, updates = network.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels
            ).mean()
            return loss, updates.get("batch_stats", {})

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


def _step_inputs(
    network: nn.Module, tx: optax.GradientTransformation, x_shape: tuple[int, ...],
    num_classes: int,
) -> tuple[Any, ...]:
    """The step's arguments: initial variables and optimizer state, a random batch.

    Trace it (``jax.jit`` or ``jax.eval_shape``): run op by op, ResNet-50's initialization
    compiles hundreds of small programs.
    """
    x = jax.random.normal(jax.random.key(0), x_shape)
    labels = jax.random.randint(jax.random.key(1), x_shape[:1], 0, num_classes)
    variables = network.init(jax.random.key(2), x, train=False)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), tx.init(params), x, labels


def step_timings(
    rounds: int, mlp: dict[str, Any] | None = None, resnet: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Training-step times of the MLP and of ResNet-50 in float32 and in bfloat16 (no norm,
    jaxbn, flax; float32 ResNet-50 also flax's converted), and the loss trajectories of
    jaxbn's and flax's.

    Args:
      rounds: rounds of interleaved timing per network.
      mlp: overrides of the MLP's :func:`step_config`.
      resnet: overrides of ResNet-50's :func:`step_config` (both precisions).

    Returns:
      Per network: its ``config``, the median ``ms`` per norm, the median per-round ratios
      ``jaxbn_over_flax``, ``jaxbn_over_none`` and ``flax_over_none`` (and, for float32
      ResNet-50, ``converted_over_jaxbn``); ``losses``: per norm but "none", the losses of
      :data:`TRAJECTORY_STEPS` training steps from the same variables and batch;
      ``loss_max_rel_diff``: the largest ``|jaxbn - flax|`` along them, over flax's first
      loss.
    """
    out = {}
    for model, overrides in (("mlp", mlp), ("resnet50", resnet), ("resnet50_bf16", resnet)):
        config = step_config(model, overrides)
        calls, losses = {}, {}
        for norm in STEP_NORMS[model]:
            network, tx, x_shape = _problem(model, norm, config)
            args = jax.jit(
                functools.partial(_step_inputs, network, tx, x_shape, config["num_classes"])
            )()
            step = jax.jit(_train_step(network, tx))
            calls[norm] = functools.partial(step, *args)
            if norm != "none":
                losses[norm] = _trajectory(step, args)
        samples = time_interleaved(calls, rounds)
        out[model] = {
            "config": config,
            "ms": {norm: median_ms(s) for norm, s in samples.items()},
            **{f"{a}_over_{b}": median_ratio(samples[a], samples[b])
               for a, b in RATIOS if a in samples and b in samples},
            "losses": losses,
            # Relative to flax's first loss: a loss trained to 0 leaves nothing to divide by.
            "loss_max_rel_diff": max(
                abs(a - b) for a, b in zip(losses["jaxbn"], losses["flax"], strict=True)
            ) / abs(losses["flax"][0]),
        }
    return out


def _trajectory(step: Callable[..., Any], args: tuple[Any, ...]) -> list[float]:
    """The losses of :data:`TRAJECTORY_STEPS` steps from ``args``, the batch held fixed."""
    params, stats, opt_state, x, labels = args
    losses = []
    for _ in range(TRAJECTORY_STEPS):
        params, stats, opt_state, loss = step(params, stats, opt_state, x, labels)
        losses.append(float(loss))
    return losses


def compile_time(model: str, norm: str, config: dict[str, Any] | None = None) -> dict[str, float]:
    """Seconds to trace one training step, to lower it, and to compile it with XLA.

    Measured as a user meets it: in a fresh process (``python -m experiments.bench.worker
    compile_time``), with no persistent compilation cache, after nothing but jax's start-up.
    The arguments are abstract (``jax.eval_shape`` of the initialization, which traces the
    network once in eval mode), so that nothing is compiled before the step itself.

    Args:
      model: ``"mlp"``, ``"resnet50"`` or ``"resnet50_bf16"``.
      norm: ``"jaxbn"``, ``"flax"``, ``"none"``, or (float32 ResNet-50 only) ``"converted"``.
      config: overrides of the model's :func:`step_config`.

    Returns:
      ``trace_s`` (``jax.jit(step).trace(*args)``: running the Python of the step into a
      jaxpr), ``lower_s`` (tracing and then ``.lower()`` to StableHLO: both steps in Python)
      and ``compile_s`` (``.compile()``: XLA's optimization and code generation).
    """
    jax.config.update("jax_enable_compilation_cache", False)
    config = step_config(model, config)
    network, tx, x_shape = _problem(model, norm, config)
    args = jax.eval_shape(
        functools.partial(_step_inputs, network, tx, x_shape, config["num_classes"])
    )
    jax.devices()  # start the backend outside the timed region
    start = time.perf_counter()
    traced = jax.jit(_train_step(network, tx)).trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    middle = time.perf_counter()
    lowered.compile()
    return {"trace_s": traced_at - start, "lower_s": middle - start,
            "compile_s": time.perf_counter() - middle}


class ConvNet(nn.Module):
    """Conv3x3 (stride 2 after the first) → BN → ReLU blocks, global mean; BN folded or not."""

    channels: Sequence[int]
    folded: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, c in enumerate(self.channels):
            x = nn.Conv(c, (3, 3), strides=2 if i else 1, use_bias=self.folded,
                        name=f"conv{i}")(x)
            if not self.folded:
                x = jaxbn.linen.BatchNorm(use_running_average=True, name=f"bn{i}")(x)
            x = nn.relu(x)
        return jnp.mean(x, axis=(1, 2))


def _folding_variables(model: ConvNet, x: jax.Array) -> tuple[Any, Any, Any]:
    """``model``'s parameters and statistics, and the parameters of the folded ``model``.

    The BN parameters and running statistics are random (trained-looking), so that the
    folding is not trivial.
    """
    variables = model.init(jax.random.key(1), x)
    keys = iter(jax.random.split(jax.random.key(2), 4 * len(model.channels)))
    params = dict(variables["params"])
    stats = dict(variables["batch_stats"])
    folded_params = {}
    for i, c in enumerate(model.channels):
        params[f"bn{i}"] = {
            "scale": jax.random.uniform(next(keys), (c,), minval=0.5, maxval=1.5),
            "bias": 0.1 * jax.random.normal(next(keys), (c,)),
        }
        stats[f"bn{i}"] = {
            "mean": 0.5 * jax.random.normal(next(keys), (c,)),
            "var": jax.random.uniform(next(keys), (c,), minval=0.2, maxval=2.0),
        }
        kernel, bias = jaxbn.fold_conv(
            params[f"conv{i}"]["kernel"], None, params[f"bn{i}"], stats[f"bn{i}"]
        )
        folded_params[f"conv{i}"] = {"kernel": kernel, "bias": bias}
    return params, stats, folded_params


def folding(
    rounds: int,
    batch: int = 64,
    size: int = 32,
    channels: Sequence[int] = (32, 64, 64, 128),
    in_channels: int = 3,
) -> dict[str, Any]:
    """Inference of a CNN with eval-mode BN against the same CNN with BN folded into its convs.

    Every BN is folded into the conv before it by :func:`jaxbn.fold_conv`.

    Args:
      rounds: rounds of interleaved timing.
      batch: images per batch (NHWC, float32).
      size: image height and width.
      channels: output channels of each conv block.
      in_channels: channels of the input images.

    Returns:
      ``config``, the median ``ms`` of ``bn`` and ``folded``, their median per-round ratio
      ``folded_over_bn``, the largest absolute difference of the two outputs
      (``max_abs_diff``) and of the outputs themselves (``max_abs_output``).
    """
    x = jax.random.normal(jax.random.key(0), (batch, size, size, in_channels))
    model = ConvNet(channels, folded=False)
    params, stats, folded_params = jax.jit(functools.partial(_folding_variables, model))(x)
    folded_model = ConvNet(channels, folded=True)
    bn_fn = jax.jit(lambda x: model.apply({"params": params, "batch_stats": stats}, x))
    folded_fn = jax.jit(lambda x: folded_model.apply({"params": folded_params}, x))
    y_bn, y_folded = np.asarray(bn_fn(x)), np.asarray(folded_fn(x))
    samples = time_interleaved(
        {"bn": functools.partial(bn_fn, x), "folded": functools.partial(folded_fn, x)}, rounds
    )
    return {
        "config": {"batch": batch, "size": size, "channels": list(channels),
                   "in_channels": in_channels, "layout": "NHWC", "dtype": "float32",
                   "blocks": "Conv3x3 (stride 2 after the first) -> BN -> ReLU, global mean"},
        "ms": {k: median_ms(v) for k, v in samples.items()},
        "folded_over_bn": median_ratio(samples["folded"], samples["bn"]),
        "max_abs_diff": float(np.max(np.abs(y_bn - y_folded))),
        "max_abs_output": float(np.max(np.abs(y_bn))),
    }

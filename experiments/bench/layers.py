"""One layer, measured: times against an elementwise proxy, HLO passes, residuals, collectives.

Batch norm is memory-bound, so every time is reported as a multiple of an elementwise proxy
(``x * a + b`` per feature, and its VJP) timed side by side in the same process: the ratio
says how many "elementwise passes" a layer costs, and it survives a noisy shared machine far
better than raw milliseconds. The optimized HLO gives exact counts beside the times:
full-tensor memory passes (also under ``jax.vmap`` over an ensemble axis), float32 copies of
a bfloat16 input, and collectives per layer under ``shard_map``; and the residuals that
reverse mode keeps from the forward for the backward (:func:`residuals`).

Every layer function has the signature ``(x, params, stats, dy)``, whatever the mode and the
implementation, so that timing, pass counting, ``vmap`` and ``shard_map`` treat them alike
(``dy`` is unused but by the backward pass; XLA drops an unused argument).

Forward+backward is timed two ways. ``train_fwd_bwd`` is ``jax.vjp``: the output ``y`` is
returned, and the cotangent ``dy`` (with zeros for the new state) is fed back. ``train_step``
is how a training step differentiates a layer: ``jax.grad`` of a scalar loss (here
``Σ y·dy``, whose cotangent is the same ``dy``) with respect to ``x`` and the parameters,
the new state as aux. There ``y`` only feeds the loss's reduction and is never written out,
and XLA can fuse more of an autodiff backward into its neighbours. The optimized HLO shows
where the difference goes (float32, (256,1024) and (64,32,32,64) alike): in
``train_fwd_bwd`` jaxbn makes 10 full-tensor passes and flax 15, where flax writes
``x - mean`` out as a full-size array for its backward and both write ``y``; in
``train_step`` jaxbn makes 8 and flax 11 (``y`` is not written, and ``x - mean`` is
recomputed inside flax's backward kernels). flax saves 4 passes to jaxbn's 2, so jaxbn's
advantage counted in passes shrinks from 10/15 (0.67) to 8/11 (0.73). On a loaded 2-core
CPU the timed ratios of either form move more than that between runs (measured 0.74-1.07 as
a training step and 0.98-1.31 as ``jax.vjp`` in one process), so the bench reports both,
beside the counts. (The bias
and scale gradients and the two per-feature sums are the same in both forms; jaxbn's custom
JVP saves only ``x``, whichever is used.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen

from ..hlo import count_collectives, count_passes
from .spec import ENSEMBLE, IMPLS, MODES, Shape
from .timing import median_ms, median_ratio, time_interleaved

__all__ = ["collectives", "layer_passes", "layer_timings", "residuals"]

LayerFn = Callable[[Any, Any, Any, Any], Any]  # (x, params, stats, dy) -> outputs


class Layer(NamedTuple):
    """One implementation of the layer."""

    train: Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]  # (x, params, stats)
    evaluate: Callable[[jax.Array, Any, Any], jax.Array]  # (x, params, stats)
    stats: Any  # its initial running statistics (None for the proxy)


def _linen_layer(module: nn.Module, stats: Any) -> Layer:
    """A linen BatchNorm as a :class:`Layer`, its variables passed in."""

    def train(x: jax.Array, params: Any, stats: Any) -> Any:
        y, updates = module.apply(
            {"params": params, "batch_stats": stats}, x, False, mutable=["batch_stats"]
        )
        return y, updates["batch_stats"]

    def evaluate(x: jax.Array, params: Any, stats: Any) -> Any:
        return module.apply({"params": params, "batch_stats": stats}, x, True)

    return Layer(train, evaluate, stats)


def _layers(
    axis: int,
    ndim: int,
    features: int,
    axis_name: str | None = None,
    x_dtype: str = "float32",
    out_dtype: str = "float32",
) -> dict[str, Layer]:
    """The proxy, jaxbn and flax (fast and two-pass variance), by name, all writing
    ``out_dtype`` from an ``x_dtype`` input and float32 parameters.

    With ``out_dtype`` the dtype of ``x`` (float32, or the bfloat16 row): the pure function,
    and flax's ``BatchNorm(dtype=out_dtype)`` (``BatchNorm()`` for float32). Otherwise (the
    mixed row, a bfloat16 ``x`` with float32 out): ``jaxbn.linen.BatchNorm()`` and flax's
    ``BatchNorm()``, whose promotion gives float32.
    """
    bshape = tuple(features if a == axis % ndim else 1 for a in range(ndim))
    out = jnp.dtype(out_dtype)

    def proxy(x: jax.Array, params: Any, stats: None) -> jax.Array:
        del stats
        return (x * params["scale"].reshape(bshape) + params["bias"].reshape(bshape)).astype(out)

    def jaxbn_train(x: jax.Array, params: Any, stats: Any) -> tuple[jax.Array, Any]:
        return jaxbn.batch_norm(
            x, params, stats, training=True, axis=axis, momentum=0.9, axis_name=axis_name
        )

    def jaxbn_eval(x: jax.Array, params: Any, stats: Any) -> jax.Array:
        return jaxbn.batch_norm(x, params, stats, training=False, axis=axis)[0]

    flax_stats = {"mean": jnp.zeros(features), "var": jnp.ones(features)}
    mixed = out != jnp.dtype(x_dtype)
    layers = {
        "proxy": Layer(lambda x, p, s: (proxy(x, p, s), s), proxy, None),
        "jaxbn": _linen_layer(
            jaxbn.linen.BatchNorm(axis=axis, momentum=0.9, axis_name=axis_name), flax_stats
        ) if mixed else Layer(jaxbn_train, jaxbn_eval, jaxbn.init(features)[1]),
    }
    flax_dtype = None if out == jnp.float32 else out
    for name, fast in (("flax", True), ("flax_two_pass", False)):
        module = nn.BatchNorm(
            axis=axis, momentum=0.9, use_fast_variance=fast, axis_name=axis_name,
            dtype=flax_dtype,
        )
        layers[name] = _linen_layer(module, flax_stats)
    return layers


def _mode_functions(layer: Layer) -> dict[str, LayerFn]:
    """The training forward, training forward+backward (as ``jax.vjp`` and as a training
    step's ``jax.grad``) and eval functions of ``layer``."""

    def train_fwd(x: jax.Array, params: Any, stats: Any, dy: jax.Array) -> Any:
        del dy
        return layer.train(x, params, stats)

    def train_fwd_bwd(x: jax.Array, params: Any, stats: Any, dy: jax.Array) -> Any:
        (y, new_stats), vjp = jax.vjp(lambda x, p: layer.train(x, p, stats), x, params)
        return y, new_stats, vjp((dy.astype(y.dtype), jax.tree.map(jnp.zeros_like, new_stats)))

    def train_step(x: jax.Array, params: Any, stats: Any, dy: jax.Array) -> Any:
        def loss(x: jax.Array, params: Any) -> tuple[jax.Array, Any]:
            y, new_stats = layer.train(x, params, stats)
            return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), new_stats

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)

    def evaluate(x: jax.Array, params: Any, stats: Any, dy: jax.Array) -> Any:
        del dy
        return layer.evaluate(x, params, stats)

    return {"train_fwd": train_fwd, "train_fwd_bwd": train_fwd_bwd, "train_step": train_step,
            "eval": evaluate}


def _data(shape: tuple[int, ...], dtype: Any, out_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """An input with mean 1 and std 2 in ``dtype``, and a cotangent in ``out_dtype``."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2 + 1
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    return x.astype(dtype), dy.astype(out_dtype)


def _abstract(tree: Any, leading: tuple[int, ...] = ()) -> Any:
    """``tree``'s arrays as ``ShapeDtypeStruct``s, with ``leading`` axes in front."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((*leading, *a.shape), a.dtype), tree)


def _optimized_hlo(fn: Callable[..., Any], *args: Any) -> str:
    """The optimized HLO text of ``jax.jit(fn)`` compiled for ``args`` (arrays or shapes)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    if text is None:
        raise RuntimeError(f"Expected XLA to return the optimized HLO text, got None for {fn}.")
    return text


def residuals(
    train: Callable[[jax.Array, Any, Any], Any], x: Any, params: Any, stats: Any
) -> dict[str, Any]:
    """What reverse mode keeps from the training forward for the backward: the residuals.

    They are the arrays held by the closure that ``jax.vjp(f, x, params)`` returns (the
    leaves of its pytree, each counted once), found from shapes alone with
    ``jax.eval_shape``. They are what a jitted step keeps between its forward and backward:
    ``jax.linearize`` saves the same arrays, and the compiled program that returns them
    writes exactly these buffers (tests/test_bench.py checks it against the optimized HLO).

    Args:
      train: the layer's training forward, ``(x, params, stats) -> outputs``.
      x: the input (an array or a ``ShapeDtypeStruct``).
      params: its parameters (arrays or shapes).
      stats: its running statistics (arrays or shapes), not differentiated.

    Returns:
      ``arrays``: ``[shape, dtype name]`` of each residual; ``bytes``: their total;
      ``over_x``: that total over the bytes of ``x``; ``full_size``: how many have ``x``'s
      element count; ``f32_copies_of_bf16``: for a bfloat16 ``x``, how many of those are
      float32 (a float32 copy of ``x``, or of a value of its size), else 0.
    """

    def kept(x: jax.Array, params: Any, stats: Any) -> list[jax.Array]:
        _, backward = jax.vjp(lambda x, params: train(x, params, stats), x, params)
        unique = {id(leaf): leaf for leaf in jax.tree.leaves(backward)}
        return list(unique.values())

    numel = math.prod(x.shape)
    arrays = jax.eval_shape(kept, x, params, stats)
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays)
    full = [a for a in arrays if math.prod(a.shape) == numel]
    return {
        "arrays": [[list(a.shape), a.dtype.name] for a in arrays],
        "bytes": total,
        "over_x": total / (numel * jnp.dtype(x.dtype).itemsize),
        "full_size": len(full),
        "f32_copies_of_bf16": (
            sum(a.dtype == jnp.float32 for a in full) if x.dtype == jnp.bfloat16 else 0
        ),
    }


def layer_timings(shapes: list[Shape], rounds: int) -> list[dict[str, Any]]:
    """Per shape and mode: the median times of every implementation, in this process.

    Args:
      shapes: the ``(label, shape, axis, dtype name, output dtype name)`` of each layer.
      rounds: rounds of :func:`~experiments.bench.timing.time_interleaved` per mode.

    Returns:
      One dict per shape; per mode: ``ms`` (median per implementation), ``x_proxy`` (median
      per-round ratio to the proxy) and ``jaxbn_over_flax`` (median per-round ratio).
    """
    out = []
    for _, shape, axis, dtype_name, out_name in shapes:
        x, dy = _data(tuple(shape), jnp.dtype(dtype_name), jnp.dtype(out_name))
        params, _ = jaxbn.init(shape[axis])
        layers = _layers(axis, len(shape), shape[axis], None, dtype_name, out_name)
        row = {}
        for mode in MODES:
            calls = {
                impl: functools.partial(
                    jax.jit(_mode_functions(layer)[mode]), x, params, layer.stats, dy
                )
                for impl, layer in layers.items()
            }
            samples = time_interleaved(calls, rounds)
            row[mode] = {
                "ms": {impl: median_ms(samples[impl]) for impl in IMPLS},
                "x_proxy": {impl: median_ratio(samples[impl], samples["proxy"]) for impl in IMPLS},
                "jaxbn_over_flax": median_ratio(samples["jaxbn"], samples["flax"]),
            }
        out.append(row)
    return out


def layer_passes(shapes: list[Shape], ensemble: int = ENSEMBLE) -> list[dict[str, Any]]:
    """Per shape: full-tensor passes of every implementation and mode, from optimized HLO,
    and the residuals each keeps for its backward (:func:`residuals`).

    Nothing is allocated: the programs are lowered from shapes alone.

    Args:
      shapes: the ``(label, shape, axis, dtype name, output dtype name)`` of each layer.
      ensemble: the size of the ensemble axis that the training forward+backward is also
        ``jax.vmap``-ed over (x, params, statistics and dy all gain it in front).

    Returns:
      One dict per shape: ``numel`` and ``itemsize`` of the input; ``passes`` per mode and
      implementation (``total`` reads and writes in units of the input, and
      ``f32_copies_of_bf16``: float32 arrays of the input's size written, bfloat16 only);
      ``vmap_train_fwd_bwd`` per implementation: the passes per element of the ensemble's
      input (its ``ensemble`` times larger element count) under ``jax.vmap``;
      ``residuals`` per implementation (:func:`residuals`).
    """
    out = []
    for label, shape, axis, dtype_name, out_name in shapes:
        dtype = jnp.dtype(dtype_name)
        numel = math.prod(shape)
        x = jax.ShapeDtypeStruct(tuple(shape), dtype)
        dy = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(out_name))
        params = _abstract(jaxbn.init(shape[axis])[0])
        row: dict[str, Any] = {
            "shape": label, "numel": numel, "itemsize": dtype.itemsize,
            "passes": {mode: {} for mode in MODES}, "vmap_train_fwd_bwd": {}, "residuals": {},
        }
        layers = _layers(axis, len(shape), shape[axis], None, dtype_name, out_name)
        for impl, layer in layers.items():
            args = (x, params, _abstract(layer.stats), dy)
            for mode, fn in _mode_functions(layer).items():
                passes = count_passes(_optimized_hlo(fn, *args), numel)
                row["passes"][mode][impl] = {
                    "total": passes.total,
                    "f32_copies_of_bf16": passes.f32_copies if dtype_name == "bfloat16" else 0,
                }
            vmapped = jax.vmap(_mode_functions(layer)["train_fwd_bwd"])
            hlo = _optimized_hlo(vmapped, *_abstract(args, (ensemble,)))
            row["vmap_train_fwd_bwd"][impl] = count_passes(hlo, ensemble * numel).total
            row["residuals"][impl] = residuals(layer.train, x, params, _abstract(layer.stats))
        out.append(row)
    return out


def collectives(devices: int = 8) -> dict[str, dict[str, int]]:
    """Collectives per layer under ``shard_map`` over ``devices`` host CPU devices.

    Sets the host device count, so it must run in a fresh process before jax's backends
    start: ``python -m experiments.bench.worker collectives``.

    Returns:
      For jaxbn and both flax variances: the collectives of the training ``forward`` (the
      output and the new statistics) and of the ``forward_backward``.
    """
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)
    mesh = jax.make_mesh((devices,), ("b",))
    features = 32
    x = jax.ShapeDtypeStruct(
        (8 * devices, 16, 16, features), jnp.float32, sharding=NamedSharding(mesh, P("b"))
    )
    params = _abstract(jaxbn.init(features)[0])
    specs = {"train_fwd": (P("b"), P()), "train_fwd_bwd": (P("b"), P(), (P("b"), P()))}
    out = {}
    for impl, layer in _layers(-1, x.ndim, features, axis_name="b").items():
        if impl == "proxy":
            continue
        counts: dict[str, int] = {}
        for mode, key in (("train_fwd", "forward"), ("train_fwd_bwd", "forward_backward")):
            fn = jax.shard_map(
                _mode_functions(layer)[mode],
                mesh=mesh,
                in_specs=(P("b"), P(), P(), P("b")),
                out_specs=specs[mode],
            )
            hlo = _optimized_hlo(fn, x, params, _abstract(layer.stats), x)
            counts[key] = sum(count_collectives(hlo).values())
        out[impl] = counts
    return out

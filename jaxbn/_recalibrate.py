"""Precise (recalibrated) population statistics: pooled over K batches, not an EMA.

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3 (PreciseBN): after training, run
the fixed model in training mode over K batches, collect every batch-norm layer's batch
statistics and pool them, each batch weighted by its number of entries. The EMA of training
mixes statistics of many past versions of the weights and, with a high momentum, is a noisy
estimate; the pooled statistics are exact for the final weights.

An accumulator in the style of optax: :func:`recalibration_init`,
:func:`recalibration_update` (jittable) and :func:`recalibration_result`, and the loop
:func:`recalibrate`. They work on any pytree whose statistics nodes are
:class:`~jaxbn.BatchStats` or mappings with ``"mean"`` and ``"var"`` entries (a flax
``batch_stats`` collection, or ``nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._dtypes import stats_dtype
from ._moments import Moments, mean_and_var, merge
from ._state import BatchStats, is_stats_node, mean_and_var_of

__all__ = [
    "PooledStats",
    "RecalibrationState",
    "recalibrate",
    "recalibration_init",
    "recalibration_result",
    "recalibration_update",
]


class PooledStats(NamedTuple):
    """The pooled moments of one layer's batches so far (Chan et al.'s running form)."""

    entries: jax.Array
    """float32 (or wider) ``[*feature_shape]``: entries merged so far, per feature."""
    mean: jax.Array
    """float32 (or wider) ``[*feature_shape]``: mean of all entries merged so far."""
    m2: jax.Array
    """float32 (or wider) ``[*feature_shape]``: sum of squared deviations from ``mean``."""
    batches: jax.Array
    """int32 ``[]``: batches that contributed at least one entry to this layer."""

    @property
    def count(self) -> jax.Array:  # type: ignore[override]  # shadows tuple.count
        """Deprecated alias of :attr:`entries` (entries per feature, where
        :attr:`BatchStats.count <jaxbn.BatchStats.count>` counts batches)."""
        warnings.warn(
            "`PooledStats.count` is deprecated: use `PooledStats.entries` (the entries merged "
            "per feature; `batches` counts batches, as `BatchStats.count` does).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.entries


class RecalibrationState(NamedTuple):
    """The accumulator of :func:`recalibration_update`: a pytree, so it can cross ``jit``."""

    stats: Any
    """The statistics tree given to :func:`recalibration_init`: the structure, the dtypes,
    and the values kept for features that no batch reached."""
    pooled: Any
    """The same tree with a :class:`PooledStats` in place of each statistics node."""


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    return jax.tree.flatten(tree, is_leaf=is_stats_node)


def _paths(tree: Any, is_leaf: Callable[[Any], bool] | None = is_stats_node) -> list[str]:
    """The key path of each leaf (each statistics node by default), as ``keystr`` writes it:
    ``['params']['BatchNorm_0']``; the empty string for the root."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [jax.tree_util.keystr(path) for path, _ in leaves]


def _where(path: str) -> str:
    return path or "the root"


def _listing(paths: list[str], most: int = 5) -> str:
    shown = ", ".join(_where(p) for p in paths[:most])
    return shown if len(paths) <= most else f"{shown} and {len(paths) - most} more"


def _difference(expected: list[str], given: list[str]) -> str:
    """``"lacks X and has unexpected Y"``: how the leaf paths ``given`` differ from
    ``expected``; empty if only the containers differ."""
    missing = [p for p in expected if p not in given]
    extra = [p for p in given if p not in expected]
    parts = ([f"lacks {_listing(missing)}"] if missing else []) + (
        [f"has unexpected {_listing(extra)}"] if extra else []
    )
    return " and ".join(parts)


def recalibration_init(stats: Any) -> RecalibrationState:
    """Starts pooling batch statistics for every batch-norm layer of ``stats``.

    Args:
      stats: a pytree of statistics nodes: :class:`~jaxbn.BatchStats`, or mappings with
        ``"mean"`` and ``"var"`` arrays (a flax linen ``batch_stats`` collection; an nnx
        model's ``nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))``). Other leaves are
        carried along unchanged.

    Returns:
      An empty :class:`RecalibrationState`: every layer has merged 0 entries.

    Raises:
      ValueError: ``stats`` contains no statistics node.

    Example:
      >>> import jaxbn
      >>> _, state = jaxbn.init(3)
      >>> acc = jaxbn.recalibration_init({"bn": state})
      >>> acc.pooled["bn"].entries.tolist()
      [0.0, 0.0, 0.0]
    """
    nodes, treedef = _flatten(stats)
    if not any(is_stats_node(node) for node in nodes):
        leaf_paths = _paths(stats, is_leaf=None)
        leaves = f"its leaves are at {_listing(leaf_paths)}" if leaf_paths else "it is empty"
        raise ValueError(
            "`stats` must contain batch-norm statistics: jaxbn.BatchStats or mappings with "
            f'"mean" and "var" entries (a flax batch_stats collection), got a tree with '
            f"none ({leaves})."
        )
    pooled: list[PooledStats | None] = []
    for node in nodes:
        if not is_stats_node(node):
            pooled.append(None)
            continue
        mean, _ = mean_and_var_of(node)
        zeros = jnp.zeros(mean.shape, stats_dtype(mean.dtype))
        pooled.append(PooledStats(zeros, zeros, zeros, jnp.zeros((), jnp.int32)))
    return RecalibrationState(stats=stats, pooled=jax.tree.unflatten(treedef, pooled))


def _check_acc(acc: Any, function: str) -> None:
    if not isinstance(acc, RecalibrationState):
        raise TypeError(
            f"`acc` must be the jaxbn.RecalibrationState that recalibration_init (or a "
            f"previous recalibration_update) returned, got {type(acc).__name__}. Start with "
            f"acc = jaxbn.recalibration_init(stats), then call {function}(acc, ...)."
        )


def _counts_per_node(counts: Any, stats: Any, treedef: Any) -> list[Any]:
    if isinstance(counts, (int, float, np.ndarray, np.generic, jax.Array)):
        return [counts] * treedef.num_leaves
    try:
        return treedef.flatten_up_to(counts)
    except (ValueError, TypeError):
        expected = _paths(stats)
        difference = _difference(expected, _paths(counts, is_leaf=None))
        raise ValueError(
            "`counts` must be a number or array (the entries per feature of every layer in "
            "this batch) or a pytree with one count at the path of each statistics node of "
            f"`batch_stats` ({_listing(expected)}), got a {type(counts).__name__} that "
            f"{difference or 'has them in other containers'}."
        ) from None


def recalibration_update(
    acc: RecalibrationState, batch_stats: Any, counts: Any
) -> RecalibrationState:
    r"""Merges one batch's statistics into the pooled ones (Chan et al.'s formula).

    For each layer and feature, with the pooled ``(n_a, μ_a, M2_a)`` and the batch's
    ``n_b`` entries of mean ``μ_b`` and biased variance ``σ²_b``::

        n  = n_a + n_b,   δ = μ_b - μ_a,   μ = μ_a + δ n_b / n
        M2 = M2_a + n_b σ²_b + δ² n_a n_b / n

    so after K batches ``μ`` and ``M2 / n`` are the mean and biased variance of all the
    entries together, exactly as if the K batches were one.

    Get ``batch_stats`` by running the model in training mode with ``momentum=0.0``: the
    new running statistics then *are* the batch mean and biased variance
    (``jaxbn.batch_norm(..., training=True, momentum=0.0)``; see :func:`recalibrate` for
    flax linen and nnx models).

    Args:
      acc: the accumulator from :func:`recalibration_init` or a previous update.
      batch_stats: this batch's statistics, a tree of the structure of ``acc.stats``.
      counts: how many entries each feature's statistics were taken over (``N*H*W`` for
        NHWC input, the mask's count with a mask). A number or array broadcasts to every
        layer; otherwise a pytree with one count (a scalar or a per-feature array) in place
        of each statistics node. Only the ratios between batches matter per layer, so when
        every layer sees a fixed number of positions per example, the batch size ``N``
        weights every layer exactly. A feature with count 0 is not merged.

    Returns:
      The updated accumulator, of the same structure, shapes and dtypes.

    Raises:
      TypeError: ``acc`` is not a :class:`RecalibrationState` (a ``BatchStats``, say).
      ValueError: ``batch_stats`` does not have the structure or feature shapes of
        ``acc.stats``, or ``counts`` does not match its statistics nodes.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> _, state = jaxbn.init(1)
      >>> acc = jaxbn.recalibration_init(state)
      >>> for batch in (jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0], [8.0]])):
      ...     _, batch_stats = jaxbn.batch_norm(batch, None, state, training=True, momentum=0.0)
      ...     acc = jaxbn.recalibration_update(acc, batch_stats, counts=batch.shape[0])
      >>> pooled = jaxbn.recalibration_result(acc)   # of 0, 2, 4, 6, 8
      >>> round(float(pooled.mean[0]), 5), round(float(pooled.var[0]), 5), int(pooled.count)
      (4.0, 8.0, 2)
    """
    _check_acc(acc, "recalibration_update")
    nodes, treedef = _flatten(acc.stats)
    batch_nodes, batch_treedef = _flatten(batch_stats)
    paths = _paths(acc.stats)
    if batch_treedef != treedef:
        difference = _difference(paths, _paths(batch_stats))
        raise ValueError(
            "`batch_stats` must have the structure of the statistics given to "
            f"recalibration_init, with statistics at {_listing(paths)}, but it "
            f"{difference or f'has them in other containers: {batch_treedef}'}. Pass the "
            f"model's whole statistics tree (in `recalibrate`, return it from `batch_stats_fn`)."
        )
    count_nodes = _counts_per_node(counts, acc.stats, treedef)
    pooled_nodes = treedef.flatten_up_to(acc.pooled)
    merged: list[PooledStats | None] = []
    for path, node, batch, count, pooled in zip(
        paths, nodes, batch_nodes, count_nodes, pooled_nodes, strict=True
    ):
        if not is_stats_node(node):
            merged.append(None)
            continue
        merged.append(_merge(pooled, batch, count, path))
    return acc._replace(pooled=jax.tree.unflatten(treedef, merged))


def _merge(pooled: PooledStats, batch: Any, count: Any, path: str) -> PooledStats:
    shape, dtype = pooled.mean.shape, pooled.mean.dtype
    batch_mean, batch_var = mean_and_var_of(batch)
    for name, value in (("mean", batch_mean), ("var", batch_var)):
        if value.shape != shape:
            raise ValueError(
                f"`batch_stats` at {_where(path)} must have the feature shape {shape} that "
                f"recalibration_init was given there, got {name} of shape {value.shape}."
            )
    count_shape = tuple(np.shape(count))
    if count_shape not in ((), shape):
        raise ValueError(
            f"`counts` for the layer at {_where(path)} must be a scalar or of its feature "
            f"shape {shape}, got shape {count_shape}."
        )
    n_b = jnp.broadcast_to(jnp.asarray(count).astype(dtype), shape)
    n_b = jnp.where(n_b > 0, n_b, jnp.zeros_like(n_b))
    batch_m2 = n_b * jnp.maximum(batch_var.astype(dtype), 0)
    merged = merge(
        Moments(pooled.entries, pooled.mean, pooled.m2),
        Moments(n_b, batch_mean.astype(dtype), batch_m2),
    )
    keep = n_b == 0  # unmerged features keep their values, even if the batch's are NaN
    contributed = jnp.any(n_b > 0).astype(jnp.int32)
    return PooledStats(
        entries=merged.valid_count,
        mean=jnp.where(keep, pooled.mean, merged.mean),
        m2=jnp.where(keep, pooled.m2, merged.m2),
        batches=pooled.batches + contributed,
    )


def recalibration_result(acc: RecalibrationState) -> Any:
    """The pooled statistics, in the structure and dtypes of ``acc.stats``.

    Each statistics node gets ``mean = μ`` and ``var = M2 / n`` (biased, as jaxbn, flax and
    keras store it; multiply by ``n / (n - 1)`` for torch's unbiased convention). A
    :class:`~jaxbn.BatchStats` node's ``count`` becomes the number of batches that reached
    it. Features that no batch reached keep the values of ``acc.stats``.

    Args:
      acc: the accumulator after the last :func:`recalibration_update`.

    Returns:
      A tree of the structure of ``acc.stats`` with the pooled statistics.

    Raises:
      TypeError: ``acc`` is not a :class:`RecalibrationState` (a ``BatchStats``, say).

    Example:
      >>> import jaxbn
      >>> _, state = jaxbn.init(2)
      >>> same = jaxbn.recalibration_result(jaxbn.recalibration_init({"bn": state}))
      >>> same["bn"].var.tolist(), int(same["bn"].count)  # no batch merged: values kept
      ([1.0, 1.0], 0)
    """
    _check_acc(acc, "recalibration_result")
    nodes, treedef = _flatten(acc.stats)
    pooled_nodes = treedef.flatten_up_to(acc.pooled)
    results = []
    for node, pooled in zip(nodes, pooled_nodes, strict=True):
        if not is_stats_node(node):
            results.append(node)
            continue
        old_mean, old_var = mean_and_var_of(node)
        reached = pooled.entries > 0
        pooled_mean, pooled_var = mean_and_var(Moments(pooled.entries, pooled.mean, pooled.m2))
        mean = jnp.where(reached, pooled_mean, old_mean.astype(pooled_mean.dtype))
        var = jnp.where(reached, pooled_var, old_var.astype(pooled_var.dtype))
        mean, var = mean.astype(old_mean.dtype), var.astype(old_var.dtype)
        if isinstance(node, BatchStats):
            results.append(
                BatchStats(mean=mean, var=var, count=pooled.batches.astype(node.count.dtype))
            )
        else:
            results.append(_replace_mapping(node, mean, var))
    return jax.tree.unflatten(treedef, results)


def _replace_mapping(node: Mapping[str, Any], mean: jax.Array, var: jax.Array) -> Any:
    updated = {**node, "mean": mean, "var": var}
    factory: Any = type(node)  # dict, FrozenDict, ...: keep the caller's mapping type
    try:
        return factory(updated)
    except TypeError:
        return updated


def _count(node: Any) -> Any:
    """The batch count of a statistics node (a BatchStats, or a mapping with "count"), or
    None if it keeps none."""
    if isinstance(node, BatchStats):
        return node.count
    return node.get("count") if isinstance(node, Mapping) else None


def _rejected_features(template: Any, batch: Any) -> jax.Array:
    """Per feature, whether the layer rejected this batch there, so its statistics are
    not data: the node's count did not advance past the template's (jaxbn keeps the state
    of a batch with non-finite statistics and does not count it), or, for a node that keeps
    no count, its statistics came back bitwise unchanged; or the feature's statistics are
    not finite (a layer that does not reject, such as flax's)."""
    old_mean, old_var = mean_and_var_of(template)
    mean, var = mean_and_var_of(batch)
    old_count, count = _count(template), _count(batch)
    if old_count is not None and count is not None:
        old_count = jnp.asarray(old_count)
        node_rejected = jnp.all(jnp.asarray(count).astype(old_count.dtype) == old_count)
    elif mean.dtype == old_mean.dtype and var.dtype == old_var.dtype:
        node_rejected = jnp.all(mean == old_mean) & jnp.all(var == old_var)
    else:  # new arrays, of another dtype: the layer computed them
        node_rejected = jnp.zeros((), bool)
    return node_rejected | ~(jnp.isfinite(mean) & jnp.isfinite(var))


@jax.jit
def _update_jit(
    acc: RecalibrationState, batch_stats: Any, counts: Any
) -> tuple[RecalibrationState, jax.Array]:
    """:func:`recalibration_update`, with count 0 wherever a layer rejected the batch
    (see :func:`_rejected_features`); also returns, per statistics node, whether it left
    out entries that ``counts`` gave."""
    nodes, treedef = _flatten(acc.stats)
    batch_nodes, batch_treedef = _flatten(batch_stats)
    if batch_treedef != treedef:
        return recalibration_update(acc, batch_stats, counts), jnp.zeros((0,), bool)  # raises
    kept, skipped = [], []
    for node, batch, count in zip(
        nodes, batch_nodes, _counts_per_node(counts, acc.stats, treedef), strict=True
    ):
        if not (is_stats_node(node) and is_stats_node(batch)):
            kept.append(count)  # nothing to judge, or recalibration_update raises
            continue
        shape = mean_and_var_of(node)[0].shape
        batch_shapes = {a.shape for a in mean_and_var_of(batch)}
        if batch_shapes != {shape} or np.shape(count) not in ((), shape):
            kept.append(count)  # recalibration_update raises
            continue
        rejected = _rejected_features(node, batch)
        given = jnp.broadcast_to(jnp.asarray(count), shape)
        kept.append(jnp.where(rejected, jnp.zeros_like(given), given))
        skipped.append(jnp.any(rejected & (given > 0)))
    acc = recalibration_update(acc, batch_stats, jax.tree.unflatten(treedef, kept))
    return acc, jnp.stack(skipped) if skipped else jnp.zeros((0,), bool)


def _warn_skipped(skipped: list[jax.Array], paths: list[str]) -> None:
    """One warning naming each batch that a layer rejected, and the layers."""
    flags = np.asarray(jax.device_get(skipped), bool).reshape(len(skipped), -1)
    which = [
        f"batch {i} at {_listing([p for p, s in zip(paths, row, strict=True) if s])}"
        for i, row in enumerate(flags)
        if row.any()
    ]
    if not which:
        return
    shown = "; ".join(which[:5]) + (f"; and {len(which) - 5} more" if len(which) > 5 else "")
    warnings.warn(
        f"recalibrate skipped {len(which)} of {len(flags)} batches where a layer rejected "
        f"them (batches counted from 0): {shown}. A layer rejects a batch whose statistics "
        f"are not finite (a NaN or inf in it): its count does not advance (or, without a "
        f"count, its statistics come back unchanged), so they are no data and are not "
        f"pooled; the result pools the other batches.",
        RuntimeWarning,
        stacklevel=3,
    )


def recalibrate(
    batch_stats_fn: Callable[[Any], tuple[Any, ArrayLike | Any]],
    batches: Iterable[Any],
    stats: Any,
) -> Any:
    """Recomputes population statistics exactly over ``batches`` (PreciseBN).

    Runs ``batch_stats_fn`` on each batch, pools the results with
    :func:`recalibration_update` (compiled once) and returns
    :func:`recalibration_result`: per layer, the mean and biased variance of all the
    entries of all the batches (Wu & Johnson 2021, §3). Use it after training, with the
    weights fixed; a few hundred to a few thousand examples are typically enough.

    ``batch_stats_fn(batch)`` must return ``(batch_stats, counts)``: the model's new
    statistics after one training-mode forward pass with batch-norm momentum 0 (so they
    are the batch's own mean and biased variance), and the entries per feature (the batch
    size when every layer sees a fixed number of positions per example; see
    :func:`recalibration_update`). Recipes:

    - pure function: ``jaxbn.batch_norm(..., training=True, momentum=0.0)`` in the forward
      pass; return the tree of new states.
    - flax linen: apply the model in training mode inside
      ``flax.linen.intercept_methods`` with an interceptor that calls each batch-norm module
      as ``module.clone(parent=module.scope, momentum=0.0)`` (same variables, momentum 0),
      and return ``updates["batch_stats"]``; store the result back as
      ``variables["batch_stats"]``. docs/recalibration-folding.md has the code.
    - flax nnx: ``nnx.clone`` the model, set ``momentum = 0.0`` on every batch-norm module
      of the copy (``nnx.iter_modules``), ``.train()`` it, and return
      ``nnx.to_pure_dict(nnx.state(copy, nnx.BatchStat))``; write the result back with
      ``nnx.replace_by_pure_dict`` and ``nnx.update``.

    ``batch_stats_fn`` must run the model on ``stats`` themselves, as the recipes do: a
    layer that rejects a batch (``batch_norm`` does when its statistics are not finite: a
    NaN or inf in it) returns ``stats``' own values and count, which are no data. Such a
    batch is skipped at that layer, and so is a feature whose returned statistics are not
    finite (a layer that does not reject, such as flax's); a ``RuntimeWarning`` names the
    batches (counted from 0) and the layers. A layer that keeps a count (a
    :class:`~jaxbn.BatchStats`; a mapping with ``"count"``, as ``jaxbn.linen.BatchNorm``
    keeps with ``debias``) rejected the batch if its count did not advance; one that keeps
    none, if its statistics come back bitwise unchanged.

    Args:
      batch_stats_fn: ``batch -> (batch_stats, counts)`` as above.
      batches: an iterable of batches, each passed to ``batch_stats_fn``.
      stats: the current statistics tree (the template: structure, dtypes, and the values
        kept for features no batch reaches).

    Returns:
      The recalibrated statistics, a tree of the structure of ``stats``.

    Raises:
      ValueError: ``batches`` is empty, or ``batch_stats_fn`` returns statistics of
        another structure than ``stats`` (see :func:`recalibration_update`).
      TypeError: ``batch_stats_fn`` does not return a pair.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> _, state = jaxbn.init(4)
      >>> def batch_stats_fn(x):
      ...     _, new_state = jaxbn.batch_norm(x, None, state, training=True, momentum=0.0)
      ...     return new_state, x.shape[0]
      >>> batches = [jax.random.normal(jax.random.key(i), (16, 4)) for i in range(3)]
      >>> precise = jaxbn.recalibrate(batch_stats_fn, batches, state)
      >>> everything = jnp.concatenate(batches)
      >>> bool(jnp.allclose(precise.var, everything.var(0), rtol=1e-5)), int(precise.count)
      (True, 3)
    """
    acc = recalibration_init(stats)
    merged = 0
    skipped = []
    for batch in batches:
        result = batch_stats_fn(batch)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(
                "`batch_stats_fn` must return a pair (batch_stats, counts), got "
                f"{type(result).__name__}. Return e.g. (new_stats, x.shape[0])."
            )
        batch_stats, counts = result
        acc, skipped_nodes = _update_jit(acc, batch_stats, counts)
        skipped.append(skipped_nodes)
        merged += 1
    if not merged:
        raise ValueError("`batches` yielded no batch: recalibration needs at least one.")
    nodes, _ = _flatten(stats)
    paths = [p for p, node in zip(_paths(stats), nodes, strict=True) if is_stats_node(node)]
    _warn_skipped(skipped, paths)
    return recalibration_result(acc)

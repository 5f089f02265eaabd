"""Measurements of a :class:`~experiments.train.Trainer`'s runs beside training: their BN
statistics recalibrated with the current weights, and their per-layer gradient norms.

Recalibration (PreciseBN, Wu & Johnson 2021): with ``recalibration_batches = K > 0`` the
current weights run K training-mode forwards of ``batch_size`` training examples each (drawn
as training draws them, from a key of their own, the same K batches at every evaluation) with
every batch norm's momentum forced to 0 (``flax.linen.intercept_methods``, as in
docs/recalibration-folding.md),
and ``jaxbn.recalibration_update`` pools the K batches' statistics exactly. The runs are
evaluated again with them; those metrics get the suffix ``_recalibrated``. The training state
itself keeps its running statistics.

Gradient norms: the norm of each layer's kernel gradient on the first training batch, with the
running statistics of the state (the depth claim takes them at initialization).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
import jaxbn.linen

from .train import Trainer, TrainState, _batch_indices, _standard_promotion, _training_loss

__all__ = ["Probes"]


def _momentum_zero(next_fun, args, kwargs, context):
    """Interceptor: every batch norm runs with momentum 0 (its new running statistics are
    the batch's own), on the same variables; the recipe of docs/recalibration-folding.md."""
    module = context.module
    if (
        isinstance(module, jaxbn.linen.BatchNorm | nn.BatchNorm)
        and context.method_name == "__call__"
        and module.momentum != 0.0
    ):
        return module.clone(parent=module.scope, momentum=0.0)(*args, **kwargs)
    return next_fun(*args, **kwargs)


class Probes:
    """The compiled probes of one trainer's runs; every method works on all runs at once."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._recalibrated = jax.jit(_standard_promotion(self._recalibrated_impl))
        self._grad_norms = jax.jit(_standard_promotion(self._grad_norms_impl))

    def recalibrated_stats(self, state: TrainState) -> Any:
        """Per run, the BN statistics pooled exactly over ``recalibration_batches`` batches."""
        return self._recalibrated(state.params, state.batch_stats)

    def evaluate_recalibrated(self, state: TrainState) -> dict[str, np.ndarray]:
        """:meth:`Trainer.evaluate` with the recalibrated statistics, each metric's name with
        the suffix ``_recalibrated``."""
        again = self.trainer.evaluate(state, batch_stats=self.recalibrated_stats(state))
        return {f"{name}_recalibrated": value for name, value in again.items()}

    def grad_norms(self, state: TrainState) -> np.ndarray:
        """(R, layers): the norm of each layer's kernel gradient on the first batch."""
        return np.asarray(self._grad_norms(state), dtype=np.float64)

    def _recalibrated_impl(self, params: Any, batch_stats: Any) -> Any:
        trainer = self.trainer
        n, b = trainer.data.x_train.shape[0], trainer.config.batch_size

        def one(params, batch_stats, key):
            def batch_stats_fn(x):
                with nn.intercept_methods(_momentum_zero):
                    _, updates = trainer.eval_model.apply(
                        {"params": params, "batch_stats": batch_stats}, x, train=True,
                        rngs={"dropout": key}, mutable=["batch_stats"],
                    )
                return updates["batch_stats"]

            def body(acc, k):
                x = trainer.data.x_train[_batch_indices(key, k, n, b)]
                return jaxbn.recalibration_update(acc, batch_stats_fn(x), b), None

            acc, _ = jax.lax.scan(
                body,
                jaxbn.recalibration_init(batch_stats),
                jnp.arange(trainer.config.recalibration_batches, dtype=jnp.int32),
            )
            return jaxbn.recalibration_result(acc)

        return jax.vmap(one)(params, batch_stats, trainer.keys.recalibration)

    def _grad_norms_impl(self, state: TrainState) -> jax.Array:
        trainer = self.trainer
        x, y = trainer.training_batch(jnp.int32(0))

        def one(params, batch_stats, x, y, key):
            def loss(params):
                return _training_loss(trainer.eval_model, params, batch_stats, x, y, key)[0]

            grads = jax.grad(loss)(params)
            blocks = sorted((k for k in grads if k.startswith("block")), key=lambda k: int(k[5:]))
            norms = []
            for name in [*blocks, "head"]:
                kernels = [
                    g for path, g in jax.tree_util.tree_leaves_with_path(grads[name])
                    if path[-1].key == "kernel"
                ]
                norms.append(jnp.sqrt(sum(jnp.sum(k**2) for k in kernels)))
            return jnp.stack(norms)

        return jax.vmap(one)(state.params, state.batch_stats, x, y, trainer.keys.dropout)

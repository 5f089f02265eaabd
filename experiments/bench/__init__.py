"""``python -m experiments bench``: jaxbn against flax, an elementwise proxy, and no norm.

Batch norm is memory-bound, so every layer time is reported as a multiple of an elementwise
proxy (``x * a + b`` per feature, and its VJP) timed side by side in the same process: the
ratio says how many "elementwise passes" a layer costs, and it survives a noisy shared
machine far better than raw milliseconds. Implementations are interleaved within every
round and the median over rounds is reported. The bench measures:

- per layer shape and mode (training forward, forward+backward, eval): times against the
  proxy and jaxbn/flax (:mod:`~experiments.bench.layers`);
- exact counts from the optimized HLO: full-tensor passes, float32 copies of a bfloat16
  input, passes per element under ``jax.vmap`` over an ensemble axis, and collectives per
  layer under ``shard_map`` over 8 host devices;
- the residuals each layer's reverse mode keeps from the forward for the backward: their
  bytes over the input's, and any float32 array of a bfloat16 input's size;
- the achieved memory bandwidth at the largest shape (counted bytes over time), against
  the device's peak on a known GPU;
- the training step of a 20-layer MLP (no norm, jaxbn, flax) and of ResNet-50 (no norm,
  jaxbn, flax, and flax's converted by ``jaxbn.linen.convert_batch_norm``: its ratio to
  jaxbn is what the conversion costs), interleaved, and the XLA compile and trace+lower
  time of each step, from cold caches in fresh processes (:mod:`~experiments.bench.networks`);
- folding: inference of a small CNN with eval-mode BN against the same CNN with every BN
  folded into its conv by ``jaxbn.fold_conv``, and their largest difference.

Every measurement runs in a fresh process (:mod:`~experiments.bench.worker`) and returns a
plain dict; :mod:`~experiments.bench.command` merges them and
:mod:`~experiments.bench.report` prints the tables and writes ``bench.json`` and
``bench.png``. Nothing here imports jax at import time.

Command: ``python -m experiments bench [--quick] [--out DIR] [--processes N]
[--compile-processes N] [--resnet-batch N] [--resnet-size N]``; ``python -m
experiments.bench`` takes the same options. The same command runs unchanged on a GPU (where
ResNet-50 takes 64 images of 224x224 instead of 4 of 32x32). On a shared CPU a ratio moves
by up to ±20% between runs at 15 rounds (fresh output buffers are page-faulted in anew on
every call, and the allocator's state differs from process to process), hence 41 rounds,
and ``--processes 3`` for numbers to quote. On 2 CPU cores shared with other jobs,
``--quick`` took 4.5 minutes (a third of it compiling ResNet-50 six times) and the full bench
with ``--processes 3`` 23 minutes.
"""

from .command import DEFAULTS as DEFAULTS
from .command import add_arguments as add_arguments
from .command import measure as measure
from .command import run_bench as run_bench
from .command import run_from_args as run_from_args
from .spec import IMPLS as IMPLS
from .spec import MODES as MODES

__all__ = ["DEFAULTS", "IMPLS", "MODES", "add_arguments", "measure", "run_bench", "run_from_args"]

"""``cpu_copies``: copies of a value that XLA:CPU cannot merge, and nothing elsewhere.

A measured XLA:CPU trick, in one place. Each full-tensor kernel of batch norm (a sum, the
normalization, ``dx``) widens ``x`` or broadcasts the per-feature mean inside itself. XLA:CPU
runs a sum as a vectorized library kernel that reads its operands only when they have the
full shape: a broadcast or a bfloat16→float32 widening is produced inside the kernel, unless
XLA's common-subexpression pass has merged it with the identical broadcast or widening of
another kernel. A merged one has several users, so XLA writes it out to memory: a full-size
write and one more read per user. Measured with ``experiments.hlo.count_passes``:

- two-pass forward (Σx, then Σ(x - mean)², then y), (64, 32, 32, 64) float32: 6 passes
  with one shared ``mean``, 4 with a copy per kernel;
- forward and backward, (32, 8, 8, 16): 12 passes with the backward's ``mean`` shared, 10
  with a copy per kernel; bfloat16 writes float32 copies of ``x`` and ``dy`` unless each
  sum has its own copy of them (then 10 passes and no float32 copy).

The copies are the outputs of one ``optimization_barrier``, which costs nothing at run time.
On other platforms the copies are the value itself: XLA:GPU and XLA:TPU duplicate broadcasts
and converts into each fusion, and fuse sibling reductions of the same value into one
kernel, which a barrier would prevent. The choice is the lowering rule of a primitive, made
when the program is lowered for a platform: no runtime branch, and not even a
``stablehlo.case`` on a constant (which ``lax.platform_dependent`` emits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["cpu_copies"]


def cpu_copies(value: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """``n`` times ``value``, on XLA:CPU as values that XLA cannot merge with ``value`` or
    with each other (see the module docstring for why and the measurements)."""
    return tuple(_copies_p.bind(*(value,) * n))


_copies_p = Primitive("jaxbn_cpu_copies")
_copies_p.multiple_results = True


@_copies_p.def_impl
def _impl(*values: Any) -> tuple[Any, ...]:
    return values


@_copies_p.def_abstract_eval
def _abstract_eval(*avals: Any) -> tuple[Any, ...]:
    return avals


def _jvp(primals: Sequence[Any], tangents: Sequence[Any]) -> tuple[Any, Any]:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return _copies_p.bind(*primals), _copies_p.bind(*tangents)


def _transpose(cotangents: Sequence[Any], *values: Any) -> list[Any]:
    del values
    return list(cotangents)


def _batch(values: Sequence[Any], dims: Sequence[Any]) -> tuple[Any, Any]:
    return _copies_p.bind(*values), dims


ad.primitive_jvps[_copies_p] = _jvp
ad.primitive_transposes[_copies_p] = _transpose
batching.primitive_batchers[_copies_p] = _batch
mlir.register_lowering(_copies_p, lambda ctx, *values: values)
mlir.register_lowering(
    _copies_p,
    mlir.lower_fun(lambda *values: lax.optimization_barrier(values), multiple_results=True),
    platform="cpu",
)

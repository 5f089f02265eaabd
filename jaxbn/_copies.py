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

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["cpu_copies", "sum_then_cast"]

T = TypeVar("T")


def cpu_copies(value: T, n: int) -> tuple[T, ...]:
    """``n`` times ``value`` (an array or a pytree of arrays), on XLA:CPU as values that XLA
    cannot merge with ``value`` or with each other (see the module docstring for why and
    the measurements)."""
    leaves, treedef = jax.tree.flatten(value)
    copies = _copies_p.bind(*leaves * n)
    count = len(leaves)
    return tuple(
        jax.tree.unflatten(treedef, copies[i * count : (i + 1) * count]) for i in range(n)
    )


def sum_then_cast(terms: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """``(Σ terms).astype(dtype)`` for terms of one shape; transposed, each term gets its
    own copy of the cotangent (:func:`cpu_copies`), widened inside its own kernel.

    The output of a tangent rule: reverse mode transposes it, and a plain
    ``sum(terms).astype(bfloat16)`` would transpose into one float32 widening of the
    bfloat16 cotangent shared by every consumer, which XLA:CPU then writes out (4 extra
    passes per layer, measured on (32, 8, 8, 16)).
    """
    return _sum_cast_p.bind(*terms, dtype=np.dtype(dtype))


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


_sum_cast_p = Primitive("jaxbn_sum_then_cast")


@_sum_cast_p.def_impl
def _sum_cast_impl(*terms: Any, dtype: Any) -> Any:
    return functools.reduce(lax.add, terms).astype(dtype)


@_sum_cast_p.def_abstract_eval
def _sum_cast_abstract_eval(*avals: Any, dtype: Any) -> Any:
    return avals[0].update(dtype=dtype, weak_type=False)


def _sum_cast_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, dtype: Any) -> Any:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return _sum_cast_p.bind(*primals, dtype=dtype), _sum_cast_p.bind(*tangents, dtype=dtype)


def _sum_cast_transpose(cotangent: Any, *terms: Any, dtype: Any) -> list[Any]:
    avals = [t.aval if ad.is_undefined_primal(t) else jax.typeof(t) for t in terms]
    if isinstance(cotangent, ad.Zero):
        return [ad.Zero(aval) if ad.is_undefined_primal(t) else None for t, aval in zip(
            terms, avals, strict=True)]
    copies = cpu_copies(cotangent, len(terms))
    return [
        copy.astype(aval.dtype) if ad.is_undefined_primal(term) else None
        for term, copy, aval in zip(terms, copies, avals, strict=True)
    ]


def _sum_cast_batch(terms: Sequence[Any], dims: Sequence[Any], *, dtype: Any) -> Any:
    size = next(t.shape[d] for t, d in zip(terms, dims, strict=True) if d is not None)
    moved = [
        jax.numpy.broadcast_to(t, (size, *t.shape)) if d is None else jax.numpy.moveaxis(t, d, 0)
        for t, d in zip(terms, dims, strict=True)
    ]
    return _sum_cast_p.bind(*moved, dtype=dtype), 0


ad.primitive_jvps[_sum_cast_p] = _sum_cast_jvp
ad.primitive_transposes[_sum_cast_p] = _sum_cast_transpose
batching.primitive_batchers[_sum_cast_p] = _sum_cast_batch
mlir.register_lowering(_sum_cast_p, mlir.lower_fun(_sum_cast_impl, multiple_results=False))

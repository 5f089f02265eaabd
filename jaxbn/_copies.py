"""XLA:CPU read policies: copies of a value that XLA:CPU cannot merge, and nothing elsewhere.

A measured XLA:CPU trick, kept in one place with an off switch. Each full-tensor kernel of
batch norm (a sum, the normalization, ``dx``) widens ``x`` or broadcasts the per-feature
mean inside itself. XLA:CPU runs a sum as a vectorized library kernel that reads its
operands only when they have the full shape: a broadcast or a bfloat16→float32 widening is
produced inside the kernel, unless XLA's common-subexpression pass has merged it with the
identical broadcast or widening of another kernel. A merged one has several users, so XLA
writes it out to memory: a full-size write and one more read per user. Measured with
``experiments.hlo.count_passes``:

- two-pass forward (Σx, then Σ(x - mean)², then y), (64, 32, 32, 64) float32: 6 passes
  with one shared ``mean``, 4 with a copy per kernel;
- forward and backward, (32, 8, 8, 16): 12 passes with the backward's ``mean`` shared, 10
  with a copy per kernel; bfloat16 writes float32 copies of ``x`` and ``dy`` unless each
  sum has its own copy of them (then 10 passes and no float32 copy).

Contract:

- :func:`cpu_copies` ``(value, n)``: ``n`` times ``value``, a pytree of arrays; each copy
  has the type of ``value`` (shape, dtype, sharding, varying manual axes). One primitive,
  ``jaxbn_cpu_copies``, over the leaves repeated ``n`` times; it is the identity on values.
- :func:`sum_then_cast` ``(terms, dtype)``: ``(Σ terms).astype(dtype)``. The terms must
  have one type but for weak typing (shape, dtype, sharding, varying manual axes: callers
  broadcast first); the result has that type with ``dtype``. Terms of different types are
  refused when tracing (a ``ValueError`` that lists them).
- :func:`widened_reads` ``(x, dtype, n)``: ``n`` reads of ``x`` for kernels that each widen
  it to ``dtype``: bfloat16 gets a :func:`cpu_copies` each, anything else one shared
  ``x.astype(dtype)`` (float16 included: XLA:CPU's sums do not read it natively, so a
  separate widening kernel runs either way, and one shared copy is cheaper than one each).

A primitive has no rules but those it is given, so each has its own, written here:

- JVP: both are linear, so the tangents go through the same primitive (symbolic zeros
  instantiated: every copy, every term, has a tangent).
- Transpose (reverse mode): the cotangent of each copy is the cotangent of its input;
  ``sum_then_cast`` gives each term its own :func:`cpu_copies` of the cotangent, cast to
  the term's dtype. That is its reason to exist: the plain ``sum(terms).astype(bfloat16)``
  transposes into one float32 widening of the bfloat16 cotangent shared by every term,
  which XLA:CPU then writes out. Measured on the training forward and backward
  (``jax.vjp``) of one layer, (64, 32, 32, 64), jitted, in one process on 2 loaded CPU
  cores, the two programs interleaved, medians of 21 to 31 runs, four runs:

  ============================  ==========================  ===========================
  x → y                         with ``sum_then_cast``       plain sum and cast
  ============================  ==========================  ===========================
  bfloat16 → bfloat16           10 passes, no float32 copy  12 passes, 1 float32 copy;
                                                            1.34–2.13× the time
  bfloat16 → float32 (mixed)    10 passes                   the same optimized HLO
  ============================  ==========================  ===========================

  It pays where the output is narrower than the arithmetic, and costs nothing elsewhere.
- Batching (``vmap``): copies keep every batch dimension as it is; ``sum_then_cast`` moves
  them to the front, broadcasting unbatched terms, so the terms stay of one type.
- Lowering: on CPU the copies are the outputs of one ``optimization_barrier``, which costs
  nothing at run time, and on every other platform they are the value itself: XLA:GPU and
  XLA:TPU duplicate broadcasts and converts into each fusion and fuse sibling reductions of
  the same value into one kernel, which a barrier would prevent. ``sum_then_cast`` lowers to
  the sum and the cast everywhere. The choice is the lowering rule of a primitive, made
  when the program is lowered for a platform: no runtime branch, and not even a
  ``stablehlo.case`` on a constant (which ``lax.platform_dependent`` emits). On GPU and TPU
  the program is therefore the one plain ``jnp`` gives.

The rules use JAX's internal ``jax.interpreters`` modules (``ad``, ``batching``, ``mlir``),
which JAX may change. They are imported and registered on first use only, and the
environment variable ``JAXBN_CPU_COPIES=0`` turns the whole module into plain ``jnp``
(``cpu_copies`` returns ``value`` itself, ``sum_then_cast`` the plain sum and cast):
nothing of ``jax.interpreters`` is then used. The variable is read when a function is
traced (a program already traced keeps its choice). With it off the results are the same
bit for bit (``tests/test_copies.py``: forward, gradients, ``vmap``, a mask, synchronization
under ``shard_map``), but for the gradient of a bfloat16 ``x``: JAX accumulates it in
bfloat16, one use of ``x`` at a time, and the copies change the order of the uses, so the
two differ by bfloat16 rounding (within one bfloat16 ulp of the largest partial sum).
XLA:CPU then takes more passes: on the training forward and backward of (64, 32, 32, 64),
18 instead of 10 and 4 float32 copies in bfloat16 (2.4× the time), 16 instead of 10 with a
bfloat16 ``x`` and a float32 output (1.3×).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive

__all__ = ["cpu_copies", "enabled", "sum_then_cast", "widened_reads"]

T = TypeVar("T")

SWITCH = "JAXBN_CPU_COPIES"


def enabled() -> bool:
    """Whether the XLA:CPU copies are on: the environment variable ``JAXBN_CPU_COPIES``
    is unset, empty or ``1`` (on), or ``0`` (off: plain ``jnp``).

    Raises:
      ValueError: the variable holds anything else.
    """
    value = os.environ.get(SWITCH, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(
            f"The environment variable `{SWITCH}` must be 1 (XLA:CPU copies on, the default) "
            f"or 0 (off: plain jnp, more passes over memory on CPU), got {value!r}."
        )
    return value != "0"


def cpu_copies(value: T, n: int) -> tuple[T, ...]:
    """``n`` times ``value`` (an array or a pytree of arrays), on XLA:CPU as values that XLA
    cannot merge with ``value`` or with each other (see the module docstring for why and
    the measurements); ``n`` times ``value`` itself when :func:`enabled` is False."""
    if not enabled():
        return (value,) * n
    leaves, treedef = jax.tree.flatten(value)
    copies_p, _ = _primitives()
    copies = copies_p.bind(*leaves * n)
    count = len(leaves)
    return tuple(
        jax.tree.unflatten(treedef, copies[i * count : (i + 1) * count]) for i in range(n)
    )


def sum_then_cast(terms: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """``(Σ terms).astype(dtype)`` for terms of one type; transposed, each term gets its
    own copy of the cotangent (:func:`cpu_copies`), widened inside its own kernel.

    The output of a tangent rule: reverse mode transposes it (see the module docstring).
    """
    _one_type([jax.typeof(term) for term in terms])
    if not enabled():
        return functools.reduce(lax.add, terms).astype(dtype)
    _, sum_cast_p = _primitives()
    return sum_cast_p.bind(*terms, dtype=np.dtype(dtype))


def widened_reads(x: jax.Array, dtype: Any, n: int) -> tuple[jax.Array, ...]:
    """``n`` reads of ``x`` for ``n`` kernels that each widen it to ``dtype``.

    A bfloat16 ``x`` gets its own copy per kernel (XLA:CPU's sums read bfloat16 natively
    and accumulate in float32); the caller widens each. float32 and wider need no widening.
    float16 is widened once and shared: XLA:CPU's sums do not read it natively, so it is
    widened by a separate kernel either way, and one shared copy is cheaper than one each.
    """
    if x.dtype == jnp.bfloat16 and jnp.dtype(dtype).itemsize > 2:
        return cpu_copies(x, n)
    return (x.astype(dtype),) * n


def _one_type(avals: Sequence[Any]) -> Any:
    """The one type (but for weak typing) of ``avals``, the terms of :func:`sum_then_cast`."""
    types = {aval.update(weak_type=False) for aval in avals}  # interned: equal is identical
    if len(types) != 1:
        raise ValueError(
            f"sum_then_cast: `terms` must be one or more arrays of one type (shape, dtype, "
            f"sharding, varying manual axes), broadcast them first; got "
            f"{[aval.str_short() for aval in avals]}."
        )
    return types.pop()


@functools.cache
def _primitives() -> tuple[Primitive, Primitive]:
    """The two primitives, with their rules registered (once, on first use)."""
    try:
        from jax.interpreters import ad, batching, mlir
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        raise ImportError(
            f"jaxbn's XLA:CPU copies need jax.interpreters (ad, batching, mlir), which this "
            f"jax ({jax.__version__}) does not provide: {err}. Set the environment variable "
            f"{SWITCH}=0 to run batch norm with plain jnp instead."
        ) from err
    return _copies_primitive(ad, batching, mlir), _sum_cast_primitive(ad, batching, mlir)


def _copies_primitive(ad: Any, batching: Any, mlir: Any) -> Primitive:
    copies_p = Primitive("jaxbn_cpu_copies")
    copies_p.multiple_results = True
    copies_p.def_impl(lambda *values: values)
    copies_p.def_abstract_eval(lambda *avals: avals)

    def jvp(primals: Sequence[Any], tangents: Sequence[Any]) -> tuple[Any, Any]:
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        return copies_p.bind(*primals), copies_p.bind(*tangents)

    def transpose(cotangents: Sequence[Any], *values: Any) -> list[Any]:
        del values
        return list(cotangents)

    def batch(values: Sequence[Any], dims: Sequence[Any]) -> tuple[Any, Any]:
        return copies_p.bind(*values), dims

    ad.primitive_jvps[copies_p] = jvp
    ad.primitive_transposes[copies_p] = transpose
    batching.primitive_batchers[copies_p] = batch
    mlir.register_lowering(copies_p, lambda ctx, *values: values)
    mlir.register_lowering(
        copies_p,
        mlir.lower_fun(lambda *values: lax.optimization_barrier(values), multiple_results=True),
        platform="cpu",
    )
    return copies_p


def _sum_cast_primitive(ad: Any, batching: Any, mlir: Any) -> Primitive:
    sum_cast_p = Primitive("jaxbn_sum_then_cast")

    def impl(*terms: Any, dtype: Any) -> Any:
        return functools.reduce(lax.add, terms).astype(dtype)

    def abstract_eval(*avals: Any, dtype: Any) -> Any:
        return _one_type(avals).update(dtype=dtype)

    def jvp(primals: Sequence[Any], tangents: Sequence[Any], *, dtype: Any) -> Any:
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        return sum_cast_p.bind(*primals, dtype=dtype), sum_cast_p.bind(*tangents, dtype=dtype)

    def transpose(cotangent: Any, *terms: Any, dtype: Any) -> list[Any]:
        avals = [t.aval if ad.is_undefined_primal(t) else jax.typeof(t) for t in terms]
        if isinstance(cotangent, ad.Zero):
            return [
                ad.Zero(aval) if ad.is_undefined_primal(t) else None
                for t, aval in zip(terms, avals, strict=True)
            ]
        copies = cpu_copies(cotangent, len(terms))
        return [
            copy.astype(aval.dtype) if ad.is_undefined_primal(term) else None
            for term, copy, aval in zip(terms, copies, avals, strict=True)
        ]

    def batch(terms: Sequence[Any], dims: Sequence[Any], *, dtype: Any) -> Any:
        size = next(t.shape[d] for t, d in zip(terms, dims, strict=True) if d is not None)
        moved = [
            jnp.broadcast_to(t, (size, *t.shape)) if d is None else jnp.moveaxis(t, d, 0)
            for t, d in zip(terms, dims, strict=True)
        ]
        return sum_cast_p.bind(*moved, dtype=dtype), 0

    sum_cast_p.def_impl(impl)
    sum_cast_p.def_abstract_eval(abstract_eval)
    ad.primitive_jvps[sum_cast_p] = jvp
    ad.primitive_transposes[sum_cast_p] = transpose
    batching.primitive_batchers[sum_cast_p] = batch
    mlir.register_lowering(sum_cast_p, mlir.lower_fun(impl, multiple_results=False))
    return sum_cast_p

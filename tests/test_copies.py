"""jaxbn._copies: its off switch, its primitives' contract, and where they are bound.

``JAXBN_CPU_COPIES=0`` turns the XLA:CPU copies into plain ``jnp``. It must give the same
numbers, bit for bit, in every mode they touch: forward, reverse mode, ``vmap``, a mask,
bfloat16 input (the widened reads), and synchronization under ``shard_map``. A control
checks that the switch changes the program at all (the primitives are bound when on, absent
when off), so the equality is not that of one program with itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import _copies

PRIMITIVES = ("jaxbn_cpu_copies", "jaxbn_sum_then_cast")
SHAPE = (8, 3, 5)  # batch, position, features


def _inputs(dtype=jnp.float32, masked=False):
    kx, kw, km = jax.random.split(jax.random.key(0), 3)
    x = (2.0 + 3.0 * jax.random.normal(kx, SHAPE)).astype(dtype)
    weight = jax.random.normal(kw, SHAPE)  # a loss that weighs every output differently
    mask = jax.random.bernoulli(km, 0.7, (*SHAPE[:2], 1)) if masked else None
    params, state = jaxbn.init(SHAPE[-1])
    params = {"scale": params["scale"] + 0.5, "bias": params["bias"] - 0.25}
    return x, weight, mask, params, state


def _loss(x, params, state, weight, mask, **kwargs):
    y, new_state = jaxbn.batch_norm(x, params, state, training=True, mask=mask, **kwargs)
    return jnp.sum(y.astype(jnp.float32) * weight), (y, new_state)


def _forward_and_grad(x, params, state, weight, mask, **kwargs):
    """``(loss, y, new_state)`` and the gradients in ``x`` and ``params``: one program."""
    grad = jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True)
    return grad(x, params, state, weight, mask, **kwargs)


def _plain(masked=False, dtype=jnp.float32, out_dtype=None):
    x, weight, mask, params, state = _inputs(dtype, masked)
    return jax.jit(lambda *a: _forward_and_grad(*a, dtype=out_dtype))(
        x, params, state, weight, mask
    )


def _vmapped():
    """Two models (an ensemble) under ``vmap``, and the batch split over a vmap axis name."""
    x, weight, _, params, state = _inputs()
    ensemble = jax.vmap(_forward_and_grad, in_axes=(0, None, None, None, None))
    split = jax.vmap(
        lambda x, w: _forward_and_grad(x, params, state, w, None, axis=-1, axis_name="b"),
        axis_name="b",
    )
    return jax.jit(lambda x, w: (ensemble(jnp.stack((x, -x)), params, state, w, None),
                                 split(x, w)))(x, weight)


def _shard_mapped():
    """The batch over 4 devices, synchronized over the mesh axis, with a mask."""
    x, weight, mask, params, state = _inputs(masked=True)
    mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))

    def step(x, weight, mask):
        (loss, (y, new)), grads = _forward_and_grad(
            x, params, state, weight, mask, axis_name="batch"
        )
        return jax.lax.psum(loss, "batch"), y, new, grads[0], jax.lax.psum(grads[1], "batch")

    run = jax.shard_map(
        step, mesh=mesh, in_specs=(P("batch"), P("batch"), P("batch")),
        out_specs=(P(), P("batch"), P(), P("batch"), P()),
    )
    return jax.jit(run)(x, weight, mask)


CASES = {
    "float32": lambda: _plain(),
    "mask": lambda: _plain(masked=True),
    "bfloat16": lambda: _plain(dtype=jnp.bfloat16),
    "bfloat16-to-float32": lambda: _plain(masked=True, dtype=jnp.bfloat16, out_dtype=jnp.float32),
    "vmap": _vmapped,
    "shard_map": _shard_mapped,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_off_switch_gives_bitwise_identical_results(case, monkeypatch):
    """Bit for bit, but for the gradient of a bfloat16 ``x``: JAX accumulates that
    cotangent in bfloat16, one use of ``x`` at a time (each use casts its float32 share to
    bfloat16, and each partial sum is rounded to bfloat16). The copies change the order in
    which the three uses are visited, ``(a + c) + b`` against ``(a + b) + c`` (read in the
    optimized HLO), so the two differ by that rounding: up to one bfloat16 ulp of the
    largest partial sum (2**-7 of ``max|∂x|`` here)."""
    monkeypatch.setenv("JAXBN_CPU_COPIES", "1")
    on = CASES[case]()
    monkeypatch.setenv("JAXBN_CPU_COPIES", "0")
    off = CASES[case]()
    assert jax.tree.structure(on) == jax.tree.structure(off)
    x_grad = jax.tree.leaves(on[1][0]) if case.startswith("bfloat16") else []
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(a64))
        if any(a is g for g in x_grad):
            np.testing.assert_allclose(a64, b64, rtol=0, atol=2**-7 * np.abs(a64).max())
        else:
            np.testing.assert_array_equal(a64, b64)


def _bound_primitives():
    """The primitives of _copies in the programs of a gradient and of a JVP (the JVP's
    output is sum_then_cast's; reverse mode transposes it into copies)."""
    jax.clear_caches()  # _train's traced programs: traced again with the switch as it is
    x, weight, mask, params, state = _inputs(jnp.bfloat16, masked=True)
    grad = jax.make_jaxpr(_forward_and_grad)(x, params, state, weight, mask)
    jvp = jax.make_jaxpr(
        lambda x, dx: jax.jvp(lambda x: _loss(x, params, state, weight, mask), (x,), (dx,))
    )(x, x)
    return {name: (name in str(grad), name in str(jvp)) for name in PRIMITIVES}


def test_switch_on_binds_the_primitives_and_off_binds_none(monkeypatch):
    monkeypatch.delenv("JAXBN_CPU_COPIES", raising=False)
    assert _bound_primitives() == {"jaxbn_cpu_copies": (True, True),
                                   "jaxbn_sum_then_cast": (False, True)}
    monkeypatch.setenv("JAXBN_CPU_COPIES", "0")
    assert _bound_primitives() == {name: (False, False) for name in PRIMITIVES}


def test_switch_off_needs_nothing_of_jax_interpreters(monkeypatch):
    """Off, the primitives (the only users of jax.interpreters) are never built."""

    def unavailable():
        raise AssertionError("the primitives were built with JAXBN_CPU_COPIES=0")

    monkeypatch.setattr(_copies, "_primitives", unavailable)
    monkeypatch.setenv("JAXBN_CPU_COPIES", "0")
    jax.clear_caches()
    _plain(masked=True, dtype=jnp.bfloat16, out_dtype=jnp.float32)
    _bound_primitives()
    monkeypatch.setenv("JAXBN_CPU_COPIES", "1")  # the negative control
    with pytest.raises(AssertionError, match="were built"):
        _bound_primitives()


def test_jax_interpreters_is_imported_inside_a_function_only():
    tree = ast.parse(Path(_copies.__file__).read_text())
    top_level = [
        node.module for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module
    ] + [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in top_level if m.startswith("jax.interpreters")]
    assert "jax.interpreters" in ast.unparse(tree)  # where it is used: _primitives


@pytest.mark.parametrize("value", ["2", "off", "false"])
def test_switch_refuses_other_values(value, monkeypatch):
    monkeypatch.setenv("JAXBN_CPU_COPIES", value)
    with pytest.raises(ValueError, match=f"`JAXBN_CPU_COPIES` must be 1 .* or 0 .*got '{value}'"):
        _copies.enabled()


@pytest.mark.parametrize("value, on", [("", True), ("1", True), (" 0 ", False)])
def test_switch_values(value, on, monkeypatch):
    monkeypatch.setenv("JAXBN_CPU_COPIES", value)
    assert _copies.enabled() is on


def test_sum_then_cast_refuses_terms_of_different_shapes(monkeypatch):
    monkeypatch.setenv("JAXBN_CPU_COPIES", "1")
    terms = [jnp.ones((2, 3)), jnp.ones((1, 3))]
    message = r"`terms` must be .* of one type .* got \['float32\[2,3\]', 'float32\[1,3\]'\]"
    with pytest.raises(ValueError, match=message):
        _copies.sum_then_cast(terms, jnp.bfloat16)
    with pytest.raises(ValueError, match=message):
        jax.jit(_copies.sum_then_cast, static_argnums=1)(terms, jnp.bfloat16)
    monkeypatch.setenv("JAXBN_CPU_COPIES", "0")
    with pytest.raises(ValueError, match=message):
        _copies.sum_then_cast(terms, jnp.bfloat16)


def test_sum_then_cast_against_float64(monkeypatch):
    """The value is the sum cast once; its transpose hands each term the cotangent in the
    term's own dtype; vmap with an unbatched term broadcasts it."""
    monkeypatch.setenv("JAXBN_CPU_COPIES", "1")
    a = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)
    b = jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7.0
    out = _copies.sum_then_cast([a, b], jnp.bfloat16)
    expected = (np.asarray(a, np.float64) + np.asarray(b, np.float64)).astype(jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3) and not out.weak_type
    np.testing.assert_array_equal(np.asarray(out), expected)
    weight = jnp.asarray([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]], jnp.bfloat16)
    grads = jax.grad(
        lambda a, b: jnp.sum((_copies.sum_then_cast([a, b], jnp.bfloat16) * weight)
                             .astype(jnp.float32)),
        argnums=(0, 1),
    )(a, b)
    for grad in grads:
        assert grad.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(weight, np.float64))
    batched = jax.vmap(lambda row: _copies.sum_then_cast([row, b], jnp.float32))(
        jnp.stack((a, -a))
    )
    np.testing.assert_array_equal(
        np.asarray(batched), np.stack((a + b, -a + b)).astype(np.float32)
    )

"""The invariants of training mode's custom JVP, one test each (jaxbn/_train.py states them).

1. The tangent is linear in ``(dx, dscale, dbias)`` (and ``depsilon``): superposition holds,
   and ``jax.linear_transpose`` of the linearized map exists and is the float64 gradient.
2. The residuals are ``x`` (in its own dtype) and per-feature vectors only: what
   ``jax.vjp``'s closure holds, found from shapes (``experiments.bench.layers.residuals``).
3. u and v share one collective: in the jaxpr of ``jax.grad`` (and of ``jax.jvp``) under
   ``shard_map``, one gather of the moments forward and one sum of per-feature vectors,
   counted before XLA's all-reduce combiner could merge a second one into the first.
4. The two dy paths agree: a feature-shaped scale (``_per_feature_dy``) and the same scale
   repeated per example (``_per_entry_dy``) give the same derivatives, both equal to the
   float64 reference (tests/_reference.py) differentiated by central differences.
"""

from __future__ import annotations

import functools
import math

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jaxbn
from experiments.bench.layers import residuals

FEATURES = 3
SHAPE = (8, 2, FEATURES)  # 8 rows: one per device under shard_map
PER_EXAMPLE = (SHAPE[0], 1, FEATURES)  # a scale that differs between examples
EPSILON = 1e-2  # large enough that the derivative with respect to it is not negligible
DEVICES = 8
# float32 against float64: every step rounds to 6e-8 relative, the derivatives divide by
# σ and n; measured below 2e-6 of the largest entry, allowed 2e-5.
TOL = 2e-5
OPTIONS = ("feature", "mask", "per_example")


def _close(actual, expected, what, tol=TOL):
    """Within ``tol`` of each expected entry and ``tol`` times the largest one."""
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=tol,
                               atol=tol * np.max(np.abs(expected), initial=0.0), err_msg=what)


def _problem(option, seed=0):
    """``(x, scale, bias, mask)``: float32, a mean far from 0 and a spread far from 1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, SHAPE) + 3 * rng.normal(size=FEATURES)
    scale = rng.uniform(0.5, 1.5, PER_EXAMPLE if option == "per_example" else FEATURES)
    bias = rng.normal(size=FEATURES)
    mask = np.arange(SHAPE[0]).reshape(-1, 1, 1) % 3 != 0 if option == "mask" else None
    return (jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32),
            jnp.asarray(bias, jnp.float32), None if mask is None else jnp.asarray(mask))


def _layer(mask, axis_name=None):
    """``(x, scale, bias, epsilon) -> y``: training-mode jaxbn, every argument traced."""
    state = jaxbn.init(FEATURES)[1]

    def layer(x, scale, bias, epsilon):
        params = {"scale": scale, "bias": bias}
        return jaxbn.batch_norm(x, params, state, training=True, epsilon=epsilon, mask=mask,
                                axis_name=axis_name)[0]

    return layer


def _reference_layer(mask):
    """The float64 counterpart of :func:`_layer`."""

    def layer(x, scale, bias, epsilon):
        return ref.batch_norm(x, -1, scale, bias, mask, float(epsilon))[0]

    return layer


def _tangents(primals, seed):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=np.shape(p)), jnp.float32) for p in primals)


# ------------------------------------------------------------------ 1. linear tangent

@pytest.mark.parametrize("option", OPTIONS)
def test_the_tangent_is_linear(option):
    x, scale, bias, mask = _problem(option)
    primals = (x, scale, bias, jnp.float32(EPSILON))
    t1, t2 = _tangents(primals, 1), _tangents(primals, 2)
    dy = _tangents((x,), 3)[0]

    @jax.jit  # one program: eager dispatch of every small op takes seconds
    def run(primals, t1, t2, dy):
        _, linear = jax.linearize(_layer(mask), *primals)
        combined = linear(*(a + 3 * b for a, b in zip(t1, t2, strict=True)))
        separate = linear(*t1) + 3 * linear(*t2)
        zero = linear(*(jnp.zeros_like(t) for t in t1))
        # Only a linear map has a transpose: reverse mode's.
        return combined, separate, zero, linear(*t1), jax.linear_transpose(linear, *primals)(dy)

    combined, separate, zero, tangent, (dx, dscale, dbias, depsilon) = run(primals, t1, t2, dy)
    # Superposition, and no term free of a tangent, at float32 precision.
    _close(combined, separate, "dy(t1 + 3 t2) = dy(t1) + 3 dy(t2)")
    assert not np.any(np.asarray(zero)), "dy(0) = 0"
    # The tangent and its transpose: float64's derivative along t1, and gradient.
    _close(tangent, ref.directional_derivative(_reference_layer(mask), primals, t1), "jvp")
    ref_dx, ref_dscale, ref_dbias = ref.grads(x, dy, -1, scale, mask, EPSILON, bias)
    _close(dx, ref_dx, "dx")
    _close(dscale, ref_dscale, "dscale")
    _close(dbias, ref_dbias, "dbias")
    ref_depsilon = ref.directional_derivative(
        lambda e: np.sum(np.asarray(dy, np.float64) * _reference_layer(mask)(x, scale, bias, e)),
        [EPSILON], [1.0])
    _close(depsilon, ref_depsilon, "depsilon", tol=1e-3)  # a sum of float32 roundings


# ------------------------------------------------------------------ 2. residuals

RESIDUAL_CASES = {  # name: (dtype, axis, option)
    "float32": (jnp.float32, -1, "feature"),
    "bfloat16": (jnp.bfloat16, -1, "feature"),
    "nchw": (jnp.float32, 1, "feature"),
    "mask": (jnp.float32, -1, "mask"),
    "per_example": (jnp.float32, -1, "per_example"),
}


@pytest.mark.parametrize("case", list(RESIDUAL_CASES))
def test_the_residuals_are_x_and_per_feature_vectors(case):
    dtype, axis, option = RESIDUAL_CASES[case]
    x, scale, bias, mask = _problem(option)
    x = x.astype(dtype)
    if axis == 1:  # NCHW: the features on axis 1
        x = jnp.moveaxis(x, -1, 1)
    features = x.shape[axis]
    state = jaxbn.init(features)[1]

    def train(x, params, state):
        return jaxbn.batch_norm(x, params, state, training=True, axis=axis, mask=mask)

    kept = residuals(train, x, {"scale": scale, "bias": bias}, state)["arrays"]
    full = [a for a in kept if math.prod(a[0]) >= x.size]
    assert full == [[list(x.shape), jnp.dtype(dtype).name]], kept  # x, in its own dtype
    # The rest: per-feature vectors, and the inputs given at their own size (a per-example
    # scale, a mask of rows).
    inputs = {math.prod(np.shape(a)) for a in (scale, mask) if a is not None}
    small = [a for a in kept if math.prod(a[0]) < x.size]
    assert all(math.prod(shape) in {1, features} | inputs for shape, _ in small), kept


# ------------------------------------------------------------------ 3. one collective

COLLECTIVES = ("psum", "all_gather", "all_to_all", "ppermute", "reduce_scatter", "pmax", "pmin")


def _collectives(jaxpr, found):
    """``(primitive name, operand shapes)`` of every cross-device primitive in ``jaxpr``
    and the jaxprs nested in it (shard_map, remat, pjit, custom rules)."""
    for eqn in jaxpr.eqns:
        if any(name in eqn.primitive.name for name in COLLECTIVES):
            found.append((eqn.primitive.name, [v.aval.shape for v in eqn.invars]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    _collectives(sub, found)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    _collectives(sub.jaxpr, found)
    return found


@pytest.mark.parametrize("check_vma", [True, False], ids=["check_vma", "unchecked"])
@pytest.mark.parametrize("mode", ["grad", "jvp"])
def test_u_and_v_share_one_collective(mode, check_vma):
    x, scale, bias, _ = _problem("feature")
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Auto,))
    layer = jax.shard_map(_layer(None, axis_name="batch"), mesh=mesh,
                          in_specs=(P("batch"), P(), P(), P()), out_specs=P("batch"),
                          check_vma=check_vma)
    primals = (x, scale, bias, jnp.float32(EPSILON))
    dy = _tangents((x,), 3)[0]
    if mode == "jvp":
        program = jax.make_jaxpr(lambda p, t: jax.jvp(layer, p, t))(primals, _tangents(primals, 1))
    else:
        # Unchecked, shard_map sums the replicated parameters' gradients itself (one psum
        # each, outside jaxbn): differentiate with respect to x alone there.
        argnums = (0, 1, 2, 3) if check_vma else 0
        program = jax.make_jaxpr(jax.grad(lambda *p: jnp.sum(layer(*p) * dy), argnums))(*primals)
    found = _collectives(program.jaxpr, [])
    gathers = [shapes for name, shapes in found if "all_gather" in name]
    sums = [shapes for name, shapes in found if "psum" in name]
    assert len(gathers) == 1 and len(sums) == 1 and len(found) == 2, found
    # The one sum moves two stacked per-feature vectors, nothing of x's size.
    assert math.prod(sums[0][0]) == 2 * FEATURES, found


# ------------------------------------------------------------------ 4. the two dy paths

@pytest.mark.parametrize("option", ["feature", "mask", "sync"])
def test_the_two_dy_paths_agree(option):
    x, scale, bias, mask = _problem("mask" if option == "mask" else "feature")
    repeated = jnp.broadcast_to(scale, PER_EXAMPLE)  # the same values, per example
    layer = _layer(mask, axis_name="batch" if option == "sync" else None)
    if option == "sync":
        mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Auto,))

        def synced(scale_spec):
            return jax.shard_map(layer, mesh=mesh, out_specs=P("batch"),
                                 in_specs=(P("batch"), scale_spec, P(), P()))

        per_feature, per_entry = synced(P()), synced(P("batch"))
    else:
        per_feature = per_entry = layer
    epsilon = jnp.float32(EPSILON)
    tangents = _tangents((x, scale, bias, epsilon), 1)
    entry_tangents = (tangents[0], jnp.broadcast_to(tangents[1], PER_EXAMPLE), *tangents[2:])
    dy = _tangents((x,), 3)[0]

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(fn, scale, tangents):
        primals = (x, scale, bias, epsilon)
        y, tangent = jax.jvp(fn, primals, tangents)
        grads = jax.grad(lambda *p: jnp.sum(fn(*p) * dy), (0, 1, 2, 3))(*primals)
        return y, tangent, grads

    y_f, tangent_f, (dx_f, dscale_f, dbias_f, deps_f) = derivatives(per_feature, scale, tangents)
    y_e, tangent_e, (dx_e, dscale_e, dbias_e, deps_e) = derivatives(per_entry, repeated,
                                                                   entry_tangents)
    expected = ref.directional_derivative(_reference_layer(mask), (x, scale, bias, epsilon),
                                          tangents)
    ref_dx, ref_dscale, ref_dbias = ref.grads(x, dy, -1, scale, mask, EPSILON, bias)
    for path, tangent, dx, dscale, dbias in (
        ("per-feature", tangent_f, dx_f, dscale_f, dbias_f),
        ("per-entry", tangent_e, dx_e, dscale_e.sum(axis=(0, 1)), dbias_e),
    ):
        _close(tangent, expected, f"{path} jvp")
        _close(dx, ref_dx, f"{path} dx")
        _close(dscale, ref_dscale, f"{path} dscale")
        _close(dbias, ref_dbias, f"{path} dbias")
    # And with each other, closer than either is to float64.
    _close(y_e, y_f, "y", tol=1e-6)
    _close(tangent_e, tangent_f, "jvp", tol=1e-5)
    _close(dx_e, dx_f, "dx", tol=1e-5)
    _close(deps_e, deps_f, "depsilon", tol=1e-5)

"""Every autodiff mode through training-mode batch norm, against float64 and against flax.

Training mode is a ``jax.custom_jvp`` (jaxbn/_train.py), so forward mode, reverse mode and
their compositions all come from one tangent rule. The table: each mode (``jax.jvp``,
``jax.linearize`` applied to two tangents, ``jax.jacfwd``, ``jax.grad``, ``jax.hessian``,
forward-over-reverse and reverse-over-reverse Hessian-vector products, and the running
statistics' tangents) × each subject (``jaxbn.batch_norm``, ``jaxbn.linen.BatchNorm``,
``jaxbn.nnx.BatchNorm``, ``jaxbn.equinox.BatchNorm`` under ``jax.vmap(axis_name=)``) ×
each option (float32; an elementwise mask; bfloat16 ``x``; statistics synced under
``jax.shard_map`` over 8 devices, with uneven masks and without), every derivative taken with
respect to ``x``, ``scale`` and ``bias`` together. Shapes are small ((8, 3), (4, 2, 2, 3), 24
rows over 8 devices) so that Jacobians and Hessians stay cheap.

The truths:

- float64: tests/_reference.py's batch norm differentiated by central differences
  (first order), and its analytic gradient (``ref.grads``) differentiated by central
  differences (second order); the running statistics carry no tangent at all.
- flax: ``flax.linen.BatchNorm``/``flax.nnx.BatchNorm`` with ``use_fast_variance=False``,
  and ``equinox.nn.BatchNorm(mode="batch")``, differentiated by JAX itself, compute the same
  function in float32 wherever every device weighs the same: unmasked, masked (flax only:
  equinox takes no mask) and synced without masks, not with uneven masks (flax weighs
  devices equally) nor in bfloat16 (compared in float32 only).

For each subject and option, all the modes are computed in one jitted program (one compile)
and cached for the parametrized tests that read them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import _reference as ref
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import assert_grads_close, standard
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx

MOMENTUM = 0.9
DEVICES = 8
ROWS_PER_DEVICE = 3
# Valid rows per device under sync: uneven, and none empty.
VALID_ROWS = (1, 2, 3, 1, 2, 3, 2, 3)

MODES = ("jvp", "linearize", "jacfwd", "grad", "hessian", "hvp_fwd_rev", "hvp_rev_rev", "state")
SUBJECTS = ("pure", "linen", "nnx", "equinox")
OPTIONS = ("float32", "mask", "bfloat16", "sync", "sync_unmasked")

# The flax (or equinox) layer that computes the same function as each subject.
COUNTERPARTS = {
    "pure": "flax.linen",
    "linen": "flax.linen",
    "nnx": "flax.nnx",
    "equinox": "equinox.nn",
}
# Options under which a counterpart computes the same function as jaxbn, in float32:
# equinox's own BatchNorm takes no mask, and flax weighs the uneven masks of "sync" per
# device (tests/test_distributed.py shows the difference).
COUNTERPART_OPTIONS = {
    "flax.linen": ("float32", "mask", "sync_unmasked"),
    "flax.nnx": ("float32", "mask", "sync_unmasked"),
    "equinox.nn": ("float32", "sync_unmasked"),
}

# Tolerances, as a fraction of the largest entry of the float64 truth (atol) and of each
# entry (rtol). float32 against float64: every step rounds to float32 (6e-8 relative) and
# the derivatives divide by σ and n, at second order by σ² again; the largest errors
# measured (jax 0.10.2, XLA:CPU) are 3e-6 of the largest entry, allowed 2e-5.
# bfloat16 x: the truth is taken at x rounded to bfloat16 and with the tangents rounded to
# it, so what remains is the rounding of results to 8 significant bits: half an ulp, up to
# 2^-8 ≈ 4e-3 relative. The pure function's first-order results are exactly the bfloat16
# rounding of the truth (measured: every entry); grad and the second-order modes also round
# y and the cotangent fed back into it, and the two sums of dx = s·(dy - mean(dy) -
# x̂·mean(dy·x̂)) cancel part of dy: measured up to 9e-3 of the largest entry (the Hessian),
# allowed 2e-2. (The drop-ins promote a bfloat16 x with float32 params to a float32 y, as
# flax does, so only their gradients with respect to x are rounded to bfloat16.)
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}
# jaxbn against flax/equinox, both float32: two float32 computations of the same function,
# each within the tolerance above of the truth (measured: 2e-6 apart).
PARITY_TOLERANCE = 2e-5


# --------------------------------------------------------------------------- the problems


class Problem(NamedTuple):
    """One option's inputs; every derivative is taken with respect to ``args``."""

    args: tuple[jax.Array, jax.Array, jax.Array]  # x (NHWC or NC), scale, bias [C]
    mask: jax.Array | None  # bool like x ("mask") or (N, 1) (rows left out, "sync")
    tangents: tuple[tuple[jax.Array, ...], ...]  # two tangents, each like args
    weights: jax.Array  # float32 like x: the loss is Σ weights · tanh(y)
    direction: tuple[jax.Array, ...]  # the Hessian-vector products' vector, like args
    sync: bool  # statistics synced over DEVICES devices under shard_map


@functools.cache
def problem(option: str) -> Problem:
    rng = np.random.default_rng(OPTIONS.index(option))
    shape = {"mask": (4, 2, 2, 3)}.get(option, (8, 3))
    if option.startswith("sync"):
        shape = (DEVICES * ROWS_PER_DEVICE, 3)
    dtype = jnp.bfloat16 if option == "bfloat16" else jnp.float32
    features = shape[-1]

    def like_args():
        return (
            jnp.asarray(rng.normal(size=shape), dtype),
            jnp.asarray(rng.normal(size=features), jnp.float32),
            jnp.asarray(rng.normal(size=features), jnp.float32),
        )

    x = jnp.asarray(rng.normal(2.0, 1.5, size=shape) + rng.normal(size=features) * 3, dtype)
    args = (x, jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
            jnp.asarray(rng.normal(size=features), jnp.float32))
    rows = (shape[0],) + (1,) * (len(shape) - 1)
    mask = None
    if option == "mask":  # elementwise; every feature keeps at least 4 valid entries
        valid = rng.random(shape) < 0.7
        valid[0] = True
        mask = jnp.asarray(valid)
    elif option == "sync":
        valid = np.concatenate([np.arange(ROWS_PER_DEVICE) < v for v in VALID_ROWS])
        mask = jnp.asarray(valid).reshape(rows)
    return Problem(args=args, mask=mask, tangents=(like_args(), like_args()),
                   weights=jnp.asarray(rng.normal(size=shape), jnp.float32),
                   direction=like_args(), sync=option.startswith("sync"))


# --------------------------------------------------------------------------- the subjects
#
# Each builder gives ``(layer, variables)`` for one device (``axis_name`` names the devices, or
# None): ``layer(x, scale, bias, mask, variables) -> (y, running_mean, running_var)``, with
# the layer's running statistics, as its framework holds them, passed in as ``variables``.

_X_SCALE_BIAS = (0, 1, 2)
Built = tuple[Callable[..., Any], Any]


def _pure(features: int, axis_name: str | None) -> Built:
    def layer(x, scale, bias, mask, state):
        y, new = jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, state, training=True,
                                  momentum=MOMENTUM, mask=mask, axis_name=axis_name)
        return y, new.mean, new.var

    return layer, jaxbn.init(features)[1]


def _linen(module_cls: type[nn.Module], **fields: Any) -> Callable[[int, str | None], Built]:
    def build(features: int, axis_name: str | None) -> Built:
        module = module_cls(use_running_average=False, momentum=MOMENTUM, axis_name=axis_name,
                            **fields)

        def layer(x, scale, bias, mask, stats):
            y, updates = module.apply({"params": {"scale": scale, "bias": bias},
                                       "batch_stats": stats}, x, mask=mask,
                                      mutable=["batch_stats"])
            return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

        return layer, {"mean": jnp.zeros(features), "var": jnp.ones(features)}

    return build


def _nnx(module_cls: type[nnx.Module], **fields: Any) -> Callable[[int, str | None], Built]:
    def build(features: int, axis_name: str | None) -> Built:
        graphdef, state = nnx.split(module_cls(features, momentum=MOMENTUM, axis_name=axis_name,
                                               rngs=nnx.Rngs(0), **fields))

        def layer(x, scale, bias, mask, state):
            # Fresh variables in this trace: nnx mutates no variable made outside it.
            module = nnx.merge(graphdef, state, copy=True)
            module.scale[...] = scale
            module.bias[...] = bias
            y = module(x, mask=mask)
            return y, module.mean[...], module.var[...]

        return layer, state

    return build


def _equinox(module_cls: type[eqx.Module]) -> Callable[[int, str | None], Built]:
    def build(features: int, axis_name: str | None) -> Built:
        names = "batch" if axis_name is None else (axis_name, "batch")
        module, state = eqx.nn.make_with_state(module_cls)(features, names, momentum=MOMENTUM,
                                                           mode="batch")
        ours = module_cls is jaxbn.equinox.BatchNorm
        leaves, treedef = jax.tree.flatten(state)

        def layer(x, scale, bias, mask, leaves):
            bn = eqx.tree_at(lambda m: (m.weight, m.bias), module, (scale, bias))
            state = jax.tree.unflatten(treedef, leaves)  # an eqx.nn.State is used only once

            def one(example, example_mask):  # equinox takes one example, channels first
                if ours:
                    return bn(example, state, mask=example_mask)
                return bn(example, state)  # equinox's own takes no mask

            masks = None if mask is None else jnp.moveaxis(mask, -1, 1)
            y, new = jax.vmap(one, axis_name="batch", out_axes=(0, None))(
                jnp.moveaxis(x, -1, 1), masks
            )
            if ours:
                mean, var, _ = new.get(bn.state_index)
            else:
                mean, var = new.get(bn.batch_state_index)
            return jnp.moveaxis(y, 1, -1), mean, var

        return layer, leaves

    return build


BUILDERS = {
    "pure": _pure,
    "linen": _linen(jaxbn.linen.BatchNorm),
    "nnx": _nnx(jaxbn.nnx.BatchNorm),
    "equinox": _equinox(jaxbn.equinox.BatchNorm),
    "flax.linen": _linen(nn.BatchNorm, use_fast_variance=False),
    "flax.nnx": _nnx(nnx.BatchNorm, use_fast_variance=False),
    "equinox.nn": _equinox(eqx.nn.BatchNorm),
}


def layer_fn(name: str, p: Problem) -> Callable[..., Any]:
    """``(x, scale, bias) -> (y, running_mean, running_var)`` on the whole batch."""
    features = p.args[0].shape[-1]
    layer, variables = BUILDERS[name](features, "devices" if p.sync else None)
    if p.sync:
        # Auto axes: jit places the global arrays (and their tangents) for shard_map itself.
        mesh = jax.make_mesh((DEVICES,), ("devices",), axis_types=(AxisType.Auto,))
        layer = jax.shard_map(
            layer,
            mesh=mesh,
            in_specs=(P("devices"), P(), P(), P() if p.mask is None else P("devices"), P()),
            out_specs=(P("devices"), P(), P()),
            # Equinox's layer runs under a vmap inside shard_map, where JAX 0.10.2 with
            # check_vma=True fails an internal assertion on any collective over the
            # vmap-bound name (a plain lax.psum(v, "batch") included).
            # Regression: under check_vma=False reverse-over-reverse was wrong (O(1) errors)
            # while the statistics' all_gather was to="invarying": JAX transposes that to a
            # local slice when it does not track device variance. The equinox sync cases
            # cover it.
            check_vma=not name.startswith("equinox"),
        )
    return lambda x, scale, bias: layer(x, scale, bias, p.mask, variables)


# --------------------------------------------------------------------------- the modes


def _vdot(a: Any, b: Any) -> jax.Array:
    """``Σ a·b`` over the leaves of two trees, in float32."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.vdot(u.astype(jnp.float32), v.astype(jnp.float32)) for u, v in pairs)


@functools.cache
def derivatives(name: str, option: str) -> dict[str, Any]:
    """Every mode through layer ``name`` on ``option``'s problem, in one jitted program."""
    p = problem(option)
    layer = layer_fn(name, p)

    def output(*args):
        return layer(*args)[0]

    def statistics(*args):
        return layer(*args)[1:]

    def loss(*args):
        return jnp.sum(p.weights * jnp.tanh(output(*args).astype(jnp.float32)))

    grad = jax.grad(loss, argnums=_X_SCALE_BIAS)

    def modes(args, tangents, direction):
        _, linear = jax.linearize(output, *args)
        return {
            "jvp": jax.jvp(output, args, tangents[0])[1],
            "linearize": tuple(linear(*t) for t in tangents),
            "jacfwd": jax.jacfwd(output, argnums=_X_SCALE_BIAS)(*args),
            "grad": grad(*args),
            "hessian": jax.hessian(loss, argnums=_X_SCALE_BIAS)(*args),
            "hvp_fwd_rev": jax.jvp(grad, args, direction)[1],
            "hvp_rev_rev": jax.grad(lambda *a: _vdot(grad(*a), direction),
                                    argnums=_X_SCALE_BIAS)(*args),
            "state": (
                jax.jvp(statistics, args, tangents[0])[1],
                jax.grad(lambda *a: sum(jnp.sum(s) for s in statistics(*a)),
                         argnums=_X_SCALE_BIAS)(*args),
            ),
        }

    with standard():  # flax and equinox promote as numpy does
        return jax.jit(modes)(p.args, p.tangents, p.direction)


# --------------------------------------------------------------------------- float64 truth


@functools.cache
def truth(option: str) -> dict[str, Any]:
    """Every mode but "state" (which must be exactly zero) in float64: central differences
    of the reference and of its analytic gradient."""
    p = problem(option)
    args = [ref.as_float64(a) for a in p.args]
    tangents = [[ref.as_float64(t) for t in ts] for ts in p.tangents]
    direction = [ref.as_float64(v) for v in p.direction]
    mask = None if p.mask is None else np.asarray(p.mask)
    weights = ref.as_float64(p.weights)

    def output(x, scale, bias):
        return ref.batch_norm(x, -1, scale, bias, mask)[0]

    def grad(x, scale, bias):
        dy = weights * (1 - np.tanh(output(x, scale, bias)) ** 2)
        return ref.grads(x, dy, -1, scale, mask)

    jacfwd = tuple(ref.jacobian(output, args, i) for i in _X_SCALE_BIAS)
    hessian_columns = [ref.jacobian(grad, args, j) for j in _X_SCALE_BIAS]  # [j][i]
    hvp = ref.directional_derivative(grad, args, direction)
    return {
        "jvp": ref.directional_derivative(output, args, tangents[0]),
        "linearize": tuple(ref.directional_derivative(output, args, t) for t in tangents),
        "jacfwd": jacfwd,
        "grad": grad(*args),
        "hessian": tuple(tuple(hessian_columns[j][i] for j in _X_SCALE_BIAS)
                         for i in _X_SCALE_BIAS),
        "hvp_fwd_rev": hvp,
        "hvp_rev_rev": hvp,
    }


def _marks(option: str) -> list[pytest.MarkDecorator]:
    # 8 devices: the costliest programs to compile
    return [pytest.mark.slow] if option.startswith("sync") else []


CASES = [
    pytest.param(mode, subject, option, id=f"{mode}-{subject}-{option}",
                 marks=_marks(option))
    for option in OPTIONS for subject in SUBJECTS for mode in MODES
]


@pytest.mark.parametrize(("mode", "subject", "option"), CASES)
def test_matches_float64(mode, subject, option):
    got = derivatives(subject, option)[mode]
    if mode == "state":  # exactly zero: the running statistics are not differentiable
        for leaf in jax.tree.leaves(got):
            np.testing.assert_array_equal(np.asarray(leaf.astype(jnp.float32)), 0.0)
        return
    tol = TOLERANCE["bfloat16" if option == "bfloat16" else "float32"]
    assert_grads_close(got, truth(option)[mode], tol, f"{mode} of {subject} on {option}")


PARITY_CASES = [
    pytest.param(mode, subject, option, id=f"{mode}-{subject}-{option}",
                 marks=_marks(option))
    for option in OPTIONS for subject in SUBJECTS for mode in MODES
    if option in COUNTERPART_OPTIONS[COUNTERPARTS[subject]] and mode != "state"
]


@pytest.mark.parametrize(("mode", "subject", "option"), PARITY_CASES)
def test_matches_flax(mode, subject, option):
    counterpart = COUNTERPARTS[subject]
    ours = derivatives(subject, option)[mode]
    theirs = derivatives(counterpart, option)[mode]
    assert_grads_close(ours, theirs, PARITY_TOLERANCE, f"{mode}: {subject} against {counterpart}")


# --------------------------------------------------------------------------- epsilon
#
# epsilon enters the output through inv_std = (var + epsilon)^(-1/2) only: each mode of the
# table above, now with respect to epsilon, for the subjects that take it as a traced value
# (equinox's `eps` is a static field, in equinox itself too). The truth: the reference's
# output differentiated by central differences, the closed-form ∂loss/∂epsilon
# (``_epsilon_grad``) for the gradient, and that differentiated by central differences for
# the second order.

EPSILON = 1e-2  # ~1e-3 of the problems' variances: the derivative is small but not zero
EPSILON_SUBJECTS = ("pure", "linen", "nnx")
EPSILON_OPTIONS = ("float32", "mask", "bfloat16", "sync")
EPSILON_MODES = ("jvp", "linearize", "jacfwd", "grad", "hessian", "hvp_fwd_rev", "hvp_rev_rev")
EPSILON_TANGENTS = (0.7, -1.3)  # the two tangents (linearize), the first also jvp's
EPSILON_DIRECTION = 0.9  # the Hessian-vector products' vector


def _epsilon_layer(name: str, axis_name: str | None) -> Callable[..., Any]:
    """``(x, scale, bias, mask, epsilon) -> y`` of subject ``name`` with ``epsilon`` traced."""
    features = 3

    if name == "pure":
        def pure(x, scale, bias, mask, epsilon):
            return jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, jaxbn.init(features)[1],
                                    training=True, epsilon=epsilon, mask=mask,
                                    axis_name=axis_name)[0]
        return pure
    if name == "linen":
        def linen(x, scale, bias, mask, epsilon):  # a module field may hold a traced value
            module = jaxbn.linen.BatchNorm(use_running_average=False, epsilon=epsilon,
                                           axis_name=axis_name)
            stats = {"mean": jnp.zeros(features), "var": jnp.ones(features)}
            return module.apply({"params": {"scale": scale, "bias": bias},
                                 "batch_stats": stats}, x, mask=mask,
                                mutable=["batch_stats"])[0]
        return linen
    graphdef, state = nnx.split(jaxbn.nnx.BatchNorm(features, axis_name=axis_name,
                                                    rngs=nnx.Rngs(0)))

    def nnx_layer(x, scale, bias, mask, epsilon):
        module = nnx.merge(graphdef, state, copy=True)
        module.scale[...] = scale
        module.bias[...] = bias
        module.epsilon = epsilon
        return module(x, use_running_average=False, mask=mask)
    return nnx_layer


@functools.cache
def epsilon_derivatives(name: str, option: str) -> dict[str, Any]:
    """Every mode with respect to epsilon through ``name`` on ``option``'s problem."""
    p = problem(option)
    layer = _epsilon_layer(name, "devices" if p.sync else None)
    if p.sync:
        mesh = jax.make_mesh((DEVICES,), ("devices",), axis_types=(AxisType.Auto,))
        layer = jax.shard_map(
            layer, mesh=mesh,
            in_specs=(P("devices"), P(), P(), P() if p.mask is None else P("devices"), P()),
            out_specs=P("devices"),
        )

    def output(epsilon):
        return layer(*p.args, p.mask, epsilon)

    def loss(epsilon):
        return jnp.sum(p.weights * jnp.tanh(output(epsilon).astype(jnp.float32)))

    grad = jax.grad(loss)

    def modes(epsilon, tangents, direction):
        _, linear = jax.linearize(output, epsilon)
        return {
            "jvp": jax.jvp(output, (epsilon,), (tangents[0],))[1],
            "linearize": tuple(linear(t) for t in tangents),
            "jacfwd": jax.jacfwd(output)(epsilon),
            "grad": grad(epsilon),
            "hessian": jax.hessian(loss)(epsilon),
            "hvp_fwd_rev": jax.jvp(grad, (epsilon,), (direction,))[1],
            "hvp_rev_rev": jax.grad(lambda e: grad(e) * direction)(epsilon),
        }

    with standard():
        return jax.jit(modes)(jnp.float32(EPSILON), jnp.asarray(EPSILON_TANGENTS, jnp.float32),
                              jnp.float32(EPSILON_DIRECTION))


def _epsilon_grad(x, scale, bias, mask, weights, epsilon):
    """∂/∂epsilon of ``Σ weights · tanh(y)``: the reference's gradient of ``Σ dy · y`` with
    ``dy = weights · (1 - tanh²(y))``."""
    y, _, _ = ref.batch_norm(x, -1, scale, bias, mask, epsilon)
    return ref.epsilon_grad(x, weights * (1 - np.tanh(y) ** 2), -1, scale, mask, epsilon)


@functools.cache
def epsilon_truth(option: str) -> dict[str, Any]:
    p = problem(option)
    x, scale, bias = (ref.as_float64(a) for a in p.args)
    mask = None if p.mask is None else np.asarray(p.mask)
    weights = ref.as_float64(p.weights)

    def output(epsilon):
        return ref.batch_norm(x, -1, scale, bias, mask, float(epsilon))[0]

    def grad(epsilon):
        return _epsilon_grad(x, scale, bias, mask, weights, float(epsilon))

    def along(fn, tangent):
        return ref.directional_derivative(fn, [EPSILON], [tangent])

    hessian = along(grad, 1.0)
    return {
        "jvp": along(output, EPSILON_TANGENTS[0]),
        "linearize": tuple(along(output, t) for t in EPSILON_TANGENTS),
        "jacfwd": along(output, 1.0),
        "grad": grad(EPSILON),
        "hessian": hessian,
        "hvp_fwd_rev": hessian * EPSILON_DIRECTION,
        "hvp_rev_rev": hessian * EPSILON_DIRECTION,
    }


EPSILON_CASES = [
    pytest.param(mode, subject, option, id=f"{mode}-{subject}-{option}", marks=_marks(option))
    for option in EPSILON_OPTIONS for subject in EPSILON_SUBJECTS for mode in EPSILON_MODES
]


@pytest.mark.parametrize(("mode", "subject", "option"), EPSILON_CASES)
def test_epsilon_derivative_matches_float64(mode, subject, option):
    got = epsilon_derivatives(subject, option)[mode]
    tol = TOLERANCE["bfloat16" if option == "bfloat16" else "float32"]
    assert_grads_close(got, epsilon_truth(option)[mode], tol,
                       f"d/d epsilon, {mode} of {subject} on {option}")


def test_the_epsilon_gradient_is_not_zero_in_training():
    # Regression: jax.grad with respect to epsilon was 0.0 in training mode (the custom
    # JVP dropped epsilon's tangent), where the analytic value is large: a small variance
    # (0.0025) next to epsilon 1e-3.
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(0.0, 0.05, (64, 8)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    params, state = jaxbn.init(8)

    def loss(epsilon):
        y, _ = jaxbn.batch_norm(x, params, state, training=True, epsilon=epsilon)
        return jnp.sum(weights * jnp.tanh(y))

    expected = _epsilon_grad(ref.as_float64(x), np.ones(8), np.zeros(8), None,
                             ref.as_float64(weights), 1e-3)
    got = float(jax.grad(loss)(jnp.float32(1e-3)))
    assert abs(expected) > 10  # far from the 0.0 that was returned
    np.testing.assert_allclose(got, expected, rtol=1e-4)

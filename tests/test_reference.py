"""The float64 reference (tests/_reference.py) that the other tests trust, checked on its own.

Its gradients against central finite differences of its own forward pass (feature-shaped and
per-example scale and bias, ghost batches included), its statistics and outputs against values
worked out by hand (complex input included), its variants against the identities that define
them, and a negative control: the finite-difference check rejects the gradients one gets by
forgetting that the batch statistics depend on x, or that masked-out entries do not feed them.
"""

from __future__ import annotations

from collections.abc import Callable

import _reference as ref
import chex
import numpy as np
import pytest


def _numeric_gradient(loss: Callable[[np.ndarray], float], at: np.ndarray) -> np.ndarray:
    return ref.jacobian(loss, [at], 0)


def _problem(
    shape: tuple[int, ...],
    axis: ref.Axis,
    mask_kind: str | None,
    seed: int = 0,
    per_example: bool = False,
):
    rng = np.random.default_rng(seed)
    features = ref.per_example_shape(shape, axis) if per_example else ref.feature_shape(shape, axis)
    x = rng.normal(size=shape) * 2.0 + 1.0
    dy = rng.normal(size=shape)
    scale, bias = rng.uniform(0.5, 2.0, features), rng.normal(size=features)
    mask = None
    if mask_kind == "rows":  # some examples do not count; broadcast over the features
        mask = (np.arange(shape[0]) % 3 != 1).reshape((-1,) + (1,) * (len(shape) - 1))
    elif mask_kind == "entries":  # every feature keeps at least two entries
        mask = rng.random(shape) < 0.7
        mask[:2] = True
    return x, dy, scale, bias, mask


GRADIENT_CASES = [
    pytest.param((6, 3), -1, None, id="NC"),
    pytest.param((3, 2, 2, 2), 1, None, id="NCHW"),
    pytest.param((2, 3, 2, 2), (1, 3), None, id="two-feature-axes"),
    pytest.param((9, 3), -1, "rows", id="masked-rows"),
    pytest.param((8, 2), -1, "entries", id="masked-entries"),
]


@pytest.mark.parametrize("per_example", [False, True], ids=["feature-params", "per-example"])
@pytest.mark.parametrize(("shape", "axis", "mask_kind"), GRADIENT_CASES)
def test_gradients_match_finite_differences(shape, axis, mask_kind, per_example):
    x, dy, scale, bias, mask = _problem(shape, axis, mask_kind, per_example=per_example)

    def loss(x=x, scale=scale, bias=bias) -> float:
        return float((ref.batch_norm(x, axis, scale, bias, mask)[0] * dy).sum())

    dx, dscale, dbias = ref.grads(x, dy, axis, scale, mask, bias=bias)
    np.testing.assert_allclose(dx, _numeric_gradient(lambda v: loss(x=v), x), atol=1e-7)
    np.testing.assert_allclose(dscale, _numeric_gradient(lambda v: loss(scale=v), scale),
                               atol=1e-7)
    np.testing.assert_allclose(dbias, _numeric_gradient(lambda v: loss(bias=v), bias), atol=1e-7)


@pytest.mark.parametrize("per_example", [False, True], ids=["feature-params", "per-example"])
def test_ghost_gradients_match_finite_differences(per_example):
    x, dy, scale, bias, mask = _problem((8, 3, 2), -1, "rows", per_example=per_example)

    def loss(x=x, scale=scale, bias=bias) -> float:
        return float((ref.ghost_batch_norm(x, 4, -1, mask, scale=scale, bias=bias)[0] * dy).sum())

    dx, dscale, dbias = ref.ghost_grads(x, dy, 4, -1, scale, mask, bias=bias)
    np.testing.assert_allclose(dx, _numeric_gradient(lambda v: loss(x=v), x), atol=1e-7)
    np.testing.assert_allclose(dscale, _numeric_gradient(lambda v: loss(scale=v), scale),
                               atol=1e-7)
    np.testing.assert_allclose(dbias, _numeric_gradient(lambda v: loss(bias=v), bias), atol=1e-7)


def test_eval_gradients_match_finite_differences():
    x, dy, scale, bias, _ = _problem((6, 2, 3), -1, None)
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([0.7, 1.5, 3.0])

    def loss(x=x, scale=scale, bias=bias) -> float:
        return float((ref.normalize(x, mean, var, -1, scale, bias) * dy).sum())

    dx, dscale, dbias = ref.eval_grads(x, dy, mean, var, -1, scale)
    np.testing.assert_allclose(dx, _numeric_gradient(lambda v: loss(x=v), x), atol=1e-7)
    np.testing.assert_allclose(dscale, _numeric_gradient(lambda v: loss(scale=v), scale),
                               atol=1e-7)
    np.testing.assert_allclose(dbias, _numeric_gradient(lambda v: loss(bias=v), bias), atol=1e-7)
    np.testing.assert_allclose(ref.inv_std(var), (var + ref.EPS) ** -0.5)


@pytest.mark.parametrize("mask_kind", [None, "entries"])
def test_epsilon_gradient_matches_finite_differences(mask_kind):
    x, dy, scale, bias, mask = _problem((8, 3), -1, mask_kind)
    eps = 0.05  # large enough that the central difference sees it well

    def loss(epsilon: np.ndarray) -> float:
        return float((ref.batch_norm(x, -1, scale, bias, mask, float(epsilon))[0] * dy).sum())

    numeric = ref.directional_derivative(loss, [eps], [1.0])
    np.testing.assert_allclose(ref.epsilon_grad(x, dy, -1, scale, mask, eps), numeric,
                               rtol=1e-6)


def test_per_example_params_scale_and_shift_each_example():
    """A per-example scale and bias act on their own example only; a per-example parameter
    that is the same for every example is the feature-shaped one."""
    x, _, scale, bias, _ = _problem((4, 3, 2), 1, None, per_example=True)
    chex.assert_shape([scale, bias], (4, 3, 1))
    y = ref.batch_norm(x, 1, scale, bias)[0]
    x_hat = ref.batch_norm(x, 1)[0]
    for n in range(4):
        np.testing.assert_allclose(y[n], x_hat[n] * scale[n] + bias[n])
    shared = ref.batch_norm(x, 1, np.broadcast_to(scale[:1], scale.shape), bias[0, :, 0])[0]
    np.testing.assert_allclose(shared, ref.batch_norm(x, 1, scale[0, :, 0], bias[0, :, 0])[0])


def test_complex_moments_by_hand():
    """A complex x (flax's convention): the mean is complex, the variance E|x - mean|² real."""
    x = np.array([[1 + 1j, 2.0], [3 - 1j, 2.0], [2 + 3j, 2.0]])
    mean, var, count = ref.moments(x)
    np.testing.assert_allclose(mean, [2 + 1j, 2.0])
    # |x - mean|²: |-1|² = 1, |1 - 2j|² = 5, |2j|² = 4
    np.testing.assert_allclose(var, [10 / 3, 0.0])
    assert var.dtype == np.float64 and count.tolist() == [3, 3]
    y, _, _ = ref.batch_norm(x, scale=[1.0, 1.0])
    assert y.dtype == np.complex128
    np.testing.assert_allclose(y[:, 0], (x[:, 0] - (2 + 1j)) / np.sqrt(10 / 3 + ref.EPS))


def test_second_derivatives_of_the_analytic_gradient_are_symmetric():
    """The Hessian of a loss is symmetric: the finite-difference Jacobian of :func:`grads`
    (the second-order truth of tests/test_autodiff.py) must be, and its directional
    derivative must be that Jacobian applied to the direction."""
    x, dy, scale, _, mask = _problem((5, 2), -1, "rows")
    v = np.random.default_rng(1).normal(size=x.shape)

    def dx(x):
        return ref.grads(x, dy, -1, scale, mask)[0]

    hessian = ref.jacobian(dx, [x], 0).reshape(x.size, x.size)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-7)
    assert np.max(np.abs(hessian)) > 0.1  # not trivially symmetric
    np.testing.assert_allclose(
        ref.directional_derivative(dx, [x], [v]).ravel(), hessian @ v.ravel(), atol=1e-7
    )


def test_finite_differences_reject_wrong_gradients():
    """Negative control: the check above has the power to fail."""
    x, dy, scale, bias, mask = _problem((9, 3), -1, "rows")
    numeric = _numeric_gradient(
        lambda v: float((ref.batch_norm(v, -1, scale, bias, mask)[0] * dy).sum()), x
    )
    _, var, _ = ref.moments(x, -1, mask)
    statistics_held = dy * scale / np.sqrt(var + ref.EPS)  # as if μ and σ were constants
    mask_ignored = ref.grads(x, dy, -1, scale)[0]  # as if every row fed the statistics
    for wrong in (statistics_held, mask_ignored):
        assert np.max(np.abs(wrong - numeric)) > 0.05


def test_moments_by_hand():
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    mean, var, count = ref.moments(x)
    np.testing.assert_allclose(mean, [2.5, 25.0])
    np.testing.assert_allclose(var, [1.25, 125.0])
    assert count.tolist() == [4, 4]
    np.testing.assert_allclose(ref.moments(x, ddof=1)[1], [5 / 3, 500 / 3])
    mask = np.array([[True, False], [True, False], [False, True], [False, False]])
    mean, var, count = ref.moments(x, -1, mask)
    np.testing.assert_allclose(mean, [1.5, 30.0])
    np.testing.assert_allclose(var, [0.25, 0.0])
    assert count.tolist() == [2, 1]
    # NCHW: the statistics of channel c are over every entry of x[:, c].
    nchw = np.arange(24.0).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(ref.moments(nchw, 1)[0], [7.5, 11.5, 15.5])
    assert ref.moments(np.zeros((2, 3)), -1, np.zeros((2, 3), bool))[2].tolist() == [0, 0, 0]


def test_batch_norm_by_hand():
    x = np.array([[-1.0, 3.0], [1.0, 5.0]])  # per feature: mean (0, 4), variance (1, 1)
    y, mean, var = ref.batch_norm(x, scale=[2.0, 1.0], bias=[3.0, 0.0])
    np.testing.assert_allclose(mean, [0.0, 4.0])
    np.testing.assert_allclose(var, [1.0, 1.0])
    unit = 1 / np.sqrt(1 + ref.EPS)
    np.testing.assert_allclose(y, [[3 - 2 * unit, -unit], [3 + 2 * unit, unit]])
    # The affine-free output has mean 0 and variance var / (var + eps) per feature.
    x, *_ = _problem((5, 2, 3, 3), 1, None)
    y, _, var = ref.batch_norm(x, 1)
    np.testing.assert_allclose(ref.moments(y, 1)[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(ref.moments(y, 1)[1], var / (var + ref.EPS))


def test_train_step_updates_the_running_statistics_by_the_ema():
    x = np.array([[0.0], [2.0]])  # mean 1, variance 1
    step = ref.train_step(x, np.ones_like(x), scale=[1.0], bias=[0.0], running_mean=[5.0],
                          running_var=[3.0], momentum=0.75)
    np.testing.assert_allclose(step.mean, [0.75 * 5 + 0.25 * 1])
    np.testing.assert_allclose(step.var, [0.75 * 3 + 0.25 * 1])
    np.testing.assert_allclose(step.dbias, [2.0])
    np.testing.assert_allclose(step.dx, 0.0, atol=1e-12)  # a constant dy moves nothing


def test_ghost_batches_are_independent_batch_norms():
    x, *_ = _problem((12, 3), -1, None)
    y, mean, var = ref.ghost_batch_norm(x, 4)
    groups = [ref.batch_norm(x[i : i + 4]) for i in (0, 4, 8)]
    np.testing.assert_allclose(y, np.concatenate([g[0] for g in groups]))
    np.testing.assert_allclose(mean, np.mean([g[1] for g in groups], axis=0))
    np.testing.assert_allclose(var, np.mean([g[2] for g in groups], axis=0))
    # A group without a valid entry is left out of the running update.
    mask = np.ones((12, 1), bool)
    mask[8:] = False
    _, mean, _ = ref.ghost_batch_norm(x, 4, mask=mask)
    np.testing.assert_allclose(mean, np.mean([g[1] for g in groups[:2]], axis=0))


def test_renorm_identities():
    """r_max=1, d_max=0 is batch norm; unbounded r and d give the eval output exactly:
    x̃·r + d = (x - μ_B)/σ_B · σ_B/σ + (μ_B - μ)/σ = (x - μ)/σ."""
    x, _, scale, bias, _ = _problem((8, 3), -1, None)
    running_mean, running_var = np.array([0.5, 1.0, -3.0]), np.array([1.0, 4.0, 0.01])
    args = (x, running_mean, running_var, scale, bias)
    np.testing.assert_allclose(ref.batch_renorm(*args, 1.0, 0.0)[0],
                               ref.batch_norm(x, -1, scale, bias)[0])
    y, parts = ref.batch_renorm(*args, np.inf, np.inf)
    np.testing.assert_allclose(y, ref.normalize(x, running_mean, running_var, -1, scale, bias))
    clipped = ref.batch_renorm(*args, 1.5, 1.0)[1]
    np.testing.assert_array_less(np.abs(clipped.d), 1.0 + 1e-12)
    assert np.all((clipped.r >= 1 / 1.5) & (clipped.r <= 1.5))
    np.testing.assert_allclose(parts.x_tilde, ref.batch_norm(x)[0])

"""Parity with flax for everything flax accepts, and the extensions that keep it.

**flax's own BatchNorm tests**, from the flax 0.12.8 repository (its tests are not in the
wheel), re-written with the drop-ins in place of flax's modules: same inputs, same assertions,
each test named after the one it mirrors, whose file and name its docstring gives:

- ``tests/linen/linen_test.py::NormalizationTest``: ``test_batch_norm``,
  ``test_batch_norm_complex`` (each with and without a mask), ``test_batch_norm_multi_init``;
- ``tests/linen/linen_module_test.py::ModuleTest::test_bind_stateful`` (``Module.bind`` with a
  BatchNorm on an unbatched input);
- ``tests/nnx/nn/normalization_test.py::TestLinenConsistency``:
  ``test_nnx_linen_batchnorm_equivalence`` and ``test_nnx_linen_spectralnorm_equivalence``
  (an ``nnx.BatchNorm`` inside the spectral-normalized ``Sequential``).

Then what the issue adds: **complex input** (the pure function against the float64 reference
extended to complex, the drop-ins against flax, synchronization, gradients against flax's
two-pass autodiff); **inputs with no reduction axis** in the drop-ins, as flax computes them
(the pure function refuses them in training); **per-example (conditional) scale and bias**
against the float64 reference, gradients included; and adapter **errors in the adapter's own
vocabulary**.

Where jaxbn intentionally differs from flax, the test asserts jaxbn's behaviour and says so: a
feature with no valid entry gives a finite output and keeps its running statistics (flax:
NaN), and ``jaxbn.nnx`` keeps the complex running mean that ``flax.nnx`` truncates to its real
part with a warning. Flax does not run under the strict dtype promotion conftest.py sets, so
flax calls (and the flax layers around a drop-in) run under ``standard()``.
"""

from __future__ import annotations

import itertools
import re
import warnings

import _reference as ref
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import BF16_TOL, TOL, assert_close, assert_tree_close, batches, make_mask, standard
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx

data = batches(2468)

# float64 reference against float32 results on values of size ~10: a few float32 ulps.
REF_TOL = {"atol": 5e-5, "rtol": 5e-5}
REF_TOL_X64 = {"atol": 1e-10, "rtol": 1e-10}


def allclose(actual, expected, tol=REF_TOL, err_msg=""):
    """Values within ``tol`` (complex values compared as such)."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), err_msg=err_msg, **tol)


# --------------------------------------------------------------------------------------------
# flax's own BatchNorm tests, with the drop-ins in place of flax's modules
# --------------------------------------------------------------------------------------------


def _flax_normalization_batch(dtype, test_mask):
    """The input of flax's ``test_batch_norm(_complex)``: x of shape (4, 3, 2) and, with a
    mask, a random (4, 3, 1) mask with NaN in every masked-out entry of x."""
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key1, (4, 3, 2), dtype=dtype)
    mask = None
    if test_mask:
        mask = jax.random.randint(key2, (4, 3, 1), 0, 2, dtype=jnp.int32).astype(jnp.bool_)
        x = jnp.where(mask, x, jnp.ones_like(x) * jnp.nan)
    return x, mask, key3


def _check_flax_batch_norm_test(x_dtype, test_mask, **kwargs):
    """flax's assertions: the training output has mean 0 and variance 1 over the valid
    entries, and after one step the EMA holds 0.1 * the batch mean and 0.9 + 0.1 * its
    variance. Also: the drop-in's numbers are flax's on the same input (NaN where x is)."""
    x, mask, key = _flax_normalization_batch(x_dtype, test_mask)
    outputs = {}
    for name, module_cls in (("ours", jaxbn.linen.BatchNorm), ("flax", nn.BatchNorm)):
        module = module_cls(momentum=0.9, use_running_average=False, **kwargs)
        with standard():
            y, initial_params = module.init_with_output(key, x, mask=mask)
            _, vars_out = module.apply(initial_params, x, mutable=["batch_stats"], mask=mask)
        outputs[name] = (y, vars_out["batch_stats"])
    y, ema = outputs["ours"]
    mean, var = y.mean((0, 1), where=mask), y.var((0, 1), where=mask)
    np.testing.assert_allclose(mean, np.array([0.0, 0.0]), atol=1e-4)
    np.testing.assert_allclose(var, np.array([1.0, 1.0]), rtol=1e-4)
    assert mean.dtype == x_dtype
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=mask), atol=1e-4)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=mask), rtol=1e-4)
    flax_y, flax_ema = outputs["flax"]
    np.testing.assert_allclose(y, flax_y, **TOL)  # NaN where flax has NaN: the masked x
    for name in ("mean", "var"):
        assert ema[name].dtype == flax_ema[name].dtype, name
        np.testing.assert_allclose(ema[name], flax_ema[name], **TOL)


@pytest.mark.parametrize("test_mask", [True, False], ids=["mask", "no-mask"])
def test_linen_normalization_batch_norm(test_mask):
    """Mirrors flax ``tests/linen/linen_test.py::NormalizationTest::test_batch_norm``."""
    _check_flax_batch_norm_test(jnp.float32, test_mask)


@pytest.mark.parametrize("test_mask", [True, False], ids=["mask", "no-mask"])
def test_linen_normalization_batch_norm_complex(test_mask):
    """Mirrors flax ``tests/linen/linen_test.py::NormalizationTest::test_batch_norm_complex``:
    complex64 input and ``dtype``; the output is complex, the running mean becomes complex,
    the running variance stays real."""
    _check_flax_batch_norm_test(jnp.complex64, test_mask, dtype=jnp.complex64)


def test_linen_normalization_batch_norm_multi_init():
    """Mirrors flax ``tests/linen/linen_test.py::NormalizationTest::test_batch_norm_multi_init``:
    one module called twice during init, with an ``axis_name`` that nothing binds (init does
    not synchronize)."""

    class Foo(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = jaxbn.linen.BatchNorm(name="norm", use_running_average=False,
                                         axis_name="batch")
            x = norm(x)
            return x, norm(x)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    (y1, y2), _ = Foo().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)


def test_linen_module_bind_stateful():
    """Mirrors flax ``tests/linen/linen_module_test.py::ModuleTest::test_bind_stateful``:
    ``Module.bind`` with a mutable ``batch_stats`` and a BatchNorm in training on the (3,)
    output of a Dense on an unbatched (4,) input; ``bind``, ``nn.apply`` and ``init`` agree.
    Also: flax's module gives the same output and statistics."""

    def make_foo(bn_cls):
        class Foo(nn.Module):
            def setup(self):
                self.a = nn.Dense(3)
                self.bn = bn_cls()
                self.b = nn.Dense(1)

        return Foo()

    def f(foo, x):
        x = foo.a(x)
        x = foo.bn(x, use_running_average=False)
        return foo.b(x)

    x = jnp.ones((4,))
    results = {}
    for name, bn_cls in (("ours", jaxbn.linen.BatchNorm), ("flax", nn.BatchNorm)):
        foo = make_foo(bn_cls)
        with standard():
            y1, variables = nn.init_with_output(f, foo)(jax.random.key(0), x)
            foo_b = foo.bind(variables, mutable="batch_stats")
            y2 = f(foo_b, x)
            y3, new_state = nn.apply(f, foo, mutable="batch_stats")(variables, x)
        assert y1 == y2
        assert y2 == y3
        bs_1, bs_2 = new_state["batch_stats"], foo_b.variables["batch_stats"]
        for a, b in zip(jax.tree.leaves(bs_1), jax.tree.leaves(bs_2), strict=True):
            np.testing.assert_allclose(a, b)
        results[name] = (y3, bs_1)
    assert_close(results["ours"][0], results["flax"][0])
    jax.tree.map(assert_close, results["ours"][1], results["flax"][1])


def _equivalence_models(linen_bn, nnx_bn, dtype, param_dtype, use_fast_variance):
    """flax's TestLinenConsistency models: a BatchNorm of 5 features, then a Linear to 4."""

    class NNXModel(nnx.Module):
        def __init__(self, rngs):
            self.norm_layer = nnx_bn(
                5, use_running_average=False, dtype=dtype, param_dtype=param_dtype,
                use_fast_variance=use_fast_variance,
                promote_dtype=lambda x, **kwargs: x,  # ensure same behavior as Linen
                rngs=rngs,
            )
            self.linear = nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def __call__(self, x, *, mask=None):
            return self.linear(self.norm_layer(x, mask=mask))

    class LinenModel(nn.Module):
        def setup(self):
            self.norm_layer = linen_bn(
                use_running_average=False, dtype=dtype, param_dtype=param_dtype,
                use_fast_variance=use_fast_variance,
            )
            self.linear = nn.Dense(4, dtype=dtype, param_dtype=param_dtype)

        def __call__(self, x, *, mask=None):
            return self.linear(self.norm_layer(x, mask=mask))

    return LinenModel(), NNXModel(nnx.Rngs(42))


def _run_equivalence(linen_bn, nnx_bn, dtype, param_dtype, use_fast_variance, mask):
    """flax's test body: the same input through both models; the linen output and
    variables, and the nnx output and layer."""
    linen_model, nnx_model = _equivalence_models(
        linen_bn, nnx_bn, dtype, param_dtype, use_fast_variance
    )
    x = jax.random.normal(jax.random.key(0), (10, 5))
    with standard():
        variables = linen_model.init(jax.random.key(1), x)
        nnx_model.linear.kernel[...] = variables["params"]["linear"]["kernel"]
        nnx_model.linear.bias[...] = variables["params"]["linear"]["bias"]
        linen_out, updates = linen_model.apply(variables, x, mask=mask, mutable=["batch_stats"])
        variables.update(updates)
        nnx_out = nnx_model(x, mask=mask)
    return linen_out, variables, nnx_out, nnx_model.norm_layer


EQUIVALENCE_MASK = np.array([True, False, True, False, True])  # features 1 and 3: no entry


@pytest.mark.parametrize(
    ("dtype", "param_dtype", "use_fast_variance", "masked"),
    list(itertools.product([jnp.float32, jnp.float16], [jnp.float32, jnp.float16],
                           [True, False], [False, True])),
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_nnx_linen_batchnorm_equivalence(dtype, param_dtype, use_fast_variance, masked):
    """Mirrors flax ``tests/nnx/nn/normalization_test.py::TestLinenConsistency::
    test_nnx_linen_batchnorm_equivalence``: ``jaxbn.linen`` and ``jaxbn.nnx`` give the same
    output, parameters and running statistics, exactly.

    Also against flax's modules on the same input. flax's mask ``[T, F, T, F, T]`` leaves
    features 1 and 3 without a valid entry: flax's statistics, and so its whole output after
    the Linear, are NaN (flax's test compares NaN with NaN). jaxbn intentionally gives a
    finite output there, and those features keep their running statistics (0 and 1).
    """
    mask = EQUIVALENCE_MASK if masked else None
    args = (dtype, param_dtype, use_fast_variance, mask)
    linen_out, variables, nnx_out, nnx_norm = _run_equivalence(
        jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm, *args
    )
    np.testing.assert_array_equal(linen_out, nnx_out)
    norm_params = variables["params"]["norm_layer"]
    norm_stats = variables["batch_stats"]["norm_layer"]
    np.testing.assert_array_equal(norm_params["scale"], nnx_norm.scale[...])
    np.testing.assert_array_equal(norm_params["bias"], nnx_norm.bias[...])
    np.testing.assert_array_equal(norm_stats["mean"], nnx_norm.mean[...])
    np.testing.assert_array_equal(norm_stats["var"], nnx_norm.var[...])

    flax_out, flax_variables, _, _ = _run_equivalence(nn.BatchNorm, nnx.BatchNorm, *args)
    flax_stats = flax_variables["batch_stats"]["norm_layer"]
    tol = BF16_TOL if dtype == jnp.float16 else TOL
    assert np.all(np.isfinite(linen_out))
    if not masked:
        assert_close(linen_out, flax_out, tol)
        jax.tree.map(assert_close, norm_stats, flax_stats)
        return
    assert np.all(np.isnan(flax_out))  # flax: NaN statistics for the empty features
    kept = EQUIVALENCE_MASK
    for name, initial in (("mean", 0.0), ("var", 1.0)):
        assert np.all(np.isnan(flax_stats[name][~kept]))
        np.testing.assert_array_equal(norm_stats[name][~kept], initial)
        assert_close(norm_stats[name][kept], flax_stats[name][kept])


def _spectral_models(linen_bn, nnx_bn, dtype, param_dtype, n_steps, update_stats):
    """flax's spectral-norm consistency models: Dense(5 -> 4), relu, BatchNorm, wrapped in
    SpectralNorm."""

    class NNXModel(nnx.Module):
        def __init__(self, rngs):
            self.seq = nnx.Sequential(
                nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                nnx.relu,
                nnx_bn(4, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                       use_running_average=not update_stats),
            )
            self.norm_layer = nnx.SpectralNorm(
                self.seq, n_steps=n_steps, dtype=dtype, param_dtype=param_dtype,
                update_stats=update_stats, rngs=rngs,
            )

        def __call__(self, x):
            return self.norm_layer(x)

    class LinenModel(nn.Module):
        def setup(self):
            self.seq = nn.Sequential([
                nn.Dense(4, dtype=dtype, param_dtype=param_dtype),
                nn.relu,
                linen_bn(dtype=dtype, param_dtype=param_dtype,
                         use_running_average=not update_stats),
            ])
            self.norm_layer = nn.SpectralNorm(self.seq, n_steps=n_steps)

        def __call__(self, x):
            return self.norm_layer(x, update_stats=update_stats)

    return LinenModel(), NNXModel(nnx.Rngs(42))


def _run_spectral(linen_bn, nnx_bn, *args):
    linen_model, nnx_model = _spectral_models(linen_bn, nnx_bn, *args)
    x = jax.random.normal(jax.random.key(0), (10, 5))
    with standard():
        variables = linen_model.init(jax.random.key(1), x)
        # The same weights and spectral statistics in both (flax's test copies the Dense
        # bias into the BatchNorm bias; both are zeros of the same shape).
        dense = variables["params"]["seq"]["layers_0"]
        nnx_model.seq.layers[0].kernel.set_value(dense["kernel"])
        nnx_model.seq.layers[0].bias.set_value(dense["bias"])
        nnx_model.seq.layers[2].scale.set_value(variables["params"]["seq"]["layers_2"]["scale"])
        nnx_model.seq.layers[2].bias.set_value(dense["bias"])
        spectral = variables["batch_stats"]["norm_layer"]
        nnx_stats = nnx_model.norm_layer.batch_stats
        nnx_stats[("layers", 0, "kernel", "u")].set_value(spectral["seq/layers_0/kernel/u"])
        nnx_stats[("layers", 0, "kernel", "sigma")].set_value(
            spectral["seq/layers_0/kernel/sigma"]
        )
        linen_out, linen_updates = linen_model.apply(variables, x, mutable=["batch_stats"])
        nnx_out = nnx_model(x)
    return linen_out, linen_updates["batch_stats"]["norm_layer"], nnx_out, nnx_stats


@pytest.mark.parametrize(
    ("dtype", "param_dtype", "n_steps", "update_stats"),
    list(itertools.product([jnp.float32, jnp.float16], [jnp.float32, jnp.float16], [1, 10],
                           [True, False])),
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_nnx_linen_spectralnorm_equivalence(dtype, param_dtype, n_steps, update_stats):
    """Mirrors flax ``tests/nnx/nn/normalization_test.py::TestLinenConsistency::
    test_nnx_linen_spectralnorm_equivalence``, whose spectral-normalized ``Sequential`` holds
    a BatchNorm (training when ``update_stats``): both drop-ins give the same output and
    spectral statistics, exactly. Also: the output is flax's modules' output."""
    args = (dtype, param_dtype, n_steps, update_stats)
    linen_out, spectral, nnx_out, nnx_stats = _run_spectral(
        jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm, *args
    )
    np.testing.assert_array_equal(linen_out, nnx_out)
    for name in ("u", "sigma"):
        np.testing.assert_array_equal(
            nnx_stats[("layers", 0, "kernel", name)], spectral[f"seq/layers_0/kernel/{name}"]
        )
    flax_out = _run_spectral(nn.BatchNorm, nnx.BatchNorm, *args)[0]
    assert_close(linen_out, flax_out, BF16_TOL if dtype == jnp.float16 else TOL)


# --------------------------------------------------------------------------------------------
# Complex input
# --------------------------------------------------------------------------------------------

C = 3
COMPLEX_SHAPE = (16, C)
COMPLEX_DTYPES = [
    pytest.param(jnp.complex64, id="complex64"),
    pytest.param(jnp.complex128, id="complex128"),
]


def complex_batch(shape, step, dtype=jnp.complex64):
    """A complex batch with mean about 2 - 1j and unequal real and imaginary spreads."""
    real, imag = data(shape, step), data(shape, step + 1000, loc=-1.0, scale=2.0)
    return jax.lax.complex(real, imag).astype(dtype)


def complex_params(dtype):
    return {
        "scale": jnp.asarray([1.5 - 0.5j, 0.5 + 1.0j, 2.0], dtype),
        "bias": jnp.asarray([0.3j, -1.0, 1.0 - 2.0j], dtype),
    }


@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
def test_complex_init_gives_complex_params_and_mean_and_a_real_variance(dtype):
    with jax.enable_x64(dtype == jnp.complex128):
        params, state = jaxbn.init(C, dtype=dtype)
    real = np.float32 if dtype == jnp.complex64 else np.float64
    assert params["scale"].dtype == params["bias"].dtype == state.mean.dtype == dtype
    assert state.var.dtype == real
    np.testing.assert_array_equal(state.var, np.ones(C, real))


@pytest.mark.parametrize("mask_kind", [None, "random"])
@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
def test_complex_pure_function_matches_float64_reference(dtype, mask_kind):
    """Training: complex output, complex running mean, real running variance E|x - mean|²,
    the state's types unchanged; evaluation with the new running statistics."""
    with jax.enable_x64(dtype == jnp.complex128):
        tol = REF_TOL if dtype == jnp.complex64 else REF_TOL_X64
        x, params = complex_batch(COMPLEX_SHAPE, 0, dtype), complex_params(dtype)
        mask = make_mask(mask_kind, COMPLEX_SHAPE)
        _, state = jaxbn.init(C, dtype=dtype)
        train = jax.jit(lambda x, params, state: jaxbn.batch_norm(
            x, params, state, training=True, momentum=0.9, mask=mask))
        y, new = train(x, params, state)
        y_eval, _ = jaxbn.batch_norm(x, params, new, training=False)
    assert y.dtype == y_eval.dtype == dtype
    assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)
    expected, mean, var = ref.batch_norm(x, -1, params["scale"], params["bias"], mask)
    allclose(y, expected, tol, "output")
    allclose(new.mean, ref.ema(state.mean, mean, 0.9), tol, "running mean")
    allclose(new.var, ref.ema(state.var, var, 0.9), tol, "running variance")
    allclose(y_eval, ref.normalize(x, new.mean, new.var, -1, params["scale"], params["bias"]),
             tol, "eval output")


def test_complex_training_works_under_strict_promotion():
    """jaxbn promotes explicitly, so complex input trains under conftest's strict promotion
    too (the other complex tests run under standard promotion until this passes)."""
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    x, params = complex_batch(COMPLEX_SHAPE, 0), complex_params(jnp.complex64)
    _, state = jaxbn.init(C, dtype=jnp.complex64)
    with standard():
        expected, expected_state = jaxbn.batch_norm(x, params, state, training=True)
    y, new = jaxbn.batch_norm(x, params, state, training=True)
    assert_close(y, expected)
    jax.tree.map(assert_close, new, expected_state)
    assert_close(jaxbn.nnx.BatchNorm(C, rngs=nnx.Rngs(0))(x).astype(jnp.complex64),
                 jaxbn.batch_norm(x, None, state, training=True)[0])


def test_complex_input_needs_a_complex_running_mean():
    x, params = complex_batch(COMPLEX_SHAPE, 0), complex_params(jnp.complex64)
    _, real_state = jaxbn.init(C)
    with pytest.raises(TypeError, match=r"`state.mean` must be complex .* got float32.*"
                                        r"jaxbn.init\(\(3,\), dtype=jnp.complex64\)"):
        jaxbn.batch_norm(x, params, real_state, training=True)


def _train_then_eval_linen(module, xs, mask):
    """Training steps on ``xs`` from init, then evaluation on ``xs[0]``: each step's output
    and batch_stats, and the eval output."""
    with standard():
        variables = module.init(jax.random.key(0), xs[0], False)
        outputs = []
        for x in xs:
            y, updates = module.apply(variables, x, False, mask=mask, mutable=["batch_stats"])
            variables = {**variables, **updates}
            outputs.append((y, updates["batch_stats"]))
        outputs.append(module.apply(variables, xs[0], True))
    return outputs


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.complex64])
def test_complex_linen_matches_flax(param_dtype, mask_kind):
    """Three training steps and an eval, against flax.linen's two-pass mode: the same
    outputs, and a running mean that becomes complex after the first training step in both
    (the running variance stays real)."""
    kwargs = {
        "momentum": 0.9,
        "param_dtype": param_dtype,
        "scale_init": nn.initializers.normal(1.0),
        "bias_init": nn.initializers.normal(1.0),
    }
    xs = [complex_batch(COMPLEX_SHAPE, step) for step in range(3)]
    mask = make_mask(mask_kind, COMPLEX_SHAPE)
    ours = _train_then_eval_linen(jaxbn.linen.BatchNorm(**kwargs), xs, mask)
    theirs = _train_then_eval_linen(nn.BatchNorm(use_fast_variance=False, **kwargs), xs, mask)
    first_stats = ours[0][1]
    assert (first_stats["mean"].dtype, first_stats["var"].dtype) == (jnp.complex64, jnp.float32)
    jax.tree.map(assert_close, ours, theirs)


def _train_complex_nnx(steps=3):
    """jaxbn.nnx and flax.nnx trained side by side on complex batches: both layers and the
    float64 EMA of the batch statistics; checks each step as it goes."""
    ours = jaxbn.nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))
    with standard():
        theirs = nnx.BatchNorm(C, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    mean, var = np.zeros(C), np.ones(C)
    for step in range(steps):
        x = complex_batch(COMPLEX_SHAPE, step)
        y = ours(x)
        with standard(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            expected = theirs(x)
        assert any("imaginary part" in str(w.message) for w in caught)
        assert_close(y, expected)
        assert_close(ours.var[...], theirs.var[...])
        assert theirs.mean[...].dtype == jnp.float32
        assert_close(jnp.real(ours.mean[...]), theirs.mean[...])
        _, batch_mean, batch_var = ref.batch_norm(x)
        mean, var = ref.ema(mean, batch_mean, 0.9), ref.ema(var, batch_var, 0.9)
        assert ours.mean[...].dtype == jnp.complex64
        allclose(ours.mean[...], mean)
        allclose(ours.var[...], var)
    return ours, mean, var


def test_complex_nnx_keeps_the_complex_running_mean_that_flax_nnx_drops():
    """Training outputs and running variance as flax.nnx's. Intentional difference: flax.nnx
    stores the complex batch mean into its float32 ``mean`` (a warning, and the imaginary
    part is lost); jaxbn.nnx keeps the complex EMA of the batch means (the float64
    reference's), as flax.linen and jaxbn.linen do."""
    _train_complex_nnx()


def test_complex_nnx_evaluates_with_the_complex_running_mean():
    ours, mean, var = _train_complex_nnx(steps=1)
    ours.eval()
    x = complex_batch(COMPLEX_SHAPE, 9)
    with standard():
        y = ours(x)
    allclose(y, ref.normalize(x, mean, var, -1, ours.scale[...], ours.bias[...]))


def _complex_loss(y, cotangent):
    """A real loss of a complex output, not linear in it."""
    return jnp.sum(jnp.real(y * jnp.conj(cotangent))) + 0.1 * jnp.sum(jnp.abs(y) ** 2)


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.complex64])
def test_complex_gradients_match_flax_two_pass_autodiff(param_dtype, mask_kind):
    """d(real loss)/d(complex x, params) through the pure function and the linen drop-in,
    against JAX's autodiff of flax.linen's two-pass mode."""
    x = complex_batch(COMPLEX_SHAPE, 0)
    cotangent = complex_batch(COMPLEX_SHAPE, 1) - (2.0 - 1.0j)
    mask = make_mask(mask_kind, COMPLEX_SHAPE)
    kwargs = {
        "use_running_average": False,
        "param_dtype": param_dtype,
        "scale_init": nn.initializers.normal(1.0),
        "bias_init": nn.initializers.normal(1.0),
    }
    flax_module = nn.BatchNorm(use_fast_variance=False, **kwargs)
    with standard():
        variables = flax_module.init(jax.random.key(3), x)
    _, state = jaxbn.init(C, dtype=jnp.complex64)

    def module_loss(module):
        def loss(params, x):
            y, _ = module.apply({**variables, "params": params}, x, mask=mask,
                                mutable=["batch_stats"])
            return _complex_loss(y, cotangent)

        return loss

    def pure_loss(params, x):
        y, _ = jaxbn.batch_norm(x, params, state, training=True, mask=mask)
        return _complex_loss(y, cotangent)

    grad = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)  # noqa: E731
    with standard():  # flax promotes implicitly
        expected = grad(module_loss(flax_module))
    ours = [grad(pure_loss), grad(module_loss(jaxbn.linen.BatchNorm(**kwargs)))]
    tol = {"atol": 1e-4, "rtol": 1e-4}
    for got in ours:
        jax.tree.map(lambda a, b: assert_close(a, b, tol), got, expected)


def _synchronized_run(transform, state, mask, split=()):
    """Training synchronized over the axis "batch" of a vmap (4 chunks of the batch) or of a
    shard_map (one chunk per device), as a function of the global ``(x, params)``: the global
    output and each chunk's new state. The ``params`` named in ``split`` are per-example and
    split like ``x``; the others are replicated."""

    def per_device(x, params, mask):
        y, new = jaxbn.batch_norm(x, params, state, training=True, momentum=0.9,
                                  axis_name="batch", mask=mask)
        return y, jax.tree.map(lambda a: a[None], new)

    def specs(params, split_spec, replicated):
        return {key: split_spec if key in split else replicated for key in params}

    if transform == "vmap":
        chunks = 4

        def run(x, params):
            chunk = lambda a: None if a is None else a.reshape(chunks, -1, *a.shape[1:])  # noqa: E731
            split_params = {k: chunk(v) if k in split else v for k, v in params.items()}
            in_axes = (0, specs(params, 0, None), None if mask is None else 0)
            y, new = jax.vmap(per_device, in_axes=in_axes, axis_name="batch")(
                chunk(x), split_params, chunk(mask)
            )
            return y.reshape(x.shape), jax.tree.map(lambda a: a[:, 0], new)

        return run
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Explicit,))

    def run(x, params):
        param_specs = specs(params, P("batch"), P())
        put = lambda a, spec: None if a is None else jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
        x, mask_ = put(x, P("batch")), put(mask, P("batch"))
        params = {k: put(v, param_specs[k]) for k, v in params.items()}
        return jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("batch"), param_specs, P("batch")),
            out_specs=(P("batch"), P("batch")),
        )(x, params, mask_)

    return run


def _single_run(state, mask):
    """The same training step on one device and the whole batch."""

    def run(x, params):
        y, new = jaxbn.batch_norm(x, params, state, training=True, momentum=0.9, mask=mask)
        return y, jax.tree.map(lambda a: a[None], new)

    return run


def _loss_and_grads(run, x, params, cotangent):
    """``run``'s output and states, and the gradients of ``_complex_loss`` of its output."""

    def loss(x, params):
        y, states = run(x, params)
        return _complex_loss(y, cotangent), (y, states)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, states)), grads = grad(x, params)
    return y, states, grads


@pytest.mark.parametrize("mask_kind", ["full", "random"])
@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_complex_synchronized_training_equals_the_concatenated_batch(transform, mask_kind):
    """Synchronized over a named vmap axis or a shard_map mesh axis: every device's output
    and running statistics are the float64 reference's on the whole batch."""
    x, params = complex_batch(COMPLEX_SHAPE, 0), complex_params(jnp.complex64)
    mask = make_mask(mask_kind, COMPLEX_SHAPE)
    _, state = jaxbn.init(C, dtype=jnp.complex64)
    y, states = jax.jit(_synchronized_run(transform, state, mask))(x, params)
    expected, mean, var = ref.batch_norm(x, -1, params["scale"], params["bias"], mask)
    allclose(y, expected)
    devices = states.mean.shape[0]
    assert devices == (4 if transform == "vmap" else jax.device_count())
    allclose(states.mean, np.broadcast_to(ref.ema(0.0, mean, 0.9), (devices, C)))
    allclose(states.var, np.broadcast_to(ref.ema(1.0, var, 0.9), (devices, C)))


@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_complex_synchronized_gradients_equal_the_concatenated_batch(transform):
    """The gradients of a real loss with respect to complex x and params, synchronized, are
    one device's on the whole batch (which match flax's autodiff, above)."""
    x, params = complex_batch(COMPLEX_SHAPE, 0), complex_params(jnp.complex64)
    cotangent = complex_batch(COMPLEX_SHAPE, 1)
    mask = make_mask("random", COMPLEX_SHAPE)
    _, state = jaxbn.init(C, dtype=jnp.complex64)
    run = _synchronized_run(transform, state, mask)
    y, _, grads = _loss_and_grads(run, x, params, cotangent)
    y_one, _, grads_one = _loss_and_grads(_single_run(state, mask), x, params, cotangent)
    assert_close(y, y_one)
    tol = {"atol": 1e-4, "rtol": 1e-4}
    jax.tree.map(lambda a, b: assert_close(a, b, tol), grads, grads_one)


# --------------------------------------------------------------------------------------------
# No reduction axis: one unbatched example
# --------------------------------------------------------------------------------------------

UNBATCHED_INIT = {"scale_init": nn.initializers.normal(1.0),
                  "bias_init": nn.initializers.normal(1.0)}


def _check_unbatched_step(x, y, stats, bias):
    """flax's arithmetic with statistics over no axis: each value is its own mean and the
    variance is 0, so the output is the bias and the EMA (momentum 0.9, from 0 and 1) takes
    x as the batch mean and 0 as the batch variance."""
    allclose(y, np.broadcast_to(bias, x.shape), {"atol": 1e-6, "rtol": 0})
    allclose(stats["mean"], 0.1 * np.asarray(x))
    allclose(stats["var"], np.full(x.shape, 0.9))


@pytest.mark.parametrize(("shape", "axis"), [((3,), -1), ((2, 3), (0, 1))],
                         ids=["vector", "every-axis-a-feature"])
def test_no_reduction_axis_linen_trains_as_flax(shape, axis):
    """A training call on an input whose every axis is a feature axis (one unbatched example,
    as in flax's test_bind_stateful) normalizes as flax.linen does; evaluation too."""
    x = data(shape, 0)
    results = {}
    for name, module in (
        ("ours", jaxbn.linen.BatchNorm(axis=axis, momentum=0.9, **UNBATCHED_INIT)),
        ("flax", nn.BatchNorm(axis=axis, momentum=0.9, use_fast_variance=False,
                              **UNBATCHED_INIT)),
    ):
        with standard():
            variables = module.init(jax.random.key(0), x, False)
            y, updates = module.apply(variables, x, False, mutable=["batch_stats"])
            y_eval = module.apply({**variables, **updates}, x, True)
        _check_unbatched_step(x, y, updates["batch_stats"], variables["params"]["bias"])
        results[name] = (y, updates, y_eval)
    jax.tree.map(assert_close, results["ours"], results["flax"])


def test_no_reduction_axis_nnx_trains_as_flax():
    x = data((3,), 0)
    ours = jaxbn.nnx.BatchNorm(3, momentum=0.9, **UNBATCHED_INIT, rngs=nnx.Rngs(0))
    with standard():
        theirs = nnx.BatchNorm(3, momentum=0.9, use_fast_variance=False, **UNBATCHED_INIT,
                               rngs=nnx.Rngs(0))
        expected = theirs(x)
    y = ours(x)
    _check_unbatched_step(x, y, {"mean": ours.mean[...], "var": ours.var[...]}, ours.bias[...])
    assert_close(y, expected)
    assert_close(ours.mean[...], theirs.mean[...])
    assert_close(ours.var[...], theirs.var[...])
    ours.eval(), theirs.eval()
    with standard():
        assert_close(ours(x), theirs(x))


def test_no_reduction_axis_masked_out_example_leaves_the_state_unchanged():
    """Intentional difference: the one example masked out is a batch with no valid entry,
    which gives a finite output and leaves the running statistics as they were; flax's
    statistics over no valid entry are NaN."""
    x = data((3,), 0)
    mask = jnp.asarray(False)
    module = jaxbn.linen.BatchNorm(momentum=0.9)
    variables = module.init(jax.random.key(0), x, False)
    y, updates = module.apply(variables, x, False, mask=mask, mutable=["batch_stats"])
    assert np.all(np.isfinite(y))
    jax.tree.map(lambda a, b: assert_close(a, b, {"atol": 0, "rtol": 0}),
                 updates["batch_stats"], variables["batch_stats"])
    with standard():
        _, flax_updates = nn.BatchNorm(momentum=0.9).apply(
            variables, x, False, mask=mask, mutable=["batch_stats"]
        )
    assert np.all(np.isnan(flax_updates["batch_stats"]["mean"]))


def test_pure_function_refuses_to_train_on_one_unbatched_example():
    """The pure function keeps its error: a training call whose every axis is a feature axis
    is almost always a bug (a missing batch axis). Evaluation needs no batch, and a batch
    made of the examples of a named vmap axis is accepted (tests/test_distributed.py)."""
    x = data((3,), 0)
    params, state = jaxbn.init(3)
    with pytest.raises(ValueError, match=r"`axis` -1 makes every axis of `x` \(shape \(3,\)\) "
                                         r"a feature axis, so training has no batch to take "
                                         r"statistics over\. Leave at least one axis out of "
                                         r"`axis`, or pass the `axis_name`"):
        jaxbn.batch_norm(x, params, state, training=True)
    y, same = jaxbn.batch_norm(x, params, state, training=False)
    assert same is state
    allclose(y, ref.normalize(x, state.mean, state.var))


# --------------------------------------------------------------------------------------------
# Conditional batch norm: per-example scale and bias
# --------------------------------------------------------------------------------------------

CONDITIONAL_LAYOUTS = {
    "NHWC": ((6, 3, 2, 4), -1),  # params (6, 1, 1, 4)
    "NC": ((8, 4), -1),  # params (8, 4)
    "NCHW": ((6, 4, 3, 2), 1),  # params (6, 4, 1, 1)
}
# (scale, bias): per-example, feature-shaped, or of x's rank with size 1 on the batch axis.
PARAM_KINDS = {
    "per-example": ("example", "example"),
    "per-example-scale": ("example", "feature"),
    "per-example-bias": ("feature", "example"),
    "shared-rank-n": ("shared", "shared"),
}


def conditional_params(shape, axis, kinds, dtype=np.float32, seed=0):
    """Random ``{"scale", "bias"}`` of the ``kinds`` of PARAM_KINDS."""
    rng = np.random.default_rng(seed)

    def make(kind, center):
        per_example = ref.per_example_shape(shape, axis)
        param_shape = {
            "feature": ref.feature_shape(shape, axis),
            "example": per_example,
            "shared": (1, *per_example[1:]),
        }[kind]
        return jnp.asarray(center + rng.normal(size=param_shape), dtype)

    return {"scale": make(kinds[0], 1.0), "bias": make(kinds[1], 0.0)}


def _train_with_grads(x, params, dy, **kwargs):
    """One jitted training step from init (momentum 0.9): output, new state, and the
    gradients of ``sum(y * dy)`` with respect to x and params."""
    _, state = jaxbn.init(ref.feature_shape(x.shape, kwargs.get("axis", -1)))

    def loss(x, params):
        y, new = jaxbn.batch_norm(x, params, state, training=True, momentum=0.9, **kwargs)
        return jnp.sum(y.astype(jnp.float32) * dy), (y, new)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, new)), (dx, dparams) = grad(x, params)
    return y, new, (dx, dparams["scale"], dparams["bias"])


def _assert_grads_match(got, expected, rtol=1e-4):
    """dx, dscale, dbias within ``rtol`` of the largest expected entry."""
    assert_tree_close(tuple(got), tuple(expected), rtol, "dx, dscale, dbias")


@pytest.mark.parametrize("mask_kind", [None, "random"])
@pytest.mark.parametrize("kinds", list(PARAM_KINDS))
@pytest.mark.parametrize("layout", list(CONDITIONAL_LAYOUTS))
def test_conditional_params_match_float64_reference(layout, kinds, mask_kind):
    """Training with per-example scale and bias: the output, the running statistics (those
    of plain batch norm: the parameters do not enter them), the gradients with respect to x,
    scale and bias (of the parameters' shapes), and evaluation."""
    shape, axis = CONDITIONAL_LAYOUTS[layout]
    x, dy = data(shape, 0), data(shape, 1, loc=0.0, scale=1.0)
    params = conditional_params(shape, axis, PARAM_KINDS[kinds])
    scale, bias = params["scale"], params["bias"]
    mask = make_mask(mask_kind, shape)
    y, new, grads = _train_with_grads(x, params, dy, axis=axis, mask=mask)
    expected, mean, var = ref.batch_norm(x, axis, scale, bias, mask)
    allclose(y, expected, err_msg="output")
    allclose(new.mean, ref.ema(0.0, mean, 0.9), err_msg="running mean")
    allclose(new.var, ref.ema(1.0, var, 0.9), err_msg="running variance")
    _assert_grads_match(grads, ref.grads(x, dy, axis, scale, mask, bias=bias))
    y_eval, _ = jaxbn.batch_norm(x, params, new, training=False, axis=axis)
    allclose(y_eval, ref.normalize(x, new.mean, new.var, axis, scale, bias), err_msg="eval")


def test_conditional_params_shared_by_all_examples_equal_feature_shaped_params():
    """Params of x's rank with size 1 on every reduction axis are the feature-shaped ones."""
    shape, axis = CONDITIONAL_LAYOUTS["NHWC"]
    x, dy = data(shape, 0), data(shape, 1)
    shared = conditional_params(shape, axis, PARAM_KINDS["shared-rank-n"])
    flat = {k: v.reshape(ref.feature_shape(shape, axis)) for k, v in shared.items()}
    y, new, grads = _train_with_grads(x, shared, dy)
    y_flat, new_flat, grads_flat = _train_with_grads(x, flat, dy)
    assert_close(y, y_flat)
    jax.tree.map(assert_close, new, new_flat)
    assert_close(grads[0], grads_flat[0])
    for got, want in zip(grads[1:], grads_flat[1:], strict=True):
        assert_close(got.reshape(want.shape), want)


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("kinds", ["per-example", "per-example-scale"])
def test_conditional_params_with_ghost_batches(kinds, mask_kind):
    """Ghost batches of 4: each group normalized with its own statistics, then each example's
    own scale and bias; the gradients against the reference's group by group."""
    shape, axis = (8, 3, 2, 4), -1
    x, dy = data(shape, 0), data(shape, 1, loc=0.0, scale=1.0)
    params = conditional_params(shape, axis, PARAM_KINDS[kinds])
    scale, bias = params["scale"], params["bias"]
    mask = make_mask(mask_kind, shape)
    y, new, grads = _train_with_grads(x, params, dy, mask=mask, virtual_batch_size=4)
    expected, mean, var = ref.ghost_batch_norm(x, 4, axis, mask, scale=scale, bias=bias)
    allclose(y, expected, err_msg="output")
    allclose(new.mean, ref.ema(0.0, mean, 0.9), err_msg="running mean")
    allclose(new.var, ref.ema(1.0, var, 0.9), err_msg="running variance")
    _assert_grads_match(grads, ref.ghost_grads(x, dy, 4, axis, scale, mask, bias=bias))


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_conditional_params_in_bfloat16(param_dtype):
    """bfloat16 input (and params): the output keeps x's dtype, each gradient its input's;
    against the float64 reference on the very values jaxbn received, within bfloat16
    rounding."""
    shape, axis = CONDITIONAL_LAYOUTS["NHWC"]
    x, dy = data(shape, 0, jnp.bfloat16), data(shape, 1, loc=0.0, scale=1.0)
    params = conditional_params(shape, axis, PARAM_KINDS["per-example"], param_dtype)
    y, new, grads = _train_with_grads(x, params, dy)
    assert y.dtype == jnp.bfloat16 and new.mean.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16, param_dtype, param_dtype]
    exact = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
    scale, bias = exact(params["scale"]), exact(params["bias"])
    expected, mean, var = ref.batch_norm(exact(x), axis, scale, bias)
    allclose(exact(y), expected, BF16_TOL, "output")
    allclose(new.mean, ref.ema(0.0, mean, 0.9), err_msg="running mean")
    allclose(new.var, ref.ema(1.0, var, 0.9), err_msg="running variance")
    _assert_grads_match([exact(g) for g in grads],
                        ref.grads(exact(x), dy, axis, scale, bias=bias), rtol=2e-2)


@pytest.mark.parametrize(
    ("transform", "split"),
    [
        ("vmap", ("scale", "bias")),
        ("vmap", ("scale",)),
        ("shard_map", ("scale", "bias")),
        ("shard_map", ("scale",)),
    ],
    ids=["vmap", "vmap-feature-bias", "shard_map", "shard_map-feature-bias"],
)
def test_conditional_params_synchronized_equal_the_concatenated_batch(transform, split):
    """Per-example params split over the devices with the batch (a feature-shaped bias
    replicated): output and gradients are the float64 reference's on the whole batch."""
    shape, axis = (16, 4), -1
    x, dy = data(shape, 0), data(shape, 1, loc=0.0, scale=1.0)
    kinds = ("example", "example" if "bias" in split else "feature")
    params = conditional_params(shape, axis, kinds)
    scale, bias = params["scale"], params["bias"]
    _, state = jaxbn.init(4)
    mask = make_mask("random", shape)
    run = _synchronized_run(transform, state, mask, split)
    y, states, (dx, dparams) = _loss_and_grads(run, x, params, dy)
    expected, mean, var = ref.batch_norm(x, axis, scale, bias, mask)
    allclose(y, expected, err_msg="output")
    allclose(states.mean, np.broadcast_to(ref.ema(0.0, mean, 0.9), states.mean.shape))
    allclose(states.var, np.broadcast_to(ref.ema(1.0, var, 0.9), states.var.shape))
    # _complex_loss of a real y is sum(y * dy) + 0.1 * sum(y²): its gradient in y is
    # dy + 0.2 * y.
    _assert_grads_match((dx, dparams["scale"], dparams["bias"]),
                        ref.grads(x, np.asarray(dy) + 0.2 * expected, axis, scale, mask,
                                  bias=bias))


@pytest.mark.parametrize(
    ("key", "param_shape"),
    [
        ("scale", (6, 4)),  # per-example, but not of x's rank
        ("scale", (6, 2, 1, 4)),  # x's rank, but 2 does not broadcast to x's 3
        ("bias", (5,)),  # another feature size
    ],
)
def test_conditional_param_shape_errors_name_the_param_and_the_accepted_shapes(key, param_shape):
    x = data((6, 3, 2, 4), 0)
    params, state = jaxbn.init(4)
    params = {**params, key: jnp.ones(param_shape)}
    for training in (True, False):
        with pytest.raises(ValueError, match=(
            rf'`params\["{key}"\]` must have the feature shape \(4,\) of `x` along `axis` '
            rf"\(create it with jaxbn.init\(\(4,\)\)\), or, for per-example \(conditional\) "
            rf"parameters, the rank of `x` and a shape that broadcasts to its shape "
            rf"\(6, 3, 2, 4\), such as \(6, 1, 1, 4\); got shape "
            rf"{re.escape(str(param_shape))}\."
        )):
            jaxbn.batch_norm(x, params, state, training=training)


def test_conditional_param_shape_error_suggests_the_feature_axes_whatever_the_sizes():
    x = jnp.ones((8, 4, 4, 4))
    params, state = jaxbn.init(4)
    with pytest.raises(ValueError, match=r"such as \(8, 1, 1, 4\);"):
        jaxbn.batch_norm(x, {**params, "scale": jnp.ones((8, 4))}, state, training=True)


# --------------------------------------------------------------------------------------------
# Errors in the adapters' own vocabulary
# --------------------------------------------------------------------------------------------

# The core's names, which an adapter's user never wrote.
CORE_WORDS = ("`training`", "`params", 'params["', "`state", "state.", "jaxbn.init(")


def _assert_adapter_words(error: pytest.ExceptionInfo, *names: str) -> None:
    message = str(error.value)
    for word in CORE_WORDS:
        assert word not in message, (word, message)
    for name in names:
        assert name in message, (name, message)


def test_nnx_feature_mismatch_names_num_features_and_the_fix():
    layer = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`num_features`=3 does not match the input: `x` of "
                                         r"shape \(8, 4\) has 4 features along `axis`=-1\. "
                                         r"Build the layer with num_features=4") as error:
        layer(jnp.ones((8, 4)))
    _assert_adapter_words(error)


def test_nnx_several_feature_axes_name_axis_and_num_features():
    layer = jaxbn.nnx.BatchNorm(4, axis=(0, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`axis`=\(0, 1\) names 2 feature axes of `x` "
                                         r"\(shape \(8, 4\)\), but `num_features` describes "
                                         r"1: pass one feature axis") as error:
        layer(jnp.ones((8, 4)))
    _assert_adapter_words(error)


def test_unbound_axis_name_in_an_adapter_does_not_name_the_core_function():
    module = jaxbn.linen.BatchNorm(axis_name="batch")
    x = jnp.ones((8, 4))
    variables = module.init(jax.random.key(0), x, False)
    with pytest.raises(NameError, match=r"`axis_name` 'batch' is not bound here: normalize "
                                        r"inside a transformation that binds it") as error:
        module.apply(variables, x, False, mutable=["batch_stats"])
    assert "batch_norm" not in str(error.value).split("(")[0]


@pytest.mark.parametrize("adapter", ["linen", "nnx"])
def test_traced_use_running_average_names_use_running_average(adapter):
    x = jnp.ones((8, 4))
    if adapter == "linen":
        module = jaxbn.linen.BatchNorm()
        variables = module.init(jax.random.key(0), x, False)

        def call(flag):
            return module.apply(variables, x, flag, mutable=["batch_stats"])
    else:
        layer = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))

        def call(flag):
            return layer(x, use_running_average=flag)

    with pytest.raises(TypeError, match=r"`use_running_average` must be a Python bool \(True: "
                                        r"running statistics; False: batch statistics and an "
                                        r"update\), got .*Tracer.* cannot be a traced value: "
                                        r"pass it as a static argument") as error:
        jax.jit(call)(True)
    _assert_adapter_words(error)


def test_linen_batch_stats_of_another_feature_size_are_named_as_batch_stats():
    x = jnp.ones((8, 4))
    module = jaxbn.linen.BatchNorm()
    variables = module.init(jax.random.key(0), x, False)
    stale = {**variables, "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
    with pytest.raises(ValueError) as error:
        module.apply(stale, x, False, mutable=["batch_stats"])
    _assert_adapter_words(error, "batch_stats")


@pytest.mark.parametrize("attribute", ["mean", "scale"])
def test_nnx_variables_of_another_shape_are_named_as_the_layer_s(attribute):
    layer = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    getattr(layer, attribute).set_value(jnp.ones(3))
    with pytest.raises(ValueError) as error:
        layer(jnp.ones((8, 4)))
    _assert_adapter_words(error, f"`{attribute}`")

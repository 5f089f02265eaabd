"""flax's own BatchNorm tests, with the drop-ins in place of flax's modules.

From the flax 0.12.8 repository (its tests are not in the wheel): same inputs, same
assertions, each test named after the one it mirrors, whose file and name its docstring gives:

- ``tests/linen/linen_test.py::NormalizationTest``: ``test_batch_norm``,
  ``test_batch_norm_complex`` (each with and without a mask), ``test_batch_norm_multi_init``;
- ``tests/linen/linen_module_test.py::ModuleTest::test_bind_stateful`` (``Module.bind`` with a
  BatchNorm on an unbatched input);
- ``tests/nnx/nn/normalization_test.py::TestLinenConsistency``:
  ``test_nnx_linen_batchnorm_equivalence`` and ``test_nnx_linen_spectralnorm_equivalence``
  (an ``nnx.BatchNorm`` inside the spectral-normalized ``Sequential``).

Each also runs flax's modules on the same input and compares. Where jaxbn intentionally differs
from flax, the test asserts jaxbn's behaviour and says so: a feature with no valid entry gives a
finite output and keeps its running statistics (flax: NaN). Flax does not run under the strict
dtype promotion conftest.py sets, so these tests run under ``standard()``.
"""

from __future__ import annotations

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parity import BF16_TOL, TOL, standard
from flax import nnx

import jaxbn.linen
import jaxbn.nnx


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
    # NaN where flax has NaN (the masked x); the same dtypes and shapes.
    chex.assert_trees_all_close((y, ema), (flax_y, flax_ema), strict=True, **TOL)


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
        chex.assert_trees_all_close(bs_1, bs_2)
        results[name] = (y3, bs_1)
    chex.assert_trees_all_close(results["ours"], results["flax"], strict=True, **TOL)


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
    chex.assert_tree_all_finite(linen_out)
    if not masked:
        chex.assert_trees_all_close(linen_out, flax_out, strict=True, **tol)
        chex.assert_trees_all_close(norm_stats, flax_stats, strict=True, **TOL)
        return
    assert np.all(np.isnan(flax_out))  # flax: NaN statistics for the empty features
    kept = EQUIVALENCE_MASK
    for name, initial in (("mean", 0.0), ("var", 1.0)):
        assert np.all(np.isnan(flax_stats[name][~kept]))
        np.testing.assert_array_equal(norm_stats[name][~kept], initial)
        chex.assert_trees_all_close(norm_stats[name][kept], flax_stats[name][kept],
                                    strict=True, **TOL)


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


@pytest.mark.default_codegen
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
    chex.assert_trees_all_close(linen_out, flax_out, strict=True,
                                **(BF16_TOL if dtype == jnp.float16 else TOL))



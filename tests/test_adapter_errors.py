"""Errors raised through the adapters speak the adapter's vocabulary (``num_features``,
``use_running_average``, ``batch_stats``, the layer's attributes), never the core's
(``training``, ``params``, ``state``, ``jaxbn.init``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxbn.linen
import jaxbn.nnx

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

"""jaxbn.equinox.BatchNorm against equinox 0.13's BatchNorm and a float64 numpy truth.

Training outputs and gradients equal equinox's ``mode="batch"`` (the mode whose training
output is plain batch norm). The running statistics are checked against the float64 truth,
not against equinox: equinox's ``mode="batch"`` debiases a variance that started at 1 as if
it had started at 0 (shown below as a negative control), and its ``mode="ema"`` normalizes
training batches with a blend of running and batch statistics.
"""

from __future__ import annotations

import _reference as ref
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn.equinox import BatchNorm

TOL = {"rtol": 2e-5, "atol": 2e-5}
EPS = 1e-5


def standard():
    """equinox's BatchNorm does not run under the strict dtype promotion of conftest.py."""
    return jax.numpy_dtype_promotion("standard")


def data(shape, seed=0, loc=2.0, scale=3.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(loc + scale * rng.standard_normal(shape), jnp.float32)


def batched(layer, axis_name="batch", **kwargs):
    """``layer`` mapped over the leading batch axis of ``x``, as equinox's docs do."""
    return jax.vmap(
        lambda x, state: layer(x, state, **kwargs),
        axis_name=axis_name,
        in_axes=(0, None),
        out_axes=(0, None),
    )


def with_affine(layer, weight, bias):
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, bias))


def reference(x, weight=None, bias=None, mask=None, channel_axis=1):
    """float64 batch norm of a batch ``x`` of examples: ``(y, mean, biased var)``, from the
    tests' reference (tests/_reference.py) with equinox's channel axis.

    The statistics of channel ``c`` are over every entry of ``x[..., c, ...]`` that
    ``mask`` (broadcast to ``x``) marks valid, each entry counted once.
    """
    return ref.batch_norm(x, channel_axis, weight, bias, mask, EPS)


def stats_of(layer, state):
    return state.get(layer.state_index)


def assert_same_state(actual, expected):
    """Same structure, shapes, dtypes and values (vmap rebuilds the State object)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert jax.typeof(a) == jax.typeof(b)
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Parity with equinox in training
# ----------------------------------------------------------------------------------------------


# Channels alone with weight and bias is tests/test_autodiff.py's equinox float32 problem.
@pytest.mark.parametrize(
    ("spatial", "affine"), [((), False), ((5,), True), ((5,), False), ((3, 4), True),
                            ((3, 4), False)],
)
def test_training_output_and_gradients_equal_equinox(spatial, affine):
    x = data((6, 3, *spatial))
    cotangent = data(x.shape, seed=1, loc=0.0, scale=1.0)
    weight, bias = data((3,), seed=2), data((3,), seed=3)
    ours, our_state = eqx.nn.make_with_state(BatchNorm)(
        3, "batch", channelwise_affine=affine, mode="batch"
    )
    theirs, their_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", channelwise_affine=affine, mode="batch"
    )

    def loss(x, weight, bias, layer, state):
        if affine:
            layer = with_affine(layer, weight, bias)
        y, _ = batched(layer)(x, state)
        return jnp.sum(y * cotangent), y

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    our_grads, our_y = grad(x, weight, bias, ours, our_state)
    with standard():
        their_grads, their_y = grad(x, weight, bias, theirs, their_state)
    np.testing.assert_allclose(our_y, their_y, **TOL)
    np.testing.assert_allclose(our_y, reference(x, *((weight, bias) if affine else ()))[0], **TOL)
    names = ("x", "weight", "bias") if affine else ("x",)
    for name, ours_g, theirs_g in zip(names, our_grads, their_grads, strict=False):
        np.testing.assert_allclose(ours_g, theirs_g, rtol=1e-4, atol=1e-4, err_msg=name)


def test_mlp_training_with_optax_equals_equinox():
    """Linear -> BatchNorm -> relu -> Linear, five adam steps: the same losses as equinox's
    BatchNorm(mode="batch"), whose training is plain batch norm too."""

    def make(norm):
        keys = jax.random.split(jax.random.key(0), 2)
        return eqx.nn.Sequential([
            eqx.nn.Linear(4, 8, key=keys[0]),
            norm(8, "batch", momentum=0.9, mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(8, 1, key=keys[1]),
        ])

    x, target = data((16, 4), seed=4), data((16, 1), seed=5, loc=0.0)
    optimizer = optax.adam(1e-2)

    def loss_fn(model, state):
        pred, state = batched(model)(x, state)
        return jnp.mean((pred - target) ** 2), state

    @eqx.filter_jit
    def step(model, state, opt_state):
        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    def train(norm):
        model, state = eqx.nn.make_with_state(make)(norm)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        losses = []
        for _ in range(5):
            model, state, opt_state, loss = step(model, state, opt_state)
            losses.append(float(loss))
        return model, state, losses

    with standard():  # optax's adam does not run under strict promotion either
        model, state, losses = train(BatchNorm)
        _, _, their_losses = train(eqx.nn.BatchNorm)
    np.testing.assert_allclose(losses, their_losses, rtol=1e-4)
    assert losses[-1] < losses[0]
    assert int(stats_of(model.layers[1], state).count) == 5


# ----------------------------------------------------------------------------------------------
# Running statistics: correct debiasing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "ema", "legacy"])
def test_one_training_step_gives_the_batch_statistics_in_inference(mode):
    x = data((8, 3, 5))
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", momentum=0.9, mode=mode)
    _, state = batched(layer)(x, state)
    y_eval, same = batched(eqx.nn.inference_mode(layer))(x, state)
    want_y, mean, var = reference(x)
    np.testing.assert_allclose(stats_of(layer, state).mean, mean, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).var, var, **TOL)
    np.testing.assert_allclose(y_eval, want_y, **TOL)
    assert_same_state(same, state)


def test_equinox_batch_mode_does_not_debias_the_variance_negative_control():
    """equinox's hidden variance starts at 1 and is divided by 1 - 0.9 after one step:
    inference uses 9 + the batch variance, so it does not reproduce the batch's output."""
    x = data((8, 3, 5))
    with standard():
        theirs, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            3, "batch", momentum=0.9, mode="batch"
        )
        _, state = batched(theirs)(x, state)
        y_eval, _ = batched(eqx.nn.inference_mode(theirs))(x, state)
    want_y, mean, var = reference(x)
    np.testing.assert_allclose(
        y_eval, ref.normalize(x, mean, 9.0 + var, axis=1, eps=EPS), **TOL
    )
    assert np.max(np.abs(np.asarray(y_eval) - want_y)) > 0.5


def test_zero_debiased_ema_over_three_steps():
    """After k steps each statistic is Σ_i w_i batch_i with the zero-debiased weights
    w_k = (1-m)/(1-m**k) applied recursively (the first batch has weight 1)."""
    momentum = 0.9
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", momentum=momentum, mode="batch")
    run = jax.jit(batched(layer))
    mean, var = np.zeros(3), np.ones(3)
    for k in range(1, 4):
        x = data((8, 3, 2), seed=k, loc=float(k))
        _, state = run(x, state)
        _, batch_mean, batch_var = reference(x)
        w = (1 - momentum) / (1 - momentum**k)
        mean, var = (1 - w) * mean + w * batch_mean, (1 - w) * var + w * batch_var
    np.testing.assert_allclose(stats_of(layer, state).mean, mean, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).var, var, **TOL)
    assert int(stats_of(layer, state).count) == 3


def test_ema_mode_trains_with_the_batch_statistics_unlike_equinox():
    """At the second step equinox's "ema" mode normalizes with a blend of the running and the
    batch statistics; ours (every mode) normalizes with the batch's own."""
    first, second = data((8, 3, 2), seed=1), data((8, 3, 2), seed=2, loc=-4.0)
    ours, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", momentum=0.9, mode="ema")
    _, state = batched(ours)(first, state)
    y, _ = batched(ours)(second, state)
    np.testing.assert_allclose(y, reference(second)[0], **TOL)
    with standard():
        theirs, their_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            3, "batch", momentum=0.9, mode="ema"
        )
        _, their_state = batched(theirs)(first, their_state)
        their_y, _ = batched(theirs)(second, their_state)
    assert np.max(np.abs(np.asarray(their_y) - reference(second)[0])) > 0.5


# ----------------------------------------------------------------------------------------------
# Synchronization over named axes, and masks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis_name", [("outer", "inner"), ["outer", "inner"]])
def test_nested_named_axes_equal_the_float64_reference(axis_name):
    """A (3, 4) grid of examples under two nested vmaps: the statistics span both names."""
    x = data((3, 4, 2, 5))
    layer, state = eqx.nn.make_with_state(BatchNorm)(2, axis_name, mode="batch")
    inner = jax.vmap(layer, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))
    y, state = outer(x, state)
    want_y, mean, var = reference(x.reshape(12, 2, 5))
    np.testing.assert_allclose(y.reshape(12, 2, 5), want_y, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).mean, mean, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).var, var, **TOL)


def test_unbatched_feature_vectors_reduce_over_the_named_axis_only():
    x = data((10, 4))
    layer, state = eqx.nn.make_with_state(BatchNorm)(4, "batch", mode="batch")
    y, state = batched(layer)(x, state)
    want_y, mean, var = reference(x)
    np.testing.assert_allclose(y, want_y, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).mean, mean, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).var, var, **TOL)


def test_masks_weight_entries_by_their_true_count():
    """Per-example and elementwise masks, under two nested named axes whose outer slots hold
    different numbers of valid entries: each valid entry counts once."""
    x = data((3, 4, 2, 5))
    rng = np.random.default_rng(7)
    mask = rng.random(x.shape) < 0.6
    mask[0, :3] = False  # the first outer slot has one valid example left
    mask[2] = True
    layer, state = eqx.nn.make_with_state(BatchNorm)(2, ("outer", "inner"), mode="batch")

    def call(x, state, mask):
        return layer(x, state, mask=mask)

    inner = jax.vmap(call, axis_name="inner", in_axes=(0, None, 0), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="outer", in_axes=(0, None, 0), out_axes=(0, None))
    y, state = outer(x, state, jnp.asarray(mask))
    want_y, mean, var = reference(x.reshape(12, 2, 5), mask=mask.reshape(12, 2, 5))
    np.testing.assert_allclose(y.reshape(12, 2, 5), want_y, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).mean, mean, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).var, var, **TOL)
    # Weighting the outer slots equally (as flax weights devices) gives another mean.
    equal_weights = np.mean([reference(x[i], mask=mask[i])[1] for i in range(3)], axis=0)
    assert np.max(np.abs(equal_weights - mean)) > 0.1


def test_pmap_over_devices_weights_devices_by_their_valid_count():
    """pmap over 4 devices, vmap over 2 examples each, device 0 with one valid example."""
    x = data((4, 2, 3, 5))
    keep = np.ones((4, 2), bool)
    keep[0, 0] = False
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, ("devices", "batch"), mode="batch")
    per_device = jax.vmap(
        lambda x, state, keep: layer(x, state, mask=keep),
        axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None),
    )
    run = jax.pmap(
        per_device, axis_name="devices", in_axes=(0, None, 0), out_axes=(0, None),
        devices=jax.devices()[:4],
    )
    y, state = run(x, state, jnp.asarray(keep))
    flat_keep = keep.reshape(8)
    _, mean, var = reference(np.asarray(x).reshape(8, 3, 5)[flat_keep])
    np.testing.assert_allclose(stats_of(layer, state).mean, mean, **TOL)
    np.testing.assert_allclose(stats_of(layer, state).var, var, **TOL)
    want_y = ref.normalize(x, mean, var, axis=-2, eps=EPS)
    np.testing.assert_allclose(y, want_y, **TOL)


def test_scalar_mask_leaves_an_example_out():
    x = data((6, 3))
    keep = jnp.asarray([True, True, False, True, True, False])
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    run = jax.vmap(
        lambda x, state, keep: layer(x, state, mask=keep),
        axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None),
    )
    y, state = run(x, state, keep)
    _, mean, var = reference(np.asarray(x)[np.asarray(keep)])
    np.testing.assert_allclose(stats_of(layer, state).mean, mean, **TOL)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, axis=1, eps=EPS), **TOL)


# ----------------------------------------------------------------------------------------------
# equinox's machinery: make_with_state, inference_mode, jit, ensembles, serialization
# ----------------------------------------------------------------------------------------------


def test_make_with_state_holds_batch_stats():
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch")
    stats = stats_of(layer, state)
    assert isinstance(stats, jaxbn.BatchStats)
    np.testing.assert_array_equal(stats.mean, np.zeros(3))
    np.testing.assert_array_equal(stats.var, np.ones(3))
    assert stats.mean.dtype == jnp.float32 and int(stats.count) == 0
    assert layer.mode == "ema"  # "legacy" is stored as equinox stores it, and does not warn
    again, _ = eqx.nn.make_with_state(BatchNorm)(3, "batch")
    assert again.state_index.marker == layer.state_index.marker


def test_inference_mode_and_the_call_override():
    x = data((8, 3, 2))
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    frozen = eqx.nn.inference_mode(layer)
    assert frozen.inference is True
    assert eqx.nn.inference_mode(frozen, value=False).inference is False
    y_frozen, same = batched(frozen)(x, state)
    y_override, same_again = batched(layer, inference=True)(x, state)
    assert_same_state(same, state)
    assert_same_state(same_again, state)
    # The initial running statistics: mean 0, variance 1.
    expected = ref.normalize(x, np.zeros(3), np.ones(3), axis=1, eps=EPS)
    np.testing.assert_allclose(y_frozen, expected, **TOL)
    np.testing.assert_array_equal(y_frozen, y_override)
    # Inference needs no named axis: one example on its own.
    y_one, _ = frozen(x[0], state)
    np.testing.assert_array_equal(y_one, y_frozen[0])
    _, trained = batched(frozen, inference=False)(x, state)
    assert int(stats_of(layer, trained).count) == 1


def test_jit_filter_jit_and_closures_agree():
    x = data((8, 3, 2))
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    y_eager, s_eager = batched(layer)(x, state)
    y_filter, s_filter = eqx.filter_jit(lambda m, x, s: batched(m)(x, s))(layer, x, state)
    y_closed, s_closed = jax.jit(batched(layer))(x, state)
    for y, s in ((y_filter, s_filter), (y_closed, s_closed)):
        np.testing.assert_allclose(y, y_eager, **TOL)
        np.testing.assert_allclose(stats_of(layer, s).var, stats_of(layer, s_eager).var, **TOL)


def test_ensemble_of_states_under_an_unnamed_outer_vmap():
    """As in equinox's own tests: an outer vmap without a name gives one state per member."""
    x = data((4, 6, 3))  # (members, batch, channels)
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    y, states = jax.vmap(batched(layer), in_axes=(0, None), out_axes=(0, 0))(x, state)
    assert stats_of(layer, states).mean.shape == (4, 3)
    for member in range(4):
        want_y, mean, _ = reference(x[member])
        np.testing.assert_allclose(y[member], want_y, **TOL)
        np.testing.assert_allclose(stats_of(layer, states).mean[member], mean, **TOL)


def test_weight_and_bias_load_from_an_equinox_checkpoint(tmp_path):
    """The model's leaves (weight, bias, axis_name, inference) line up with equinox's; the
    states do not (see the docstring of jaxbn.equinox.BatchNorm)."""
    theirs, _ = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    theirs = with_affine(theirs, data((3,), seed=1), data((3,), seed=2))
    eqx.tree_serialise_leaves(tmp_path / "bn.eqx", theirs)
    like, _ = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    ours = eqx.tree_deserialise_leaves(tmp_path / "bn.eqx", like)
    np.testing.assert_array_equal(ours.weight, theirs.weight)
    np.testing.assert_array_equal(ours.bias, theirs.bias)


def test_dtypes():
    x16 = data((4, 3)).astype(jnp.bfloat16)
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    y, new_state = batched(layer)(x16, state)
    assert y.dtype == jnp.float32  # promoted with the float32 weight, as equinox does
    narrow, narrow_state = eqx.nn.make_with_state(BatchNorm)(
        3, "batch", mode="batch", dtype=jnp.bfloat16
    )
    y, narrow_state = batched(narrow)(x16, narrow_state)
    assert narrow.weight.dtype == jnp.bfloat16 and y.dtype == jnp.bfloat16
    assert stats_of(narrow, narrow_state).var.dtype == jnp.float32
    assert jax.tree.leaves(jax.tree.map(jax.typeof, state)) == jax.tree.leaves(
        jax.tree.map(jax.typeof, new_state)
    )
    with jax.enable_x64(True):  # equinox's default dtype follows the 64-bit flag
        assert BatchNorm(3, "batch").weight.dtype == jnp.float64
    no_affine, plain = eqx.nn.make_with_state(BatchNorm)(3, "batch", channelwise_affine=False)
    assert no_affine.weight is None and no_affine.bias is None
    assert batched(no_affine)(x16, plain)[0].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# Errors name equinox's arguments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_size": 3.0}, TypeError, r"`input_size` must be a positive int .* got float 3.0"),
        ({"input_size": 0}, ValueError, r"`input_size` must be a positive int .* got 0"),
        ({"axis_name": None}, ValueError, r"`axis_name` must name the batch axis .* got None"),
        ({"axis_name": ()}, TypeError, r"`axis_name` must be a hashable name .* got \(\)"),
        ({"axis_name": [{}]}, TypeError, r"`axis_name` must be a hashable name .* got \[\{\}\]"),
        ({"eps": 0.0}, ValueError, r"`eps` must be a number > 0 .* got 0.0"),
        ({"eps": "small"}, ValueError, r"`eps` must be a number > 0 .* got 'small'"),
        ({"channelwise_affine": 1}, TypeError, r"`channelwise_affine` must be a bool .* int 1"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must lie in \[0, 1\) .* got 1.0"),
        ({"mode": "running"}, ValueError, r"`mode` must be 'batch', 'ema' or 'legacy'.*'running'"),
        ({"inference": "yes"}, TypeError, r"`inference` must be a Python bool .* str 'yes'"),
        ({"dtype": jnp.int32}, TypeError, r"`dtype` must be a floating dtype .* int32"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    arguments = {"input_size": 3, "axis_name": "batch", **kwargs}
    with pytest.raises(error, match=match):
        BatchNorm(**arguments)


def test_call_errors():
    layer, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(ValueError, match=r"`x` must have shape \(input_size, \*spatial\) = "
                       r"\(3, \.\.\.\) .* `input_size`=3.* got shape \(4, 5\)\. .* input_size=4"):
        batched(layer)(data((8, 4, 5)), state)
    with pytest.raises(ValueError, match=r"`x` must have shape .* got shape \(\)\."):
        batched(layer)(data((8,)), state)
    widened = eqx.tree_at(lambda m: m.weight, layer, jnp.ones(4))
    with pytest.raises(ValueError, match=r"`weight` must have shape \(input_size,\) = \(3,\), "
                       r"got shape \(4,\)"):
        batched(widened)(data((8, 3)), state)
    widened = eqx.tree_at(lambda m: m.bias, layer, jnp.ones((3, 1)))
    with pytest.raises(ValueError, match=r"`bias` must have shape .* got shape \(3, 1\)"):
        batched(widened)(data((8, 3)), state)
    with pytest.raises(NameError, match=r"`axis_name` 'batch' of BatchNorm is not bound: .*"
                       r"jax.vmap\(\.\.\., axis_name='batch'"):
        layer(data((3,)), state)
    with pytest.raises(TypeError, match=r"`inference` must be a Python bool .* eqx.filter_jit"):
        jax.jit(lambda x, s, flag: batched(layer, inference=flag)(x, s))(
            data((8, 3)), state, False
        )
    _, other_state = eqx.nn.make_with_state(eqx.nn.Sequential)([BatchNorm(3, "batch")])
    with pytest.raises(ValueError, match=r"`state` holds no running statistics for this "
                       r"BatchNorm \(its `state_index` is 'BatchNorm.state_index'\): .* "
                       r"eqx.nn.make_with_state"):
        batched(layer)(data((8, 3)), other_state)
    with pytest.raises(TypeError, match=r"`x` must have a floating dtype"):
        batched(layer)(jnp.ones((8, 3), jnp.int32), state)

"""What every drop-in promises against the layer it replaces, one parametrized set over the
adapters: ``jaxbn.linen.BatchNorm`` against ``flax.linen.BatchNorm``, ``jaxbn.nnx.BatchNorm``
against ``flax.nnx.BatchNorm``, and ``jaxbn.equinox.BatchNorm`` against
``equinox.nn.BatchNorm`` where the test applies to it (its constructor; equinox's peer has no
mask and debiases its running statistics differently, so its numbers are tested against the
float64 reference in tests/test_equinox.py).

Both layers are built with the same arguments and seed and fed the same batches (flax in its
accurate mode, ``use_fast_variance=False``, but in the test of its default mode). Flax does not
run under the strict dtype promotion conftest.py sets, so the parity tests run both sides under
``standard()``; ``test_works_under_strict_promotion`` runs jaxbn alone under strict promotion.
What only one framework has (linen's dataclass fields and ``merge_param``, nnx's
``.train()``/``.eval()``, ``nnx.view``, metadata) is tested in tests/test_linen.py and
tests/test_nnx.py.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _parity import BF16_EVAL_TOL, BF16_TOL, EXTRA_ARGS, TOL, batches, make_mask, standard
from flax import nnx

import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx

C = 6
ROW_SHAPE = (16, C)  # (N, C), feature axis -1
NCHW_SHAPE = (4, C, 2, 5)  # feature axis 1, or axes (1, 2)
SHAPE_FOR_AXIS = {-1: ROW_SHAPE, 1: NCHW_SHAPE, (1, 2): NCHW_SHAPE}
STEPS = 3

data = batches(1234)


class Linen:
    """A linen module and its variables, trained and evaluated one call at a time."""

    def __init__(self, cls: type, x: jax.Array, **kwargs: Any) -> None:
        self.layer = cls(**kwargs)
        self.variables = self.layer.init(jax.random.key(7), x, use_running_average=False)

    def train(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        y, updates = self.layer.apply(self.variables, x, use_running_average=False, mask=mask,
                                       mutable=["batch_stats"])
        self.variables = {**self.variables, **updates}
        return y

    def evaluate(self, x: jax.Array) -> jax.Array:
        return self.layer.apply(self.variables, x, use_running_average=True)

    def stats(self) -> Any:
        return self.variables["batch_stats"]

    def state(self) -> Any:
        """Every variable: params and batch_stats."""
        return self.variables

    def load(self, other: Linen) -> None:
        self.variables = other.variables

    @staticmethod
    def call_with_mode_unset(cls: type, x: jax.Array) -> None:
        cls().init(jax.random.key(0), x)


class Nnx:
    """An nnx layer, trained after ``.train()`` and evaluated after ``.eval()``."""

    def __init__(self, cls: type, x: jax.Array, *, axis: int = -1, **kwargs: Any) -> None:
        self.layer = cls(x.shape[axis], axis=axis, **kwargs, rngs=nnx.Rngs(params=0))

    def train(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        self.layer.train()
        return self.layer(x, mask=mask)

    def evaluate(self, x: jax.Array) -> jax.Array:
        self.layer.eval()
        return self.layer(x)

    def stats(self) -> Any:
        return {"mean": self.layer.mean[...], "var": self.layer.var[...]}

    def state(self) -> Any:
        """Every variable, with its type (Param, BatchStat) and metadata in the treedef."""
        return nnx.state(self.layer)

    def load(self, other: Nnx) -> None:
        nnx.update(self.layer, nnx.state(other.layer))

    @staticmethod
    def call_with_mode_unset(cls: type, x: jax.Array) -> None:
        cls(x.shape[-1], use_running_average=None, rngs=nnx.Rngs(0))(x)


class Dropin(NamedTuple):
    ours: type
    theirs: type
    runner: type | None  # Linen or Nnx; None: the constructor tests only
    extra_args: dict[str, Any]  # ours beyond the peer's constructor
    axes: tuple[int | tuple[int, ...], ...]  # the feature axes the layer takes
    # The eval output with dtype=bfloat16: flax.nnx evaluates in bfloat16 arithmetic (x - mean
    # and the multiply each round to 8 bits, on inputs up to ~12) while jaxbn evaluates in
    # float32 and rounds once; flax.linen rounds once, as jaxbn does.
    bf16_eval_tol: dict[str, float]


DROPINS = {
    "linen": Dropin(jaxbn.linen.BatchNorm, nn.BatchNorm, Linen, EXTRA_ARGS, (-1, 1, (1, 2)),
                    BF16_TOL),
    "nnx": Dropin(jaxbn.nnx.BatchNorm, nnx.BatchNorm, Nnx, EXTRA_ARGS, (-1, 1), BF16_EVAL_TOL),
    "equinox": Dropin(jaxbn.equinox.BatchNorm, eqx.nn.BatchNorm, None, {}, (), BF16_TOL),
}
FLAX = ["linen", "nnx"]
AXIS_IDS = {-1: "axis-1", 1: "axis1", (1, 2): "axis12"}


def pair(adapter: str, x: jax.Array, **kwargs: Any) -> tuple[Any, Any]:
    """Our runner and flax's (in its accurate mode), same arguments, same seed."""
    dropin = DROPINS[adapter]
    assert dropin.runner is not None
    with standard():
        theirs = dropin.runner(dropin.theirs, x, use_fast_variance=False, **kwargs)
        ours = dropin.runner(dropin.ours, x, **kwargs)
    return ours, theirs


def run(runner: Any, xs: list[jax.Array], masks: list[jax.Array | None],
        x_eval: jax.Array) -> tuple[list[jax.Array], list[Any], jax.Array]:
    """Trains on ``xs`` (one call per batch), then evaluates on ``x_eval``: the training
    outputs, the statistics after each step and the eval output. Evaluation leaves the
    statistics alone."""
    ys, stats = [], []
    for x, mask in zip(xs, masks, strict=True):
        ys.append(runner.train(x, mask))
        stats.append(runner.stats())
    y_eval = runner.evaluate(x_eval)
    chex.assert_trees_all_equal(runner.stats(), stats[-1])
    return ys, stats, y_eval


def check_parity(adapter: str, *, axis: int | tuple[int, ...] = -1, mask_kind: str | None = None,
                 x_dtype: Any = jnp.float32, tol: dict[str, float] = TOL,
                 eval_tol: dict[str, float] | None = None, **kwargs: Any) -> None:
    """Three training steps and an eval, ours against flax's: the same initial variables
    (exactly), outputs within ``tol`` (``eval_tol``) and statistics within TOL (float32 whatever
    the input dtype, in both)."""
    shape = SHAPE_FOR_AXIS[axis]
    xs = [data(shape, step, x_dtype) for step in range(STEPS)]
    masks = [make_mask(mask_kind, shape)] * STEPS
    x_eval = data(shape, 99, x_dtype)
    ours, theirs = pair(adapter, xs[0], axis=axis, **kwargs)
    chex.assert_trees_all_equal(ours.state(), theirs.state(), strict=True)
    with standard():
        theirs_out = run(theirs, xs, masks, x_eval)
        ours_out = run(ours, xs, masks, x_eval)
    chex.assert_trees_all_close(ours_out[0], theirs_out[0], strict=True, **tol)
    chex.assert_trees_all_close(ours_out[1], theirs_out[1], strict=True, **TOL)
    chex.assert_trees_all_close(ours_out[2], theirs_out[2], strict=True, **(eval_tol or tol))


# ---------------------------------------------------------------- interface


@pytest.mark.parametrize("adapter", list(DROPINS))
def test_constructor_is_the_peer_s_then_ours_with_the_same_kinds_and_defaults(adapter):
    """The peer's parameters come first, in its order and kinds, so positional construction
    means the same; ours follow, keyword-only, with defaults that give plain batch norm."""
    dropin = DROPINS[adapter]
    ours = inspect.signature(dropin.ours.__init__).parameters
    theirs = inspect.signature(dropin.theirs.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert list(ours)[len(theirs):] == list(dropin.extra_args)
    key = jax.random.key(0)
    for name, param in theirs.items():
        assert ours[name].kind == param.kind, name
        if name in ("scale_init", "bias_init"):
            # Initializers compare by what they produce.
            for shape, dtype in [((3,), jnp.float32), ((2, 4), jnp.bfloat16)]:
                chex.assert_trees_all_equal(ours[name].default(key, shape, dtype),
                                            param.default(key, shape, dtype), strict=True)
        else:
            assert ours[name].default == param.default, name
    for name, default in dropin.extra_args.items():
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert ours[name].default == default, name


@pytest.mark.parametrize("adapter", FLAX)
def test_extra_argument_defaults_reproduce_plain_batch_norm(adapter):
    dropin = DROPINS[adapter]
    x = jax.random.normal(jax.random.key(0), (8, 3))
    explicit = dropin.runner(dropin.ours, x, **EXTRA_ARGS)
    default = dropin.runner(dropin.ours, x)
    chex.assert_trees_all_equal(explicit.state(), default.state(), strict=True)
    chex.assert_trees_all_equal(explicit.train(x), default.train(x), strict=True)
    chex.assert_trees_all_equal(explicit.state(), default.state(), strict=True)


INIT_KWARGS = {
    "default": {},
    "axis1": {"axis": 1},
    "axis12": {"axis": (1, 2)},
    "no-scale": {"use_scale": False},
    "no-affine": {"use_bias": False, "use_scale": False},
    "param16": {"param_dtype": jnp.bfloat16},
    "dtype16": {"dtype": jnp.bfloat16},
    "param16-no-f32-reductions": {"param_dtype": jnp.bfloat16, "force_float32_reductions": False},
    "normal-init": {"scale_init": nn.initializers.normal(1.0),
                    "bias_init": nn.initializers.normal(1.0)},
}


@pytest.mark.parametrize(
    ("adapter", "kwargs"),
    [pytest.param(adapter, kwargs, id=f"{adapter}-{name}")
     for adapter in FLAX for name, kwargs in INIT_KWARGS.items()
     if kwargs.get("axis", -1) in DROPINS[adapter].axes
     and set(kwargs) <= set(inspect.signature(DROPINS[adapter].theirs.__init__).parameters)],
)
def test_init_variables_match_flax(adapter, kwargs):
    """The same variables: names, shapes, dtypes, values (and, in nnx, Variable types and
    metadata); init takes no statistics from its batch (mean 5, variance 9 here)."""
    x = data(SHAPE_FOR_AXIS[kwargs.get("axis", -1)], 0, loc=5.0)
    ours, theirs = pair(adapter, x, **kwargs)
    chex.assert_trees_all_equal(ours.state(), theirs.state(), strict=True)
    stats = ours.stats()
    assert set(stats) == {"mean", "var"}
    chex.assert_trees_all_equal(stats, {"mean": jnp.zeros_like(stats["mean"]),
                                        "var": jnp.ones_like(stats["var"])})


@pytest.mark.parametrize("adapter", FLAX)
def test_use_running_average_unset_everywhere_raises_like_flax(adapter):
    dropin = DROPINS[adapter]
    x = data(ROW_SHAPE, 0)
    with standard(), pytest.raises(Exception) as flax_error:
        dropin.runner.call_with_mode_unset(dropin.theirs, x)
    with pytest.raises(flax_error.type):
        dropin.runner.call_with_mode_unset(dropin.ours, x)


# ---------------------------------------------------------------- numerical parity


@pytest.mark.parametrize("mask_kind", [None, "rows", "full", "random"])
@pytest.mark.parametrize(
    ("adapter", "axis"),
    [pytest.param(adapter, axis, id=f"{adapter}-{AXIS_IDS[axis]}")
     for adapter in FLAX for axis in DROPINS[adapter].axes],
)
def test_train_then_eval_matches_flax_over_axes_and_masks(adapter, axis, mask_kind):
    # Initializers other than the defaults, so that parameters of the wrong shape or axis show.
    check_parity(adapter, axis=axis, mask_kind=mask_kind,
                 scale_init=nn.initializers.normal(0.5), bias_init=nn.initializers.uniform(2.0))


@pytest.mark.parametrize("affine", ["both", "scale", "bias", "none"])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-3])
@pytest.mark.parametrize("momentum", [0.9, 0.99])
@pytest.mark.parametrize("adapter", FLAX)
def test_train_then_eval_matches_flax_over_momentum_epsilon_affine(adapter, momentum, epsilon,
                                                                   affine):
    check_parity(
        adapter,
        mask_kind="rows",
        momentum=momentum,
        epsilon=epsilon,
        use_scale=affine in ("both", "scale"),
        use_bias=affine in ("both", "bias"),
        # Non-trivial parameters, so that a swapped or dropped scale/bias shows.
        scale_init=nn.initializers.normal(1.0),
        bias_init=nn.initializers.normal(1.0),
    )


DTYPE_COMBOS = {
    # name: (x dtype, layer kwargs, whether the output is rounded to bfloat16)
    "x32-p32": (jnp.float32, {}, False),
    # bfloat16 input with float32 params: both compute and return float32, so tight.
    "x16-p32": (jnp.bfloat16, {}, False),
    "dtype16": (jnp.float32, {"dtype": jnp.bfloat16}, True),
    # bfloat16 params with float32 input: the output is float32, computed in float32.
    "param16": (jnp.float32, {"param_dtype": jnp.bfloat16}, False),
    "x16-param16": (jnp.bfloat16, {"param_dtype": jnp.bfloat16}, True),
}


def _output_tols(adapter: str, combo: str) -> tuple[dict[str, float], dict[str, float]]:
    """The tolerances of the training and the eval output."""
    if not DTYPE_COMBOS[combo][2]:
        return TOL, TOL
    return BF16_TOL, DROPINS[adapter].bf16_eval_tol


@pytest.mark.parametrize("mask_kind", [None, "rows"])
@pytest.mark.parametrize("combo", list(DTYPE_COMBOS))
@pytest.mark.parametrize("adapter", FLAX)
def test_dtypes_match_flax(adapter, combo, mask_kind):
    x_dtype, kwargs, _ = DTYPE_COMBOS[combo]
    tol, eval_tol = _output_tols(adapter, combo)
    check_parity(adapter, mask_kind=mask_kind, x_dtype=x_dtype, tol=tol, eval_tol=eval_tol,
                 scale_init=nn.initializers.normal(1.0), **kwargs)


@pytest.mark.parametrize("combo", list(DTYPE_COMBOS))
@pytest.mark.parametrize("adapter", FLAX)
def test_works_under_strict_promotion(adapter, combo):
    """jaxbn promotes explicitly, so it runs under conftest's strict promotion (flax does not):
    a training step and an eval, against flax's under standard promotion."""
    x_dtype, kwargs, _ = DTYPE_COMBOS[combo]
    tol, eval_tol = _output_tols(adapter, combo)
    dropin = DROPINS[adapter]
    x = data(ROW_SHAPE, 0, x_dtype)
    with standard():
        theirs = dropin.runner(dropin.theirs, x, use_fast_variance=False, **kwargs)
        expected = theirs.train(x), theirs.stats(), theirs.evaluate(x)
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    ours = dropin.runner(dropin.ours, x, **kwargs)  # init, too, under strict promotion
    chex.assert_trees_all_close(ours.train(x), expected[0], strict=True, **tol)
    chex.assert_trees_all_close(ours.stats(), expected[1], strict=True, **TOL)
    chex.assert_trees_all_close(ours.evaluate(x), expected[2], strict=True, **eval_tol)


@pytest.mark.parametrize("adapter", FLAX)
def test_matches_flax_fast_variance_on_well_conditioned_data(adapter):
    """flax's default E[x²]-E[x]² is accurate enough when |mean| is not >> std."""
    dropin = DROPINS[adapter]
    xs = [data(ROW_SHAPE, step, loc=0.0, scale=1.0) for step in range(STEPS)]
    x_eval = data(ROW_SHAPE, 99, loc=0.0, scale=1.0)
    with standard():
        theirs = dropin.runner(dropin.theirs, xs[0], momentum=0.9)  # use_fast_variance=True
        ours = dropin.runner(dropin.ours, xs[0], momentum=0.9)
        theirs_out = run(theirs, xs, [None] * STEPS, x_eval)
        ours_out = run(ours, xs, [None] * STEPS, x_eval)
    assert theirs.layer.use_fast_variance
    chex.assert_trees_all_close(ours_out, theirs_out, strict=True, **TOL)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("direction", ["flax-to-jaxbn", "jaxbn-to-flax"])
@pytest.mark.parametrize("adapter", FLAX)
def test_trained_state_loads_into_the_other(adapter, direction):
    """The source's normal-initialized parameters and trained statistics all arrive in a
    target built with default parameters: the same eval output, and one more training step
    from the same state gives the same output and statistics."""
    x = data(ROW_SHAPE, 50)
    ours, theirs = pair(adapter, x, momentum=0.9, scale_init=nn.initializers.normal(1.0))
    fresh_ours, fresh_theirs = pair(adapter, x, momentum=0.9)
    source, target = ((theirs, fresh_ours) if direction == "flax-to-jaxbn"
                      else (ours, fresh_theirs))
    with standard():
        for step in range(STEPS):
            source.train(data(ROW_SHAPE, step))
        target.load(source)
        chex.assert_trees_all_close(target.evaluate(x), source.evaluate(x), strict=True, **TOL)
        chex.assert_trees_all_close(target.train(x), source.train(x), strict=True, **TOL)
    chex.assert_trees_all_close(target.stats(), source.stats(), strict=True, **TOL)


"""flax.linen models with the normalization layer chosen by name.

``norm`` is one of :data:`NORMS`:

- ``none``: no normalization;
- ``bn``: :class:`jaxbn.linen.BatchNorm` (batch statistics in training, running ones in eval,
  synchronized over ``axis_name`` when one is given);
- ``flax-bn``: :class:`flax.linen.BatchNorm` itself, with the same options as ``bn`` (the
  ``overhead`` claim times it against jaxbn);
- ``layer``: :class:`flax.linen.LayerNorm`;
- ``group``: :class:`flax.linen.GroupNorm` with the largest of 8, 4, 2 or 1 groups that
  divides the features;
- ``renorm``: :class:`jaxbn.linen.BatchNorm` with ``use_renorm=True`` (Batch
  Renormalization, Ioffe 2017) and fixed bounds ``r_max=3``, ``d_max=5`` from the first step
  (the paper ramps them up from 1 and 0; with momentum 0.9 the running statistics the
  correction uses settle within a few dozen steps, so no ramp is used here);
- ``ghost``: :class:`jaxbn.linen.BatchNorm` with ghost batches (``virtual_batch_size``,
  Hoffer et al. 2017) of :data:`GHOST_BATCH` examples: in training, the batch (on each
  device) is split into groups of the largest divisor of its size that is <= 8 (8 for any
  multiple of 8), each normalized with its own statistics. For a batch of 8 or fewer, or
  any batch whose largest such divisor is the batch itself, that is plain BN (and is run as
  plain BN). Ghost batches are local, so ``ghost`` never synchronizes over ``axis_name``
  (with data parallelism the running statistics are still averaged by the training loop).

``placement="before"`` puts the norm between the linear map and the activation (Ioffe &
Szegedy); ``"after"`` puts it after the activation (seed 004's tip). Every hidden layer is
``Dense/Conv → [norm] → act → [norm] → [dropout]``; the input to the activation of the last
hidden layer is sown as ``intermediates/preact`` so experiments can watch its distribution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxbn.linen

__all__ = ["ACTIVATIONS", "BATCH_NORMS", "CNN", "GHOST_BATCH", "MLP", "MODELS", "NORMS",
           "BottleneckResNetBlock", "Classifier", "ResNet", "ResNet18", "ResNet50", "ResNetBlock",
           "ghost_size", "make_model"]

NORMS = ("none", "bn", "flax-bn", "layer", "group", "renorm", "ghost")
BATCH_NORMS = ("bn", "flax-bn", "renorm", "ghost")  # the norms with running statistics
GHOST_BATCH = 8  # the largest ghost batch of ``ghost``
RENORM_R_MAX = 3.0
RENORM_D_MAX = 5.0
PLACEMENTS = ("before", "after")
ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}


def _groups(features: int) -> int:
    return next(g for g in (8, 4, 2, 1) if features % g == 0)


def ghost_size(batch: int) -> int:
    """The ghost-batch size of ``ghost`` for a batch of ``batch``: the largest divisor <= 8."""
    return next(k for k in range(min(batch, GHOST_BATCH), 0, -1) if batch % k == 0)


class Norm(nn.Module):
    """The normalization layer named ``kind`` (identity for ``"none"``)."""

    kind: str
    bn_momentum: float = 0.9
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.kind == "none":
            return x
        if self.kind in ("bn", "flax-bn"):  # jaxbn's drop-in, or flax's own (overhead)
            batch_norm = jaxbn.linen.BatchNorm if self.kind == "bn" else nn.BatchNorm
            return batch_norm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                axis_name=self.axis_name,
            )(x)
        if self.kind == "renorm":
            return jaxbn.linen.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                axis_name=self.axis_name,
                use_renorm=True,
                r_max=RENORM_R_MAX,
                d_max=RENORM_D_MAX,
            )(x)
        if self.kind == "ghost":
            size = ghost_size(x.shape[0])
            return jaxbn.linen.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                axis_name=None,  # ghost batches are local: nothing to synchronize
                virtual_batch_size=size if train and size < x.shape[0] else None,
            )(x)
        if self.kind == "layer":
            return nn.LayerNorm()(x)
        if self.kind == "group":
            return nn.GroupNorm(num_groups=_groups(x.shape[-1]))(x)
        raise ValueError(f"Expected `norm` in {NORMS}, got {self.kind!r}.")


class Block(nn.Module):
    """Linear map (``Dense`` or ``Conv``) → norm/activation in the chosen order → dropout."""

    features: int
    norm: str
    placement: str
    activation: str
    dropout: float
    bn_momentum: float
    axis_name: str | None
    conv_kernel: tuple[int, ...] | None = None  # None: Dense
    sow_preact: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.conv_kernel is None:
            h = nn.Dense(self.features)(x)
        else:
            h = nn.Conv(self.features, self.conv_kernel, padding="SAME")(x)
        norm = Norm(self.norm, self.bn_momentum, self.axis_name)
        act = ACTIVATIONS[self.activation]
        if self.placement == "before":
            h = norm(h, train=train)
        if self.sow_preact:
            self.sow("intermediates", "preact", h)
        h = act(h)
        if self.placement == "after":
            h = norm(h, train=train)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return h


class Classifier(nn.Module):
    """The fields :class:`MLP` and :class:`CNN` share: blocks of :class:`Block`, then a linear
    classifier."""

    widths: Sequence[int]  # the blocks' output features: hidden units (MLP) or channels (CNN)
    num_classes: int
    norm: str = "none"  # one of NORMS
    placement: str = "before"  # the norm before or after the activation
    activation: str = "relu"
    dropout: float = 0.0
    bn_momentum: float = 0.9  # EMA decay of the running statistics
    axis_name: str | None = None  # the mesh axis BN synchronizes its statistics over


class MLP(Classifier):
    """Multilayer perceptron: flatten → ``len(widths)`` hidden blocks → linear classifier."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        h = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            h = Block(
                width,
                self.norm,
                self.placement,
                self.activation,
                self.dropout,
                self.bn_momentum,
                self.axis_name,
                sow_preact=i == len(self.widths) - 1,
                name=f"block{i}",
            )(h, train=train)
        return nn.Dense(self.num_classes, name="head")(h)


class CNN(Classifier):
    """Small CNN for 1-D (``(N, L, C)``) or 2-D (``(N, H, W, C)``) inputs.

    Conv blocks of kernel size 3 (``widths`` channels), a 2× average pooling after every
    block but the last while the length allows, global average pooling, linear classifier
    (dropout before it).
    """

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        spatial = x.ndim - 2
        h = x
        for i, channels in enumerate(self.widths):
            h = Block(
                channels,
                self.norm,
                self.placement,
                self.activation,
                0.0,
                self.bn_momentum,
                self.axis_name,
                conv_kernel=(3,) * spatial,
                sow_preact=i == len(self.widths) - 1,
                name=f"block{i}",
            )(h, train=train)
            if i < len(self.widths) - 1 and min(h.shape[1:-1]) >= 4:
                with jax.numpy_dtype_promotion("standard"):  # flax divides by an int
                    h = nn.avg_pool(h, (2,) * spatial, strides=(2,) * spatial)
        h = jnp.mean(h, axis=tuple(range(1, 1 + spatial)))
        if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.num_classes, name="head")(h)


def make_model(
    kind: str,
    *,
    widths: Sequence[int],
    num_classes: int,
    norm: str = "none",
    placement: str = "before",
    activation: str = "relu",
    dropout: float = 0.0,
    bn_momentum: float = 0.9,
    axis_name: str | None = None,
) -> nn.Module:
    """An ``"mlp"`` (``widths`` = hidden widths) or ``"cnn"`` (``widths`` = channels)."""
    if norm not in NORMS:
        raise ValueError(f"Expected `norm` in {NORMS}, got {norm!r}.")
    if placement not in PLACEMENTS:
        raise ValueError(f"Expected `placement` in {PLACEMENTS}, got {placement!r}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"Expected `activation` in {sorted(ACTIVATIONS)}, got {activation!r}.")
    if kind not in MODELS:
        raise ValueError(f"Expected `model` in {tuple(MODELS)}, got {kind!r}.")
    return MODELS[kind](widths=tuple(widths), num_classes=num_classes, norm=norm,
                        placement=placement, activation=activation, dropout=dropout,
                        bn_momentum=bn_momentum, axis_name=axis_name)


MODELS: dict[str, type[Classifier]] = {"mlp": MLP, "cnn": CNN}
ModuleDef = Any  # a module class, or a functools.partial of one


class _ResidualBlock(nn.Module):
    """A residual block: ``act(shortcut(x) + residual(x))``.

    The shortcut is ``x`` itself, or a strided 1x1 conv and a norm where the residual's shape
    differs from ``x``'s (a projection shortcut).
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array]
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.residual(x)
        if x.shape != y.shape:
            x = self.conv(y.shape[-1], (1, 1), self.strides, name="conv_proj")(x)
            x = self.norm(name="norm_proj")(x)
        return self.act(x + y)

    def residual(self, x: jax.Array) -> jax.Array:
        """The residual branch.

        Its last norm's scale starts at zero (Goyal et al. 2017), so that every block starts
        as the identity.
        """
        raise NotImplementedError


class ResNetBlock(_ResidualBlock):
    """The basic residual block: two 3x3 convs (the first with the stride)."""

    def residual(self, x: jax.Array) -> jax.Array:
        """3x3 conv → norm → act → 3x3 conv → norm."""
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        return self.norm(scale_init=nn.initializers.zeros)(y)


class BottleneckResNetBlock(_ResidualBlock):
    """The bottleneck block of ResNet v1.5: 1x1 → 3x3 (with the stride) → 1x1 (4x filters).

    v1.5 puts the stride on the 3x3 conv rather than the first 1x1 (as flax's and
    torchvision's ResNet-50 do).
    """

    def residual(self, x: jax.Array) -> jax.Array:
        """1x1 conv → norm → act → 3x3 conv → norm → act → 1x1 conv → norm."""
        y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.conv(self.filters * 4, (1, 1))(y)
        return self.norm(scale_init=nn.initializers.zeros)(y)


class ResNet(nn.Module):
    """ResNet v1 (v1.5 with the bottleneck block) for NHWC images, with a pluggable norm.

    A 7x7 stride-2 conv and a 3x3 stride-2 max pool, then ``stage_sizes[i]`` blocks of
    ``num_filters * 2**i`` filters per stage (stride 2 in the first block of every stage but
    the first), global average pooling and a linear classifier. ``norm`` is the batch norm
    class, built with flax's ImageNet settings (momentum 0.9, epsilon 1e-5):
    :class:`flax.linen.BatchNorm` or :class:`jaxbn.linen.BatchNorm` give the same network
    with the same variables.

    Example::

      >>> import jax, jax.numpy as jnp, jaxbn.linen
      >>> model = ResNet50(num_classes=10, norm=jaxbn.linen.BatchNorm)
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
      >>> sorted(variables)
      ['batch_stats', 'params']
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable[[jax.Array], jax.Array] = nn.relu
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
            dtype=self.dtype,
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i, conv=conv, norm=norm, act=self.act, strides=strides
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(self.dtype)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)

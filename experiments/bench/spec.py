"""What the benchmark measures: layer shapes, implementations, modes, models and peaks.

Plain data, no jax: the command line reads it before jax is imported.
"""

from __future__ import annotations

__all__ = [
    "ENSEMBLE",
    "IMPLS",
    "MODES",
    "PEAK_BYTES_PER_S",
    "QUICK_SHAPES",
    "RATIOS",
    "SHAPES",
    "STEP_NORMS",
    "Shape",
]

# (label, shape, feature axis, dtype name of x, dtype name of y). Every implementation of a
# row writes the same output dtype: the bfloat16 row is flax's BatchNorm(dtype=bfloat16)
# against jaxbn's, both bfloat16 out; the mixed row is flax's BatchNorm() against
# jaxbn.linen.BatchNorm() on a bfloat16 input with float32 parameters, both float32 out.
Shape = tuple[str, tuple[int, ...], int, str, str]

SHAPES: tuple[Shape, ...] = (
    ("(256,1024)", (256, 1024), -1, "float32", "float32"),
    ("(64,32,32,64)", (64, 32, 32, 64), -1, "float32", "float32"),
    ("(32,56,56,256)", (32, 56, 56, 256), -1, "float32", "float32"),
    ("NCHW (64,64,32,32) axis=1", (64, 64, 32, 32), 1, "float32", "float32"),
    ("(64,32,32,64) bf16", (64, 32, 32, 64), -1, "bfloat16", "bfloat16"),
    ("(64,32,32,64) mixed", (64, 32, 32, 64), -1, "bfloat16", "float32"),
)
QUICK_SHAPES = (SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[5])
IMPLS = ("proxy", "jaxbn", "flax", "flax_two_pass")
# train_fwd_bwd: jax.vjp, the output returned and a cotangent fed back; train_step: jax.grad
# of a scalar loss with respect to x and the parameters, the new state as aux, as a
# training step differentiates a layer (see experiments.bench.layers for the difference).
MODES = ("train_fwd", "train_fwd_bwd", "train_step", "eval")
ENSEMBLE = 4  # members of the ensemble axis that the vmap pass counts map over
# The networks whose training steps are timed and compiled, and the norms each is built with.
# ResNet-50's "none" (every norm the identity) bounds what any batch norm can save there;
# its "converted" is the network written with flax's BatchNorm and run through
# jaxbn.linen.convert_batch_norm, against "jaxbn", the same network built with the drop-in.
# "resnet50_bf16" is ResNet-50 in half precision as flax's ImageNet example runs it: the
# model's dtype bfloat16 (float32 parameters), every BatchNorm given the model's dtype.
STEP_NORMS = {
    "mlp": ("none", "jaxbn", "flax"),
    "resnet50": ("none", "jaxbn", "flax", "converted"),
    "resnet50_bf16": ("none", "jaxbn", "flax"),
}
# The ratios reported wherever the norms compared include both names (numerator, denominator).
RATIOS = (("jaxbn", "flax"), ("jaxbn", "none"), ("flax", "none"), ("converted", "jaxbn"))

# Vendor peak memory bandwidth by ``jax.Device.device_kind``, for the achieved-bandwidth line.
PEAK_BYTES_PER_S = {
    "NVIDIA H200": 4.8e12,
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
}

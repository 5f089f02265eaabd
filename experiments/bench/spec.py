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

Shape = tuple[str, tuple[int, ...], int, str]  # (label, shape, feature axis, dtype name)

SHAPES: tuple[Shape, ...] = (
    ("(256,1024)", (256, 1024), -1, "float32"),
    ("(64,32,32,64)", (64, 32, 32, 64), -1, "float32"),
    ("(32,56,56,256)", (32, 56, 56, 256), -1, "float32"),
    ("NCHW (64,64,32,32) axis=1", (64, 64, 32, 32), 1, "float32"),
    ("(64,32,32,64) bf16", (64, 32, 32, 64), -1, "bfloat16"),
)
QUICK_SHAPES = (SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4])
IMPLS = ("proxy", "jaxbn", "flax", "flax_two_pass")
MODES = ("train_fwd", "train_fwd_bwd", "eval")
ENSEMBLE = 4  # members of the ensemble axis that the vmap pass counts map over
# The networks whose training steps are timed and compiled, and the norms each is built with.
# ResNet-50's "none" (every norm the identity) bounds what any batch norm can save there;
# its "converted" is the network written with flax's BatchNorm and run through
# jaxbn.linen.convert_batch_norm, against "jaxbn", the same network built with the drop-in.
STEP_NORMS = {
    "mlp": ("none", "jaxbn", "flax"),
    "resnet50": ("none", "jaxbn", "flax", "converted"),
}
# The ratios reported wherever the norms compared include both names (numerator, denominator).
RATIOS = (("jaxbn", "flax"), ("jaxbn", "none"), ("flax", "none"), ("converted", "jaxbn"))

# Vendor peak memory bandwidth by ``jax.Device.device_kind``, for the achieved-bandwidth line.
PEAK_BYTES_PER_S = {
    "NVIDIA H200": 4.8e12,
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
}

"""Kernels behind one dispatch. Every op has a torch reference that runs on any device; faster
backends (CPU fast paths, Triton on CUDA) are added behind the same functions."""

from lengthwise.ops.activation import silu_and_mul
from lengthwise.ops.attention import AttentionMetadata, paged_attention
from lengthwise.ops.linear import linear
from lengthwise.ops.norm import rms_norm
from lengthwise.ops.rotary import apply_rotary, rotary_cos_sin, rotary_inv_freq

__all__ = [
    "AttentionMetadata",
    "apply_rotary",
    "linear",
    "paged_attention",
    "rms_norm",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "silu_and_mul",
]

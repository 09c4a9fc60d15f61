"""Fused kernels: the ControlNet zero-conv residual addition (kernels/zero_conv.py), GroupNorm + SiLU
(kernels/groupnorm_silu.py) and bf16 CPU attention (kernels/attention.py).

Importing this package imports torch only; triton and the compiled native modules load on the
first call that needs them.
"""
from kernels.zero_conv import (
    IMPLS,
    combine_residuals,
    fused_zero_conv_add,
    native_available,
    triton_available,
)
from kernels.zero_conv_torch import combine_residuals_torch, zero_conv_add_reference, zero_conv_add_torch
from kernels.groupnorm_silu import GN_IMPLS, group_norm_silu, group_norm_silu_reference, group_norm_silu_torch
from kernels.attention import ATTENTION_IMPLS, attention

__all__ = [
    "ATTENTION_IMPLS",
    "attention",
    "GN_IMPLS",
    "group_norm_silu",
    "group_norm_silu_reference",
    "group_norm_silu_torch",
    "IMPLS",
    "combine_residuals",
    "combine_residuals_torch",
    "fused_zero_conv_add",
    "native_available",
    "triton_available",
    "zero_conv_add_reference",
    "zero_conv_add_torch",
]

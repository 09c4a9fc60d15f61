"""Unfused torch path for the zero-conv residual addition: the reference and the fallback.

This is what the runner did before the fused op existed: one 1x1 conv, one multiply and one add per
ControlNet, each a full pass over memory. Every fused implementation is tested against it (and
against a float64 version of it) and benchmarked against it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _as_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    # Zero convs store (C, Ck, 1, 1); the fused kernels take (C, Ck). Accept both here.
    return weight if weight.dim() == 4 else weight[:, :, None, None]


def zero_conv_add_torch(
    skip: torch.Tensor,
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    scales: Sequence[float | torch.Tensor],
) -> torch.Tensor:
    """skip + sum_k scales[k] * conv1x1(features[k], weights[k], biases[k]), unfused, in skip's dtype."""
    out = skip
    for feature, weight, bias, scale in zip(features, weights, biases, scales, strict=True):
        out = out + F.conv2d(feature, _as_conv_weight(weight), bias) * scale
    return out


def zero_conv_add_reference(skip, features, weights, biases, scales) -> torch.Tensor:
    """The same sum in float64, einsum over channels: the ground truth for tests (slow, exact)."""
    out = skip.double()
    for feature, weight, bias, scale in zip(features, weights, biases, scales, strict=True):
        w = weight.double().reshape(weight.shape[0], weight.shape[1])
        conv = torch.einsum("ck,bkhw->bchw", w, feature.double()) + bias.double()[None, :, None, None]
        out = out + float(scale) * conv
    return out


def combine_residuals_torch(
    residual_lists: Sequence[Sequence[torch.Tensor]],
    scales: torch.Tensor,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """out_i = sum_k scales[k] * residual_lists[k][i], with torch's multi-tensor (_foreach) ops.

    On CUDA each _foreach call is a handful of launches for all 13 tensors, so this costs one
    launch group per net instead of one per tensor. The sum is formed in fp32 and cast back, like
    the fused kernels.
    """
    scales = scales.to(torch.float32)
    acc = torch._foreach_mul([r.float() for r in residual_lists[0]], scales[0])
    for k in range(1, len(residual_lists)):
        torch._foreach_add_(acc, torch._foreach_mul([r.float() for r in residual_lists[k]], scales[k]))
    if out is None:
        return [a.to(r.dtype) for a, r in zip(acc, residual_lists[0])]
    for dst, a in zip(out, acc):
        dst.copy_(a)
    return list(out)

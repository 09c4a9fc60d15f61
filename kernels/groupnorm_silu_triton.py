"""Triton kernels: GroupNorm followed by SiLU, NCHW or channels-last, in two launches.

    y = silu((x - mean_g) * rstd_g * weight[c] + bias[c])      per (batch, group g)

Unfused, torch runs group_norm (read x, write y) then silu (read y, write z): four passes over the
activation. Here: a statistics pass (read x) and an apply pass (read x, write z), three passes and
no temporary. stable-fast found the NHWC form pays in SD's resnets, where this op is ~10% of a step.

Why two launches and not one program per (batch, group): SD1.5 at 512² has B*G = 2*32 = 64 groups,
under half an H100's 132 SMs. So each group's pixels are split into SPLITS chunks; the first kernel
writes each chunk's count, mean and M2 (sum of squared deviations), the second merges them
(Chan et al.'s parallel variance, exact in fp32 where E[x²] - mean² would cancel) and applies.

Layouts through strides: element (b, c, p) is at b*stride_b + c*stride_c + p*stride_p with the pixels
p = h*W + w flattened, which NCHW (stride_p = 1) and channels-last (stride_c = 1) both allow. A tile is
(BLOCK_P pixels, BLOCK_C channels of one group).

Imported only on demand (kernels.groupnorm_silu imports it lazily), so `import kernels` works without
triton installed.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.zero_conv_triton import check_triton_device, interpreting


@triton.jit
def _gn_stats_kernel(
    x_ptr,  # *T: input (B, C, P) through strides
    part_ptr,  # *fp32: (B*G, SPLITS, 3) partial count, mean, M2 per chunk
    C,  # int: channels
    P,  # int: pixels per image, H * W
    CG,  # int: channels per group, C // G
    G,  # int: groups
    chunk,  # int: pixels per split (a multiple of BLOCK_P)
    stride_xb, stride_xc, stride_xp,  # input strides in elements
    SPLITS: tl.constexpr,  # chunks per group
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile, next power of two >= CG
):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CG
    base = x_ptr + b.to(tl.int64) * stride_xb + (g * CG).to(tl.int64) * stride_xc
    count = 0.0
    mean = 0.0
    m2 = 0.0
    p_start = pid_s * chunk
    for p0 in range(p_start, p_start + chunk, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < P)[:, None] & mask_c[None, :]
        x = tl.load(base + offs_p[:, None].to(tl.int64) * stride_xp + offs_c[None, :].to(tl.int64) * stride_xc,
                    mask=mask, other=0.0).to(tl.float32)
        n = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(n, 1.0)
        d = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        # Chan's merge of (count, mean, m2) with the tile's: no E[x²] - mean² cancellation. An empty
        # tile (past P) has n = 0 and changes nothing; max(total, 1) avoids 0/0 for it.
        total = count + n
        delta = tile_mean - mean
        mean = mean + delta * (n / tl.maximum(total, 1.0))
        m2 = m2 + tile_m2 + delta * delta * (count * n / tl.maximum(total, 1.0))
        count = total
    out = part_ptr + (pid_bg * SPLITS + pid_s) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _gn_silu_apply_kernel(
    x_ptr,  # *T: input (B, C, P) through strides
    out_ptr,  # *T: output (B, C, P) through strides; never the same memory as x
    w_ptr,  # *T: GroupNorm weight (C,)
    b_ptr,  # *T: GroupNorm bias (C,)
    part_ptr,  # *fp32: (B*G, SPLITS, 3) from _gn_stats_kernel
    C, P, CG, G, chunk,  # as in _gn_stats_kernel
    eps,  # fp32: GroupNorm epsilon
    stride_xb, stride_xc, stride_xp,  # input strides in elements
    stride_ob, stride_oc, stride_op,  # output strides in elements
    SPLITS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    # Merge every chunk's (count, mean, M2) of this group: SPLITS values, in registers.
    offs_s = tl.arange(0, SPLITS)
    parts = part_ptr + (pid_bg * SPLITS + offs_s) * 3
    counts = tl.load(parts)
    means = tl.load(parts + 1)
    m2s = tl.load(parts + 2)
    total = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / total
    dev = means - mean
    var = (tl.sum(m2s, axis=0) + tl.sum(counts * dev * dev, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CG
    ch = g * CG + offs_c
    w = tl.load(w_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    scale = w * rstd  # y = x * scale + shift, per channel
    shift = bias - mean * scale
    x_base = x_ptr + b.to(tl.int64) * stride_xb
    o_base = out_ptr + b.to(tl.int64) * stride_ob
    p_start = pid_s * chunk
    for p0 in range(p_start, p_start + chunk, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < P)[:, None] & mask_c[None, :]
        x = tl.load(x_base + offs_p[:, None].to(tl.int64) * stride_xp + ch[None, :].to(tl.int64) * stride_xc,
                    mask=mask, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        y = y / (1.0 + tl.exp(-y))  # SiLU
        tl.store(o_base + offs_p[:, None].to(tl.int64) * stride_op + ch[None, :].to(tl.int64) * stride_oc,
                 y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_params(B: int, G: int, CG: int, P: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, SPLITS, chunk) for one call, chosen from the shape (no autotuning).

    A tile holds ~2048 elements (BLOCK_C * BLOCK_P) so registers stay low at any group width; SPLITS
    is the smallest power of two giving ~2 programs per SM, but never a chunk under one tile.
    Under the interpreter every program is a Python call: 16-pixel tiles, two splits beyond one tile,
    so tests still cross tile and split edges on tiny shapes (P = 35: 2 splits of 2 tiles, the last
    partly masked).
    """
    block_c = triton.next_power_of_2(CG)
    if interpreting():
        block_p = 16
        splits = 2 if P > block_p else 1
    else:
        block_p = max(16, min(triton.next_power_of_2(P), 2048 // block_c))
        want = max(1, (2 * sms) // max(1, B * G))
        splits = 1
        while splits < want and splits < 64 and triton.cdiv(P, splits * 2) >= block_p:
            splits *= 2
    chunk = triton.cdiv(triton.cdiv(P, splits), block_p) * block_p
    return block_c, block_p, splits, chunk


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def group_norm_silu_triton(out, x, weight, bias, num_groups: int, eps: float, strides) -> torch.Tensor:
    """Launch both kernels: out = silu(group_norm(x)). Arguments come checked from kernels.groupnorm_silu;
    `strides` maps a 4-D tensor to its (batch, channel, pixel) strides."""
    check_triton_device(x)
    B, C, H, W = x.shape
    P = H * W
    if B == 0 or C == 0 or P == 0:
        return out
    G = num_groups
    CG = C // G
    sms = _sm_count(x.device.index or 0) if x.is_cuda else 4
    block_c, block_p, splits, chunk = launch_params(B, G, CG, P, sms)
    part = torch.empty(B * G, splits, 3, dtype=torch.float32, device=x.device)
    grid = (B * G, splits)
    common = dict(SPLITS=splits, BLOCK_P=block_p, BLOCK_C=block_c)
    _gn_stats_kernel[grid](x, part, C, P, CG, G, chunk, *strides(x), **common)
    _gn_silu_apply_kernel[grid](x, out, weight, bias, part, C, P, CG, G, chunk, float(eps),
                                *strides(x), *strides(out), **common)
    return out

"""Triton kernel: skip + sum over nets of scale * (1x1 zero conv of the net's features), one pass.

Per batch image this is a small GEMM per net, out[c, p] = skip[c, p] + sum_k s_k (W_k[c, :] @ F_k[:, p]
+ b_k[c]), with the pixels p = h * W + w flattened. Both NCHW and channels-last tensors flatten this
way (stride_h == W * stride_w), so one kernel takes either through strides.

Why up to four nets as separate pointer arguments, and not features concatenated along channels:
concatenating would copy every feature map once more before the kernel reads it, which is the very
memory pass the fusion exists to remove. Four covers every multi-ControlNet setup we run; the
launcher chains calls for more (the later calls read `out` as their skip). Scales travel as a
float32 tensor, not pre-multiplied into the weights: scaling the weights would write a fresh copy
of them each call (6.5 MB for a 1280x1280 zero conv, more than the activations at 8x8), and a tensor
lets a captured CUDA graph pick up new scales without being re-captured.

Imported only on demand (kernels.zero_conv imports it lazily), so `import kernels` works without
triton installed.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_NETS_PER_LAUNCH = 4


@triton.jit
def _net_term(
    f_ptr, w_ptr, b_ptr, scale_ptr, ck, C, P, pid_b, offs_c, offs_p,
    stride_fb, stride_fc, stride_fp, stride_wc, stride_wk,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """scale * (W[offs_c, :] @ F[pid_b, :, offs_p] + b[offs_c]) in fp32 for one net, masked at every
    edge. The bias is added once per net, inside the scale."""
    mask_c = offs_c < C
    mask_p = offs_p < P
    part = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    f_base = f_ptr + pid_b.to(tl.int64) * stride_fb
    for k0 in range(0, ck, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < ck
        # Masked-out elements load as 0, so they add nothing to the dot product.
        w = tl.load(
            w_ptr + offs_c[:, None] * stride_wc + offs_k[None, :] * stride_wk,
            mask=mask_c[:, None] & mask_k[None, :],
            other=0.0,
        )
        f = tl.load(
            f_base + offs_k[:, None].to(tl.int64) * stride_fc + offs_p[None, :].to(tl.int64) * stride_fp,
            mask=mask_k[:, None] & mask_p[None, :],
            other=0.0,
        )
        if UPCAST:
            w = w.to(tl.float32)
            f = f.to(tl.float32)
        part = tl.dot(w, f, part, input_precision=DOT_PRECISION)
    bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return tl.load(scale_ptr) * (part + bias[:, None])


@triton.jit
def _zero_conv_add_kernel(
    out_ptr,  # *T: output (B, C, P) through strides; may be the same memory as skip_ptr (in place)
    skip_ptr,  # *T: skip connection (B, C, P) through strides
    f0_ptr, f1_ptr, f2_ptr, f3_ptr,  # *T: features of nets 0..3, (B, Ck_n, P); unused nets repeat net 0
    w0_ptr, w1_ptr, w2_ptr, w3_ptr,  # *T: zero-conv weights of nets 0..3, (C, Ck_n)
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,  # *T: zero-conv biases of nets 0..3, (C,)
    scales_ptr,  # *fp32: (NUM_NETS,) conditioning scale per net
    ck0, ck1, ck2, ck3,  # int: input channels of nets 0..3
    C,  # int: output channels
    P,  # int: pixels per image, H * W
    stride_ob, stride_oc, stride_op,  # out strides in elements
    stride_sb, stride_sc, stride_sp,  # skip strides in elements
    stride_f0b, stride_f0c, stride_f0p,  # features strides of net 0 (likewise nets 1..3)
    stride_f1b, stride_f1c, stride_f1p,
    stride_f2b, stride_f2c, stride_f2p,
    stride_f3b, stride_f3c, stride_f3p,
    stride_w0c, stride_w0k,  # weight strides of net 0 (likewise nets 1..3)
    stride_w1c, stride_w1k,
    stride_w2c, stride_w2k,
    stride_w3c, stride_w3k,
    NUM_NETS: tl.constexpr,  # nets in this launch, 1..4 (unrolled at compile time)
    BLOCK_C: tl.constexpr,  # output channels per program
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_K: tl.constexpr,  # input channels per dot step
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs
    UPCAST: tl.constexpr,  # dot in fp32: the interpreter's bf16 dot returns garbage (triton 3.9)
):
    # Program (pixel block, channel block, batch): pixels vary fastest so neighbouring programs
    # share the same weight rows in cache.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask_p = offs_p < P
    mask = mask_c[:, None] & mask_p[None, :]

    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    # Each net: scale * (W @ F + b); NUM_NETS is a compile-time constant, so the unused terms vanish.
    acc += _net_term(f0_ptr, w0_ptr, b0_ptr, scales_ptr + 0, ck0, C, P, pid_b, offs_c, offs_p,
                     stride_f0b, stride_f0c, stride_f0p, stride_w0c, stride_w0k,
                     BLOCK_C, BLOCK_P, BLOCK_K, DOT_PRECISION, UPCAST)
    if NUM_NETS > 1:
        acc += _net_term(f1_ptr, w1_ptr, b1_ptr, scales_ptr + 1, ck1, C, P, pid_b, offs_c, offs_p,
                         stride_f1b, stride_f1c, stride_f1p, stride_w1c, stride_w1k,
                         BLOCK_C, BLOCK_P, BLOCK_K, DOT_PRECISION, UPCAST)
    if NUM_NETS > 2:
        acc += _net_term(f2_ptr, w2_ptr, b2_ptr, scales_ptr + 2, ck2, C, P, pid_b, offs_c, offs_p,
                         stride_f2b, stride_f2c, stride_f2p, stride_w2c, stride_w2k,
                         BLOCK_C, BLOCK_P, BLOCK_K, DOT_PRECISION, UPCAST)
    if NUM_NETS > 3:
        acc += _net_term(f3_ptr, w3_ptr, b3_ptr, scales_ptr + 3, ck3, C, P, pid_b, offs_c, offs_p,
                         stride_f3b, stride_f3c, stride_f3p, stride_w3c, stride_w3k,
                         BLOCK_C, BLOCK_P, BLOCK_K, DOT_PRECISION, UPCAST)

    # The skip tile is read after the dots and written back by the same program, so out may alias
    # skip: no other program touches these elements.
    b64 = pid_b.to(tl.int64)
    skip = tl.load(skip_ptr + b64 * stride_sb + offs_c[:, None].to(tl.int64) * stride_sc
                   + offs_p[None, :].to(tl.int64) * stride_sp, mask=mask, other=0.0)
    result = skip.to(tl.float32) + acc
    tl.store(out_ptr + b64 * stride_ob + offs_c[:, None].to(tl.int64) * stride_oc
             + offs_p[None, :].to(tl.int64) * stride_op,
             result.to(out_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(tensor: torch.Tensor) -> None:
    """Every Triton launcher's first check: CUDA tensors, or CPU tensors under the interpreter."""
    if not (tensor.is_cuda or interpreting()):
        raise RuntimeError(
            f"impl='triton' got tensors on {tensor.device}; Triton runs on CUDA tensors, or on CPU tensors "
            "only with TRITON_INTERPRET=1 set before triton is imported")


def _autotune_configs() -> list[triton.Config]:
    """Tile shapes tried on the GPU. SD1.5's 13 shapes are C in {320, 640, 1280} x P in {4096..64}."""
    configs = []
    for block_c, block_p, block_k, warps, stages in [
        (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
        (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (64, 32, 64, 4, 4), (32, 64, 64, 4, 4),
    ]:
        configs.append(triton.Config({"BLOCK_C": block_c, "BLOCK_P": block_p, "BLOCK_K": block_k},
                                     num_warps=warps, num_stages=stages))
    return configs


# Under the interpreter every program is a Python call: small fixed tiles keep tests exercising the
# masks (C=40 spans two channel blocks) without autotuning's repeated runs.
_INTERPRETER_BLOCKS = {"BLOCK_C": 32, "BLOCK_P": 32, "BLOCK_K": 16}
# ENGINE_TRITON_FIXED_CONFIG=1: one config, no autotuning (the GPU suite's test runs: each tuned shape
# would otherwise time every config, ~90 compiles over the test files). Read once, when the kernel is built.
FIXED_CONFIG_VARIABLE = "ENGINE_TRITON_FIXED_CONFIG"
_tuned_kernels: dict[bool, object] = {}


def _kernel(in_place: bool):
    """The autotuned kernel on a GPU, built on first use; the plain kernel under the interpreter.

    Autotuning runs each config on the real buffers. In place (out is skip) a config's run would feed
    the next one its result, so that kernel restores out before each (restore_value: a copy of out per
    config tried); out of place nothing needs restoring, and timing the copy would only skew the choice."""
    if interpreting():
        return _zero_conv_add_kernel
    if in_place not in _tuned_kernels:
        configs = _autotune_configs()
        if os.environ.get(FIXED_CONFIG_VARIABLE, "0") not in ("", "0"):
            configs = configs[:1]
        _tuned_kernels[in_place] = triton.autotune(
            configs=configs, key=["C", "P", "ck0", "NUM_NETS"], restore_value=["out_ptr"] if in_place else [],
        )(_zero_conv_add_kernel)
    return _tuned_kernels[in_place]


def zero_conv_add_triton(out, skip, features, weights, biases, scales, strides) -> torch.Tensor:
    """Launch the fused kernel: writes out = skip + sum_k scales[k] * (weights[k] @ features[k] + biases[k]).

    Arguments come checked from kernels.zero_conv: weights are (C, Ck), scales a float32 tensor on
    the device, `strides` maps each 4-D tensor to its (batch, channel, pixel) strides. More than four
    nets are chained, the later launches reading `out` as their skip.
    """
    check_triton_device(skip)
    B, C, H, W = skip.shape
    P = H * W
    if B == 0 or C == 0 or P == 0:
        return out
    fixed = _INTERPRETER_BLOCKS if interpreting() else {}
    precision = "ieee" if skip.dtype == torch.float32 else "tf32"
    current_skip = skip
    for start in range(0, len(features), MAX_NETS_PER_LAUNCH):
        stop = min(start + MAX_NETS_PER_LAUNCH, len(features))
        fs, ws, bs = list(features[start:stop]), list(weights[start:stop]), list(biases[start:stop])
        n = len(fs)
        pad = MAX_NETS_PER_LAUNCH - n
        f_strides = [s for f in fs for s in strides(f)] + list(strides(fs[0])) * pad
        w_strides = [s for w in ws for s in w.stride()] + list(ws[0].stride()) * pad
        cks = [f.shape[1] for f in fs] + [fs[0].shape[1]] * pad
        fs, ws, bs = fs + [fs[0]] * pad, ws + [ws[0]] * pad, bs + [bs[0]] * pad

        def grid(meta):
            return (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]), B)

        kernel = _kernel(in_place=out.data_ptr() == current_skip.data_ptr())
        kernel[grid](
            out, current_skip, *fs, *ws, *bs, scales[start:stop], *cks, C, P,
            *strides(out), *strides(current_skip), *f_strides, *w_strides,
            NUM_NETS=n, DOT_PRECISION=precision, UPCAST=interpreting() and skip.dtype == torch.bfloat16, **fixed,
        )
        current_skip = out
    return out

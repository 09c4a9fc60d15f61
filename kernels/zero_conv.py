"""Public entry points: fused zero-conv residual addition and the multi-tensor residual combine.

    out = skip + sum_k scales[k] * (weights[k] @ features[k] + biases[k])   (1x1 conv over channels)

Each is a `torch.library` custom op (`controlnet_engine::...`) with a fake implementation, so
torch.compile and CUDA graph capture see one opaque op whatever runs inside. Implementations:

- "triton": one kernel, one pass over skip and features (kernels/zero_conv_triton.py). GPU, or CPU
  under TRITON_INTERPRET=1 (tests only: it is slow).
- "native": C++/OpenMP fp32 on CPU, CUDA when built with nvcc (kernels/native.py, kernels/csrc/).
- "torch": the unfused conv -> mul -> add per net (kernels/zero_conv_torch.py).

impl=None picks the best available for the device. ENGINE_DISABLE_TRITON=1 and
ENGINE_DISABLE_NATIVE=1 turn those off (explicitly asking for a disabled one is an error).
Nothing here imports triton or the compiled modules until a call needs them.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

from kernels.zero_conv_torch import combine_residuals_torch, zero_conv_add_torch

IMPLS = ("triton", "native", "torch")
COMBINE_IMPLS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The native CPU kernel becomes the CPU default only where benchmarks/bench_kernels.py shows it beating
# torch's unfused path on a CPU of that instruction-set class (engine.optimizations.cpu_isa). It beats it on
# none measured, so torch on every class, fp32, the 13 SD1.5 points:
# - AVX512-BF16, AMD EPYC Zen 4 (family 25 model 17), quiet, 2 threads: 130.3 ms vs torch's 92.3 (0.71x;
#   benchmarks/results/cpu-sd15-20261125-143549.json), slower at 64x64/32x32, ahead only at 16x16, 8x8.
# - AMX, Intel Xeon (2026-12-01): 0.58x (FACTS.md).
# - AVX2 only, AMD EPYC Zen 3 (family 25 model 1), 1 thread, interleaved rounds on a loaded machine:
#   437.6 ms vs 320.5 (0.73x). At 2 threads on a loaded machine native looks 2.4-2.7x ahead: torch's
#   OpenMP barriers stall whenever a worker is descheduled, which a quiet machine does not show.
# Set "native" here to switch, or pass impl="native".
CPU_DEFAULT_IMPL = "torch"


def _disabled(name: str) -> bool:
    return os.environ.get(f"ENGINE_DISABLE_{name.upper()}", "0") not in ("", "0")


def triton_available() -> bool:
    return not _disabled("triton") and importlib.util.find_spec("triton") is not None


def native_available(device: torch.device) -> bool:
    if _disabled("native"):
        return False
    from kernels import native

    return native.module_for(device) is not None


def pixel_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, channel, pixel) strides of a 4-D tensor whose H and W flatten into one pixel axis.

    True for NCHW and channels-last (stride_h == W * stride_w); None for other views, which only
    the torch implementation takes.
    """
    _, _, h, w = t.shape
    if h == 1:
        return t.stride(0), t.stride(1), t.stride(3)
    if w == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(0), t.stride(1), t.stride(3) if w > 1 else t.stride(2)
    return None


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    s = pixel_strides(t)
    assert s is not None, "layout checked before dispatch"
    return s


def _resolve(impl: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation to run. The engine resolves it once per backend (TorchBackend.__init__) and
    passes it in: a compiled step must not read os.environ or look up modules at each of its ~100
    kernel calls (dynamo guards on every environment read and breaks the graph at importlib), so an
    explicit impl is only name-checked while tracing; its off switch was checked when it was chosen."""
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {IMPLS} or None")
        if torch.compiler.is_compiling():
            return impl
        if impl == "triton" and _disabled("triton"):
            raise RuntimeError("impl='triton' was asked for but ENGINE_DISABLE_TRITON is set")
        if impl == "native" and _disabled("native"):
            raise RuntimeError("impl='native' was asked for but ENGINE_DISABLE_NATIVE is set")
        return impl
    if device.type == "cuda":
        if triton_available():
            return "triton"
        return "native" if native_available(device) else "torch"
    if CPU_DEFAULT_IMPL == "native" and dtype == torch.float32 and native_available(device):
        return "native"
    return "torch"


def _run(impl, out, skip, features, weights, biases, scales):
    """Write the fused sum into out with the chosen implementation (arguments already checked)."""
    if impl == "triton":
        from kernels.zero_conv_triton import zero_conv_add_triton

        zero_conv_add_triton(out, skip, features, weights, biases, scales, _strides)
    elif impl == "native":
        from kernels import native

        native.zero_conv_add_native(out, skip, features, weights, biases, scales, _strides)
    else:
        out.copy_(zero_conv_add_torch(skip, features, weights, biases, list(scales.unbind())))


@torch.library.custom_op("controlnet_engine::fused_zero_conv_add", mutates_args=())
def _fused_op(skip: torch.Tensor, features: list[torch.Tensor], weights: list[torch.Tensor],
              biases: list[torch.Tensor], scales: torch.Tensor, impl: str) -> torch.Tensor:
    out = torch.empty_like(skip)
    _run(impl, out, skip, features, weights, biases, scales)
    return out


@_fused_op.register_fake
def _(skip, features, weights, biases, scales, impl):
    return torch.empty_like(skip)


@torch.library.custom_op("controlnet_engine::fused_zero_conv_add_out", mutates_args=("out",))
def _fused_out_op(skip: torch.Tensor, features: list[torch.Tensor], weights: list[torch.Tensor],
                  biases: list[torch.Tensor], scales: torch.Tensor, impl: str, out: torch.Tensor) -> None:
    # out may be skip itself: every implementation reads an element of skip before writing the
    # same element of out, in the same thread/program.
    _run(impl, out, skip, features, weights, biases, scales)


@_fused_out_op.register_fake
def _(skip, features, weights, biases, scales, impl, out):
    return None


def _check_same(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}; it must match skip ({ref.dtype} on {ref.device})")


def scales_tensor(scales: Sequence[float | torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-net scales as one float32 tensor on the device (python floats or 0-d tensors)."""
    for k, s in enumerate(scales):
        if isinstance(s, torch.Tensor) and s.numel() != 1:
            raise ValueError(f"scales[{k}] has shape {tuple(s.shape)}; each scale must be a float or a 0-d tensor")
    if all(not isinstance(s, torch.Tensor) for s in scales):
        return torch.tensor([float(s) for s in scales], dtype=torch.float32, device=device)
    return torch.stack([torch.as_tensor(s, dtype=torch.float32, device=device).reshape(()) for s in scales])


def _check_args(skip, features, weights, biases, scales, out):
    """Validate shapes, dtypes and devices; return weights as (C, Ck) and the scales tensor."""
    if skip.dim() != 4 or skip.dtype not in DTYPES:
        raise ValueError(f"skip must be a 4-D (B, C, H, W) tensor of {DTYPES}; got {tuple(skip.shape)} {skip.dtype}")
    n = len(features)
    if n == 0 or not (len(weights) == len(biases) == len(scales) == n):
        raise ValueError(
            f"features, weights, biases and scales need one entry per ControlNet (at least one); got lengths "
            f"{len(features)}, {len(weights)}, {len(biases)}, {len(scales)}")
    B, C, H, W = skip.shape
    weights2d = []
    for k, (f, w, b) in enumerate(zip(features, weights, biases)):
        if f.dim() != 4 or (f.shape[0], f.shape[2], f.shape[3]) != (B, H, W):
            raise ValueError(f"features[{k}] has shape {tuple(f.shape)}; expected ({B}, Ck, {H}, {W}) to match skip")
        ck = f.shape[1]
        if tuple(w.shape) not in ((C, ck), (C, ck, 1, 1)):
            raise ValueError(f"weights[{k}] has shape {tuple(w.shape)}; expected ({C}, {ck}) or ({C}, {ck}, 1, 1)")
        if tuple(b.shape) != (C,):
            raise ValueError(f"biases[{k}] has shape {tuple(b.shape)}; expected ({C},)")
        for name, t in ((f"features[{k}]", f), (f"weights[{k}]", w), (f"biases[{k}]", b)):
            _check_same(name, t, skip)
        weights2d.append(w.reshape(C, ck))
    if out is not None:
        if out.shape != skip.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected skip's {tuple(skip.shape)}")
        _check_same("out", out, skip)
    return weights2d, scales_tensor(scales, skip.device)


def _layout_ok(impl: str, tensors: Sequence[torch.Tensor]) -> str | None:
    """None if impl takes these tensors' layout, else why not."""
    if impl == "torch":
        return None
    strides = [pixel_strides(t) for t in tensors]
    if any(s is None for s in strides):
        return "a tensor's H and W do not flatten into one pixel axis (neither NCHW nor channels-last)"
    if impl == "native":
        from kernels import native

        return native.unsupported(tensors[0], strides)
    return None


def fused_zero_conv_add(
    skip: torch.Tensor,
    features: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    scales: Sequence[float | torch.Tensor],
    out: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """skip + sum_k scales[k] * (weights[k] @ features[k] + biases[k]) over channels, per pixel.

    skip (B, C, H, W); features[k] (B, Ck, H, W); weights[k] (C, Ck) or (C, Ck, 1, 1); biases[k]
    (C,); scales[k] a float or 0-d tensor. All in one dtype (fp32/fp16/bf16; the sum is formed in
    fp32) on one device, NCHW or channels-last. `out` may be skip (in place). impl=None picks the
    best for the device and falls back to torch for layouts a kernel does not take; an explicit
    impl raises instead.
    """
    features, biases = list(features), list(biases)
    weights2d, scales_t = _check_args(skip, features, weights, biases, scales, out)
    chosen = _resolve(impl, skip.device, skip.dtype)
    tensors = [skip, *features] + ([out] if out is not None else [])
    why = _layout_ok(chosen, tensors)
    if why is not None:
        if impl is not None:
            raise ValueError(f"impl={impl!r} cannot take these tensors: {why}")
        chosen = "torch"
    if out is None:
        return torch.ops.controlnet_engine.fused_zero_conv_add(skip, features, weights2d, biases, scales_t, chosen)
    torch.ops.controlnet_engine.fused_zero_conv_add_out(skip, features, weights2d, biases, scales_t, chosen, out)
    return out


# ---------------------------------------------------------------------------------------------
# Multi-tensor combine of separately computed residuals (ONNX / TensorRT ControlNets).


def _run_combine(impl, flat, scales, num_nets, out):
    lists = [flat[k * len(out):(k + 1) * len(out)] for k in range(num_nets)]
    if impl == "triton":
        from kernels.combine_triton import combine_residuals_triton

        combine_residuals_triton(lists, scales, out)
    else:
        combine_residuals_torch(lists, scales, out)


@torch.library.custom_op("controlnet_engine::combine_residuals", mutates_args=())
def _combine_op(flat: list[torch.Tensor], scales: torch.Tensor, num_nets: int, impl: str) -> list[torch.Tensor]:
    out = [torch.empty_like(r) for r in flat[: len(flat) // num_nets]]
    _run_combine(impl, flat, scales, num_nets, out)
    return out


@_combine_op.register_fake
def _(flat, scales, num_nets, impl):
    return [torch.empty_like(r) for r in flat[: len(flat) // num_nets]]


@torch.library.custom_op("controlnet_engine::combine_residuals_out", mutates_args=("out",))
def _combine_out_op(flat: list[torch.Tensor], scales: torch.Tensor, num_nets: int, impl: str,
                    out: list[torch.Tensor]) -> None:
    _run_combine(impl, flat, scales, num_nets, out)


@_combine_out_op.register_fake
def _(flat, scales, num_nets, impl, out):
    return None


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def combine_residuals(
    residual_lists: Sequence[Sequence[torch.Tensor]],
    scales: Sequence[float | torch.Tensor],
    out: Sequence[torch.Tensor] | None = None,
    impl: str | None = None,
) -> list[torch.Tensor]:
    """[sum_k scales[k] * residual_lists[k][i] for each i], all tensors in one launch (Triton).

    residual_lists[k] is net k's list of residuals (13 for SD1.5); tensor i must have the same
    shape, strides, dtype and device in every list. `out` (a list like residual_lists[0]) may be one
    of the input lists (in place). impl: "triton", "torch" or None (Triton on CUDA when available).
    """
    if len(residual_lists) == 0 or len(residual_lists) != len(scales):
        raise ValueError(f"need one scale per residual list and at least one list; got {len(residual_lists)} "
                         f"lists and {len(scales)} scales")
    first = list(residual_lists[0])
    for k, rs in enumerate(residual_lists):
        if len(rs) != len(first):
            raise ValueError(f"residual_lists[{k}] has {len(rs)} tensors; residual_lists[0] has {len(first)}")
        for i, (r, r0) in enumerate(zip(rs, first)):
            if r.shape != r0.shape or r.stride() != r0.stride() or r.dtype != r0.dtype or r.device != r0.device:
                raise ValueError(f"residual_lists[{k}][{i}] is {tuple(r.shape)} {r.dtype} on {r.device} with strides "
                                 f"{r.stride()}; it must match residual_lists[0][{i}] {tuple(r0.shape)} {r0.dtype} "
                                 f"on {r0.device} with strides {r0.stride()}")
            if r.dtype not in DTYPES:
                raise ValueError(f"residual_lists[{k}][{i}] is {r.dtype}; allowed dtypes are {DTYPES}")
    if out is not None:
        out = list(out)
        if len(out) != len(first) or any(o.shape != r.shape or o.stride() != r.stride() or o.dtype != r.dtype
                                          or o.device != r.device for o, r in zip(out, first)):
            raise ValueError("out must be a list of tensors with the shapes, strides, dtypes and devices of residual_lists[0]")
    if impl is not None and impl not in COMBINE_IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {COMBINE_IMPLS} or None for combine_residuals")
    if impl == "triton" and _disabled("triton"):
        raise RuntimeError("impl='triton' was asked for but ENGINE_DISABLE_TRITON is set")
    device = first[0].device if first else torch.device("cpu")
    chosen = impl or ("triton" if device.type == "cuda" and triton_available() else "torch")
    if chosen == "triton" and not all(_dense(r) for r in first):
        if impl is not None:
            raise ValueError("impl='triton' needs dense residuals (contiguous or channels-last)")
        chosen = "torch"
    flat = [r for rs in residual_lists for r in rs]
    scales_t = scales_tensor(scales, device)
    if not first:
        return []
    if out is None:
        return torch.ops.controlnet_engine.combine_residuals(flat, scales_t, len(residual_lists), chosen)
    torch.ops.controlnet_engine.combine_residuals_out(flat, scales_t, len(residual_lists), chosen, out)
    return out

"""Attention out = softmax(q k^T / sqrt(d)) v in the layout linear projections produce: (batch, tokens,
heads, head dim), no mask, as diffusers' AttnProcessor2_0 computes it with scaled_dot_product_attention.

`attention(q, k, v)` is a `torch.library` custom op (`controlnet_engine::attention`) with a fake
implementation, so torch.compile keeps it as one opaque call. Implementations:

- "native": bf16 on CPUs with AVX512-BF16 (kernels/csrc/attention_cpu.cpp, built by
  kernels/build_native.py). torch's CPU flash attention runs bf16 at its fp32 speed; this one uses the
  bf16 dot-product instructions: 1.4-2.6x faster on the SD1.5 shapes (11 vs 21 ms for 8 heads of 40
  over 1024 tokens, batch 2, 2 Zen 4 cores; 156 vs 357 ms over 4096 tokens). Probabilities are rounded
  to bf16 before P V, as torch's bf16 kernels do: max abs error vs fp32 within SDPA-bf16's own.
- "torch": F.scaled_dot_product_attention, everything else (other dtypes, devices, CPUs).

impl=None picks native where it applies and pays: on CPUs with AVX512-BF16 but no AMX (measured on an AMD
Zen 4). On AMX CPUs (Intel Xeon Sapphire Rapids and later) torch's flash attention runs bf16 on the AMX
tiles and our AVX512-BF16 kernel loses to it (FACTS.md: the preset that used it was slower there than
diffusers-bf16), so impl=None runs SDPA there; impl="native" still runs ours. ENGINE_DISABLE_NATIVE=1
turns it off.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels.native import _load
from kernels.zero_conv import _disabled

ATTENTION_IMPLS = ("native", "torch")
NATIVE_MODULE = "_attention_cpu"
DEFAULT_NATIVE_ISAS = ("avx512_bf16",)  # engine.optimizations.cpu_isa() classes where impl=None picks native


def native_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the native kernel cannot take these tensors, or None when it can."""
    if _disabled("native"):
        return "ENGINE_DISABLE_NATIVE is set"
    module = _load(NATIVE_MODULE)
    if module is None:
        return "kernels._attention_cpu is not built (python -m kernels.build_native)"
    if not module.supported():
        return "this CPU has no AVX512-BF16"
    if any(t.device.type != "cpu" or t.dtype != torch.bfloat16 for t in (q, k, v)):
        return f"the native kernel takes bf16 CPU tensors; got {q.dtype} on {q.device}"
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return f"need q (B, N, H, D) and k, v (B, M, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.shape[3] % 2:
        return f"the head dim must be even (bf16 pairs); got {q.shape[3]}"
    if any(t.stride(3) != 1 for t in (q, k, v)):
        return "the head dim must be contiguous"
    return None


def attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The native kernel: checks, allocates (or takes `out`, (B, N, H, D) with a contiguous head dim) and
    launches."""
    why = native_unsupported(q, k, v)
    if why is not None:
        raise ValueError(f"native attention cannot run: {why}")
    B, N, H, D = q.shape
    M = k.shape[1]
    if out is None:
        out = torch.empty(B, N, H, D, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(3) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous head dim; got "
                         f"{tuple(out.shape)} {out.dtype}, strides {out.stride()}")

    def strides(t):  # (batch, head, token)
        return (t.stride(0), t.stride(2), t.stride(1))

    _load(NATIVE_MODULE).attention_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, N, M, D,
                                    strides(q), strides(k), strides(v), strides(out), D ** -0.5,
                                    torch.get_num_threads())
    return out


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()  # (B, N, H, D) contiguous, as the fake promises


@functools.lru_cache(maxsize=1)
def _native_is_default() -> bool:
    from engine.optimizations import cpu_isa

    return cpu_isa() in DEFAULT_NATIVE_ISAS


@torch.library.custom_op("controlnet_engine::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if _native_is_default() and native_unsupported(q, k, v) is None:
        return attention_native(q, k, v)
    return attention_torch(q, k, v)


@_attention_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, N, H, D), k and v (B, M, H, D); returns (B, N, H, D) contiguous."""
    if impl is None:
        return _attention_op(q, k, v)
    if impl == "native":
        return attention_native(q, k, v)
    if impl == "torch":
        return attention_torch(q, k, v)
    raise ValueError(f"impl must be one of {', '.join(ATTENTION_IMPLS)} or None, got {impl!r}")

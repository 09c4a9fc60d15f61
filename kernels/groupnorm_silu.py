"""Public entry point: GroupNorm followed by SiLU in one torch op.

    out = silu(group_norm(x, num_groups, weight, bias, eps))

What every SD1.5 ResnetBlock2D does twice (norm1 + act, norm2 + act) and the UNet once more before
conv_out. A `torch.library` custom op (`controlnet_engine::group_norm_silu`) with a fake
implementation, so torch.compile and CUDA graph capture see one opaque op. Implementations:

- "triton": a statistics pass and an apply pass (kernels/groupnorm_silu_triton.py), NCHW or
  channels-last through strides. GPU, or CPU under TRITON_INTERPRET=1 (tests only: it is slow).
- "torch": F.group_norm then F.silu (two ops, the unfused path).

impl=None picks Triton on CUDA when available, else torch. ENGINE_DISABLE_TRITON=1 turns Triton off
(explicitly asking for it is then an error). Nothing here imports triton until a call needs it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.zero_conv import DTYPES, _disabled, pixel_strides, triton_available

GN_IMPLS = ("triton", "torch")


def group_norm_silu_torch(x, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """The unfused path: what diffusers runs (GroupNorm module, then SiLU module)."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def group_norm_silu_reference(x, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """float64 reference for tests: the same math on the same (rounded) inputs."""
    return group_norm_silu_torch(x.double(), num_groups, None if weight is None else weight.double(),
                                 None if bias is None else bias.double(), eps)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    s = pixel_strides(t)
    assert s is not None, "layout checked before dispatch"
    return s


def _run(impl, out, x, weight, bias, num_groups, eps):
    if impl == "triton":
        from kernels.groupnorm_silu_triton import group_norm_silu_triton

        group_norm_silu_triton(out, x, weight, bias, num_groups, eps, _strides)
    else:
        out.copy_(group_norm_silu_torch(x, num_groups, weight, bias, eps))


@torch.library.custom_op("controlnet_engine::group_norm_silu", mutates_args=())
def _gn_silu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                impl: str) -> torch.Tensor:
    out = torch.empty_like(x)  # keeps x's memory format (NCHW or channels-last)
    _run(impl, out, x, weight, bias, num_groups, eps)
    return out


@_gn_silu_op.register_fake
def _(x, weight, bias, num_groups, eps, impl):
    return torch.empty_like(x)


def choose_impl(device: torch.device) -> str:
    """The implementation impl=None picks on this device: Triton on CUDA when available, else torch.
    The engine calls this once per backend (TorchBackend.__init__) and passes the answer to every call."""
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"


def _resolve(impl: str | None, x: torch.Tensor) -> str:
    if impl is not None:
        if impl not in GN_IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {GN_IMPLS} or None")
        if torch.compiler.is_compiling():  # chosen, and its off switch checked, before tracing (zero_conv._resolve)
            return impl
        if impl == "triton" and _disabled("triton"):
            raise RuntimeError("impl='triton' was asked for but ENGINE_DISABLE_TRITON is set")
        return impl
    if torch.compiler.is_compiling():
        # Decided at trace time without triton_available()'s find_spec, which dynamo cannot trace (a
        # graph break at each of a step's ~60 calls); inductor on CUDA needs triton installed anyway.
        return "triton" if x.device.type == "cuda" and not _disabled("triton") else "torch"
    return choose_impl(x.device)


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    impl: str | None = None,
) -> torch.Tensor:
    """silu(group_norm(x)) for x (B, C, H, W), NCHW or channels-last, fp32/fp16/bf16 (statistics in fp32).

    weight and bias (C,) in x's dtype (None: 1 and 0). The output has x's memory format. impl=None picks
    Triton on CUDA and falls back to torch for other layouts; an explicit impl raises instead.
    """
    if x.dim() != 4 or x.dtype not in DTYPES:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor of {DTYPES}; got {tuple(x.shape)} {x.dtype}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive integer dividing the {C} channels, got {num_groups!r}")
    weight = torch.ones(C, dtype=x.dtype, device=x.device) if weight is None else weight
    bias = torch.zeros(C, dtype=x.dtype, device=x.device) if bias is None else bias
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,) or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected ({C},) {x.dtype} on {x.device}")
    chosen = _resolve(impl, x)
    if chosen == "triton" and pixel_strides(x) is None:
        if impl is not None:
            raise ValueError("impl='triton' cannot take x: its H and W do not flatten into one pixel axis "
                             "(neither NCHW nor channels-last)")
        chosen = "torch"
    return torch.ops.controlnet_engine.group_norm_silu(x, weight, bias, num_groups, float(eps), chosen)

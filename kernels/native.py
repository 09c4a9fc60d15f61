"""Launchers for the compiled native kernels (kernels/csrc/, built by kernels/build_native.py).

The modules take raw addresses and element strides, so this file maps each layout onto the GEMM
form they compute per batch image, out = skip + sum_k s_k * (A_k @ B_k + bias_k):
    NCHW           m = channel, n = pixel   A = W (C, Ck)          B = features (Ck, P)
    channels-last  m = pixel,   n = channel A = features (P, Ck)   B = W^T (Ck, C), made contiguous
so the n axis (the vectorised / coalesced one) has stride 1 either way. W^T is C * Ck elements,
small next to the activations except at 8x8, and only the channels-last path pays it.
"""
from __future__ import annotations

import importlib

import torch

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_modules: dict[str, object] = {}


def _load(name: str):
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"kernels.{name}")
        except ImportError:
            _modules[name] = None
    return _modules[name]


def module_for(device: torch.device):
    """The built module for this device type, or None when it was not built."""
    if device.type == "cpu":
        return _load("_zero_conv_cpu")
    if device.type == "cuda":
        return _load("_zero_conv_cuda")
    return None


def _layout(strides) -> str | None:
    if all(s[2] == 1 for s in strides):
        return "nchw"
    if all(s[1] == 1 for s in strides):
        return "nhwc"
    return None


def unsupported(skip: torch.Tensor, strides) -> str | None:
    """Why impl='native' cannot take these tensors (strides: (b, c, p) of skip, features, out), or None."""
    if module_for(skip.device) is None:
        return (f"no native module for {skip.device.type} is built (python -m kernels.build_native; the CUDA "
                "module needs nvcc)")
    if skip.device.type == "cpu" and skip.dtype != torch.float32:
        return f"the native CPU kernel takes float32 only; got {skip.dtype}"
    if _layout(strides) is None:
        return "tensors must all be NCHW (pixel stride 1) or all channels-last (channel stride 1)"
    return None


def zero_conv_add_native(out, skip, features, weights, biases, scales, strides) -> torch.Tensor:
    """Write out = skip + sum_k scales[k] * (weights[k] @ features[k] + biases[k]) with the native module."""
    module = module_for(skip.device)
    B, C, H, W = skip.shape
    P = H * W
    sk, so = strides(skip), strides(out)
    layout = _layout([sk, so] + [strides(f) for f in features])
    biases = [b.contiguous() for b in biases]
    keep_alive = []  # W^T copies must outlive the call that reads their addresses
    nets = []
    for f, w, b in zip(features, weights, biases):
        fb, fc, fp = strides(f)
        ck = f.shape[1]
        if layout == "nchw":
            a, a_strides = w, (0, w.stride(0), w.stride(1))
            bmat, b_strides = f, (fb, fc, 1)
        else:
            wt = w.t().contiguous()
            keep_alive.append(wt)
            a, a_strides = f, (fb, fp, fc)
            bmat, b_strides = wt, (0, C, 1)
        nets.append((a.data_ptr(), bmat.data_ptr(), b.data_ptr(), ck, *a_strides, *b_strides))
    m, n = (C, P) if layout == "nchw" else (P, C)
    out_sm, skip_sm = (so[1], sk[1]) if layout == "nchw" else (so[2], sk[2])
    if skip.device.type == "cpu":
        module.zero_conv_add_f32(out.data_ptr(), skip.data_ptr(), B, m, n, so[0], out_sm, sk[0], skip_sm,
                                 [net[:9] for net in nets], [float(s) for s in scales.tolist()],
                                 layout == "nchw", torch.get_num_threads())
        return out
    # CUDA: at most module.max_nets per launch; later launches read out as their skip. The module
    # launches on the current device: make it the tensors' one (multi-GPU machines).
    with torch.cuda.device(skip.device):
        stream = torch.cuda.current_stream(skip.device).cuda_stream
        current_skip, current_sk = skip, sk
        current_sm = skip_sm
        for start in range(0, len(nets), module.max_nets):
            chunk = [net[:9] + (1,) for net in nets[start:start + module.max_nets]]
            module.zero_conv_add(_DTYPE_CODES[skip.dtype], out.data_ptr(), current_skip.data_ptr(), B, m, n,
                                 (so[0], out_sm, 1), (current_sk[0], current_sm, 1), chunk,
                                 scales[start:].data_ptr(), layout == "nchw", stream)
            current_skip, current_sk, current_sm = out, so, out_sm
    return out

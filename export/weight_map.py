"""Which initializer of a saved ONNX graph holds which model parameter, found by value.

A LoRA switch on a built graph replaces initializers by name (engine/backends/onnxruntime_backend.py), so the
build records, per graph, where each parameter really ended up. Names cannot be trusted for that: the legacy
exporter folds `Transpose(W)` of every Linear fed a 3-D input into a new initializer (`onnx::MatMul_123`
holding W^T), onnxslim may rename, merge identical constants or fold further, and reshaped norm weights get
new names too. So the saved graph's initializers are hashed (dtype + bytes) and each parameter is looked for
as it is and, for 2-D weights, transposed, in every float dtype the graph holds (fp16 graphs hold the
parameters cast to fp16, with the same rounding as `module.half()`).

A parameter is mapped when exactly one initializer holds its value and that initializer holds no other
parameter's value; everything else is unreachable: folded into something else (no initializer holds it),
or sharing its value with another parameter or initializer (a change to one could not be told apart).
Constant-valued parameters (norms initialised to 1 or 0) are the typical unreachable ones; they are never
LoRA targets. Parameters the exported outputs do not depend on at all (`unused_parameters`: no gradient
reaches them) are neither: they are recorded as unused, and a LoRA's change to them is dropped, as it
cannot change an image (SDXL's first text encoder: only its penultimate layer's states are used).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from engine.backends.onnxruntime_backend import graph_initializers


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype}|{array.size}|".encode() + array.tobytes()).hexdigest()


def unused_parameters(module: torch.nn.Module, args: list, prefix: str) -> dict[str, list[int]]:
    """{param: shape} of the parameters under `prefix` that no output of `module(*args)` depends on."""
    params = [(n.removeprefix(prefix), p) for n, p in module.named_parameters() if n.startswith(prefix)]
    before = [p.requires_grad for _, p in params]
    try:
        with torch.enable_grad():
            for _, p in params:
                p.requires_grad_(True)
            out = module(*args)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            total = sum(o.float().sum() for o in outs if o.requires_grad)
            grads = torch.autograd.grad(total, [p for _, p in params], allow_unused=True)
    finally:
        for (_, p), flag in zip(params, before):
            p.requires_grad_(flag)
    return {name: list(p.shape) for (name, p), g in zip(params, grads) if g is None}


def weight_map(onnx_path: Path, module: torch.nn.Module, prefix: str, unused: dict | None = None) -> dict:
    """{"weights": {param: initializer}, "weight_layouts": {param: {shape, onnx_shape, transpose, dtype}},
    "unreachable_weights": [param, ...], "unused_weights": `unused`} (engine/manifest.py reads the layouts back) for the parameters of `module` under `prefix` (the exported wrapper's
    name for the diffusers model, e.g. "unet."), named as that model's own state dict names them."""
    by_digest: dict[str, list[str]] = defaultdict(list)
    shapes, dtypes = {}, set()
    for name, array in graph_initializers(onnx_path):
        if array.dtype.kind != "f":
            continue
        by_digest[_digest(array)].append(name)
        shapes[name] = list(array.shape)
        dtypes.add(array.dtype)
    unused = unused or {}
    params = {n.removeprefix(prefix): p for n, p in module.named_parameters()
              if n.startswith(prefix) and n.removeprefix(prefix) not in unused}
    hits: dict[str, list[tuple[str, bool, np.dtype]]] = {}
    holders: dict[str, set[str]] = defaultdict(set)
    for name, param in params.items():
        value = param.detach().cpu().float().numpy()
        found = []
        for dtype in sorted(dtypes, key=str):
            cast = value.astype(dtype)
            found += [(init, False, dtype) for init in by_digest.get(_digest(cast), [])]
            if cast.ndim == 2:
                found += [(init, True, dtype) for init in by_digest.get(_digest(cast.T), [])]
        hits[name] = found
        for init, _, _ in found:
            holders[init].add(name)
    weights, layouts, unreachable = {}, {}, []
    for name, found in hits.items():
        if len(found) != 1 or len(holders[found[0][0]]) != 1:
            unreachable.append(name)
            continue
        init, transpose, dtype = found[0]
        weights[name] = init
        layouts[name] = dict(shape=list(params[name].shape), onnx_shape=shapes[init], transpose=transpose, dtype=str(dtype))
    return dict(weights=weights, weight_layouts=layouts, unreachable_weights=sorted(unreachable), unused_weights=unused)


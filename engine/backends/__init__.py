"""Backends: the five tensor-in, tensor-out questions the generation loop asks, answered per runtime.

    encode_text(ids) -> embeddings
    encode_hint(k, control_map) -> hint of ControlNet k
    controlnet(k, sample, t, embeddings, hint, scales) -> 13 residuals, already scaled
    unet(sample, t, embeddings, residuals | None) -> noise prediction
    decode(latents) -> images in [-1, 1]

A backend knows nothing of schedulers, CFG or guidance windows: the loop in `engine.runner` is written
once and is the same for every backend, which is what makes "every backend equals the reference" a test.
Inputs come in float32 (latents, scales) and outputs go back as float32; a backend casts to its own dtype.
"""
from __future__ import annotations

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")

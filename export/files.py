"""Atomic writes and content hashes for the build.

Every file reaches its final name by `os.replace` from a scratch name in the same directory tree (one
filesystem, so the rename is atomic): a build killed at any point leaves either the old file or the new
one, never half of one, and the manifest (written last, the same way) is what says which to trust.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def move_into(files: list[Path], target_dir: Path) -> list[str]:
    """Move scratch files into `target_dir` under the same names; returns the names. External-data files
    go first, so a graph never appears before its weights."""
    target_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(files, key=lambda p: p.suffix == ".onnx")
    for path in ordered:
        os.replace(path, target_dir / path.name)
    return [p.name for p in files]


def weights_hash(module: torch.nn.Module, skip_prefix: str | None = None) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): changes iff the weights do."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def json_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

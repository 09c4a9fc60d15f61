"""Engines built on first use: `Runner(model=..., controlnet=..., backend="openvino" | "onnxruntime")` with no
`engine_dir` builds one into a cache folder (what `python -m engine.build` would write), and the next start
with the same request finds it there and only loads it.

    ENGINE_CACHE=/big/disk python app.py      # default: $XDG_CACHE_HOME (~/.cache)/controlnet-engine/engines

The folder's key is what decides a build and is known before any weights are read: the model, ControlNet
and extra VAE sources (local paths absolute, as the manifest records them, with each local file's size and
modification time, so changed weights get a new folder), the build backend and precision, and the
library versions in every artefact's key. Inside one folder the build's own per-artefact keys (weights
hashes) still decide what is rebuilt. A Hugging Face id is keyed by its name: a new revision of the same
id is not noticed (delete its folder, or build an engine dir with python -m engine.build).

Two processes starting on the same key do not corrupt each other: the build runs under an exclusive lock
on `<key>.lock` (fcntl), in a scratch folder `.<key>.tmp-<pid>` renamed to `<key>` only once the build is
complete and verified; a process that waited for the lock finds the finished folder and loads it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

BUILT_ON_USE = ("onnxruntime", "openvino")  # backends whose engines build on the CPU, without a GPU
ENV = "ENGINE_CACHE"


def cache_root() -> Path:
    """ENGINE_CACHE, else the user cache dir."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "controlnet-engine" / "engines"


def _source_stamp(source: str) -> object:
    """A source as the manifest records it; for local files and folders also each file's size and mtime."""
    from engine.manifest import source_id

    path = Path(source).expanduser()
    if not path.exists():
        return source_id(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [source_id(source), [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def _versions(backend: str) -> dict:
    import diffusers
    import torch

    from export.onnx_export import EXPORTER

    versions = dict(torch=torch.__version__, diffusers=diffusers.__version__, exporter=EXPORTER)
    runtime = "openvino" if backend == "openvino" else "onnxruntime"
    versions[runtime] = __import__(runtime).__version__
    return versions


def cache_key(model: str, controlnets: list[str], vaes: list[str], backend: str, precision: str = "fp32") -> str:
    """`<model name>-<16 hex digits>`: readable in a listing, unique by everything that decides the build."""
    from engine.registry import resolve

    nets = [resolve(name).source for name in controlnets]
    described = dict(model=_source_stamp(model), controlnets=[_source_stamp(n) for n in nets],
                     vaes=[_source_stamp(v) for v in vaes], backend=backend, precision=precision,
                     versions=_versions(backend))
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model).rstrip("/")).name) or "model"
    return f"{name}-{digest}"


def _complete(engine_dir: Path) -> bool:
    from engine import manifest as mf

    try:
        found = mf.read(engine_dir)
    except mf.EngineDirError:
        return False
    return found is not None and found.complete


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def engine_dir_for(model: str, controlnets: list[str], vaes: list[str], backend: str, progress: bool = True,
                   log=None) -> Path:
    """The cached engine dir for this request, built first if it is not there yet (see the module docstring)."""
    from engine.loading import DEFAULT_MODEL

    if backend not in BUILT_ON_USE:
        raise ValueError(f"engines are built on first use for {', '.join(BUILT_ON_USE)}, not {backend!r}")
    log = log or (lambda line: print(line, file=sys.stderr))
    model = DEFAULT_MODEL if model is None else str(model)
    controlnets = ["canny"] if controlnets is None else list(controlnets)
    root = cache_root()
    key = cache_key(model, controlnets, vaes, backend)
    final = root / key
    if _complete(final):
        return final
    with _locked(root / f"{key}.lock"):
        if _complete(final):  # built by another process while this one waited for the lock
            return final
        for stale in root.glob(f".{key}.tmp-*"):  # left by a killed build: nobody else holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        scratch = root / f".{key}.tmp-{os.getpid()}"
        log(f"building {backend} engines for {model} into {final} (first use; the next start loads them)")
        try:
            _build(model, controlnets, vaes, backend, scratch, progress)
            if final.exists():  # an unfinished folder from before this cache wrote only complete ones
                shutil.rmtree(final)
            os.replace(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def _build(model: str, controlnets: list[str], vaes: list[str], backend: str, out: Path, progress: bool) -> None:
    from export.build import BuildConfig, build

    result = build(BuildConfig(controlnets=tuple(controlnets), model=model, out=out, backend=backend,
                               vaes=tuple(vaes), progress=progress), log=lambda line: None)
    if not result.ok:
        failed = [r["artefact"] for r in result.rows if not r["ok"]]
        raise RuntimeError(f"building engines for {model!r} failed verification ({', '.join(failed)}); nothing was "
                           "cached. Build with python -m engine.build to see the table")

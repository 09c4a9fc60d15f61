"""Annotator models: which weights each module loads, loaded lazily, once per process, shared.

`Annotators(sources, device)` is what a Runner (and so every route and the CLI) holds: `sources` maps a
model-backed module (key or UI name) to a Hugging Face id or a local folder; several models (openpose's
ViTPose and RT-DETR) are given in the table's order, comma-separated, and any not given keep the table's
default. A model is loaded by the first call that needs it and then kept for the process: the cache is
keyed by (loader, source, device), so two modules on the same weights (depth and normal_map) and two
Runners on the same device share one copy. Loads run one at a time under a lock; inference on a loaded
model is read-only (eval mode, no_grad), so concurrent requests share it without a lock.

A load that fails for want of the files (no network, an id that does not exist, a folder that is not
there) raises `AnnotatorUnavailable`: one line naming the module and the id, and how to supply it.
"""
from __future__ import annotations

import threading
import time


class AnnotatorUnavailable(RuntimeError):
    """A preprocessor cannot run here: its weights cannot be loaded, or its pip extra is not installed."""


_MODELS: dict[tuple, object] = {}  # (loader, source, device) -> the loaded model(s)
_LOADS: list[dict] = []  # one record per load, in order: module, source, device, ms, mb
_FAILED: dict[tuple, tuple[float, str]] = {}  # key -> (when, message) of a load that failed
RETRY_AFTER_S = 300  # a failed load is answered from memory meanwhile: an unreachable Hub costs ~1 min a try
_LOCK = threading.Lock()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)


def model_megabytes(obj) -> float:
    """Parameters and buffers of the torch modules in `obj` (a module, or a tuple holding some), in MB."""
    import torch

    parts = obj if isinstance(obj, (tuple, list)) else (obj,)
    total = 0
    for part in parts:
        if isinstance(part, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in [*part.parameters(), *part.buffers()])
    return total / 2**20


def shared(loader, source: str, device, module: str):
    """`loader(source, device)`, once per process for each (loader, source, device); `module` names the
    preprocessor in errors and in the load records."""
    key = (loader.__module__, loader.__qualname__, source, str(device))
    loaded = _MODELS.get(key)
    if loaded is not None:
        return loaded
    with _LOCK:
        failed = _FAILED.get(key)
        if failed is not None and time.monotonic() - failed[0] < RETRY_AFTER_S:
            raise AnnotatorUnavailable(failed[1])
        if key not in _MODELS:
            start = time.perf_counter()
            try:
                loaded = loader(source, device)
            except (OSError, ValueError) as err:  # missing files, an unknown id, an unreachable Hub
                message = (f"preprocessor {module!r} could not load {source!r} ({_one_line(err)}); download it "
                           f"(huggingface-cli download {source}) or give a local copy: --annotator {module}=DIR, "
                           f"Runner(annotators={{{module!r}: DIR}})")
                _FAILED[key] = (time.monotonic(), message)
                raise AnnotatorUnavailable(message) from None
            _LOADS.append(dict(module=module, source=source, device=str(device), mb=model_megabytes(loaded),
                               ms=(time.perf_counter() - start) * 1e3))
            _MODELS[key] = loaded
        return _MODELS[key]


def loads() -> list[dict]:
    """What this process has loaded so far: one dict per model (module, source, device, ms, mb)."""
    return list(_LOADS)


class Annotators:
    """Which weights each model-backed module loads, and on which device."""

    def __init__(self, sources: dict | None = None, device=None):
        from engine.preprocess import find_module, names

        self.device = str(device) if device is not None else "cpu"
        self.sources: dict[str, tuple[str, ...]] = {}
        for name, value in (sources or {}).items():
            module = find_module(name)
            if module is None or not module.model_backed:
                backed = [m for m in names() if (find_module(m).model_backed)]
                raise ValueError(f"annotators: {name!r} is not a model-backed preprocessor; those are: "
                                 f"{', '.join(sorted(backed))}")
            given = tuple(str(v).strip() for v in (value.split(",") if isinstance(value, str) else [value]))
            if not all(given) or len(given) > len(module.weights):
                raise ValueError(f"annotators[{name!r}]: give {len(module.weights)} Hugging Face id(s) or folder(s) "
                                 f"(comma-separated, in this order: {', '.join(module.weights)}), got {value!r}")
            self.sources[module.key] = given + module.weights[len(given):]
        self._instances: dict[str, object] = {}
        self._lock = threading.Lock()

    def sources_for(self, module) -> tuple[str, ...]:
        return self.sources.get(module.key, module.weights)

    def get(self, module):
        """The module's annotator (model-backed: its models loaded on the first call)."""
        annotator = self._instances.get(module.key)
        if annotator is not None:
            return annotator
        from engine.preprocess import annotator_class, missing_extra

        missing = missing_extra(module)
        if missing:
            raise AnnotatorUnavailable(missing)
        cls = annotator_class(module)
        with self._lock:
            if module.key not in self._instances:
                if module.model_backed:
                    self._instances[module.key] = cls(self.sources_for(module), self.device, module.key,
                                                      *module.options)
                else:
                    self._instances[module.key] = cls(*module.options)
            return self._instances[module.key]

    def describe(self) -> dict[str, list[str]]:
        """Module key -> the weights it loads (given or default), for every model-backed module."""
        from engine.preprocess import MODULES

        return {m.key: list(self.sources_for(m)) for m in MODULES.values() if m.model_backed}


def annotator_flag(text: str) -> tuple[str, str]:
    """`--annotator MODULE=ID_OR_DIR` (engine.generate, engine.serve) -> (module key, weights)."""
    import argparse

    from engine.preprocess import find_module, names

    name, sep, source = text.partition("=")
    module = find_module(name.strip())
    if not sep or not source.strip():
        raise argparse.ArgumentTypeError(f"must be MODULE=ID_OR_DIR (e.g. depth_anything_v2=/models/da2), got {text!r}")
    if module is None or not module.model_backed:
        backed = sorted(n for n in names() if find_module(n).model_backed and " " not in n)
        raise argparse.ArgumentTypeError(f"{name.strip()!r} is not a model-backed preprocessor; those are: "
                                         f"{', '.join(backed)}")
    return module.key, source.strip()


def release() -> None:
    """Drop every loaded model and remembered failure (benchmarks free one module's model before the next)."""
    with _LOCK:
        _MODELS.clear()
        _FAILED.clear()

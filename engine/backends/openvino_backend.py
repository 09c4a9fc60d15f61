"""The OpenVINO backend: the engine dir's ONNX graphs (the same files ONNX Runtime runs) compiled by
OpenVINO's CPU plugin, one compiled model per graph and input shape.

Why: on an Intel Xeon with AMX (2 cores), ControlNet + UNet, one CFG step at 256² batch 2, took 457 ms
in bf16 here against 581 ms for the compiled torch path and 809 ms for diffusers in bf16; in f32
1572 ms against ONNX Runtime's 1682 ms; compiling both graphs took 3 s (FACTS.md).

Precision is explicit. OpenVINO's CPU plugin runs bf16 by itself on CPUs that have it unless told
otherwise, so every compile sets INFERENCE_PRECISION_HINT: f32 for fp32 (and fp16) engine dirs, bf16
only when asked for (`OvConfig(precision="bf16")`, `Runner(dtype="bf16")`), and only where OpenVINO
lists BF16 among the CPU's capabilities (AVX512-BF16 or AMX). Where it does not, OpenVINO would run
f32 instead, so asking for bf16 there is an error, not a warning followed by an f32 image. After every
compile the hint is read back from the compiled model and checked against what was asked.

Static shapes: each graph is reshaped to the input shapes of the call and compiled for them (CPU
kernels are picked per shape), keeping the last `OvConfig.shapes` compiled models per graph. Compiled
models go to OpenVINO's model cache (CACHE_DIR), so a second process loads instead of compiling: under
`<engine dir>/openvino_cache` by default (a user cache dir where the engine dir is read-only), in one
folder per everything a blob depends on (`cache_folder`: precision, hint, threads, OpenVINO build, CPU).
OpenVINO's own cache key is not enough: 2026.4.1 keys a blob without INFERENCE_PRECISION_HINT, and a bf16
compile that found an f32 compile's blob loaded it and computed NaN (issue #22).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.backends.onnxruntime_backend import TORCH_DTYPES, GraphBackend
from engine.manifest import Artefact, Manifest, solve_variables

PRECISIONS = ("f32", "bf16")
HINTS = ("LATENCY", "THROUGHPUT")
CACHE_NAME = "openvino_cache"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "controlnet-engine" / CACHE_NAME


def ov_has_bf16(core) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (it lists BF16 only for AVX512-BF16 or AMX CPUs)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@dataclass(frozen=True)
class OvConfig:
    precision: str = "f32"  # f32 | bf16: INFERENCE_PRECISION_HINT, always set
    # LATENCY: one stream using every thread, for one request at a time (the Runner). THROUGHPUT: several
    # streams, for a server running several requests at once from threads (each call takes its own
    # infer request from a pool).
    hint: str = "LATENCY"
    threads: int | None = None  # INFERENCE_NUM_THREADS; None: torch.get_num_threads() at compile time
    # The model cache: None is <engine dir>/openvino_cache, or user_cache_dir() if read-only; blobs go to a
    # folder under it per setting (cache_folder).
    cache_dir: str | None = None
    cache: bool = True  # False: no model cache at all
    shapes: int = 2  # compiled models kept per graph; each holds its own packed weights

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.hint not in HINTS:
            raise ValueError(f"OpenVINO performance hint must be one of {', '.join(HINTS)}, got {self.hint!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if not isinstance(self.shapes, int) or self.shapes < 1:
            raise ValueError(f"shapes (compiled models kept per graph) must be >= 1, got {self.shapes!r}")

    def properties(self) -> dict:
        return {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": self.hint,
                "INFERENCE_NUM_THREADS": self.threads or torch.get_num_threads()}


def pick_cache_dir(engine_dir: Path | None, config: OvConfig) -> Path | None:
    if not config.cache:
        return None
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    if engine_dir is not None and os.access(engine_dir, os.W_OK):
        return Path(engine_dir) / CACHE_NAME
    return user_cache_dir()


def cache_folder(base: Path, properties: dict, core) -> Path:
    """The folder under the model cache `base` for blobs compiled with these properties:
    `<precision>-<hint>-<threads>t-<hash>`, the hash over every property passed to the compile, the
    OpenVINO build and the CPU (OpenVINO's name, architecture and capabilities, and the family, model and
    instruction-set class, since OpenVINO names Zen 3 and Zen 4 alike "AMD EPYC").

    Why a folder per setting, not one shared folder: OpenVINO 2026.4.1 keys a blob without
    INFERENCE_PRECISION_HINT. On a Xeon with AMX, after an f32 compile had written its blob, a bf16 compile
    of the same graph with the same CACHE_DIR loaded the f32 blob, read back "bfloat16" and output NaN, at
    neither precision's speed (UNet step 1233 ms against 338 ms from a fresh bf16 compile; FACTS.md). Here
    a blob compiled under other settings is never in reach, whatever OpenVINO's own key leaves out."""
    import openvino as ov

    from engine.optimizations import cpu_description

    device = {name: str(core.get_property("CPU", name))
              for name in ("FULL_DEVICE_NAME", "DEVICE_ARCHITECTURE", "OPTIMIZATION_CAPABILITIES")}
    identity = dict(openvino=ov.get_version(), cpu=cpu_description(), device=device,
                    properties={name: str(value) for name, value in properties.items() if name != "CACHE_DIR"})
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = (f"{properties['INFERENCE_PRECISION_HINT']}-{properties['PERFORMANCE_HINT']}-"
            f"{properties['INFERENCE_NUM_THREADS']}t-{digest}")
    return Path(base) / name


def compiled_precision(compiled) -> str:
    """The inference precision a compiled model really runs, read back from it ("f32", "bf16", ...)."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def executed_precisions(compiled, layers=("Convolution", "FullyConnected", "MatMul")) -> set[str]:
    """The precisions the compiled model's multiplying layers really execute in (its runtime graph)."""
    found = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in layers:
            found.add(info["runtimePrecision"].astype(str))
    return found


class _Compiled:
    """One compiled shape: the compiled model and a pool of its infer requests (one per concurrent caller)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.idle: queue.SimpleQueue = queue.SimpleQueue()

    def infer(self, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        import openvino as ov

        try:
            request = self.idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            for i, array in enumerate(inputs):
                request.set_input_tensor(i, ov.Tensor(array, shared_memory=True))
            for i, array in enumerate(outputs):  # OpenVINO writes straight into the caller's tensors
                request.set_output_tensor(i, ov.Tensor(array, shared_memory=True))
            request.infer()
        finally:
            self.idle.put(request)


class OvModel:
    """One ONNX graph read once, compiled per input shape (an LRU of `config.shapes`), run on torch tensors."""

    def __init__(self, path: Path, artefact: Artefact, config: OvConfig = OvConfig(), cache_dir: Path | None = None,
                 core=None):
        import openvino as ov

        self.core = core or ov.Core()
        self.path = Path(path)
        self.config = config
        self.cache_dir = cache_dir
        self.name = artefact.name
        self.inputs = artefact.inputs
        self.outputs = artefact.outputs
        self.device = torch.device("cpu")
        self.precision = config.precision
        self.model = self.core.read_model(str(path))
        graph_inputs = [p.get_any_name() for p in self.model.inputs]
        graph_outputs = [o.get_any_name() for o in self.model.outputs]
        if graph_inputs != [i.name for i in self.inputs] or graph_outputs != [o.name for o in self.outputs]:
            raise ValueError(
                f"{path}: graph I/O {graph_inputs} -> {graph_outputs} does not match the manifest's spec "
                f"{[i.name for i in self.inputs]} -> {[o.name for o in self.outputs]}"
            )
        self._compiled: OrderedDict[tuple, _Compiled] = OrderedDict()
        self._lock = threading.Lock()  # one reshape + compile at a time: they change self.model
        self.compile_s = 0.0  # seconds spent compiling (or loading from the cache) so far

    def _properties(self) -> dict:
        properties = self.config.properties()
        if self.cache_dir is not None:  # one folder per setting (cache_folder says why)
            properties["CACHE_DIR"] = str(cache_folder(self.cache_dir, properties, self.core))
        return properties

    def blob_folder(self) -> Path | None:
        """Where a compile now reads and writes its blob (None: no model cache)."""
        return None if self.cache_dir is None else Path(self._properties()["CACHE_DIR"])

    def compiled_for(self, shapes: tuple) -> _Compiled:
        """The compiled model for these input shapes: from the LRU, else reshaped and compiled."""
        with self._lock:
            entry = self._compiled.get(shapes)
            if entry is not None:
                self._compiled.move_to_end(shapes)
                return entry
            return self._compile(shapes)

    def _compile(self, shapes: tuple) -> _Compiled:
        import time

        start = time.perf_counter()
        self.model.reshape({io.name: list(shape) for io, shape in zip(self.inputs, shapes)})
        compiled = self.core.compile_model(self.model, "CPU", self._properties())
        got = compiled_precision(compiled)
        if got != self.config.precision:  # never a bf16 engine silently f32, nor the reverse
            raise RuntimeError(f"OpenVINO compiled {self.name} with inference precision {got}, not the "
                               f"{self.config.precision} asked for")
        self.compile_s += time.perf_counter() - start
        entry = self._compiled[shapes] = _Compiled(compiled)
        while len(self._compiled) > self.config.shapes:
            self._compiled.popitem(last=False)
        return entry

    def run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        tensors = [feeds[io.name].detach().to(device="cpu", dtype=TORCH_DTYPES[io.dtype]).contiguous() for io in self.inputs]
        shapes = tuple(tuple(t.shape) for t in tensors)
        variables = solve_variables(self.inputs, {io.name: s for io, s in zip(self.inputs, shapes)})
        outputs = [torch.empty(io.shape(variables), dtype=TORCH_DTYPES[io.dtype]) for io in self.outputs]
        self.compiled_for(shapes).infer([t.numpy() for t in tensors], [o.numpy() for o in outputs])
        return outputs

    def constants(self) -> dict[str, object]:
        """The graph's Constant nodes that came from ONNX initializers, by initializer name (OpenVINO's
        ONNX reader names each such Constant's output tensor after the initializer)."""
        named = {}
        for op in self.model.get_ordered_ops():
            if op.get_type_name() == "Constant":
                for name in op.output(0).get_names():
                    named[name] = op
        return named

    def set_initializers(self, named: dict[str, np.ndarray]) -> None:
        """Replace the constants read from these ONNX initializers with new values (same shape; cast to
        the constant's dtype) and drop every compiled shape, so the next call compiles the new weights."""
        import openvino as ov

        constants = self.constants()
        unknown = [name for name in named if name not in constants]
        if unknown:
            raise KeyError(f"{self.name}: no constant from ONNX initializer(s) {unknown[:5]} in {self.path.name}")
        for name, value in named.items():
            old = constants[name]
            value = np.ascontiguousarray(np.asarray(value, dtype=old.get_element_type().to_dtype()))
            if list(value.shape) != list(old.get_output_shape(0)):
                raise ValueError(f"{self.name}: initializer {name!r} has shape {list(old.get_output_shape(0))}, "
                                 f"got {list(value.shape)}")
            new = ov.op.Constant(ov.Tensor(value))  # copies: the caller's array may change afterwards
            new.set_friendly_name(old.get_friendly_name())
            new.output(0).set_names(old.output(0).get_names())
            old.output(0).replace(new.output(0))
        self.model.validate_nodes_and_infer_types()
        with self._lock:
            self._compiled.clear()
            # New weights never go through the model cache: each LoRA set would leave a blob per shape
            # there, and a cache keyed on anything less than every weight would hand back the old ones.
            self.cache_dir = None


def resolve_precision(manifest: Manifest, dtype, core) -> str:
    """OpenVINO inference precision for a Runner dtype: None -> f32 (fp32 and fp16 engine dirs alike);
    bf16 only where the CPU multiplies bf16 natively."""
    from engine.optimizations import cpu_has_native_bf16

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, dtype)
    if name in (None, "fp32", "float32") or (name in ("fp16", "float16") and manifest.precision == "fp16"):
        return "f32"
    if name not in ("bf16", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: the openvino backend runs fp32 or bf16 ('fp32', 'bf16')")
    if not ov_has_bf16(core):
        native = cpu_has_native_bf16()
        cpu = core.get_property("CPU", "FULL_DEVICE_NAME")
        raise ValueError(f"dtype bf16: OpenVINO runs bf16 only on CPUs with AVX512-BF16 or AMX, and this one ({cpu}"
                         f"{'' if native is None else ', native bf16: ' + str(native)}) would run f32 instead; "
                         "use dtype='fp32' here")
    if manifest.precision == "fp16":
        warnings.warn("dtype bf16 on an fp16 engine dir: the graphs' fp16 weights are computed in bf16", stacklevel=3)
    return "bf16"


class OvBackend(GraphBackend):
    """The engine dir's ONNX graphs compiled by OpenVINO for the CPU; `precision` is what each runs."""

    name = "openvino"

    def __init__(self, engine_dir: Path, manifest: Manifest, nets: list[int], config: OvConfig | None = None,
                 dtype=None):
        import openvino as ov

        engine_dir = Path(engine_dir)
        core = ov.Core()
        if config is None:
            config = OvConfig(precision=resolve_precision(manifest, dtype, core))
        elif dtype is not None and resolve_precision(manifest, dtype, core) != config.precision:
            raise ValueError(f"dtype {dtype!r} and OvConfig(precision={config.precision!r}) disagree: give one")
        cache_dir = pick_cache_dir(engine_dir, config)
        self.config = config
        self.precision = config.precision
        # The precision the Runner reports: bf16 when asked for, else the graphs' own (fp32 or fp16 I/O).
        self.dtype = torch.bfloat16 if config.precision == "bf16" else (
            torch.float16 if manifest.precision == "fp16" else torch.float32)
        self.cache_dir = cache_dir
        super().__init__(manifest, nets, lambda a: OvModel(engine_dir / a.onnx, a, config, cache_dir, core),
                         engine_dir)

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling (or loading compiled models from the cache) so far, all graphs."""
        return sum(m.compile_s for m in self.models())

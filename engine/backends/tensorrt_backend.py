"""The TensorRT backend: plans built by `python -m engine.build --backend tensorrt`, run by tensor name.

Lifecycle, kept in separate steps: plan bytes on disk -> engine (deserialised once, its I/O names, modes,
dtypes and shapes checked against the manifest) -> execution context (created once, without its own
scratch memory) -> one device-memory block shared by every context (the engines run one after another on
one stream, so they never need their scratch at the same time; the block is the largest engine's need)
-> per call: `set_input_shape` / `set_tensor_address` for each input, output buffers sized from the
manifest's I/O spec (checked once per shape against the context's own output shapes), `execute_async_v3`
on the caller's current stream. Every TensorRT call that reports failure by its return value is checked.

Addresses: TensorRT needs every I/O address 256-byte aligned (`set_tensor_address` returns False
otherwise). torch's allocator aligns every allocation, but a view need not be (the guess-mode
`encoder_hidden_states[batch:]` starts batch * 77 * 768 elements in), so an input off the alignment is copied first.

CUDA graphs (UNet and ControlNet bodies only: their calls repeat every step; the text encoder, hint
encoder and VAE run once a generation, where a capture costs more than it saves): one graph per
input-shape key, at most `TrtRunConfig.max_graphs_per_model` per model (least recently used dropped),
each on an execution context of its own (a context's shape state is host-side and changes with the next
shape, so two graphs must not share one), captured after one plain run at that shape (TensorRT does
deferred set-up work on the first enqueue at a shape, which must not be captured), with static
input/output buffers of their own. Calls copy into the static inputs, replay, and return clones of the
outputs, so a caller never holds a buffer the next replay overwrites. A shape whose capture fails runs
without a graph from then on (with a warning), never fails the call. Graphs are dropped whenever the
shared memory block is re-allocated (they captured its address) and after a refit (`set_initializers`).

TensorRT 10 and 11 are handled. Name-based I/O exists since 8.5, but this file also uses 10.0's
APIs (user-managed context memory, `execute_async_v3` with 10's semantics, INT64 tensors), so versions
below 10 are refused. One `trt.Logger` serves the whole process (`process_logger`): TensorRT keeps the
first logger it is given and only warns about later ones.
"""
from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.backends.onnxruntime_backend import TORCH_DTYPES, GraphBackend
from engine.manifest import Artefact, Manifest, solve_variables

MIN_MAJOR = 10
ALIGNMENT = 256  # bytes: what set_tensor_address accepts
GRAPH_KINDS = ("unet", "controlnet")  # called every step: where a CUDA graph pays
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32"}  # trt.DataType names


def trt_major(version: str) -> int:
    """The major version of a TensorRT version string ("10.9.0.34" -> 10); below 10 is refused."""
    major = int(str(version).split(".")[0])
    if major < MIN_MAJOR:
        raise ValueError(f"TensorRT {version} is too old: this engine uses TensorRT {MIN_MAJOR}'s APIs, need >= {MIN_MAJOR}")
    return major


@functools.cache
def process_logger(trt):
    """The one trt.Logger of this process (builder, runtime and refitter share it)."""
    return trt.Logger(trt.Logger.WARNING)


@dataclass(frozen=True)
class TrtRunConfig:
    cuda_graphs: bool = True  # capture UNet and ControlNet calls, one CUDA graph per input-shape key
    max_graphs_per_model: int = 4  # each holds its static buffers; a serve loop sees one or two shapes

    def __post_init__(self):
        if not isinstance(self.max_graphs_per_model, int) or self.max_graphs_per_model < 1:
            raise ValueError(f"max_graphs_per_model must be an integer >= 1, got {self.max_graphs_per_model!r}")


class TrtRuntime:
    """The TensorRT runtime, a capture stream and the device memory shared by every engine's context."""

    def __init__(self, trt, config: TrtRunConfig = TrtRunConfig(), device: torch.device = torch.device("cuda", 0)):
        self.trt = trt
        self.version = trt.__version__
        self.major = trt_major(self.version)
        self.device = torch.device(device)
        self.gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.config = config
        self.runtime = trt.Runtime(process_logger(trt))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # graph capture only
        self.models: list[TrtModel] = []
        self.shared: torch.Tensor | None = None  # the scratch block every context uses

    @classmethod
    def create(cls, config: TrtRunConfig = TrtRunConfig()) -> "TrtRuntime":
        import tensorrt

        if not torch.cuda.is_available():
            raise ValueError("the tensorrt backend needs a CUDA GPU, and torch sees none")
        return cls(tensorrt, config)

    def deserialize(self, plan: Path):
        engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if engine is None:
            raise ValueError(f"TensorRT could not deserialise {str(plan)!r} (built by another TensorRT version or GPU?)")
        return engine

    def context(self, engine):
        """An execution context without scratch memory of its own (allocate_shared_memory supplies it)."""
        context = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory? see its log)")
        return context

    def stream_handle(self) -> int:
        """The caller's current CUDA stream, where plain (uncaptured) runs are enqueued."""
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def allocate_shared_memory(self) -> None:
        """One block, as large as the largest engine needs, bound to every context."""
        need = max((m.memory_size() for m in self.models), default=0)
        if self.shared is not None and self.shared.numel() >= need:
            for model in self.models:
                model.bind_memory(self.shared)  # the graphs' contexts already hold this block
            return
        self.shared = torch.empty(max(need, 1), dtype=torch.uint8, device=self.device)
        for model in self.models:
            model.graphs.clear()  # captured with the old block's address
            model.bind_memory(self.shared)

    def release(self, model: "TrtModel") -> None:
        """Forget one model: its engine, contexts and graph buffers go with the last reference (the build
        drops each plan once it is verified, so the next build_plan has the GPU's memory)."""
        self.models = [m for m in self.models if m is not model]
        model.graphs.clear()
        model.engine = model.context = None
        if not self.models:
            self.shared = None


def check_engine_io(trt, engine, artefact: Artefact, where) -> None:
    """The plan's I/O tensors are the manifest's: same names, modes, dtypes, ranks and fixed dims."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    expected = [io.name for io in artefact.inputs + artefact.outputs]
    if sorted(names) != sorted(expected):
        missing, extra = [n for n in expected if n not in names], [n for n in names if n not in expected]
        raise ValueError(f"{where}: plan tensors {names} do not match the manifest's spec {expected}: missing from the "
                         f"plan {missing}, not in the manifest {extra}")
    modes = [(io, trt.TensorIOMode.INPUT) for io in artefact.inputs] + [(io, trt.TensorIOMode.OUTPUT) for io in artefact.outputs]
    for io, mode in modes:
        got_mode = engine.get_tensor_mode(io.name)
        if got_mode != mode:
            raise ValueError(f"{where}: tensor {io.name!r} is {got_mode} in the plan, {mode} in the manifest")
        dtype = getattr(trt.DataType, TRT_DTYPES[io.dtype])
        got_dtype = engine.get_tensor_dtype(io.name)
        if got_dtype != dtype:
            raise ValueError(f"{where}: tensor {io.name!r} is {got_dtype} in the plan, {io.dtype} in the manifest")
        shape = tuple(engine.get_tensor_shape(io.name))  # -1 where the profile leaves a dim free
        fixed_ok = all(not isinstance(d, int) or s == d for d, s in zip(io.dims, shape))
        if len(shape) != len(io.dims) or not fixed_ok:
            raise ValueError(f"{where}: tensor {io.name!r} has shape {shape} in the plan; the manifest says {io.dims}")


def aligned_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor at a 256-byte-aligned address. torch's CUDA allocator aligns
    every block to 512 bytes, so on a GPU this is torch.empty; its CPU allocator only to 64."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.data_ptr() % ALIGNMENT == 0:
        return out
    nbytes = out.numel() * out.element_size()
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    skip = -raw.data_ptr() % ALIGNMENT
    return raw[skip:skip + nbytes].view(dtype).view(shape)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor, or an aligned copy of it where its address is off TensorRT's 256 bytes."""
    if tensor.numel() == 0 or tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    return aligned_empty(tensor.shape, tensor.dtype, tensor.device).copy_(tensor)


class TrtModel:
    """One plan: engine, context, and per-shape CUDA graphs; `run(feeds)` like OrtModel."""

    def __init__(self, runtime: TrtRuntime, plan: Path, artefact: Artefact):
        self.runtime = runtime
        self.name = artefact.name
        self.inputs = artefact.inputs
        self.outputs = artefact.outputs
        self.device = runtime.device
        self.engine = runtime.deserialize(plan)
        check_engine_io(runtime.trt, self.engine, artefact, plan)
        self.context = runtime.context(self.engine)  # for plain (uncaptured) runs
        self.use_graphs = runtime.config.cuda_graphs and artefact.kind in GRAPH_KINDS
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()  # shape key -> (graph, context, static in, static out), LRU
        self.uncapturable: set[tuple] = set()  # shape keys whose capture failed: run plainly
        self._checked: set[tuple] = set()  # shape keys whose output shapes matched the context's
        runtime.models.append(self)

    def memory_size(self) -> int:
        engine = self.engine
        return int(engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size)

    def bind_memory(self, block: torch.Tensor, context=None) -> None:
        context = context or self.context
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: pointer and size
            context.set_device_memory(block.data_ptr(), block.numel())
        else:
            context.device_memory = block.data_ptr()

    def _address(self, context, name: str, tensor: torch.Tensor) -> None:
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"{self.name}: TensorRT refused the address of {name!r} ({tensor.data_ptr():#x}, "
                               f"{tensor.data_ptr() % ALIGNMENT} bytes off its {ALIGNMENT}-byte alignment)")

    def _bind(self, context, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Set shapes and addresses; returns freshly allocated outputs bound to the context."""
        shapes = {io.name: tuple(t.shape) for io, t in zip(self.inputs, inputs)}
        variables = solve_variables(self.inputs, shapes)
        for io, tensor in zip(self.inputs, inputs):
            if not context.set_input_shape(io.name, tuple(tensor.shape)):
                raise ValueError(f"{self.name}: input {io.name!r} shape {tuple(tensor.shape)} is outside the plan's profile")
            self._address(context, io.name, tensor)
        key = tuple(shapes.values())
        outputs = []
        for io in self.outputs:
            shape = io.shape(variables)
            if key not in self._checked:
                planned = tuple(context.get_tensor_shape(io.name))
                if planned != shape:
                    raise ValueError(f"{self.name}: output {io.name!r} is {planned} in the plan at inputs {shapes}; "
                                     f"the manifest's spec gives {shape}")
            out = aligned_empty(shape, TORCH_DTYPES[io.dtype], self.device)
            self._address(context, io.name, out)
            outputs.append(out)
        self._checked.add(key)
        return outputs

    def _execute(self, context, stream_handle: int) -> None:
        if not context.execute_async_v3(stream_handle):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _prepare(self, feeds: dict) -> list[torch.Tensor]:
        return [aligned(feeds[io.name].to(device=self.device, dtype=TORCH_DTYPES[io.dtype]).contiguous())
                for io in self.inputs]

    def run(self, feeds: dict) -> list[torch.Tensor]:
        inputs = self._prepare(feeds)
        key = tuple(tuple(t.shape) for t in inputs)
        entry = self._graph(key, inputs) if self.use_graphs and key not in self.uncapturable else None
        if entry is None:
            outputs = self._bind(self.context, inputs)
            self._execute(self.context, self.runtime.stream_handle())
            return outputs
        return self._replay(entry, inputs)

    def _graph(self, key: tuple, inputs: list[torch.Tensor]):
        """The graph for this shape key (captured now if new), or None where capture failed."""
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        try:
            entry = self._capture(inputs)
        except RuntimeError as err:
            warnings.warn(f"{self.name}: CUDA graph capture failed at input shapes {key} ({err}); this shape "
                          "runs without a graph", RuntimeWarning, stacklevel=3)
            self.uncapturable.add(key)
            return None
        self.graphs[key] = entry
        while len(self.graphs) > self.runtime.config.max_graphs_per_model:
            self.graphs.popitem(last=False)
        return entry

    def _replay(self, entry: tuple, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        graph, _, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()  # on the current stream, after the copies
        return [o.clone() for o in static_out]

    def _capture(self, inputs: list[torch.Tensor]) -> tuple:
        stream = self.runtime.stream
        if self.runtime.shared is None:
            self.runtime.allocate_shared_memory()
        context = self.runtime.context(self.engine)
        self.bind_memory(self.runtime.shared, context)
        static_in = [aligned(t.clone()) for t in inputs]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            static_out = self._bind(context, static_in)
            self._execute(context, stream.cuda_stream)  # the first enqueue at a shape does set-up work that must not be captured
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._execute(context, stream.cuda_stream)
        return graph, context, static_in, static_out

    def set_initializers(self, named: dict) -> None:
        """Refit the plan with new values for ONNX initializers (name -> numpy array in the graph's dtype),
        e.g. UNet weights with a LoRA merged in; the plan must have been built refittable. Graphs captured
        on the old weights are dropped."""
        from engine.backends.tensorrt_refit import refit

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no enqueued run may read weights while they change
        refit(self.runtime.trt, self.engine, named, process_logger(self.runtime.trt), self.name)
        self.graphs.clear()


class TrtBackend(GraphBackend):
    """The backend interface over an engine dir's TensorRT plans.

    ControlNet residuals stay in the plans' dtype from the ControlNet to the UNet (summed there in that
    dtype, as diffusers' fp16 pipeline does): no fp16 -> fp32 -> fp16 casts around each net."""

    name = "tensorrt"
    float_residuals = False

    def __init__(self, engine_dir: Path, manifest: Manifest, nets: list[int], runtime: TrtRuntime):
        engine_dir = Path(engine_dir)
        for artefact in manifest.artefacts.values():
            if not artefact.plan:
                raise ValueError(f"artefact {artefact.name!r} has no TensorRT plan: rebuild with --backend tensorrt")
        super().__init__(manifest, nets, lambda a: TrtModel(runtime, engine_dir / a.plan, a), engine_dir)
        runtime.allocate_shared_memory()
        self.runtime = runtime
        self.provider = f"TensorRT {runtime.version}"
        self.sizes = dict(manifest.sizes)  # the profiles' range: requests are checked against it (check_request)

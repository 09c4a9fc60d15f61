"""The TensorRT backend: plans built by `python -m engine.build --backend tensorrt`, run by tensor name.

Lifecycle, kept in separate steps: plan bytes on disk -> engine (deserialised once) -> execution context
(created once, without its own scratch memory) -> one device-memory block shared by every context (the
engines run one after another on one stream, so they never need their scratch at the same time; the
block is the largest engine's need) -> per call: `set_input_shape` / `set_tensor_address` for each
input, output buffers sized from the manifest's I/O spec, `execute_async_v3`.

CUDA graphs: one per input-shape key, each on an execution context of its own (a context's shape state
is host-side and changes with the next shape, so two graphs must not share one), captured after one
plain run at that shape (TensorRT does deferred set-up work on the first enqueue at a shape, which must
not be captured), with static input/output buffers of their own. Calls copy into the static inputs, replay, and return clones of the outputs, so a
caller never holds a buffer the next replay overwrites. Graphs are dropped whenever the shared memory
block is re-allocated, because they captured its address.

TensorRT 10 and 11 are both handled; versions below 10 lack the name-based I/O API and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.backends.onnxruntime_backend import TORCH_DTYPES, GraphBackend
from engine.manifest import Artefact, Manifest, solve_variables

MIN_MAJOR = 10


def trt_major(version: str) -> int:
    major = int(str(version).split(".")[0])
    if major < MIN_MAJOR:
        raise ValueError(f"TensorRT {version} is too old: the name-based I/O API needs TensorRT >= {MIN_MAJOR}")
    return major


@dataclass(frozen=True)
class TrtRunConfig:
    cuda_graphs: bool = True  # capture one CUDA graph per input-shape key


class TrtRuntime:
    """The TensorRT runtime, the CUDA stream and the device memory shared by every engine's context."""

    def __init__(self, trt, config: TrtRunConfig = TrtRunConfig()):
        self.trt = trt
        self.version = trt.__version__
        self.major = trt_major(self.version)
        self.gpu = torch.cuda.get_device_name(0)
        self.device = torch.device("cuda", 0)
        self.config = config
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream(self.device)
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
        return engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)

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


class TrtModel:
    """One plan: engine, context, and per-shape CUDA graphs; `run(feeds)` like OrtModel."""

    def __init__(self, runtime: TrtRuntime, plan: Path, artefact: Artefact):
        self.runtime = runtime
        self.name = artefact.name
        self.inputs = artefact.inputs
        self.outputs = artefact.outputs
        self.device = runtime.device
        self.engine = runtime.deserialize(plan)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = [io.name for io in self.inputs + self.outputs]
        if sorted(names) != sorted(expected):
            raise ValueError(f"{plan}: plan tensors {names} do not match the manifest's spec {expected}")
        self.context = runtime.context(self.engine)  # for plain (uncaptured) runs
        self.graphs: dict[tuple, tuple] = {}  # shape key -> (graph, context, static inputs, static outputs)
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

    def _bind(self, context, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Set shapes and addresses; returns freshly allocated outputs bound to the context."""
        shapes = {io.name: tuple(t.shape) for io, t in zip(self.inputs, inputs)}
        variables = solve_variables(self.inputs, shapes)
        for io, tensor in zip(self.inputs, inputs):
            if not context.set_input_shape(io.name, tuple(tensor.shape)):
                raise ValueError(f"{self.name}: input {io.name!r} shape {tuple(tensor.shape)} is outside the plan's profile")
            context.set_tensor_address(io.name, tensor.data_ptr())
        outputs = []
        for io in self.outputs:
            out = torch.empty(io.shape(variables), dtype=TORCH_DTYPES[io.dtype], device=self.device)
            context.set_tensor_address(io.name, out.data_ptr())
            outputs.append(out)
        return outputs

    def _execute(self, context, stream: torch.cuda.Stream) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _prepare(self, feeds: dict) -> list[torch.Tensor]:
        return [feeds[io.name].to(device=self.device, dtype=TORCH_DTYPES[io.dtype]).contiguous() for io in self.inputs]

    def run(self, feeds: dict) -> list[torch.Tensor]:
        inputs = self._prepare(feeds)
        stream = self.runtime.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.runtime.config.cuda_graphs:
            with torch.cuda.stream(stream):
                outputs = self._bind(self.context, inputs)
                self._execute(self.context, stream)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            return outputs
        key = tuple(tuple(t.shape) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, _, static_in, static_out = self.graphs[key]
        with torch.cuda.stream(stream):
            for dst, src in zip(static_in, inputs):
                dst.copy_(src, non_blocking=True)
            graph.replay()
            result = [o.clone() for o in static_out]
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return result

    def _capture(self, inputs: list[torch.Tensor]) -> tuple:
        stream = self.runtime.stream
        if self.runtime.shared is None:
            self.runtime.allocate_shared_memory()
        context = self.runtime.context(self.engine)
        self.bind_memory(self.runtime.shared, context)
        static_in = [t.clone() for t in inputs]
        with torch.cuda.stream(stream):
            static_out = self._bind(context, static_in)
            self._execute(context, stream)  # the first enqueue at a shape does set-up work that must not be captured
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._execute(context, stream)
        return graph, context, static_in, static_out


class TrtBackend(GraphBackend):
    """The backend interface over an engine dir's TensorRT plans."""

    name = "tensorrt"

    def __init__(self, engine_dir: Path, manifest: Manifest, nets: list[int], runtime: TrtRuntime):
        engine_dir = Path(engine_dir)
        for artefact in manifest.artefacts.values():
            if not artefact.plan:
                raise ValueError(f"artefact {artefact.name!r} has no TensorRT plan: rebuild with --backend tensorrt")
        super().__init__(manifest, nets, lambda a: TrtModel(runtime, engine_dir / a.plan, a), engine_dir)
        runtime.allocate_shared_memory()
        self.runtime = runtime
        self.provider = f"TensorRT {runtime.version}"

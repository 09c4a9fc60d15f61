"""Stand-ins for the `tensorrt` Python module, one per major version, exact where the real API is exact.

TensorRT cannot be installed here (FACTS.md), so its callers are tested against these. What is exact,
from TensorRT's Python API reference (10.x and 11.x) and FACTS.md's review notes:
- `__version__` has four parts ("10.9.0.34");
- 10.x `NetworkDefinitionCreationFlag`: EXPLICIT_BATCH=0 (deprecated, ignored), STRONGLY_TYPED=1,
  PREFER_AOT_PYTHON_PLUGINS=2, PREFER_JIT_PYTHON_PLUGINS=3; 11.x drops EXPLICIT_BATCH and keeps
  STRONGLY_TYPED only as a deprecated, ignored flag (every network is strongly typed);
- `BuilderFlag` names per version: 10.x has FP16, INT8, BF16, FP8, INT4, FP4 and the two precision-
  constraint flags; 11.x has none of them. TF32, REFIT, REFIT_IDENTICAL are in both. The numeric values
  are 10.x's (the code under test uses names only);
- a new builder config has TF32 set (TensorRT's default in every version); `set_flag`/`clear_flag`/
  `get_flag`; setting a precision flag on a strongly typed network fails the build (returns None);
- `add_optimization_profile` returns the profile's index, or -1 for an invalid profile;
- `set_timing_cache` returns a bool (False on a mismatched cache with ignore_mismatch=False);
- `set_input_shape` and `set_tensor_address` return bools; an address off 256-byte alignment is refused;
- `execute_async_v3(stream)` returns a bool; engines report I/O by name, mode, dtype and shape (-1 where
  dynamic), and a context reports output shapes once input shapes are set;
- `Refitter(engine, logger)`: get_all_weights, set_named_weights -> bool, get_missing_weights,
  refit_cuda_engine -> bool; an engine built without REFIT has no refittable weights.
Not modelled: real kernels. A fake context records what it was bound to; outputs are left as allocated.

With `onnx_plans=True` a plan is built from a real ONNX file and ONNX Runtime stands in for the kernels: the
plan holds the graph's I/O (names, modes, dtypes, -1 where a dim is dynamic, as TensorRT reports them), its one
profile and its initializers; a context reports output shapes and runs the graph on the bytes at the addresses
bound to each name, writing the outputs to theirs; the Refitter's weights are the graph's initializers by name
(count and dtype checked) and a refit changes what later runs compute. So a backend that binds a tensor to the
wrong name, or an output to the wrong buffer, gets a wrong image, and a refit that misses a weight a wrong one.
"""
from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import math
import types

import numpy as np

VERSIONS = {10: "10.9.0.34", 11: "11.4.0.9"}

_BUILDER_FLAGS_10 = dict(
    FP16=0, INT8=1, DEBUG=2, GPU_FALLBACK=3, REFIT=4, DISABLE_TIMING_CACHE=5, TF32=6, SPARSE_WEIGHTS=7,
    SAFETY_SCOPE=8, OBEY_PRECISION_CONSTRAINTS=9, PREFER_PRECISION_CONSTRAINTS=10, DIRECT_IO=11,
    REJECT_EMPTY_ALGORITHMS=12, VERSION_COMPATIBLE=13, EXCLUDE_LEAN_RUNTIME=14, FP8=15, ERROR_ON_TIMING_CACHE_MISS=16,
    BF16=17, DISABLE_COMPILATION_CACHE=18, STRIP_PLAN=19, REFIT_IDENTICAL=20, WEIGHT_STREAMING=21, INT4=22,
    REFIT_INDIVIDUAL=23, STRICT_NANS=24, MONITOR_MEMORY=25, FP4=26, EDITABLE_TIMING_CACHE=27,
)
PRECISION_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS")


class _Enum(enum.IntEnum):
    """pybind11 enums print as "Class.NAME" and compare by value."""

    def __str__(self):
        return f"{type(self).__name__}.{self.name}"


class DataType(_Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(_Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(_Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


ONNX_PLAN = b"FAKE-ONNX-PLAN\n"  # how an onnx_plans plan starts (its JSON follows)
_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 7: DataType.INT64, 6: DataType.INT32}  # onnx.TensorProto
_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64, DataType.INT32: np.int32}


def onnx_plan(onnx_path: str, profile: dict, refittable: bool) -> bytes:
    """The plan an onnx_plans builder writes: the graph's I/O and float initializers as TensorRT would report
    them, the profile, and where the graph is (ONNX Runtime runs it at execution)."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph

    def tensor(value, mode):
        t = value.type.tensor_type
        return [value.name, int(mode), int(_ONNX_TYPES[t.elem_type]),
                [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]]

    io = [tensor(v, TensorIOMode.INPUT) for v in graph.input] + [tensor(v, TensorIOMode.OUTPUT) for v in graph.output]
    weights = {i.name: [int(_ONNX_TYPES[i.data_type]), math.prod(i.dims)] for i in graph.initializer
               if _ONNX_TYPES.get(i.data_type) in (DataType.FLOAT, DataType.HALF)}
    return ONNX_PLAN + json.dumps(dict(onnx=onnx_path, io=io, profile=profile, refittable=refittable,
                                       weights=weights)).encode()


class Weights:
    def __init__(self, array):
        self.array = array
        self.size = array.size


def fake_tensorrt(major: int, *, graph_inputs=("sample",), parse_ok: bool = True, reject_profile: bool = False,
                  cache_mismatch: bool = False, engine_io=None, refittable_weights=(), combined_weights=None,
                  refit_ok: bool = True, onnx_plans: bool = False):
    """A fresh tensorrt module of `major` (10 or 11) and the record of what was asked of it.

    graph_inputs: the input names the parsed ONNX graph has. engine_io: [(name, mode, DataType, shape)] of
    every deserialised engine (shape with -1 where dynamic). refittable_weights: the weight names a
    REFIT-built engine reports; combined_weights: {name: partner} pairs the builder fused, so setting one
    leaves the other missing until it is set too. onnx_plans: plans of real ONNX files, run in ONNX Runtime
    (the module docstring); graph_inputs, engine_io and refittable_weights then come from each graph.
    calls["builds"] holds one record per build: the ONNX file, the network's typing, the flags set, the profiles."""
    flags = dict(_BUILDER_FLAGS_10)
    if major >= 11:
        for name in PRECISION_FLAGS:
            del flags[name]
        creation = dict(STRONGLY_TYPED=1, PREFER_AOT_PYTHON_PLUGINS=2, PREFER_JIT_PYTHON_PLUGINS=3)
    else:
        creation = dict(EXPLICIT_BATCH=0, STRONGLY_TYPED=1, PREFER_AOT_PYTHON_PLUGINS=2, PREFER_JIT_PYTHON_PLUGINS=3)
    BuilderFlag = _Enum("BuilderFlag", flags)
    CreationFlag = _Enum("NetworkDefinitionCreationFlag", creation)
    calls = dict(shapes={}, profiles=0, networks=[], configs=[], contexts=[], refits=[], built_refittable=None,
                 loggers=0, builds=[], errors=[])

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=WARNING):
            calls["loggers"] += 1
            self.min_severity = min_severity

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, creation_flags):
            self.creation_flags = creation_flags
            self.strongly_typed = major >= 11 or bool(creation_flags & (1 << int(CreationFlag.STRONGLY_TYPED)))
            self.inputs = []
            self.onnx_path = None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Config:
        def __init__(self):
            self.flags = 1 << int(BuilderFlag.TF32)  # on by default
            self.builder_optimization_level = 3
            self.profiles = []

        def set_flag(self, flag):
            self.flags |= 1 << int(flag)

        def clear_flag(self, flag):
            self.flags &= ~(1 << int(flag))

        def get_flag(self, flag):
            return bool(self.flags & (1 << int(flag)))

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def add_optimization_profile(self, profile):
            if reject_profile:
                return -1
            calls["profiles"] += 1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            calls["cache_in"] = bytes(data)
            return types.SimpleNamespace(serialize=lambda: b"TIMING")

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["cache_set"] = True
            return not (cache_mismatch and not ignore_mismatch)

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"TIMING")

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = calls["shapes"][name] = [list(low), list(opt), list(high)]

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            network = Network(flags)
            calls["networks"].append(network)
            return network

        def create_builder_config(self):
            config = Config()
            calls["configs"].append(config)
            return config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if network.strongly_typed and any(config.get_flag(getattr(BuilderFlag, f)) for f in PRECISION_FLAGS
                                              if hasattr(BuilderFlag, f)):
                return None  # TensorRT: precision flags are not allowed on a strongly typed network
            calls["built_refittable"] = config.get_flag(BuilderFlag.REFIT)
            calls["builds"].append(dict(onnx=network.onnx_path, strongly_typed=network.strongly_typed,
                                        creation_flags=network.creation_flags,
                                        flags={f.name for f in BuilderFlag if config.get_flag(f)},
                                        profiles=[dict(p.shapes) for p in config.profiles]))
            if onnx_plans:
                return onnx_plan(network.onnx_path, config.profiles[0].shapes, calls["built_refittable"])
            return b"PLAN"

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            calls["parsed"] = self.network.onnx_path = path
            if not parse_ok:
                self.num_errors = 1
                return False
            if onnx_plans:
                import onnx

                names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
            else:
                names = graph_inputs
            self.network.inputs = [Tensor(n) for n in names]
            return True

        def get_error(self, i):
            return "In node 3 (FancyOp): No importer registered for op: FancyOp"

    class Context:
        def __init__(self, engine, strategy):
            self.engine, self.strategy = engine, strategy
            self.input_shapes, self.addresses, self.executed, self.memory = {}, {}, [], None
            self._last_run = (None, None, None)  # onnx_plans: (session, input bytes, outputs) of the last graph run
            calls["contexts"].append(self)

        def set_device_memory(self, ptr, size):
            self.memory = (ptr, size)

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.profile[name]
            if len(shape) != len(low) or any(not (a <= s <= c) for a, s, c in zip(low, shape, high)):
                return False
            self.input_shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            if ptr % 256:
                return False
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name):
            if self.engine.plan is None:
                return self.engine.output_shape(name, self.input_shapes)
            if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
                return self.input_shapes.get(name, self.engine.get_tensor_shape(name))
            if self._unbound(TensorIOMode.INPUT):  # TensorRT: unknown until every input's shape is set
                return self.engine.get_tensor_shape(name)
            return self._run_graph()[name].shape

        def _unbound(self, *modes):
            """The I/O tensors of these modes (default: all) without an address, inputs also without a shape."""
            return [n for n, mode, *_ in self.engine.io if mode in (modes or (TensorIOMode.INPUT, TensorIOMode.OUTPUT))
                    and (n not in self.addresses or (mode == TensorIOMode.INPUT and n not in self.input_shapes))]

        def _read_inputs(self):
            """The bytes each input's address holds now (what the engine would read)."""
            return {name: ctypes.string_at(self.addresses[name], np.dtype(_NUMPY[self.engine.get_tensor_dtype(name)]).itemsize
                                           * math.prod(shape)) for name, shape in self.input_shapes.items()}

        def _run_graph(self, inputs=None):
            """onnx_plans: the graph's outputs on these input bytes (default: those bound now). The backend asks
            for output shapes, then executes on the same bytes: the graph runs once for both (a refit makes a new
            session, so it runs again)."""
            inputs = self._read_inputs() if inputs is None else inputs
            session = self.engine.session()
            if self._last_run[0] is session and self._last_run[1] == inputs:
                return self._last_run[2]
            feeds = {name: np.frombuffer(data, _NUMPY[self.engine.get_tensor_dtype(name)]).reshape(self.input_shapes[name])
                     for name, data in inputs.items()}
            names = [n for n, mode, *_ in self.engine.io if mode == TensorIOMode.OUTPUT]
            outputs = dict(zip(names, session.run(names, feeds)))
            self._last_run = (session, inputs, outputs)
            return outputs

        def execute_async_v3(self, stream_handle):
            """Records the stream and the input bytes; onnx_plans: runs the graph on them and writes each output
            to its address (refused, as TensorRT does, while a tensor has no address or an input no shape)."""
            if self.engine.plan is not None and self._unbound():
                calls["errors"].append(f"execute_async_v3: no shape or address for {self._unbound()}")
                return False
            inputs = self._read_inputs()
            self.executed.append(dict(stream=stream_handle, inputs=inputs))
            if self.engine.plan is not None:
                for name, array in self._run_graph(inputs).items():
                    array = np.ascontiguousarray(array)
                    ctypes.memmove(self.addresses[name], array.ctypes.data, array.nbytes)
            return True

    class Engine:
        def __init__(self, io, profile, output_shape, refittable, plan=None):
            self.io, self.profile, self.output_shape, self.refittable = io, profile, output_shape, refittable
            self.device_memory_size_v2 = 1024
            self.plan = plan  # onnx_plans: the plan's record (onnx_plan)
            self.refitted = {}  # onnx_plans: initializer name -> the value a refit gave it
            self._session = None

        def session(self):
            """onnx_plans: the graph in ONNX Runtime, with the refitted initializers in place of the file's."""
            if self._session is None:
                import onnx
                import onnxruntime
                from onnx import numpy_helper

                model = onnx.load(self.plan["onnx"])
                for init in model.graph.initializer:
                    if init.name in self.refitted:
                        init.CopyFrom(numpy_helper.from_array(self.refitted[init.name].reshape(init.dims), init.name))
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = 1
                options.log_severity_level = 3
                self._session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                             providers=["CPUExecutionProvider"])
            return self._session

        @property
        def num_io_tensors(self):
            return len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def _find(self, name):
            return next(t for t in self.io if t[0] == name)

        def get_tensor_mode(self, name):
            return self._find(name)[1]

        def get_tensor_dtype(self, name):
            return self._find(name)[2]

        def get_tensor_shape(self, name):
            return tuple(self._find(name)[3])

        def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
            return Context(self, strategy)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            self.engine_setup = None  # (profile, output_shape(name, input_shapes)) set by the test

        def deserialize_cuda_engine(self, data):
            if onnx_plans and bytes(data).startswith(ONNX_PLAN):
                plan = json.loads(bytes(data)[len(ONNX_PLAN):])
                io = [(n, TensorIOMode(mode), DataType(dtype), tuple(shape)) for n, mode, dtype, shape in plan["io"]]
                return Engine(io, plan["profile"], None, plan["refittable"], plan)
            if data != b"PLAN":
                return None
            profile, output_shape = self.engine_setup
            return Engine(list(engine_io or []), profile, output_shape, refittable=calls["built_refittable"] is not False)

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.set = engine, {}
            calls["refits"].append(self)

        def _weights(self):
            return self.engine.plan["weights"] if self.engine.plan is not None else refittable_weights

        def get_all_weights(self):
            return list(self._weights()) if self.engine.refittable else []

        def set_named_weights(self, name, weights):
            if name not in self._weights() or not isinstance(weights, Weights):
                return False
            if self.engine.plan is not None:  # TensorRT: the build's element count and type
                dtype, count = self.engine.plan["weights"][name]
                if weights.array.dtype != _NUMPY[DataType(dtype)] or weights.size != count:
                    return False
            self.set[name] = weights
            return True

        def get_missing_weights(self):
            pairs = combined_weights or {}
            return [pairs[n] for n in self.set if n in pairs and pairs[n] not in self.set]

        def refit_cuda_engine(self):
            if not (refit_ok and not self.get_missing_weights()):
                return False
            if self.engine.plan is not None:
                self.engine.refitted.update({n: w.array.copy() for n, w in self.set.items()})
                self.engine._session = None  # later runs compute with the new weights
            return True

    module = types.ModuleType("tensorrt")
    module.__dict__.update(
        __spec__=importlib.machinery.ModuleSpec("tensorrt", None),  # as an imported module has (find_spec reads it)
        __version__=VERSIONS[major], Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        Refitter=Refitter, Weights=Weights, NetworkDefinitionCreationFlag=CreationFlag, BuilderFlag=BuilderFlag,
        MemoryPoolType=_Enum("MemoryPoolType", dict(WORKSPACE=0, DLA_MANAGED_SRAM=1)), DataType=DataType,
        TensorIOMode=TensorIOMode, ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy,
    )
    return module, calls

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
"""
from __future__ import annotations

import ctypes
import enum
import math
import types

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


class Weights:
    def __init__(self, array):
        self.array = array
        self.size = array.size


def fake_tensorrt(major: int, *, graph_inputs=("sample",), parse_ok: bool = True, reject_profile: bool = False,
                  cache_mismatch: bool = False, engine_io=None, refittable_weights=(), combined_weights=None,
                  refit_ok: bool = True):
    """A fresh tensorrt module of `major` (10 or 11) and the record of what was asked of it.

    graph_inputs: the input names the parsed ONNX graph has. engine_io: [(name, mode, DataType, shape)] of
    every deserialised engine (shape with -1 where dynamic). refittable_weights: the weight names a
    REFIT-built engine reports; combined_weights: {name: partner} pairs the builder fused, so setting one
    leaves the other missing until it is set too."""
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
                 loggers=0)

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

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Config:
        def __init__(self):
            self.flags = 1 << int(BuilderFlag.TF32)  # on by default
            self.builder_optimization_level = 3

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
            return calls["profiles"] - 1

        def create_timing_cache(self, data):
            calls["cache_in"] = bytes(data)
            return types.SimpleNamespace(serialize=lambda: b"TIMING")

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["cache_set"] = True
            return not (cache_mismatch and not ignore_mismatch)

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"TIMING")

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls["shapes"][name] = [list(low), list(opt), list(high)]

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
            return b"PLAN"

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            calls["parsed"] = path
            if not parse_ok:
                self.num_errors = 1
                return False
            self.network.inputs = [Tensor(n) for n in graph_inputs]
            return True

        def get_error(self, i):
            return "In node 3 (FancyOp): No importer registered for op: FancyOp"

    class Context:
        def __init__(self, engine, strategy):
            self.engine, self.strategy = engine, strategy
            self.input_shapes, self.addresses, self.executed, self.memory = {}, {}, [], None
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
            return self.engine.output_shape(name, self.input_shapes)

        def execute_async_v3(self, stream_handle):
            """Records the stream and the bytes each input address holds now (what the engine would read)."""
            inputs = {}
            for name, shape in self.input_shapes.items():
                itemsize = {DataType.FLOAT: 4, DataType.HALF: 2, DataType.INT64: 8, DataType.INT32: 4}[self.engine.get_tensor_dtype(name)]
                inputs[name] = ctypes.string_at(self.addresses[name], itemsize * math.prod(shape))
            self.executed.append(dict(stream=stream_handle, inputs=inputs))
            return True

    class Engine:
        def __init__(self, io, profile, output_shape, refittable):
            self.io, self.profile, self.output_shape, self.refittable = io, profile, output_shape, refittable
            self.device_memory_size_v2 = 1024

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
            if data != b"PLAN":
                return None
            profile, output_shape = self.engine_setup
            return Engine(list(engine_io or []), profile, output_shape, refittable=calls["built_refittable"] is not False)

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.set = engine, {}
            calls["refits"].append(self)

        def get_all_weights(self):
            return list(refittable_weights) if self.engine.refittable else []

        def set_named_weights(self, name, weights):
            if name not in refittable_weights or not isinstance(weights, Weights):
                return False
            self.set[name] = weights
            return True

        def get_missing_weights(self):
            pairs = combined_weights or {}
            return [pairs[n] for n in self.set if n in pairs and pairs[n] not in self.set]

        def refit_cuda_engine(self):
            return refit_ok and not self.get_missing_weights()

    module = types.ModuleType("tensorrt")
    module.__dict__.update(
        __version__=VERSIONS[major], Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        Refitter=Refitter, Weights=Weights, NetworkDefinitionCreationFlag=CreationFlag, BuilderFlag=BuilderFlag,
        MemoryPoolType=_Enum("MemoryPoolType", dict(WORKSPACE=0, DLA_MANAGED_SRAM=1)), DataType=DataType,
        TensorIOMode=TensorIOMode, ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy,
    )
    return module, calls

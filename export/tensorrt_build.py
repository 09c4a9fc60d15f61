"""ONNX graph -> TensorRT plan, through the TensorRT Python API (no trtexec shell string).

Precision: TensorRT 11 builds strongly typed networks only (its FP16/INT8 builder flags are gone), so
reduced precision must already be in the graph: `--precision fp16` exports an fp16 ONNX graph, and TRT 11
runs it as typed. TensorRT 10 still has the weakly typed builder; there the fp16 graph is built with
the FP16 flag too, so the builder may also pick fp16 kernels for the few fp32 ops left in the graph
(timestep embedding), as NVIDIA's 10.x demos do. `network_flags` holds that branch as pure logic.

One optimisation profile per plan, straight from the spec's min/opt/max shapes (recorded in the
manifest). A timing cache per TensorRT version and GPU makes rebuilds (another ControlNet, another
size range) skip most kernel timing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from export.files import atomic_write_bytes, json_hash


@dataclass(frozen=True)
class TrtBuildConfig:
    timing_cache: Path | None = None  # read before and written after each build
    workspace_bytes: int | None = None  # None: TensorRT's default (the GPU's memory)
    optimization_level: int = 3  # TensorRT's default; 4-5 search longer for a little speed


def network_flags(major: int, precision: str) -> dict:
    """{"strongly_typed", "fp16_flag"} for a TensorRT major version and the graph's precision."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
    if major < 10:
        raise ValueError(f"TensorRT {major}.x is not supported: need 10 or newer")
    if major >= 11:
        return dict(strongly_typed=True, fp16_flag=False)
    return dict(strongly_typed=False, fp16_flag=precision == "fp16")


def check_profile(profile: dict[str, list[list[int]]]) -> None:
    """Every input has min <= opt <= max in every dim (TensorRT rejects the profile otherwise)."""
    for name, (low, opt, high) in profile.items():
        if not (len(low) == len(opt) == len(high)):
            raise ValueError(f"profile for {name!r}: min/opt/max ranks differ: {low}, {opt}, {high}")
        if any(not (a <= b <= c) or a < 1 for a, b, c in zip(low, opt, high)):
            raise ValueError(f"profile for {name!r} needs 1 <= min <= opt <= max per dim, got {low}, {opt}, {high}")


def plan_key(onnx_key: str, profile: dict, precision: str, trt_version: str, gpu: str | None) -> str:
    """A plan is valid for one graph, profile, precision, TensorRT version and GPU model."""
    return json_hash(dict(onnx=onnx_key, profile=profile, precision=precision, tensorrt=trt_version, gpu=gpu))


def timing_cache_name(trt_version: str, gpu: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu or "nogpu").strip("-").lower()
    return f"timing-trt{trt_version}-{slug}.cache"


def build_plan(onnx_path: Path, plan_path: Path, profile: dict, precision: str, config: TrtBuildConfig = TrtBuildConfig(),
               trt=None) -> None:
    """Parse `onnx_path` (external data next to it), build with one profile, write `plan_path` atomically."""
    if trt is None:
        import tensorrt as trt
    check_profile(profile)
    flags = network_flags(int(trt.__version__.split(".")[0]), precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    creation = 0
    if flags["strongly_typed"]:
        creation |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(creation)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {str(onnx_path)!r}: {errors}")
    build_config = builder.create_builder_config()
    if flags["fp16_flag"]:
        build_config.set_flag(trt.BuilderFlag.FP16)
    build_config.builder_optimization_level = config.optimization_level
    if config.workspace_bytes:
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    optimization_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization_profile.set_shape(name, low, opt, high)
    build_config.add_optimization_profile(optimization_profile)
    cache_file = config.timing_cache
    cache = build_config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    build_config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {str(onnx_path)!r} (see its log above)")
    atomic_write_bytes(plan_path, memoryview(serialized))
    if cache_file is not None:
        atomic_write_bytes(cache_file, memoryview(build_config.get_timing_cache().serialize()))

"""ONNX graph -> TensorRT plan, through the TensorRT Python API (no trtexec shell string).

Precision: every plan is built strongly typed, on TensorRT 10 as on 11 (where it is the only mode and
the FP16/INT8/BF16/FP8 builder flags are gone). The graph carries its own types: `--precision fp16`
exports an fp16 graph whose deliberately fp32 parts (the timestep sinusoid, the text encoder's
softmax and layer norms) stay fp32, and a strongly typed build runs each op in the type the graph
gives it. The weakly typed alternative on 10.x (FP16 flag) would let the builder pick fp16 kernels for
those fp32 parts. TF32 is on by default in every TensorRT version and is cleared: an fp32 op then runs
in fp32, as the verification tolerances assume (Polygraphy and NVIDIA's diffusion demo clear it too).

Refit: plans are built with BuilderFlag.REFIT (TrtBuildConfig.refittable), so new weights (a LoRA merged
into the UNet or text encoder) go in by ONNX initializer name without a rebuild
(engine/backends/tensorrt_refit.py). REFIT_IDENTICAL would not do: it promises the refit weights equal
the build's, which lets the builder optimise on their values.

One optimisation profile per plan, straight from the spec's min/opt/max shapes (recorded in the
manifest). A timing cache per TensorRT version and GPU makes rebuilds (another ControlNet, another
size range) skip most kernel timing. Every TensorRT call that reports failure by its return value
(parse, add_optimization_profile's -1, set_timing_cache's False, a None plan) raises, naming it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.backends.tensorrt_backend import process_logger, trt_major
from export.files import atomic_write_bytes, json_hash

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class TrtBuildConfig:
    timing_cache: Path | None = None  # read before and written after each build
    workspace_bytes: int | None = None  # None: TensorRT's default (the GPU's memory)
    optimization_level: int = 3  # TensorRT's default; 4-5 search longer for a little speed
    refittable: bool = True  # BuilderFlag.REFIT: weights replaceable after the build (LoRA)


def creation_flags(trt) -> int:
    """create_network's flags: strongly typed. On 11.x that is the only mode and the flag is deprecated
    (ignored), so none is passed; on 10.x it must be asked for."""
    if trt_major(trt.__version__) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def check_profile(profile: dict[str, list[list[int]]]) -> None:
    """Every input has min <= opt <= max in every dim (TensorRT rejects the profile otherwise)."""
    for name, (low, opt, high) in profile.items():
        if not (len(low) == len(opt) == len(high)):
            raise ValueError(f"profile for {name!r}: min/opt/max ranks differ: {low}, {opt}, {high}")
        if any(not (a <= b <= c) or a < 1 for a, b, c in zip(low, opt, high)):
            raise ValueError(f"profile for {name!r} needs 1 <= min <= opt <= max per dim, got {low}, {opt}, {high}")


def plan_key(onnx_key: str, profile: dict, precision: str, trt_version: str, gpu: str | None,
             build: TrtBuildConfig = TrtBuildConfig()) -> str:
    """A plan is valid for one graph, profile, precision, TensorRT version, GPU model and refittability."""
    return json_hash(dict(onnx=onnx_key, profile=profile, precision=precision, tensorrt=trt_version, gpu=gpu,
                          refittable=build.refittable, typing="strong", tf32=False))


def timing_cache_name(trt_version: str, gpu: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu or "nogpu").strip("-").lower()
    return f"timing-trt{trt_version}-{slug}.cache"


def _parse(trt, builder, onnx_path: Path, profile: dict):
    network = builder.create_network(creation_flags(trt))
    parser = trt.OnnxParser(network, process_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {str(onnx_path)!r}: {errors}")
    inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if inputs != sorted(profile):
        raise ValueError(f"{str(onnx_path)!r}: the graph's inputs {inputs} are not the profile's {sorted(profile)}")
    return network, parser  # the parser owns the weights the network points at: keep it until the build


def build_plan(onnx_path: Path, plan_path: Path, profile: dict, precision: str, config: TrtBuildConfig = TrtBuildConfig(),
               trt=None) -> None:
    """Parse `onnx_path` (external data next to it), build with one profile, write `plan_path` atomically."""
    if trt is None:
        import tensorrt as trt
    check_precision(precision)
    check_profile(profile)
    builder = trt.Builder(process_logger(trt))
    network, parser = _parse(trt, builder, onnx_path, profile)
    build_config = builder.create_builder_config()
    build_config.clear_flag(trt.BuilderFlag.TF32)
    if config.refittable:
        build_config.set_flag(trt.BuilderFlag.REFIT)
    build_config.builder_optimization_level = config.optimization_level
    if config.workspace_bytes:
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    optimization_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization_profile.set_shape(name, low, opt, high)
    if build_config.add_optimization_profile(optimization_profile) < 0:
        raise ValueError(f"TensorRT rejected the optimisation profile for {str(onnx_path)!r}: {profile}")
    cache_file = config.timing_cache
    cache = build_config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    if not build_config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError(f"TensorRT refused the timing cache {str(cache_file)!r} (written by another TensorRT or "
                           "GPU?): delete it and build again")
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {str(onnx_path)!r} (see its log above)")
    atomic_write_bytes(plan_path, memoryview(serialized))
    if cache_file is not None:
        atomic_write_bytes(cache_file, memoryview(build_config.get_timing_cache().serialize()))

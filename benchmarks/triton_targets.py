"""Every Triton kernel in kernels/ compiled for real NVIDIA targets without a GPU, and what each one uses.

Tests run the kernels under TRITON_INTERPRET=1, which accepts code that the real compiler rejects or compiles
badly. Triton compiles for a CUDA target with no device present (a GPUTarget in place of the driver's), so:

1. each launcher (kernels/*_triton.py) runs on meta tensors that pass for CUDA ones, over the shapes the
   engine runs, and `capture_launches` records what it would launch: the kernel, its arguments and every
   autotune config it may pick;
2. `specialise` turns a recorded launch into the signature, constexprs and specialisation attributes with
   Triton's own binder (as JITFunction.run does on a GPU): what is compiled is what the launchers pass;
3. `compile_variant` compiles one distinct specialisation for one target and reads registers per thread and
   spills from ptxas -v (Triton's bundled ptxas: FACTS.md) and shared memory from Triton's allocation.

tests/test_triton_targets.py compiles a covering subset of the variants on every CI run (`ci_selection`);
`python -m benchmarks.kernel_resources` compiles all 2448 (12,400 s of compiling, 1 h 45 min on two busy cores;
the zero-conv kernel's 240 variants per target take 0.7-100 s each) and writes the table benchmarks/README.md
shows.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_JSON = REPO / "benchmarks" / "results" / "kernel-resources.json"


@dataclasses.dataclass(frozen=True)
class Target:
    """One NVIDIA architecture the kernels must compile for."""

    name: str
    capability: int
    sms: int  # SMs of the part the launchers are shown (GroupNorm+SiLU splits its work by them)
    smem_limit: int  # bytes of shared memory one block may use (the opt-in maximum: CUDA guide, per compute capability)
    part: str


TARGETS = (
    Target("sm_80", 80, 108, 163 * 1024, "A100"),
    Target("sm_89", 89, 142, 99 * 1024, "L40S"),
    Target("sm_90", 90, 132, 227 * 1024, "H100 SXM"),
    Target("sm_100", 100, 148, 227 * 1024, "B200"),
)
REGISTER_LIMIT = 255  # per thread, on every target above


# ---- 1. what the launchers launch -------------------------------------------------------------------


class _CudaLookingMeta(torch.Tensor):
    """A meta tensor the launchers take for a CUDA tensor: shapes, strides and dtype, no memory.

    data_ptr() is a distinct 256-byte aligned address per storage (as CUDA's allocator gives) plus the view's
    offset, so Triton's alignment specialisation and the launchers' in-place checks see what a GPU shows.
    Tensors made from one (views, copies) are plain meta tensors, data_ptr() 0."""

    _bases: dict[int, int] = {}
    __torch_function__ = torch._C._disabled_torch_function_impl  # plain meta ops underneath, at full speed

    @property
    def is_cuda(self):
        return True

    def data_ptr(self):
        storage = self.untyped_storage()._cdata
        base = self._bases.setdefault(storage, (len(self._bases) + 1) << 24)
        return base + self.storage_offset() * self.element_size()


def device_tensor(shape, dtype, channels_last: bool = False) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)
    return torch.Tensor._make_subclass(_CudaLookingMeta, t)


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher makes it, for one autotune config."""

    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict  # constexprs and options (num_warps, num_stages, ...) as the launch passes them
    autotune_config: str | None  # the autotune config, for an autotuned kernel
    case: dict  # the launcher call it came from: dtype, layout, shape


@contextlib.contextmanager
def capture_launches(sink: list[Launch], case: Callable[[], dict]):
    """Record every `kernel[grid](...)` instead of launching it. An autotuned kernel is recorded once per
    config it may pick, after its early pruning (as Autotuner.run prunes)."""
    import triton
    from triton.runtime.autotuner import Autotuner

    def record(kernel, grid):
        def launch(*args, **kwargs):
            configs, fn = [None], kernel
            if isinstance(kernel, Autotuner):
                configs, fn = kernel.configs, kernel.fn
                if kernel.early_config_prune:
                    configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                raise TypeError(f"cannot compile {fn!r}: not a @triton.jit kernel")
            for config in configs:
                extra = config.all_kwargs() if config is not None else {}
                sink.append(Launch(fn, args, {**kwargs, **extra}, None if config is None else str(config), case()))
        return launch

    saved = triton.KernelInterface.__getitem__
    triton.KernelInterface.__getitem__ = record
    try:
        yield
    finally:
        triton.KernelInterface.__getitem__ = saved


def kernel_module_names() -> list[str]:
    """kernels/*_triton.py: the modules that hold Triton kernels."""
    import kernels

    return sorted(f"kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__) if m.name.endswith("_triton"))


@contextlib.contextmanager
def gpu_launchers(sms: int) -> Iterator[dict[str, object]]:
    """kernels' Triton modules, their launchers on the GPU path and shown a GPU with `sms` SMs.

    Needs triton imported without TRITON_INTERPRET=1 (tests set it before triton loads, and @triton.jit then
    builds interpreter objects, Triton's own library included): the tests compile in `compiler_process`."""
    import triton

    if triton.knobs.runtime.interpret or not isinstance(triton.language.standard.cdiv, triton.runtime.jit.JITFunction):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1 in this process, which makes its kernels "
                           "interpreter objects: compile in a process started without it (compiler_process)")
    fixed = os.environ.pop("ENGINE_TRITON_FIXED_CONFIG", None)  # every autotune config, not the GPU suite's first
    modules = {name: importlib.import_module(name) for name in kernel_module_names()}
    asked = {name: m._sm_count for name, m in modules.items() if hasattr(m, "_sm_count")}
    for name in asked:  # the launchers' only question to the driver
        modules[name]._sm_count = lambda index: sms
    _CudaLookingMeta._bases.clear()
    try:
        yield modules
    finally:
        for name, original in asked.items():
            modules[name]._sm_count = original
        if fixed is not None:
            os.environ["ENGINE_TRITON_FIXED_CONFIG"] = fixed


def launched_kernels(modules: dict[str, object]) -> dict[str, object]:
    """kernel name -> JITFunction for every @triton.jit function in the modules that no other one calls (the
    others are helpers, compiled inside their callers)."""
    import triton

    fns = {attr: fn for name, m in modules.items() for attr, fn in vars(m).items()
           if isinstance(fn, triton.runtime.jit.JITFunction) and fn.__module__ == name}
    called = {attr for attr, fn in fns.items() for other in fns.values()
              if other is not fn and re.search(rf"\b{attr}\(", other.src)}
    return {attr: fn for attr, fn in fns.items() if attr not in called}


# ---- 2. the launcher calls: the engine's shapes, every dtype and layout ----------------------------------

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _layouts():
    return ((False, "nchw"), (True, "nhwc"))


def _zero_conv_calls(modules, note):
    """Every NUM_NETS one launch takes (1..4; more nets chain launches), at SD1.5 512²'s top level (every size a
    multiple of 16), and at 576²'s 9x9 level (pixels and strides not) with one net."""
    from kernels.zero_conv import pixel_strides, scales_tensor

    launcher = modules["kernels.zero_conv_triton"]
    for dtype in DTYPES:
        for channels_last, layout in _layouts():
            for (B, C, H, W), nets_range in (((2, 320, 64, 64), range(1, launcher.MAX_NETS_PER_LAUNCH + 1)),
                                             ((2, 1280, 9, 9), (1,))):
                for nets in nets_range:
                    note(dtype, layout, f"{B}x{C}x{H}x{W} nets={nets}")
                    skip = device_tensor((B, C, H, W), dtype, channels_last)
                    feats = [device_tensor((B, C, H, W), dtype, channels_last) for _ in range(nets)]
                    weights = [device_tensor((C, C), dtype) for _ in range(nets)]  # (C, Ck, 1, 1) as the op passes it
                    biases = [device_tensor((C,), dtype) for _ in range(nets)]
                    out = device_tensor((B, C, H, W), dtype, channels_last)
                    launcher.zero_conv_add_triton(out, skip, feats, weights, biases,
                                                  scales_tensor([1.0] * nets, "meta"), pixel_strides)


SD15_RESIDUALS = [(320, 64)] * 3 + [(320, 32), (640, 32), (640, 32), (640, 16), (1280, 16), (1280, 16)] + [(1280, 8)] * 4


def _combine_calls(modules, note):
    """SD1.5's 13 ControlNet residuals at 512²: one net (its count then specialised to 1) and two."""
    from kernels.zero_conv import scales_tensor

    launcher = modules["kernels.combine_triton"]
    shapes = [(2, c, s, s) for c, s in SD15_RESIDUALS]
    for dtype in DTYPES:
        for channels_last, layout in _layouts():
            for nets in (1, 2):
                note(dtype, layout, f"13 residuals nets={nets}")
                lists = [[device_tensor(s, dtype, channels_last) for s in shapes] for _ in range(nets)]
                out = [device_tensor(s, dtype, channels_last) for s in shapes]
                launcher.combine_residuals_triton(lists, scales_tensor([1.0] * nets, "meta"), out)


# GroupNorm + SiLU (32 groups) in the fused models: channels per group -> feature-map sizes at 512², scaled
# with the resolution. The launcher picks its tiles from channels per group and pixels, and its splits from
# batch x groups against the GPU's SMs: these sizes, resolutions, batches and each target's SMs give every
# config it picks for the engine's models.
GN_WIDTHS = {
    "unet": ((10, (64, 32)), (20, (64, 32, 16)), (30, (64, 32)), (40, (32, 16, 8)), (60, (32, 16)), (80, (16, 8))),
    "vae": ((4, (512, 256)), (8, (256, 128)), (16, (128, 64))),
}
GN_RESOLUTIONS = (512, 576, 768, 1024)  # 576²: sizes that are not multiples of 16 (9x9 in the UNet)
GN_BATCHES = (1, 2, 4)


def _groupnorm_calls(modules, note):
    from kernels.zero_conv import pixel_strides

    launcher = modules["kernels.groupnorm_silu_triton"]
    for dtype in DTYPES:
        for channels_last, layout in _layouts():
            for family, widths in GN_WIDTHS.items():
                for cg, sizes in widths:
                    for size in sizes:
                        for resolution in GN_RESOLUTIONS:
                            for batch in GN_BATCHES:
                                s, C = size * resolution // 512, 32 * cg
                                note(dtype, layout, f"{family} {batch}x{C}x{s}x{s}")
                                x = device_tensor((batch, C, s, s), dtype, channels_last)
                                out = device_tensor((batch, C, s, s), dtype, channels_last)
                                weight, bias = device_tensor((C,), dtype), device_tensor((C,), dtype)
                                launcher.group_norm_silu_triton(out, x, weight, bias, 32, 1e-5, pixel_strides)


LAUNCHER_CALLS = (_zero_conv_calls, _combine_calls, _groupnorm_calls)


class KernelCompileError(RuntimeError):
    """A kernel did not compile for a target."""


# ---- 3. distinct compilations per target ---------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One distinct specialisation of a kernel for one target: what Triton compiles once."""

    kernel: str
    config: str  # dtype, layout, constexprs, warps and stages, and the arguments specialised to 1
    target: Target
    features: frozenset  # what ci_selection covers: target, dtype, layout, alignment, autotune config
    source: object  # triton ASTSource
    options: dict
    launch: Launch  # the first launch that gave it


@functools.lru_cache(maxsize=None)
def _binder(fn, capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialise(launch: Launch, target: Target):
    """(cache key, pack) for this launch on this target, as JITFunction.run builds them on a GPU of that
    architecture: the key is the JIT's own (argument specialisation and options); pack() gives the
    (ASTSource, options, constexprs) that compile."""
    from triton import knobs
    from triton.compiler import ASTSource

    fn = launch.kernel
    backend, binder = _binder(fn, target.capability)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*launch.args, **kwargs)

    def pack():
        packed, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        return ASTSource(fn, signature, constexprs, attrs), packed.__dict__, constexprs

    return (id(fn), str(specialization), str(sorted(options.items()))), pack


def _describe(launch: Launch, target: Target, constexprs: dict) -> tuple[str, frozenset]:
    names = [p.name for p in launch.kernel.params]
    constant = {names[path[0]]: value for path, value in constexprs.items()}
    declared = [f"{k}={v}" for k, v in constant.items() if launch.kernel.params[names.index(k)].is_constexpr]
    ones = [k for k in constant if not launch.kernel.params[names.index(k)].is_constexpr]
    aligned = all(a == 1 or a % 16 == 0 for a in launch.args if isinstance(a, int))
    case = launch.case
    parts = [case["dtype"], case["layout"], "aligned" if aligned else "unaligned", *declared,
             f"warps={launch.kwargs.get('num_warps', 4)}", f"stages={launch.kwargs.get('num_stages', 3)}"]
    if ones:
        parts.append("ones=" + ",".join(ones))
    features = {("target", target.name), ("dtype", case["dtype"]), ("layout", case["layout"]), ("aligned", aligned)}
    if launch.autotune_config is not None:
        features.add(("autotune", launch.autotune_config))
    return " ".join(parts), frozenset(features)


def make_variant(launch: Launch, target: Target, kernel: str) -> Variant:
    try:
        source, options, constexprs = specialise(launch, target)[1]()
    except Exception as exc:  # Triton refuses the options (num_warps not a power of 2, ...)
        raise KernelCompileError(f"{kernel} {launch.kwargs} cannot be specialised for {target.name}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    config, features = _describe(launch, target, constexprs)
    return Variant(kernel, config, target, features, source, options, launch)


def variants(target: Target) -> list[Variant]:
    """Every distinct compilation the launchers ask for on this target, in launcher-call order."""
    sink: list[Launch] = []
    current: dict = {}

    def note(dtype, layout, shape):
        current.clear()
        current.update(dtype=DTYPES[dtype], layout=layout, shape=shape)

    with gpu_launchers(target.sms) as modules:
        kernels = launched_kernels(modules)
        names = {id(fn): name for name, fn in kernels.items()}
        with capture_launches(sink, lambda: dict(current)):
            for calls in LAUNCHER_CALLS:
                calls(modules, note)
        found: dict = {}
        for launch in sink:
            key, _ = specialise(launch, target)
            if key not in found:
                found[key] = make_variant(launch, target, names[id(launch.kernel)])
        missing = sorted(set(kernels) - {v.kernel for v in found.values()})
    if missing:
        raise RuntimeError(f"kernels {missing} (kernels/*_triton.py) are launched by no call in "
                           "benchmarks/triton_targets.py LAUNCHER_CALLS: add their launcher there")
    return list(found.values())


@functools.lru_cache(maxsize=None)
def target_variants(name: str) -> list[Variant]:
    return variants(next(t for t in TARGETS if t.name == name))


# ---- 4. compile and read resources ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    kernel: str
    config: str
    target: str
    regs: int
    spills: int  # bytes of spill stores
    smem: int  # bytes of shared memory per block (Triton's allocation)
    seconds: float


def _ptxas_report(ptx: str, target: Target) -> str:
    """ptxas -v's report on the kernel's PTX: Triton's bundled ptxas (nvcc 13.0's rejects Triton's PTX
    version) with the options of Triton's own cubin step."""
    import triton

    arch = f"sm_{target.capability}{'a' if target.capability >= 90 else ''}"
    tool = "ptxas-blackwell" if target.capability >= 90 else "ptxas"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        raise KernelCompileError(f"ptxas -v failed: {done.stderr}")
    return done.stderr


def compile_variant(variant: Variant) -> Compiled:
    """Compile one variant and read its resources. KernelCompileError names kernel, config and target."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    log = io.StringIO()
    try:
        # Triton's cubin step runs ptxas -v already; with this knob it prints the report (a cache hit does not).
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(variant.source, target=GPUTarget("cuda", variant.target.capability, 32),
                                      options=variant.options)
    except Exception as exc:
        case = variant.launch.case
        raise KernelCompileError(f"{variant.kernel} [{variant.config}] does not compile for {variant.target.name} "
                                 f"(launched for {case['dtype']} {case['layout']} {case['shape']}): "
                                 f"{type(exc).__name__}: {exc}") from exc
    report = log.getvalue()
    if "Used" not in report:
        report = _ptxas_report(compiled.asm["ptx"], variant.target)
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if regs is None or spills is None:
        raise KernelCompileError(f"unexpected ptxas -v report for {variant.kernel} on {variant.target.name}: {report}")
    return Compiled(variant.kernel, variant.config, variant.target.name, int(regs.group(1)), int(spills.group(1)),
                    compiled.metadata.shared, round(time.perf_counter() - start, 2))


def compile_row(variant: Variant) -> dict:
    """A variant compiled, as a table row; one that does not compile has 'error' instead of resources."""
    try:
        return dataclasses.asdict(compile_variant(variant))
    except KernelCompileError as exc:
        return dict(kernel=variant.kernel, config=variant.config, target=variant.target.name, error=str(exc))


def limit_problems(result: Compiled) -> list[str]:
    """What in one result breaks its target's limits, each naming kernel, config and target."""
    target = next(t for t in TARGETS if t.name == result.target)
    where = f"{result.kernel} [{result.config}] on {result.target}"
    problems = []
    if result.spills:
        problems.append(f"{where}: {result.spills} bytes of register spills ({result.regs} registers)")
    if result.smem > target.smem_limit:
        problems.append(f"{where}: {result.smem} bytes of shared memory, over the {target.smem_limit} a block may use")
    if result.regs > REGISTER_LIMIT:
        problems.append(f"{where}: {result.regs} registers per thread, over {REGISTER_LIMIT}")
    return problems


@dataclasses.dataclass(frozen=True)
class KnownProblem:
    """A limit the kernels break today, found by this module: kept visible (the table marks it, the test lets
    it pass) until the kernel is fixed, when the full run reports it gone."""

    kernel: str
    kind: str  # "spills" or "shared memory"
    applies: Callable[[str], bool]  # on the variant's config text
    why: str


KNOWN_PROBLEMS = (
    # Full run of 2026-12-05 (results/kernel-resources.md has each variant's bytes).
    KnownProblem(
        "_zero_conv_add_kernel", "spills",
        lambda config: (config.startswith("fp32") or " nchw unaligned " in config
                        or "NUM_NETS=3" in config or "NUM_NETS=4" in config),
        "fp32 (an ieee dot, on FMA units) spills in 207 of 320 variants, up to 32 KB (sm_80, NUM_NETS=4, "
        "128x128x64); fp16/bf16 at NUM_NETS=3-4 in 106 of 256, up to 15.7 KB: each net's term keeps its own fp32 "
        "accumulator beside the running sum; fp16/bf16 NCHW at a pixel count that is not a multiple of 16 in 24 of "
        "64 (the 128-wide tiles), up to 248 B. fp16/bf16 NUM_NETS=1-2 aligned, the common case, never spills. "
        "Needs autotune lists per dtype and NUM_NETS, or one accumulator: a kernel change, to be timed on a GPU."),
    KnownProblem(
        "_zero_conv_add_kernel", "shared memory",
        lambda config: config.startswith("fp32"),
        "fp32 128x128x64 needs 128 KB of shared memory, over sm_89's 99 KB: Triton's autotuner compiles it there "
        "and skips it at run time (OutOfResources)."),
    KnownProblem(
        "_gn_stats_kernel", "spills",
        lambda config: " nchw unaligned " in config and ("BLOCK_C=64 " in config or "BLOCK_C=128 " in config),
        "4 B on sm_100 (fp16/bf16, 64 channels x 32 pixels per tile, NCHW, pixels not a multiple of 16: a "
        "channel-strided tile with 64-bit addresses, 168 registers)."),
    KnownProblem(
        "_gn_silu_apply_kernel", "spills",
        lambda config: " nchw unaligned " in config and ("BLOCK_C=64 " in config or "BLOCK_C=128 " in config),
        "8 B on sm_89 (fp16, 128 channels x 16 pixels per tile, NCHW, pixels not a multiple of 16: as the stats "
        "kernel)."),
)


def known_problem(problem: str, config: str) -> KnownProblem | None:
    for known in KNOWN_PROBLEMS:
        if problem.startswith(known.kernel + " ") and known.kind in problem and known.applies(config):
            return known
    return None


# ---- 5. the covering subset the tests compile ---------------------------------------------------------


def ci_selection(all_variants: list[Variant], seconds: dict | None = None) -> list[Variant]:
    """A few variants that together give every kernel each target, dtype, layout, alignment and autotune
    config at least once: a greedy cover, cheapest first by the compile times in `seconds` ((kernel, config,
    target) -> s, from the committed table; 1 s where unknown). Constexpr values that launchers compute
    (NUM_NETS, GroupNorm's tiles and splits) are covered only by the full run."""
    seconds = seconds or {}
    needed = {(v.kernel, f) for v in all_variants for f in v.features}
    chosen = []
    while needed:
        def gain(v):
            new = sum((v.kernel, f) in needed for f in v.features)
            return new / seconds.get((v.kernel, v.config, v.target.name), 1.0)
        best = max(all_variants, key=gain)
        chosen.append(best)
        needed -= {(best.kernel, f) for f in best.features}
    return chosen


def committed_seconds() -> dict:
    if not RESULTS_JSON.exists():
        return {}
    rows = json.loads(RESULTS_JSON.read_text())["rows"]
    return {(r["kernel"], r["config"], r["target"]): max(r["seconds"], 0.1) for r in rows}


# ---- 6. compiling for the tests, whose triton runs the interpreter ----------------------------------------


def _started() -> None:
    pass


@contextlib.contextmanager
def compiler_process() -> Iterator[concurrent.futures.Executor]:
    """One worker process started without TRITON_INTERPRET, where triton compiles for real targets (the tests'
    own triton was imported for the interpreter). What its functions raise comes back as it is."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        pool.submit(_started).result()  # the process starts now, with this environment
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


@functools.lru_cache(maxsize=None)
def _selection(every: bool) -> tuple:
    every_variant = [v for t in TARGETS for v in target_variants(t.name)]
    return tuple(every_variant if every else ci_selection(every_variant, committed_seconds()))


def compile_selected(target: str, every: bool = False) -> list[dict]:
    """Worker: the tests' variants for one target (every one, or the CI selection), compiled, as table rows."""
    return [compile_row(v) for v in _selection(every) if v.target.name == target]


def selection_coverage(every: bool = False) -> dict:
    """Worker: per kernel, the features its variants have and those the selection has; the (kernel, target)
    pairs selected."""
    every_variant = [v for t in TARGETS for v in target_variants(t.name)]
    features = {}
    for variants_, key in ((every_variant, "all"), (_selection(every), "selected")):
        for v in variants_:
            features.setdefault(key, {}).setdefault(v.kernel, set()).update(v.features)
    features["pairs"] = {(v.kernel, v.target.name) for v in _selection(every)}
    return features


def compile_changed(target: str, kernel: str, config_prefix: str, change: dict) -> dict:
    """Worker: the first variant of `kernel` on `target` whose config starts with `config_prefix`, launched
    with `change` to its constexprs or options, compiled; KernelCompileError if it does not compile."""
    variant = next(v for v in target_variants(target) if v.kernel == kernel and v.config.startswith(config_prefix))
    launch = dataclasses.replace(variant.launch, kwargs={**variant.launch.kwargs, **change})
    return dataclasses.asdict(compile_variant(make_variant(launch, variant.target, kernel)))

"""The GPU suite's rows (benchmarks/gpu_suite.py runs them): pipelines, kernels, TensorRT, the native build.

Each row function takes the suite's config and shared `state` and returns the row's figures; it raises
on failure (the suite records the error in the row), and sets `status="failed"` with a `why` where it
ran but its figures fail a check (PSNR NaN or under MIN_PSNR_DB).
"""
from __future__ import annotations

import copy
import gc
import math
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
PROMPT = "an astronaut riding a horse, best quality"
MIN_PSNR_DB = 35.0


# ---- timing ---------------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def fp32_math():
    """Real fp32 on the GPU: cuDNN convolutions and cuBLAS matmuls default to TF32 on Ampere and later,
    which would make the "fp32 reference" a 10-bit-mantissa one."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def time_device(fn, device, iters: int = 20) -> float:
    """Median seconds of fn() (CUDA events on a GPU, wall clock elsewhere), after 3 warm-ups."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def time_replayed(fn, reps: int = 20) -> tuple[float, str]:
    """Seconds per fn() on the GPU without Python or launch latency: `reps` calls captured in one CUDA graph,
    the median of 5 replays / reps. Where capture fails, back-to-back calls between two events."""
    import torch

    for _ in range(3):  # autotuning and lazy allocation happen here, not inside the capture
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run, how = graph.replay, "CUDA graph"
    except RuntimeError:
        torch.cuda.synchronize()

        def run():
            for _ in range(reps):
                fn()

        how = "back-to-back"
    return time_device(run, torch.device("cuda"), iters=5) / reps, how


def psnr(a, b) -> float:
    """dB between two images in [0, 1]: inf for identical images, NaN where either holds NaN."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if math.isnan(mse):
        return float("nan")
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def quality(db: float) -> dict:
    """A row's PSNR verdict: NaN and anything under MIN_PSNR_DB fail the row."""
    if math.isnan(db):
        return dict(status="failed", why="the image holds NaN")
    if db < MIN_PSNR_DB:
        return dict(status="failed", why=f"PSNR {db:.1f} dB < {MIN_PSNR_DB:.0f} dB vs the fp32 reference")
    return {}


# ---- the pipelines --------------------------------------------------------------------------------------


def control_image(resolution: int):
    import PIL.Image

    from engine.preprocess import canny

    with PIL.Image.open(REPO / "engine" / "assets" / "astronaut.png") as im:
        return canny(im.convert("RGB").resize((resolution, resolution), PIL.Image.LANCZOS))


class StepClock:
    """A per-step callback that timestamps each step's end (synchronised): ms/step over the steps after
    the first, as diffusers' progress bar counts them, excluding text, hint and VAE work."""

    def __init__(self, device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, *args, **kwargs):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return kwargs.get("callback_kwargs", {}) if "callback_kwargs" in kwargs else (args[3] if len(args) > 3 else {})

    def ms_per_step(self) -> float:
        if len(self.stamps) < 2:
            return float("nan")
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1) * 1e3


def timed(generate, device, cfg) -> tuple[dict, object]:
    """Warm up once (captures, compiles, autotunes), then `runs` timed generations; the best one counts."""
    if cfg.warmup:
        generate(StepClock(device))
    best, images = None, None
    for _ in range(cfg.runs):
        clock = StepClock(device)
        _sync(device)
        start = time.perf_counter()
        images = generate(clock)
        _sync(device)
        total = (time.perf_counter() - start) * 1e3
        if best is None or clock.ms_per_step() < best["ms_per_step"]:
            best = dict(ms_per_step=clock.ms_per_step(), it_per_s=1e3 / clock.ms_per_step(), total_ms=total)
    return best, images


def _device_dtype(cfg):
    import torch

    return (torch.device("cpu"), torch.float32) if cfg.dry_run else (torch.device("cuda"), torch.float16)


def matmul_row(cfg, state) -> dict:
    """The matmul rate measured here (the practical compute ceiling) and the step's floor at that rate."""
    import torch

    from benchmarks.flops import per_sample_flops

    device, dtype = _device_dtype(cfg)
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    rate = 2 * n**3 / time_device(lambda: torch.mm(a, b), device, iters=10)
    flops = per_sample_flops(cfg.preset, cfg.resolution, cfg.resolution)
    step_flops = 2 * (flops["controlnet_body"] + flops["unet"])  # CFG: batch 2
    state["floor_ms"] = step_flops / rate * 1e3
    return dict(matmul_tflops=rate / 1e12, step_tflop=step_flops / 1e12, floor_ms_per_step=state["floor_ms"])


def controlnet_name(preset: str) -> str:
    """The registry ControlNet the rows run: canny, or for SDXL presets the -small SDXL canny (a preset model's
    registry names give random-weight nets of the preset's architecture, engine.tiny)."""
    from engine import tiny

    return "sdxl-canny-small" if tiny.PRESETS[preset].family == "sdxl" else "canny"


def reference_row(cfg, state) -> dict:
    """The engine's fp32 reference image (TF32 off), which every row's PSNR is measured against."""
    import torch

    from engine import Runner

    device, _ = _device_dtype(cfg)
    state["edges"] = control_image(cfg.resolution)
    with fp32_math():
        ref = Runner(model=cfg.preset, controlnet=controlnet_name(cfg.preset), device=device, dtype=torch.float32,
                     optimizations="reference")
        start = time.perf_counter()
        state["fp32"] = ref.generate(PROMPT, state["edges"], num_inference_steps=cfg.steps, height=cfg.resolution,
                                     width=cfg.resolution, seed=0, preprocess=False, output_type="np").images
    state["ref"] = ref
    return dict(total_ms=(time.perf_counter() - start) * 1e3, tf32=False)


def _needs(state, *keys):
    for key in keys:
        if key not in state:
            raise RuntimeError(f"needs the result {key!r} of an earlier row, which did not finish")


def _copies(ref, dtype):
    """Fresh copies of the reference Runner's models in dtype: switches change models in place, so every
    row gets its own, and the fp32 reference stays untouched. SDXL: both text encoders, and the VAE kept in
    fp32 in an fp16 run (its config says force_upcast), as the Runner loads it and diffusers decodes."""
    from engine.loading import _vae_dtype

    b = ref.backend
    encoders = {name: copy.deepcopy(encoder.text_encoder).to(dtype) for name, encoder in b.text_encoders.items()}
    vae = b.vae_decoder.vae
    sd = SimpleNamespace(**encoders, unet=copy.deepcopy(b.unet_model.unet).to(dtype),
                         vae=copy.deepcopy(vae).to(_vae_dtype(vae, dtype)))
    return sd, [copy.deepcopy(body.net).to(dtype) for body in b.controlnet_bodies]


def _row_result(cfg, state, result: dict, images) -> dict:
    db = psnr(images, state["fp32"])
    row = dict(result, psnr_vs_fp32_db=db, x_floor=result["ms_per_step"] / state["floor_ms"])
    if "diffusers_it_per_s" in state:
        row["x_diffusers"] = result["it_per_s"] / state["diffusers_it_per_s"]
    return {**row, **quality(db)}


def free(device) -> None:
    """A backend with graphs is a reference cycle (StepGraphs holds its bound step_fn): collect it, so its
    models and graph pool are gone before the next row copies the models again."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def diffusers_row(cfg, state) -> dict:
    """diffusers' ControlNet pipeline (SD1.5's or SDXL's, as the preset) at its defaults over fp16 copies."""
    import torch
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler

    from benchmarks.bench_pipeline import pipeline_over

    _needs(state, "ref", "floor_ms")
    device, dtype = _device_dtype(cfg)
    ref = state["ref"]
    sd, nets = _copies(ref, dtype)
    sdxl = ref.family.name == "sdxl"
    # The VAE in the pipeline's dtype, as `pipe.to(float16)` leaves it: SDXL's pipeline upcasts it to decode.
    modules = dict(vars(sd), vae=sd.vae.to(dtype), controlnet=nets[0])
    pipe = pipeline_over(StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline, ref,
                         modules, UniPCMultistepScheduler.from_config(ref.scheduler_config))
    res = cfg.resolution

    def generate(clock):
        return pipe(PROMPT, image=state["edges"], num_inference_steps=cfg.steps, height=res, width=res,
                    output_type="np", generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=clock).images

    with torch.inference_mode():
        result, images = timed(generate, device, cfg)
    del pipe, sd, nets
    free(device)
    state["diffusers_it_per_s"] = result["it_per_s"]
    return dict(_row_result(cfg, state, result, images), dtype=str(dtype).replace("torch.", ""))


def engine_row(opts):
    """A row of the ablation: the Runner over fresh copies of the reference's models with `opts`."""

    def run(cfg, state) -> dict:
        import torch

        from engine.backends.torch_backend import TorchBackend
        from engine.optimizations import describe

        _needs(state, "ref", "floor_ms")
        device, dtype = _device_dtype(cfg)
        ref = state["ref"]
        sd, nets = _copies(ref, dtype)
        runner = copy.copy(ref)
        runner.dtype = dtype
        breaks_before = _graph_breaks()
        runner.backend = TorchBackend(sd, nets, device, dtype, opts)
        res = cfg.resolution

        def generate(clock):
            return runner.generate(PROMPT, state["edges"], num_inference_steps=cfg.steps, height=res, width=res, seed=0,
                                   preprocess=False, output_type="np", callback=lambda i, n: clock()).images

        result, images = timed(generate, device, cfg)
        row = dict(_row_result(cfg, state, result, images), dtype=str(dtype).replace("torch.", ""), switches=describe(opts))
        if opts.compile:
            row["dynamo_graph_breaks"] = _graph_breaks() - breaks_before
            if row["dynamo_graph_breaks"]:
                row.update(status="failed", why=f"{row['dynamo_graph_breaks']} graph breaks in the compiled step")
        del runner, sd, nets
        free(device)
        return row

    return run


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# ---- kernels --------------------------------------------------------------------------------------------


def kernels_row(cfg, state) -> dict:
    """GB/s of the fused kernels at SD1.5's 13 injection points (fp16, channels-last, device-tensor scales,
    as the engine's "fast" preset runs them) beside a copy of the same bytes, each timed as 20 calls in a
    captured CUDA graph (a 5 µs kernel is otherwise mostly Python and launch latency)."""
    import torch

    import kernels
    from benchmarks.bench_kernels import SD15_POINTS, bytes_moved, gpu_fn, make_point

    device = torch.device("cuda")
    rows = []
    points = [make_point(C, S, device, torch.float16, seed=i, channels_last=True) for i, (C, S) in enumerate(SD15_POINTS)]
    nbytes = sum(bytes_moved(*p[:3]) for p in points)
    for impl in ("torch_unfused", "triton", "copy"):
        fns = [gpu_fn(impl, p) for p in points]
        sec, how = time_replayed(lambda: [f() for f in fns])
        rows.append(dict(kernel=f"fused_zero_conv_add, {len(points)} points", impl=impl, us=sec * 1e6,
                         GBps=nbytes / sec / 1e9, timed=how))
    x = torch.randn(2, 320, 64, 64, device=device, dtype=torch.float16).to(memory_format=torch.channels_last)
    w, b = torch.randn(320, device=device, dtype=torch.float16), torch.randn(320, device=device, dtype=torch.float16)
    nbytes = 2 * x.nbytes  # read once (the floor; the kernel reads twice), write once
    src = torch.empty(x.nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for impl, fn in (("torch", lambda: kernels.group_norm_silu(x, 32, w, b, impl="torch")),
                     ("triton", lambda: kernels.group_norm_silu(x, 32, w, b, impl="triton")),
                     ("copy", lambda: dst.copy_(src))):
        sec, how = time_replayed(fn)
        rows.append(dict(kernel="group_norm_silu (2,320,64,64) NHWC", impl=impl, us=sec * 1e6, GBps=nbytes / sec / 1e9,
                         timed=how))
    return dict(kernels=rows)


# ---- TensorRT -------------------------------------------------------------------------------------------


def tensorrt_row(cfg, state) -> dict:
    """An fp16 TensorRT engine dir for the tiny model (build, verify, generate) against the torch fp32
    reference of the same model: the whole TensorRT path once, in ~1 minute. (A full-size SD1.5 build
    takes 5-10 minutes per UNet plan: not in a 10-minute command.)"""
    import tempfile

    import torch

    from engine import Runner
    from engine.backends import tensorrt_usable
    from engine.build import main as build_main
    from engine.tiny import save_tiny

    usable, why = tensorrt_usable()
    if not usable:
        return dict(status="skipped", why=f"TensorRT cannot run here: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_tiny(Path(tmp) / "tiny")
        out = Path(tmp) / "engine"
        start = time.perf_counter()
        code = build_main(["--model", str(tiny["model"]), "--controlnet", str(tiny["canny"]), "--out", str(out),
                           "--backend", "tensorrt", "--precision", "fp16", "--min-size", "64", "--max-size", "128",
                           "--no-slim", "--no-progress"])  # onnxslim is not on the GPU image
        if code != 0:
            raise RuntimeError(f"engine.build --backend tensorrt exited {code}")
        build_s = time.perf_counter() - start
        edges = control_image(64)
        args = dict(num_inference_steps=4, height=64, width=64, seed=0, preprocess=False, output_type="np")
        trt_runner = Runner(engine_dir=str(out))
        images = trt_runner.generate(PROMPT, edges, **args).images
        with fp32_math():
            ref = Runner(model=str(tiny["model"]), controlnet=str(tiny["canny"]), device="cuda", dtype=torch.float32)
            expected = ref.generate(PROMPT, edges, **args).images
    db = psnr(images, expected)
    return dict(build_s=build_s, provider=trt_runner.backend.provider, psnr_vs_torch_fp32_db=db, **quality(db))


# ---- the native CUDA kernel -----------------------------------------------------------------------------


class NativeBuild:
    """Builds the native modules (CPU and CUDA, kernels/build_native.py) in a background thread while the
    benchmark rows run: cmake and nvcc use the CPU, not the GPU. Four jobs, to leave cores to the rows."""

    def __init__(self):
        self.result: dict = {}
        self.thread = threading.Thread(target=self._build, daemon=True)
        self.thread.start()

    def _build(self) -> None:
        start = time.perf_counter()
        try:
            from kernels.build_native import build

            files = build(cuda=True, jobs=4)
            self.result = dict(files=[f.name for f in files], seconds=time.perf_counter() - start)
        except Exception as err:  # reported in the row, the suite goes on
            self.result = dict(error=f"{type(err).__name__}: {err}"[-3000:], seconds=time.perf_counter() - start)

    def row(self, timeout_s: float) -> dict:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"the native build was still running after {timeout_s:.0f} s more")
        if "error" in self.result:
            raise RuntimeError(self.result["error"])
        if not any("_zero_conv_cuda" in f for f in self.result["files"]):
            return dict(self.result, status="failed", why="no CUDA module was built (nvcc not found by CMake?)")
        return self.result


# ---- tests ----------------------------------------------------------------------------------------------


def run_tests(args: list[str], timeout_s: float, env: dict) -> dict:
    """One pytest process; its outcome as a row (status failed when pytest fails or times out)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
        ok, tail = done.returncode in (0, 5), (done.stdout + done.stderr)[-3000:]  # 5: all deselected/skipped
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        ok, tail = False, f"timed out after {timeout_s:.0f} s\n{out[-2000:]}"
    last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
    row = dict(command=" ".join(cmd[2:]), summary=last[0], tail=tail, seconds=time.perf_counter() - start)
    return row if ok else dict(row, status="failed", why=f"pytest: {last[0]}")

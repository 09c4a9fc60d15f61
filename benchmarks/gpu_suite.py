"""The one-call GPU suite: install wheels, run the GPU tests, benchmark every engine path against diffusers.

On a GPU machine, in one command (the device tool's `run`, carrying `.whl`):

    python3 -m benchmarks.gpu_suite --wheels .whl --out $OUT

1. installs the wheels in --wheels into /tmp/site (the GPU image has torch, triton, transformers,
   opencv and pytest, but not diffusers);
2. runs the GPU tests (tests/test_optimizations.py, test_groupnorm_silu.py, test_kernels.py,
   test_fused_path.py, but the compile test, whose check the compile row repeats), 150 s at most;
3. benchmarks SD1.5 + one ControlNet at 512², batch 1, CFG, 20 UniPC steps, on the full SD1.5
   architecture with random weights ("sd15-random"), all in this one process:
   - diffusers' StableDiffusionControlNetPipeline eager (fp16, SDPA: its default processors);
   - the engine's reference path in fp16, then each cumulative switch set of
     engine.optimizations.ABLATION in order (the ablation), it/s and ms/step each, each row carrying
     every switch's value;
   - the fp16 PSNR of each row's final image vs the engine's fp32 reference image (>= 35 dB);
   - the fused zero-conv and GroupNorm+SiLU kernels' GB/s vs a device-to-device copy of the same bytes;
   - the fp16 matmul rate measured here, and each row's ms/step as a multiple of the floor
     (the step's counted FLOPs / that rate);
4. writes results.json and results.md (a markdown table) to --out (default $OUT, else
   benchmarks/results/gpu-<date>/). Budgeted to finish well inside 10 minutes on an H100: a row that
   would start after --budget-s seconds is skipped and says so.

Wheels, downloaded here (x86-64, CPython 3.12, the GPU image's Python), into the ignored folder .whl:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl diffusers==0.42.1

diffusers is pure Python (py3-none-any, 6.4 MB); its needs (huggingface_hub>=1.32, safetensors>=0.8, regex,
requests, Pillow, numpy, filelock) are in the GPU image (hub 1.33, safetensors 0.8 as last read), and
importlib_metadata is imported only on Python < 3.8, so no other wheel is needed today. Then, with the
device tool: run(command="PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --out $OUT", carry=[".whl"],
timeout_s=600); the files come back from $OUT, to be committed under benchmarks/results/gpu-<date>/.

`--dry-run` runs the same flow on the CPU in well under a minute: the tiny model, 2 steps, 32², fp32, no
wheels, a quick slice of the tests, and the GPU-only rows (cuda_graphs, compile) and kernels skipped
with the reason written into the results. tests/test_gpu_suite_dry_run.py runs it so it cannot rot.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
PROMPT = "an astronaut riding a horse, best quality"
# The compile test is left to the benchmark's compile row (same check, PSNR vs eager fp32): compiling
# twice would take minutes of the 10.
GPU_TESTS = ["tests/test_optimizations.py", "tests/test_groupnorm_silu.py", "tests/test_kernels.py",
             "tests/test_fused_path.py", "-k", "not compile"]
DRY_TESTS = ["tests/test_groupnorm_silu.py", "-k", "test_fp32 and torch and centred"]
MIN_PSNR_DB = 35.0
COMPILE_RESERVE_S = 150  # the compile row starts only this long before the budget ends: it compiles for minutes


@dataclass(frozen=True)
class SuiteConfig:
    dry_run: bool
    preset: str  # engine model preset
    resolution: int
    steps: int
    runs: int  # timed generations per row (the best is reported)
    warmup: bool  # one untimed generation first (captures, compiles, autotunes)
    budget_s: float  # rows that would start later are skipped
    compile: bool


def suite_config(args) -> SuiteConfig:
    if args.dry_run:
        # 32²: a 4x4 latent, the smallest the tiny UNet's three downsamplers take; no warm-up (nothing to
        # capture or compile on the CPU), so each row is one 2-step generation.
        return SuiteConfig(True, "tiny", 32, 2, 1, False, 45.0, False)
    return SuiteConfig(False, "sd15-random", args.resolution, args.steps, 2, True, args.budget_s, not args.no_compile)


# ---- 1. wheels and 2. tests ----------------------------------------------------------------------------


def install_wheels(folder: str | None, target: str = "/tmp/site") -> dict:
    """pip-install every wheel in folder into target (no index, no deps) and put target on the path."""
    wheels = sorted(Path(folder).glob("*.whl")) if folder else []
    if not wheels:
        return {"installed": [], "note": f"no wheels in {folder!r}: using what is installed"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", target, *map(str, wheels)]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, target)
    os.environ["PYTHONPATH"] = target + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {"installed": [w.name for w in wheels], "target": target}


def run_tests(args: list[str], timeout_s: float) -> dict:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        ok, tail = False, f"timed out after {timeout_s:.0f} s\n{(err.stdout or b'')[-2000:]!r}"
    last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
    return {"command": " ".join(cmd[2:]), "passed": ok, "summary": last[0], "tail": tail,
            "seconds": round(time.perf_counter() - start, 1)}


# ---- timing helpers ------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def matmul_rate(device, dtype) -> float:
    """FLOP/s of an n³ matrix product in dtype, measured here: the practical compute ceiling."""
    import torch

    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_device(lambda: torch.mm(a, b), device, iters=10)


def kernel_rates(device) -> list[dict]:
    """GB/s of the fused kernels at SD1.5's 512² shapes (fp16) beside a copy of the same bytes."""
    import torch

    import kernels
    from benchmarks.bench_kernels import SD15_POINTS, bytes_moved, gpu_fn, make_point

    rows = []
    points = [make_point(C, S, device, torch.float16, seed=i) for i, (C, S) in enumerate(SD15_POINTS)]
    nbytes = sum(bytes_moved(*p[:3]) for p in points)
    for impl in ("torch_unfused", "triton", "copy"):
        fns = [gpu_fn(impl, p) for p in points]
        sec = time_device(lambda: [f() for f in fns], device)
        rows.append(dict(kernel="fused_zero_conv_add, 13 points", impl=impl, us=sec * 1e6, GBps=nbytes / sec / 1e9))
    x = torch.randn(2, 320, 64, 64, device=device, dtype=torch.float16).to(memory_format=torch.channels_last)
    w, b = torch.randn(320, device=device, dtype=torch.float16), torch.randn(320, device=device, dtype=torch.float16)
    nbytes = 2 * x.nbytes  # read once (the floor; the kernel reads twice), write once
    src = torch.empty(x.nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for impl, fn in (("torch", lambda: kernels.group_norm_silu(x, 32, w, b, impl="torch")),
                     ("triton", lambda: kernels.group_norm_silu(x, 32, w, b, impl="triton")),
                     ("copy", lambda: dst.copy_(src))):
        sec = time_device(fn, device)
        rows.append(dict(kernel="group_norm_silu (2,320,64,64) NHWC", impl=impl, us=sec * 1e6, GBps=nbytes / sec / 1e9))
    return rows


def psnr(a, b) -> float:
    """dB between two images in [0, 1]; 999 stands for identical (JSON has no infinity)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 999.0 if mse == 0 else min(999.0, float(10 * np.log10(1.0 / mse)))


# ---- 3. the pipelines ----------------------------------------------------------------------------------


def control_image(resolution: int):
    import PIL.Image

    from engine.preprocess import canny

    with PIL.Image.open(REPO / "engine" / "assets" / "astronaut.png") as im:
        return canny(im.convert("RGB").resize((resolution, resolution), PIL.Image.LANCZOS))


class StepClock:
    """A per-step callback that timestamps each step's end (synchronised): ms/step and it/s over the steps
    after the first, as diffusers' progress bar counts them, excluding text, hint and VAE work."""

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


def timed(generate, device, cfg: SuiteConfig) -> tuple[dict, object]:
    """Warm up once (captures, compiles, autotunes), then `runs` timed generations; the best one counts."""
    if cfg.warmup:
        generate(StepClock(device))
    runs = cfg.runs
    best = None
    for _ in range(runs):
        clock = StepClock(device)
        _sync(device)
        start = time.perf_counter()
        images = generate(clock)
        _sync(device)
        total = (time.perf_counter() - start) * 1e3
        if best is None or clock.ms_per_step() < best["ms_per_step"]:
            best = dict(ms_per_step=clock.ms_per_step(), it_per_s=1e3 / clock.ms_per_step(), total_ms=total)
    return best, images


def _copies(ref, dtype):
    """Fresh copies of the reference Runner's models in dtype: switches change models in place, so every
    row gets its own, and the fp32 reference stays untouched."""
    b = ref.backend
    sd = SimpleNamespace(text_encoder=copy.deepcopy(b.text_encoder.text_encoder).to(dtype),
                         unet=copy.deepcopy(b.unet_model.unet).to(dtype), vae=copy.deepcopy(b.vae_decoder.vae).to(dtype))
    return sd, [copy.deepcopy(body.net).to(dtype) for body in b.controlnet_bodies]


def diffusers_row(ref, cfg: SuiteConfig, device, dtype, edges) -> tuple[dict, object]:
    import torch
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    sd, nets = _copies(ref, dtype)
    pipe = StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=ref.tokenizer, unet=sd.unet, controlnet=nets[0],
        scheduler=UniPCMultistepScheduler.from_config(ref.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    res = cfg.resolution

    def generate(clock):
        return pipe(PROMPT, edges, num_inference_steps=cfg.steps, height=res, width=res, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=clock).images

    with torch.inference_mode():
        return timed(generate, device, cfg)


def engine_row(ref, opts, cfg: SuiteConfig, device, dtype, edges) -> tuple[dict, object]:
    """The Runner over fresh copies of the reference's models in dtype, with `opts` switched on."""
    from engine.backends.torch_backend import TorchBackend

    sd, nets = _copies(ref, dtype)
    runner = copy.copy(ref)
    runner.dtype = dtype
    runner.backend = TorchBackend(sd, nets, device, dtype, opts)
    res = cfg.resolution

    def generate(clock):
        return runner.generate(PROMPT, edges, num_inference_steps=cfg.steps, height=res, width=res, seed=0,
                               preprocess=False, output_type="np", callback=lambda i, n: clock()).images

    return timed(generate, device, cfg)


def benchmark(cfg: SuiteConfig, started: float) -> dict:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from benchmarks.flops import per_sample_flops
    from engine import Runner
    from engine.optimizations import cumulative, describe

    diffusers_logging.set_verbosity_error()  # the per-copy "kept in float32: []" notices of .to(fp16)
    device = torch.device("cuda" if not cfg.dry_run else "cpu")
    dtype = torch.float16 if not cfg.dry_run else torch.float32
    edges = control_image(cfg.resolution)
    out: dict = {"rows": [], "skipped": []}
    rate = matmul_rate(device, dtype)
    flops = per_sample_flops(cfg.preset, cfg.resolution, cfg.resolution)
    step_flops = 2 * (flops["controlnet_body"] + flops["unet"])  # CFG: batch 2
    floor_ms = step_flops / rate * 1e3
    out.update(matmul_tflops=rate / 1e12, step_tflop=step_flops / 1e12, floor_ms_per_step=floor_ms)

    ref = Runner(model=cfg.preset, controlnet="canny", device=device, dtype=torch.float32, optimizations="reference")
    fp32 = ref.generate(PROMPT, edges, num_inference_steps=cfg.steps, height=cfg.resolution, width=cfg.resolution,
                        seed=0, preprocess=False, output_type="np").images

    def add(name, result, images, switches):
        row = dict(path=name, dtype=str(dtype).replace("torch.", ""), **result, x_floor=result["ms_per_step"] / floor_ms,
                   psnr_vs_fp32_db=psnr(images, fp32), switches=switches)
        out["rows"].append(row)
        print(f"{name:28s} {row['it_per_s']:8.2f} it/s {row['ms_per_step']:8.2f} ms/step  PSNR {row['psnr_vs_fp32_db']:.1f} dB",
              flush=True)

    def free():
        # A backend with graphs is a reference cycle (StepGraphs holds its bound step_fn): collect it, so
        # its models and graph pool are gone before the next row copies the models again.
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None

    add("diffusers eager (SDPA)", *diffusers_row(ref, cfg, device, dtype, edges), None)
    free()
    for name, opts in cumulative():
        why = None
        if device.type != "cuda" and (opts.cuda_graphs or opts.compile):
            why = "needs CUDA"
        elif opts.compile and not cfg.compile:
            why = "--no-compile"
        elif time.perf_counter() - started > cfg.budget_s - (COMPILE_RESERVE_S if opts.compile else 0):
            why = f"over the {cfg.budget_s:.0f} s budget"
        if why:
            out["skipped"].append(dict(path=name, why=why))
            continue
        add(name, *engine_row(ref, opts, cfg, device, dtype, edges), describe(opts))
        free()
    base = out["rows"][0]["it_per_s"]
    for row in out["rows"]:
        row["x_diffusers"] = row["it_per_s"] / base
    if device.type == "cuda":
        out["kernels"] = kernel_rates(device)
    else:
        out["skipped"].append(dict(path="kernel GB/s", why="needs CUDA"))
    return out


# ---- 4. writing --------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    env, b = results["environment"], results["benchmark"]
    lines = [f"# GPU suite, {results['date']}", "",
             f"{env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, triton {env['triton']}. "
             f"Model {results['config']['preset']}, {results['config']['resolution']}², batch 1, CFG, "
             f"{results['config']['steps']} UniPC steps, ControlNet canny.", "",
             f"Matmul rate measured here: {b['matmul_tflops']:.3g} TFLOP/s; step = {b['step_tflop']:.3g} TFLOP "
             f"-> floor {b['floor_ms_per_step']:.2f} ms/step.", "",
             "| path | it/s | ms/step | x diffusers | x floor | end-to-end ms | PSNR vs fp32 (dB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in b["rows"]:
        lines.append(f"| {r['path']} | {r['it_per_s']:.2f} | {r['ms_per_step']:.2f} | {r['x_diffusers']:.2f} | "
                     f"{r['x_floor']:.2f} | {r['total_ms']:.0f} | {r['psnr_vs_fp32_db']:.1f} |")
    for s in b["skipped"]:
        lines.append(f"| {s['path']} | skipped: {s['why']} | | | | | |")
    if b.get("kernels"):
        lines += ["", "| kernel | impl | µs | GB/s |", "|---|---|---:|---:|"]
        lines += [f"| {k['kernel']} | {k['impl']} | {k['us']:.1f} | {k['GBps']:.0f} |" for k in b["kernels"]]
    lines += ["", "Tests: " + "; ".join(f"{t['command']}: {'passed' if t['passed'] else 'FAILED'} ({t['summary']})"
                                        for t in results["tests"]),
              "", f"Whole suite: {results['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def environment(dry_run: bool) -> dict:
    import torch

    def version(name):
        try:
            return __import__(name).__version__
        except Exception as err:  # a missing optional package is reported, not fatal
            return f"missing ({type(err).__name__})"

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry_run else platform.processor() or "cpu"
    return dict(device=device, torch=torch.__version__, cuda=torch.version.cuda, diffusers=version("diffusers"),
                triton=version("triton"), python=platform.python_version())


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return REPO / "benchmarks" / "results" / f"gpu-{datetime.now(timezone.utc):%Y%m%d-%H%M}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else benchmarks/results/gpu-<date>/)")
    parser.add_argument("--wheels", default=".whl", help="folder of wheels to install first (default .whl)")
    parser.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU, tiny model, 2 steps, fp32")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip rows that would start after this")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cfg = suite_config(args)
    out_dir = args.out or default_out()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheels = {"note": "dry run: no wheels"} if cfg.dry_run else install_wheels(str(REPO / args.wheels))
    tests = [] if args.skip_tests else [run_tests(DRY_TESTS if cfg.dry_run else GPU_TESTS, 40 if cfg.dry_run else 150)]
    for t in tests:
        print(f"tests: {'passed' if t['passed'] else 'FAILED'}: {t['summary']} ({t['seconds']} s)", flush=True)
    results = dict(date=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", config=cfg.__dict__, wheels=wheels,
                   tests=tests, environment=environment(cfg.dry_run))
    results["benchmark"] = benchmark(cfg, started)
    results["seconds"] = time.perf_counter() - started
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "results.md").write_text(markdown(results))
    print(f"wrote {out_dir / 'results.json'} and results.md in {results['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()

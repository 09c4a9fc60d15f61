"""One denoising step and whole generations, per backend, against diffusers on the same weights.

Every figure is taken in the same run as its baseline: diffusers' `StableDiffusionControlNetPipeline`
built from the very modules the engine runs (no second copy of the weights), and the floor: the step's
FLOPs (counted, benchmarks/flops.py) at the fp32 matmul rate measured in this run.

A "step" is what one denoising step costs with CFG: ControlNet + UNet at batch 2. diffusers' ControlNet
forward includes the hint encoder; the engine's does not (it runs once per generation).
"""
from __future__ import annotations

import PIL.Image
import pytest
import torch

from benchmarks.flops import per_sample_flops

ASSET = "engine/assets/astronaut.png"
PROMPT = "an astronaut, best quality"


@pytest.fixture(scope="module")
def setup(bench_config, tmp_path_factory):
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    from engine import Runner
    from engine.preprocess import canny

    # The engine dir is built first, in its own process: a full-size export peaks at many GB, which
    # must be given back before this process loads its own copy of the weights.
    engine_dir = _build_engine_dir(bench_config, tmp_path_factory) if "onnxruntime" in bench_config.backends else None
    runner = Runner(model=bench_config.preset, controlnet="canny", device="cpu", dtype=torch.float32)
    b = runner.backend
    pipe = StableDiffusionControlNetPipeline(
        vae=b.vae_decoder.vae,
        text_encoder=b.text_encoder.text_encoder,
        tokenizer=runner.tokenizer,
        unet=b.unet_model.unet,
        controlnet=b.controlnet_bodies[0].net,
        scheduler=UniPCMultistepScheduler.from_config(runner.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    res = bench_config.resolution
    with PIL.Image.open(ASSET) as im:
        edges = canny(im.convert("RGB").resize((res, res), PIL.Image.LANCZOS))
    flops = per_sample_flops(bench_config.preset, res, res)
    return dict(runner=runner, pipe=pipe, edges=edges, flops=flops, engine_dir=engine_dir)


def _build_engine_dir(bench_config, tmp_path_factory):
    """An ONNX Runtime engine dir for the same random weights (seeded presets), sized for this run."""
    import subprocess
    import sys
    import time

    out = tmp_path_factory.mktemp("engine") / bench_config.size
    res = str(bench_config.resolution)
    cmd = [sys.executable, "-m", "engine.build", "--model", bench_config.preset, "--controlnet", "canny",
           "--out", str(out), "--backend", "onnxruntime", "--min-size", res, "--opt-size", res, "--max-size", res,
           "--max-batch", "1", "--no-verify", "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"engine build failed ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}")
    print(f"built {out} in {time.perf_counter() - start:.0f} s")
    return out


@pytest.fixture(scope="module")
def step_inputs(setup, bench_config):
    runner = setup["runner"]
    res = bench_config.resolution
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, res // 8, res // 8, generator=gen)
    t = torch.tensor(500)
    embeddings = runner.backend.encode_text(runner._tokenize(["", PROMPT]))
    control = runner._control_tensor(setup["edges"], res, res).expand(2, -1, -1, -1)
    hint = runner.backend.encode_hint(0, control)
    scales = torch.ones(runner.num_residuals)
    return dict(sample=sample, t=t, embeddings=embeddings, control=control, hint=hint, scales=scales)


def _record(benchmark, bench_config, machine_info, matmul_rate, **info):
    benchmark.extra_info.update(
        size=bench_config.size, resolution=bench_config.resolution, matmul_gflops=matmul_rate / 1e9, **machine_info, **info
    )
    if "flops" in info:
        benchmark.extra_info["floor_ms"] = info["flops"] / matmul_rate * 1e3


def _after(benchmark):
    """Add the time as a multiple of the floor once pytest-benchmark has the median."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and "floor_ms" in benchmark.extra_info:
        benchmark.extra_info["x_floor"] = stats.stats.median * 1e3 / benchmark.extra_info["floor_ms"]


def _run(benchmark, bench_config, fn):
    if bench_config.real:
        fn()  # warm-up outside the timed rounds (first-call allocations, oneDNN kernel selection)
        benchmark.pedantic(fn, rounds=bench_config.rounds, iterations=1)
    else:
        benchmark(fn)


# "torch-fused": the torch backend with the fused zero-conv residual path (engine.optimizations).
STEP_BACKENDS = ["diffusers", "torch", "torch-fused", "onnxruntime", "tensorrt"]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step(benchmark, setup, step_inputs, bench_config, machine_info, matmul_rate, backend):
    if backend != "diffusers" and backend.split("-")[0] not in bench_config.backends:
        pytest.skip(f"backend {backend} not selected (--backends {','.join(bench_config.backends)})")
    x = step_inputs
    flops = setup["flops"]
    benchmark.group = f"step {bench_config.size} {bench_config.resolution}px batch 2"
    if backend == "diffusers":
        pipe = setup["pipe"]

        @torch.inference_mode()
        def step():
            down, mid = pipe.controlnet(x["sample"], x["t"], encoder_hidden_states=x["embeddings"],
                                        controlnet_cond=x["control"], conditioning_scale=1.0, return_dict=False)
            return pipe.unet(x["sample"], x["t"], encoder_hidden_states=x["embeddings"],
                             down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

        step_flops = 2 * (flops["controlnet_full"] + flops["unet"])
    else:
        b = engine_backend(setup, bench_config, backend)

        def step():
            out = b.controlnet(0, x["sample"], x["t"], x["embeddings"], x["hint"], x["scales"])
            return b.unet(x["sample"], x["t"], x["embeddings"], b.combine([out], x["sample"].shape[0]))

        step_flops = 2 * (flops["controlnet_body"] + flops["unet"])
    _record(benchmark, bench_config, machine_info, matmul_rate, backend=backend, kind="step", flops=step_flops)
    _run(benchmark, bench_config, step)
    _after(benchmark)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_generate(benchmark, setup, bench_config, machine_info, matmul_rate, backend):
    if backend != "diffusers" and backend.split("-")[0] not in bench_config.backends:
        pytest.skip(f"backend {backend} not selected (--backends {','.join(bench_config.backends)})")
    res, steps = bench_config.resolution, bench_config.steps
    benchmark.group = f"generate {bench_config.size} {res}px {steps} steps"
    kwargs = dict(num_inference_steps=steps, height=res, width=res, output_type="np")
    if backend == "diffusers":
        pipe = setup["pipe"]

        def generate():
            return pipe(PROMPT, setup["edges"], generator=torch.Generator("cpu").manual_seed(0), **kwargs).images
    else:
        runner = engine_runner(setup, bench_config, backend)

        def generate():
            return runner.generate(PROMPT, setup["edges"], seed=0, preprocess=False, **kwargs).images

    _record(benchmark, bench_config, machine_info, matmul_rate, backend=backend, kind="generate", steps=steps)
    _run(benchmark, bench_config, generate)


def engine_runner(setup, bench_config, backend: str):
    if backend == "torch":
        return setup["runner"]
    if backend == "torch-fused":
        return _fused_runner(setup)
    if backend == "onnxruntime" and setup["engine_dir"] is not None:
        if "ort_runner" not in setup:
            from engine import Runner

            setup["ort_runner"] = Runner(engine_dir=str(setup["engine_dir"]), backend="onnxruntime")
        return setup["ort_runner"]
    pytest.skip(f"backend {backend} is not available in this build yet")


def _fused_runner(setup):
    """The same Runner over the same modules, with the fused residual path switched on."""
    import copy
    from types import SimpleNamespace

    from engine.backends.torch_backend import TorchBackend
    from engine.optimizations import PRESETS

    if "fused_runner" not in setup:
        runner = setup["runner"]
        b = runner.backend
        sd = SimpleNamespace(text_encoder=b.text_encoder.text_encoder, unet=b.unet_model.unet, vae=b.vae_decoder.vae)
        nets = [body.net for body in b.controlnet_bodies]
        fused = copy.copy(runner)
        fused.backend = TorchBackend(sd, nets, runner.device, runner.dtype, PRESETS["fused"])
        setup["fused_runner"] = fused
    return setup["fused_runner"]


def engine_backend(setup, bench_config, backend: str):
    return engine_runner(setup, bench_config, backend).backend

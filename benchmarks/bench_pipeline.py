"""One denoising step and whole generations, per backend, against diffusers on the same weights.

Every figure is taken in the same run as its baseline: diffusers' `StableDiffusionControlNetPipeline`
built from the very modules the engine runs (no second copy of the fp32 weights), and the floor: the
step's FLOPs (counted, benchmarks/flops.py) at the matmul rate of the row's dtype measured in this run.

Every generate row also carries its images' error against diffusers' fp32 images (same seed): max abs
and PSNR, so a speed-up that costs quality shows beside the speed-up.

A "step" is what one denoising step costs with CFG: ControlNet + UNet at batch 2. diffusers' ControlNet
forward includes the hint encoder; the engine's does not (it runs once per generation).

`--size sdxl`: the full SDXL base architecture with random weights (engine.tiny "sdxl-random") and an SDXL
ControlNet shaped as diffusers/controlnet-canny-sdxl-1.0-small, against `StableDiffusionXLControlNetPipeline`
at its defaults (guidance 5.0, time ids from the image size), at 512², 4 steps. One CFG step is ~3 TFLOP
there (~23 s on 2 cores), so its rows take fewer rounds (ROUNDS) and some rows are not run (SDXL_NOT_RUN).
"""
from __future__ import annotations

import math

import PIL.Image
import pytest
import torch

from benchmarks.flops import per_sample_flops

ASSET = "engine/assets/astronaut.png"
PROMPT = "an astronaut, best quality"


@pytest.fixture(scope="module")
def setup(request, bench_config):
    yield from held_for_the_module(_setup(request, bench_config))


def held_for_the_module(resources: dict):
    """A module fixture's body: yield its dict of models, then empty it. The dict is made by a plain function
    and only the dict is held here, so when a row's models are popped from it (release_after) nothing else
    keeps them alive: a fixture that made them as its own locals before `yield` held every one of them,
    from a suspended frame, until the module's end."""
    yield resources
    resources.clear()  # pytest holds the dict until the session ends: drop its models now, for the next module
    give_back_memory()


def _setup(request, bench_config) -> dict:
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from engine import Runner
    from engine.preprocess import canny

    # The engine dir is built first, in its own process: a full-size export peaks at many GB, which
    # must be given back before this process loads its own copy of the weights.
    graphs = {"onnxruntime", "openvino"} & set(bench_config.backends) - _not_run_here(bench_config)
    engine_dir, engine_build = request.getfixturevalue("built_engine_dir") if graphs else (None, None)
    runner = Runner(model=bench_config.preset, controlnet=controlnet_name(bench_config), device="cpu",
                    dtype=torch.float32)
    sdxl = runner.family.name == "sdxl"
    pipe = diffusers_pipeline(StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline, runner)
    res = bench_config.resolution
    with PIL.Image.open(ASSET) as im:
        edges = canny(im.convert("RGB").resize((res, res), PIL.Image.LANCZOS))
    flops = per_sample_flops(bench_config.preset, res, res)
    return dict(runner=runner, pipe=pipe, edges=edges, flops=flops, engine_dir=engine_dir, engine_build=engine_build)


def controlnet_name(bench_config) -> str:
    """The registry ControlNet of this size: SD1.5's canny, or for SDXL the -small canny (a preset model's
    registry names give random-weight nets of the preset's architecture, engine.tiny)."""
    from engine import tiny

    return "sdxl-canny-small" if tiny.PRESETS[bench_config.preset].family == "sdxl" else "canny"


def sd15_only(bench_config, what: str) -> None:
    """Skip a bench module whose rows exist for SD1.5 only (SDXL sizes run this module's rows)."""
    from engine import tiny

    if tiny.PRESETS[bench_config.preset].family != "sd15":
        pytest.skip(f"{what} rows are measured on SD1.5 sizes; --size {bench_config.size} runs bench_pipeline.py's rows")


def diffusers_pipeline(pipeline_class, runner):
    """A diffusers ControlNet pipeline of `pipeline_class` (an SD1.5 or SDXL one, as the Runner's family) over
    the torch Runner's own modules (the same weights, so each row's images compare with the baseline's),
    UniPC as the Runner's default."""
    from diffusers import UniPCMultistepScheduler

    b = runner.backend
    modules = dict(vae=b.vae_decoder.vae, text_encoder=b.text_encoder.text_encoder, unet=b.unet_model.unet,
                   controlnet=b.controlnet_bodies[0].net)
    if runner.family.name == "sdxl":
        modules["text_encoder_2"] = b.text_encoders["text_encoder_2"].text_encoder
    return pipeline_over(pipeline_class, runner, modules, UniPCMultistepScheduler.from_config(runner.scheduler_config))


def pipeline_over(pipeline_class, runner, modules: dict, scheduler):
    """`pipeline_class` over these modules (vae, text encoder(s), unet, controlnet), with the Runner's
    tokenizers: SD1.5 pipelines without a safety checker, SDXL ones with the model's
    force_zeros_for_empty_prompt and no watermark."""
    family = runner.family
    if family.name == "sdxl":
        pipe = pipeline_class(**modules, tokenizer=family.tokenizer, tokenizer_2=family.tokenizer_2,
                              scheduler=scheduler, force_zeros_for_empty_prompt=family.force_zeros,
                              add_watermarker=False)
    else:
        pipe = pipeline_class(**modules, tokenizer=runner.tokenizer, scheduler=scheduler, safety_checker=None,
                              feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_engine_dir(bench_config, tmp_path_factory):
    """An engine dir for the same random weights (seeded presets), sized for this run, that ONNX Runtime
    and OpenVINO both run (the same ONNX graphs); returns it and what the build cost: wall seconds, the
    build's peak RSS, and per artefact its files' bytes and export seconds. The build runs in a process of
    its own (a full-size export peaks at 6.7-8.5 GB, FACTS.md), before any row loads a model."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    out = tmp_path_factory.mktemp("engine") / bench_config.size
    res = str(bench_config.resolution)
    backend = "onnxruntime" if "onnxruntime" in bench_config.backends else "openvino"
    cmd = [sys.executable, "-m", "engine.build", "--model", bench_config.preset, "--controlnet", controlnet_name(bench_config),
           "--out", str(out), "--backend", backend, "--min-size", res, "--opt-size", res, "--max-size", res,
           "--max-batch", "1", "--no-verify", "--no-progress"]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # the build's own peak RSS with its exit status
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"engine build failed ({' '.join(cmd)}):\n{log.read()}")
    seconds = time.perf_counter() - start
    peak_gb = usage.ru_maxrss * 1024 / 1e9  # kB on Linux
    print(f"built {out} in {seconds:.0f} s, peak RSS {peak_gb:.1f} GB")
    from engine import manifest

    artefacts = {a.name: dict(bytes=sum((out / f).stat().st_size for f in a.files), build_s=a.build_s)
                 for a in manifest.load(out).artefacts.values()}
    return out, dict(seconds=seconds, peak_rss_gb=peak_gb, artefacts=artefacts)


@pytest.fixture(scope="module")
def step_inputs(setup, bench_config):
    runner = setup["runner"]
    res = bench_config.resolution
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, res // 8, res // 8, generator=gen)
    t = torch.tensor(500)
    if runner.family.name == "sdxl":  # both encoders; time ids (original size, crop 0, target size) as diffusers'
        cond = runner.family.encode_prompts(runner.backend, ["", PROMPT], ["", PROMPT])
        cond["time_ids"] = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(2, 1)
    else:
        cond = runner.family.encode_prompts(runner.backend, ["", PROMPT])
    control = runner.processors.control_tensor(setup["edges"], res, res).expand(2, -1, -1, -1)
    hint = runner.backend.encode_hint(0, control)
    scales = torch.ones(runner.num_residuals)
    return dict(sample=sample, t=t, cond=cond, control=control, hint=hint, scales=scales)


def _record(benchmark, bench_config, machine_info, rate, **info):
    benchmark.extra_info.update(
        size=bench_config.size, resolution=bench_config.resolution, matmul_gflops=rate / 1e9, **machine_info, **info
    )
    if "flops" in info:
        benchmark.extra_info["floor_ms"] = info["flops"] / rate * 1e3


def _after(benchmark):
    """Add the time as a multiple of the floor once pytest-benchmark has the median."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and "floor_ms" in benchmark.extra_info:
        benchmark.extra_info["x_floor"] = stats.stats.median * 1e3 / benchmark.extra_info["floor_ms"]


STEP_ROUNDS, STEP_WARMUPS = 5, 2  # a step is 1-4 s at full size: more rounds cost little and steady the median
GENERATE_ROUNDS = 3
# --size sdxl: an fp32 CFG step is ~25 s and a generation ~2.5 min on 2 cores, so 3 step rounds after 1 warm-up
# and 1 generation (right after its backend's step row warmed it): ~5 minutes a row instead of ~12.
ROUNDS = {"sdxl": dict(step=(3, 1), generate=1)}


def step_rounds(bench_config) -> tuple[int, int]:
    return ROUNDS.get(bench_config.size, {}).get("step", (STEP_ROUNDS, STEP_WARMUPS))


def generate_rounds(bench_config) -> int:
    return ROUNDS.get(bench_config.size, {}).get("generate", GENERATE_ROUNDS)


def _run(benchmark, bench_config, fn, rounds: int, warmups: int):
    """Time fn over `rounds` rounds after `warmups` untimed calls (first-call allocations, oneDNN kernel
    selection, compilation) and a garbage collection; returns its last result. Without --benchmark: one
    untimed call. With one warm-up, no collection and 3 rounds, the steps right after building a backend or
    compiling it ran slow: the compiled bf16 step 1.33-1.59 s, against ~1.27 s a step inside the
    generation timed next (results/cpu-sd15-20261201-083602.json, as of its commit). Generate rows take no
    warm-up: their backend's step row has just warmed it, and a warm-up generation of the full model costs
    7-20 s; a cold first round shows in the IQR, not the median."""
    import gc

    import time

    if not bench_config.real:
        return benchmark(fn)
    for i in range(warmups):
        start = time.perf_counter()
        fn()
        if i == 0:  # what a first call costs: compilation (inductor, OpenVINO), kernel selection
            benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    gc.collect()
    return benchmark.pedantic(fn, rounds=rounds, iterations=1)


# "torch-fused": the torch backend with the fused zero-conv residual path (engine.optimizations).
# "-bf16": bf16 weights (the engine: preset "cpu", fp32 latents and scheduler; diffusers: the pipeline
# cast to bf16, what its users would do); their floor is taken at the bf16 matmul rate.
# "torch-compiled-bf16": preset "cpu-compiled", the step compiled with frozen weights over the same bf16
# modules; its 1-2 minutes of compilation fall in the untimed warm-up call.
# "torch-cpu" / "torch-compiled": the CPU presets "cpu" / "cpu-compiled" for this CPU's class in fp32: the
# presets held to diffusers at the same precision on every CPU, bf16 or not. They run last of the torch
# rows, over the very fp32 modules the rows before them ran (a preset changes modules in place: attention
# processors, channels-last), so no second fp32 copy is held (5.7 GB at full size).
# "openvino-f32" / "openvino-bf16": the engine dir's ONNX graphs (the ones onnxruntime runs) compiled by
# OpenVINO with INFERENCE_PRECISION_HINT f32 / bf16 (Runner(backend="openvino", dtype=...)); the bf16 row
# only where OpenVINO lists BF16 (AVX512-BF16 or AMX). Their compilation falls in the first warm-up call,
# recorded as first_call_s beside compile_s (OpenVINO's own compile or cache-load seconds).
STEP_BACKENDS = ["diffusers", "diffusers-bf16", "torch", "torch-fused", "torch-bf16", "torch-compiled-bf16",
                 "torch-cpu", "torch-compiled", "onnxruntime", "openvino-f32", "openvino-bf16", "tensorrt"]
# What each backend holds in `setup`. Once the last backend that uses a resource is done, the resource is
# dropped: at full size each is GBs (the shared fp32 modules 5.7 GB, bf16 copies 2.6-2.9 GB, the frozen
# step's packed weights ~2.4 GB more, ONNX Runtime's graphs 5.3 GB, OpenVINO's read and compiled graphs).
# Holding them all at once took the sd15 run's peak RSS to 23.1 GB of this machine's 24, and on a Xeon
# with AMX the torch rows alone peaked at 23.8 GB, the graph rows at 21.5 GB (issue #22): now the graph
# rows run without the torch modules, and the fp32 preset rows without a copy of them.
FP32_MODULES = ("pipe", "runner")  # the shared fp32 models: diffusers' pipeline and the torch Runner over them
RESOURCES = {"diffusers": ("fp32_modules",), "diffusers-bf16": ("fp32_modules", "bf16_pipe"),
             "torch": ("fp32_modules",), "torch-fused": ("fp32_modules", "fused_runner"),
             "torch-bf16": ("fp32_modules", "bf16_engine"), "torch-compiled-bf16": ("fp32_modules", "bf16_engine"),
             "torch-cpu": ("fp32_modules", "fp32_engine"), "torch-compiled": ("fp32_modules", "fp32_engine"),
             "onnxruntime": ("ort_runner",), "openvino-f32": ("ov_runner_f32",), "openvino-bf16": ("ov_runner_bf16",)}


@pytest.fixture(scope="module", params=STEP_BACKENDS)
def backend(request, setup):
    """The backend under test. Module-scoped, so pytest runs each backend's step and generate rows
    together, then releases what only that backend needed. pytest does that inside the setup of the next
    backend's first row, whose memory window then starts again, after the release."""
    from benchmarks.conftest import restart_row_memory

    yield request.param
    release_after(setup, request.param, STEP_BACKENDS)
    restart_row_memory(request.config)


def release_after(setup: dict, backend: str, order: list[str]) -> None:
    """Drop from `setup` what `backend` held (RESOURCES) unless a backend after it in `order` uses it too.
    The fp32 modules stay while diffusers' reference images (every generate row's PSNR) are not made yet."""
    later = [resource for b in order[order.index(backend) + 1:] for resource in RESOURCES.get(b, ())]
    dropped = False
    for resource in RESOURCES.get(backend, ()):
        if resource in later or (resource == "fp32_modules" and "reference_images" not in setup):
            continue
        for key in FP32_MODULES if resource == "fp32_modules" else (resource,):
            dropped |= setup.pop(key, None) is not None
        if resource in ("bf16_engine", "fp32_engine"):
            forget_compiled_code()
    if dropped:
        give_back_memory()


def forget_compiled_code() -> None:
    """Drop every compiled step of this process, and the frozen weights in it. torch._dynamo.reset() alone
    freed none of them: inductor's generated module of a frozen step holds its constants (the pre-packed
    weights, and the unpacked ones as the original parameters) as module attributes, and the module stays in
    inductor's PyCodeCache and in sys.modules (torch 2.13). So after the compiled fp32 rows the sd15 run
    kept ~6 GB, and every later row started at 13 GB instead of ~7 (issue #22)."""
    import sys

    from torch._inductor.codecache import PyCodeCache

    torch._dynamo.reset()
    for module in PyCodeCache.modules:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
    PyCodeCache.cache_clear()


def give_back_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc's malloc_trim), so the next row's peak RSS
    is its own and not what earlier rows left in the allocator."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# Rows not run at --size sdxl, and why.
SDXL_EXPORT_NEEDS = ("the fp32 ONNX export of the SDXL UNet (2.57 B parameters, 10.3 GB) needs ~43 GB of RAM "
                     "(>= 3.1x its weights over the models loaded, measured: benchmarks/export_sdxl.py), not this "
                     "machine's 24 GB")
SDXL_NOT_RUN = {
    "torch-fused": "the fused zero-conv residual path is measured at --size sd15 (1.00-1.02x there); at sdxl "
                   "its row would add ~5 minutes to a ~30-minute run",
    # 2026-12-05 (results/cpu-sdxl-20261205-181205.json): a minute into compiling, beside the run's 16 GB of fp32
    # modules, the machine had 0.84 GB left and the run's memory watchdog stopped it.
    "torch-compiled": "inductor's frozen compile of the SDXL step does not fit beside the 16 GB of fp32 modules "
                      "in 24 GB of RAM (measured: 0.84 GB left a minute into compiling)",
    "onnxruntime": SDXL_EXPORT_NEEDS, "openvino-f32": SDXL_EXPORT_NEEDS, "openvino-bf16": SDXL_EXPORT_NEEDS,
}


def _not_run_here(bench_config) -> set[str]:
    """Backend names (as --backends spells them) none of whose rows run at this size."""
    if bench_config.size != "sdxl":
        return set()
    return {"onnxruntime", "openvino"}


def _skip_unless_selected(bench_config, backend: str) -> None:
    if bench_config.size == "sdxl" and backend in SDXL_NOT_RUN:
        pytest.skip(f"--size sdxl: {SDXL_NOT_RUN[backend]}")
    if "-compiled" in backend and not bench_config.real:
        pytest.skip("compiled rows run with --benchmark only: their ~90 s of compilation is no smoke check "
                    "(tests/test_optimizations.py holds the compiled path to the reference)")
    if backend.startswith("openvino"):
        if "openvino" not in bench_config.backends:
            pytest.skip(f"backend openvino not selected (--backends {','.join(bench_config.backends)})")
        import openvino

        from engine.backends.openvino_backend import ov_has_bf16

        if backend.endswith("-bf16") and not ov_has_bf16(openvino.Core()):
            pytest.skip("OpenVINO lists no BF16 on this CPU (no AVX512-BF16 or AMX): asked for bf16 it would run f32")
    elif backend.endswith("-bf16"):
        from engine.optimizations import cpu_has_native_bf16

        if "torch" not in bench_config.backends:
            pytest.skip("bf16 rows come with the torch backend (--backends torch,...)")
        if not cpu_has_native_bf16():
            pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): emulated bf16 is ~30x slower than fp32")
    elif backend != "diffusers" and backend.split("-")[0] not in bench_config.backends:
        pytest.skip(f"backend {backend} not selected (--backends {','.join(bench_config.backends)})")


def test_step(benchmark, setup, step_inputs, bench_config, machine_info, request, backend):
    _skip_unless_selected(bench_config, backend)
    x = step_inputs
    flops = setup["flops"]
    bf16 = backend.endswith("-bf16")
    rate = request.getfixturevalue("matmul_rate_bf16" if bf16 else "matmul_rate")
    benchmark.group = f"step {bench_config.size} {bench_config.resolution}px batch 2"
    if backend.startswith("diffusers"):
        pipe = bf16_pipe(setup) if bf16 else setup["pipe"]
        dtype = pipe.unet.dtype
        sample, control = (x[k].to(dtype) for k in ("sample", "control"))
        embeddings = x["cond"]["encoder_hidden_states"].to(dtype)
        # SDXL: the pooled text embeds and time ids, as its pipeline passes them (in the UNet's dtype)
        added = {k: x["cond"][k].to(dtype) for k in ("text_embeds", "time_ids") if k in x["cond"]} or None

        @torch.inference_mode()
        def step():
            down, mid = pipe.controlnet(sample, x["t"], encoder_hidden_states=embeddings, controlnet_cond=control,
                                        conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
            return pipe.unet(sample, x["t"], encoder_hidden_states=embeddings, added_cond_kwargs=added,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

        step_flops = 2 * (flops["controlnet_full"] + flops["unet"])
    else:
        b = engine_backend(setup, bench_config, backend)
        own_dtype = bf16 and backend.startswith("torch")
        hint = b.encode_hint(0, x["control"]) if own_dtype else x["hint"]  # in the backend's own dtype

        def step():
            out = b.controlnet(0, x["sample"], x["t"], x["cond"], hint, x["scales"])
            return b.unet(x["sample"], x["t"], x["cond"], b.combine([out], x["sample"].shape[0]))

        step_flops = 2 * (flops["controlnet_body"] + flops["unet"])
    _record(benchmark, bench_config, machine_info, rate, backend=backend, kind="step", flops=step_flops)
    if backend in ("onnxruntime", "openvino-f32"):
        benchmark.extra_info["engine_build"] = setup["engine_build"]
    _run(benchmark, bench_config, step, *step_rounds(bench_config))
    if backend.startswith("openvino"):
        benchmark.extra_info.update(compile_s=b.compile_s, precision=b.precision, hint=b.config.hint)
    _after(benchmark)


def test_generate(benchmark, setup, bench_config, machine_info, matmul_rate, backend):
    _skip_unless_selected(bench_config, backend)
    res, steps = bench_config.resolution, bench_config.steps
    benchmark.group = f"generate {bench_config.size} {res}px {steps} steps"
    if backend.startswith("diffusers"):
        pipe = bf16_pipe(setup) if backend.endswith("-bf16") else setup["pipe"]

        def generate():
            return _diffusers_images(pipe, setup, bench_config)
    else:
        runner = engine_runner(setup, bench_config, backend)

        def generate():
            return runner.generate(PROMPT, setup["edges"], seed=0, preprocess=False, **_generate_kwargs(bench_config)).images

    _record(benchmark, bench_config, machine_info, matmul_rate, backend=backend, kind="generate", steps=steps)
    images = _run(benchmark, bench_config, generate, generate_rounds(bench_config), warmups=0)
    if backend == "diffusers":
        setup["reference_images"] = images
    benchmark.extra_info.update(image_error(images, reference_images(setup, bench_config)))


def _generate_kwargs(bench_config) -> dict:
    res = bench_config.resolution
    return dict(num_inference_steps=bench_config.steps, height=res, width=res, output_type="np")


def _diffusers_images(pipe, setup, bench_config):
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(PROMPT, image=setup["edges"], generator=generator, **_generate_kwargs(bench_config)).images


def reference_images(setup, bench_config):
    """diffusers' fp32 images for this run's settings: what every generate row's quality is measured against."""
    if "reference_images" not in setup:
        setup["reference_images"] = _diffusers_images(setup["pipe"], setup, bench_config)
    return setup["reference_images"]


def image_error(images, reference) -> dict:
    """Max abs error and PSNR (dB, images in [0, 1]) against the reference; PSNR None when identical."""
    import numpy as np

    diff = np.asarray(images, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mse = float(np.mean(diff**2))
    return dict(max_abs=float(np.abs(diff).max()), psnr_db=None if mse == 0 else 10 * math.log10(1 / mse))


def engine_runner(setup, bench_config, backend: str):
    if backend == "torch":
        return setup["runner"]
    if backend == "torch-fused":
        return _fused_runner(setup)
    if backend == "torch-cpu":
        return preset_engine(setup, torch.float32)["runner"]
    if backend == "torch-compiled":
        return preset_engine(setup, torch.float32)["compiled"]
    if backend == "torch-bf16":
        return preset_engine(setup, torch.bfloat16)["runner"]
    if backend == "torch-compiled-bf16":
        return preset_engine(setup, torch.bfloat16)["compiled"]
    if backend == "onnxruntime" and setup["engine_dir"] is not None:
        if "ort_runner" not in setup:
            from engine import Runner

            setup["ort_runner"] = Runner(engine_dir=str(setup["engine_dir"]), backend="onnxruntime")
        return setup["ort_runner"]
    if backend.startswith("openvino") and setup["engine_dir"] is not None:
        key = f"ov_runner_{backend.split('-')[1]}"
        if key not in setup:
            from engine import Runner

            dtype = "bf16" if backend.endswith("-bf16") else "fp32"
            setup[key] = Runner(engine_dir=str(setup["engine_dir"]), backend="openvino", dtype=dtype)
        return setup[key]
    pytest.skip(f"backend {backend} is not available in this build yet")


def _runner_over(setup, sd, nets, dtype, optimizations):
    """The fp32 Runner's loop, tokenizer and scheduler over other modules (no second random init)."""
    import copy

    from engine.backends.torch_backend import TorchBackend

    runner = copy.copy(setup["runner"])
    runner.backend = TorchBackend(sd, nets, runner.device, dtype, optimizations)
    runner.dtype = dtype
    return runner


def _fused_runner(setup):
    """The same Runner over the same modules, with the fused residual path switched on."""
    from types import SimpleNamespace

    from engine.optimizations import PRESETS

    if "fused_runner" not in setup:
        b = setup["runner"].backend
        encoders = {name: encoder.text_encoder for name, encoder in b.text_encoders.items()}
        sd = SimpleNamespace(**encoders, unet=b.unet_model.unet, vae=b.vae_decoder.vae)
        nets = [body.net for body in b.controlnet_bodies]
        setup["fused_runner"] = _runner_over(setup, sd, nets, setup["runner"].dtype, PRESETS["fused"])
    return setup["fused_runner"]


def _copy(module, dtype):
    import copy

    return copy.deepcopy(module).to(dtype)


def bf16_pipe(setup):
    """diffusers' pipeline over bf16 copies of the same weights, cast one module at a time: what its users
    would do."""
    import copy

    if "bf16_pipe" not in setup:
        pipe = setup["pipe"]
        half = {name: _copy(getattr(pipe, name), torch.bfloat16) for name in _module_names(pipe) + ("controlnet",)}
        setup["bf16_pipe"] = pipeline_over(type(pipe), setup["runner"], half, copy.deepcopy(pipe.scheduler))
    return setup["bf16_pipe"]


def _module_names(pipe) -> tuple[str, ...]:
    """The pipeline's text encoder(s), UNet and VAE: what a Runner's TorchBackend takes."""
    second = ("text_encoder_2",) if getattr(pipe, "text_encoder_2", None) is not None else ()
    return ("text_encoder", *second, "unet", "vae")


def preset_engine(setup, dtype) -> dict:
    """The engine's Runners in `dtype` with this CPU's presets: "cpu" eager, and "cpu-compiled" over the same
    modules (its frozen weights are inductor's own packed copies). bf16: over bf16 copies of the weights.
    fp32: over the shared fp32 modules themselves, which the presets' switches change in place (attention
    processors, channels-last): these rows run after every other row that uses them (STEP_BACKENDS)."""
    from types import SimpleNamespace

    from engine.optimizations import cpu_preset

    key = "bf16_engine" if dtype == torch.bfloat16 else "fp32_engine"
    if key not in setup:
        pipe = setup["pipe"]
        own = (lambda module: _copy(module, dtype)) if dtype != torch.float32 else (lambda module: module)
        sd = SimpleNamespace(**{name: own(getattr(pipe, name)) for name in _module_names(pipe)})
        nets = [own(pipe.controlnet)]
        # The presets for this CPU's instruction-set class (engine/optimizations.py CPU_PRESETS).
        setup[key] = dict(runner=_runner_over(setup, sd, nets, dtype, cpu_preset("cpu")),
                          compiled=_runner_over(setup, sd, nets, dtype, cpu_preset("cpu-compiled")))
    return setup[key]


def engine_backend(setup, bench_config, backend: str):
    return engine_runner(setup, bench_config, backend).backend

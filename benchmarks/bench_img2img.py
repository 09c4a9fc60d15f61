"""img2img generations at strength 0.5, per backend, against diffusers' img2img pipeline on the same weights.

The baseline is diffusers' `StableDiffusionControlNetImg2ImgPipeline` built from the very modules the
engine's torch Runner runs, timed in the same run. At strength 0.5 both run only the last half of the
steps; every row also carries its images' error against diffusers' fp32 images (same seed), as the
text-to-image rows of bench_pipeline.py do, whose fixtures, backends and recording this mirrors.
"""
from __future__ import annotations

import PIL.Image
import pytest
import torch

from benchmarks.bench_pipeline import (
    ASSET,
    GENERATE_ROUNDS,
    PROMPT,
    _record,
    _run,
    sd15_only,
    _skip_unless_selected,
    diffusers_pipeline,
    engine_runner,
    held_for_the_module,
    image_error,
    release_after,
)

STRENGTH = 0.5
BACKENDS = ["diffusers", "torch", "torch-fused", "torch-bf16", "onnxruntime"]


@pytest.fixture(scope="module")
def setup(request, bench_config):
    yield from held_for_the_module(_setup(request, bench_config))


def _setup(request, bench_config) -> dict:
    sd15_only(bench_config, "img2img")
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from engine import Runner
    from engine.preprocess import canny

    engine_dir, engine_build = (request.getfixturevalue("built_engine_dir") if "onnxruntime" in bench_config.backends
                                else (None, None))
    runner = Runner(model=bench_config.preset, controlnet="canny", device="cpu", dtype=torch.float32)
    pipe = diffusers_pipeline(StableDiffusionControlNetImg2ImgPipeline, runner)
    res = bench_config.resolution
    with PIL.Image.open(ASSET) as im:
        init = im.convert("RGB").resize((res, res), PIL.Image.LANCZOS)
    return dict(runner=runner, pipe=pipe, init=init, edges=canny(init), engine_dir=engine_dir, engine_build=engine_build)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, setup):
    """Module-scoped, as bench_pipeline's: once a backend's row is done, what only it needed is dropped (the
    fp32 torch modules before the onnxruntime row)."""
    yield request.param
    release_after(setup, request.param, BACKENDS)


def _kwargs(bench_config) -> dict:
    return dict(num_inference_steps=bench_config.steps, strength=STRENGTH, controlnet_conditioning_scale=1.0,
                output_type="np")


def _diffusers_images(setup, bench_config):
    generator = torch.Generator("cpu").manual_seed(0)
    return setup["pipe"](PROMPT, image=setup["init"], control_image=setup["edges"], generator=generator,
                         **_kwargs(bench_config)).images


def test_img2img(benchmark, setup, bench_config, machine_info, matmul_rate, backend):
    _skip_unless_selected(bench_config, backend)
    res, steps = bench_config.resolution, bench_config.steps
    benchmark.group = f"img2img {bench_config.size} {res}px {steps} steps strength {STRENGTH}"
    if backend == "diffusers":
        def generate():
            return _diffusers_images(setup, bench_config)
    else:
        runner = engine_runner(setup, bench_config, backend)

        def generate():
            return runner.generate(PROMPT, setup["edges"], init_image=setup["init"], seed=0, preprocess=False,
                                   **_kwargs(bench_config)).images

    _record(benchmark, bench_config, machine_info, matmul_rate, backend=backend, kind="img2img", steps=steps,
            strength=STRENGTH, kept_steps=int(steps * STRENGTH))
    if backend == "onnxruntime":
        benchmark.extra_info["engine_build"] = setup["engine_build"]
    images = _run(benchmark, bench_config, generate, GENERATE_ROUNDS, warmups=0)
    if "reference_images" not in setup:
        setup["reference_images"] = images if backend == "diffusers" else _diffusers_images(setup, bench_config)
    benchmark.extra_info.update(image_error(images, setup["reference_images"]))

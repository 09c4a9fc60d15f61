"""SDXL on the torch backend equals diffusers' SDXL ControlNet pipelines on the tiny SDXL model (engine.tiny
"tiny-sdxl": real diffusers classes, two text encoders, the "text_time" added embedding, 10 residuals).

StableDiffusionXLControlNetPipeline (one and two nets, every scheduler, guess mode, windows, size
micro-conditioning, second prompts), ...Img2ImgPipeline, ...InpaintPipeline and
StableDiffusionXLControlNetUnionPipeline (one and two conditions), each against a Runner over the same folders,
same seed; fp32 on the CPU, max abs <= 1e-5. LoRA (diffusers and kohya files) is tests/test_sdxl_lora.py.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from tests.conftest import max_errors
from tests.test_parity import DIFFUSERS_SCHEDULERS

TOL = 1e-5
BASE = dict(prompt="a photo of the astronaut", num_inference_steps=3, height=64, width=64)


def _picture(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pictures(edges, photo):
    return dict(edges=edges.resize((64, 64)), photo=photo.resize((64, 64)), noise=_picture(1),
                mask=_picture(2).convert("L"))


@pytest.fixture(scope="module")
def pipes(tiny_sdxl_dir):
    """diffusers' SDXL ControlNet pipelines over the saved tiny SDXL folders (one set of loaded models)."""
    from diffusers import (ControlNetModel, ControlNetUnionModel, StableDiffusionXLControlNetImg2ImgPipeline,
                           StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLControlNetPipeline,
                           StableDiffusionXLControlNetUnionPipeline)

    canny = ControlNetModel.from_pretrained(tiny_sdxl_dir["canny"])
    depth = ControlNetModel.from_pretrained(tiny_sdxl_dir["depth"])
    union = ControlNetUnionModel.from_pretrained(tiny_sdxl_dir["union"])
    one = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_dir["model"], controlnet=canny,
                                                              add_watermarker=False)
    parts = {k: v for k, v in one.components.items() if k != "controlnet"}
    made = dict(
        one=one,
        two=StableDiffusionXLControlNetPipeline(**parts, controlnet=[canny, depth], add_watermarker=False),
        img2img=StableDiffusionXLControlNetImg2ImgPipeline(**parts, controlnet=canny, add_watermarker=False),
        inpaint=StableDiffusionXLControlNetInpaintPipeline(**parts, controlnet=canny, add_watermarker=False),
        union=StableDiffusionXLControlNetUnionPipeline(**parts, controlnet=union, add_watermarker=False),
    )
    for pipe in made.values():
        pipe.set_progress_bar_config(disable=True)
    made["scheduler_config"] = dict(one.scheduler.config)
    return made


@pytest.fixture(scope="module")
def runners(tiny_sdxl_dir):
    from engine import Runner

    model = str(tiny_sdxl_dir["model"])
    nets = {k: str(tiny_sdxl_dir[k]) for k in ("canny", "depth", "union")}
    return dict(one=Runner(model=model, controlnet=nets["canny"], device="cpu"),
                two=Runner(model=model, controlnet=[nets["canny"], nets["depth"]], device="cpu"),
                union=Runner(model=model, controlnet=nets["union"], device="cpu"))


def _both(pipes, runner, pipe_name, ours_kwargs, theirs_kwargs, scheduler="euler", seed=0, **common):
    pipe = pipes[pipe_name]
    pipe.scheduler = DIFFUSERS_SCHEDULERS[scheduler](pipes["scheduler_config"])
    expected = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **common,
                    **theirs_kwargs).images
    ours = runner.generate(scheduler=scheduler, seed=seed, output_type="np", preprocess=False, **common,
                           **ours_kwargs).images
    return ours, expected


def assert_parity(ours, expected, label: str):
    abs_err, rel_err = max_errors(ours, expected)
    print(f"sdxl parity {label}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{label}: max abs error {abs_err:.3g} > {TOL}"


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_every_scheduler(pipes, runners, pictures, scheduler):
    image = pictures["edges"]
    ours, expected = _both(pipes, runners["one"], "one", dict(image=image), dict(image=image), scheduler, **BASE)
    assert_parity(ours, expected, scheduler)


CASES = {
    "defaults": dict(),
    "negative_and_second_prompts": dict(negative_prompt="blurry", prompt_2="a painting", negative_prompt_2="dark",
                                        num_images_per_prompt=2),
    "size_conditioning": dict(original_size=(128, 96), crops_coords_top_left=(8, 16), target_size=(64, 48),
                              negative_original_size=(32, 32), negative_crops_coords_top_left=(0, 8),
                              negative_target_size=(64, 64)),
    "guess_mode": dict(guess_mode=True, controlnet_conditioning_scale=0.7),
    "window": dict(control_guidance_start=0.3, control_guidance_end=0.7, num_inference_steps=4),
    "no_cfg": dict(guidance_scale=1.0),
    "non_square": dict(height=64, width=96),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_txt2img_cases(pipes, runners, pictures, case):
    kwargs = {**BASE, **CASES[case]}
    image = pictures["edges"]
    ours, expected = _both(pipes, runners["one"], "one", dict(image=image), dict(image=image), **kwargs)
    assert_parity(ours, expected, case)


def test_two_controlnets(pipes, runners, pictures):
    images = [pictures["edges"], pictures["photo"]]
    kwargs = {**BASE, "controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_start": [0.0, 0.4],
              "control_guidance_end": [0.6, 1.0], "num_inference_steps": 4}
    ours, expected = _both(pipes, runners["two"], "two", dict(image=images), dict(image=images), **kwargs)
    assert_parity(ours, expected, "two nets")


def test_img2img(pipes, runners, pictures):
    """Img2Img: default strength 0.8 and scale 0.8; its negative crop is the positive crop, as diffusers'."""
    kwargs = {**BASE, "num_inference_steps": 4, "negative_prompt": "blurry", "negative_original_size": (48, 48),
              "negative_crops_coords_top_left": (8, 8)}
    ours, expected = _both(pipes, runners["one"], "img2img",
                           dict(image=pictures["edges"], init_image=pictures["photo"]),
                           dict(control_image=pictures["edges"], image=pictures["photo"]), scheduler="dpmpp_2m", **kwargs)
    assert_parity(ours, expected, "img2img")


@pytest.mark.parametrize("strength", [None, 0.6])
def test_inpaint(pipes, runners, pictures, strength):
    """Inpainting with a 4-channel UNet: default strength 0.9999, default scale 1.0 (SDXL's pipeline)."""
    extra = {} if strength is None else {"strength": strength}
    kwargs = {**BASE, "num_inference_steps": 4, **extra}
    ours, expected = _both(pipes, runners["one"], "inpaint",
                           dict(image=pictures["edges"], init_image=pictures["photo"], mask_image=pictures["mask"]),
                           dict(control_image=pictures["edges"], image=pictures["photo"], mask_image=pictures["mask"]),
                           **kwargs)
    assert_parity(ours, expected, f"inpaint strength {strength}")


UNION_CASES = {
    # (our control_type, diffusers' control_mode, images, extra arguments for both)
    "one_condition": (["canny"], [3], ["edges"], dict(controlnet_conditioning_scale=0.8)),
    "two_conditions": (["openpose", "canny"], [0, 3], ["photo", "edges"], dict()),
    "two_with_windows_and_scales": (["depth", 3], [1, 3], ["photo", "edges"], dict(
        controlnet_conditioning_scale=[0.5, 1.2], control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0],
        num_inference_steps=4)),
    # diffusers' union pipeline fails in guess mode with guidance (its control_type keeps the CFG batch)
    "guess_mode_no_cfg": (["depth", "canny"], [1, 3], ["photo", "edges"], dict(guess_mode=True, guidance_scale=1.0)),
}


@pytest.mark.parametrize("case", sorted(UNION_CASES))
def test_union(pipes, runners, pictures, case):
    types, modes, names, extra = UNION_CASES[case]
    images = [pictures[n] for n in names]
    kwargs = {**BASE, **extra}
    ours, expected = _both(pipes, runners["union"], "union", dict(image=images, control_type=types),
                           dict(control_image=images, control_mode=modes), **kwargs)
    assert_parity(ours, expected, f"union {case}")


def test_union_conditions_matter(runners, pictures):
    """The tiny union net's output moves with each condition's image and type (so the parity rows test them)."""
    runner = runners["union"]
    run = lambda **kw: runner.generate(**BASE, seed=0, output_type="np", preprocess=False, **kw).images
    base = run(image=[pictures["photo"], pictures["edges"]], control_type=["depth", "canny"])
    other_image = run(image=[pictures["photo"], pictures["noise"]], control_type=["depth", "canny"])
    other_type = run(image=[pictures["photo"], pictures["edges"]], control_type=["depth", "openpose"])
    assert max_errors(base, other_image)[0] > 1e-3
    assert max_errors(base, other_type)[0] > 1e-3


def test_family_and_layout(runners):
    runner = runners["two"]
    assert runner.family.name == "sdxl" and runner.num_residuals == 10
    assert runner.backend.controlnet_bodies[0].cond_inputs == ("encoder_hidden_states", "text_embeds", "time_ids")
    assert runners["union"].parts.unions == [6]

"""Runner(backend="torch") equals diffusers' StableDiffusionControlNetPipeline on the same tiny weights.

Both load the same folders from disk; both get the same seed; images are compared as float arrays in
[0, 1] (output_type="np"), and as PIL pixels once. fp32 on the CPU: max abs difference <= 1e-5.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    UniPCMultistepScheduler,
)

from tests.conftest import max_errors

TOL = 1e-5  # fp32, CPU

# Written out here rather than imported from engine.schedulers, so the test checks that mapping too.
DIFFUSERS_SCHEDULERS = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "euler_a": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
    "dpmpp_2m": lambda c: DPMSolverMultistepScheduler.from_config(c),
    "dpmpp_2m_karras": lambda c: DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True),
    "unipc": lambda c: UniPCMultistepScheduler.from_config(c),
}


@pytest.fixture(scope="module")
def pipes(tiny_dir):
    """diffusers pipelines with one and with two ControlNets, loaded from the saved tiny model."""
    canny = ControlNetModel.from_pretrained(tiny_dir["canny"])
    depth = ControlNetModel.from_pretrained(tiny_dir["depth"])
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    one = StableDiffusionControlNetPipeline.from_pretrained(tiny_dir["model"], controlnet=canny, **kwargs)
    two = StableDiffusionControlNetPipeline.from_pretrained(tiny_dir["model"], controlnet=[canny, depth], **kwargs)
    for pipe in (one, two):
        pipe.set_progress_bar_config(disable=True)
        pipe.model_scheduler_config = dict(pipe.scheduler.config)  # each test builds its scheduler from this
    return {1: one, 2: two}


@pytest.fixture(scope="module")
def runners(tiny_dir):
    from engine import Runner

    one = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="torch", device="cpu")
    two = Runner(
        model=str(tiny_dir["model"]),
        controlnet=[str(tiny_dir["canny"]), str(tiny_dir["depth"])],
        backend="torch",
        device="cpu",
    )
    return {1: one, 2: two}


def run_both(pipes, runners, nets: int, images, scheduler: str = "unipc", seed: int = 0, **kwargs):
    pipe = pipes[nets]
    pipe.scheduler = DIFFUSERS_SCHEDULERS[scheduler](pipe.model_scheduler_config)
    expected = pipe(
        image=images if nets > 1 else images[0],
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images
    ours = runners[nets].generate(
        image=images, scheduler=scheduler, seed=seed, output_type="np", preprocess=False, **kwargs
    ).images
    return ours, expected


def assert_parity(ours, expected, label: str):
    abs_err, rel_err = max_errors(ours, expected)
    print(f"parity {label}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{label}: max abs error {abs_err:.3g} > {TOL}"


BASE = dict(prompt="a photo of the astronaut", num_inference_steps=5, height=64, width=64)


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_every_scheduler(pipes, runners, edges, scheduler):
    ours, expected = run_both(pipes, runners, 1, [edges], scheduler=scheduler, **BASE)
    assert_parity(ours, expected, scheduler)


CASES = {
    "guess_mode": dict(guess_mode=True),
    "guidance_window": dict(control_guidance_start=0.2, control_guidance_end=0.7, num_inference_steps=6),
    "negative_prompt": dict(negative_prompt="blurry, low quality"),
    "two_images_per_prompt": dict(num_images_per_prompt=2),
    "non_square_64x96": dict(height=64, width=96),
    "no_cfg": dict(guidance_scale=1.0),
    "strength_0.6": dict(controlnet_conditioning_scale=0.6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_controlnet_cases(pipes, runners, edges, case):
    kwargs = {**BASE, **CASES[case]}
    ours, expected = run_both(pipes, runners, 1, [edges], **kwargs)
    assert_parity(ours, expected, case)


MULTI_CASES = {
    "scales_0.7_1.3": dict(controlnet_conditioning_scale=[0.7, 1.3]),
    "one_scale_zero": dict(controlnet_conditioning_scale=[0.0, 1.2]),
    "windows_per_net": dict(control_guidance_start=[0.0, 0.4], control_guidance_end=[0.5, 1.0], num_inference_steps=6),
    "guess_mode": dict(guess_mode=True, controlnet_conditioning_scale=[0.8, 0.5]),
}


@pytest.mark.parametrize("case", sorted(MULTI_CASES))
def test_two_controlnets(pipes, runners, edges, photo, case):
    kwargs = {**BASE, **MULTI_CASES[case]}
    ours, expected = run_both(pipes, runners, 2, [edges, photo], **kwargs)
    assert_parity(ours, expected, case)


def test_two_prompts_with_negatives(pipes, runners, edges):
    kwargs = {**BASE, "prompt": ["a red car", "the stars"], "negative_prompt": ["blurry", "dark"]}
    ours, expected = run_both(pipes, runners, 1, [edges], **kwargs)
    assert_parity(ours, expected, "two_prompts")


def test_pil_output_matches(pipes, runners, edges):
    pipe = pipes[1]
    pipe.scheduler = DIFFUSERS_SCHEDULERS["unipc"](pipe.model_scheduler_config)
    expected = pipe(image=edges, generator=torch.Generator("cpu").manual_seed(3), **BASE).images[0]
    ours = runners[1].generate(image=edges, seed=3, preprocess=False, **BASE).images[0]
    assert ours.size == expected.size == (64, 64)
    assert list(ours.getdata()) == list(expected.getdata())

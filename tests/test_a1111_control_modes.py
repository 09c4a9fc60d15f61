"""Runner.generate(control_mode=...): the A1111 ControlNet extension's three modes, checked against diffusers.

"ControlNet is more important" is diffusers' guess mode (the ControlNet sees the conditional half only)
with the extension's per-block scales 0.825**(12-i) in place of guess mode's logspace(-1, 0); so diffusers
with its logspace replaced by those scales is the reference. "Balanced" is diffusers without guess mode.
"My prompt is more important" has the same scales on both halves: without CFG (guidance 1) there is no
unconditional half, so it must equal "ControlNet is more important" there. fp32 on the CPU, 1e-5.
"""
import pytest
import torch

from tests.conftest import max_errors

TOL = 1e-5
BASE = dict(prompt="a photo of the astronaut", num_inference_steps=2, height=64, width=64, seed=0, output_type="np")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    net = ControlNetModel.from_pretrained(tiny_dir["canny"])
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_dir["model"], controlnet=net, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runner(tiny_dir):
    from engine import Runner

    return Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), device="cpu")


def diffusers_images(pipe, edges, **kwargs):
    args = {k: v for k, v in BASE.items() if k != "seed"}
    return pipe(image=edges, generator=torch.Generator("cpu").manual_seed(BASE["seed"]), **args, **kwargs).images


def ours(runner, edges, **kwargs):
    return runner.generate(image=edges, preprocess=False, **BASE, **kwargs).images


def check(a, b, label):
    abs_err, rel_err = max_errors(a, b)
    print(f"{label}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, label


def test_soft_block_scales():
    from engine.request import soft_block_scales

    scales = soft_block_scales(0.5, 13)
    assert scales.shape == (13,) and scales[-1] == 0.5
    torch.testing.assert_close(scales, 0.5 * 0.825 ** torch.arange(12, -1, -1, dtype=torch.float32))


def test_balanced_is_diffusers_without_guess_mode(pipe, runner, edges):
    check(ours(runner, edges, control_mode="balanced", controlnet_conditioning_scale=0.7),
          diffusers_images(pipe, edges, controlnet_conditioning_scale=0.7), "balanced")


def test_controlnet_is_more_important_is_guess_mode_with_the_extensions_scales(pipe, runner, edges, monkeypatch):
    from engine.request import soft_block_scales

    expected_scales = soft_block_scales(1.0, runner.num_residuals)
    original = torch.logspace

    def extension_scales(start, end, steps, **kwargs):  # what diffusers' guess mode calls, once per step
        assert (start, end, steps) == (-1, 0, runner.num_residuals)
        return expected_scales.to(kwargs.get("device") or "cpu")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "logspace", extension_scales)
        expected = diffusers_images(pipe, edges, guess_mode=True, controlnet_conditioning_scale=0.8)
    assert torch.logspace is original
    check(ours(runner, edges, control_mode="controlnet", controlnet_conditioning_scale=0.8), expected, "controlnet")


def test_prompt_mode_has_the_same_scales_without_cfg(runner, edges):
    check(ours(runner, edges, control_mode="prompt", guidance_scale=1.0),
          ours(runner, edges, control_mode="controlnet", guidance_scale=1.0), "prompt vs controlnet without CFG")


def test_control_mode_errors(runner, edges):
    with pytest.raises(ValueError, match="control_mode must be one of"):
        ours(runner, edges, control_mode="strong")
    with pytest.raises(ValueError, match="guess_mode or control_mode"):
        ours(runner, edges, control_mode="prompt", guess_mode=True)

"""Few-step generation on the torch backend equals diffusers' ControlNet pipelines given the same scheduler,
UNet, LoRA and VAE (fp32 CPU, max abs <= 1e-5): the LCM, TCD and trailing-spacing schedulers at guidance 1
(batch 1, no unconditional half) and above, an LCM-distilled UNet (time_cond_proj_dim: the guidance as an
input), an LCM-LoRA-style LoRA at guidance 1.5, and TAESD (AutoencoderTiny) for text to image, img2img and
inpainting. 64² images, 2-4 steps; the graph backends' side is tests/test_fewstep_graphs.py."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    TCDScheduler,
)

from tests.conftest import max_errors
from tests.test_build import one_torch_thread  # noqa: F401 (autouse: steady on the shared cores)

TOL = 1e-5  # fp32, CPU
PIPE_KWARGS = dict(safety_checker=None, requires_safety_checker=False)
# Written out here rather than imported from engine.schedulers, so the test checks that mapping too.
DIFFUSERS_SCHEDULERS = {
    "lcm": lambda c: LCMScheduler.from_config(c),
    "tcd": lambda c: TCDScheduler.from_config(c),
    "ddim_trailing": lambda c: DDIMScheduler.from_config(c, timestep_spacing="trailing"),
    "euler_trailing": lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing"),
}
BASE = dict(prompt="a photo of the astronaut", num_inference_steps=4, height=64, width=64)
# What latent-consistency/lcm-lora-sdv1-5 targets (its training script's list): attention, feed-forward, and
# the resnets' convolutions and time projections; written in kohya's format, as that file is.
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def save_lcm_style_lora(tiny_dir, out) -> str:
    """A LoRA of the tiny UNet shaped like LCM-LoRA (3x3 convs, time embeddings; rank 4, alpha 4)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from tests.test_lora import _kohya, _peft_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_dir["model"], subfolder="unet")
    state, _ = _peft_lora(unet, LCM_LORA_TARGETS, r=4, alpha=4, seed=7)
    path = out / "lcm_style_lora.safetensors"
    save_file(_kohya(state, "lora_unet", 4), str(path))
    return str(path)


@pytest.fixture(scope="module")
def lcm_lora(tiny_dir, tmp_path_factory):
    return save_lcm_style_lora(tiny_dir, tmp_path_factory.mktemp("lcm_lora"))


@pytest.fixture(scope="module")
def fewstep_dir(tmp_path_factory):
    """The tiny LCM model (its UNet has time_cond_proj_dim) with a canny ControlNet, and a tiny TAESD."""
    from engine.tiny import save_tiny, tiny_taesd

    root = tmp_path_factory.mktemp("fewstep")
    paths = save_tiny(root / "lcm", controlnets=("canny",), preset="tiny-lcm")
    paths["taesd"] = root / "taesd"
    tiny_taesd().save_pretrained(paths["taesd"])
    return paths


@pytest.fixture(scope="module")
def control(edges):
    return edges.resize((64, 64))


@pytest.fixture(scope="module")
def init(photo):
    return photo.resize((64, 64), PIL.Image.LANCZOS)


@pytest.fixture(scope="module")
def runner(tiny_dir, fewstep_dir):
    """The tiny model with TAESD beside its own VAE: `vae="model"` picks the model's."""
    from engine import Runner

    return Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="torch", device="cpu",
                  vae=str(fewstep_dir["taesd"]))


def pipeline(cls, model, net, vae=None):
    extra = {} if vae is None else dict(vae=AutoencoderTiny.from_pretrained(vae))
    pipe = cls.from_pretrained(model, controlnet=ControlNetModel.from_pretrained(net), **PIPE_KWARGS, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def diffusers_images(pipe, scheduler: str, seed: int = 0, **kwargs):
    pipe.scheduler = DIFFUSERS_SCHEDULERS[scheduler](pipe.model_scheduler_config)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(generator=generator, output_type="np", **kwargs).images


def assert_parity(ours, expected, label: str) -> None:
    abs_err, rel_err = max_errors(ours, expected)
    print(f"fewstep parity {label}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{label}: max abs error {abs_err:.3g} > {TOL}"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return pipeline(StableDiffusionControlNetPipeline, tiny_dir["model"], tiny_dir["canny"])


@pytest.mark.parametrize("guidance", [1.0, 1.5])
@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_fewstep_schedulers(pipe, runner, control, scheduler, guidance):
    eta = 0.3 if scheduler == "tcd" else 0.0  # TCD's gamma: stochastic steps, noise from the generator
    kwargs = dict(BASE, guidance_scale=guidance, eta=eta)
    expected = diffusers_images(pipe, scheduler, image=control, **kwargs)
    ours = runner.generate(image=control, scheduler=scheduler, seed=0, output_type="np", preprocess=False,
                           vae="model", **kwargs)
    assert_parity(ours.images, expected, f"{scheduler} guidance {guidance}")


@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_lcm_unet_takes_guidance_as_input(fewstep_dir, control, guidance):
    """time_cond_proj_dim: the guidance scale becomes the UNet's timestep_cond and CFG never runs."""
    from engine import Runner

    lcm = pipeline(StableDiffusionControlNetPipeline, fewstep_dir["model"], fewstep_dir["canny"])
    ours = Runner(model=str(fewstep_dir["model"]), controlnet=str(fewstep_dir["canny"]), backend="torch", device="cpu")
    assert ours.family.guidance_embedded
    kwargs = dict(BASE, guidance_scale=guidance)
    expected = diffusers_images(lcm, "lcm", image=control, **kwargs)
    got = ours.generate(image=control, scheduler="lcm", seed=0, output_type="np", preprocess=False, **kwargs)
    assert_parity(got.images, expected, f"LCM UNet guidance {guidance}")
    plan = ours.prepare(image=control, scheduler="lcm", preprocess=False, **kwargs)
    assert not plan.do_cfg and plan.batch == 1
    other = ours.generate(image=control, scheduler="lcm", seed=0, output_type="np", preprocess=False,
                          **dict(kwargs, guidance_scale=guidance + 2.0))
    assert max_errors(other.images, got.images)[0] > 1e-3, "the guidance embedding must change the image"


def test_guidance_embedding_equals_diffusers():
    from engine.families import guidance_embedding

    for guidance in (1.0, 1.5, 8.0):
        for dim in (32, 33, 256):
            want = StableDiffusionControlNetPipeline.get_guidance_scale_embedding(
                None, torch.tensor(guidance - 1).repeat(2), embedding_dim=dim)
            assert torch.equal(guidance_embedding(guidance, dim, 2), want), (guidance, dim)


def test_lora_at_guidance_1_5(tiny_dir, pipe, runner, lcm_lora, control):
    """An LCM-LoRA is an ordinary LoRA: the existing path, with the lcm scheduler at guidance 1.5."""
    file = lcm_lora
    lora_pipe = pipeline(StableDiffusionControlNetPipeline, tiny_dir["model"], tiny_dir["canny"])
    lora_pipe.load_lora_weights(str(file), adapter_name="fewstep")
    lora_pipe.fuse_lora()
    kwargs = dict(BASE, guidance_scale=1.5)
    expected = diffusers_images(lora_pipe, "lcm", image=control, **kwargs)
    runner.set_loras([(str(file), 1.0)])
    try:
        ours = runner.generate(image=control, scheduler="lcm", seed=0, output_type="np", preprocess=False, vae="model",
                               **kwargs)
    finally:
        runner.set_loras([])
    assert_parity(ours.images, expected, "LoRA lcm guidance 1.5")
    assert max_errors(expected, diffusers_images(pipe, "lcm", image=control, **kwargs))[0] > 100 * TOL


def test_taesd_text_to_image(tiny_dir, fewstep_dir, runner, control):
    taesd = pipeline(StableDiffusionControlNetPipeline, tiny_dir["model"], tiny_dir["canny"], fewstep_dir["taesd"])
    kwargs = dict(BASE, guidance_scale=1.0)
    expected = diffusers_images(taesd, "lcm", image=control, **kwargs)
    ours = runner.generate(image=control, scheduler="lcm", seed=0, output_type="np", preprocess=False, **kwargs)
    assert ours.parameters["vae"] == "taesd"
    assert_parity(ours.images, expected, "TAESD txt2img")
    full = runner.generate(image=control, scheduler="lcm", seed=0, output_type="np", preprocess=False, vae="model",
                           **kwargs)
    assert max_errors(full.images, ours.images)[0] > 1e-2, "vae='model' must decode with the model's own VAE"


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_taesd_encodes_init_image(tiny_dir, fewstep_dir, runner, control, init, mode):
    """TAESD encodes to latents without a generator draw, as diffusers' retrieve_latents takes them, so the
    start noise (and LCM's step noise) are drawn one earlier than with the full VAE: equal to diffusers."""
    if mode == "img2img":
        cls, extra, ours_extra = StableDiffusionControlNetImg2ImgPipeline, dict(image=init, control_image=control), {}
    else:
        mask = PIL.Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
        cls, extra = StableDiffusionControlNetInpaintPipeline, dict(image=init, mask_image=mask, control_image=control)
        ours_extra = dict(mask_image=mask)
    taesd = pipeline(cls, tiny_dir["model"], tiny_dir["canny"], fewstep_dir["taesd"])
    kwargs = dict(BASE, guidance_scale=1.5, strength=0.75)
    kwargs.pop("height"), kwargs.pop("width")
    expected = diffusers_images(taesd, "lcm", **extra, **kwargs)
    ours = runner.generate(image=control, init_image=init, scheduler="lcm", seed=0, output_type="np",
                           preprocess=False, **ours_extra, **kwargs)
    assert_parity(ours.images, expected, f"TAESD {mode}")


def test_bad_few_step_calls_fail_before_model_work(runner, control):
    with pytest.raises(ValueError, match="lcm.*num_inference_steps=60"):
        runner.prepare("x", image=control, scheduler="lcm", num_inference_steps=60)
    with pytest.raises(ValueError, match="vae 'other' is not loaded.*'model', 'taesd'"):
        runner.prepare("x", image=control, vae="other")
    assert runner.prepare("x", image=control, vae="None").vae.name == "model"  # A1111's "None"
    assert runner.prepare("x", image=control, vae="Automatic").vae.name == "taesd"


def test_preview_decodes_with_taesd(runner, tiny_dir, control):
    from engine import Runner

    seen = []
    runner.generate("x", image=control, num_inference_steps=2, scheduler="lcm", guidance_scale=1.0, seed=0,
                    latents_callback=lambda step, total, latents: seen.append(runner.preview(latents)))
    assert [im.size for im in seen] == [(64, 64), (64, 64)]
    plain = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="torch", device="cpu")
    assert plain.preview(torch.zeros(1, 4, 8, 8)) is None  # no TAESD: no preview (the full decoder costs a step)


def test_cli_few_step_recipe_is_recorded_and_reruns(tmp_path):
    """engine.generate --scheduler lcm --vae: the PNG says Sampler LCM and VAE, --from-png gives its pixels,
    and the per-stage timing table is printed."""
    from tests.test_cli_generate import FAST, PHOTO, cli, pixels

    out = tmp_path / "fast.png"
    proc = cli(*FAST, "--prompt", "an astronaut", "--image", PHOTO, "--seed", "4", "--scheduler", "lcm", "--guidance",
               "1", "--vae", "tiny-taesd", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for stage in ("text encoder", "UNet x 2", "VAE", "s/image"):
        assert stage in proc.stdout
    text = PIL.Image.open(out).info["parameters"]
    assert "Sampler: LCM" in text and "VAE: tiny-taesd" in text and "CFG scale: 1" in text
    again = tmp_path / "again.png"
    proc = cli("--from-png", str(out), "--out", str(again), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(pixels(again), pixels(out))

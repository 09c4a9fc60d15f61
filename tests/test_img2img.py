"""img2img and inpainting: Runner(backend="torch") equals diffusers' StableDiffusionControlNetImg2ImgPipeline
and StableDiffusionControlNetInpaintPipeline on the same tiny weights saved to disk (fp32 CPU, max abs
<= 1e-5), only the kept steps run, and bad calls fail before any model work with a message naming the value.

Sizes are never passed: both sides take them from the init image (64x64, or 64x96 in that case), so the
defaults are checked too. The inpaint ControlNet's control map is built by the test with the diffusers
recipe (make_inpaint_condition) for diffusers, and by the Runner's own inpaint preprocessor.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
)

from tests.conftest import max_errors
from tests.test_build import one_torch_thread  # noqa: F401 (autouse: steady timings on the shared cores)
from tests.test_parity import DIFFUSERS_SCHEDULERS, TOL

PIPE_KWARGS = dict(safety_checker=None, requires_safety_checker=False)
BASE = dict(prompt="a photo of the astronaut", num_inference_steps=6, controlnet_conditioning_scale=0.9)


def make_inpaint_condition(image: PIL.Image.Image, mask: PIL.Image.Image) -> torch.Tensor:
    """The diffusers ControlNet inpaint recipe's control image: masked pixels -1."""
    pixels = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    masked = np.array(mask.convert("L")).astype(np.float32) / 255.0
    pixels[masked > 0.5] = -1.0
    return torch.from_numpy(np.expand_dims(pixels, 0).transpose(0, 3, 1, 2))


def make_mask(width: int, height: int) -> PIL.Image.Image:
    mask = PIL.Image.new("L", (width, height), 0)
    draw = PIL.ImageDraw.Draw(mask)
    draw.rectangle((width // 4, height // 5, 3 * width // 4, 3 * height // 5), fill=255)
    draw.ellipse((2, height - 20, 18, height - 4), fill=200)  # grey above 0.5: binarised to 1
    return mask


@pytest.fixture(scope="module")
def pictures(photo):
    """Init image, canny map and mask at 64x64 and at 64x96 (height x width)."""
    from engine.preprocess import canny

    out = {}
    for size in ((64, 64), (96, 64)):
        init = photo.resize(size, PIL.Image.LANCZOS)
        out[size] = dict(init=init, edges=canny(init), mask=make_mask(*size))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from engine.tiny import save_tiny

    root = tmp_path_factory.mktemp("img2img")
    four = save_tiny(root / "four", controlnets=("canny", "depth", "inpaint"))
    nine = save_tiny(root / "nine", controlnets=("canny",), preset="tiny-inpaint")
    return dict(four=four, nine=nine)


@pytest.fixture(scope="module")
def pipes(models):
    four, nine = models["four"], models["nine"]
    net = {name: ControlNetModel.from_pretrained(four[name]) for name in ("canny", "depth", "inpaint")}
    nine_canny = ControlNetModel.from_pretrained(nine["canny"])
    made = dict(
        img2img=StableDiffusionControlNetImg2ImgPipeline.from_pretrained(four["model"], controlnet=net["canny"], **PIPE_KWARGS),
        img2img_two=StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
            four["model"], controlnet=[net["canny"], net["depth"]], **PIPE_KWARGS),
        inpaint=StableDiffusionControlNetInpaintPipeline.from_pretrained(four["model"], controlnet=net["inpaint"], **PIPE_KWARGS),
        inpaint_two=StableDiffusionControlNetInpaintPipeline.from_pretrained(
            four["model"], controlnet=[net["inpaint"], net["canny"]], **PIPE_KWARGS),
        nine=StableDiffusionControlNetInpaintPipeline.from_pretrained(nine["model"], controlnet=nine_canny, **PIPE_KWARGS),
    )
    for pipe in made.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.model_scheduler_config = dict(pipe.scheduler.config)
    return made


@pytest.fixture(scope="module")
def runners(models):
    from engine import Runner

    four, nine = models["four"], models["nine"]
    make = lambda model, nets: Runner(model=str(model), controlnet=[str(n) for n in nets], backend="torch", device="cpu")
    return dict(
        img2img=make(four["model"], [four["canny"]]),
        img2img_two=make(four["model"], [four["canny"], four["depth"]]),
        inpaint=make(four["model"], [four["inpaint"]]),
        inpaint_two=make(four["model"], [four["inpaint"], four["canny"]]),
        nine=make(nine["model"], [nine["canny"]]),
    )


def run_both(pipes, runners, which: str, pics: dict, scheduler: str = "unipc", seed: int = 0, **kwargs):
    """One generation each; `which` picks the pipeline/runner pair, `pics` the init image, map and mask."""
    pipe, runner = pipes[which], runners[which]
    pipe.scheduler = DIFFUSERS_SCHEDULERS[scheduler](pipe.model_scheduler_config)
    init, edges, mask = pics["init"], pics["edges"], pics["mask"]
    theirs = dict(image=init, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    ours = dict(init_image=init, scheduler=scheduler, seed=seed, output_type="np")
    if which.startswith("img2img"):
        controls = [edges, init]
        theirs["control_image"] = controls if which == "img2img_two" else controls[0]
        ours.update(image=controls[: len(runner.controlnet_specs)], preprocess=False)
    elif which == "nine":
        theirs.update(mask_image=mask, control_image=edges)
        ours.update(mask_image=mask, image=[edges], preprocess=False)
    else:  # the inpaint ControlNet (+ canny): its map from init image and mask, by our preprocessor
        condition = make_inpaint_condition(init, mask)
        theirs.update(mask_image=mask, control_image=[condition, edges] if which == "inpaint_two" else condition)
        ours.update(mask_image=mask, image=[None, edges] if which == "inpaint_two" else None,
                    preprocess=["inpaint", False] if which == "inpaint_two" else "inpaint")
    expected = pipe(**theirs, **kwargs).images
    got = runner.generate(**ours, **kwargs).images
    return got, expected


def assert_parity(got, expected, label: str):
    abs_err, rel_err = max_errors(got, expected)
    print(f"parity {label}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{label}: max abs error {abs_err:.3g} > {TOL}"


# Every scheduler in every mode (euler_a and ddim draw from the generator after the start latents, so
# the order of the VAE sample and noise draws shows in them).
@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
@pytest.mark.parametrize("which", ["img2img", "inpaint", "nine"])
def test_every_scheduler(pipes, runners, pictures, which, scheduler):
    strength = {"img2img": 0.75, "inpaint": 1.0, "nine": 0.75}[which]
    got, expected = run_both(pipes, runners, which, pictures[(64, 64)], scheduler, strength=strength, **BASE)
    assert_parity(got, expected, f"{which} {scheduler}")


CASES = {
    "img2img strength 0.3": ("img2img", dict(strength=0.3)),
    "img2img strength 1.0": ("img2img", dict(strength=1.0, scheduler="euler_a")),
    "img2img default strength": ("img2img", dict(scheduler="ddim", eta=0.5)),
    "img2img two nets 0.6/1.3": ("img2img_two", dict(strength=0.75, controlnet_conditioning_scale=[0.6, 1.3])),
    "img2img guess mode": ("img2img_two", dict(strength=0.75, guess_mode=True, controlnet_conditioning_scale=[0.8, 0.5])),
    "img2img guidance window": ("img2img", dict(strength=0.75, control_guidance_start=0.2, control_guidance_end=0.7)),
    "img2img 2 per prompt": ("img2img", dict(strength=0.75, num_images_per_prompt=2, scheduler="euler_a")),
    "img2img 64x96": ("img2img", dict(strength=0.75, size=(96, 64))),
    "img2img no cfg": ("img2img", dict(strength=0.75, guidance_scale=1.0)),
    "img2img negative prompt": ("img2img", dict(strength=0.75, negative_prompt="blurry")),
    "inpaint strength 0.3": ("inpaint", dict(strength=0.3)),
    "inpaint strength 0.75": ("inpaint", dict(strength=0.75, scheduler="euler_a")),
    "inpaint two nets + window": ("inpaint_two", dict(strength=0.75, controlnet_conditioning_scale=[1.2, 0.4],
                                                      control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0])),
    "inpaint guess mode": ("inpaint", dict(guess_mode=True)),
    "inpaint 2 per prompt 64x96": ("inpaint", dict(num_images_per_prompt=2, size=(96, 64), scheduler="euler_a")),
    "inpaint no cfg": ("inpaint", dict(strength=0.75, guidance_scale=1.0)),
    "nine strength 1.0": ("nine", dict(strength=1.0, scheduler="euler_a")),
    "nine strength 0.3 2 per prompt": ("nine", dict(strength=0.3, num_images_per_prompt=2)),
    "nine 64x96 no cfg": ("nine", dict(size=(96, 64), guidance_scale=1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cases(pipes, runners, pictures, case):
    which, kwargs = CASES[case]
    kwargs = {**BASE, **kwargs}
    size = kwargs.pop("size", (64, 64))
    got, expected = run_both(pipes, runners, which, pictures[size], **kwargs)
    assert np.asarray(got).shape[1:3] == (size[1], size[0])
    assert_parity(got, expected, case)


def test_pil_output_matches(pipes, runners, pictures):
    pics = pictures[(64, 64)]
    pipe = pipes["img2img"]
    pipe.scheduler = DIFFUSERS_SCHEDULERS["unipc"](pipe.model_scheduler_config)
    expected = pipe(image=pics["init"], control_image=pics["edges"], generator=torch.Generator("cpu").manual_seed(4),
                    strength=0.6, **BASE).images[0]
    got = runners["img2img"].generate(image=pics["edges"], init_image=pics["init"], preprocess=False, seed=4,
                                      strength=0.6, **BASE).images[0]
    assert list(got.getdata()) == list(expected.getdata())


# ---- only the kept steps run --------------------------------------------------------------------------


def count_calls(monkeypatch, backend) -> dict[str, int]:
    counts = dict(unet=0, controlnet=0, encode_hint=0, encode_image=0)
    for name in counts:
        real = getattr(backend, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(backend, name, counted)
    return counts


@pytest.mark.parametrize("which", ["img2img", "inpaint", "nine"])
def test_only_kept_steps_run(monkeypatch, runners, pictures, which):
    runner = runners[which]
    pics = pictures[(64, 64)]
    counts = count_calls(monkeypatch, runner.backend)
    steps = []
    kwargs = dict(init_image=pics["init"], strength=0.5, num_inference_steps=10, seed=0, output_type="latent",
                  callback=lambda step, total: steps.append((step, total)))
    if which == "img2img":
        kwargs.update(image=pics["edges"], preprocess=False)
    elif which == "nine":
        kwargs.update(image=pics["edges"], preprocess=False, mask_image=pics["mask"])
    else:
        kwargs.update(mask_image=pics["mask"], preprocess="inpaint")
    runner.generate("a photo", **kwargs)
    assert counts["unet"] == counts["controlnet"] == 5
    assert counts["encode_hint"] == 1
    # img2img: the init image; 4-channel inpaint: the init image (the masked image's draw is made, its
    # encode skipped); 9-channel: the init image (strength < 1) and the masked image.
    assert counts["encode_image"] == {"img2img": 1, "inpaint": 1, "nine": 2}[which]
    assert steps == [(i, 5) for i in range(1, 6)]


def test_inactive_controlnet_never_runs_in_img2img(monkeypatch, runners, pictures):
    runner = runners["img2img_two"]
    pics = pictures[(64, 64)]
    counts = count_calls(monkeypatch, runner.backend)
    runner.generate("a photo", image=[pics["edges"], pics["init"]], init_image=pics["init"], strength=0.5,
                    num_inference_steps=10, controlnet_conditioning_scale=[0.0, 1.0], preprocess=False,
                    seed=0, output_type="latent")
    assert counts["controlnet"] == 5 and counts["encode_hint"] == 1


# ---- the inpaint ControlNet from the registry, and the parameters recorded -------------------------------


def test_registry_inpaint_controlnet_builds_its_map(pictures):
    from engine import Runner

    pics = pictures[(64, 64)]
    runner = Runner(model="tiny", controlnet="inpaint", backend="torch", device="cpu")
    result = runner.generate("a photo", init_image=pics["init"], mask_image=pics["mask"], num_inference_steps=2,
                             seed=0, output_type="np")
    control = result.control_maps[0]
    masked = np.asarray(pics["mask"]) > 127
    assert control.shape == (64, 64, 3) and np.all(control[masked] == -1.0)
    assert np.allclose(control[~masked], np.asarray(pics["init"], dtype=np.float32)[~masked] / 255.0)
    assert result.parameters["strength"] == 1.0 and result.parameters["mask"] is True
    assert result.images.shape == (1, 64, 64, 3)


# ---- every check before model work ---------------------------------------------------------------------


@pytest.fixture
def no_model_work(monkeypatch, runners):
    """Fail loudly if a call reaches any backend method."""
    for runner in runners.values():
        for name in ("encode_text", "encode_hint", "encode_image", "controlnet", "unet", "decode"):
            monkeypatch.setattr(runner.backend, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran"))
    return runners


BAD = {
    "strength 0": (dict(strength=0.0), "0 < strength <= 1"),
    "strength 1.5": (dict(strength=1.5), "0 < strength <= 1"),
    "strength nan": (dict(strength=float("nan")), "0 < strength <= 1"),
    "strength bool": (dict(strength=True), "0 < strength <= 1"),
    "strength keeps no step": (dict(strength=0.05, num_inference_steps=10), "keeps no step"),
    "latents with init": (dict(latents=torch.zeros(1, 4, 8, 8)), "latents"),
    "missing init file": (dict(init_image="/nonexistent/init.png"), "init image file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_img2img_calls(no_model_work, pictures, case):
    pics = pictures[(64, 64)]
    kwargs, message = BAD[case]
    call = {**dict(image=pics["edges"], init_image=pics["init"], preprocess=False), **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        no_model_work["img2img"].generate("a photo", **call)


def test_bad_inpaint_calls(no_model_work, pictures, tmp_path):
    pics = pictures[(64, 64)]
    runner = no_model_work["img2img"]
    with pytest.raises(ValueError, match="mask_image needs an init_image"):
        runner.generate("a photo", image=pics["edges"], mask_image=pics["mask"], preprocess=False)
    with pytest.raises(ValueError, match="mask_image is 64x96 but init_image is 64x64"):
        runner.generate("a photo", image=pics["edges"], init_image=pics["init"], mask_image=make_mask(64, 96),
                        preprocess=False)
    with pytest.raises(ValueError, match="strength=0.5 needs an init_image"):
        runner.generate("a photo", image=pics["edges"], strength=0.5, preprocess=False)
    not_an_image = tmp_path / "mask.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(ValueError, match="mask image file .* is not a readable image"):
        runner.generate("a photo", image=pics["edges"], init_image=pics["init"], mask_image=not_an_image, preprocess=False)
    with pytest.raises(ValueError, match="inpaint preprocessor.*init_image and mask_image"):
        no_model_work["inpaint"].generate("a photo", init_image=pics["init"], preprocess="inpaint")
    with pytest.raises(ValueError, match="no control image for ControlNet"):
        no_model_work["img2img"].generate("a photo", init_image=pics["init"])
    with pytest.raises(ValueError, match="9-channel inpainting UNet: it needs init_image and mask_image"):
        no_model_work["nine"].generate("a photo", image=pics["edges"], init_image=pics["init"], preprocess=False)
    with pytest.raises(ValueError, match="9-channel inpainting UNet"):
        no_model_work["nine"].generate("a photo", image=pics["edges"], preprocess=False)


@pytest.mark.parametrize("which", ["img2img", "inpaint"])
def test_default_conditioning_scale_is_the_pipelines(pipes, runners, pictures, which):
    """Unset, controlnet_conditioning_scale is each diffusers pipeline's default (img2img 0.8, inpaint 0.5)."""
    kwargs = {k: v for k, v in BASE.items() if k != "controlnet_conditioning_scale"}
    got, expected = run_both(pipes, runners, which, pictures[(64, 64)], strength=0.75, **kwargs)
    assert_parity(got, expected, f"{which} default scale")

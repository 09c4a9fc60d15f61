"""Runner behaviour beyond parity: skipped work, control sensitivity, input handling, clear errors."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from engine import Runner
from tests.conftest import max_errors

FAST = dict(num_inference_steps=4, height=64, width=64, seed=1)


@pytest.fixture(scope="module")
def runner():
    return Runner(model="tiny", controlnet="canny", device="cpu")


@pytest.fixture(scope="module")
def runner2():
    return Runner(model="tiny", controlnet=["canny", "tile"], device="cpu")


def count_calls(runner) -> dict[str, list[int]]:
    """Forward hooks on each net's hint encoder and body; returns live per-net call counts."""
    counts = {"hint": [0] * runner.num_controlnets, "body": [0] * runner.num_controlnets}

    def counter(kind, k):
        def hook(module, args, output):
            counts[kind][k] += 1

        return hook

    handles = []
    for k in range(runner.num_controlnets):
        handles.append(runner.backend.hint_encoders[k].register_forward_hook(counter("hint", k)))
        handles.append(runner.backend.controlnet_bodies[k].register_forward_hook(counter("body", k)))
    counts["handles"] = handles
    return counts


def test_skipped_work_is_not_run(runner2, photo):
    # 10 steps; net 0 active for steps with i/10 >= 0.2 and (i+1)/10 <= 0.7: i = 2..6 (5 steps);
    # net 1 at scale 0 never runs, so its hint is never encoded either.
    counts = count_calls(runner2)
    try:
        runner2.generate(
            "a photo", [photo, photo], num_inference_steps=10, height=64, width=64, seed=0,
            controlnet_conditioning_scale=[1.0, 0.0], control_guidance_start=[0.2, 0.0],
            control_guidance_end=[0.7, 1.0],
        )
    finally:
        for h in counts.pop("handles"):
            h.remove()
    assert counts == {"hint": [1, 0], "body": [5, 0]}


def test_hint_encoded_once_per_generation(runner, photo):
    counts = count_calls(runner)
    try:
        runner.generate("a photo", photo, **{**FAST, "num_inference_steps": 6})
    finally:
        for h in counts.pop("handles"):
            h.remove()
    assert counts == {"hint": [1], "body": [6]}


def test_control_image_changes_the_output(runner, photo):
    """The tiny ControlNet must really react to its image, far beyond the 1e-5 parity tolerance."""
    a = runner.generate("a photo", photo, output_type="np", **FAST).images
    flipped = photo.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    b = runner.generate("a photo", flipped, output_type="np", **FAST).images
    no_control = runner.generate("a photo", photo, output_type="np", controlnet_conditioning_scale=0.0, **FAST).images
    diff_image = max_errors(a, b)[0]
    diff_strength = max_errors(a, no_control)[0]
    print(f"control sensitivity: other image {diff_image:.3g}, scale 0 {diff_strength:.3g}")
    assert diff_image > 1e-2 and diff_strength > 1e-2


def test_same_seed_same_image_and_seed_recorded(runner, photo):
    first = runner.generate("a photo", photo, output_type="np", **FAST)
    second = runner.generate("a photo", photo, output_type="np", **FAST)
    assert np.array_equal(first.images, second.images)
    assert first.seed == 1
    unseeded = runner.generate("a photo", photo, output_type="np", **{**FAST, "seed": None})
    again = runner.generate("a photo", photo, output_type="np", **{**FAST, "seed": unseeded.seed})
    assert np.array_equal(unseeded.images, again.images)


def test_result_shapes_and_timings(runner, photo):
    result = runner.generate("a photo", photo, num_images_per_prompt=2, **FAST)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert set(result.timings) == {"preprocess", "text_encoder", "hint_encoder", "vae_encoder", "controlnet", "unet", "scheduler", "vae", "total"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= result.timings["unet"] > 0
    latents = runner.generate("a photo", photo, output_type="latent", **FAST).images
    assert tuple(latents.shape) == (1, 4, 8, 8)


def test_callback_reports_every_step(runner, photo):
    seen = []
    runner.generate("a photo", photo, callback=lambda i, n: seen.append((i, n)), **FAST)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_default_size_comes_from_control_image(runner, photo):
    image = photo.resize((100, 70))  # rounded down to multiples of 8, as diffusers does
    result = runner.generate("a photo", image, num_inference_steps=2, seed=0)
    assert result.images[0].size == (96, 64)


def test_user_latents_are_used(runner, photo):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a = runner.generate("a photo", photo, latents=latents, output_type="np", **{**FAST, "seed": None}).images
    b = runner.generate("a photo", photo, latents=latents.clone(), output_type="np", **{**FAST, "seed": 99}).images
    assert np.array_equal(a, b)  # seed does not matter when latents are given (UniPC draws no noise)


@pytest.mark.parametrize(
    "kind",
    ["pil", "pil_gray", "pil_rgba", "np_uint8", "np_float", "np_gray2d", "path"],
)
def test_image_inputs_are_accepted(runner, photo, tmp_path, kind):
    arr = np.asarray(photo)
    image = {
        "pil": photo,
        "pil_gray": photo.convert("L"),
        "pil_rgba": photo.convert("RGBA"),
        "np_uint8": arr,
        "np_float": arr.astype(np.float32) / 255.0,
        "np_gray2d": np.asarray(photo.convert("L")),
    }.get(kind)
    if kind == "path":
        image = tmp_path / "photo.png"
        photo.save(image)
    result = runner.generate("a photo", image, num_inference_steps=1, height=64, width=64, seed=0)
    assert result.images[0].size == (64, 64)


def test_rgba_equals_rgb(runner, photo):
    a = runner.generate("a photo", photo, output_type="np", **FAST).images
    b = runner.generate("a photo", photo.convert("RGBA"), output_type="np", **FAST).images
    assert np.array_equal(a, b)


def test_ready_control_map_skips_preprocessing(runner, edges, photo):
    via_canny = runner.generate("a photo", photo, output_type="np", **FAST)
    given_map = runner.generate("a photo", edges, preprocess=False, output_type="np", **FAST)
    assert np.array_equal(via_canny.images, given_map.images)
    assert np.array_equal(np.asarray(via_canny.control_maps[0]), np.asarray(edges))


BAD_CALLS = [
    (dict(height=60), "height must be a positive multiple of 8, got 60"),
    (dict(width=100), "width must be a positive multiple of 8, got 100"),
    (dict(prompt=""), "prompt must be a non-empty string"),
    (dict(prompt=3), "prompt must be a non-empty string"),
    (dict(prompt=["ok", None]), "prompt must be a non-empty string"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries but prompt has 1"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0.0, got -1.0"),
    (dict(controlnet_conditioning_scale=[1.0, 0.5]), "controlnet_conditioning_scale has 2 entries but there are 1"),
    (dict(controlnet_conditioning_scale=float("nan")), "controlnet_conditioning_scale must be a finite number"),
    (dict(control_guidance_start=0.8, control_guidance_end=0.3), "0 <= start < end <= 1, got start=0.8, end=0.3"),
    (dict(control_guidance_start=0.5, control_guidance_end=0.5), "got start=0.5, end=0.5"),
    (dict(control_guidance_end=1.5), "got start=0.0, end=1.5"),
    (dict(scheduler="plms"), "unknown scheduler 'plms'; choose one of ddim, euler, euler_a"),
    (dict(output_type="pt"), "output_type must be one of pil, np, latent, got 'pt'"),
    (dict(seed=-3), "seed must be an integer >= 0, got -3"),
    (dict(seed=1, generator=torch.Generator()), "give either seed or generator, not both"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1, got 0"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents must be a tensor of shape (1, 4, 8, 8)"),
    (dict(image=["a", "b"]), "got 2 control images for 1 ControlNets"),
    (dict(image="/no/such/file.png"), "'/no/such/file.png' does not exist"),
    (dict(image=np.zeros((8, 8, 2), np.uint8)), "image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape (8, 8, 2)"),
    (dict(image=np.full((8, 8, 3), 2.0)), "float image arrays must hold finite values in [0, 1]"),
    (dict(image=12), "image must be a PIL image, a numpy array"),
    (dict(preprocess="sobel"), "unknown preprocessor 'sobel'"),
]


@pytest.mark.parametrize("bad,message", BAD_CALLS, ids=[m[:40] for _, m in BAD_CALLS])
def test_bad_input_gives_clear_error_and_leaves_no_state(runner, photo, bad, message):
    kwargs = {"prompt": "a photo", "image": photo, **FAST, **bad}
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as err:
        runner.generate(**kwargs)
    assert message in str(err.value)


def test_unreadable_image_file(runner, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not_an_image.png' is not a readable image"):
        runner.generate("a photo", bad, **FAST)


def test_good_call_after_bad_calls_is_unchanged(photo):
    fresh = Runner(model="tiny", controlnet="canny", device="cpu")
    expected = fresh.generate("a photo", photo, output_type="np", scheduler="dpmpp_2m", **FAST).images
    for bad, _ in BAD_CALLS:
        with pytest.raises(Exception):
            fresh.generate(**{"prompt": "a photo", "image": photo, "scheduler": "dpmpp_2m", **FAST, **bad})
    again = fresh.generate("a photo", photo, output_type="np", scheduler="dpmpp_2m", **FAST).images
    assert np.array_equal(expected, again)

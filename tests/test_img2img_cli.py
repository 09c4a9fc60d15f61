"""`python -m engine.generate --init-image F [--mask F] [--strength S]`: the PNG records the strength and
the files, `--from-png` gives the same pixels, and bad combinations exit 2 before any model loads."""
from __future__ import annotations

import PIL.Image
import pytest

from engine import pngmeta
from tests.test_cli_generate import FAST, PHOTO, cli, pixels
from tests.test_img2img import make_mask


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    with PIL.Image.open(PHOTO) as im:
        im.convert("RGB").resize((64, 64), PIL.Image.LANCZOS).save(root / "init.png")
    make_mask(64, 64).save(root / "mask.png")
    return root


def test_parameters_round_trip_with_strength_and_mask():
    p = dict(prompt="a cat", negative_prompt="", num_inference_steps=4, scheduler="unipc", guidance_scale=7.5,
             seed=3, width=64, height=64, model="tiny", eta=0.0, num_images_per_prompt=1, controlnet=["inpaint"],
             controlnet_conditioning_scale=[1.0], control_guidance_start=[0.0], control_guidance_end=[1.0],
             image=[None], preprocess=["inpaint"], guess_mode=False, dtype="fp32", strength=0.65,
             init_image="/pics/in, it.png", mask_image="/pics/mask.png")
    text = pngmeta.format_parameters(p)
    assert "Denoising strength: 0.65" in text and 'Init image: "/pics/in, it.png"' in text
    assert pngmeta.parse_parameters(text) == p


def test_png_records_and_from_png_reproduces(files):
    """Inpainting with the inpaint ControlNet (no --image: its map comes from init image and mask) at
    strength 0.5: one run covers every new flag (two subprocesses are slow on the shared cores)."""
    out = files / "inpaint.png"
    done = cli(*FAST, "--steps", "4", "--prompt", "a cat", "--controlnet", "inpaint", "--init-image",
               str(files / "init.png"), "--mask", str(files / "mask.png"), "--strength", "0.5", "--seed", "5",
               "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    p = pngmeta.read_parameters(out)
    assert p["strength"] == 0.5 and p["init_image"] == str(files / "init.png")
    assert p["mask_image"] == str(files / "mask.png") and p["image"] == [None]
    again = files / "inpaint_again.png"
    done = cli("--from-png", str(out), "--out", str(again), "--quiet")
    assert done.returncode == 0, done.stderr
    assert (pixels(again) == pixels(out)).all()


@pytest.mark.parametrize("flags, message", [
    (["--mask", "m.png"], "--mask needs --init-image"),
    (["--strength", "0.5"], "--strength 0.5 needs --init-image"),
    (["--init-image", "i.png", "--strength", "0"], "0 < strength <= 1"),
    (["--init-image", "i.png", "--strength", "nan"], "0 < strength <= 1"),
])
def test_bad_flags_exit_2(flags, message):
    done = cli("--model", "tiny", "--prompt", "a cat", "--image", PHOTO, *flags)
    assert done.returncode == 2 and message in done.stderr, done.stderr

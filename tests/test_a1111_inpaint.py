"""Inpainting on the A1111 routes as A1111 does it (engine/a1111_inpaint.py): the mask read by its alpha, the
original pasted back through the blurred mask, masked content "fill" and "Only masked", the infotext's
Denoising strength and Mask blur, and the CLI's --from-png reproducing a served image from that infotext.

The replica runs in this process (its FastAPI app under starlette's TestClient, no Ray): tiny model, 64x64,
2 steps.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest

from engine import generate, pngmeta
from engine.a1111_inpaint import A1111Inpaint, binary_mask, blur_mask
from engine.serve import api
from engine.serve.a1111.img2img import decode_init
from engine.serve.a1111.models import Img2ImgRequest
from tests.test_build import one_torch_thread  # noqa: F401 (an autouse fixture: steady results on shared cores)

SIZE = dict(width=64, height=64, steps=2, cfg_scale=7.0)


def b64(image: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decoded(text: str) -> PIL.Image.Image:
    with PIL.Image.open(io.BytesIO(base64.b64decode(text))) as im:
        im.load()
        return im


@pytest.fixture(scope="module")
def init(photo) -> PIL.Image.Image:
    return photo.resize((64, 64), PIL.Image.LANCZOS)


@pytest.fixture(scope="module")
def mask() -> PIL.Image.Image:
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 16, 44, 40))
    return mask


@pytest.fixture(scope="module")
def client():
    """The replica's FastAPI app (both APIs), in this process."""
    from starlette.testclient import TestClient

    from engine.serve.app import ControlNetServer

    wrapper = ControlNetServer.func_or_class  # Serve's ingress wrapper around our class
    ours = next(c for c in wrapper.__mro__ if c.__name__ == "ControlNetServer" and c is not wrapper)
    return TestClient(ours(model="tiny", demo=False).__serve_build_asgi_app__())


def img2img(client, init, mask, **fields) -> dict:
    body = dict(prompt="a helmet", seed=4, denoising_strength=0.6, init_images=[b64(init)], mask=b64(mask),
                inpainting_fill=1, inpaint_full_res=False, **SIZE)
    body.update(fields)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_rgba_mask_is_read_by_its_alpha(init, mask):
    """A canvas mask (white everywhere, the strokes in its alpha) repaints its strokes only, as A1111's
    create_binary_mask reads it; an opaque RGBA mask is read by its grey."""
    canvas = PIL.Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    canvas.putalpha(mask)
    opaque = mask.convert("RGBA")
    for sent in (canvas, opaque):
        req = Img2ImgRequest(init_images=[b64(init)], mask=b64(sent), mask_blur=0, inpainting_fill=1,
                             inpaint_full_res=False, width=64, height=64)
        got = decode_init(req, api.Limits()).runner_kwargs["mask_image"]
        assert np.array_equal(np.asarray(got.convert("L")), np.asarray(mask)), sent.mode


def test_unmasked_pixels_are_the_input_and_the_infotext_records_strength_and_blur(client, init, mask):
    """After decoding, the original is pasted over everything the blurred mask leaves at 0 (A1111's
    apply_overlay), and the infotext (PNG text and info) records Denoising strength and Mask blur."""
    import json

    body = img2img(client, init, mask, mask_blur=4)
    image = decoded(body["images"][0])
    untouched = np.asarray(blur_mask(binary_mask(mask), 4, 4)) == 0
    assert np.array_equal(np.asarray(image)[untouched], np.asarray(init)[untouched])
    assert not np.array_equal(np.asarray(image)[~untouched], np.asarray(init)[~untouched])
    text = json.loads(body["info"])["infotexts"][0]
    assert "Denoising strength: 0.6" in text and "Mask blur: 4" in text, text
    assert image.info["parameters"] == text


def test_fill_and_only_masked_as_a1111(client, photo, mask):
    """webuiapi's inpainting defaults (inpainting_fill 0 "fill", inpaint_full_res true): the box around the
    mask is generated and pasted back into the original picture, which keeps its own size (96x64 here);
    "latent noise" (2) is refused by name."""
    wide = photo.resize((96, 64), PIL.Image.LANCZOS)
    wide_mask = PIL.Image.new("L", (96, 64), 0)
    wide_mask.paste(mask.crop((16, 8, 48, 56)), (40, 8))
    body = img2img(client, wide, wide_mask, inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=8)
    image = decoded(body["images"][0])
    assert image.size == (96, 64)
    untouched = np.asarray(blur_mask(wide_mask, 4, 4)) == 0  # Only masked: the overlay mask is the blurred mask
    assert np.array_equal(np.asarray(image)[untouched], np.asarray(wide)[untouched])
    job = A1111Inpaint(masked_content="fill", only_masked=True, padding=8).prepare(wide, wide_mask, 64, 64)
    assert job.box == (26, 0, 86, 60) and job.init.size == (64, 64)  # blurred box + 8, widened to 1:1
    text = image.info["parameters"]
    for entry in ("Mask blur: 4", "Inpaint area: Only masked", "Masked area padding: 8", "Masked content: fill"):
        assert entry in text, text
    r = client.post("/sdapi/v1/img2img", json=dict(prompt="a helmet", init_images=[b64(wide)], mask=b64(wide_mask),
                                                   inpainting_fill=2, **SIZE))
    assert r.status_code == 422 and r.json()["field"] == "inpainting_fill" and "latent noise" in r.json()["detail"]


def test_from_png_reproduces_the_served_image(client, init, mask, photo, tmp_path):
    """The served PNG's infotext (strength, mask blur, sampler, seed, size) given to `--from-png`, with the
    pictures A1111 does not record, gives the same pixels; the CLI's own PNG of it round-trips too."""
    body = img2img(client, init, mask.convert("RGBA"), mask_blur=3, inpainting_fill=0)
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(body["images"][0]))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    photo.save(tmp_path / "photo.png")
    again = tmp_path / "again.png"
    pictures = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                "--controlnet", "canny", "--image", str(tmp_path / "photo.png"), "--scale", "0"]  # the route ran no unit
    assert generate.main(["--from-png", str(served), *pictures, "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(again)), np.asarray(PIL.Image.open(served)))
    recorded = pngmeta.read_parameters(again)
    assert recorded["mask_blur"] == 3 and recorded["masked_content"] == "fill" and recorded["strength"] == 0.6
    twice = tmp_path / "twice.png"
    assert generate.main(["--from-png", str(again), "--out", str(twice), "--quiet"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(twice)), np.asarray(PIL.Image.open(served)))


def test_inpaint_entries_round_trip():
    p = dict(prompt="a cat", negative_prompt="", num_inference_steps=4, scheduler="euler", guidance_scale=7.0,
             seed=3, width=64, height=64, model="tiny", eta=0.0, num_images_per_prompt=1, controlnet=[],
             controlnet_conditioning_scale=[], control_guidance_start=[], control_guidance_end=[], image=[],
             preprocess=[], guess_mode=False, strength=0.75, mask_invert=True, mask_blur=4,
             inpaint_only_masked=True, inpaint_padding=32, masked_content="fill")
    text = pngmeta.format_parameters(p)
    assert ("Denoising strength: 0.75, Mask mode: Inpaint not masked, Mask blur: 4, Inpaint area: Only masked, "
            "Masked area padding: 32, Masked content: fill") in text
    assert pngmeta.parse_parameters(text) == {**p, "init_image": None}


def test_from_png_of_a_plain_img2img(client, init, photo, tmp_path):
    """A served img2img without a mask (its infotext has Denoising strength, no Mask blur): --from-png with the
    init image reproduces it; the PNG's A1111 mask blur applies only when a --mask is given."""
    body = dict(prompt="a helmet", seed=4, denoising_strength=0.6, init_images=[b64(init)], **SIZE)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(r.json()["images"][0]))
    init.save(tmp_path / "init.png")
    photo.save(tmp_path / "photo.png")
    again = tmp_path / "again.png"
    pictures = ["--init-image", str(tmp_path / "init.png"),
                "--controlnet", "canny", "--image", str(tmp_path / "photo.png"), "--scale", "0"]  # the route ran no unit
    assert generate.main(["--from-png", str(served), *pictures, "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(again)), np.asarray(PIL.Image.open(served)))

"""img2img and inpainting over HTTP: the fields init_image, mask_image and strength are parsed and checked
before any model work, and a served image equals Runner.generate with the same arguments pixel for pixel;
the Gradio demo's brush editor gives the init image and the mask."""
from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest

from engine.serve import api
from tests.test_img2img import make_mask

pytest.importorskip("httpx")
from tests.test_serve import FAST, client, decode, photo_b64, photo_png, reference, server_url  # noqa: E402,F401

LIMITS = api.Limits()


def b64(image: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def init(photo) -> PIL.Image.Image:
    return photo.resize((64, 64), PIL.Image.LANCZOS)


def parse(**fields) -> api.GenerateRequest:
    import json

    return api.parse_json(json.dumps(fields).encode(), LIMITS, num_controlnets=1)


def test_fields_parse_and_reach_the_runner(init, photo_b64):
    req = parse(prompt="a cat", image=photo_b64, init_image=b64(init), mask_image=b64(make_mask(64, 64)), strength=0.4)
    assert req.init_image.size == (64, 64) and req.mask_image.size == (64, 64) and req.strength == 0.4
    kwargs = api.runner_kwargs(req, ["canny"])
    assert kwargs["strength"] == 0.4 and kwargs["init_image"] is req.init_image and kwargs["mask_image"] is req.mask_image
    plain = parse(prompt="a cat", image=photo_b64)
    assert plain.init_image is None and api.batch_key(plain) != api.batch_key(req)
    no_control = parse(prompt="a cat", init_image=b64(init), mask_image=b64(make_mask(64, 64)))
    assert no_control.images == []  # an inpaint ControlNet builds its map from init image and mask


@pytest.mark.parametrize("fields, field, message", [
    (dict(strength=0.0), "strength", "0 < strength <= 1"),
    (dict(strength=1.5), "strength", "0 < strength <= 1"),
    (dict(strength=0.5, init_image=None), "strength", "strength needs an init_image"),
    (dict(init_image=None, mask="m"), "mask_image", "mask_image needs an init_image"),
    (dict(mask="wide"), "mask_image", "mask_image is 96x64 but init_image is 64x64"),
    (dict(mask="junk"), "mask_image", "mask_image is not a readable image"),
])
def test_bad_fields_refused(init, photo_b64, fields, field, message):
    body = dict(prompt="a cat", image=photo_b64, init_image=b64(init))
    mask = fields.pop("mask", None)
    if mask is not None:
        body["mask_image"] = {"m": b64(make_mask(64, 64)), "wide": b64(make_mask(96, 64)),
                              "junk": base64.b64encode(b"not an image").decode()}[mask]
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(api.ApiError) as err:
        parse(**body)
    assert err.value.field == field and message in err.value.message


def test_demo_editor_gives_init_and_mask(init):
    from engine.serve.demo import init_and_mask

    assert init_and_mask(None) == (None, None)
    empty = PIL.Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    got_init, got_mask = init_and_mask(dict(background=init, layers=[empty], composite=init))
    assert got_init.size == (64, 64) and got_mask is None  # nothing drawn: img2img
    stroke = empty.copy()
    stroke.paste((255, 255, 255, 255), (10, 10, 30, 20))
    got_init, got_mask = init_and_mask(dict(background=init.convert("RGBA"), layers=[stroke], composite=init))
    mask = np.asarray(got_mask)
    assert got_init.mode == "RGB" and got_mask.mode == "L"
    assert mask[10:20, 10:30].min() == 255 and mask.sum() == 255 * 20 * 10


# ---- through the served app (the session's Ray server of test_serve.py) ----------------------------------


def test_img2img_json_equals_runner(client, photo, photo_b64, init, reference):
    r = client.post("/generate", json=dict(prompt="a cat", image=photo_b64, init_image=b64(init), strength=0.6,
                                           seed=4, **FAST))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["strength"] == 0.6 and body["parameters"]["mask"] is False
    expected = reference(photo, "a cat", 4, init_image=init, strength=0.6)
    np.testing.assert_array_equal(decode(body["images"][0]), expected)


def test_inpaint_multipart_equals_runner(client, photo, photo_png, init, reference):
    mask = make_mask(64, 64)
    files = [("image", ("photo.png", photo_png, "image/png")),
             ("init_image", ("init.png", base64.b64decode(b64(init)), "image/png")),
             ("mask_image", ("mask.png", base64.b64decode(b64(mask)), "image/png"))]
    form = {k: str(v) for k, v in dict(prompt="a dog", seed=2, strength=0.8, **FAST).items()}
    r = client.post("/generate", data=form, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["mask"] is True
    expected = reference(photo, "a dog", 2, init_image=init, mask_image=mask.convert("RGB"), strength=0.8)
    np.testing.assert_array_equal(decode(body["images"][0]), expected)

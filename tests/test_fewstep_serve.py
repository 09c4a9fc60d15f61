"""Few-step generation over HTTP: the A1111 routes' "LCM" sampler and `override_settings.sd_vae`, GET
/sdapi/v1/sd-vae, the progress route's TAESD preview, and POST /generate's `vae` and `eta` fields.

No Ray here: the server class is made in this process and its FastAPI app driven with starlette's
TestClient (the A1111 routes run on the replica's worker thread as under Serve; POST /generate's batch
queue needs a Serve replica, so its request goes through the parser and the replica's `_generate`, the
code the batch handler calls). The tiny model with canny and the tiny TAESD, 64² images, 2-6 steps.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest

CANNY = "control_v11p_sd15_canny"


@pytest.fixture(scope="module")
def server():
    from engine.serve.app import ControlNetServer

    replica_class = ControlNetServer.func_or_class.__mro__[1]  # the class itself, without Serve's ingress wrapper
    return replica_class(model="tiny", controlnet="canny", demo=False, torch_threads=1, vae="tiny-taesd")


@pytest.fixture(scope="module")
def client(server):
    from fastapi.testclient import TestClient

    return TestClient(server.__serve_build_asgi_app__())


@pytest.fixture(scope="module")
def control(edges):
    return edges.resize((64, 64))


def b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decoded(text: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def txt2img(client, control, **extra):
    body = dict(prompt="a photo of the astronaut", steps=4, width=64, height=64, sampler_name="LCM", cfg_scale=1.0,
                seed=3, alwayson_scripts={"controlnet": {"args": [dict(image=b64(control), module="none", model=CANNY)]}})
    response = client.post("/sdapi/v1/txt2img", json={**body, **extra})
    assert response.status_code == 200, response.json()
    return response.json()


def test_lcm_sampler_and_sd_vae_equal_the_runner(server, client, control):
    runner = server.runner
    expected = {vae: np.asarray(runner.generate("a photo of the astronaut", control, num_inference_steps=4, height=64,
                                                width=64, guidance_scale=1.0, scheduler="lcm", seed=3, preprocess=False,
                                                vae=vae).images[0]) for vae in ("tiny-taesd", "model")}
    default = txt2img(client, control)
    assert np.array_equal(decoded(default["images"][0]), expected["tiny-taesd"])  # the server's --vae by default
    assert "Sampler: LCM" in default["info"] and "VAE: tiny-taesd" in default["info"]
    own = txt2img(client, control, override_settings={"sd_vae": "None"})  # A1111's "None": the model's own
    assert np.array_equal(decoded(own["images"][0]), expected["model"])
    assert "VAE:" not in own["info"]
    bad = client.post("/sdapi/v1/txt2img", json=dict(prompt="x", override_settings={"sd_vae": "vae-ft-mse.safetensors"}))
    assert bad.status_code == 422 and bad.json()["field"] == "override_settings.sd_vae"
    assert client.get("/sdapi/v1/sd-vae").json() == [dict(model_name="tiny-taesd", filename="tiny-taesd")]
    assert any(s["name"] == "LCM" for s in client.get("/sdapi/v1/samplers").json())


def test_progress_shows_the_running_step_decoded_with_taesd(server, client, control, monkeypatch):
    """A poll during a step gets that step's latents through TAESD as current_image (64x64 PNG)."""
    runner, polls = server.runner, []
    generate = runner.generate

    def polling_generate(*args, latents_callback=None, **kwargs):
        def step(i, total, latents):
            latents_callback(i, total, latents)
            polls.append(client.get("/sdapi/v1/progress").json())  # from the worker thread, mid-generation

        return generate(*args, latents_callback=step, **kwargs)

    monkeypatch.setattr(runner, "generate", polling_generate)
    txt2img(client, control, steps=2)
    assert [p["state"]["sampling_step"] for p in polls] == [1, 2]
    previews = [decoded(p["current_image"]) for p in polls]
    assert [im.shape for im in previews] == [(64, 64, 3)] * 2 and not np.array_equal(*previews)
    assert client.get("/sdapi/v1/progress").json()["current_image"] is None  # no job: no image


def test_generate_fields_vae_and_eta(server, control):
    from engine.serve import api

    fields = dict(prompt="a photo", num_inference_steps=2, height=64, width=64, guidance_scale=1.0, scheduler="tcd",
                  eta=0.3, vae="model", seed=5)
    req = api.build_request(fields, [control], api.Limits(), 1)
    assert api.runner_kwargs(req, ["canny"])["vae"] == "model" and req.eta == 0.3
    (outcome,) = server._generate([req])
    assert outcome.parameters["vae"] == "model" and outcome.parameters["scheduler"] == "tcd"
    want = server.runner.generate("a photo", control, num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
                                  scheduler="tcd", eta=0.3, vae="model", seed=5).images[0]
    assert np.array_equal(np.asarray(outcome.images[0]), np.asarray(want))
    with pytest.raises(api.ApiError, match="eta must be in"):
        api.build_request(dict(fields, eta=2.0), [control], api.Limits(), 1)
    (error,) = server._generate([api.build_request(dict(fields, vae="other"), [control], api.Limits(), 1)])
    assert isinstance(error, api.ApiError) and error.status == 422 and "vae 'other' is not loaded" in error.message

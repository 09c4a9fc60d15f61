"""The Ray Serve app on loopback: parity with Runner.generate, batching under 16 clients, bad requests.

One local Ray (2 CPUs, no dashboard) runs two apps on the tiny model: "exact" batching at / (with the
demo, shared with test_serve_browser.py) and "merge" batching at /merge. Every request goes to
127.0.0.1 with a timeout; the module takes ~40 s, most of it starting Ray.
"""
import base64
import concurrent.futures
import io
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from engine.serve.local import start_local_serve

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("gradio")

REPO = Path(__file__).resolve().parents[1]
FAST = dict(height=64, width=64, num_inference_steps=3, guidance_scale=7.5)
TIMEOUT = 60.0  # seconds per request: generous for a loaded 2-core machine
# The server's URL once started. Kept in the environment, not a module global: pytest imports this file
# as `test_serve` while the browser test imports `tests.test_serve`, two module objects in one process.
URL_VAR = "ENGINE_SERVE_TEST_URL"


def start_server() -> str:
    """Start Ray + both apps once per process; later calls (the browser module) reuse them."""
    if os.environ.get(URL_VAR):
        return os.environ[URL_VAR]
    from engine.serve.app import build_app

    port = start_local_serve()
    common = dict(model="tiny", torch_threads=1, max_batch_size=8, batch_wait_timeout_s=0.1, num_cpus=0.5)
    serve.run(build_app(dict(common, batch_mode="exact", demo=True)), name="exact", route_prefix="/")
    serve.run(build_app(dict(common, batch_mode="merge", demo=False)), name="merge", route_prefix="/merge")
    os.environ[URL_VAR] = f"http://127.0.0.1:{port}"
    return os.environ[URL_VAR]


def stop_server() -> None:
    if os.environ.pop(URL_VAR, None):
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def server_url():
    yield start_server()
    stop_server()


@pytest.fixture(scope="session")
def client(server_url):
    with httpx.Client(base_url=server_url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="session")
def photo_png(photo) -> bytes:
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_b64(photo_png) -> str:
    return base64.b64encode(photo_png).decode()


@pytest.fixture(scope="module")
def reference():
    """Runner.generate in this process, with the replicas' thread count, as uint8 pixels."""
    import torch

    from engine import Runner

    runner = Runner(model="tiny", controlnet="canny", device="cpu")

    def generate(photo, prompt, seed, **params):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the replicas run with torch_threads=1
        try:
            image = runner.generate(prompt, photo, seed=seed, **{**FAST, **params}).images[0]
        finally:
            torch.set_num_threads(threads)
        return np.asarray(image)

    return generate


def decode(b64: str) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


def post_json(client, path="/generate", **fields):
    return client.post(path, json=fields)


def test_healthz_and_models(client):
    assert client.get("/healthz").json()["status"] == "ok"
    models = client.get("/models").json()
    assert models["model"] == "tiny" and models["controlnets"] == ["canny"]
    assert "unipc" in models["schedulers"] and models["batching"]["mode"] == "exact"


def test_json_generation_equals_runner(client, photo, photo_b64, reference):
    r = post_json(client, prompt="an astronaut", image=photo_b64, seed=7, negative_prompt="blurry", **FAST)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 7 and body["parameters"]["num_inference_steps"] == FAST["num_inference_steps"]
    assert set(body["timings"]) >= {"unet", "controlnet", "total"} and len(body["control_maps"]) == 1
    expected = reference(photo, "an astronaut", 7, negative_prompt="blurry")
    np.testing.assert_array_equal(decode(body["images"][0]), expected)


def test_multipart_png_equals_runner(client, photo, photo_png, reference):
    form = {k: str(v) for k, v in dict(prompt="a cat", seed=3, canny_low=50, canny_high=150, **FAST).items()}
    form["response_format"] = "png"
    r = client.post("/generate", data=form, files={"image": ("photo.png", photo_png, "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["x-seed"] == "3"
    from engine.preprocess import canny_with

    expected = reference(photo, "a cat", 3, preprocess=canny_with(50, 150))
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(r.content)).convert("RGB")), expected)


def _concurrent(client_url: str, path: str, payloads: list[dict]) -> list:
    """POST each payload from its own thread (one connection each), all at once; bounded by len(payloads)."""
    def one(payload):
        with httpx.Client(base_url=client_url, timeout=TIMEOUT) as c:
            return c.post(path, json=payload)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        return list(pool.map(one, payloads))


def test_16_concurrent_requests_are_batched_and_exact(server_url, client, photo, photo_b64, reference):
    before = client.get("/stats").json()
    payloads = [dict(prompt=f"prompt {i}", image=photo_b64, seed=100 + i, **FAST) for i in range(16)]
    responses = _concurrent(server_url, "/generate", payloads)
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    sizes = [b["batch"]["size"] for b in bodies]
    after = client.get("/stats").json()
    new_batches = after["recent_batches"][len(before["recent_batches"]):]
    print(f"batch sizes seen by the 16 requests: {sizes}; batches run: {new_batches}")
    assert max(sizes) > 1 and sum(new_batches) == 16 and len(new_batches) < 16
    assert all(b["batch"]["merged"] == 1 for b in bodies)  # exact mode: one generate() per request
    # Requests that shared a batch still equal Runner.generate bit for bit.
    batched = [i for i, b in enumerate(bodies) if b["batch"]["size"] > 1][:2]
    for i in batched:
        expected = reference(photo, f"prompt {i}", 100 + i)
        np.testing.assert_array_equal(decode(bodies[i]["images"][0]), expected)


def test_merge_mode_merges_and_stays_close(server_url, photo, photo_b64, reference):
    payloads = [dict(prompt=f"merged {i}", image=photo_b64, seed=200 + i, **FAST) for i in range(6)]
    responses = _concurrent(server_url, "/merge/generate", payloads)
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    merged = [b["batch"]["merged"] for b in bodies]
    print(f"requests per generate() call in merge mode: {merged}")
    assert max(merged) > 1
    i = merged.index(max(merged))
    got = decode(bodies[i]["images"][0]).astype(int)
    expected = reference(photo, f"merged {i}", 200 + i).astype(int)
    # Same noise (from the request's seed), batched kernels: equal up to float rounding, not bit for bit.
    print(f"merged vs single call: max pixel difference {np.abs(got - expected).max()}/255")
    assert np.abs(got - expected).max() <= 2
    assert not np.array_equal(decode(bodies[0]["images"][0]), decode(bodies[1]["images"][0]))


def _form(**fields):
    return {k: str(v) for k, v in fields.items()}


BAD_JSON = [
    ("malformed JSON", b'{"prompt": "x", ', "body", 400),
    ("body not an object", b'["prompt"]', "body", 400),
    ("deeply nested JSON", b"[" * 100_000, "body", 400),
]

BAD_FIELDS = [  # (what, fields to override, field named in the error)
    ("missing image", dict(image=None), "image"),
    ("image not an image", dict(image=base64.b64encode(b"GIF89a not really").decode()), "image"),
    ("image not base64", dict(image="%%% not base64 %%%"), "image"),
    ("image wrong type", dict(image=12), "image"),
    ("two images for one ControlNet", dict(image=["AAAA", "AAAA"]), "image"),
    ("missing prompt", dict(prompt=None), "prompt"),
    ("steps zero", dict(num_inference_steps=0), "num_inference_steps"),
    ("steps too many", dict(num_inference_steps=100000), "num_inference_steps"),
    ("steps not int", dict(num_inference_steps=2.5), "num_inference_steps"),
    ("height not multiple of 8", dict(height=65), "height"),
    ("width huge", dict(width=1 << 20), "width"),
    ("negative guidance", dict(guidance_scale=-1), "guidance_scale"),
    ("strength out of range", dict(controlnet_conditioning_scale=50), "controlnet_conditioning_scale"),
    ("window reversed", dict(control_guidance_start=0.8, control_guidance_end=0.2), "control_guidance_end"),
    ("canny reversed", dict(canny_low=200, canny_high=100), "canny_low"),
    ("seed negative", dict(seed=-1), "seed"),
    ("unknown scheduler", dict(scheduler="warp"), "scheduler"),
    ("unknown field", dict(num_steps=4), "num_steps"),
    ("bool as string", dict(guess_mode="yes"), "guess_mode"),
    ("too many images", dict(num_images_per_prompt=99), "num_images_per_prompt"),
]


@pytest.mark.parametrize("what, body, field, status", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_body_is_400(client, what, body, field, status):
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and "JSON" in r.json()["error"] and r.json()["field"] == field, r.text


@pytest.mark.parametrize("what, override, field", BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_bad_field_is_422_naming_it(client, photo_b64, what, override, field):
    fields = dict(prompt="x", image=photo_b64, seed=1, **FAST)
    fields.update(override)
    fields = {k: v for k, v in fields.items() if v is not None}
    r = post_json(client, **fields)
    body = r.json()
    assert r.status_code == 422 and body["field"] == field and field in body["error"], r.text
    print(f"{what}: {body['error']}")


def test_bad_multipart_and_content_type(client, photo_png):
    r = client.post("/generate", data=_form(prompt="x", **FAST), files={"image": ("a.png", b"not a png", "image/png")})
    assert r.status_code == 422 and r.json()["field"] == "image", r.text
    r = client.post("/generate", data=_form(prompt="x", num_inference_steps="four"),
                    files={"image": ("a.png", photo_png, "image/png")})
    assert r.status_code == 422 and r.json()["field"] == "num_inference_steps", r.text
    r = client.post("/generate", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"], r.text


def test_runner_errors_are_4xx(client):
    # Passes the API's checks; the Runner itself refuses it (4x4 rounds down to a 0x0 generation).
    buf = io.BytesIO()
    PIL.Image.new("RGB", (4, 4), "white").save(buf, format="PNG")
    r = post_json(client, prompt="x", image=base64.b64encode(buf.getvalue()).decode(), num_inference_steps=2)
    assert r.status_code == 422 and "too small" in r.json()["error"], r.text


def test_config_file_builds_the_app():
    """engine/serve/config.yaml is a valid Serve config whose application builds (no cluster needed)."""
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    from engine.serve.app import build_app

    config = yaml.safe_load((REPO / "engine" / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app = schema.applications[0]
    assert app.import_path == "engine.serve.app:build_app"
    deployment = app.deployments[0]
    deployment = deployment if isinstance(deployment, dict) else deployment.dict(exclude_unset=True)
    assert deployment["ray_actor_options"]["num_gpus"] == 1 and deployment["autoscaling_config"]["max_replicas"] >= 1
    assert build_app(app.args) is not None


def test_good_request_after_bad_ones(client, photo_b64):
    # Runs after the bad-request tests above (file order): the replica must still generate.
    r = post_json(client, prompt="still fine", image=photo_b64, seed=5, **FAST)
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
    assert client.get("/healthz").status_code == 200

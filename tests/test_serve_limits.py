"""The HTTP APIs against careless and hostile clients, without Ray: every limit on every route, work kept off
the event loop, the OpenAPI schema of POST /generate, authentication.

One `Replica` (engine/serve/app.py: the deployment's routes and state, each POST /generate run alone) of the
tiny model serves on loopback under uvicorn in a thread, with small limits so each refusal is cheap. What
needs Serve itself (batching, replicas, their failures) is in tests/test_serve.py and test_serve_faults.py.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import shutil
import threading
import time

import numpy as np
import PIL.Image
import pytest

from engine.serve import api
from engine.serve.local import free_port
from tests.test_build import one_torch_thread  # noqa: F401 (an autouse fixture)

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

LIMITS = dict(max_side=96, max_images=2, max_loras=2, max_body_bytes=2**20, max_images_per_call=2)
FAST = dict(height=64, width=64, num_inference_steps=2)
A1111_FAST = dict(width=64, height=64, steps=2)
TIMEOUT = 60.0
CANNY = "control_v11p_sd15_canny"


def png_b64(image) -> str:
    if not hasattr(image, "save"):
        image = PIL.Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def lora_dir(lora_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    for name, source in (("ink", "unet_text"), ("paper", "second"), ("wash", "unet_only")):
        shutil.copy(lora_files[source], folder / f"{name}.safetensors")
    return folder


@pytest.fixture(scope="module")
def replica(lora_dir):
    from engine.serve.app import Replica

    return Replica(model="tiny", controlnet="canny", demo=False, batch_mode="merge", limits=LIMITS,
                   lora_dir=str(lora_dir))


@pytest.fixture(scope="module")
def url(replica):
    server = uvicorn.Server(uvicorn.Config(replica.__serve_build_asgi_app__(), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def photo64(photo):
    return photo.resize((64, 64), PIL.Image.LANCZOS)


def unit(image, **kwargs) -> dict:
    return {**dict(image=image, module="canny", model=CANNY, processor_res=64, resize_mode="Just Resize"), **kwargs}


def txt2img(units: list, **kwargs) -> dict:
    return {**dict(prompt="a cat", seed=1, sampler_name="UniPC", alwayson_scripts={"controlnet": {"args": units}}),
            **A1111_FAST, **kwargs}


def assert_error(response, status: int, field: str | None) -> dict:
    body = response.json()
    assert response.status_code == status and body["field"] == field and "error" in body, response.text
    return body


# ---- limits a request could walk around -------------------------------------------------------------

def test_size_taken_from_an_image_is_held_to_max_side(client, photo, photo64):
    big = png_b64(photo)  # 128 x 128, max_side 96
    r = client.post("/generate", json=dict(prompt="x", image=big, num_inference_steps=2))
    body = assert_error(r, 422, "image")
    assert "128" in body["error"] and "max_side 96" in body["error"], body
    r = client.post("/generate", json=dict(prompt="x", image=png_b64(photo64), init_image=big, num_inference_steps=2))
    assert_error(r, 422, "init_image")
    r = client.post("/generate", json=dict(prompt="x", image=big, **FAST))  # the same picture, size given: fine
    assert r.status_code == 200, r.text


STRIP, TALL, SPECK = np.full((1, 16000, 3), 200, np.uint8), np.full((16000, 1, 3), 200, np.uint8), np.zeros((1, 7, 3), np.uint8)
UNIT_FIELD = "alwayson_scripts.controlnet.args.0.image"
UNBOUNDED = [  # (what, route, body, field): each asked the server for a gigantic or an empty image
    ("Crop and Resize of a 16000x1 strip", "/sdapi/v1/txt2img",
     lambda: txt2img([unit(png_b64(STRIP), resize_mode="Crop and Resize")]), UNIT_FIELD),
    ("pixel perfect on a strip", "/sdapi/v1/txt2img",
     lambda: txt2img([unit(png_b64(STRIP), resize_mode="Crop and Resize", pixel_perfect=True)]), UNIT_FIELD),
    ("Resize and Fill of a 1x16000 strip (0 px wide)", "/sdapi/v1/txt2img",
     lambda: txt2img([unit(png_b64(TALL), module="none", resize_mode="Resize and Fill")]), UNIT_FIELD),
    ("tile_resample of 1 px by 8 (0 px)", "/sdapi/v1/txt2img",
     lambda: txt2img([unit(png_b64(SPECK), module="tile_resample", threshold_a=8)]), UNIT_FIELD),
    ("img2img crop and resize of a strip", "/sdapi/v1/img2img",
     lambda: dict(init_images=[png_b64(STRIP)], resize_mode=1, prompt="x", **A1111_FAST), "init_images.0"),
    ("detect 8000x2 at processor_res 2048", "/controlnet/detect",
     lambda: dict(controlnet_module="canny", controlnet_input_images=[png_b64(np.zeros((2, 8000, 3), np.uint8))],
                  controlnet_processor_res=2048), "controlnet_input_images.0"),
]


@pytest.mark.parametrize("what, path, body, field", UNBOUNDED, ids=[u[0] for u in UNBOUNDED])
def test_a1111_images_made_from_a_picture_are_bounded(client, what, path, body, field):
    r = client.post(path, json=body())
    assert_error(r, 422, field)
    print(f"{what}: {r.json()['detail']}")


def test_a1111_fitting_within_the_bound_is_the_extensions(photo):
    """Crop and Resize of an ordinary picture still scales to cover and crops the centre, as before."""
    from engine.serve.a1111 import control

    wide = np.asarray(photo.resize((128, 64)))
    with pytest.raises(api.ApiError, match="aspect ratio") as err:
        control.fit(np.zeros((1, 16000, 3), np.uint8), 1, 512, 512, api.Limits(), "image")
    assert err.value.field == "image" and "8192000x512" in err.value.message  # refused before it is allocated
    np.testing.assert_array_equal(control.fit(wide, 1, 64, 64, api.Limits(), "x"), wide[:, 32:96])


ROUTES = ["/generate", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/controlnet/detect", "/sdapi/v1/options"]


@pytest.mark.parametrize("path", ROUTES)
def test_body_size_is_capped_on_every_route(client, path):
    big = b"{" + b" " * (LIMITS["max_body_bytes"] + 10) + b"}"
    r = client.post(path, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body" and "at most" in r.text, r.text

    def chunks():  # no Content-Length: counted as it streams
        yield b"{"
        for _ in range(LIMITS["max_body_bytes"] // 65536 + 2):
            yield b" " * 65536

    r = client.post(path, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body", r.text
    assert client.get("/healthz").status_code == 200


def test_event_loop_answers_while_requests_are_prepared(client, url, replica, photo64, monkeypatch):
    """Decoding, planning and detection run on the replica's prepare pool (2 threads): with them all blocked,
    /healthz still answers, and four heavy requests hold two threads, never more."""
    from engine.serve.a1111 import control

    release, inside, most = threading.Event(), [0], [0]
    lock = threading.Lock()
    real_detect, real_decode = control.detect, api.to_rgb

    def held(fn):
        def wrapper(*args, **kwargs):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            try:
                release.wait(TIMEOUT)
                return fn(*args, **kwargs)
            finally:
                with lock:
                    inside[0] -= 1
        return wrapper

    monkeypatch.setattr(control, "detect", held(real_detect))
    monkeypatch.setattr(api, "to_rgb", held(real_decode))
    image = png_b64(photo64)
    heavy = [("/controlnet/detect", dict(controlnet_module="canny", controlnet_input_images=[image],
                                         controlnet_processor_res=64)),
             ("/sdapi/v1/txt2img", txt2img([unit(image)])),
             ("/generate", dict(prompt="x", image=image, seed=1, **FAST)),
             ("/controlnet/detect", dict(controlnet_module="canny", controlnet_input_images=[image],
                                         controlnet_processor_res=64))]

    def post(job):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            return c.post(*job[:1], json=job[1])

    with concurrent.futures.ThreadPoolExecutor(len(heavy)) as pool:
        futures = [pool.submit(post, job) for job in heavy]
        deadline = time.monotonic() + 10
        while inside[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        healthy = client.get("/healthz", timeout=5.0)
        answered_in = time.monotonic() - started
        time.sleep(0.3)  # room for a third request to get in, if the pool let it
        held_at_once = most[0]
        release.set()
        statuses = [f.result().status_code for f in futures]
    print(f"/healthz answered in {answered_in * 1e3:.0f} ms with {held_at_once} requests held; then {statuses}")
    assert healthy.status_code == 200 and held_at_once == replica.prepare_pool._max_workers == 2  # noqa: SLF001
    assert statuses == [200] * len(heavy)


def test_runner_checks_name_their_field(client, photo64):
    """A body that passes the API's checks but fails one of the Runner's (a preprocessor without its annotator,
    a strength that keeps no step) is a 422 naming the field, on both APIs; one naming no argument, "body"."""
    picture = png_b64(photo64)
    r = client.post("/generate", json=dict(prompt="a cat", image=picture, seed=1, preprocess="depth", **FAST))
    assert "annotator" in assert_error(r, 422, "preprocess")["error"]
    r = client.post("/generate", json=dict(prompt="a cat", image=picture, init_image=picture, strength=0.01, seed=1,
                                           **FAST))
    assert "keeps no step" in assert_error(r, 422, "strength")["error"]
    r = client.post("/sdapi/v1/img2img", json=dict(prompt="a cat", init_images=[picture], denoising_strength=0.01,
                                                   seed=1, **A1111_FAST))
    assert "keeps no step" in assert_error(r, 422, "denoising_strength")["detail"]
    assert api.runner_error(ValueError("model 'x' needs a VAE encoder"), api.GENERATE_WORDS).field == "body"
    assert api.runner_error(ValueError("mask_image is 8x8 but init_image is 9x9"), api.GENERATE_WORDS).field == \
        "mask_image"


def test_lora_tags_count_against_max_loras(client, photo64):
    tags = "<lora:ink:0.5> <lora:paper:0.5> <lora:wash:0.5>"
    r = client.post("/sdapi/v1/txt2img", json=txt2img([unit(png_b64(photo64))], prompt=f"a cat {tags}"))
    body = assert_error(r, 422, "prompt")
    assert "3 LoRAs" in body["detail"] and "at most 2" in body["detail"], body
    many = " ".join(f"<lora:missing{i}:1>" for i in range(200))  # refused by count before any folder lookup
    assert_error(client.post("/sdapi/v1/txt2img", json=txt2img([unit(png_b64(photo64))], prompt=many)), 422, "prompt")


def test_repeated_lora_tags_merge_as_a1111(lora_dir):
    """A1111 applies the one loaded network once per tag, at the last tag's weight (networks.load_networks)."""
    from engine.lora import parse_prompt_loras

    prompt, loras = parse_prompt_loras("<lora:ink:0.5>a cat <lora:paper:0.2>, <lora:ink:0.3>", lora_dir, max_loras=2)
    assert prompt == "a cat , " and loras == [(lora_dir / "ink.safetensors", 0.6), (lora_dir / "paper.safetensors", 0.2)]


def test_loaded_lora_files_are_bounded(lora_dir, monkeypatch):
    from engine import Runner, lora

    monkeypatch.setattr(lora, "FILE_CACHE_SIZE", 2, raising=False)
    runner = Runner(model="tiny", controlnet="canny", device="cpu")
    for name in ("ink", "paper", "wash", "paper"):
        runner.set_loras([(str(lora_dir / f"{name}.safetensors"), 0.5)])
    kept = [key[0].rsplit("/", 1)[-1] for key in runner.loras._files]  # noqa: SLF001
    assert kept == ["wash.safetensors", "paper.safetensors"], kept  # the two most recently used
    runner.set_loras([])


def test_merge_mode_bounds_images_per_call(replica, photo64):
    requests = [api.build_request(dict(prompt=f"p{i}", seed=i, **FAST), [photo64], replica.limits, 1) for i in range(5)]
    calls = replica._calls(requests, list(range(5)))  # noqa: SLF001 (batch_mode "merge", max_images_per_call 2)
    assert sorted(i for call in calls for i in call) == list(range(5)) and max(map(len, calls)) == 2, calls
    pairs = [api.build_request(dict(prompt=f"p{i}", seed=i, num_images_per_prompt=2, **FAST), [photo64], replica.limits, 1)
             for i in range(3)]
    assert replica._calls(pairs, [0, 1, 2]) == [[0], [1], [2]]  # noqa: SLF001


def test_prompt_check_has_its_own_tokenizer(client, replica, photo64, monkeypatch):
    """The 75-token check never calls the Runner's tokenizer, which the worker thread uses (its truncation and
    padding are shared state: a check beside a generation could hand the text encoder an untruncated prompt)."""
    calls = []
    real = replica.runner.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *args, **kwargs):
            calls.append(threading.current_thread().name)
            return real(*args, **kwargs)

    spy = Spy()
    monkeypatch.setattr(replica.runner, "tokenizer", spy)
    monkeypatch.setattr(replica.runner.family, "tokenizer", spy)  # the one the worker's text encoding uses
    r = client.post("/sdapi/v1/txt2img", json=txt2img([unit(png_b64(photo64))], prompt="astronaut " * 80))
    body = assert_error(r, 422, "prompt")
    assert "tokens" in body["detail"] and calls == [], calls
    assert client.post("/sdapi/v1/txt2img", json=txt2img([unit(png_b64(photo64))])).status_code == 200
    assert calls and all(name.startswith("runner") for name in calls), calls  # the worker's own tokenizing


# ---- the OpenAPI schema --------------------------------------------------------------------------------

def _validator(spec: dict, schema: dict):
    """A JSON schema 2020-12 validator (OpenAPI 3.1's dialect) for a schema of the served document, its
    `#/components/...` references resolved in that document."""
    import json

    from jsonschema import Draft202012Validator
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    def rooted(x):  # the document's own references, made absolute so they resolve from any subschema
        return json.loads(json.dumps(x).replace('"#/components/', '"urn:openapi#/components/'))

    registry = Registry().with_resource("urn:openapi", DRAFT202012.create_resource(rooted(spec)))
    return Draft202012Validator(rooted(schema), registry=registry)


def _bodies(photo64, mask) -> dict:
    image = png_b64(photo64)
    return {
        "txt2img": dict(prompt="a cat", image=image, seed=3, **FAST),
        "img2img": dict(prompt="a cat", image=image, init_image=image, strength=0.6, seed=3, **FAST),
        "inpaint": dict(prompt="a cat", image=image, init_image=image, mask_image=png_b64(mask), seed=3, **FAST),
        "LoRA": dict(prompt="a cat", image=image, loras=[["ink", 0.5], {"name": "paper", "weight": -0.3}], seed=3, **FAST),
    }


def test_generate_schema_states_the_checks_and_admits_every_mode(client, photo64):
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = schema["properties"]
    assert {"init_image", "mask_image", "image"} <= set(props) and schema["required"] == ["prompt", "image"]
    assert props["height"]["maximum"] == LIMITS["max_side"] and props["height"]["multipleOf"] == 8
    assert props["num_images_per_prompt"]["maximum"] == LIMITS["max_images"]
    assert props["loras"]["maxItems"] == LIMITS["max_loras"] and props["num_inference_steps"]["minimum"] == 1
    validator = _validator(spec, schema)
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for mode, body in _bodies(photo64, mask).items():  # valid bodies of each mode: valid for the schema, and served
        assert not list(validator.iter_errors(body)), (mode, [e.message for e in validator.iter_errors(body)])
        r = client.post("/generate", json=body)
        assert r.status_code == 200, (mode, r.text)
    good = _bodies(photo64, mask)["txt2img"]
    for change in [dict(num_inference_steps=0), dict(height=65), dict(height=128), dict(strength=0.0),
                   dict(response_format="png", num_images_per_prompt=2), dict(mask_image=png_b64(mask)),
                   dict(prompt="<lora:ink:1> a cat"), dict(prompt="  "), dict(loras=[["a", 1]] * 3), dict(steps=4),
                   dict(image=[good["image"]] * 2), dict(scheduler="warp")]:
        body = {**good, **change}
        assert list(validator.iter_errors(body)), change  # the schema refuses it ...
        assert 400 <= client.post("/generate", json=body).status_code < 500, change  # ... and so does the server


def test_inpaint_only_servers_schema_leaves_image_out():
    from jsonschema import Draft202012Validator

    from engine.serve.openapi import request_schema

    schema = request_schema(api.Limits(), 1, inpaint_only=True)
    validator = Draft202012Validator(schema)
    assert validator.is_valid(dict(prompt="x", init_image="AAAA", mask_image="AAAA"))
    assert not validator.is_valid(dict(prompt="x", init_image="AAAA"))  # neither a control image nor a mask
    assert not Draft202012Validator(request_schema(api.Limits(), 1, False)).is_valid(
        dict(prompt="x", init_image="AAAA", mask_image="AAAA"))


def test_a1111_bodies_of_each_mode_validate_against_the_served_schema(client, photo64):
    spec = client.get("/openapi.json").json()
    image = png_b64(photo64)
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    bodies = {
        "/sdapi/v1/txt2img": [txt2img([unit(image)]), txt2img([unit(image)], prompt="a cat <lora:ink:0.4>")],
        "/sdapi/v1/img2img": [dict(init_images=[image], denoising_strength=0.6, prompt="x", **A1111_FAST),
                              dict(init_images=[image], mask=png_b64(mask), inpainting_fill=1, inpaint_full_res=False,
                                   prompt="x", alwayson_scripts={"controlnet": {"args": [unit("")]}}, **A1111_FAST)],
    }
    for path, examples in bodies.items():
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        validator = _validator(spec, schema)
        for body in examples:
            assert not list(validator.iter_errors(body)), [e.message for e in validator.iter_errors(body)]
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text


def test_client_errors_are_paced_per_client():
    """guard.ErrorPacing, as Serve's proxy runs it: a burst of 4xx answers at once, then one per interval to that
    client address; its 2xx answers and other clients' answers never wait. A fake clock: no timing here."""
    import asyncio

    from engine.serve.guard import ErrorPacing

    now, waits = [0.0], []

    async def sleep(seconds):
        waits.append(round(seconds, 6))
        now[0] += seconds

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 422 if scope["path"] == "/bad" else 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    paced = ErrorPacing(app, per_second=4, burst=3, clock=lambda: now[0], sleep=sleep)

    async def call(path, host="10.0.0.1"):
        sent = []

        async def send(message):
            sent.append(message)

        await paced({"type": "http", "path": path, "client": (host, 5000)}, None, send)
        return sent[0]["status"]

    async def run():
        statuses = [await call("/bad") for _ in range(6)]
        statuses += [await call("/good"), await call("/bad", host="10.0.0.2")]
        return statuses

    assert asyncio.run(run()) == [422] * 6 + [200, 422]
    assert waits == [0.25, 0.25, 0.25]  # after the burst of 3: one error answer each 1/4 s, only for that client


# ---- who may call ------------------------------------------------------------------------------------------

def test_auth_guards_every_route(replica, monkeypatch):
    from fastapi.testclient import TestClient

    from engine.serve import guard

    monkeypatch.setattr(replica, "credentials", [("ann", "s3cret"), ("bob", "hunter2")])
    monkeypatch.setattr(replica, "api_keys", ["k-123"])
    app = replica.__serve_build_asgi_app__()
    compared = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    basic = "Basic " + base64.b64encode(b"bob:hunter2").decode()
    wrong = "Basic " + base64.b64encode(b"bob:hunter3").decode()
    routes = sorted({(method, route.path) for route in app.routes for method in getattr(route, "methods", ()) or ()
                     if method != "HEAD"})
    assert {("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/generate"), ("GET", "/healthz")} <= set(routes)
    with TestClient(app) as c:
        for method, path in routes:
            kwargs = dict(json={}) if method == "POST" else {}
            for headers in ({}, {"authorization": wrong}, {"x-api-key": "k-12"}, {"authorization": "Bearer nope"}):
                r = c.request(method, path, headers=headers, **kwargs)
                assert r.status_code == 401 and r.json()["field"] == "authorization", (method, path, headers, r.text)
                assert r.headers["www-authenticate"].startswith("Basic")
            for headers in ({"authorization": basic}, {"authorization": "Bearer k-123"}, {"x-api-key": "k-123"}):
                r = c.request(method, path, headers=headers, **kwargs)
                assert r.status_code != 401, (method, path, headers, r.text)
    compared.clear()
    TestClient(app).get("/healthz", headers={"authorization": basic})
    assert len(compared) == 3  # every secret compared, in constant time, whichever matched


def test_cli_flags(tmp_path):
    from engine.serve.__main__ import app_args, exposure_warning, parse_args

    args = app_args(parse_args(["--engine-dir", str(tmp_path), "--backend", "openvino", "--replicas", "2",
                                "--api-auth", "ann:pw", "--max-queued-requests", "16"]), num_gpus=0)
    assert args["engine_dir"] == str(tmp_path) and args["backend"] == "openvino" and args["num_replicas"] == 2
    assert args["model"] is None and args["controlnet"] is None and args["max_queued_requests"] == 16
    assert app_args(parse_args([]), num_gpus=0)["model"] == "tiny"
    assert app_args(parse_args(["--limit", "max_side=768", "--limit", "max_loras=4"]), num_gpus=0)["limits"] == \
        dict(max_side=768, max_loras=4)
    for bad in ("max_sides=768", "max_side=-1", "max_side"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            app_args(parse_args(["--limit", bad]), num_gpus=0)
    with pytest.raises(ValueError, match="user:password"):
        app_args(parse_args(["--api-auth", "nopassword"]), num_gpus=0)
    assert "without authentication" in exposure_warning("0.0.0.0", None, None)
    assert exposure_warning("0.0.0.0", "ann:pw", None) is None and exposure_warning("127.0.0.1", None, None) is None

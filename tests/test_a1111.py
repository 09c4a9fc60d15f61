"""The A1111 web UI API, driven by the real `webuiapi` client over loopback, against Runner.generate.

One local Ray (2 CPUs) serves the tiny model with two ControlNets (canny, depth) at / on 127.0.0.1, with
small limits (96 px, 2 steps, 2 images) so the schema fuzz stays cheap. Images are 64x64, 2 steps. If
tests/test_serve.py's server is still up in this process (it is session-scoped), it is stopped first.
"""
import base64
import functools
import io
import os
import re
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from engine.serve.local import start_local_serve

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")
cv2 = pytest.importorskip("cv2")

REPO = Path(__file__).resolve().parents[1]
SIZE = dict(width=64, height=64, steps=2, cfg_scale=7.0)
LIMITS = dict(max_side=96, max_steps=2, max_images=2)
TIMEOUT = 60.0
CANNY = "control_v11p_sd15_canny"  # the name without [hash] also matches
# Examples per POST operation and positive/negative mode, and the fuzz's time cap (raise both for a soak).
FUZZ_EXAMPLES = int(os.environ.get("A1111_FUZZ_EXAMPLES", "5"))
FUZZ_SECONDS = float(os.environ.get("A1111_FUZZ_SECONDS", "45"))
SERVE_TEST_URL_VAR = "ENGINE_SERVE_TEST_URL"  # tests/test_serve.py's running server, if any


@pytest.fixture(scope="module")
def lora_dir(lora_files):
    return lora_files["unet_text"].parent


@pytest.fixture(scope="module")
def server_url(lora_dir):
    from engine.serve.app import build_app

    if os.environ.pop(SERVE_TEST_URL_VAR, None) or ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    port = start_local_serve()
    args = dict(model="tiny", controlnet=["canny", "depth"], torch_threads=1, demo=False, num_cpus=0.5, limits=LIMITS,
                lora_dir=str(lora_dir))
    serve.run(build_app(args), name="a1111", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def api(server_url):
    port = int(server_url.rsplit(":", 1)[1])
    client = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="UniPC")
    client.session.request = functools.partial(client.session.request, timeout=TIMEOUT)  # webuiapi sets none
    return client


@pytest.fixture(scope="module")
def runner():
    from engine import Runner

    return Runner(model="tiny", controlnet=["canny", "depth"], device="cpu")


@pytest.fixture(scope="module")
def reference(runner):
    """Runner.generate in this process at the replica's thread count (1), as uint8 pixels."""
    import torch

    def generate(prompt, images, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            args = dict(height=64, width=64, num_inference_steps=2, guidance_scale=7.0, scheduler="unipc")
            return np.asarray(runner.generate(prompt, images, **{**args, **kwargs}).images[0])
        finally:
            torch.set_num_threads(threads)

    return generate


@pytest.fixture(scope="module")
def photo64(photo):
    return photo.resize((64, 64), PIL.Image.LANCZOS)


@pytest.fixture(scope="module")
def depth_map():
    """A stand-in depth map (smooth, random), given to the depth unit with module 'none'."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8).repeat(3, axis=2)
    return PIL.Image.fromarray(small).resize((64, 64), PIL.Image.BILINEAR)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def canny_unit(photo64, **kwargs):
    args = dict(image=photo64, module="canny", model=CANNY, processor_res=64, threshold_a=100, threshold_b=200,
                resize_mode="Just Resize")
    return webuiapi.ControlNetUnit(**{**args, **kwargs})


def b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_lists(api, server_url):
    titles = api.controlnet_model_list()
    assert [t.rsplit(" [", 1)[0] for t in titles] == [CANNY, "control_v11f1p_sd15_depth"]
    assert all(re.fullmatch(r".+ \[[0-9a-f]{8}\]", t) for t in titles)
    assert {"none", "canny"} <= set(api.controlnet_module_list())
    assert api.controlnet_version() == 3
    assert api.util_get_sampler_names() == sorted(["DPM++ 2M", "DDIM", "Euler", "Euler a", "UniPC"])
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    model = api.get_sd_models()[0]
    assert model["model_name"] == "tiny" and api.get_options()["sd_model_checkpoint"] == model["title"]
    api.util_set_model("tiny")  # the model in force: accepted (POST options with an unchanged value)
    assert api.get_progress()["state"]["job_count"] == 0
    types = api.custom_get("controlnet/control_types")["control_types"]
    assert types["Canny"]["default_model"] == titles[0] and types["Canny"]["default_option"] == "canny"


def test_txt2img_one_unit_equals_runner(api, photo64, reference):
    r = api.txt2img(prompt="an astronaut", negative_prompt="blurry", seed=5, controlnet_units=[canny_unit(photo64)],
                    **SIZE)
    from engine.preprocess import canny_with

    blank = np.zeros((64, 64, 3), np.uint8)  # the depth slot, unused: scale 0, never run
    expected = reference("an astronaut", [photo64, blank], negative_prompt="blurry", seed=5,
                         preprocess=[canny_with(100, 200), False], controlnet_conditioning_scale=[1.0, 0.0],
                         control_mode=["balanced", "balanced"])
    np.testing.assert_array_equal(pixels(r.images[0]), expected)
    # The detected map comes after the generations, as the extension appends it.
    edges = cv2.Canny(np.asarray(photo64), 100, 200)
    np.testing.assert_array_equal(pixels(r.images[1]), np.stack([edges] * 3, axis=2))
    assert len(r.images) == 2 and r.info["seed"] == 5 and r.info["all_seeds"] == [5]
    assert r.info["sampler_name"] == "UniPC" and (r.info["width"], r.info["height"]) == (64, 64)
    text = r.info["infotexts"][0]
    assert r.images[0].info["parameters"] == text  # the PNG carries the same text
    from engine.pngmeta import parse_parameters

    parsed = parse_parameters(text)
    assert parsed["seed"] == 5 and parsed["negative_prompt"] == "blurry" and parsed["controlnet"][0].startswith(CANNY)
    assert r.parameters["seed"] == 5 and r.parameters["sampler_name"] == "UniPC"


def test_txt2img_two_units_equals_runner(api, photo64, depth_map, reference):
    # Units in the other order than the server's ControlNets: each unit's model picks its slot.
    # The depth unit names its model with another [hash], as a client written for A1111's files would.
    units = [webuiapi.ControlNetUnit(image=depth_map, module="none", model="control_v11f1p_sd15_depth [cfd03158]", weight=0.6,
                                     guidance_end=0.5, resize_mode="Just Resize"),
             canny_unit(photo64, weight=0.8)]
    r = api.txt2img(prompt="two nets", seed=11, controlnet_units=units, **SIZE)
    from engine.preprocess import canny_with

    expected = reference("two nets", [photo64, depth_map], seed=11, preprocess=[canny_with(100, 200), False],
                         controlnet_conditioning_scale=[0.8, 0.6], control_guidance_end=[1.0, 0.5],
                         control_mode=["balanced", "balanced"])
    np.testing.assert_array_equal(pixels(r.images[0]), expected)
    assert len(r.images) == 3  # the image, then each unit's map


@pytest.mark.parametrize("mode, runner_mode", [(0, "balanced"), ("My prompt is more important", "prompt"),
                                               (2, "controlnet")])
def test_control_modes_equal_runner(api, photo64, reference, mode, runner_mode):
    unit = canny_unit(photo64)
    unit.control_mode = mode  # after construction: webuiapi would turn 0/1/2 into names, and both must work
    r = api.txt2img(prompt="modes", seed=2, controlnet_units=[unit], **SIZE)
    from engine.preprocess import canny_with

    idle = "controlnet" if runner_mode == "controlnet" else "balanced"
    expected = reference("modes", [photo64, np.zeros((64, 64, 3), np.uint8)], seed=2,
                         preprocess=[canny_with(100, 200), False], controlnet_conditioning_scale=[1.0, 0.0],
                         control_mode=[runner_mode, idle])
    np.testing.assert_array_equal(pixels(r.images[0]), expected)
    from engine.serve.a1111.plan import CONTROL_MODES

    assert f"Control Mode: {CONTROL_MODES[['balanced', 'prompt', 'controlnet'].index(runner_mode)]}" in r.info["infotexts"][0]


def test_control_modes_differ(reference, photo64):
    """The three modes are three different generations (the soft scales and the conditional-only CFG act)."""
    from engine.preprocess import canny_with

    images = [reference("modes", [photo64, photo64], seed=2, preprocess=[canny_with(100, 200), False],
                        controlnet_conditioning_scale=[1.0, 0.0], control_mode=[m, m])
              for m in ("balanced", "prompt", "controlnet")]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_random_seed_is_returned_and_reproduces(api, photo64):
    first = api.txt2img(prompt="seeded", seed=-1, batch_size=2, controlnet_units=[canny_unit(photo64)], **SIZE)
    seed = first.info["seed"]
    assert 0 <= seed < 2**32 and first.info["all_seeds"] == [seed, (seed + 1) % 2**32]
    assert len(first.images) == 3 and "Batch pos: 1" in first.info["infotexts"][1]
    again = api.txt2img(prompt="seeded", seed=first.info["all_seeds"][1], controlnet_units=[canny_unit(photo64)], **SIZE)
    np.testing.assert_array_equal(pixels(again.images[0]), pixels(first.images[1]))


def test_detect_canny_equals_cv2(api, photo, photo64):
    r = api.controlnet_detect([photo64], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    np.testing.assert_array_equal(pixels(r.images[0])[:, :, 0], cv2.Canny(np.asarray(photo64), 100, 200))
    # webuiapi's defaults (processor_res 512, thresholds 64/64): the 128 px photo scaled up by INTER_CUBIC first.
    r = api.controlnet_detect([photo], module="canny")
    scaled = cv2.resize(np.asarray(photo), (512, 512), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(pixels(r.images[0])[:, :, 0], cv2.Canny(scaled, 64, 64))


def test_resize_modes_fit_the_map(photo):
    """The three resize modes give a map of the generation size; Crop and Resize keeps the centre."""
    from engine.serve.a1111 import control
    from engine.serve.api import Limits

    wide = np.asarray(photo.resize((128, 64)))
    for mode in range(3):
        assert control.fit(wide, mode, 64, 48, Limits(), "image").shape == (64, 48, 3)
    crop = control.fit(wide, 1, 64, 64, Limits(), "image")
    np.testing.assert_array_equal(crop, wide[:, 32:96])
    fill = control.fit(wide, 2, 64, 64, Limits(), "image")  # scaled to 64x32, centred, bands of the median border colour
    assert (fill[:16] == fill[0, 0]).all() and (fill[48:] == fill[0, 0]).all()
    assert control.pixel_perfect_resolution(wide, 64, 64, 1) == 64 and control.pixel_perfect_resolution(wide, 64, 64, 2) == 32


def _post(server_url, path, body):
    return requests.post(server_url + path, json=body, timeout=TIMEOUT)


def _good_body(photo64):
    unit = dict(image=b64(photo64), module="canny", model=CANNY, processor_res=64)
    return dict(prompt="fine", seed=1, sampler_name="UniPC", alwayson_scripts={"controlnet": {"args": [unit]}}, **SIZE)


BAD = [  # (what, change to the good body, field named in the error)
    ("unknown sampler", dict(sampler_name="Warp 9"), "sampler_name"),
    ("scheduler the sampler lacks", dict(sampler_name="Euler", scheduler="Karras"), "scheduler"),
    ("unknown ControlNet model", {"unit": dict(model="control_v11p_sd15_openpose")}, "alwayson_scripts.controlnet.args.0.model"),
    ("unit without image", {"unit": dict(image="")}, "alwayson_scripts.controlnet.args.0.image"),
    ("image not base64", {"unit": dict(image="%%% not base64 %%%")}, "alwayson_scripts.controlnet.args.0.image"),
    ("unknown module", {"unit": dict(module="openpose")}, "alwayson_scripts.controlnet.args.0.module"),
    ("mixed cond-only modes", {"two units": True}, "alwayson_scripts.controlnet.args.1.control_mode"),
    ("width not a multiple of 8", dict(width=65), "width"),
    ("width over the limit", dict(width=128), "width"),
    ("hires fix", dict(enable_hr=True), "enable_hr"),
    ("restore faces", dict(restore_faces=True), "restore_faces"),
    ("a style", dict(styles=["cinematic"]), "styles"),
    ("another script", dict(script_name="X/Y/Z plot"), "script_name"),
    ("another alwayson script", dict(alwayson_scripts={"ADetailer": {"args": []}}), "alwayson_scripts.ADetailer"),
    ("an option override", dict(override_settings={"CLIP_stop_at_last_layers": 2}), "override_settings.CLIP_stop_at_last_layers"),
    ("unknown field", dict(num_steps=4), "num_steps"),
    ("empty prompt", dict(prompt=""), "prompt"),
    ("prompt over 75 tokens", dict(prompt="astronaut " * 80), "prompt"),
]


@pytest.mark.parametrize("what, change, field", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_4xx_naming_the_field(server_url, photo64, depth_map, what, change, field):
    body = _good_body(photo64)
    unit = body["alwayson_scripts"]["controlnet"]["args"][0]
    if "unit" in change:
        unit.update(change["unit"])
    elif "two units" in change:
        unit["control_mode"] = 2
        body["alwayson_scripts"]["controlnet"]["args"].append(
            dict(image=b64(depth_map), model="control_v11f1p_sd15_depth", control_mode=0))
    else:
        body.update(change)
    r = _post(server_url, "/sdapi/v1/txt2img", body)
    err = r.json()
    assert 400 <= r.status_code < 500 and err["field"] == field and set(err) >= {"error", "detail"}, r.text
    print(f"{what}: {r.status_code} {err['detail']}")


def test_webuiapi_sees_errors_and_the_server_goes_on(api, photo64):
    with pytest.raises(RuntimeError, match="sampler_name"):
        api.txt2img(prompt="x", sampler_name="Warp 9", controlnet_units=[canny_unit(photo64)], **SIZE)
    with pytest.raises(RuntimeError, match="image is required"):
        api.txt2img(prompt="x", controlnet_units=[canny_unit(None)], **SIZE)
    r = api.txt2img(prompt="still fine", seed=3, controlnet_units=[canny_unit(photo64)], **SIZE)
    assert r.info["seed"] == 3 and len(r.images) == 2


def test_lora_tags_need_lora_support(server_url, photo64):
    body = dict(_good_body(photo64), prompt="a cat <lora:style:0.7>")
    r = _post(server_url, "/sdapi/v1/txt2img", body)
    assert r.status_code in (422, 501) and r.json()["field"] == "prompt" and "lora" in r.json()["detail"].lower(), r.text


def test_lora_tag_equals_runner_set_loras(api, lora_dir, photo64, runner, reference):
    r = api.txt2img(prompt="an astronaut <lora:unet_text:0.7>", seed=6, controlnet_units=[canny_unit(photo64)], **SIZE)
    from engine.preprocess import canny_with

    runner.set_loras([(str(lora_dir / "unet_text.safetensors"), 0.7)])
    try:  # A1111 removes the tag and leaves the rest of the prompt as it was
        expected = reference("an astronaut ", [photo64, np.zeros((64, 64, 3), np.uint8)], seed=6,
                             preprocess=[canny_with(100, 200), False], controlnet_conditioning_scale=[1.0, 0.0],
                             control_mode=["balanced", "balanced"])
    finally:
        runner.set_loras([])
    np.testing.assert_array_equal(pixels(r.images[0]), expected)
    from engine.lora import lora_short_hash

    text = r.info["infotexts"][0]  # as A1111 writes it: the prompt with its tag, and the LoRA's hash
    assert text.startswith("an astronaut <lora:unet_text:0.7>")
    assert f"Lora hashes: \"unet_text: {lora_short_hash(lora_dir / 'unet_text.safetensors')}\"" in text
    plain = api.txt2img(prompt="an astronaut ", seed=6, controlnet_units=[canny_unit(photo64)], **SIZE)
    assert not np.array_equal(pixels(plain.images[0]), expected)  # and the LoRA was taken off after the request


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_img2img_with_a_unit_equals_runner(api, photo64, reference, inpaint):
    from engine.preprocess import canny_with

    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kwargs = dict(mask_image=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False) if inpaint else {}
    r = api.img2img(images=[photo64], prompt="repaint", seed=4, denoising_strength=0.6,
                    controlnet_units=[canny_unit(None)], **SIZE, **kwargs)  # the unit uses the init image
    expected = reference("repaint", [photo64, np.zeros((64, 64, 3), np.uint8)], seed=4, init_image=photo64,
                         mask_image=mask if inpaint else None, strength=0.6,
                         preprocess=[canny_with(100, 200), False], controlnet_conditioning_scale=[1.0, 0.0],
                         control_mode=["balanced", "balanced"])
    np.testing.assert_array_equal(pixels(r.images[0]), expected)


def test_openapi_documents_both_apis(server_url):
    spec = requests.get(server_url + "/openapi.json", timeout=TIMEOUT).json()
    from engine.serve.api import FIELDS, IMAGE_FIELDS

    generate = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(generate["properties"]) == {*IMAGE_FIELDS, *FIELDS}
    txt2img = spec["paths"]["/sdapi/v1/txt2img"]["post"]
    ref = txt2img["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"prompt", "alwayson_scripts", "sampler_name", "seed"} <= set(spec["components"]["schemas"][ref]["properties"])
    unit = spec["components"]["schemas"]["ControlNetUnit"]["properties"]
    assert {"control_mode", "resize_mode", "pixel_perfect", "processor_res", "guidance_end"} <= set(unit)
    for path in ("/sdapi/v1/img2img", "/controlnet/detect", "/sdapi/v1/samplers", "/controlnet/model_list"):
        assert path in spec["paths"]


def test_schema_fuzz_finds_no_5xx_and_no_schema_break(server_url):
    """schemathesis, from the app's own OpenAPI document, on loopback: a few examples per operation."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(server_url + "/openapi.json")
    named = {}  # (status, field or None) -> count

    def error_shape(ctx, response, case):
        """Every 4xx is JSON in the route's error shape, naming the field it is about ("body": the whole body)."""
        if 400 <= response.status_code < 500:
            body = response.json()
            assert isinstance(body, dict) and {"error", "field"} <= set(body), f"{case.path}: {response.text[:200]}"
            assert body["field"], f"a {response.status_code} names no field: {case.path} {response.text[:200]}"
            key = (response.status_code, "named" if body["field"] else None)
            named[key] = named.get(key, 0) + 1

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              error_shape]
    deadline = time.monotonic() + FUZZ_SECONDS  # the time cap: later operations get no examples past it
    seen, statuses = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            examples = FUZZ_EXAMPLES if operation.method.upper() == "POST" else 2

            @settings(max_examples=examples, deadline=None, phases=[Phase.generate], database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def run(case):
                if time.monotonic() < deadline:
                    response = case.call_and_validate(base_url=server_url, checks=checks, timeout=TIMEOUT)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                run()
            except Unsatisfiable:  # negative mode on an operation without inputs: nothing to break
                assert mode == schemathesis.GenerationMode.NEGATIVE
        seen.append(f"{operation.method.upper()} {operation.path}")
    print(f"fuzzed {len(seen)} operations ({', '.join(seen)}); responses by status: {dict(sorted(statuses.items()))}; "
          f"4xx by field named: {named}")
    assert time.monotonic() < deadline, "the fuzz ran into its time cap: some operations got no examples"
    assert {"POST /sdapi/v1/txt2img", "POST /generate", "POST /controlnet/detect"} <= set(seen)
    assert requests.get(server_url + "/healthz", timeout=TIMEOUT).status_code == 200
    # The replica still generates, on both APIs, after whatever the fuzz sent.
    r = _post(server_url, "/sdapi/v1/txt2img", _good_body(PIL.Image.new("RGB", (64, 64), "white")))
    assert r.status_code == 200 and r.json()["images"], r.text
    blank = b64(PIL.Image.new("RGB", (64, 64)))
    r = _post(server_url, "/generate", dict(prompt="after the fuzz", image=[blank, blank], preprocess="none", height=64,
                                            width=64, num_inference_steps=2))
    assert r.status_code == 200 and r.json()["images"], r.text


def test_docs_example_runs(server_url, monkeypatch):
    """docs/SERVING.md's webuiapi example, run from the repository root as written but for the port."""
    text = (REPO / "docs" / "SERVING.md").read_text()
    section = text.split("## A1111 web UI API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "port=8000" in code
    monkeypatch.chdir(REPO)
    exec(compile(code.replace("port=8000", f"port={server_url.rsplit(':', 1)[1]}"), "SERVING.md", "exec"), {})

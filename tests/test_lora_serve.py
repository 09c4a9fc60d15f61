"""LoRA over HTTP: the `loras` field, the batching key, and a replica switching sets between generate() calls.

The replica's batch handler runs here without Ray (the deployment's own class, called directly): the
grouping and the switching are plain Python, and the images are compared against a Runner with the same
LoRAs set.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from engine.serve import api
from tests.test_build import one_torch_thread  # noqa: F401 (an autouse fixture)

FAST = dict(height=64, width=64, num_inference_steps=2, guidance_scale=7.5)


def _request(photo, **fields):
    return api.build_request({"prompt": "a cat", "seed": 1, **FAST, **fields}, [photo], api.Limits(), 1)


def test_loras_field_parsing(photo):
    assert _request(photo).loras == ()
    assert _request(photo, loras=[["ink", 0.5], {"name": "paper"}]).loras == (("ink", 0.5), ("paper", 1.0))
    form = api.build_request(dict(prompt="a cat", loras="ink:0.5, paper"), [photo], api.Limits(), 1, from_form=True)
    assert form.loras == (("ink", 0.5), ("paper", 1.0))
    for bad, message in [("ink", "list"), ([["../etc/x", 1]], "no path"), ([["ink", float("nan")]], "finite"),
                         ([["ink", 1]] * 9, "at most 8")]:
        with pytest.raises(api.ApiError, match=message) as err:
            _request(photo, loras=bad)
        assert err.value.field == "loras"
    with pytest.raises(api.ApiError, match="loras field"):
        _request(photo, prompt="a cat <lora:ink:1>")
    assert api.batch_key(_request(photo, loras=[["ink", 0.5]])) != api.batch_key(_request(photo, loras=[["ink", 0.6]]))
    assert api.batch_key(_request(photo, loras=[["ink", 0.5]])) == api.batch_key(_request(photo, loras=[["ink", 0.5]], seed=2))


def test_replica_switches_between_calls_and_never_merges_sets(photo, lora_files, tmp_path):
    from engine import Runner
    from engine.serve.app import ControlNetServer

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(lora_files["unet_text"], folder / "ink.safetensors")
    shutil.copy(lora_files["second"], folder / "paper.safetensors")
    wrapper = ControlNetServer.func_or_class  # Serve's ingress wrapper (async __init__/__del__) around our class
    ours = next(c for c in wrapper.__mro__ if c.__name__ == "ControlNetServer" and c is not wrapper)
    server = ours(model="tiny", demo=False, batch_mode="merge", lora_dir=str(folder))
    sets = [(), (("ink", 0.8),), (), (("ink", 0.8), ("paper", -0.5)), (("ink", 0.8),)]
    requests = [_request(photo, loras=[list(x) for x in s], seed=i) for i, s in enumerate(sets)]
    outcomes = server._run_batch(requests)
    assert all(not isinstance(o, api.ApiError) for o in outcomes), outcomes
    assert all(o.merged <= 2 for o in outcomes) and outcomes[1].merged == 2  # only equal sets share a call
    reference = Runner(model="tiny", controlnet="canny", backend="torch", device="cpu")
    for req, outcome in zip(requests, outcomes):
        reference.set_loras([(str(folder / f"{name}.safetensors"), w) for name, w in req.loras])
        expected = reference.generate(req.prompt, photo, seed=req.seed, output_type="np", **FAST).images
        got = np.asarray(outcome.images[0], dtype=np.float64) / 255
        assert np.abs(got - expected[0]).max() <= 1 / 255 + 1e-6, req.loras
        assert [entry["name"] for entry in outcome.parameters["loras"]] == [name for name, _ in req.loras]
    assert server.stats.lora_switches == 2  # groups in order: () (already so), ink, ink + paper
    bad = server._run_batch([_request(photo, loras=[["missing", 1.0]])])[0]
    assert isinstance(bad, api.ApiError) and bad.status == 422 and bad.field == "loras"
    assert server.models()["loras"] == ["ink", "paper"]


# ---- failed switches and files changed on disk (issue #23), still without Ray ----------------------------


def _server_class():
    wrapper = __import__("engine.serve.app", fromlist=["ControlNetServer"]).ControlNetServer.func_or_class
    return next(c for c in wrapper.__mro__ if c.__name__ == "ControlNetServer" and c is not wrapper)


@pytest.fixture(scope="module")
def served(tmp_path_factory, lora_files):
    """One replica object (no Ray) over a LoRA folder holding ink (the small `second` LoRA) and words (the
    kohya file's text-encoder part: its switch writes the text encoder)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("served_loras")
    shutil.copy(lora_files["second"], folder / "ink.safetensors")
    text = {k: v for k, v in load_file(str(lora_files["kohya"])).items() if k.startswith("lora_te_")}
    save_file(text, str(folder / "words.safetensors"))
    return _server_class()(model="tiny", demo=False, lora_dir=str(folder)), folder


def _break_text_encoder_writes(monkeypatch, runner):
    """The next text-encoder write fails (a refit or a session rebuild that fails); the UNet's, and the undo's,
    go through."""
    real, left = runner.backend.set_weights, [1]

    def flaky(graph, weights):
        if graph == "text_encoder" and left[0]:
            left[0] -= 1
            raise RuntimeError("injected: refit failed")
        real(graph, weights)

    monkeypatch.setattr(runner.backend, "set_weights", flaky)


def test_failed_switch_fails_its_group_only(served, photo, monkeypatch):
    """A switch that fails with an error other than LoraError fails the requests of its group with the JSON
    error shape; the batch's other group runs, on the weights as they were before the failed switch."""
    server, _ = served
    plain = server._run_batch([_request(photo, seed=1)])[0]
    _break_text_encoder_writes(monkeypatch, server.runner)
    outcomes = server._run_batch([_request(photo, loras=[["words", 1.0]], seed=1), _request(photo, seed=1),
                                  _request(photo, loras=[["words", 1.0]], seed=2)])
    failed, plain_again, words = outcomes  # exact mode: one call, so one switch, per request of the words group
    assert isinstance(failed, api.ApiError) and failed.status == 500 and failed.field == "loras", outcomes
    assert "injected: refit failed" in failed.body()["error"]
    assert not isinstance(words, api.ApiError), words  # the next call of the group switched
    assert np.array_equal(np.asarray(plain_again.images[0]), np.asarray(plain.images[0]))


def test_lora_file_changed_on_disk_is_merged_again(served, photo, lora_files):
    """The same name, weight and path, a new file: the replica merges the new one (the set is keyed by the
    file's size and modification time too), as a fresh set_loras of that file gives."""
    import os

    server, folder = served
    target = folder / "ink.safetensors"
    first = server._run_batch([_request(photo, loras=[["ink", 1.0]], seed=3)])[0]
    shutil.copy(lora_files["unet_only"], target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new time even on coarse clocks
    second = server._run_batch([_request(photo, loras=[["ink", 1.0]], seed=3)])[0]
    assert not isinstance(second, api.ApiError), second
    server.runner.set_loras([(lora_files["unet_only"], 1.0)])
    expected = server.runner.generate("a cat", photo, seed=3, **FAST).images[0]
    server.runner.set_loras([])
    assert not np.array_equal(np.asarray(second.images[0]), np.asarray(first.images[0]))
    assert np.array_equal(np.asarray(second.images[0]), np.asarray(expected))


def test_a1111_failed_switch_answers_json_and_resets_progress(served, photo, monkeypatch):
    """On the A1111 routes (the replica's FastAPI app, in-process): a switch that fails answers A1111's error
    shape, and /sdapi/v1/progress goes back to idle instead of showing the job forever."""
    from starlette.testclient import TestClient

    server, _ = served
    client = TestClient(server.__serve_build_asgi_app__())
    _break_text_encoder_writes(monkeypatch, server.runner)
    body = dict(prompt="a cat <lora:words:1>", width=64, height=64, steps=2, seed=1)
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 500 and "injected: refit failed" in r.json()["detail"], r.text
    assert {"error", "detail", "field"} <= set(r.json())
    state = client.get("/sdapi/v1/progress").json()["state"]
    assert state["job_count"] == 0 and state["job"] == "", state

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

"""Engines built on first use (engine/engine_cache.py): Runner(backend="onnxruntime") without engine_dir
builds into ENGINE_CACHE once, two processes starting together build it once between them and both run it,
and the next start only loads it."""
from __future__ import annotations

import os
import subprocess
import sys

import PIL.Image
import pytest

from engine import manifest as mf
from tests.conftest import REPO

START = """
import sys
from engine import Runner
runner = Runner(model=sys.argv[1], controlnet=sys.argv[2], backend="onnxruntime")
result = runner.generate("a cat", image=sys.argv[3], num_inference_steps=2, height=64, width=64, seed=0)
print("ran", runner.backend.name, result.images[0].size)
"""


def _start(tiny_dir, cache, picture):
    env = {**os.environ, "ENGINE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", START, str(tiny_dir["model"]), str(tiny_dir["canny"]), str(picture)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def first_use(tmp_path_factory, tiny_dir, edges):
    """Two processes started together on an empty ENGINE_CACHE: (cache, picture, [(returncode, out, err)])."""
    tmp = tmp_path_factory.mktemp("first_use")
    picture = tmp / "edges.png"
    edges.save(picture)
    cache = tmp / "cache"
    procs = [_start(tiny_dir, cache, picture) for _ in range(2)]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    return cache, picture, [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def test_two_processes_build_one_engine_dir_then_reuse(first_use, tiny_dir, monkeypatch, capsys):
    cache, _, outputs = first_use
    for returncode, out, err in outputs:
        assert returncode == 0, err[-3000:]
        assert "ran onnxruntime (64, 64)" in out
    builders = [err for _, _, err in outputs if "building onnxruntime engines" in err]
    assert len(builders) == 1, "exactly one process builds; the other waits for the lock and loads it"
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert str(folder) in builders[0]  # the one log line names the folder
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, f"{folder.name}.lock"])  # no scratch left
    assert mf.load(folder).complete  # every file hashes as the manifest says

    from engine import Runner

    monkeypatch.setenv("ENGINE_CACHE", str(cache))
    runner = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="onnxruntime")
    assert "building" not in capsys.readouterr().err  # the next start only loads
    assert runner.parts.backend.engine_dir == folder


def test_cli_and_server_reuse_the_first_use_build(first_use, tiny_dir, tmp_path, monkeypatch):
    """The other interfaces reach the same cache: engine.generate --backend onnxruntime without --engine-dir,
    and the serve replica (POST /generate and the A1111 routes share its Runner) with backend="onnxruntime"."""
    cache, picture, _ = first_use
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    env = {**os.environ, "ENGINE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "cli.png"
    proc = subprocess.run([sys.executable, "-m", "engine.generate", "--backend", "onnxruntime", "--model",
                           str(tiny_dir["model"]), "--controlnet", str(tiny_dir["canny"]), "--prompt", "a cat",
                           "--image", str(picture), "--steps", "2", "--height", "64", "--width", "64", "--out",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building" not in proc.stderr and out.is_file()

    from engine.serve.app import ControlNetServer

    monkeypatch.setenv("ENGINE_CACHE", str(cache))
    replica_class = ControlNetServer.func_or_class.__mro__[1]  # the class itself, without Serve's ingress wrapper
    server = replica_class(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="onnxruntime",
                           demo=False, torch_threads=1)
    assert server.runner.backend.name == "onnxruntime" and server.runner.parts.backend.engine_dir == folder
    from fastapi.testclient import TestClient

    from tests.test_fewstep_serve import b64

    unit = dict(image=b64(PIL.Image.open(picture)), module="none", model=server.runner.controlnet_specs[0].name)
    response = TestClient(server.__serve_build_asgi_app__()).post("/sdapi/v1/txt2img", json=dict(
        prompt="a cat", steps=2, width=64, height=64, seed=1, alwayson_scripts={"controlnet": {"args": [unit]}}))
    assert response.status_code == 200, response.json()


def test_key_follows_the_sources_files(tmp_path, tiny_dir, monkeypatch):
    from engine.engine_cache import cache_key, cache_root

    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"1234")
    first = cache_key(str(model), ["canny"], [], "onnxruntime")
    assert first.startswith("model-") and first == cache_key(str(model), ["canny"], [], "onnxruntime")
    assert first != cache_key(str(model), ["canny"], [], "openvino")
    assert first != cache_key(str(model), ["canny"], ["madebyollin/taesd"], "onnxruntime")
    (model / "weights.bin").write_bytes(b"12345")  # changed weights: a new folder, never stale graphs
    assert first != cache_key(str(model), ["canny"], [], "onnxruntime")


def test_tensorrt_still_needs_an_engine_dir():
    from engine import Runner

    with pytest.raises(ValueError, match="pass engine_dir"):
        Runner(model="tiny", backend="tensorrt")

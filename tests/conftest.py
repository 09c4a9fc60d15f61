"""Shared fixtures (the tiny model saved to disk, the tiny engine dir, a control picture), each made once per
session (per worker under pytest-xdist), and how xdist spreads the modules over its workers."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Triton runs on the CPU only under its interpreter, chosen when triton is first imported (diffusers and
# torch may import it early): decide before anything else loads, and only where there is no GPU.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (the README's `-n auto`) each worker gets one OpenMP thread, set before torch loads and
# inherited by the CLIs the tests start: on 2 cores, two workers of 2 threads each took the suite 852 s against
# 583 s at one thread each (924 s without xdist), torch's OpenMP barriers stalling whenever a thread is
# descheduled (tests/test_flops.py 5 s -> 51 s).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The serving tests send bad requests by the dozen from one address (loopback), whose 4xx answers Serve's
# proxy would pace at 4 a second (engine/serve/proxy.py); the pacing has its own test (test_serve_limits.py).
os.environ.setdefault("ENGINE_PROXY_ERRORS_PER_S", "1000")

import numpy as np
import PIL.Image
import pytest

REPO = Path(__file__).resolve().parents[1]
# The modules that run a local Ray (test_serve's server, shared, or one of their own started in turn).
RAY_MODULES = {"test_serve", "test_serve_browser", "test_img2img_serve", "test_a1111", "test_serve_faults", "bench_serve"}
# The backends that run an engine dir's ONNX graphs, as a test parameter: OpenVINO where it is installed.
GRAPH_BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="openvino is not installed"))]
ASSETS = REPO / "engine" / "assets"


def run_fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter with the repository importable (for import-time behaviour)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: no error where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    """Under `-n N --dist loadfile` (README): each module runs whole in one worker, so its module fixtures
    (Runners, builds) are made once, and the modules that run a local Ray run in the same worker, one
    after another, as without xdist (two local Rays would share the 2 cores and 24 GB)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "ray" if Path(path).stem in RAY_MODULES else path

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> dict[str, Path]:
    """DIR/model (diffusers SD folder), DIR/controlnet-canny and DIR/controlnet-depth (two tiny nets)."""
    from engine.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny"), controlnets=("canny", "depth"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL model (engine.tiny "tiny-sdxl") as diffusers folders: DIR/model, two SDXL ControlNets
    (canny, depth) and a ControlNet-Union (union)."""
    from engine.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-sdxl"), controlnets=("canny", "depth"), preset="tiny-sdxl",
                     unions=("union",))


@pytest.fixture(scope="session")
def engine_dir(request, tmp_path_factory, tiny_dir) -> Path:
    """The session's tiny engine dir (canny + depth, for ONNX Runtime, sides 64-128, batch up to 3), built
    once (tests/test_build.staged_build) for every module that runs an engine dir's graphs."""
    from tests.test_build import staged_build

    return staged_build(request.config, tmp_path_factory.mktemp("build"), tiny_dir)["dir"]


@pytest.fixture(scope="session")
def engine_references(engine_dir):
    """(sd, nets): the torch modules the engine dir was exported from (engine.parity.load_references)."""
    from engine import manifest
    from engine.parity import load_references

    return load_references(manifest.load(engine_dir))


@pytest.fixture(scope="session")
def lora_files(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny LoRA files of the tiny model (tests/test_lora.save_lora_files): read, never changed, by the
    LoRA tests of the runner, CLI, graphs and both HTTP APIs."""
    from tests.test_lora import save_lora_files

    return save_lora_files(tiny_dir, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="session")
def photo() -> PIL.Image.Image:
    """The example photo at 128x128: big enough for edges, small enough to keep tests fast."""
    with PIL.Image.open(ASSETS / "astronaut.png") as im:
        return im.convert("RGB").resize((128, 128), PIL.Image.LANCZOS)


@pytest.fixture(scope="session")
def edges(photo) -> PIL.Image.Image:
    from engine.preprocess import canny

    return canny(photo)


def max_errors(actual, expected) -> tuple[float, float]:
    """(max abs error, max abs error / max abs reference) between two arrays or tensors."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    abs_err = float(np.abs(a - e).max())
    return abs_err, abs_err / max(float(np.abs(e).max()), 1e-30)

"""Shared fixtures: the tiny model saved to disk once per session, and a raw control picture."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Triton runs on the CPU only under its interpreter, chosen when triton is first imported (diffusers and
# torch may import it early): decide before anything else loads, and only where there is no GPU.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import PIL.Image
import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "engine" / "assets"


def run_fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter with the repository importable (for import-time behaviour)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def start_local_serve() -> int:
    """Ray (2 CPUs, the repository importable in its workers) and Serve's HTTP proxy on a free loopback
    port; returns the port. The caller deploys its apps and shuts both down."""
    import socket

    import ray
    from ray import serve

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> dict[str, Path]:
    """DIR/model (diffusers SD folder), DIR/controlnet-canny and DIR/controlnet-depth (two tiny nets)."""
    from engine.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny"), controlnets=("canny", "depth"))


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

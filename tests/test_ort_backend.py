"""What is particular to the ONNX Runtime backend: its provider, and the engine dir's backend choice. Its
parity with the torch reference (per graph and whole generations) is tests/test_graph_backends.py's, with
OpenVINO's."""
from __future__ import annotations

import pytest

from engine import manifest as mf
from tests.test_build import one_torch_thread  # noqa: F401 (a fixture)


def test_cpu_provider(engine_dir):
    from engine import Runner
    from engine.backends.onnxruntime_backend import OrtModel

    artefact = mf.load(engine_dir).artefact("text_encoder")
    assert OrtModel(engine_dir / artefact.onnx, artefact).provider == "CPUExecutionProvider"
    runner = Runner(engine_dir=str(engine_dir), backend="onnxruntime")
    assert set(runner.backend.providers.values()) == {"CPUExecutionProvider"}


def test_torch_backend_with_engine_dir_refused(engine_dir):
    from engine import Runner

    with pytest.raises(ValueError, match="leave engine_dir unset"):
        Runner(engine_dir=str(engine_dir), backend="torch")


def test_auto_backend_runs_what_was_built(engine_dir, tiny_dir):
    from engine import Runner

    runner = Runner(engine_dir=str(engine_dir), controlnet=str(tiny_dir["depth"]))
    assert runner.backend.name == "onnxruntime" and runner.num_controlnets == 1

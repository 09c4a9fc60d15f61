"""LoRA on an engine dir, in ONNX Runtime and in OpenVINO: the built graphs with replaced initializers equal
the torch backend after several switches, with no export (the files stay untouched, the exporter is never
called)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from engine import manifest as mf
from tests.conftest import GRAPH_BACKENDS, max_errors
from tests.test_build import one_torch_thread  # noqa: F401 (a fixture)
from tests.test_lora import GEN, control, ours  # noqa: F401 (fixtures)

TOL = 1e-4  # fp32, max abs: ONNX Runtime against torch


def test_manifest_records_where_each_weight_is(engine_dir):
    manifest = mf.load(engine_dir)
    for graph in ("unet", "text_encoder"):
        artefact = manifest.artefact(graph)
        assert artefact.weights, graph
        # Every linear and conv weight (what LoRAs target) is reachable; what is not holds a constant value.
        assert not [n for n in artefact.unreachable_weights if n.endswith(".weight") and "norm" not in n], graph
        transposed = [n for n, layout in artefact.weight_layouts.items() if layout["transpose"]]
        print(f"{graph}: {len(artefact.weights)} weights mapped ({len(transposed)} transposed by the exporter), "
              f"{len(artefact.unreachable_weights)} unreachable")
    assert manifest.artefact("unet").weight_layouts["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"][
        "transpose"]


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_switches_equal_torch_without_export(engine_dir, tiny_dir, lora_files, control, monkeypatch, backend):
    import torch

    from engine import Runner

    def no_export(*args, **kwargs):
        raise AssertionError("a LoRA switch must not export")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    files = {p.name: p.stat().st_mtime_ns for p in engine_dir.iterdir() if p.is_file()}
    net = [str(tiny_dir["canny"])]
    graphs = Runner(engine_dir=str(engine_dir), controlnet=net, backend=backend)
    reference = Runner(model=str(tiny_dir["model"]), controlnet=net, backend="torch", device="cpu")
    base = ours(graphs, control)
    f = lora_files
    for label, loras in [("unet+te 1.0", [(f["unet_text"], 1.0)]),
                         ("two 0.7 / -0.4", [(f["unet_only"], 0.7), (f["second"], -0.4)]),
                         ("kohya 0.8", [(f["kohya"], 0.8)]),
                         ("none", [])]:
        start = time.perf_counter()
        graphs.set_loras(loras)
        switch = time.perf_counter() - start
        reference.set_loras(loras)
        image = ours(graphs, control)
        abs_err, _ = max_errors(image, ours(reference, control))
        print(f"{backend} lora {label}: switch {switch * 1e3:.0f} ms, max abs vs torch {abs_err:.2e}")
        assert abs_err <= TOL, label
        if loras:
            assert max_errors(image, base)[0] > 100 * TOL, label
    assert np.array_equal(image, base), "[] gives the built graphs' own image"
    assert files == {p.name: p.stat().st_mtime_ns for p in engine_dir.iterdir() if p.is_file()}


def test_unreachable_and_old_dirs_refused(engine_dir):
    from engine.backends.onnxruntime_backend import OrtBackend
    from engine.lora import LoraError

    manifest = mf.load(engine_dir)
    backend = OrtBackend(engine_dir, manifest, [0])
    unreachable = manifest.artefact("unet").unreachable_weights[0]
    with pytest.raises(LoraError, match="cannot reach"):
        backend.get_weights("unet", [unreachable])
    with pytest.raises(LoraError, match="another architecture"):
        backend.get_weights("unet", ["down_blocks.9.attentions.0.proj_in.weight"])
    manifest.artefact("unet").weights = {}
    with pytest.raises(LoraError, match="rebuild"):
        backend.get_weights("unet", ["conv_in.weight"])

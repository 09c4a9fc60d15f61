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
from tests.test_lora import GEN, control, ours, small_file  # noqa: F401 (fixtures)

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


# ---- a switch that fails in the runtime itself is undone on every graph (issue #23) ------------------------


def _fail_next_text_encoder_set(monkeypatch, backend_name: str, backend) -> None:
    """The next text-encoder update fails inside the runtime: ONNX Runtime refuses the rebuilt session;
    OpenVINO fails part way through replacing the constants (one replaced, then an error)."""
    left = [1]
    if backend_name == "onnxruntime":
        import onnxruntime

        real = onnxruntime.InferenceSession

        def session(model, *args, **kwargs):
            if isinstance(model, bytes) and b"input_ids" in model and left[0]:  # the text encoder's graph
                left[0] -= 1
                raise RuntimeError("injected: ONNX Runtime rejected an initializer")
            return real(model, *args, **kwargs)

        monkeypatch.setattr(onnxruntime, "InferenceSession", session)
        return
    import openvino

    te, real_set, real_constant = backend.text_encoder, backend.text_encoder.set_initializers, openvino.op.Constant

    def set_initializers(named):
        made = [0]

        def constant(*args, **kwargs):
            made[0] += 1
            if made[0] == 2 and left[0]:
                left[0] -= 1
                raise RuntimeError("injected: OpenVINO failed part way")
            return real_constant(*args, **kwargs)

        monkeypatch.setattr(openvino.op, "Constant", constant)
        try:
            real_set(named)
        finally:
            monkeypatch.setattr(openvino.op, "Constant", real_constant)

    monkeypatch.setattr(te, "set_initializers", set_initializers)


def _held(backend_name: str, model, names) -> dict:
    """The values the runtime holds for these initializers: ONNX Runtime's replacements (else the file's),
    OpenVINO's constants."""
    from engine.backends.onnxruntime_backend import graph_initializers

    if backend_name == "openvino":
        constants = model.constants()
        return {n: constants[n].get_data().copy() for n in names}
    held = {n: model.replaced[n][0].copy() for n in names if n in model.replaced}
    return {**dict(graph_initializers(model.path, set(names) - set(held))), **held}


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_failed_switch_is_undone_on_the_graphs(engine_dir, tiny_dir, small_file, monkeypatch, backend):
    """UNet written, text encoder refused by the runtime: both graphs hold the previous set's values again,
    bit for bit (ONNX Runtime keeps no array of the failed set), and the next switch goes through."""
    from engine import Runner

    graphs = Runner(engine_dir=str(engine_dir), controlnet=[str(tiny_dir["canny"])], backend=backend)
    graphs.set_loras([(small_file, 0.5)])
    models = {"unet": graphs.backend.unet_model, "text_encoder": graphs.backend.text_encoder}
    names = {g: [graphs.backend.manifest.artefact(g).weights[p] for p in graphs.loras.changed[g]] for g in models}
    before = {g: _held(backend, m, names[g]) for g, m in models.items()}
    _fail_next_text_encoder_set(monkeypatch, backend, graphs.backend)
    with pytest.raises(RuntimeError, match="injected"):
        graphs.set_loras([(small_file, -0.8)])
    assert [(lora.source, w) for lora, w in graphs.loras.active] == [(str(small_file), 0.5)]
    for graph, model in models.items():
        after = _held(backend, model, names[graph])
        assert all(np.array_equal(after[n], before[graph][n]) for n in names[graph]), graph
    assert graphs.set_loras([(small_file, -0.8)])
    changed = _held(backend, models["text_encoder"], names["text_encoder"])
    assert not all(np.array_equal(changed[n], before["text_encoder"][n]) for n in names["text_encoder"])


def test_failed_refit_is_undone_on_tensorrt_plans(engine_dir, small_file, monkeypatch, tmp_path):
    """The same with TensorRT (tests/trt_fakes.py, over the tiny engine dir's weight map): the text encoder's
    refit_cuda_engine fails, leaving its plan holding the failed set's weights (TensorRT may); afterwards every
    weight either plan was refitted with holds its value from before the switch (the base where it had none)."""
    import torch

    from engine.backends import tensorrt_backend as tb
    from engine.backends.onnxruntime_backend import GraphBackend, graph_initializers
    from engine.lora import LoraSwitch
    from tests.trt_fakes import fake_tensorrt

    manifest = mf.load(engine_dir)
    artefacts = {g: manifest.artefact(g) for g in ("unet", "text_encoder")}
    trt, _ = fake_tensorrt(11, refittable_weights={n for a in artefacts.values() for n in a.weights.values()})
    runtime = tb.TrtRuntime(trt, tb.TrtRunConfig(cuda_graphs=False), device=torch.device("cpu"))
    runtime.runtime.engine_setup = ({}, None)
    plan = tmp_path / "stand_in.plan"
    plan.write_bytes(b"PLAN")
    monkeypatch.setattr(tb, "check_engine_io", lambda *args: None)  # one fake plan stands for every graph
    backend = GraphBackend(manifest, [0], lambda artefact: tb.TrtModel(runtime, plan, artefact), engine_dir)
    held = {g: {} for g in artefacts}  # what each plan's refittable weights hold after each refit
    engines = {id(backend.unet_model.engine): "unet", id(backend.text_encoder.engine): "text_encoder"}
    left = [0]  # refits of the text encoder's plan still to fail

    class Refitter(trt.Refitter):
        def refit_cuda_engine(self):
            graph = engines[id(self.engine)]
            held[graph].update({n: w.array.copy() for n, w in self.set.items()})
            if graph == "text_encoder" and left[0]:
                left[0] -= 1
                return False
            return super().refit_cuda_engine()

    trt.Refitter = Refitter
    switch = LoraSwitch(backend)
    switch.set([(small_file, 0.5)])
    before = {g: dict(v) for g, v in held.items()}
    left[0] = 1
    with pytest.raises(RuntimeError, match="refit_cuda_engine failed"):
        switch.set([(small_file, -0.8)])
    assert [(lora.source, w) for lora, w in switch.active] == [(str(small_file), 0.5)]
    for graph, artefact in artefacts.items():
        new = set(held[graph]) - set(before[graph])
        base = dict(graph_initializers(engine_dir / artefact.onnx, new))
        for name, value in held[graph].items():
            assert np.array_equal(value, before[graph].get(name, base.get(name))), (graph, name)

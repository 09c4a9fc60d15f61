"""The I/O spec against the real modules, and the ONNX export's variants on small tiny graphs: external
data, fp16, and with/without the onnxslim clean-up."""
from __future__ import annotations

import pytest
import torch

from engine.manifest import Artefact
from export import onnx_export
from export.spec import build_specs, model_config
from tests.test_build import one_torch_thread  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def tiny_models():
    from engine.loading import load_controlnet, load_sd
    from engine.registry import resolve

    sd = load_sd("tiny", torch.device("cpu"), torch.float32)
    net = load_controlnet(resolve("canny"), sd, torch.device("cpu"), torch.float32)
    return sd, net


def test_spec_matches_module_outputs(tiny_models):
    """The spec's residual dims are what ControlNetBody really returns (non-square, batch 3)."""
    from engine.modules import ControlNetBody, HintEncoder
    from engine.parity import sample_feeds

    sd, net = tiny_models
    config = model_config(sd, [net])
    assert config.num_residuals == 13 and config.size_multiple == 64
    specs = {s.kind: s for s in build_specs(config, [("canny", False)], "fp32")}
    point = dict(B=3, h=8, w=16)
    hint = specs["hint_encoder"]
    feeds = sample_feeds(list(hint.inputs), point, config.vocab_size)
    with torch.inference_mode():
        out = HintEncoder(net)(feeds["control_map"])
    assert tuple(out.shape) == hint.outputs[0].shape(point)
    body = specs["controlnet"]
    feeds = sample_feeds(list(body.inputs), point, config.vocab_size)
    with torch.inference_mode():
        outs = ControlNetBody(net)(*[feeds[io.name] for io in body.inputs])
    assert [tuple(o.shape) for o in outs] == [io.shape(point) for io in body.outputs]
    assert [io.shape(point) for io in specs["unet"].inputs[3:]] == [tuple(o.shape) for o in outs]


def _export_and_compare(sd, net, kind, precision, tmp_path, config, graph=None):
    """Export `kind` as the build does (onnx_export.for_precision) and compare the graph, run by `graph`
    (OrtModel by default), with the fp32 module; net None: a model without ControlNet (text encoders)."""
    from engine.backends.onnxruntime_backend import OrtModel
    from engine.parity import compare, reference_module, sample_feeds

    nets = [] if net is None else [net]
    mc = model_config(sd, nets)
    spec = next(s for s in build_specs(mc, [("canny", False)] if nets else [], precision) if s.kind == kind)
    export_module = onnx_export.for_precision(reference_module(kind, sd, net), kind, precision)
    point = dict(B=2, h=8, w=8)
    feeds = sample_feeds(list(spec.inputs), point, mc.vocab_size)
    args = tuple(feeds[io.name].to(getattr(torch, io.dtype)) for io in spec.inputs)
    files = onnx_export.export(export_module, spec, args, tmp_path, config)
    artefact = Artefact(spec.name, kind, spec.net, files[0].name, {}, list(spec.inputs), list(spec.outputs), {}, "")
    reference = reference_module(kind, sd, net).float()
    run = (graph or OrtModel)(files[0], artefact).run
    return files, compare(reference, run, artefact, dict(B=3, h=8, w=16), mc.vocab_size)


def test_external_data_without_slim(tiny_models, tmp_path):
    sd, net = tiny_models
    config = onnx_export.ExportConfig(slim=False, external_data_bytes=0)
    files, errors = _export_and_compare(sd, net, "text_encoder", "fp32", tmp_path, config)
    assert [f.name for f in files] == ["text_encoder.onnx", "text_encoder.onnx.data"]
    assert files[0].stat().st_size < files[1].stat().st_size  # the weights live in the data file
    assert not (tmp_path / "raw").exists()
    assert errors["max_abs"] < 1e-4


def test_fp16_export(tiny_models, tmp_path):
    sd, net = tiny_models
    files, errors = _export_and_compare(sd, net, "hint_encoder", "fp16", tmp_path, onnx_export.ExportConfig())
    import onnx

    graph = onnx.load(str(files[0]))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert errors["max_rel"] < 1e-2  # fp16 graph against the fp32 reference


def test_export_refuses_a_graph_unlike_its_spec(tiny_models, tmp_path):
    """The runtime binds by the spec's names: a graph with other outputs must not reach the engine dir."""
    sd, _ = tiny_models
    spec = next(s for s in build_specs(model_config(sd, []), [], "fp32") if s.kind == "text_encoder")

    class TwoOutputs(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids.float() + 1.0, input_ids.float() * 2.0

    with pytest.raises(ValueError, match="the spec says"):
        onnx_export.export(TwoOutputs(), spec, (torch.zeros(2, 77, dtype=torch.int64),), tmp_path,
                           onnx_export.ExportConfig(slim=False))


def test_fp16_engine_dir_end_to_end(tiny_dir, tmp_path, photo):
    """--precision fp16: every graph verified against the fp32 reference; a generation stays close to the
    fp32 torch image (fp16 rounding, not a bug, is the difference)."""
    import numpy as np

    from engine import Runner
    from engine.build import main

    out = tmp_path / "fp16"
    code = main(["--model", str(tiny_dir["model"]), "--controlnet", str(tiny_dir["canny"]), "--out", str(out),
                 "--precision", "fp16", "--min-size", "64", "--max-size", "128", "--no-progress"])
    assert code == 0
    kwargs = dict(prompt="a photo", image=[photo], preprocess=False, num_inference_steps=4, height=64, width=64,
                  seed=0, output_type="np")
    runner = Runner(engine_dir=str(out))
    assert runner.dtype == torch.float16
    got = runner.generate(**kwargs).images
    want = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="torch",
                  device="cpu").generate(**kwargs).images
    assert float(np.abs(got - want).max()) < 1e-2


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp16_sdxl_text_encoders_load_and_match(tmp_path, backend):
    """An fp16 build exports both SDXL text encoders fp32 inside (for_precision): cast whole, the second
    CLIP's LayerNorms were fed fp32 and fp16 at once and OpenVINO refused the graph (`engine.build --model
    <SDXL> --precision fp16`)."""
    from engine.backends.onnxruntime_backend import OrtModel
    from engine.backends.openvino_backend import OvModel
    from engine.loading import load_sd

    sd = load_sd("tiny-sdxl", torch.device("cpu"), torch.float32)
    for kind in ("text_encoder", "text_encoder_2"):
        _, errors = _export_and_compare(sd, None, kind, "fp16", tmp_path, onnx_export.ExportConfig(),
                                        OrtModel if backend == "onnxruntime" else OvModel)
        print(f"\n{backend} fp16 {kind}: max abs {errors['max_abs']:.2e}, max rel {errors['max_rel']:.2e}")
        assert errors["max_rel"] < 1e-2  # fp16 outputs against the fp32 reference

"""SDXL on the graph backends: a tiny SDXL engine dir (a plain ControlNet and a ControlNet-Union, exported through
the family's I/O spec: text_encoder_2, text_embeds and time_ids, the union's control_type inputs) run by ONNX
Runtime and OpenVINO equals the torch backend over the same folders (which equals diffusers: tests/test_sdxl.py),
fp32, max abs <= 1e-4: txt2img with both nets and two union conditions, guess mode, windows, img2img, inpaint, and
SDXL LoRAs (diffusers and kohya files) switched on the graphs without rebuilding. The build verifies every graph
against its torch module as for SD1.5.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from tests.conftest import max_errors
from tests.test_build import torch_threads

TOL = 1e-4
BASE = dict(prompt="a photo of the astronaut", negative_prompt="blurry", num_inference_steps=3, height=64, width=64,
            seed=0, output_type="np", preprocess=False)


def _picture(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


def build_sdxl(tiny_sdxl_dir, out, backend: str = "onnxruntime"):
    """The tiny SDXL model with its canny net and its union net, built into `out` (sides 64-128, batch 2)."""
    from export.build import BuildConfig, build
    from export.spec import Sizes

    with torch_threads(1):
        return build(BuildConfig(controlnets=(str(tiny_sdxl_dir["canny"]), str(tiny_sdxl_dir["union"])),
                                 model=str(tiny_sdxl_dir["model"]), out=out, backend=backend,
                                 sizes=Sizes(64, 64, 128, 2), progress=False), log=lambda *a: None)


@pytest.fixture(scope="module")
def sdxl_engine(tiny_sdxl_dir, tmp_path_factory):
    """build_sdxl for ONNX Runtime."""
    out = tmp_path_factory.mktemp("sdxl-engine") / "engine"
    return dict(dir=out, result=build_sdxl(tiny_sdxl_dir, out))


@pytest.fixture(scope="module")
def torch_runner(tiny_sdxl_dir):
    from engine import Runner

    return Runner(model=str(tiny_sdxl_dir["model"]),
                  controlnet=[str(tiny_sdxl_dir["canny"]), str(tiny_sdxl_dir["union"])], device="cpu")


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def graph_runner(request, sdxl_engine):
    from engine import Runner

    if request.param == "openvino":
        pytest.importorskip("openvino")
    return Runner(engine_dir=str(sdxl_engine["dir"]), backend=request.param)


def test_build_verified_every_graph(sdxl_engine):
    from engine import manifest as mf

    result = sdxl_engine["result"]
    assert result.ok, result.rows
    manifest = mf.load(sdxl_engine["dir"])
    assert manifest.has("text_encoder_2")
    unet_inputs = [io.name for io in manifest.artefact("unet").inputs]
    assert unet_inputs[:5] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert len([n for n in unet_inputs if n == "mid" or n.startswith("down_")]) == 10  # SDXL's residuals
    union = [io.name for io in manifest.artefact("controlnet", "controlnet-union").inputs]
    assert "control_type" in union and union[-2:] == ["hint", "scales"]
    assert [n.get("union") for n in manifest.controlnets] == [None, 6]


CASES = {
    "two_nets_two_union_conditions": dict(
        image=["edges", "photo", "edges"], control_type=[None, ["depth", "canny"]],
        controlnet_conditioning_scale=[0.8, 0.6, 1.2], control_guidance_start=[0.0, 0.0, 0.4],
        control_guidance_end=[1.0, 0.6, 1.0]),
    "union_one_condition_guess_mode": dict(image=["edges", "photo"], control_type=[None, "openpose"], guess_mode=True),
    "img2img": dict(image=["edges", "photo"], control_type=[None, "depth"], init_image="photo", strength=0.7),
    "inpaint": dict(image=["edges", "photo"], control_type=[None, "depth"], init_image="photo", mask_image="mask"),
}


def case_kwargs(case: str) -> dict:
    """generate's arguments of one of CASES, its pictures made."""
    pictures = dict(edges=_picture(1), photo=_picture(2), mask=_picture(3).convert("L"))
    return {k: ([pictures[i] for i in v] if k == "image" else pictures[v] if isinstance(v, str) and v in pictures
                else v) for k, v in CASES[case].items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graphs_equal_torch(graph_runner, torch_runner, case):
    kwargs = case_kwargs(case)
    ours = graph_runner.generate(**BASE, **kwargs).images
    expected = torch_runner.generate(**BASE, **kwargs).images
    abs_err = max_errors(ours, expected)[0]
    print(f"sdxl {type(graph_runner.backend).__name__} {case}: max abs vs torch {abs_err:.2e}")
    assert abs_err <= TOL


@pytest.fixture(scope="module")
def lora_files(tiny_sdxl_dir, tmp_path_factory):
    from tests.test_sdxl_lora import save_sdxl_lora_files

    return save_sdxl_lora_files(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl-graph-loras"))


def test_loras_switch_on_graphs(graph_runner, torch_runner, lora_files):
    """The first text encoder's last layer is not in its graph (SDXL uses its penultimate states): the build
    records it as unused, and a LoRA's change to it is dropped there, as it cannot change an image."""
    files = lora_files
    kwargs = dict(image=[_picture(1), _picture(2)], control_type=[None, "depth"])
    base = graph_runner.generate(**BASE, **kwargs).images
    try:
        for loras in ([(str(files["diffusers"]), 0.8)], [(str(files["kohya"]), -0.6), (str(files["kohya_sgm"]), 0.5)]):
            graph_runner.set_loras(loras)
            torch_runner.set_loras(loras)
            ours, expected = graph_runner.generate(**BASE, **kwargs).images, torch_runner.generate(**BASE, **kwargs).images
            abs_err = max_errors(ours, expected)[0]
            print(f"sdxl {type(graph_runner.backend).__name__} lora {loras}: max abs vs torch {abs_err:.2e}")
            assert abs_err <= TOL and max_errors(ours, base)[0] > 1e-3
    finally:
        graph_runner.set_loras([])
        torch_runner.set_loras([])
    assert max_errors(graph_runner.generate(**BASE, **kwargs).images, base)[0] <= 1e-6

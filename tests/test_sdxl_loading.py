"""SDXL loading: the family read from the model's own config, SDXL registry names, the tiny-sdxl preset, and
refusing a ControlNet of the other family (naming both) before any weight is read."""
from __future__ import annotations

import pytest
import torch

from engine import loading
from engine.registry import resolve


def test_family_from_config(tiny_dir, tiny_sdxl_dir, tmp_path):
    from safetensors.torch import save_file

    assert loading.model_family(str(tiny_sdxl_dir["model"])) == "sdxl"
    assert loading.model_family(str(tiny_dir["model"])) == "sd15"
    assert loading.model_family("tiny-sdxl") == "sdxl" and loading.model_family("tiny") == "sd15"
    single = tmp_path / "sdxl.safetensors"  # an original-format SDXL checkpoint has the second text encoder
    save_file({loading.SDXL_CHECKPOINT_KEY: torch.zeros(1)}, str(single))
    assert loading.model_family(str(single)) == "sdxl"


def test_sdxl_registry_names():
    spec = resolve("sdxl-canny")
    assert (spec.source, spec.family, spec.preprocessor, spec.union) == (
        "diffusers/controlnet-canny-sdxl-1.0", "sdxl", "canny", False)
    assert resolve("diffusers/controlnet-canny-sdxl-1.0-small").name == "sdxl-canny-small"
    assert resolve("xinsir/controlnet-openpose-sdxl-1.0").preprocessor == "openpose"
    assert resolve("xinsir-union").union and resolve("xinsir-union-promax").union
    assert resolve("canny").family == "sd15"


def test_tiny_sdxl_preset_with_registry_nets():
    from engine import Runner

    runner = Runner(model="tiny-sdxl", controlnet=["sdxl-canny", "xinsir-union"], device="cpu")
    assert runner.family.name == "sdxl" and runner.num_residuals == 10 and runner.parts.unions == [None, 6]
    result = runner.generate("a cat", image=["engine/assets/astronaut.png"] * 2,
                             control_type=[None, "canny"], height=64, width=64, num_inference_steps=2,
                             output_type="np", seed=0)
    assert result.images.shape == (1, 64, 64, 3)
    assert result.parameters["guidance_scale"] == 5.0  # the SDXL pipelines' default
    assert Runner(model="tiny-sdxl", device="cpu").controlnet_specs[0].name == "sdxl-canny"  # the family's default


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights load."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the family check")

    monkeypatch.setattr("engine.parts.load_sd", refuse)


def test_sd15_controlnet_with_sdxl_model_refused_before_loading(tiny_dir, tiny_sdxl_dir, no_weights):
    from engine import Runner

    with pytest.raises(ValueError, match=r"is an SD1\.5 ControlNet and model .* is SDXL"):
        Runner(model=str(tiny_sdxl_dir["model"]), controlnet=str(tiny_dir["canny"]), device="cpu")
    with pytest.raises(ValueError, match=r"'canny' is an SD1\.5 ControlNet and model 'tiny-sdxl' is SDXL"):
        Runner(model="tiny-sdxl", controlnet="canny", device="cpu")


def test_sdxl_controlnet_with_sd15_model_refused_before_loading(tiny_dir, tiny_sdxl_dir, no_weights):
    from engine import Runner

    for net in (str(tiny_sdxl_dir["canny"]), str(tiny_sdxl_dir["union"]), "xinsir-union"):
        with pytest.raises(ValueError, match=r"is an SDXL ControlNet and model .* is SD1\.5"):
            Runner(model=str(tiny_dir["model"]), controlnet=net, device="cpu")


def test_sdxl_folder_missing_second_encoder(tiny_sdxl_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl_dir["model"], folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        loading.load_sd(str(folder), torch.device("cpu"), torch.float32)


def test_union_arguments_checked(tiny_sdxl_dir, edges):
    from engine import Runner

    runner = Runner(model=str(tiny_sdxl_dir["model"]), controlnet=[str(tiny_sdxl_dir["canny"]),
                                                                    str(tiny_sdxl_dir["union"])], device="cpu")
    bad = [
        (dict(control_type=None), "is a ControlNet-Union: give control_type"),
        (dict(control_type=["canny", "depth"]), "is for ControlNet-Union nets"),
        (dict(control_type=[None, "tile"]), "not one of ControlNet"),  # tile is ProMax's (index 6 of 6 types)
        (dict(control_type=[None, "sketchy"]), "must be a ControlNet-Union type"),
        (dict(control_type=[None, ["canny", "depth"]]), "got 2 control images for 3"),
        (dict(control_type=[None, "canny"], original_size=(64,)), "original_size must be"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            runner.prepare("a cat", image=[edges, edges], **kwargs)


def test_sdxl_arguments_refused_by_sd15(tiny_dir, edges):
    from engine import Runner

    runner = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), device="cpu")
    with pytest.raises(ValueError, match="prompt_2 is an SDXL argument"):
        runner.prepare("a cat", image=edges, prompt_2="x")


def test_cli_union_type_and_sdxl_arguments_round_trip(tiny_sdxl_dir, tmp_path):
    """`python -m engine.generate` with --control-type and SDXL's flags equals the Runner, and --from-png
    (which records them: "Union Control Type", "SDXL conditioning") makes the same pixels."""
    import numpy as np
    import PIL.Image

    from engine import Runner, generate, pngmeta

    rng = np.random.default_rng(0)
    control = tmp_path / "control.png"
    PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(control)
    nets = [str(tiny_sdxl_dir["canny"]), str(tiny_sdxl_dir["union"])]
    out, again = tmp_path / "out.png", tmp_path / "again.png"
    flags = ["--model", str(tiny_sdxl_dir["model"]), "--controlnet", nets[0], "--controlnet", nets[1],
             "--control-type", "none", "--control-type", "depth", "--image", str(control), "--preprocess", "none",
             "--prompt", "a cat", "--prompt-2", "a painting", "--original-size", "96,80", "--steps", "2",
             "--seed", "4", "--device", "cpu", "--quiet", "--out", str(out)]
    assert generate.main(flags) == 0
    p = pngmeta.read_parameters(out)
    assert p["control_type"] == [None, "depth"]
    assert p["sdxl"] == {"prompt_2": "a painting", "original_size": (96, 80)}
    expected = Runner(model=str(tiny_sdxl_dir["model"]), controlnet=nets, device="cpu").generate(
        "a cat", image=[str(control)] * 2, control_type=[None, "depth"], prompt_2="a painting",
        original_size=(96, 80), num_inference_steps=2, seed=4, preprocess=False).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))
    assert generate.main(["--from-png", str(out), "--device", "cpu", "--quiet", "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(again)), np.asarray(PIL.Image.open(out)))


def test_http_control_type_reaches_the_runner():
    """POST /generate's control_type (JSON and form forms) becomes Runner.generate's; a bad type is a 422 naming
    the field."""
    import PIL.Image

    from engine.serve import api

    image = PIL.Image.new("RGB", (64, 64))
    for fields, from_form, expected in (({"control_type": [None, "depth"]}, False, [None, "depth"]),
                                        ({"control_type": "none,3"}, True, [None, 3]),
                                        ({"control_type": "[null, 1]"}, True, [None, 1]),
                                        ({"control_type": "canny"}, False, "canny")):
        req = api.build_request({"prompt": "a cat", **fields}, [image, image], api.Limits(), 2, from_form=from_form)
        assert api.runner_kwargs(req, ["canny", None])["control_type"] == expected
        assert hash(api.batch_key(req)) is not None
    with pytest.raises(api.ApiError, match="control_type must be a ControlNet-Union type") as err:
        api.build_request({"prompt": "a cat", "control_type": ["sketchy"]}, [image], api.Limits(), 1)
    assert err.value.field == "control_type"


def test_a1111_unit_union_type(tiny_sdxl_dir, edges):
    """An A1111 unit on a ControlNet-Union: its union_control_type (the extension's names) or its module's type
    becomes Runner.generate's control_type; a union unit with no type, or a type on a plain net, is a 422."""
    import base64
    import io

    from engine import Runner
    from engine.serve.a1111.models import Txt2ImgRequest
    from engine.serve.a1111.plan import PromptTokenizer, plan_request
    from engine.serve.api import ApiError, Limits

    runner = Runner(model=str(tiny_sdxl_dir["model"]), controlnet=[str(tiny_sdxl_dir["canny"]),
                                                                    str(tiny_sdxl_dir["union"])], device="cpu")
    buf = io.BytesIO()
    edges.resize((64, 64)).save(buf, format="PNG")
    picture = base64.b64encode(buf.getvalue()).decode()
    union = runner.controlnet_specs[1].name

    def plan(**unit):
        args = [{**dict(image=picture, model=union, module="none"), **unit}]
        req = Txt2ImgRequest(prompt="a cat", width=64, height=64, steps=2,
                             alwayson_scripts={"controlnet": {"args": args}})
        return plan_request(req, runner, Limits(), PromptTokenizer(runner.tokenizer))

    assert plan(union_control_type="Depth").runner_kwargs["control_type"] == [None, 1]
    # width/height left out follow the model: SDXL 1024 (SD1.5 512, A1111's own defaults)
    from types import SimpleNamespace

    from engine.families import SD15
    from engine.serve.a1111.plan import with_model_size

    left_out = Txt2ImgRequest(prompt="a cat")
    assert (with_model_size(left_out, runner).width, with_model_size(left_out, runner).height) == (1024, 1024)
    assert with_model_size(left_out, SimpleNamespace(family=SD15(None))).width == 512
    assert with_model_size(Txt2ImgRequest(prompt="a cat", width=64, height=128), runner).height == 128
    assert plan(module="canny").runner_kwargs["control_type"] == [None, 3]
    with pytest.raises(ApiError, match="implies no control type"):
        plan()
    with pytest.raises(ApiError, match="must be one of OpenPose"):
        plan(union_control_type="Tile")  # ProMax's; this union has 6 types
    with pytest.raises(ApiError, match="is a plain ControlNet"):
        plan(union_control_type="Depth", model=runner.controlnet_specs[0].name)

"""img2img and inpainting on an engine dir equal the torch backend (fp32, max abs <= 1e-4) in ONNX Runtime
and in OpenVINO (the same ONNX files), with the 4-channel model (the session's shared build) and a
9-channel inpainting model (its own build); an engine dir without a VAE encoder refuses img2img with a
rebuild hint."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import PIL.Image
import pytest

from engine import manifest as mf
from tests.conftest import GRAPH_BACKENDS, max_errors
from tests.test_build import _cli, one_torch_thread  # noqa: F401 (a fixture)
from tests.test_img2img import make_mask

TOL = 1e-4


def graph_runners(engine_dir) -> dict:
    """backend name -> a Runner over `engine_dir`, for each backend installed here."""
    from engine import Runner

    installed = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    return {backend: Runner(engine_dir=str(engine_dir), backend=backend) for backend in installed}


@pytest.fixture(scope="module")
def pics(photo):
    from engine.preprocess import canny

    init = photo.resize((64, 64), PIL.Image.LANCZOS)
    return dict(init=init, edges=canny(init), mask=make_mask(64, 64))


@pytest.fixture(scope="module")
def four(engine_dir, tiny_dir):
    from engine import Runner

    nets = [str(tiny_dir["canny"]), str(tiny_dir["depth"])]
    return dict(dir=engine_dir, ours=graph_runners(engine_dir),
                torch=Runner(model=str(tiny_dir["model"]), controlnet=nets, backend="torch", device="cpu"))


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    from engine import Runner
    from engine.tiny import save_tiny

    root = tmp_path_factory.mktemp("nine")
    paths = save_tiny(root / "model", controlnets=("canny",), preset="tiny-inpaint")
    out = root / "engine"
    code, log = _cli("--model", str(paths["model"]), "--controlnet", str(paths["canny"]), "--out", str(out),
                     "--min-size", "64", "--max-size", "64", "--max-batch", "2")
    assert code == 0, log
    return dict(dir=out, log=log, ours=graph_runners(out),
                torch=Runner(model=str(paths["model"]), controlnet=str(paths["canny"]), backend="torch", device="cpu"))


BASE = dict(prompt="a photo of the astronaut", num_inference_steps=5, seed=0, output_type="np", preprocess=False)
CASES = {
    "img2img": dict(strength=0.6),
    "img2img two nets guess mode": dict(strength=0.8, nets=2, guess_mode=True, controlnet_conditioning_scale=[0.8, 0.5]),
    "img2img window, 2 per prompt": dict(strength=1.0, control_guidance_start=0.2, control_guidance_end=0.7,
                                         num_images_per_prompt=2, scheduler="euler_a"),
    "inpaint 4-channel": dict(mask=True, strength=0.8, scheduler="euler_a"),
    "inpaint 4-channel full strength": dict(mask=True, nets=2, controlnet_conditioning_scale=[1.1, 0.6]),
}


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_four_channel_modes_match_torch(four, pics, case, backend):
    kwargs = {**BASE, **CASES[case]}
    if kwargs.pop("nets", 1) == 1:  # both runners hold both nets; scale 0 keeps the second from running
        kwargs.setdefault("controlnet_conditioning_scale", [1.0, 0.0])
    if kwargs.pop("mask", False):
        kwargs["mask_image"] = pics["mask"]
    call = dict(image=[pics["edges"], pics["init"]], init_image=pics["init"], **kwargs)
    got = four["ours"][backend].generate(**call).images
    want = four["torch"].generate(**call).images
    abs_err, rel_err = max_errors(got, want)
    print(f"{backend} {case}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{case}: {abs_err:.3g}"
    assert float(np.abs(want).max()) > 0


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_nine_channel_inpaint_matches_torch(nine, pics, strength, backend):
    manifest = mf.load(nine["dir"])
    assert manifest.config["unet_in_channels"] == 9
    assert manifest.artefacts["unet"].inputs[0].dims[1] == 9
    assert manifest.artefacts["controlnet_controlnet-canny"].inputs[0].dims[1] == 4
    kwargs = dict(BASE, image=pics["edges"], init_image=pics["init"], mask_image=pics["mask"], strength=strength)
    got = nine["ours"][backend].generate(**kwargs).images
    want = nine["torch"].generate(**kwargs).images
    abs_err, rel_err = max_errors(got, want)
    print(f"{backend} nine-channel strength {strength}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL


def test_engine_dir_without_vae_encoder_refuses_img2img(four, pics, tmp_path):
    from engine import Runner

    old = tmp_path / "old"
    shutil.copytree(four["dir"], old)
    data = json.loads((old / mf.MANIFEST).read_text())
    for name in [f for f in data["artefacts"]["vae_encoder"]["files"]]:
        (old / name).unlink()
    del data["artefacts"]["vae_encoder"]  # as a dir built before img2img
    (old / mf.MANIFEST).write_text(json.dumps(data))
    runner = Runner(engine_dir=str(old))
    text = runner.generate(image=[pics["edges"], pics["init"]], **{**BASE, "num_inference_steps": 1}).images
    assert text.shape == (1, 64, 64, 3)  # text to image still runs
    with pytest.raises(ValueError, match="built without one: rebuild it with python -m engine.build"):
        runner.generate(image=[pics["edges"], pics["init"]], init_image=pics["init"], **BASE)


def test_tensorrt_profiles_for_vae_encoder_and_nine_channel_unet():
    """The specs the TensorRT plans are built from (no TensorRT needed): the VAE encoder takes images
    at batch 1..max_batch; an inpainting model's UNet takes 9 channels, its ControlNets 4."""
    import dataclasses

    from export import tensorrt_build as tb
    from export.spec import Sizes, build_specs
    from tests.test_trt_logic import SD15

    sizes = Sizes()
    nine = dataclasses.replace(SD15, unet_in_channels=9)
    specs = {s.name: s for s in build_specs(nine, [("canny", False)], "fp16")}
    encoder = specs["vae_encoder"].profile(sizes, 8)
    assert encoder["images"] == [[1, 3, 256, 256], [1, 3, 512, 512], [4, 3, 1024, 1024]]
    assert [io.name for io in specs["vae_encoder"].outputs] == ["latent_mean", "latent_std"]
    assert specs["vae_encoder"].output_shapes(dict(B=1, h=64, w=64))["latent_mean"] == (1, 4, 64, 64)
    assert specs["unet"].profile(sizes, 8)["sample"][2] == [8, 9, 128, 128]
    assert specs["controlnet_canny"].profile(sizes, 8)["sample"][2] == [8, 4, 128, 128]
    for spec in specs.values():
        tb.check_profile(spec.profile(sizes, 8))

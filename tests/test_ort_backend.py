"""The ONNX Runtime backend equals the torch reference: per graph at three shapes (one non-square, one
at batch 3), and whole generations through Runner(engine_dir=...) against Runner(backend="torch")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import manifest as mf
from tests.conftest import max_errors
from tests.test_build import one_torch_thread, staged_build  # noqa: F401 (a fixture)

TOL = 1e-4  # fp32, max abs


@pytest.fixture(scope="module")
def engine_dir(request, tmp_path_factory, tiny_dir):
    return staged_build(request.config, tmp_path_factory.mktemp("build"), tiny_dir)["dir"]


@pytest.fixture(scope="module")
def references(engine_dir):
    from engine.verify import load_references

    return load_references(mf.load(engine_dir))


# (batch, height, width) in pixels: the tiny UNet has 4 levels, so sides are multiples of 64.
SHAPES = [(1, 64, 64), (2, 64, 128), (3, 128, 64)]


@pytest.mark.parametrize("kind", ["text_encoder", "hint_encoder", "controlnet", "unet", "vae_decoder"])
def test_each_graph_matches_torch(engine_dir, references, kind):
    from engine.backends.onnxruntime_backend import OrtModel
    from engine.verify import compare, reference_module

    manifest = mf.load(engine_dir)
    sd, nets = references
    net = "controlnet-depth" if kind in ("hint_encoder", "controlnet") else None
    artefact = manifest.artefact(kind, net)
    model = OrtModel(engine_dir / artefact.onnx, artefact)
    assert model.provider == "CPUExecutionProvider"
    module = reference_module(kind, sd, nets.get(net))
    for batch, height, width in SHAPES:
        point = dict(B=batch, h=height // 8, w=width // 8)
        errors = compare(module, model.run, artefact, point, manifest.config["vocab_size"])
        print(f"{kind} {point}: max abs {errors['max_abs']:.2e}")
        assert errors["max_abs"] <= TOL, (kind, point, errors)


@pytest.fixture(scope="module")
def runners(engine_dir, tiny_dir):
    from engine import Runner

    nets = [str(tiny_dir["canny"]), str(tiny_dir["depth"])]
    ours = {1: Runner(engine_dir=str(engine_dir), controlnet=nets[:1], backend="onnxruntime"),
            2: Runner(engine_dir=str(engine_dir), backend="onnxruntime")}  # all it was built with
    torch_ = {1: Runner(model=str(tiny_dir["model"]), controlnet=nets[:1], backend="torch", device="cpu"),
              2: Runner(model=str(tiny_dir["model"]), controlnet=nets, backend="torch", device="cpu")}
    return ours, torch_


BASE = dict(prompt="a photo of the astronaut", num_inference_steps=5, height=64, width=64, seed=0, output_type="np",
            preprocess=False)
CASES = {
    "one_net": (1, {}),
    "one_net_non_square_batch_2": (1, dict(height=64, width=128, num_images_per_prompt=2)),
    "two_nets": (2, dict(controlnet_conditioning_scale=[0.7, 1.3])),
    "guess_mode": (2, dict(guess_mode=True, controlnet_conditioning_scale=[0.8, 0.5])),
    "guidance_window": (1, dict(control_guidance_start=0.2, control_guidance_end=0.7, num_inference_steps=6)),
    "windows_per_net": (2, dict(control_guidance_start=[0.0, 0.4], control_guidance_end=[0.5, 1.0], num_inference_steps=6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generation_matches_torch_backend(runners, edges, photo, case):
    nets, extra = CASES[case]
    ours, reference = runners
    images = [edges, photo][:nets]
    kwargs = {**BASE, **extra}
    got = ours[nets].generate(image=images, **kwargs)
    want = reference[nets].generate(image=images, **kwargs).images
    abs_err, rel_err = max_errors(got.images, want)
    print(f"{case}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{case}: {abs_err:.3g}"
    assert got.images.shape == want.shape and float(np.abs(want).max()) > 0


def test_runner_reports_backend_and_recorded_model(runners, tiny_dir):
    ours, _ = runners
    runner = ours[2]
    assert runner.backend.name == "onnxruntime" and runner.device == torch.device("cpu")
    assert set(runner.backend.providers.values()) == {"CPUExecutionProvider"}
    assert runner.model == str(tiny_dir["model"].resolve()) and runner.num_controlnets == 2


def test_backend_needs_engine_dir():
    from engine import Runner

    with pytest.raises(ValueError, match="pass engine_dir"):
        Runner(model="tiny", backend="onnxruntime")


def test_torch_backend_with_engine_dir_refused(engine_dir):
    from engine import Runner

    with pytest.raises(ValueError, match="leave engine_dir unset"):
        Runner(engine_dir=str(engine_dir), backend="torch")


def test_auto_backend_runs_what_was_built(engine_dir, tiny_dir):
    from engine import Runner

    runner = Runner(engine_dir=str(engine_dir), controlnet=str(tiny_dir["depth"]))
    assert runner.backend.name == "onnxruntime" and runner.num_controlnets == 1

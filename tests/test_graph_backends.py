"""Every backend that runs an engine dir's ONNX graphs (ONNX Runtime, OpenVINO: the same files) equals the
torch reference, fp32, max abs <= 1e-4: per graph at several shapes, and whole generations through
Runner(engine_dir=..., backend=B) against Runner(backend="torch") on the parity tests' feature rows
(tests/test_parity.py: schedulers, guess mode, two nets, windows, non-square, several images). Each torch
reference generation runs once and is compared with every backend. What is particular to one backend
(providers; precision read-back, model cache, hints) is in tests/test_ort_backend.py and
tests/test_openvino_backend.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from engine import manifest as mf
from tests.conftest import GRAPH_BACKENDS, max_errors
from tests.test_build import one_torch_thread  # noqa: F401 (a fixture)

TOL = 1e-4  # fp32, max abs


def graph_model(engine_dir, backend: str, kind: str, net=None, shapes: int = 4):
    """One graph of the engine dir as `backend` runs it (OpenVINO: without its model cache, keeping
    `shapes` compiled shapes)."""
    artefact = mf.load(engine_dir).artefact(kind, net)
    if backend == "onnxruntime":
        from engine.backends.onnxruntime_backend import OrtModel

        return OrtModel(engine_dir / artefact.onnx, artefact)
    from engine.backends.openvino_backend import OvConfig, OvModel

    return OvModel(engine_dir / artefact.onnx, artefact, OvConfig(cache=False, shapes=shapes))


# (batch, height, width) in pixels: the tiny UNet has 4 levels, so sides are multiples of 64. OpenVINO
# compiles once per static shape (0.1-3 s a graph at tiny size): it takes the one shape the generations
# below never use, batch 3 and non-square (the build test checks each graph at its verify point).
SHAPES = {"onnxruntime": [(1, 64, 64), (2, 64, 128), (3, 128, 64)], "openvino": [(3, 128, 64)]}


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("kind", ["text_encoder", "hint_encoder", "controlnet", "unet", "vae_decoder"])
def test_each_graph_matches_torch(engine_dir, engine_references, kind, backend):
    from engine.parity import compare, reference_module

    manifest = mf.load(engine_dir)
    sd, nets = engine_references
    net = "controlnet-depth" if kind in ("hint_encoder", "controlnet") else None
    model = graph_model(engine_dir, backend, kind, net, shapes=len(SHAPES[backend]))
    module = reference_module(kind, sd, nets.get(net))
    for batch, height, width in SHAPES[backend]:
        point = dict(B=batch, h=height // 8, w=width // 8)
        errors = compare(module, model.run, manifest.artefact(kind, net), point, manifest.config["vocab_size"])
        print(f"{backend} {kind} {point}: max abs {errors['max_abs']:.2e}")
        assert errors["max_abs"] <= TOL, (kind, point, errors)


@pytest.fixture(scope="module")
def runners(engine_dir, tiny_dir):
    """(backend -> {1 net: Runner, 2 nets: Runner}) over the engine dir, and the torch reference's, built
    when first asked for."""
    from engine import Runner

    nets = [str(tiny_dir["canny"]), str(tiny_dir["depth"])]
    made = {}

    def get(backend: str, count: int):
        if (backend, count) not in made:
            if backend == "torch":
                made[backend, count] = Runner(model=str(tiny_dir["model"]), controlnet=nets[:count], backend="torch",
                                              device="cpu")
            else:  # two nets: all the dir was built with
                chosen = dict(controlnet=nets[:1]) if count == 1 else {}
                made[backend, count] = Runner(engine_dir=str(engine_dir), backend=backend, **chosen)
        return made[backend, count]

    return get


BASE = dict(prompt="a photo of the astronaut", num_inference_steps=4, height=64, width=64, seed=0, output_type="np",
            preprocess=False)
# The 64x64 rows share one shape per graph, so in OpenVINO most rows compile nothing. UniPC is the default.
CASES = {
    "one_net": (1, {}),
    "negative_prompt": (1, dict(negative_prompt="blurry, low quality")),
    "non_square_64x128_two_images": (1, dict(height=64, width=128, num_images_per_prompt=2)),
    "two_nets": (2, dict(controlnet_conditioning_scale=[0.7, 1.3])),
    "guess_mode": (1, dict(guess_mode=True, controlnet_conditioning_scale=0.8)),
    "guess_mode_two_nets": (2, dict(guess_mode=True, controlnet_conditioning_scale=[0.8, 0.5])),
    "guidance_window": (1, dict(control_guidance_start=0.2, control_guidance_end=0.7, num_inference_steps=6)),
    "windows_per_net": (2, dict(control_guidance_start=[0.0, 0.4], control_guidance_end=[0.5, 1.0],
                                num_inference_steps=6)),
    **{f"scheduler_{s}": (1, dict(scheduler=s)) for s in ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")},
}


@pytest.fixture(scope="module")
def torch_images(runners, edges, photo):
    """case -> the torch reference's images, generated once for every backend."""
    done = {}

    def get(case):
        if case not in done:
            nets, extra = CASES[case]
            done[case] = runners("torch", nets).generate(image=[edges, photo][:nets], **{**BASE, **extra}).images
        return done[case]

    return get


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_generation_matches_torch_backend(runners, torch_images, edges, photo, case, backend):
    nets, extra = CASES[case]
    got = runners(backend, nets).generate(image=[edges, photo][:nets], **{**BASE, **extra})
    want = torch_images(case)
    abs_err, rel_err = max_errors(got.images, want)
    print(f"{backend} {case}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{backend} {case}: {abs_err:.3g}"
    assert got.images.shape == want.shape and float(np.abs(want).max()) > 0


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_runner_reports_backend_and_recorded_model(runners, tiny_dir, backend):
    import torch

    runner = runners(backend, 2)
    assert runner.backend.name == backend and runner.device == torch.device("cpu")
    assert runner.model == str(tiny_dir["model"].resolve()) and runner.num_controlnets == 2
    assert runner.dtype == torch.float32


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_backend_needs_engine_dir(backend):
    from engine import Runner

    with pytest.raises(ValueError, match="pass engine_dir"):
        Runner(model="tiny", backend=backend)


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("graph, stage", [("text_encoder", r"text conditioning \(encoder_hidden_states\)"),
                                          ("unet", "final latents")])
def test_nan_from_the_graphs_is_an_error_not_an_image(engine_dir, tiny_dir, tmp_path, backend, graph, stage):
    """A NaN weight in a graph (poisoned through the LoRA path's set_weights) makes the text conditioning or
    the final latents NaN: the Runner raises, naming the backend and precision, instead of returning a NaN
    image (the torch backend's case: tests/test_nonfinite.py; TensorRT runs the same Runner code, on CUDA
    only). The dir is copied without its OpenVINO cache so the poisoned graphs compile apart."""
    import torch

    from engine import Runner
    from engine.backends import NonFiniteError

    target = tmp_path / "engine"
    shutil.copytree(engine_dir, target, ignore=shutil.ignore_patterns("openvino_cache"))
    runner = Runner(engine_dir=str(target), backend=backend, controlnet=str(tiny_dir["canny"]))
    name = next(iter(mf.load(target).artefact(graph).weights))
    base = runner.backend.get_weights(graph, [name])[name]
    runner.backend.set_weights(graph, {name: torch.full_like(base, float("nan"))})
    with pytest.raises(NonFiniteError, match=rf"the {backend} backend \(fp32\) produced NaN or inf in the {stage}"):
        runner.generate("a photo", torch.rand(64, 64, 3).numpy(), num_inference_steps=2, preprocess=False, seed=0)

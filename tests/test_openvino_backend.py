"""The OpenVINO backend equals the torch reference on an engine dir built for ONNX Runtime (the same ONNX
files): per graph at three shapes, and whole generations through Runner(engine_dir=..., backend="openvino")
against Runner(backend="torch") on the parity tests' feature rows. Also: the inference precision is the one
asked for (read back from the compiled model and its runtime graph), `set_initializers` swaps weights,
the model cache is used by a second load, and `python -m engine.build --backend openvino` verifies with
OpenVINO."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engine import manifest as mf
from tests.conftest import max_errors, run_fresh_python
from tests.test_build import _cli, one_torch_thread, staged_build  # noqa: F401 (a fixture)

pytest.importorskip("openvino")

TOL = 1e-4  # fp32, max abs


@pytest.fixture(scope="module")
def engine_dir(request, tmp_path_factory, tiny_dir):
    return staged_build(request.config, tmp_path_factory.mktemp("build"), tiny_dir)["dir"]


@pytest.fixture(scope="module")
def references(engine_dir):
    from engine.verify import load_references

    return load_references(mf.load(engine_dir))


def _model(engine_dir, kind, net=None, **config):
    from engine.backends.openvino_backend import OvConfig, OvModel

    artefact = mf.load(engine_dir).artefact(kind, net)
    return OvModel(engine_dir / artefact.onnx, artefact, OvConfig(cache=False, **config))


# (batch, height, width) in pixels: batch 3 and non-square, a shape the generations below never use (each
# new shape costs a compile, 0.1-3 s a graph at tiny size; the build test checks each graph at its verify point).
SHAPES = [(3, 128, 64)]


@pytest.mark.parametrize("kind", ["text_encoder", "hint_encoder", "controlnet", "unet", "vae_decoder"])
def test_each_graph_matches_torch(engine_dir, references, kind):
    from engine.verify import compare, reference_module

    manifest = mf.load(engine_dir)
    sd, nets = references
    net = "controlnet-depth" if kind in ("hint_encoder", "controlnet") else None
    model = _model(engine_dir, kind, net, shapes=len(SHAPES))
    module = reference_module(kind, sd, nets.get(net))
    for batch, height, width in SHAPES:
        point = dict(B=batch, h=height // 8, w=width // 8)
        errors = compare(module, model.run, manifest.artefact(kind, net), point, manifest.config["vocab_size"])
        print(f"{kind} {point}: max abs {errors['max_abs']:.2e}")
        assert errors["max_abs"] <= TOL, (kind, point, errors)
    assert len(model._compiled) == len(SHAPES)  # one compiled model per shape, kept


def model_artefact(engine_dir, kind, net=None):
    return mf.load(engine_dir).artefact(kind, net)


@pytest.fixture(scope="module")
def runners(engine_dir, tiny_dir):
    from engine import Runner

    nets = [str(tiny_dir["canny"]), str(tiny_dir["depth"])]
    ours = {1: Runner(engine_dir=str(engine_dir), controlnet=nets[:1], backend="openvino"),
            2: Runner(engine_dir=str(engine_dir), backend="openvino")}
    torch_ = {1: Runner(model=str(tiny_dir["model"]), controlnet=nets[:1], backend="torch", device="cpu"),
              2: Runner(model=str(tiny_dir["model"]), controlnet=nets, backend="torch", device="cpu")}
    return ours, torch_


BASE = dict(prompt="a photo of the astronaut", num_inference_steps=4, height=64, width=64, seed=0, output_type="np",
            preprocess=False)
# The feature rows of tests/test_parity.py and tests/test_ort_backend.py; the 64x64 rows share one compiled
# shape per graph, so most rows compile nothing.
CASES = {
    "guess_mode": (1, dict(guess_mode=True, controlnet_conditioning_scale=0.8)),
    "guidance_window": (1, dict(control_guidance_start=0.2, control_guidance_end=0.7, num_inference_steps=6)),
    "one_net": (1, {}),
    "negative_prompt": (1, dict(negative_prompt="blurry, low quality")),
    "non_square_64x128_two_images": (1, dict(height=64, width=128, num_images_per_prompt=2)),
    "two_nets": (2, dict(controlnet_conditioning_scale=[0.7, 1.3])),
    "windows_per_net": (2, dict(control_guidance_start=[0.0, 0.4], control_guidance_end=[0.5, 1.0], num_inference_steps=6)),
    **{f"scheduler_{s}": (1, dict(scheduler=s)) for s in ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")},
}


@pytest.mark.parametrize("case", list(CASES))
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


def test_runner_reports_backend_precision_and_cache(runners, engine_dir):
    ours, _ = runners
    runner = ours[2]
    assert runner.backend.name == "openvino" and runner.device == torch.device("cpu")
    assert runner.dtype == torch.float32 and runner.backend.precision == "f32"
    assert runner.backend.cache_dir == engine_dir / "openvino_cache"
    runner.backend.encode_text(torch.zeros(1, 77, dtype=torch.int64))  # compiles one shape, at least
    assert any(runner.backend.cache_dir.glob("*.blob"))  # compiled models written to OpenVINO's cache


def test_f32_is_f32(engine_dir):
    """An fp32 engine dir runs f32 even where OpenVINO would pick bf16 by itself (AMX, AVX512-BF16 CPUs):
    the hint encoder's convolutions and the text encoder's matmuls."""
    from engine.backends.openvino_backend import compiled_precision, executed_precisions

    for kind, net, shapes in (("hint_encoder", "controlnet-canny", ((1, 3, 64, 64),)), ("text_encoder", None, ((1, 77),))):
        compiled = _model(engine_dir, kind, net).compiled_for(shapes).compiled
        assert compiled_precision(compiled) == "f32", kind
        assert executed_precisions(compiled) == {"f32"}, kind


def test_bf16_is_bf16_or_refused(engine_dir, tiny_dir):
    """Asked for bf16: bf16 where OpenVINO can (read back from the compiled model and its runtime graph),
    an error where it would run f32 instead, both from the Runner and from the compile's own check."""
    import openvino as ov

    from engine import Runner
    from engine.backends.openvino_backend import compiled_precision, executed_precisions, ov_has_bf16

    model = _model(engine_dir, "hint_encoder", "controlnet-canny", precision="bf16")
    control = torch.rand(1, 3, 64, 64)
    if ov_has_bf16(ov.Core()):
        runner = Runner(engine_dir=str(engine_dir), backend="openvino", dtype="bf16")
        assert runner.dtype == torch.bfloat16 and runner.backend.precision == "bf16"
        got = model.run({"control_map": control})[0]
        compiled = next(iter(model._compiled.values())).compiled
        assert compiled_precision(compiled) == "bf16" and "bf16" in executed_precisions(compiled)
        want = _model(engine_dir, "hint_encoder", "controlnet-canny").run({"control_map": control})[0]
        abs_err, rel_err = max_errors(got, want)
        assert 0 < rel_err < 5e-2, rel_err  # bf16's rounding, not f32's and not garbage
    else:
        with pytest.raises(ValueError, match="would run f32 instead"):
            Runner(engine_dir=str(engine_dir), backend="openvino", dtype="bf16")
        with pytest.raises(RuntimeError, match="inference precision f32, not the bf16"):
            model.run({"control_map": control})


def test_set_initializers_swaps_weights(engine_dir, references):
    from engine.verify import compare, reference_module

    sd, nets = references
    artefact = model_artefact(engine_dir, "hint_encoder", "controlnet-canny")
    model = _model(engine_dir, "hint_encoder", "controlnet-canny")
    module = reference_module("hint_encoder", sd, nets["controlnet-canny"])
    param = module.embedding.blocks[0].weight
    base = param.detach().clone()
    new = torch.randn_like(base) * base.std() * 3
    point = dict(B=2, h=8, w=8)
    before = compare(module, model.run, artefact, point, 1000)
    try:
        with torch.no_grad():
            param.copy_(new)
        model.set_initializers({"embedding.blocks.0.weight": new.numpy()})
        after = compare(module, model.run, artefact, point, 1000)
        model.set_initializers({"embedding.blocks.0.weight": base.numpy()})  # base values restore the base
    finally:
        with torch.no_grad():
            param.copy_(base)
    restored = compare(module, model.run, artefact, point, 1000)
    print(f"set_initializers: before {before['max_abs']:.2e}, new {after['max_abs']:.2e}, restored {restored['max_abs']:.2e}")
    assert max(before["max_abs"], after["max_abs"], restored["max_abs"]) <= TOL
    with pytest.raises(KeyError, match="no constant from ONNX initializer"):
        model.set_initializers({"embedding.blocks.99.weight": base.numpy()})
    with pytest.raises(ValueError, match="has shape"):
        model.set_initializers({"embedding.blocks.0.weight": base.numpy()[:1]})


def test_second_load_comes_from_the_cache(engine_dir, tmp_path):
    from engine.backends.openvino_backend import OvConfig, OvModel

    artefact = model_artefact(engine_dir, "hint_encoder", "controlnet-canny")
    feeds = dict(control_map=torch.rand(1, 3, 64, 64))
    config = OvConfig(cache_dir=str(tmp_path / "cache"))
    first, second = (OvModel(engine_dir / artefact.onnx, artefact, config, tmp_path / "cache") for _ in range(2))
    a = first.run(feeds)
    b = second.run(feeds)
    assert not next(iter(first._compiled.values())).compiled.get_property("LOADED_FROM_CACHE")
    assert next(iter(second._compiled.values())).compiled.get_property("LOADED_FROM_CACHE")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_throughput_hint_serves_concurrent_calls(engine_dir):
    """THROUGHPUT: several streams; callers on several threads each get an infer request of their own."""
    from concurrent.futures import ThreadPoolExecutor

    model = _model(engine_dir, "hint_encoder", "controlnet-canny", hint="THROUGHPUT", threads=2)
    maps = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    alone = [model.run({"control_map": m})[0] for m in maps]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda m: model.run({"control_map": m})[0], maps))
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    compiled = next(iter(model._compiled.values())).compiled
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT" and compiled.get_property("NUM_STREAMS") >= 1


def test_config_is_checked():
    from engine.backends.openvino_backend import OvConfig

    with pytest.raises(ValueError, match="precision must be one of f32, bf16"):
        OvConfig(precision="fp32")
    with pytest.raises(ValueError, match="hint must be one of LATENCY, THROUGHPUT"):
        OvConfig(hint="FAST")
    assert OvConfig(threads=None).properties()["INFERENCE_NUM_THREADS"] == torch.get_num_threads()


def test_backend_needs_engine_dir():
    from engine import Runner

    with pytest.raises(ValueError, match="pass engine_dir"):
        Runner(model="tiny", backend="openvino")


def test_build_with_openvino_verifies_with_it(engine_dir, tiny_dir, tmp_path):
    """`--backend openvino` on a dir built for onnxruntime (one of its nets kept): nothing re-exported, every
    graph verified in OpenVINO; then Runner(backend="auto") picks openvino."""
    from engine import Runner

    target = tmp_path / "engine"
    shutil.copytree(engine_dir, target, ignore=shutil.ignore_patterns("openvino_cache"))
    args = ["--model", str(tiny_dir["model"]), "--out", str(target), "--min-size", "64", "--max-size", "128",
            "--max-batch", "3", "--controlnet", str(tiny_dir["canny"])]
    code, out = _cli(*args, "--backend", "openvino")
    assert code == 0, out
    assert "0 built, 6 reused; backend openvino" in out and "verified" in out
    rebuilt = mf.load(target)
    assert rebuilt.backend == "openvino" and rebuilt.versions["openvino"]
    assert all(a.verify["runtime"] == "openvino" and a.verify["ok"] for a in rebuilt.artefacts.values())
    assert Runner(engine_dir=str(target)).backend.name == "openvino"
    from engine.verify import main as verify

    assert verify([str(target)]) == 0  # python -m engine.verify: the dir's own backend, openvino


def test_build_without_onnx_names_what_to_install():
    """The README's default install has no onnx: the build says what to install in one line."""
    result = run_fresh_python(
        "import sys\n"
        "sys.modules['onnx'] = sys.modules['onnxruntime'] = None  # as in `pip install -e .`\n"
        "from engine.build import main\n"
        "sys.exit(main(['--model', 'tiny', '--out', 'unused']))\n")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "needs onnx, onnxruntime, not installed: pip install -e '.[onnx]'" in lines[0]

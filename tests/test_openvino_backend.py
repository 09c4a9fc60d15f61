"""What is particular to the OpenVINO backend, on an engine dir built for ONNX Runtime (the same ONNX
files): the inference precision is the one asked for (read back from the compiled model and its runtime
graph), `set_initializers` swaps weights, the model cache is used by a second load, the THROUGHPUT hint
serves concurrent calls, and `python -m engine.build --backend openvino` verifies with OpenVINO. Its
parity with the torch reference (per graph and whole generations) is tests/test_graph_backends.py's."""
from __future__ import annotations

import shutil

import pytest
import torch

from engine import manifest as mf
from tests.conftest import max_errors, run_fresh_python
from tests.test_build import _cli, one_torch_thread  # noqa: F401 (a fixture)

pytest.importorskip("openvino")

TOL = 1e-4  # fp32, max abs


def _model(engine_dir, kind, net=None, **config):
    from engine.backends.openvino_backend import OvConfig, OvModel

    artefact = mf.load(engine_dir).artefact(kind, net)
    return OvModel(engine_dir / artefact.onnx, artefact, OvConfig(cache=False, **config))


def model_artefact(engine_dir, kind, net=None):
    return mf.load(engine_dir).artefact(kind, net)


def test_runner_reports_precision_and_cache(engine_dir):
    from engine import Runner

    runner = Runner(engine_dir=str(engine_dir), backend="openvino")
    assert runner.dtype == torch.float32 and runner.backend.precision == "f32"
    assert runner.backend.cache_dir == engine_dir / "openvino_cache"
    runner.backend.encode_text(torch.zeros(1, 77, dtype=torch.int64))  # compiles one shape, at least
    folder = runner.backend.text_encoder.blob_folder()
    assert folder.parent == runner.backend.cache_dir and folder.name.startswith("f32-LATENCY-")
    assert any(folder.glob("*.blob"))  # compiled models written to OpenVINO's cache, in this setting's folder


def _blobs(folder) -> dict:
    return {path: path.read_bytes() for path in folder.rglob("*.blob")}


def test_each_setting_compiles_into_its_own_cache_folder(engine_dir, tmp_path, monkeypatch):
    """OpenVINO 2026.4.1 keys a blob without its inference precision: a bf16 compile that found an f32
    compile's blob in the same CACHE_DIR loaded it and gave NaN images (issue #22). So each precision,
    hint, thread count, OpenVINO build and CPU has a folder of its own, and an f32 then a bf16 compile of
    one graph into one cache never share a blob: on a CPU with native bf16 the bf16 compile writes and runs
    its own (close to f32, not NaN); elsewhere it is refused, leaving the f32 blob untouched."""
    import openvino as ov

    from engine.backends.openvino_backend import OvConfig, OvModel, cache_folder, ov_has_bf16

    core = ov.Core()
    f32 = OvConfig(threads=2).properties()
    settings = [f32, {**f32, "INFERENCE_PRECISION_HINT": "bf16"}, {**f32, "PERFORMANCE_HINT": "THROUGHPUT"},
                {**f32, "INFERENCE_NUM_THREADS": 1}]
    folders = [cache_folder(tmp_path, p, core) for p in settings]
    assert len(set(folders)) == len(settings) and folders[0] == cache_folder(tmp_path, dict(f32), core)
    monkeypatch.setattr(ov, "get_version", lambda: "2099.1.0-other-build")
    assert cache_folder(tmp_path, f32, core) != folders[0]
    monkeypatch.undo()

    cache = tmp_path / "engine" / "openvino_cache"
    artefact = model_artefact(engine_dir, "hint_encoder", "controlnet-canny")
    feeds = dict(control_map=torch.rand(1, 3, 64, 64))
    first = OvModel(engine_dir / artefact.onnx, artefact, OvConfig(), cache)
    want = first.run(feeds)[0]
    f32_blobs = _blobs(cache)
    assert f32_blobs and all(path.parent == first.blob_folder() for path in f32_blobs)
    second = OvModel(engine_dir / artefact.onnx, artefact, OvConfig(precision="bf16"), cache)
    assert second.blob_folder() != first.blob_folder() and second.blob_folder().name.startswith("bf16-")
    if ov_has_bf16(core):
        got = second.run(feeds)[0]
        compiled = next(iter(second._compiled.values())).compiled
        assert not compiled.get_property("LOADED_FROM_CACHE") and any(second.blob_folder().glob("*.blob"))
        assert torch.isfinite(got).all()
        assert 0 < max_errors(got, want)[1] < 5e-2  # bf16's rounding, not f32's blob and not NaN
    else:
        with pytest.raises(RuntimeError, match="inference precision f32, not the bf16"):
            second.run(feeds)
    assert {p: b for p, b in _blobs(cache).items() if p.parent == first.blob_folder()} == f32_blobs


def test_bf16_runner_after_an_f32_one_on_the_same_dir(engine_dir, tiny_dir, tmp_path):
    """Issue #22's failure, end to end: an f32 generation writes its blobs into the dir's cache, then a bf16
    Runner on the same dir. Where OpenVINO lists BF16 (AVX512-BF16 or AMX: the CPU flags decide, never a
    skip), its images are finite and near f32's; elsewhere dtype bf16 is refused, naming the CPU."""
    import numpy as np
    import openvino as ov

    from engine import Runner
    from engine.backends.openvino_backend import ov_has_bf16
    from tests.test_optimizations import psnr

    target = tmp_path / "engine"
    shutil.copytree(engine_dir, target, ignore=shutil.ignore_patterns("openvino_cache"))
    args = dict(num_inference_steps=2, preprocess=False, seed=0, output_type="np")
    control = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    net = dict(controlnet=str(tiny_dir["canny"]))
    want = Runner(engine_dir=str(target), backend="openvino", **net).generate("a photo", control, **args).images
    if not ov_has_bf16(ov.Core()):
        with pytest.raises(ValueError, match="OpenVINO runs bf16 only on CPUs with AVX512-BF16 or AMX"):
            Runner(engine_dir=str(target), backend="openvino", dtype="bf16", **net)
        return
    runner = Runner(engine_dir=str(target), backend="openvino", dtype="bf16", **net)
    got = runner.generate("a photo", control, **args).images
    assert runner.backend.precision == "bf16" and np.isfinite(got).all()
    db = psnr(got, want)
    print(f"\nopenvino bf16 after f32 on one dir: PSNR {db:.1f} dB against f32")
    assert db >= 30


def test_set_initializers_swaps_weights(engine_dir, engine_references):
    from engine.parity import compare, reference_module

    sd, nets = engine_references
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

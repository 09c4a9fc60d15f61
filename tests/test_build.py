"""`python -m engine.build` on the tiny model: fresh build, an added ControlNet, a no-op rebuild, a killed
build, and engine dirs that must be refused (tampered, unfinished, built for something else)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from engine import manifest as mf

SIZES = ["--min-size", "64", "--max-size", "128", "--max-batch", "3"]


def _cli(*args) -> tuple[int, str]:
    from engine.build import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args) + ["--no-progress"])
    return code, out.getvalue()


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The test machines' 2 cores are shared: under load torch's OpenMP barriers stall whenever a worker
    is descheduled (a 0.2 s tiny generation took 3-30 s at 2 threads). One thread is steady and gives
    the same results; ONNX Runtime keeps its own threads."""
    with torch_threads(1):
        yield


def staged_build(config, root, tiny_dir) -> dict:
    """Build canny, then canny + depth, then the same again; once per test session (tiny exports take
    seconds each), shared by the test modules through the pytest config."""
    if getattr(config, "_engine_build", None) is None:
        with torch_threads(1):
            config._engine_build = _staged_build(root, tiny_dir)
    return config._engine_build


def _staged_build(root, tiny_dir) -> dict:
    out = root / "engine"
    model = ["--model", str(tiny_dir["model"]), "--out", str(out)] + SIZES
    canny, depth = ["--controlnet", str(tiny_dir["canny"])], ["--controlnet", str(tiny_dir["depth"])]
    first = _cli(*model, *canny)
    second = _cli(*model, *canny, *depth)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx*")}
    third = _cli(*model, *canny, *depth)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx*")}
    return dict(dir=out, runs=[first, second, third], mtimes=(mtimes, after))


@pytest.fixture(scope="session")
def built(request, tmp_path_factory, tiny_dir) -> dict:
    return staged_build(request.config, tmp_path_factory.mktemp("build"), tiny_dir)


def test_fresh_build_then_added_controlnet_then_noop(built):
    (c1, out1), (c2, out2), (c3, out3) = built["runs"]
    assert (c1, c2, c3) == (0, 0, 0), out1 + out2 + out3
    assert "6 built, 0 reused" in out1
    assert "2 built, 6 reused" in out2  # only the new ControlNet's hint encoder and body
    assert "0 built, 8 reused" in out3
    assert "max abs" in out3 and "controlnet_controlnet-depth" in out3  # the summary table
    before, after = built["mtimes"]
    assert before == after and len(before) == 8  # nothing rewritten


def test_manifest_contents(built):
    manifest = mf.load(built["dir"])
    assert manifest.complete and manifest.backend == "onnxruntime" and manifest.precision == "fp32"
    assert [n["slug"] for n in manifest.controlnets] == ["controlnet-canny", "controlnet-depth"]
    assert manifest.versions["onnxruntime"] and manifest.versions["torch"] and manifest.gpu is None
    assert manifest.sizes == dict(min_size=64, opt_size=128, max_size=128, max_batch=3)
    for artefact in manifest.artefacts.values():
        assert artefact.verify["ok"] and artefact.verify["max_abs"] < 1e-4, artefact.name
        assert all(len(digest) == 64 for digest in artefact.files.values())
    unet = manifest.artefacts["unet"]
    assert unet.profile["sample"] == [[1, 4, 8, 8], [2, 4, 16, 16], [6, 4, 16, 16]]
    assert unet.profile["mid"] == [[1, 64, 1, 1], [2, 64, 2, 2], [6, 64, 2, 2]]
    assert manifest.artefacts["vae_decoder"].profile["latents"][2][0] == 3  # VAE: images only, no CFG
    assert manifest.artefacts["vae_encoder"].profile["images"] == [[1, 3, 64, 64], [1, 3, 128, 128], [3, 3, 128, 128]]
    assert manifest.config["unet_in_channels"] == 4 and manifest.config["scaling_factor"] == 0.18215
    assert set(manifest.support) == {"scheduler_config.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}


def test_verify_cli(built, capsys):
    from engine.verify import main

    assert main([str(built["dir"])]) == 0
    out = capsys.readouterr().out
    assert "unet" in out and "FAIL" not in out


@pytest.fixture
def copy_dir(built, tmp_path):
    target = tmp_path / "engine"
    shutil.copytree(built["dir"], target)
    return target


def _runner(engine_dir, **kwargs):
    from engine import Runner

    return Runner(engine_dir=str(engine_dir), backend="onnxruntime", **kwargs)


def test_changed_weight_rebuilds_only_its_graph(copy_dir, tiny_dir, tmp_path):
    """A fine-tuned UNet: only the UNet graph is exported again, and the Runner runs the new weights."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_dir["model"], model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_out.bias"] = tensors["conv_out.bias"] + 0.5
    save_file(tensors, weights)
    before = mf.load(copy_dir).artefacts
    code, out = _cli("--model", str(model), "--out", str(copy_dir), "--controlnet", str(tiny_dir["canny"]),
                     "--controlnet", str(tiny_dir["depth"]), *SIZES)
    assert code == 0, out
    assert "1 built, 7 reused" in out, out
    after = mf.load(copy_dir).artefacts
    assert [n for n in after if after[n].files != before[n].files] == ["unet"]


def test_dtype_other_than_the_builds_refused(built):
    with pytest.raises(ValueError, match="dtype 'fp16': this engine dir was built in fp32"):
        _runner(built["dir"], dtype="fp16")
    assert _runner(built["dir"], dtype=torch.float32).dtype == torch.float32


def test_tampered_file_refused(copy_dir):
    path = copy_dir / "unet.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(mf.EngineDirError, match="unet.onnx.*does not match the sha256"):
        _runner(copy_dir)


def test_tampered_tokenizer_refused(copy_dir):
    (copy_dir / "scheduler_config.json").write_text("{}")
    with pytest.raises(mf.EngineDirError, match="scheduler_config.json"):
        _runner(copy_dir)


def test_mismatched_model_and_controlnet_refused(copy_dir, tiny_dir, tmp_path):
    with pytest.raises(mf.EngineDirError, match="built for model"):
        _runner(copy_dir, model="tiny")
    other = tmp_path / "other-net"
    shutil.copytree(tiny_dir["canny"], other)
    with pytest.raises(mf.EngineDirError, match="was not built into this engine dir"):
        _runner(copy_dir, controlnet=[str(tiny_dir["canny"]), str(other)])


def test_unfinished_or_broken_manifest_refused(copy_dir):
    path = copy_dir / mf.MANIFEST
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "complete": False}))
    with pytest.raises(mf.EngineDirError, match="did not finish"):
        _runner(copy_dir)
    failed = json.loads(json.dumps(data))
    failed["complete"] = False
    failed["artefacts"]["unet"]["verify"]["ok"] = False
    path.write_text(json.dumps(failed))
    with pytest.raises(mf.EngineDirError, match="verification failed for unet"):
        _runner(copy_dir)
    path.write_text(json.dumps({**data, "format": 99}))
    with pytest.raises(mf.EngineDirError, match="format 99"):
        _runner(copy_dir)
    path.write_text("{not json")
    with pytest.raises(mf.EngineDirError, match="not a valid manifest"):
        _runner(copy_dir)
    path.unlink()
    with pytest.raises(mf.EngineDirError, match="has no manifest.json"):
        _runner(copy_dir)


def test_tensorrt_plans_checked_against_version_and_gpu(built):
    manifest = mf.read(built["dir"])
    with pytest.raises(mf.EngineDirError, match="no TensorRT plans"):
        mf.match_tensorrt(manifest, "10.9.0", "NVIDIA H100")
    manifest.versions["tensorrt"], manifest.gpu = "10.9.0", "NVIDIA H100 80GB HBM3"
    mf.match_tensorrt(manifest, "10.9.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(mf.EngineDirError, match="TensorRT 10.9.0, this machine has 11.4.0"):
        mf.match_tensorrt(manifest, "11.4.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(mf.EngineDirError, match="built on GPU"):
        mf.match_tensorrt(manifest, "10.9.0", "NVIDIA L4")


def test_killed_build_leaves_nothing_trusted(tiny_dir, tmp_path, monkeypatch):
    """A build that dies while writing its first graph: no half file at a final name, the dir is refused."""
    from export import onnx_export
    from export.build import BuildConfig, build
    from export.spec import Sizes

    real_save = onnx_export.save

    def dying_save(model, path, external_data_bytes):
        written = real_save(model, path, external_data_bytes)
        if path.name == "text_encoder.onnx":
            with open(written[0], "r+b") as f:  # half written, then the process "dies"
                f.truncate(written[0].stat().st_size // 2)
            raise KeyboardInterrupt("killed mid-write")
        return written

    monkeypatch.setattr(onnx_export, "save", dying_save)
    out = tmp_path / "engine"
    config = BuildConfig(controlnets=(str(tiny_dir["canny"]),), model=str(tiny_dir["model"]), out=out,
                         backend="onnxruntime", sizes=Sizes(64, 64, 128, 1), progress=False)
    with pytest.raises(KeyboardInterrupt):
        build(config, log=lambda *a: None)
    assert not (out / "text_encoder.onnx").exists()
    assert not list(out.glob(".build-*"))  # the scratch dir is gone
    assert not mf.read(out).complete
    with pytest.raises(mf.EngineDirError, match="did not finish"):
        _runner(out)


def test_bad_arguments_exit_2(tiny_dir, tmp_path, capsys):
    code, _ = _cli("--model", str(tiny_dir["model"]), "--controlnet", str(tiny_dir["canny"]), "--out", str(tmp_path / "x"),
                   "--min-size", "100")
    assert code == 2
    assert "min_size must be a positive multiple of 64" in capsys.readouterr().err

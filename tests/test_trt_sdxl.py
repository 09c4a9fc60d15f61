"""SDXL on TensorRT, for each major version in the fakes (10 and 11): tests/trt_fakes.py with `onnx_plans`, whose
plans hold their ONNX graph's I/O, profile and initializers and run the graph in ONNX Runtime where TensorRT would
run its kernels. The tiny SDXL model's ONNX engine dir (a ControlNet and a ControlNet-Union, fp32, sides 64-128,
batch 2: tests/test_sdxl_graphs.py) is rebuilt for TensorRT by `export.build`, which reuses its graphs and builds
and verifies one plan per graph. Shown:
- every graph (both text encoders, the UNet with text_embeds and time_ids, the ControlNet, the union net with its
  control-type inputs, the fp32 VAE) goes through the builder strongly typed, without precision flags, TF32
  cleared, REFIT set, with one profile whose min/opt/max are the I/O spec's (and, from the specs alone, the full-size
  fp16 profiles: 2048-wide context, 1280-wide text_embeds);
- the backend checks each plan's I/O against the manifest (a UNet plan with a missing or wrong time_ids or
  text_embeds is refused, naming it), and a Runner on the TensorRT backend generates the images ONNX Runtime
  generates over the same graphs (txt2img with both nets and two union conditions, guess mode, img2img,
  inpaint), every input bound by name; a request outside the plans' range is refused;
- SDXL LoRAs (diffusers, kohya lora_te1_/lora_te2_, SGM-named) refit the UNet's and both text encoders' plans
  through the Refitter by initializer name, none missing, drop cached CUDA graphs, and give ONNX Runtime's
  images with the same LoRAs; [] gives the base images back.
No GPU: the runtime runs on the CPU (no CUDA graph capture) and the "GPU" is a name.
"""
from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager

import pytest
import torch

from tests.conftest import max_errors
from tests.test_sdxl_graphs import (BASE, CASES, _picture, build_sdxl, case_kwargs, lora_files,  # noqa: F401
                                    sdxl_engine)  # lora_files, sdxl_engine: fixtures
from tests.trt_fakes import PRECISION_FLAGS, ONNX_PLAN, DataType, fake_tensorrt

MAJORS = [10, 11]
FAKE_GPU = "NVIDIA Fake GPU"
TOL = 1e-5  # the same graphs in ONNX Runtime either way; only the sessions' thread counts differ
GRAPHS = ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder", "hint_controlnet-canny",
          "controlnet_controlnet-canny", "hint_controlnet-union", "controlnet_controlnet-union"]


@contextmanager
def tensorrt_here(major: int):
    """`import tensorrt` gives the fake of `major`, TensorRT counts as usable, the runtime runs on the CPU (without
    CUDA graphs: nothing to capture; no GPU memory to free between plans) and the GPU has a name, as the build and
    the manifest check need."""
    from engine import backends
    from engine.backends.tensorrt_backend import TrtRunConfig, TrtRuntime

    trt, calls = fake_tensorrt(major, onnx_plans=True)

    def create(config=TrtRunConfig()):
        runtime = TrtRuntime(trt, TrtRunConfig(cuda_graphs=False, max_graphs_per_model=config.max_graphs_per_model),
                             device=torch.device("cpu"))
        runtime.gpu = FAKE_GPU
        return runtime

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt", trt)
        patch.setattr(backends, "tensorrt_usable", lambda: (True, f"TensorRT {trt.__version__} on {FAKE_GPU} (fake)"))
        patch.setattr(TrtRuntime, "create", staticmethod(create))
        patch.setattr(torch.cuda, "get_device_name", lambda device=None: FAKE_GPU)
        # no GPU memory to free before each plan (its gc.collect took 0.3 s a plan here, half the plans' build time)
        patch.setattr("export.build._free_gpu_memory", lambda: None)
        yield trt, calls


@pytest.fixture(scope="module", params=MAJORS, ids=[f"trt{m}" for m in MAJORS])
def trt_engine(request, sdxl_engine, tiny_sdxl_dir, tmp_path_factory):
    """The ONNX engine dir rebuilt for TensorRT `major` (its graphs reused, plans built and verified), and a Runner
    over its plans."""
    from engine import Runner

    out = tmp_path_factory.mktemp(f"sdxl-trt{request.param}") / "engine"
    shutil.copytree(sdxl_engine["dir"], out)
    with tensorrt_here(request.param) as (trt, calls):
        result = build_sdxl(tiny_sdxl_dir, out, backend="tensorrt")
        runner = Runner(engine_dir=str(out), backend="tensorrt")
    return dict(dir=out, result=result, trt=trt, calls=calls, runner=runner, major=request.param)


@pytest.fixture(scope="module")
def ort_runner(sdxl_engine):
    from engine import Runner

    return Runner(engine_dir=str(sdxl_engine["dir"]), backend="onnxruntime")


@pytest.fixture(scope="module")
def ort_images(ort_runner):
    """ONNX Runtime's images per case, made once for both majors."""
    made = {}

    def images(case, loras=()):
        key = (case, tuple(loras))
        if key not in made:
            ort_runner.set_loras(list(loras))
            made[key] = ort_runner.generate(**BASE, **case_kwargs(case)).images
        return made[key]

    yield images
    ort_runner.set_loras([])


def _plan_record(path) -> dict:
    data = path.read_bytes()
    assert data.startswith(ONNX_PLAN)
    return json.loads(data[len(ONNX_PLAN):])


# ---- 1. building ---------------------------------------------------------------------------------------


def _latent(batch, c, side, f=1):
    return [batch, c, side // 8 // f, side // 8 // f]


def test_every_graph_built_strongly_typed_refittable_with_the_specs_profile(trt_engine):
    from engine import manifest as mf

    trt, calls, result = trt_engine["trt"], trt_engine["calls"], trt_engine["result"]
    assert result.ok and result.backend == "tensorrt", result.rows
    rows = {r["artefact"]: r for r in result.rows}
    assert [rows[g]["status"] for g in GRAPHS] == ["reused"] * len(GRAPHS)  # the ONNX graphs, not re-exported
    for graph in GRAPHS:  # each plan verified against its torch module as it was built
        row = rows[f"{graph}.plan"]
        assert row["status"] == "built" and row["ok"] and row["max_abs"] is not None, row
    manifest = mf.load(trt_engine["dir"])
    assert manifest.versions["tensorrt"] == trt.__version__ and manifest.gpu == FAKE_GPU

    builds = {b["onnx"].rsplit("/", 1)[-1].removesuffix(".onnx"): b for b in calls["builds"]}
    assert len(calls["builds"]) == len(GRAPHS) and sorted(builds) == sorted(GRAPHS)
    precision = {f for f in PRECISION_FLAGS if hasattr(trt.BuilderFlag, f)}
    for graph, built in builds.items():
        assert built["strongly_typed"] and built["creation_flags"] == (1 << 1 if trt_engine["major"] == 10 else 0)
        assert "REFIT" in built["flags"] and not built["flags"] & ({"TF32", "REFIT_IDENTICAL"} | precision), graph
        assert built["profiles"] == [manifest.artefacts[graph].profile], graph  # one profile: the spec's

    # the profiles the builder got, against the sizes (64-128 px, batch 2: CFG models 1/2/4, the VAE 1/1/2)
    unet = builds["unet"]["profiles"][0]
    assert unet["sample"] == [_latent(1, 4, 64), _latent(2, 4, 64), _latent(4, 4, 128)]
    # the tiny model's context: its encoders' 32 + 64 wide states (2048 = 768 + 1280 at full size: test_trt_logic)
    assert unet["encoder_hidden_states"] == [[1, 77, 96], [2, 77, 96], [4, 77, 96]]
    assert unet["text_embeds"] == [[1, 64], [2, 64], [4, 64]] and unet["time_ids"] == [[1, 6], [2, 6], [4, 6]]
    residuals = [(32, 1)] * 3 + [(32, 2), (64, 2), (64, 2)] + [(64, 4)] * 4  # the tiny SDXL's 10 (3 levels)
    names = [f"down_{i}" for i in range(9)] + ["mid"]
    assert [n for n in unet if n == "mid" or n.startswith("down_")] == names
    for name, (c, f) in zip(names, residuals):
        assert unet[name] == [_latent(1, c, 64, f), _latent(2, c, 64, f), _latent(4, c, 128, f)], name
    for net in ("controlnet_controlnet-canny", "controlnet_controlnet-union"):
        profile = builds[net]["profiles"][0]
        assert {n: profile[n] for n in ("encoder_hidden_states", "text_embeds", "time_ids")} == \
            {n: unet[n] for n in ("encoder_hidden_states", "text_embeds", "time_ids")}
        assert profile["scales"] == [[10], [10], [10]]
    assert builds["controlnet_controlnet-union"]["profiles"][0]["control_type"] == [[1, 6], [2, 6], [4, 6]]
    assert "control_type" not in builds["controlnet_controlnet-canny"]["profiles"][0]
    hint = builds["hint_controlnet-union"]["profiles"][0]
    assert hint == dict(control_map=[[1, 3, 64, 64], [2, 3, 64, 64], [4, 3, 128, 128]],
                        control_type_index=[[1], [1], [1]], condition_scale=[[1], [1], [1]])
    assert builds["text_encoder_2"]["profiles"][0] == dict(input_ids=[[1, 77], [2, 77], [4, 77]])
    assert builds["vae_decoder"]["profiles"][0] == dict(latents=[_latent(1, 4, 64), _latent(1, 4, 64), _latent(2, 4, 128)])
    # the SDXL VAE overflows in fp16: its graphs and plans are fp32 (in an fp16 build too: export/spec.py)
    assert manifest.config["vae_fp32"]
    for graph in ("vae_encoder", "vae_decoder"):
        record = _plan_record(trt_engine["dir"] / manifest.artefacts[graph].plan)
        assert {dtype for _, _, dtype, _ in record["io"]} == {int(DataType.FLOAT)}, graph
        assert record["refittable"]


@pytest.mark.parametrize("major", MAJORS)
def test_full_size_fp16_profiles_reach_the_builder(tmp_path, major):
    """SDXL base at 768-1024 px, batch 2, fp16 (specs only: no ONNX at that size here): what the builder gets for the
    UNet's 2048-wide context, text_embeds, time_ids and 10 residuals; no precision flag in an fp16 build."""
    from export import tensorrt_build as tb
    from export.spec import Sizes, build_specs
    from tests.test_trt_logic import SDXL

    sizes = Sizes(min_size=768, opt_size=1024, max_size=1024, max_batch=2)
    received = {}
    for spec in build_specs(SDXL, [("canny", False, None), ("union", False, 6)], "fp16"):
        trt, calls = fake_tensorrt(major, graph_inputs=[io.name for io in spec.inputs])
        tb.build_plan(tmp_path / f"{spec.name}.onnx", tmp_path / f"{spec.name}.plan", spec.profile(sizes, 8), "fp16",
                      trt=trt)
        (built,) = calls["builds"]
        assert "REFIT" in built["flags"] and not built["flags"] & ({"TF32"} | set(PRECISION_FLAGS)), spec.name
        received[spec.name] = built["profiles"][0]
    unet = received["unet"]
    assert unet["encoder_hidden_states"] == [[1, 77, 2048], [2, 77, 2048], [4, 77, 2048]]
    assert unet["text_embeds"] == [[1, 1280], [2, 1280], [4, 1280]] and unet["time_ids"] == [[1, 6], [2, 6], [4, 6]]
    residuals = [(320, 1)] * 3 + [(320, 2), (640, 2), (640, 2), (640, 4)] + [(1280, 4)] * 3  # SDXL's 10 (3 levels)
    names = [f"down_{i}" for i in range(9)] + ["mid"]
    assert [n for n in unet if n == "mid" or n.startswith("down_")] == names
    for name, (c, f) in zip(names, residuals):
        assert unet[name] == [_latent(1, c, 768, f), _latent(2, c, 1024, f), _latent(4, c, 1024, f)], name
    assert received["controlnet_union"]["control_type"] == [[1, 6], [2, 6], [4, 6]]
    assert received["text_encoder_2"] == dict(input_ids=[[1, 77], [2, 77], [4, 77]])


# ---- 2. loading and running ----------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    (lambda io: [t for t in io if t[0] != "time_ids"], r"missing from the plan \['time_ids'\]"),
    (lambda io: [[n, m, int(DataType.HALF) if n == "time_ids" else d, s] for n, m, d, s in io],
     r"tensor 'time_ids' is DataType.HALF in the plan, float32 in the manifest"),
    (lambda io: [[n, m, d, [-1, 65] if n == "text_embeds" else s] for n, m, d, s in io],
     r"tensor 'text_embeds' has shape \(-1, 65\) in the plan; the manifest says \('B', 64\)"),
    (lambda io: [t for t in io if t[0] != "text_embeds"], r"missing from the plan \['text_embeds'\]"),
])
def test_unet_plan_io_checked_against_the_manifest(trt_engine, tmp_path, change, match):
    from engine import manifest as mf
    from engine.backends.tensorrt_backend import TrtModel

    artefact = mf.load(trt_engine["dir"]).artefact("unet")
    record = _plan_record(trt_engine["dir"] / artefact.plan)
    record["io"] = change(record["io"])
    plan = tmp_path / "unet.plan"
    plan.write_bytes(ONNX_PLAN + json.dumps(record).encode())
    with pytest.raises(ValueError, match=match):
        TrtModel(trt_engine["runner"].backend.runtime, plan, artefact)


@pytest.mark.parametrize("case", sorted(CASES))
def test_runner_on_tensorrt_equals_onnxruntime(trt_engine, ort_images, case):
    """The plans compute what the ONNX graphs compute, so an input bound to another name, in another dtype or
    shape, or an output read from another buffer, would change the image."""
    runner, calls = trt_engine["runner"], trt_engine["calls"]
    backend = runner.backend
    assert backend.name == "tensorrt" and backend.provider == f"TensorRT {trt_engine['trt'].__version__}"
    contexts = len(calls["contexts"])
    got = runner.generate(**BASE, **case_kwargs(case)).images
    abs_err = max_errors(got, ort_images(case))[0]
    print(f"sdxl tensorrt {trt_engine['major']} (fake, ONNX Runtime kernels) {case}: max abs vs onnxruntime {abs_err:.2e}")
    assert abs_err <= TOL and not calls["errors"]
    assert len(calls["contexts"]) == contexts  # one context per plan, made at load
    ran = {model.name: model for model in backend.models() if model.context.executed}
    for name, model in ran.items():  # every input's shape and address set by name; every output's address
        assert list(model.context.input_shapes) == [io.name for io in model.inputs], name
        assert sorted(model.context.addresses) == sorted(io.name for io in model.inputs + model.outputs), name
    unet = ran["unet"].context.input_shapes
    batch = unet["sample"][0]
    assert (unet["encoder_hidden_states"], unet["text_embeds"], unet["time_ids"]) == ((batch, 77, 96), (batch, 64), (batch, 6))
    union = ran["controlnet_controlnet-union"].context.input_shapes  # every case gives the union net a condition
    assert union["control_type"] == (union["sample"][0], 6) and union["time_ids"] == (union["sample"][0], 6)
    hint = ran["hint_controlnet-union"].context.input_shapes
    assert hint["control_type_index"] == (1,) and hint["condition_scale"] == (1,)


def test_request_outside_the_plans_range_refused(trt_engine):
    runner, call = trt_engine["runner"], dict(BASE, image=[_picture(1), _picture(2)], control_type=[None, "depth"])
    with pytest.raises(ValueError, match="height 256 is outside this engine dir's tensorrt plans' range 64-128 px"):
        runner.generate(**{**call, "height": 256})
    with pytest.raises(ValueError, match="3 images in one call, but this engine dir's tensorrt plans take at most 2"):
        runner.generate(**call, num_images_per_prompt=3)


# ---- 3. LoRA by refit ----------------------------------------------------------------------------------


def test_loras_refit_the_unet_and_both_text_encoders(trt_engine, ort_images, lora_files):
    """A diffusers file and a kohya one (lora_te1_/lora_te2_, SGM-named UNet blocks) in one switch, then none."""
    runner, calls = trt_engine["runner"], trt_engine["calls"]
    backend = runner.backend
    plans = {"unet": backend.unet_model, **backend.text_encoders}
    loras = [(str(lora_files["diffusers"]), 0.8), (str(lora_files["kohya_sgm"]), -0.6)]
    for model in plans.values():  # a graph captured on the old weights must go
        model.graphs[(("stale",),)] = ("graph", None, [], [])
    done = len(calls["refits"])
    try:
        assert runner.set_loras(loras)
        refits = {}
        for refitter in calls["refits"][done:]:
            refits.setdefault(refitter.engine.plan["onnx"].rsplit("/", 1)[-1].removesuffix(".onnx"), []).append(refitter)
        assert sorted(refits) == ["text_encoder", "text_encoder_2", "unet"]
        for graph, made in refits.items():
            assert all(r.set and set(r.set) <= set(r.get_all_weights()) and not r.get_missing_weights()
                       for r in made), graph
            assert not plans[graph].graphs, graph
        got = runner.generate(**BASE, **case_kwargs("img2img")).images
        abs_err = max_errors(got, ort_images("img2img", loras))[0]
        print(f"sdxl tensorrt {trt_engine['major']} loras: max abs vs onnxruntime {abs_err:.2e}")
        assert abs_err <= TOL and max_errors(got, ort_images("img2img"))[0] > 1e-3
    finally:
        runner.set_loras([])
    assert max_errors(runner.generate(**BASE, **case_kwargs("img2img")).images, ort_images("img2img"))[0] <= TOL

"""TensorRT logic that needs no TensorRT: profiles from the specs, plan cache keys and buffer shapes.
The builder's, runtime's and refitter's calls against per-version fakes (tests/trt_fakes.py) are in
tests/test_trt_versions.py.
The runtime test at the end runs only where TensorRT and a CUDA GPU are present."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.manifest import solve_variables
from export import tensorrt_build as tb
from export.spec import ModelConfig, Sizes, build_specs

SD15 = ModelConfig(vae_scale_factor=8, latent_channels=4, text_length=77, text_dim=768, vocab_size=49408,
                   block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, unet_out_channels=4,
                   image_channels=3, control_channels=3)


def specs(precision="fp16", pool=False):
    return {s.name: s for s in build_specs(SD15, [("canny", pool)], precision)}


def test_sd15_profiles_default_sizes():
    s, sizes = specs(), Sizes()  # 256-1024 px, batch 1-4 (x2 for CFG)
    assert SD15.num_residuals == 13 and SD15.size_multiple == 64
    unet = s["unet"].profile(sizes, 8)
    assert unet["sample"] == [[1, 4, 32, 32], [2, 4, 64, 64], [8, 4, 128, 128]]
    assert unet["timestep"] == [[1], [1], [1]]
    assert unet["encoder_hidden_states"] == [[1, 77, 768], [2, 77, 768], [8, 77, 768]]
    assert unet["down_0"] == [[1, 320, 32, 32], [2, 320, 64, 64], [8, 320, 128, 128]]
    assert unet["down_3"] == [[1, 320, 16, 16], [2, 320, 32, 32], [8, 320, 64, 64]]
    assert unet["mid"] == [[1, 1280, 4, 4], [2, 1280, 8, 8], [8, 1280, 16, 16]]
    assert s["hint_canny"].profile(sizes, 8)["control_map"] == [[1, 3, 256, 256], [2, 3, 512, 512], [8, 3, 1024, 1024]]
    assert s["vae_decoder"].profile(sizes, 8)["latents"][2] == [4, 4, 128, 128]  # images only, no CFG doubling
    assert s["controlnet_canny"].profile(sizes, 8)["scales"] == [[13], [13], [13]]
    for spec in s.values():
        tb.check_profile(spec.profile(sizes, 8))


def test_spec_dtypes_and_names():
    s = specs("fp16")
    unet = s["unet"]
    assert [io.name for io in unet.inputs[:3]] == ["sample", "timestep", "encoder_hidden_states"]
    assert [io.name for io in unet.inputs[3:]] == [io.name for io in s["controlnet_canny"].outputs]
    assert {io.dtype for io in unet.inputs} == {"float16", "float32"}  # timestep stays float32
    assert s["text_encoder"].inputs[0].dtype == "int64"
    assert s["unet"].dynamic_axes()["down_4"] == {0: "B", 2: "h_2", 3: "w_2"}
    pooled = specs(pool=True)["controlnet_canny"].outputs
    assert pooled[5].dims == ("B", 640, 1, 1)


def test_bad_profiles_and_sizes_refused():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        tb.check_profile({"sample": [[1, 4, 64, 64], [2, 4, 32, 32], [8, 4, 128, 128]]})
    with pytest.raises(ValueError, match="ranks differ"):
        tb.check_profile({"sample": [[1, 4, 64], [2, 4, 64, 64], [8, 4, 128, 128]]})
    with pytest.raises(ValueError, match="multiple of 64"):
        Sizes(min_size=200).check(64)
    with pytest.raises(ValueError, match="min_size <= opt_size <= max_size"):
        Sizes(min_size=512, opt_size=256).check(64)
    with pytest.raises(ValueError, match="max_batch"):
        Sizes(max_batch=0).check(64)


def test_buffer_shapes_from_inputs():
    unet = specs("fp32")["unet"]
    shapes = {io.name: io.shape(dict(B=3, h=64, w=96)) for io in unet.inputs}
    assert solve_variables(list(unet.inputs), shapes) == dict(B=3, h=64, w=96)
    assert unet.output_shapes(dict(B=3, h=64, w=96)) == {"noise_pred": (3, 4, 64, 96)}
    assert shapes["mid"] == (3, 1280, 8, 12)
    shapes["down_7"] = (3, 1280, 16, 16)
    with pytest.raises(ValueError, match="down_7"):
        solve_variables(list(unet.inputs), shapes)
    hint = specs("fp32")["hint_canny"]
    with pytest.raises(ValueError, match="not a multiple of 8"):
        solve_variables(list(hint.inputs), {"control_map": (1, 3, 100, 96)})


def test_plan_key_and_timing_cache_name():
    profile = specs()["unet"].profile(Sizes(), 8)
    key = tb.plan_key("abc", profile, "fp16", "10.9.0", "NVIDIA H100 80GB HBM3")
    assert key == tb.plan_key("abc", profile, "fp16", "10.9.0", "NVIDIA H100 80GB HBM3")
    assert key != tb.plan_key("abc", profile, "fp16", "10.9.0", "NVIDIA H100 80GB HBM3", tb.TrtBuildConfig(refittable=False))
    other_sizes = specs()["unet"].profile(dataclasses.replace(Sizes(), max_size=768), 8)
    changed = [tb.plan_key("abd", profile, "fp16", "10.9.0", "NVIDIA H100 80GB HBM3"),
               tb.plan_key("abc", other_sizes, "fp16", "10.9.0", "NVIDIA H100 80GB HBM3"),
               tb.plan_key("abc", profile, "fp32", "10.9.0", "NVIDIA H100 80GB HBM3"),
               tb.plan_key("abc", profile, "fp16", "11.4.0", "NVIDIA H100 80GB HBM3"),
               tb.plan_key("abc", profile, "fp16", "10.9.0", "NVIDIA L4")]
    assert len({key, *changed}) == 6
    assert tb.timing_cache_name("10.9.0", "NVIDIA H100 80GB HBM3") == "timing-trt10.9.0-nvidia-h100-80gb-hbm3.cache"


def test_auto_backend_without_tensorrt_picks_onnxruntime():
    from engine.backends import pick_backend, tensorrt_usable

    usable, why = tensorrt_usable()
    backend, reason = pick_backend("auto")
    assert backend == ("tensorrt" if usable else "onnxruntime") and why in reason
    if not usable:
        with pytest.raises(ValueError, match="cannot run here"):
            pick_backend("tensorrt")


def test_tensorrt_runtime_on_gpu(tmp_path, tiny_dir):
    """Build plans for the tiny model and compare with torch; only where TensorRT and CUDA exist."""
    from engine.backends import tensorrt_usable

    usable, why = tensorrt_usable()
    if not usable:
        pytest.skip(f"TensorRT cannot run here: {why}")
    from engine.build import main

    out = tmp_path / "engine"
    code = main(["--model", str(tiny_dir["model"]), "--controlnet", str(tiny_dir["canny"]), "--out", str(out),
                 "--backend", "tensorrt", "--min-size", "64", "--max-size", "128", "--no-progress"])
    assert code == 0
    from engine import Runner

    runner = Runner(engine_dir=str(out))
    assert runner.backend.name == "tensorrt" and runner.device.type == "cuda"
    assert torch.cuda.is_available()


SDXL = dataclasses.replace(SD15, text_dim=768, block_out_channels=(320, 640, 1280), scaling_factor=0.13025,
                           family="sdxl", context_dim=2048, text_dim_2=1280, pooled_dim=1280, vocab_size_2=49408,
                           vae_fp32=True)


def test_sdxl_profiles_at_1024():
    """SDXL's engines (fp16, 1024²): the UNet and ControlNets take text_embeds and time_ids (float32: sizes are
    exact there), 2048-wide context and 10 residuals; a ControlNet-Union adds its types; the VAE stays fp32
    (its fp16 overflow: force_upcast); every profile is one TensorRT accepts."""
    s = {x.name: x for x in build_specs(SDXL, [("canny", False, None), ("union", False, 6)], "fp16")}
    sizes = Sizes(min_size=768, opt_size=1024, max_size=1024, max_batch=2)
    assert SDXL.num_residuals == 10
    unet = s["unet"].profile(sizes, 8)
    assert [io.name for io in s["unet"].inputs[:5]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                      "time_ids"]
    assert unet["sample"] == [[1, 4, 96, 96], [2, 4, 128, 128], [4, 4, 128, 128]]
    assert unet["encoder_hidden_states"][2] == [4, 77, 2048]
    assert unet["text_embeds"] == [[1, 1280], [2, 1280], [4, 1280]] and unet["time_ids"][2] == [4, 6]
    assert {io.name: io.dtype for io in s["unet"].inputs}["time_ids"] == "float32"
    assert unet["mid"][2] == [4, 1280, 32, 32]
    union = s["controlnet_union"].profile(sizes, 8)
    assert union["control_type"][2] == [4, 6] and union["scales"] == [[10], [10], [10]]
    hint = s["hint_union"]
    assert [(io.name, io.dtype) for io in hint.inputs[1:]] == [("control_type_index", "int64"),
                                                                ("condition_scale", "float16")]
    assert "control_type" not in s["controlnet_canny"].profile(sizes, 8)
    assert s["text_encoder_2"].outputs[1].name == "text_embeds"
    assert {io.dtype for io in s["vae_decoder"].inputs + s["vae_decoder"].outputs} == {"float32"}
    for spec in s.values():
        tb.check_profile(spec.profile(sizes, 8))

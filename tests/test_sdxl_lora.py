"""SDXL LoRA: diffusers/peft and kohya files (lora_unet_*, lora_te1_*, lora_te2_*, and SGM-named
lora_unet_input_blocks_*) on the tiny SDXL model equal StableDiffusionXLControlNetPipeline's load_lora_weights +
set_adapters + fuse_lora, switched on one Runner without reloading; a LoRA of the other family is refused
naming both. fp32 on the CPU, max abs <= 1e-5.
"""
from __future__ import annotations

import re

import numpy as np
import PIL.Image
import pytest
import torch

from tests.conftest import max_errors
from tests.test_lora import TEXT_TARGETS, UNET_TARGETS, _kohya, _peft_lora

TOL = 1e-5
GEN = dict(prompt="a photo of an astronaut", negative_prompt="blurry", height=64, width=64, num_inference_steps=3,
           seed=3)


def _sgm(key: str, layers: int = 2) -> str:
    """kohya's SDXL name of a diffusers UNet attention module (SGM blocks: input_blocks_<n>_1, middle_block_1,
    output_blocks_<n>_1), the layout _maybe_map_sgm_blocks_to_diffusers maps back."""
    down = re.match(r"lora_unet_down_blocks_(\d)_attentions_(\d)_(.*)", key)
    if down:
        block, layer, rest = map(str, down.groups())
        return f"lora_unet_input_blocks_{1 + int(block) * (layers + 1) + int(layer)}_1_{rest}"
    up = re.match(r"lora_unet_up_blocks_(\d)_attentions_(\d)_(.*)", key)
    if up:
        block, layer, rest = map(str, up.groups())
        return f"lora_unet_output_blocks_{int(block) * (layers + 1) + int(layer)}_1_{rest}"
    mid = re.match(r"lora_unet_mid_block_attentions_0_(.*)", key)
    return f"lora_unet_middle_block_1_{mid.group(1)}" if mid else key


def save_sdxl_lora_files(tiny_sdxl_dir, out) -> dict:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model = tiny_sdxl_dir["model"]
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    text_2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    unet_a, config_a = _peft_lora(unet, UNET_TARGETS, r=4, alpha=4, seed=1)
    text_a, text_config_a = _peft_lora(text, TEXT_TARGETS, r=2, alpha=2, seed=2)
    text_b, text_config_b = _peft_lora(text_2, TEXT_TARGETS, r=2, alpha=1, seed=3)
    StableDiffusionXLPipeline.save_lora_weights(
        out / "diffusers", unet_lora_layers=unet_a, text_encoder_lora_layers=text_a, text_encoder_2_lora_layers=text_b,
        unet_lora_adapter_metadata=config_a.to_dict(), text_encoder_lora_adapter_metadata=text_config_a.to_dict(),
        text_encoder_2_lora_adapter_metadata=text_config_b.to_dict(), safe_serialization=True)
    files = {"diffusers": (out / "diffusers" / "pytorch_lora_weights.safetensors").rename(out / "sdxl_diffusers.safetensors")}
    # kohya: the second encoder keeps transformers' text_model level in its module names
    kohya = {**_kohya(unet_a, "lora_unet", 4), **_kohya(text_a, "lora_te1_text_model", 2), **_kohya(text_b, "lora_te2", 1)}
    files["kohya"] = out / "sdxl_kohya.safetensors"
    save_file(kohya, str(files["kohya"]))
    files["kohya_sgm"] = out / "sdxl_kohya_sgm.safetensors"
    save_file({_sgm(k): v for k, v in kohya.items()}, str(files["kohya_sgm"]))
    files["sd15_kohya"] = out / "sd15_kohya.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2)},
              str(files["sd15_kohya"]))
    return files


@pytest.fixture(scope="module")
def files(tiny_sdxl_dir, tmp_path_factory):
    return save_sdxl_lora_files(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl-loras"))


@pytest.fixture(scope="module")
def control():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def runner(tiny_sdxl_dir):
    from engine import Runner

    return Runner(model=str(tiny_sdxl_dir["model"]), controlnet=str(tiny_sdxl_dir["canny"]), device="cpu")


def diffusers_image(tiny_sdxl_dir, control, loras):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    net = ControlNetModel.from_pretrained(tiny_sdxl_dir["canny"])
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_dir["model"], controlnet=net,
                                                               add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if loras:
        names = [f"l{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, [w for _, w in loras])
        pipe.fuse_lora()
    kwargs = {k: v for k, v in GEN.items() if k != "seed"}
    return pipe(image=control, generator=torch.Generator("cpu").manual_seed(GEN["seed"]), output_type="np",
                **kwargs).images


def ours(runner, control):
    return runner.generate(image=control, scheduler="euler", output_type="np", preprocess=False, **GEN).images


def test_switches_equal_diffusers(tiny_sdxl_dir, files, runner, control):
    base = ours(runner, control)
    for loras in ([(files["diffusers"], 0.8)], [(files["kohya"], -0.6)], [(files["kohya_sgm"], 0.7)]):
        runner.set_loras([(str(p), w) for p, w in loras])
        assert sorted(runner.loras.active[0][0].parts) == ["text_encoder", "text_encoder_2", "unet"]
        got, expected = ours(runner, control), diffusers_image(tiny_sdxl_dir, control, loras)
        abs_err = max_errors(got, expected)[0]
        print(f"sdxl lora {loras[0][0].name}: max abs {abs_err:.2e}")
        assert abs_err <= TOL
        assert max_errors(got, base)[0] > 1e-3  # the LoRA changes the image
    runner.set_loras([])
    assert np.array_equal(ours(runner, control), base)  # [] is the base model bit for bit


def test_other_family_refused_naming_both(tiny_dir, files, runner, lora_files):
    from engine import Runner
    from engine.lora import LoraError

    with pytest.raises(LoraError, match=r"is an SD1\.5 LoRA .* the model is SDXL"):
        runner.set_loras([(str(files["sd15_kohya"]), 1.0)])
    sd15 = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), device="cpu")
    with pytest.raises(LoraError, match=r"is an SDXL LoRA .* the model is SD1\.5"):
        sd15.set_loras([(str(files["kohya"]), 1.0)])

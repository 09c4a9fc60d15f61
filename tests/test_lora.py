"""LoRA: Runner(loras=...) and set_loras equal diffusers' load_lora_weights + set_adapters + fuse_lora.

The test LoRAs are made with peft on the tiny models (random, non-zero lora_B) and saved as diffusers saves
them; the kohya file is written here from the same tensors with kohya's documented names
(`lora_unet_<module path, dots as underscores>.lora_down/.lora_up/.alpha`, text encoder `lora_te_text_model_...`).
Each case is compared against a fresh diffusers pipeline loaded from the same tiny folders; fp32 on the CPU,
max abs <= 1e-5. One Runner goes through the whole sequence, so switching is what is tested.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import max_errors
from tests.test_build import one_torch_thread  # noqa: F401 (an autouse fixture: steady timings on 2 shared cores)

TOL = 1e-5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
GEN = dict(prompt="a photo of an astronaut", negative_prompt="blurry", height=64, width=64, num_inference_steps=3,
           guidance_scale=7.5, seed=3)


def _peft_lora(model, targets, r, alpha, seed):
    """peft LoRA tensors for a copy of `model` (random lora_A and lora_B) and its config."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
    model = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    state = get_peft_model_state_dict(model)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, config


def _kohya(state: dict, prefix: str, alpha: float) -> dict:
    """peft names -> kohya's: <prefix>_<module with dots as underscores>.lora_down/.lora_up, plus .alpha."""
    out = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        name = f"{prefix}_{module.replace('.', '_')}"
        out[f"{name}.lora_down.weight" if kind == "A.weight" else f"{name}.lora_up.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora_files(tiny_dir, out) -> dict:
    """Tiny LoRAs of the tiny model, as diffusers and kohya write them, under `out`: name -> file (the session
    fixture `lora_files` of tests/conftest.py, made once for every module that uses LoRA files)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir["model"], subfolder="unet")
    text = CLIPTextModel.from_pretrained(tiny_dir["model"], subfolder="text_encoder")
    unet_a, config_a = _peft_lora(unet, UNET_TARGETS, r=4, alpha=8, seed=1)
    text_a, text_config_a = _peft_lora(text, TEXT_TARGETS, r=2, alpha=3, seed=2)
    unet_b, config_b = _peft_lora(unet, ["attn2.to_k", "attn2.to_v", "ff.net.2"], r=2, alpha=1, seed=3)
    files = {}

    def save(name, **layers):
        StableDiffusionPipeline.save_lora_weights(out / name, safe_serialization=True, **layers)
        files[name] = out / name / "pytorch_lora_weights.safetensors"
        files[name] = files[name].rename(out / f"{name}.safetensors")

    save("unet_only", unet_lora_layers=unet_a, unet_lora_adapter_metadata=config_a.to_dict())
    save("unet_text", unet_lora_layers=unet_a, text_encoder_lora_layers=text_a,
         unet_lora_adapter_metadata=config_a.to_dict(), text_encoder_lora_adapter_metadata=text_config_a.to_dict())
    save("second", unet_lora_layers=unet_b, unet_lora_adapter_metadata=config_b.to_dict())
    kohya = {**_kohya(unet_a, "lora_unet", 8), **_kohya(text_a, "lora_te_text_model", 3)}
    files["kohya"] = out / "kohya_style.safetensors"
    save_file(kohya, str(files["kohya"]))
    return files


@pytest.fixture(scope="module")
def runner(tiny_dir):
    from engine import Runner

    return Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="torch", device="cpu")


@pytest.fixture(scope="module")
def control(edges):
    return edges.resize((64, 64))


def diffusers_image(tiny_dir, control, loras):
    """A fresh diffusers ControlNet pipeline with `loras` [(file, weight)] loaded, weighted and fused."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    net = ControlNetModel.from_pretrained(tiny_dir["canny"])
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_dir["model"], controlnet=net, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    if loras:
        names = [f"l{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, [w for _, w in loras])
        pipe.fuse_lora()
    kwargs = {k: v for k, v in GEN.items() if k != "seed"}
    return pipe(image=control, generator=torch.Generator("cpu").manual_seed(GEN["seed"]), output_type="np", **kwargs).images


def ours(runner, control):
    return runner.generate(image=control, preprocess=False, output_type="np", **GEN).images


def state(runner):
    backend = runner.backend
    return {**{f"unet.{k}": v.clone() for k, v in backend.unet_model.unet.state_dict().items()},
            **{f"te.{k}": v.clone() for k, v in backend.text_encoder.text_encoder.state_dict().items()}}


def test_set_loras_sequence_equals_diffusers(tiny_dir, lora_files, runner, control):
    """Add, change the weight, add the text encoder, two at once, kohya, remove, re-add: each a fresh diffusers."""
    f = lora_files
    base_state = state(runner)
    base = ours(runner, control)
    assert max_errors(base, diffusers_image(tiny_dir, control, []))[0] <= TOL
    cases = [
        ("unet 1.0", [(f["unet_only"], 1.0)]),
        ("unet 0.5", [(f["unet_only"], 0.5)]),
        ("unet + text encoder", [(f["unet_text"], 1.0)]),
        ("two LoRAs 0.7 / -0.4", [(f["unet_text"], 0.7), (f["second"], -0.4)]),
        ("kohya 0.8", [(f["kohya"], 0.8)]),
    ]
    images = {}
    for label, loras in cases:
        runner.set_loras(loras)
        image = ours(runner, control)
        expected = diffusers_image(tiny_dir, control, loras)
        abs_err, rel_err = max_errors(image, expected)
        change = max_errors(image, base)[0]
        print(f"lora parity {label}: max abs {abs_err:.2e} (rel {rel_err:.2e}); change from the base {change:.2e}")
        assert abs_err <= TOL, label
        assert change > 1000 * TOL, f"{label}: the LoRA hardly changes the image ({change:.2e})"
        images[label] = image
    runner.set_loras([])
    assert np.array_equal(ours(runner, control), base), "[] must give the base model's image bit for bit"
    after = state(runner)
    assert all(torch.equal(after[k], v) for k, v in base_state.items()), "[] must restore every weight bit for bit"
    runner.set_loras([(f["unet_text"], 1.0)])
    again = ours(runner, control)
    assert np.array_equal(again, images["unet + text encoder"]), "re-adding a LoRA gives the same image"
    runner.set_loras([])


def test_kohya_file_merges_to_the_same_weights(lora_files, runner):
    """The kohya file (written from the peft tensors with kohya's names) is the same LoRA, bit for bit."""
    from engine.lora import load_lora, merged_weights

    kohya, peft = load_lora(lora_files["kohya"]), load_lora(lora_files["unet_text"])
    for graph in ("unet", "text_encoder"):
        names = kohya.parts[graph].params()
        assert names == peft.parts[graph].params()
        base = runner.backend.get_weights(graph, names)
        ours_k, ours_p = merged_weights([(kohya, 0.8)], graph, base), merged_weights([(peft, 0.8)], graph, base)
        assert all(torch.equal(ours_k[n], ours_p[n]) for n in names), graph


def test_runner_loras_argument(tiny_dir, lora_files, runner, control):
    from engine import Runner

    loras = [(str(lora_files["unet_text"]), 0.6)]
    fresh = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="torch", device="cpu",
                   loras=loras)
    result = fresh.generate(image=control, preprocess=False, output_type="np", **GEN)
    runner.set_loras(loras)
    try:
        assert np.array_equal(result.images, ours(runner, control)), "Runner(loras=) is set_loras at load"
    finally:
        runner.set_loras([])
    (entry,) = result.parameters["loras"]
    assert entry["name"] == "unet_text" and entry["weight"] == 0.6 and len(entry["hash"]) == 12


def test_fused_qkv_sees_the_switch(tiny_dir, lora_files, runner, control):
    """With fused Q/K/V the fused projection weights follow the LoRA (they are refreshed in place)."""
    from engine import Runner
    from engine.optimizations import TorchOptimizations

    fused = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="torch", device="cpu",
                   optimizations=TorchOptimizations(fused_qkv=True))
    loras = [(lora_files["unet_only"], 1.0)]
    fused.set_loras(loras)
    runner.set_loras(loras)
    try:
        assert max_errors(ours(fused, control), ours(runner, control))[0] <= TOL
    finally:
        runner.set_loras([])


def _errors_case(tmp_path, tiny_dir):
    from safetensors.torch import save_file

    not_lora = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.randn(4, 4)}, str(not_lora))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 8),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(8, 2)}, str(sdxl))
    other = tmp_path / "other_arch.safetensors"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 768), f"{key}.lora_B.weight": torch.randn(32, 4)}, str(other))
    missing_layer = tmp_path / "missing_layer.safetensors"
    key = "unet.down_blocks.0.attentions.7.proj_in"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 32), f"{key}.lora_B.weight": torch.randn(32, 4)}, str(missing_layer))
    broken = tmp_path / "nan.safetensors"
    key = "unet.down_blocks.0.attentions.0.proj_in"
    save_file({f"{key}.lora_A.weight": torch.full((4, 32), float("nan")), f"{key}.lora_B.weight": torch.randn(32, 4)},
              str(broken))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    return [
        (tmp_path / "absent.safetensors", 1.0, "does not exist"),
        (not_lora, 1.0, "is not a LoRA"),
        (garbage, 1.0, "not a LoRA file"),
        (sdxl, 1.0, "SDXL"),
        (other, 1.0, "another architecture"),
        (missing_layer, 1.0, "another architecture"),
        (broken, 1.0, "non-finite"),
        (sdxl, float("nan"), "finite number"),
        (not_lora, "1", "finite number"),
    ]


def test_clear_errors_change_nothing(tmp_path, tiny_dir, lora_files, runner, control):
    runner.set_loras([(lora_files["unet_only"], 1.0)])
    before = ours(runner, control)
    for source, weight, message in _errors_case(tmp_path, tiny_dir):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            runner.set_loras([(lora_files["second"], 1.0), (source, weight)])
    assert np.array_equal(ours(runner, control), before), "a refused set_loras leaves the weights as they were"
    runner.set_loras([])


def test_parse_prompt_loras_and_hash(tmp_path, lora_files):
    from engine.lora import LoraError, lora_short_hash, parse_prompt_loras

    folder = tmp_path / "loras" / "styles"
    folder.mkdir(parents=True)
    target = folder / "ink.safetensors"
    target.write_bytes(lora_files["second"].read_bytes())
    prompt, loras = parse_prompt_loras("a cat <lora:ink:0.6>, sketch <lora:ink>", tmp_path / "loras")
    assert prompt == "a cat , sketch " and loras == [(target, 2.0)]  # A1111: applied once per tag at the last weight
    assert parse_prompt_loras("no tags here", None) == ("no tags here", [])
    for bad, message in [("<lora:nope:1>", "no LoRA named 'nope'"), ("<lora:ink:x>", "not a number"),
                         ("<lora:ink:1:0.5>", "separate"), ("<hypernet:ink:1>", "only <lora")]:
        with pytest.raises((LoraError, FileNotFoundError), match=message):
            parse_prompt_loras(f"a cat {bad}", tmp_path / "loras")
    # A1111's hash of a .safetensors LoRA: sha256 of everything after the 8-byte length and the JSON header.
    import hashlib

    data = target.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_short_hash(target) == hashlib.sha256(data[8 + header:]).hexdigest()[:12]


def test_frozen_compiled_step_refuses_a_switch_once_compiled(tiny_dir, lora_files):
    """freeze_weights bakes the weights into the compiled step: LoRAs given before the first step are in it;
    a switch after it is refused, never silently ignored. (Compiling itself is tested elsewhere: ~90 s.)"""
    from engine import Runner

    runner = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), backend="torch", device="cpu",
                    optimizations="cpu-compiled", loras=[(lora_files["unet_only"], 1.0)])
    runner.backend.frozen_step_ran = True  # what the first compiled step sets (TorchBackend._run_step)
    with pytest.raises(ValueError, match="frozen weights"):
        runner.set_loras([])

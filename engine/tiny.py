"""The built-in tiny model: real diffusers/transformers classes with small configs and random weights.

Same layout as SD1.5 (4 UNet levels, 2 layers each, so 12 skip residuals + 1 mid residual, VAE scale
factor 8, 77-token CLIP text encoder) at a size that builds in well under a second. Weights come from a
fixed seed on the CPU generator, so every machine gets the same ones; the global RNG is left untouched.

`ControlNetModel.from_unet` zero-initialises the 13 zero convs and the hint encoder's last conv, and the
default init shrinks the control image through the hint encoder's 8 convs: left like that, the control
image changes nothing and no test could catch a control bug. So every zero-initialised layer is
re-randomised here, the hint encoder with He-style init so its output keeps unit scale.

The preset "sd15-random" is the full SD1.5 architecture with random weights, for export and benchmarks;
"tiny-inpaint" is "tiny" with a 9-channel inpainting UNet (latents + mask + masked-image latents, the
layout of runwayml/stable-diffusion-inpainting). Its ControlNets stay 4-channel, as real ones do.
"tiny-lcm" is "tiny" with an LCM-distilled UNet's guidance embedding input (`time_cond_proj_dim`, as
SimianLuo/LCM_Dreamshaper_v7 has, there 256).

TAESD presets (`Runner(vae=...)`, engine/vaes.py): "tiny-taesd" is a small AutoencoderTiny (same 8x
layout as madebyollin/taesd), "taesd-random" the real TAESD architecture with random weights (benchmarks).

    python -m engine.tiny --out DIR     # writes DIR/model (a diffusers SD folder) and DIR/controlnet-*
"""
from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MODEL_SEED = 0
MAX_TOKENS = 77  # CLIP's context length, as in SD1.5

# SD1.5's scheduler/scheduler_config.json, key for key: the named schedulers are built from it exactly as
# from the real model's. Keys it lacks (timestep_spacing, prediction_type) take each scheduler class's own
# default, as they do for the real SD1.5, so this is written as a file rather than by save_pretrained.
SCHEDULER_CONFIG = dict(
    _class_name="PNDMScheduler",
    _diffusers_version="0.6.0",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=8,
)

HINT_CHANNELS = (8, 8, 16, 16)  # SD1.5: (16, 32, 96, 256); 4 entries keep the 8-conv, /8 structure

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=64,
    scaling_factor=0.18215,
)

TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=MAX_TOKENS,
    hidden_act="quick_gelu",
    projection_dim=32,
)

# The full SD1.5 architecture (its repos' config.json files), for export and benchmark checks with
# random weights. Building it takes ~15 s and 4 GB; never a test's default.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT_CONFIG = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=MAX_TOKENS,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_HINT_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ModelPreset:
    unet: dict
    vae: dict
    text: dict
    hint_channels: tuple
    text_vocab_size: int | None  # None: the hand-made vocab's size


INPAINT_UNET_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent channels
TINY_TIME_COND_DIM = 32  # the tiny LCM UNet's guidance embedding width (LCM_Dreamshaper_v7: 256)

PRESETS = {
    "tiny": ModelPreset(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, HINT_CHANNELS, None),
    "tiny-inpaint": ModelPreset(dict(UNET_CONFIG, in_channels=INPAINT_UNET_CHANNELS), VAE_CONFIG, TEXT_CONFIG,
                                HINT_CHANNELS, None),
    "tiny-lcm": ModelPreset(dict(UNET_CONFIG, time_cond_proj_dim=TINY_TIME_COND_DIM), VAE_CONFIG, TEXT_CONFIG,
                            HINT_CHANNELS, None),
    "sd15-random": ModelPreset(SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG, SD15_HINT_CHANNELS, 49408),
}

# AutoencoderTiny configs. Four blocks each way, as TAESD: the 8x scale factor diffusers reads from
# block_out_channels. "taesd-random" is AutoencoderTiny's defaults, which are madebyollin/taesd's config.
TAESD_PRESETS = {
    "tiny-taesd": dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                       num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)),
    "taesd-random": {},
}

# A few merges so the byte-level BPE really merges something; enough to tokenise any text.
MERGES = ["a n", "t h", "th e</w>", "o n</w>", "i n", "an d</w>", "s t", "e r</w>", "a r", "o r"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-shaped vocab: the 256 byte characters, the same with the end-of-word mark, merges, specials."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, [tuple(m.split()) for m in MERGES]


def tiny_tokenizer() -> CLIPTokenizer:
    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def _seeded_generator(name: str) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(MODEL_SEED + zlib.crc32(name.encode()))


@torch.no_grad()
def _randomise(module: torch.nn.Module, gen: torch.Generator, std_scale: float = 1.0) -> None:
    """Re-draw every parameter from the seeded generator (He-style for weights, small for biases)."""
    for name, p in module.named_parameters():
        if p.dim() > 1:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) * std_scale * (2.0 / fan_in) ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def _construct(name: str, factory, *args, **kwargs):
    """Run a model constructor with its default init drawn from `name`'s seed; the global RNG is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED + zlib.crc32(name.encode()))
        return factory(*args, **kwargs).eval()


def tiny_unet(preset: str = "tiny") -> UNet2DConditionModel:
    return _construct("unet", UNet2DConditionModel, **PRESETS[preset].unet)


def tiny_vae(preset: str = "tiny") -> AutoencoderKL:
    return _construct("vae", AutoencoderKL, **PRESETS[preset].vae)


@torch.no_grad()
def tiny_taesd(preset: str = "tiny-taesd") -> AutoencoderTiny:
    """An AutoencoderTiny of a TAESD_PRESETS entry with seeded random weights. The default init decodes
    every latent to nearly the same dark image (std 0.06 around -1), which no test could tell apart; at
    0.7x He scale, and the last conv's bias at 0.5 (the decoder maps [0, 1] to [-1, 1]), a random latent
    decodes to std 0.4 around 0.3, 4% of pixels clipped."""
    vae = _construct("taesd", AutoencoderTiny, **TAESD_PRESETS[preset])
    if preset.startswith("tiny"):
        _randomise(vae, _seeded_generator("taesd"), std_scale=0.7)
        vae.decoder.layers[-1].bias.fill_(0.5)
    return vae


def text_config(preset: str = "tiny") -> CLIPTextConfig:
    vocab, _ = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=PRESETS[preset].text_vocab_size or len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **PRESETS[preset].text,
    )


def tiny_text_encoder(preset: str = "tiny") -> CLIPTextModel:
    return _construct("text_encoder", CLIPTextModel, text_config(preset))


def tiny_controlnet(
    name: str = "tiny", unet: UNet2DConditionModel | None = None, preset: str = "tiny"
) -> ControlNetModel:
    """A ControlNet copied from the UNet (as real ones are), its zero-initialised layers randomised.

    `name` seeds the randomised layers, so two names give two different ControlNets. An inpainting
    (9-channel) UNet's ControlNet is copied from a 4-channel UNet of the same preset: ControlNets see the
    latents only. An LCM UNet's is copied from the same UNet without the guidance embedding, as real LCM
    models use SD1.5's ControlNets (diffusers' from_unet cannot copy a UNet that has one).
    """
    latent_channels = PRESETS[preset].vae["latent_channels"]
    if unet is None or unet.config.in_channels != latent_channels or unet.config.time_cond_proj_dim is not None:
        config = dict(PRESETS[preset].unet, in_channels=latent_channels, time_cond_proj_dim=None)
        unet = _construct("unet", UNet2DConditionModel, **config)
    net = _construct(
        "controlnet/" + name,
        ControlNetModel.from_unet,
        unet,
        conditioning_embedding_out_channels=PRESETS[preset].hint_channels,
    )
    gen = _seeded_generator("controlnet/" + name)
    _randomise(net.controlnet_cond_embedding, gen)
    # The hint is added to conv_in's output; at plain He scale it is ~7x smaller than that and a flipped
    # control image moves the tiny model's output by only ~8e-3. Gain 8 makes it ~5e-2 (see test_runner).
    _randomise(net.controlnet_cond_embedding.conv_out, gen, std_scale=8.0)
    _randomise(net.controlnet_down_blocks, gen, std_scale=0.5)
    _randomise(net.controlnet_mid_block, gen, std_scale=0.5)
    return net.eval()


def tiny_components(preset: str = "tiny") -> dict:
    """The SD models of a preset, keyed as in a diffusers pipeline (scheduler: SCHEDULER_CONFIG)."""
    return dict(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(preset),
        unet=tiny_unet(preset),
        vae=tiny_vae(preset),
    )


def save_tiny(out: str | Path, controlnets: tuple[str, ...] = ("canny",), preset: str = "tiny") -> dict[str, Path]:
    """Write a tiny preset as a normal diffusers folder, plus one folder per named tiny ControlNet.

    Returns {"model": DIR/model, "<name>": DIR/controlnet-<name>, ...}.
    """
    out = Path(out)
    parts = tiny_components(preset)
    model_dir = out / "model"
    for key in ("text_encoder", "unet", "vae", "tokenizer"):
        parts[key].save_pretrained(model_dir / key)
    (model_dir / "scheduler").mkdir()
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (model_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    paths = {"model": model_dir}
    for name in controlnets:
        paths[name] = out / f"controlnet-{name}"
        tiny_controlnet(name, parts["unet"], preset).save_pretrained(paths[name])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the tiny model into")
    parser.add_argument("--controlnet", action="append", default=None, help="tiny ControlNet names (default canny)")
    parser.add_argument("--preset", choices=[p for p in PRESETS if p.startswith("tiny")], default="tiny",
                        help="tiny: 4-channel UNet; tiny-inpaint: 9-channel inpainting UNet; tiny-lcm: an LCM UNet "
                             "(guidance embedding input)")
    parser.add_argument("--taesd", action="store_true", help="also write DIR/taesd, a tiny AutoencoderTiny (--vae)")
    args = parser.parse_args(argv)
    paths = save_tiny(args.out, tuple(args.controlnet or ["canny"]), args.preset)
    if args.taesd:
        paths["taesd"] = Path(args.out) / "taesd"
        tiny_taesd().save_pretrained(paths["taesd"])
    for key, path in paths.items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()

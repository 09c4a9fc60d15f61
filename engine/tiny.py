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

"tiny-sdxl" is the SDXL layout at tiny size: 3 UNet levels (so 9 skip residuals + 1 mid), transformer layers
per block, the "text_time" added embedding (pooled text embeds + 6 size ids), two text encoders (CLIPTextModel
and CLIPTextModelWithProjection, whose penultimate hidden states are concatenated), SDXL's VAE scaling and
scheduler config. Its registry ControlNets are SDXL ControlNets (`ControlNetModel.from_unet`), and the
union names give a tiny `ControlNetUnionModel` (its task transformer at the UNet's first width). "sdxl-random"
is the full SDXL base architecture with random weights (2.57 B UNet parameters, 10.3 GB in fp32), for the
benchmark, with an SDXL ControlNet shaped like diffusers/controlnet-canny-sdxl-1.0-small.

    python -m engine.tiny --out DIR     # writes DIR/model (a diffusers SD folder) and DIR/controlnet-*
"""
from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, ControlNetUnionModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json, key for key.
SDXL_SCHEDULER_CONFIG = dict(
    _class_name="EulerDiscreteScheduler",
    _diffusers_version="0.19.0.dev0",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)
SDXL_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)

# SDXL at tiny size: the text encoders are 32 and 64 wide, so the UNet's cross-attention context is 96 and its
# added embedding takes the 64-wide pooled embeds plus 6 time ids of 8 sinusoidal features each.
SDXL_TINY_TEXT_CONFIG = dict(TEXT_CONFIG)
SDXL_TINY_TEXT_2_CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                               max_position_embeddings=MAX_TOKENS, hidden_act="gelu", projection_dim=64)
SDXL_TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    norm_num_groups=8,
    cross_attention_dim=32 + 64,
    attention_head_dim=(2, 4, 4),  # SDXL's config names the head count so (diffusers' naming)
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=SDXL_TIME_IDS * 8 + 64,
)
SDXL_TINY_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)

# stabilityai/stable-diffusion-xl-base-1.0's unet, vae, text_encoder and text_encoder_2 config.json files.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE_CONFIG = dict(SD15_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT_CONFIG = dict(SD15_TEXT_CONFIG)
SDXL_TEXT_2_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                          max_position_embeddings=MAX_TOKENS, hidden_act="gelu", projection_dim=1280)
# The sdxl-random ControlNet: SDXL's ControlNetModel.from_unet with the transformer layers of
# diffusers/controlnet-canny-sdxl-1.0-small's config (0, 0, 1: attention in the mid block only).
SDXL_SMALL_CONTROLNET = dict(transformer_layers_per_block=(0, 0, 1))


@dataclass(frozen=True)
class ModelPreset:
    unet: dict
    vae: dict
    text: dict
    hint_channels: tuple
    text_vocab_size: int | None  # None: the hand-made vocab's size
    text_2: dict | None = None  # SDXL's second text encoder (CLIPTextModelWithProjection)
    scheduler: dict = None  # the scheduler config (default: SD1.5's)
    controlnet: dict = None  # ControlNet config overrides (e.g. fewer transformer layers than the UNet)

    @property
    def family(self) -> str:
        return "sdxl" if self.text_2 is not None else "sd15"


INPAINT_UNET_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent channels
TINY_TIME_COND_DIM = 32  # the tiny LCM UNet's guidance embedding width (LCM_Dreamshaper_v7: 256)

PRESETS = {
    "tiny": ModelPreset(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, HINT_CHANNELS, None),
    "tiny-inpaint": ModelPreset(dict(UNET_CONFIG, in_channels=INPAINT_UNET_CHANNELS), VAE_CONFIG, TEXT_CONFIG,
                                HINT_CHANNELS, None),
    "tiny-lcm": ModelPreset(dict(UNET_CONFIG, time_cond_proj_dim=TINY_TIME_COND_DIM), VAE_CONFIG, TEXT_CONFIG,
                            HINT_CHANNELS, None),
    "sd15-random": ModelPreset(SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG, SD15_HINT_CHANNELS, 49408),
    "tiny-sdxl": ModelPreset(SDXL_TINY_UNET_CONFIG, SDXL_TINY_VAE_CONFIG, SDXL_TINY_TEXT_CONFIG, HINT_CHANNELS, None,
                             text_2=SDXL_TINY_TEXT_2_CONFIG, scheduler=SDXL_SCHEDULER_CONFIG),
    "sdxl-random": ModelPreset(SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, SDXL_TEXT_CONFIG, SD15_HINT_CHANNELS, 49408,
                               text_2=SDXL_TEXT_2_CONFIG, scheduler=SDXL_SCHEDULER_CONFIG,
                               controlnet=SDXL_SMALL_CONTROLNET),
}
UNION_TASK_HEADS = 4  # the union's task transformer heads below SDXL's width (xinsir's: 8 at width 320)


def scheduler_config(preset: str) -> dict:
    return dict(PRESETS[preset].scheduler or SCHEDULER_CONFIG)

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


def tiny_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The hand-made CLIP tokenizer. SDXL's second tokenizer pads with "!" (its tokenizer_2 config does)."""
    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS, pad_token=pad_token)


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


def text_config(preset: str = "tiny", second: bool = False) -> CLIPTextConfig:
    """The text encoder's config; `second`: SDXL's text_encoder_2."""
    vocab, _ = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=PRESETS[preset].text_vocab_size or len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["!" if second else "<|endoftext|>"],
        **(PRESETS[preset].text_2 if second else PRESETS[preset].text),
    )


def tiny_text_encoder(preset: str = "tiny") -> CLIPTextModel:
    return _construct("text_encoder", CLIPTextModel, text_config(preset))


def tiny_text_encoder_2(preset: str = "tiny-sdxl") -> CLIPTextModelWithProjection:
    return _construct("text_encoder_2", CLIPTextModelWithProjection, text_config(preset, second=True))


def tiny_controlnet(
    name: str = "tiny", unet: UNet2DConditionModel | None = None, preset: str = "tiny", union: bool = False
) -> ControlNetModel | ControlNetUnionModel:
    """A ControlNet copied from the UNet (as real ones are), its zero-initialised layers randomised.

    `name` seeds the randomised layers, so two names give two different ControlNets. An inpainting
    (9-channel) UNet's ControlNet is copied from a 4-channel UNet of the same preset: ControlNets see the
    latents only. An LCM UNet's is copied from the same UNet without the guidance embedding, as real LCM
    models use SD1.5's ControlNets (diffusers' from_unet cannot copy a UNet that has one). `union`: a
    ControlNetUnionModel (SDXL presets), its task transformer randomised too.
    """
    p = PRESETS[preset]
    latent_channels = p.vae["latent_channels"]
    if unet is None or unet.config.in_channels != latent_channels or unet.config.time_cond_proj_dim is not None:
        unet = _construct("unet", UNet2DConditionModel, **dict(p.unet, in_channels=latent_channels, time_cond_proj_dim=None))
    copy = not p.controlnet
    if p.controlnet:  # fewer transformer layers than the UNet: its config only (a meta UNet), weights not copied
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(dict(unet.config, **p.controlnet))
    if union:
        net = _construct("controlnet/" + name, _union_from_unet, unet, p.hint_channels, copy)
    else:
        net = _construct("controlnet/" + name, ControlNetModel.from_unet, unet,
                         conditioning_embedding_out_channels=p.hint_channels, load_weights_from_unet=copy)
    gen = _seeded_generator("controlnet/" + name)
    _randomise(net.controlnet_cond_embedding, gen)
    # The hint is added to conv_in's output; at plain He scale it is ~7x smaller than that and a flipped
    # control image moves the tiny model's output by only ~8e-3. Gain 8 makes it ~5e-2 (see test_runner).
    _randomise(net.controlnet_cond_embedding.conv_out, gen, std_scale=8.0)
    _randomise(net.controlnet_down_blocks, gen, std_scale=0.5)
    _randomise(net.controlnet_mid_block, gen, std_scale=0.5)
    if union:  # spatial_ch_projs starts at zero; the task embedding's default draw is 18x the hint's scale
        _randomise(net.spatial_ch_projs, gen)
        with torch.no_grad():
            net.task_embedding.copy_(torch.randn(net.task_embedding.shape, generator=gen))
    return net.eval()


def _union_from_unet(unet: UNet2DConditionModel, hint_channels: tuple, copy: bool = True) -> ControlNetUnionModel:
    """ControlNetUnionModel.from_unet with its task transformer as wide as the UNet's first block (its
    defaults are SDXL's 320, which from_unet does not adapt)."""
    width = unet.config.block_out_channels[0]
    base = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels,
                                          load_weights_from_unet=False)
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}  # "_use_default_values" would win
    heads = UNION_TASK_HEADS if width < 320 else 8
    net = ControlNetUnionModel.from_config(dict(config, num_trans_channel=width, num_proj_channel=width,
                                                num_trans_head=heads))
    for part in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block") if copy else ():
        getattr(net, part).load_state_dict(getattr(unet, part).state_dict(), strict=False)  # as from_unet copies
    return net


def tiny_components(preset: str = "tiny") -> dict:
    """The SD models of a preset, keyed as in a diffusers pipeline (scheduler: `scheduler_config(preset)`)."""
    parts = dict(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(preset),
        unet=tiny_unet(preset),
        vae=tiny_vae(preset),
    )
    if PRESETS[preset].text_2 is not None:
        parts.update(tokenizer_2=tiny_tokenizer(pad_token="!"), text_encoder_2=tiny_text_encoder_2(preset))
    return parts


def save_tiny(out: str | Path, controlnets: tuple[str, ...] = ("canny",), preset: str = "tiny",
              unions: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write a tiny preset as a normal diffusers folder, plus one folder per named tiny ControlNet (and per
    name in `unions`, a tiny ControlNet-Union; SDXL presets).

    Returns {"model": DIR/model, "<name>": DIR/controlnet-<name>, ...}.
    """
    out = Path(out)
    parts = tiny_components(preset)
    model_dir = out / "model"
    sdxl = PRESETS[preset].family == "sdxl"
    keys = ("text_encoder", "unet", "vae", "tokenizer") + (("text_encoder_2", "tokenizer_2") if sdxl else ())
    for key in keys:
        parts[key].save_pretrained(model_dir / key)
    config = scheduler_config(preset)
    (model_dir / "scheduler").mkdir()
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:  # stable-diffusion-xl-base-1.0's model_index.json
        for key in ("feature_extractor", "requires_safety_checker", "safety_checker"):
            del index[key]
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    (model_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    paths = {"model": model_dir}
    for name in controlnets:
        paths[name] = out / f"controlnet-{name}"
        tiny_controlnet(name, parts["unet"], preset).save_pretrained(paths[name])
    for name in unions:
        paths[name] = out / f"controlnet-{name}"
        tiny_controlnet(name, parts["unet"], preset, union=True).save_pretrained(paths[name])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the tiny model into")
    parser.add_argument("--controlnet", action="append", default=None, help="tiny ControlNet names (default canny)")
    parser.add_argument("--preset", choices=[p for p in PRESETS if p.startswith("tiny")], default="tiny",
                        help="tiny: 4-channel UNet; tiny-inpaint: 9-channel inpainting UNet; tiny-lcm: an LCM UNet "
                             "(guidance embedding input); tiny-sdxl: SDXL layout")
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

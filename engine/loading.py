"""Loading the models and ControlNets: Hugging Face ids, local diffusers folders, single files, or a tiny preset.

The model's family (SD1.5 or SDXL: one text encoder or two, the UNet's added "text_time" embedding) is read
from the model's own config, never given: `model_family` reads only configs (or a single file's tensor
names), so a ControlNet of another family is refused (`check_controlnet_family`) before any weight loads.
Everything returns plain diffusers/transformers modules in eval mode on the requested device and dtype;
nothing here knows about backends.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import tiny
from engine.registry import TINY, ControlNetSpec, registered_name

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONTROLNET = {"sd15": "canny", "sdxl": "sdxl-canny"}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
SDXL_COMPONENTS = COMPONENTS + ("tokenizer_2", "text_encoder_2")
# A tensor only SDXL single-file checkpoints have (the second text encoder; diffusers' CHECKPOINT_KEY_NAMES)
SDXL_CHECKPOINT_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
SDXL_CONTROLNET_KEY = "add_embedding.linear_1.weight"  # original-format SDXL ControlNets (diffusers: controlnet_xl)


@dataclass
class SDModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    source: str
    family: str = "sd15"  # "sd15" or "sdxl", from the UNet's config
    tokenizer_2: object = None  # SDXL's second tokenizer and text encoder (CLIPTextModelWithProjection)
    text_encoder_2: torch.nn.Module | None = None
    # SDXL pipelines: with no negative prompt, the unconditional embeddings are zeros (model_index.json's flag,
    # default True in diffusers' SDXL pipelines)
    force_zeros_for_empty_prompt: bool = False


def _hub_error(what: str, source: str, err: Exception) -> OSError:
    return OSError(
        f"could not load {what} from {source!r}: it is neither a local folder nor reachable on the Hugging "
        f"Face Hub or in its cache ({type(err).__name__}: {err}). Pass a local diffusers folder, or 'tiny'."
    )


def _place(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    if next(module.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        module = module.to(dtype=dtype)
    return module.to(device=device).eval().requires_grad_(False)


def unet_family(config) -> str:
    """The family a UNet (or ControlNet) config belongs to: SDXL's has the "text_time" added embedding."""
    added = config.get("addition_embed_type")
    if added is None:
        return "sd15"
    if added == "text_time":
        return "sdxl"
    raise ValueError(f"a UNet with addition_embed_type={added!r} is neither SD1.5 nor SDXL; supported: None (SD1.5) "
                     "and 'text_time' (SDXL)")


def _check_model_arg(model) -> str:
    if not isinstance(model, (str, Path)) or not str(model).strip():
        raise ValueError(
            f"model must be one of {', '.join(tiny.PRESETS)}, a Hugging Face id, a local folder or a "
            f".safetensors file, got {model!r}"
        )
    return str(model)


def _tensor_names(path: str) -> set[str]:
    """The tensor names of a .safetensors file, from its header only."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def model_family(model: str) -> str:
    """"sd15" or "sdxl", from the model's own config (or a single file's tensor names); no weights are read."""
    model = _check_model_arg(model)
    if model in tiny.PRESETS:
        return tiny.PRESETS[model].family
    if model.endswith(".safetensors"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"model file {model!r} does not exist")
        return "sdxl" if SDXL_CHECKPOINT_KEY in _tensor_names(model) else "sd15"
    path = Path(model)
    if path.is_dir():
        config = path / "unet" / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"model folder {model!r} has no unet/config.json; a diffusers folder has "
                                    f"{', '.join(COMPONENTS)} (SDXL also tokenizer_2, text_encoder_2)")
        return unet_family(json.loads(config.read_text()))
    _check_hub_id(model)
    from diffusers import UNet2DConditionModel

    try:
        return unet_family(UNet2DConditionModel.load_config(model, subfolder="unet"))
    except OSError as err:
        raise _hub_error("the model's UNet config", model, err) from err


def _check_hub_id(model: str) -> None:
    path = Path(model)
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r} is not a folder, a .safetensors file or a Hugging Face id (owner/name)")


def load_sd(model: str, device: torch.device, dtype: torch.dtype) -> SDModels:
    """The model's components (SD1.5 or SDXL, by its config) from a tiny preset, a local diffusers folder, a
    .safetensors file or a hub id."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model = _check_model_arg(model)
    family = model_family(model)
    force_zeros = family == "sdxl"
    if model in tiny.PRESETS:
        parts = tiny.tiny_components(model)
        scheduler_config = tiny.scheduler_config(model)
    elif model.endswith(".safetensors"):
        parts, scheduler_config, force_zeros = _load_single_file(model, family)
    else:
        path = Path(model)
        wanted = SDXL_COMPONENTS if family == "sdxl" else COMPONENTS
        if path.is_dir():
            missing = [c for c in wanted if not (path / c).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"model folder {model!r} is missing the component folder(s) {', '.join(missing)}; "
                    f"a diffusers {FAMILY_NAMES[family]} folder has {', '.join(wanted)}"
                )
        try:
            parts = dict(
                tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
                text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
                vae=AutoencoderKL.from_pretrained(model, subfolder="vae"),
            )
            if family == "sdxl":
                parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
                parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
                force_zeros = bool(_pipeline_config(model).get("force_zeros_for_empty_prompt", True))
            scheduler_config = _scheduler_config(model)
        except OSError as err:
            if path.is_dir():
                raise
            raise _hub_error("the SD model", model, err) from err
    second = parts.get("text_encoder_2")
    return SDModels(
        tokenizer=parts["tokenizer"],
        text_encoder=_place(parts["text_encoder"], device, dtype),
        unet=_place(parts["unet"], device, dtype),
        vae=_place(parts["vae"], device, _vae_dtype(parts["vae"], dtype)),
        scheduler_config=scheduler_config,
        source=model,
        family=family,
        tokenizer_2=parts.get("tokenizer_2"),
        text_encoder_2=None if second is None else _place(second, device, dtype),
        force_zeros_for_empty_prompt=force_zeros,
    )


def _vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The SDXL VAE overflows in fp16 (its config says `force_upcast`): kept in fp32 there, as diffusers' SDXL
    pipelines upcast it to decode. bf16 has fp32's range and stays as asked."""
    return torch.float32 if dtype == torch.float16 and vae.config.get("force_upcast", False) else dtype


def _scheduler_config(model: str) -> dict:
    from diffusers import PNDMScheduler

    return dict(PNDMScheduler.load_config(model, subfolder="scheduler"))


def _pipeline_config(model: str) -> dict:
    """model_index.json (diffusers' pipeline config); {} where there is none."""
    path = Path(model) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(model))
    except OSError:
        return {}


def _load_single_file(path: str, family: str) -> tuple[dict, dict, bool]:
    """An original-format checkpoint (one .safetensors file), converted by diffusers' pipeline of its family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline.from_single_file(path)
        else:
            pipe = StableDiffusionPipeline.from_single_file(path, safety_checker=None, requires_safety_checker=False)
    except OSError as err:  # the converter fetches the family's configs from the hub (or its cache)
        raise _hub_error("the single-file checkpoint's config", path, err) from err
    parts = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae)
    if family == "sdxl":
        parts.update(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)
    force_zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", family == "sdxl"))
    return parts, dict(pipe.scheduler.config), force_zeros


# ---- ControlNets ---------------------------------------------------------------------------------------------


def _tiny_controlnet(spec: ControlNetSpec, model: str) -> bool:
    """A tiny model's registry names (and "tiny") give tiny ControlNets of the model's preset."""
    return spec.source == TINY or (model in tiny.PRESETS and registered_name(spec.name) is not None)


def controlnet_config(spec: ControlNetSpec, model: str) -> dict:
    """The ControlNet's config (`_class_name` says ControlNetModel or ControlNetUnionModel), read without its
    weights: a folder's or the hub's config.json, the config.json beside a .safetensors file, or for an
    original-format file a stand-in made from its tensor names ({"family": ...} only)."""
    if _tiny_controlnet(spec, model):
        preset = model if model in tiny.PRESETS else "tiny"
        family = tiny.PRESETS[preset].family
        return {"_class_name": "ControlNetUnionModel" if spec.union else "ControlNetModel",
                "family": spec.family or family}
    source = spec.source
    path = Path(source)
    if source.endswith(".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"ControlNet file {source!r} does not exist")
        config = path.with_name("config.json")
        if config.is_file():
            return json.loads(config.read_text())
        return {"_class_name": "ControlNetModel",
                "family": "sdxl" if SDXL_CONTROLNET_KEY in _tensor_names(source) else "sd15"}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"ControlNet folder {source!r} has no config.json (not a diffusers ControlNet)")
        return json.loads((path / "config.json").read_text())
    from diffusers import ControlNetModel

    try:
        return dict(ControlNetModel.load_config(source))
    except OSError as err:
        raise _hub_error("the ControlNet's config", source, err) from err


def config_family(config: dict) -> str:
    return config["family"] if "family" in config else unet_family(config)


def is_union(config: dict) -> bool:
    return config.get("_class_name") == "ControlNetUnionModel"


def check_controlnet_family(spec: ControlNetSpec, model: str, family: str, config: dict | None = None) -> dict:
    """Refuse a ControlNet of another family than the model's, naming both, before any weights load (a registry
    name's family is known without reading anything); returns the net's config."""
    if config is None and spec.family is not None and spec.family != family and spec.source != TINY:
        config = {"family": spec.family}
    config = controlnet_config(spec, model) if config is None else config
    net_family = config_family(config)
    if net_family != family:
        other = DEFAULT_CONTROLNET[family]
        raise ValueError(
            f"ControlNet {spec.name!r} is an {FAMILY_NAMES[net_family]} ControlNet and model {model!r} is "
            f"{FAMILY_NAMES[family]}: they cannot be mixed; use an {FAMILY_NAMES[family]} ControlNet (e.g. "
            f"{other!r}) or an {FAMILY_NAMES[net_family]} model")
    return config


def load_controlnet(spec: ControlNetSpec, sd: SDModels, device, dtype) -> torch.nn.Module:
    """A ControlNetModel or ControlNetUnionModel (by its config) for a resolved spec, after the family check.
    With a tiny model, registry names give tiny ControlNets."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    config = check_controlnet_family(spec, sd.source, sd.family)
    if _tiny_controlnet(spec, sd.source):
        # Random-weight models get random ControlNets for registry names. from_unet copies the UNet's
        # weights into a fresh CPU fp32 ControlNet, whatever their device.
        preset = sd.source if sd.source in tiny.PRESETS else "tiny"
        return _place(tiny.tiny_controlnet(spec.name, sd.unet, preset, union=spec.union), device, dtype)
    cls = ControlNetUnionModel if is_union(config) else ControlNetModel
    source = spec.source
    path = Path(source)
    try:
        if source.endswith(".safetensors"):
            net = _controlnet_from_file(path, cls)
        else:
            net = cls.from_pretrained(source)
    except OSError as err:
        if path.exists():
            raise
        raise _hub_error("the ControlNet", source, err) from err
    _check_matches_unet(net, sd.unet, source)
    return _place(net, device, dtype)


def _controlnet_from_file(path: Path, cls) -> torch.nn.Module:
    """A single .safetensors ControlNet: diffusers-format weights with a config.json beside it, or an
    original-format checkpoint that diffusers converts (its config then comes from the hub or cache)."""
    from safetensors.torch import load_file

    config = path.with_name("config.json")
    if config.is_file():
        net = cls.from_config(json.loads(config.read_text()))
        missing, unexpected = net.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"ControlNet file {str(path)!r} does not match {str(config)!r}: "
                f"{len(missing)} missing and {len(unexpected)} unexpected weights (e.g. {(missing + unexpected)[:3]})"
            )
        return net
    return cls.from_single_file(str(path))


def _check_matches_unet(net, unet, source: str) -> None:
    net_channels = tuple(net.config.block_out_channels)
    unet_channels = tuple(unet.config.block_out_channels)
    if net_channels != unet_channels or net.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ValueError(
            f"ControlNet {source!r} (channels {net_channels}, text dim {net.config.cross_attention_dim}) does "
            f"not fit the model's UNet (channels {unet_channels}, text dim {unet.config.cross_attention_dim})"
        )

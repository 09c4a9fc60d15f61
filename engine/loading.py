"""Loading SD1.5 and ControlNets: Hugging Face ids, local diffusers folders, single files, or "tiny".

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
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@dataclass
class SDModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    source: str


def _hub_error(what: str, source: str, err: Exception) -> OSError:
    return OSError(
        f"could not load {what} from {source!r}: it is neither a local folder nor reachable on the Hugging "
        f"Face Hub or in its cache ({type(err).__name__}: {err}). Pass a local diffusers folder, or 'tiny'."
    )


def _place(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    if next(module.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        module = module.to(dtype=dtype)
    return module.to(device=device).eval().requires_grad_(False)


def load_sd(model: str, device: torch.device, dtype: torch.dtype) -> SDModels:
    """The SD1.5 components from "tiny", a local diffusers folder, a .safetensors file or a hub id."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not isinstance(model, (str, Path)) or not str(model).strip():
        raise ValueError(
            f"model must be one of {', '.join(tiny.PRESETS)}, a Hugging Face id, a local folder or a "
            f".safetensors file, got {model!r}"
        )
    model = str(model)
    if model in tiny.PRESETS:
        parts = tiny.tiny_components(model)
        scheduler_config = dict(tiny.SCHEDULER_CONFIG)
    elif model.endswith(".safetensors"):
        parts, scheduler_config = _load_single_file(model)
    else:
        path = Path(model)
        if path.is_dir():
            missing = [c for c in COMPONENTS if not (path / c).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"model folder {model!r} is missing the component folder(s) {', '.join(missing)}; "
                    f"a diffusers SD1.5 folder has {', '.join(COMPONENTS)}"
                )
        elif path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
            raise FileNotFoundError(
                f"model {model!r} is not a folder, a .safetensors file or a Hugging Face id (owner/name)"
            )
        try:
            parts = dict(
                tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
                text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
                vae=AutoencoderKL.from_pretrained(model, subfolder="vae"),
            )
            scheduler_config = _scheduler_config(model)
        except OSError as err:
            if path.is_dir():
                raise
            raise _hub_error("the SD model", model, err) from err
    return SDModels(
        tokenizer=parts["tokenizer"],
        text_encoder=_place(parts["text_encoder"], device, dtype),
        unet=_place(parts["unet"], device, dtype),
        vae=_place(parts["vae"], device, dtype),
        scheduler_config=scheduler_config,
        source=model,
    )


def _scheduler_config(model: str) -> dict:
    from diffusers import PNDMScheduler

    return dict(PNDMScheduler.load_config(model, subfolder="scheduler"))


def _load_single_file(path: str) -> tuple[dict, dict]:
    """An original-format SD1.5 checkpoint (one .safetensors file), converted by diffusers."""
    from diffusers import StableDiffusionPipeline

    if not Path(path).is_file():
        raise FileNotFoundError(f"model file {path!r} does not exist")
    try:
        pipe = StableDiffusionPipeline.from_single_file(path, safety_checker=None, requires_safety_checker=False)
    except OSError as err:  # the converter fetches SD1.5's configs from the hub (or its cache)
        raise _hub_error("the single-file checkpoint's config", path, err) from err
    parts = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae)
    return parts, dict(pipe.scheduler.config)


def load_controlnet(spec: ControlNetSpec, sd: SDModels, device, dtype) -> torch.nn.Module:
    """A ControlNetModel for a resolved spec. With the tiny model, registry names give tiny ControlNets."""
    from diffusers import ControlNetModel

    if spec.source == TINY or (sd.source in tiny.PRESETS and registered_name(spec.name) is not None):
        # Random-weight models get random ControlNets for registry names. from_unet copies the UNet's
        # weights into a fresh CPU fp32 ControlNet, whatever their device.
        preset = sd.source if sd.source in tiny.PRESETS else "tiny"
        return _place(tiny.tiny_controlnet(spec.name, sd.unet, preset), device, dtype)
    source = spec.source
    path = Path(source)
    try:
        if source.endswith(".safetensors"):
            net = _controlnet_from_file(path)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"ControlNet folder {source!r} has no config.json (not a diffusers ControlNet)")
            net = ControlNetModel.from_pretrained(source)
        else:
            net = ControlNetModel.from_pretrained(source)
    except OSError as err:
        if path.exists():
            raise
        raise _hub_error("the ControlNet", source, err) from err
    _check_matches_unet(net, sd.unet, source)
    return _place(net, device, dtype)


def _controlnet_from_file(path: Path) -> torch.nn.Module:
    """A single .safetensors ControlNet: diffusers-format weights with a config.json beside it, or an
    original-format checkpoint that diffusers converts (its config then comes from the hub or cache)."""
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"ControlNet file {str(path)!r} does not exist")
    config = path.with_name("config.json")
    if config.is_file():
        net = ControlNetModel.from_config(json.loads(config.read_text()))
        missing, unexpected = net.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"ControlNet file {str(path)!r} does not match {str(config)!r}: "
                f"{len(missing)} missing and {len(unexpected)} unexpected weights (e.g. {(missing + unexpected)[:3]})"
            )
        return net
    return ControlNetModel.from_single_file(str(path))


def _check_matches_unet(net, unet, source: str) -> None:
    net_channels = tuple(net.config.block_out_channels)
    unet_channels = tuple(unet.config.block_out_channels)
    if net_channels != unet_channels or net.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ValueError(
            f"ControlNet {source!r} (channels {net_channels}, text dim {net.config.cross_attention_dim}) does "
            f"not fit the model's UNet (channels {unet_channels}, text dim {unet.config.cross_attention_dim})"
        )

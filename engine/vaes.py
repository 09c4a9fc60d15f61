"""VAEs beside the model's own: TAESD (diffusers' AutoencoderTiny) or another AutoencoderKL.

    Runner(model=..., vae="madebyollin/taesd")     # decodes and encodes with TAESD by default
    runner.generate(..., vae="model")              # this call with the model's own VAE

A Runner always holds the model's own VAE (named "model") and at most one more, `Runner(vae=SOURCE)`,
which then is the default of every call; a call's `vae` picks either ("model", the extra's name, or its
source as given). TAESD decodes a 512² image in a fraction of the full decoder's time (2.4 M parameters
against 49 M) at lower fidelity; the A1111 routes also use it for the per-step previews.

What differs between the two kinds, as diffusers' pipelines handle them:
- AutoencoderKL encodes to a distribution: img2img and inpaint draw its sample from the generation's
  generator (retrieve_latents), then scale by the VAE's scaling_factor (0.18215 for SD1.5's).
- AutoencoderTiny encodes to latents directly: no generator draw at all (so the draws after it come one
  earlier than with the full VAE, exactly as in diffusers), and its scaling_factor is 1.0.
Both decode `latents / scaling_factor` to images in [-1, 1].
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL = "model"  # the model's own VAE
# A1111's sd_vae values for "no separate VAE file": Automatic is the default, None the model's own.
A1111_AUTOMATIC, A1111_NONE = "Automatic", "None"


@dataclass(frozen=True)
class VaeInfo:
    name: str  # MODEL, or the extra VAE's name (engine dir artefacts vae_decoder_<name>, vae_encoder_<name>)
    source: str  # as recorded (engine.manifest.source_id)
    tiny: bool  # AutoencoderTiny: the encoder gives latents, no distribution to sample
    scaling_factor: float


def vae_name(source: str) -> str:
    """A file-name-safe name for a VAE source: a preset as it is, else the folder or id's last part."""
    from engine import tiny

    if source in tiny.TAESD_PRESETS:
        return source
    base = Path(str(source).rstrip("/")).name.removesuffix(".safetensors")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "vae"
    return f"{name}-vae" if name == MODEL else name


def info(vae: torch.nn.Module, name: str, source: str) -> VaeInfo:
    from diffusers import AutoencoderTiny

    from engine.manifest import source_id

    return VaeInfo(name, source_id(source), isinstance(vae, AutoencoderTiny), float(vae.config.scaling_factor))


def load_vae(source: str, device=torch.device("cpu"), dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An AutoencoderTiny or AutoencoderKL (eval, on `device` in `dtype`) from a preset name, a local
    diffusers folder or a Hugging Face id; the class is read from its config.json."""
    vae = _load(source)
    if next(vae.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        vae = vae.to(dtype=dtype)
    return vae.to(device=device)


def _load(source: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL, AutoencoderTiny

    from engine import tiny

    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise ValueError(f"vae must be {', '.join(tiny.TAESD_PRESETS)}, a Hugging Face id (e.g. madebyollin/taesd) or "
                         f"a local diffusers VAE folder, got {source!r}")
    source = str(source)
    if source in tiny.TAESD_PRESETS:
        return tiny.tiny_taesd(source).eval().requires_grad_(False)
    path = Path(source)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"vae {source!r} is not a diffusers VAE folder (no config.json); give a folder such "
                                "as madebyollin/taesd's, or its Hugging Face id")
    classes = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}
    try:
        config = json.loads((path / "config.json").read_text()) if path.is_dir() else AutoencoderKL.load_config(source)
    except OSError as err:
        raise OSError(f"could not load the VAE {source!r}: it is neither a local folder nor reachable on the Hugging "
                      f"Face Hub or in its cache ({type(err).__name__}: {err})") from err
    cls = classes.get(config.get("_class_name"))
    if cls is None:
        raise ValueError(f"vae {source!r} is a {config.get('_class_name')!r}; allowed: {', '.join(classes)}")
    return cls.from_pretrained(source).eval().requires_grad_(False)


def check_fits(vae: torch.nn.Module, source: str, latent_channels: int, vae_scale_factor: int) -> None:
    """The VAE must work on the model's latents: same channels, same 8x scale."""
    channels = int(vae.config.latent_channels)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if channels != latent_channels or scale != vae_scale_factor:
        raise ValueError(f"vae {source!r} has {channels} latent channels at {scale}x; the model's latents have "
                         f"{latent_channels} at {vae_scale_factor}x: use a VAE made for this model family")


def pick(requested: str | None, vaes: dict[str, VaeInfo], default: str) -> VaeInfo:
    """A call's `vae` among the loaded ones: None (or A1111's "Automatic") is the Runner's default; "model"
    (or A1111's "None") the model's own; else an extra VAE's name or source."""
    from engine.manifest import source_id

    if requested is None or requested == A1111_AUTOMATIC:
        return vaes[default]
    if requested == A1111_NONE:
        return vaes[MODEL]
    if not isinstance(requested, str):
        raise ValueError(f"vae must be a string naming a loaded VAE, got {requested!r}")
    for vae in vaes.values():
        if requested in (vae.name, vae.source) or source_id(requested) == vae.source:
            return vae
    loaded = ", ".join(repr(v.name) for v in vaes.values())
    raise ValueError(f"vae {requested!r} is not loaded; this Runner has {loaded} (load another with Runner(vae=...))")

"""What a Runner runs, loaded one of two ways into one `LoadedParts`: torch models (the torch backend)
or an engine dir's built graphs (onnxruntime, tensorrt). Everything after loading reads only this object,
so a new mode or weight source is added once, not once per way of loading.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from engine.families import SD15, SDXL
from engine.loading import (DEFAULT_CONTROLNET, DEFAULT_MODEL, check_controlnet_family, load_controlnet, load_sd,
                            model_family)
from engine.optimizations import cpu_has_native_bf16
from engine.registry import resolve
from engine.vaes import MODEL, VaeInfo, check_fits, load_vae, vae_name
from engine.vaes import info as vae_info
from engine.vaes import pick as pick_vae

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedParts:
    """What a Runner runs, however it was loaded (torch models, or an engine dir's graphs)."""

    backend: object
    device: torch.device
    dtype: torch.dtype
    model: str  # the model's source as recorded
    controlnet_specs: list
    unions: list  # per ControlNet: a ControlNet-Union's number of condition types, None for a plain one
    family: object  # engine.families: what differs between model families (the prompts' conditioning)
    tokenizer: object
    scheduler_config: dict
    vae_scale_factor: int
    latent_channels: int  # the VAE's latent channels (4)
    unet_channels: int  # the UNet's input channels: 4, or 9 for an inpainting UNet
    global_pool: bool
    num_residuals: int
    layers_per_block: int  # the UNet's (SDXL kohya LoRAs name its blocks by it)
    can_encode_images: bool  # a VAE encoder is there (img2img, inpaint)
    vaes: dict  # name -> engine.vaes.VaeInfo: the model's own ("model") and the extra one (Runner(vae=...))
    default_vae: str  # the name a call's vae=None picks


def make_family(name: str, tokenizer, tokenizer_2=None, force_zeros_for_empty_prompt: bool = True,
                time_cond_proj_dim: int | None = None):
    """The engine.families object of a loaded model."""
    if name == "sdxl":
        return SDXL(tokenizer, tokenizer_2, force_zeros_for_empty_prompt)
    return SD15(tokenizer, time_cond_proj_dim)


def load_engine_dir(engine_dir, model, names, backend, device, dtype, vae=None) -> LoadedParts:
    """Built graphs: the manifest-checked backend plus the tokenizer and scheduler config the build copied
    into the dir; no torch weights are loaded. `vae`: one of the extra VAEs built into it (--vae), made the
    default."""
    from engine.backends import open_engine_dir
    from engine.manifest import EngineDirError

    asked = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    built = open_engine_dir(engine_dir, model, names, backend, dtype=asked)
    config = built.manifest.config
    if device is not None and torch.device(device).type != built.backend.device.type:
        raise ValueError(f"device {str(device)!r}: this engine dir's {built.backend.name} backend runs on "
                         f"{built.backend.device}; leave device unset")
    built_dtype = torch.float16 if built.manifest.precision == "fp16" else torch.float32
    built_dtype = getattr(built.backend, "dtype", built_dtype)  # openvino: the precision it runs (bf16 asked)
    if asked is not None and asked != built_dtype:
        raise ValueError(f"dtype {dtype!r}: this engine dir was built in {built.manifest.precision}; "
                         "leave dtype unset, or build another dir with --precision")
    latent_channels = int(config["latent_channels"])
    model_vae = VaeInfo(MODEL, built.manifest.model["source"], False, float(config.get("scaling_factor", 0.18215)))
    vaes = {MODEL: model_vae, **{v["name"]: VaeInfo(v["name"], v["source"], bool(v["tiny"]), float(v["scaling_factor"]))
                                 for v in built.manifest.vaes}}
    default_vae = MODEL
    if vae is not None:
        try:
            default_vae = pick_vae(vae, vaes, MODEL).name
        except ValueError:
            have = ", ".join(v["source"] for v in built.manifest.vaes) or "none"
            raise EngineDirError(f"vae {vae!r} was not built into engine dir {str(engine_dir)!r} (extra VAEs: {have}): "
                                 "rebuild it with python -m engine.build --vae ...") from None
    return LoadedParts(
        backend=built.backend,
        device=built.backend.device,
        dtype=built_dtype,
        model=built.manifest.model["source"],
        controlnet_specs=built.controlnet_specs,
        unions=[n.get("union") for n in built.nets],
        family=make_family(config.get("family", "sd15"), built.tokenizer, built.tokenizer_2,
                           bool(config.get("force_zeros_for_empty_prompt", True)), config.get("time_cond_proj_dim")),
        tokenizer=built.tokenizer,
        scheduler_config=built.scheduler_config,
        vae_scale_factor=int(config["vae_scale_factor"]),
        latent_channels=latent_channels,
        unet_channels=int(config.get("unet_in_channels", latent_channels)),  # dirs built before img2img: 4
        global_pool=built.global_pools[0],
        num_residuals=int(config["num_residuals"]),
        layers_per_block=int(config["layers_per_block"]),
        can_encode_images=getattr(built.backend, "vae_encoder", None) is not None,
        vaes=vaes,
        default_vae=default_vae,
    )


def load_torch(model, names, device, dtype, torch_optimizations, vae=None) -> LoadedParts:
    """`vae`: an extra VAE source (engine/vaes.py), loaded beside the model's own and made the default."""
    from engine.backends.torch_backend import TorchBackend

    model = DEFAULT_MODEL if model is None else model
    family = model_family(model)  # from its config: no weights read yet
    names = [DEFAULT_CONTROLNET[family]] if names is None else names
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16 ('fp32', 'fp16', 'bf16'), got {dtype!r}")
    if dtype == torch.bfloat16 and device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn("dtype bf16 on a CPU without AVX512-BF16 or AMX is emulated, ~30x slower than fp32; "
                      "use dtype='fp32' here", stacklevel=3)
    specs = [resolve(name) for name in names]
    for spec in specs:  # another family's ControlNet is refused before any weights load
        check_controlnet_family(spec, model, family)
    sd = load_sd(model, device, dtype)
    nets = [load_controlnet(spec, sd, device, dtype) for spec in specs]
    vae_scale_factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    vaes = {MODEL: VaeInfo(MODEL, sd.source, False, float(sd.vae.config.scaling_factor))}
    extra = {}
    if vae is not None:
        module = load_vae(vae, device, dtype)
        check_fits(module, vae, int(sd.vae.config.latent_channels), vae_scale_factor)
        found = vae_info(module, vae_name(vae), vae)
        vaes[found.name], extra[found.name] = found, module
    backend = TorchBackend(sd, nets, device, dtype, torch_optimizations, extra)
    return LoadedParts(
        backend=backend,
        device=device,
        dtype=dtype,
        model=sd.source,
        controlnet_specs=specs,
        unions=[int(net.config.num_control_type) if hasattr(net, "task_embedding") else None for net in nets],
        family=make_family(sd.family, sd.tokenizer, sd.tokenizer_2, sd.force_zeros_for_empty_prompt,
                           sd.unet.config.time_cond_proj_dim),
        tokenizer=sd.tokenizer,
        scheduler_config=sd.scheduler_config,
        vae_scale_factor=vae_scale_factor,
        latent_channels=int(sd.vae.config.latent_channels),
        unet_channels=int(sd.unet.config.in_channels),
        global_pool=bool(nets[0].config.global_pool_conditions),
        num_residuals=backend.controlnet_bodies[0].num_residuals,
        layers_per_block=int(sd.unet.config.layers_per_block),
        can_encode_images=True,
        vaes=vaes,
        default_vae=next(iter(extra), MODEL),
    )

"""The ControlNet registry: short names for the SD1.5 ControlNets, their Hugging Face ids and preprocessors.

A name resolves to a `ControlNetSpec`. The ControlNet 1.1 family is registered by its short names
("canny", "depth", ...); the 1.0 `lllyasviel/sd-controlnet-*` ids and the 1.1 ids themselves are
aliases, so passing an id still picks the right preprocessor. Anything else (another id, a local folder,
a .safetensors file) has no preprocessor: its `image` must already be a control map.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ControlNetSpec:
    name: str  # registry name, or the id/path as given for unregistered ControlNets
    source: str  # Hugging Face id, local folder or .safetensors file the weights load from
    preprocessor: str | None  # a module of engine.preprocess.MODULES; None: image is the control map


# name: (ControlNet 1.1 id, 1.0 id or None). The default preprocessor of each comes from engine.preprocess's table.
_FAMILY = {
    "canny": ("lllyasviel/control_v11p_sd15_canny", "lllyasviel/sd-controlnet-canny"),
    "depth": ("lllyasviel/control_v11f1p_sd15_depth", "lllyasviel/sd-controlnet-depth"),
    "openpose": ("lllyasviel/control_v11p_sd15_openpose", "lllyasviel/sd-controlnet-openpose"),
    "mlsd": ("lllyasviel/control_v11p_sd15_mlsd", "lllyasviel/sd-controlnet-mlsd"),
    "normalbae": ("lllyasviel/control_v11p_sd15_normalbae", "lllyasviel/sd-controlnet-normal"),
    "seg": ("lllyasviel/control_v11p_sd15_seg", "lllyasviel/sd-controlnet-seg"),
    "scribble": ("lllyasviel/control_v11p_sd15_scribble", "lllyasviel/sd-controlnet-scribble"),
    "softedge": ("lllyasviel/control_v11p_sd15_softedge", "lllyasviel/sd-controlnet-hed"),
    "lineart": ("lllyasviel/control_v11p_sd15_lineart", None),
    "lineart_anime": ("lllyasviel/control_v11p_sd15s2_lineart_anime", None),
    "shuffle": ("lllyasviel/control_v11e_sd15_shuffle", None),
    "tile": ("lllyasviel/control_v11f1e_sd15_tile", None),
    "inpaint": ("lllyasviel/control_v11p_sd15_inpaint", None),
    "ip2p": ("lllyasviel/control_v11e_sd15_ip2p", None),
}

TINY = "tiny"  # the built-in tiny ControlNet (engine.tiny); with model="tiny" every registry name is tiny


def registry_names() -> list[str]:
    return sorted(_FAMILY) + [TINY]


def _aliases() -> dict[str, str]:
    table = {}
    for name, (v11, v10) in _FAMILY.items():
        table[name] = name
        table[v11.lower()] = name
        if v10:
            table[v10.lower()] = name
    return table


def registered_name(name_or_id: str) -> str | None:
    """The registry name for a short name or a known Hugging Face id, else None."""
    return _aliases().get(name_or_id.lower())


def resolve(controlnet: str) -> ControlNetSpec:
    """Turn what the user gave (name, id, folder, file) into a spec. Unknown ids/paths pass through."""
    if not isinstance(controlnet, str) or not controlnet.strip():
        raise ValueError(
            f"controlnet must be a non-empty string (a registry name, Hugging Face id, folder or "
            f".safetensors file), got {controlnet!r}; registry names: {', '.join(registry_names())}"
        )
    if controlnet == TINY:
        return ControlNetSpec(TINY, TINY, None)
    name = registered_name(controlnet)
    if name is not None:
        from engine.preprocess import default_module

        v11, _ = _FAMILY[name]
        # A known 1.0/1.1 id loads from that id; a short name loads the 1.1 weights.
        source = controlnet if "/" in controlnet else v11
        return ControlNetSpec(name, source, default_module(name))
    looks_like_path_or_id = "/" in controlnet or "\\" in controlnet or controlnet.endswith(".safetensors")
    if not looks_like_path_or_id:
        raise ValueError(
            f"unknown ControlNet name {controlnet!r}: use one of {', '.join(registry_names())}, "
            "a Hugging Face id (owner/name), a local diffusers folder or a .safetensors file"
        )
    return ControlNetSpec(controlnet, controlnet, None)

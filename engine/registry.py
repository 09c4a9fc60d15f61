"""The ControlNet registry: short names for the SD1.5 and SDXL ControlNets, their Hugging Face ids and
preprocessors.

A name resolves to a `ControlNetSpec`. The SD1.5 ControlNet 1.1 family is registered by its short names
("canny", "depth", ...); the 1.0 `lllyasviel/sd-controlnet-*` ids and the 1.1 ids themselves are
aliases, so passing an id still picks the right preprocessor. The SDXL ones have names saying so
("sdxl-canny", "xinsir-openpose", "xinsir-union", ...), their ids likewise aliases. Anything else (another
id, a local folder, a .safetensors file) has no preprocessor: its `image` must already be a control map.

A spec's `family` ("sd15", "sdxl") is what the registry knows before any file is read; whatever the source,
engine/loading.py reads the net's own config and refuses a ControlNet of another family than the model's.
A ControlNet-Union's preprocessor follows each condition's `control_type` (UNION_TYPES).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ControlNetSpec:
    name: str  # registry name, or the id/path as given for unregistered ControlNets
    source: str  # Hugging Face id, local folder or .safetensors file the weights load from
    preprocessor: str | None  # a module of engine.preprocess.MODULES; None: image is the control map
    family: str | None = None  # "sd15" / "sdxl" for registry names; None: read from the net's config
    union: bool = False  # a ControlNetUnionModel (several condition types in one net)


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

# SDXL: name: (Hugging Face id, preprocessor, union)
_SDXL = {
    "sdxl-canny": ("diffusers/controlnet-canny-sdxl-1.0", "canny", False),
    "sdxl-canny-mid": ("diffusers/controlnet-canny-sdxl-1.0-mid", "canny", False),
    "sdxl-canny-small": ("diffusers/controlnet-canny-sdxl-1.0-small", "canny", False),
    "xinsir-canny": ("xinsir/controlnet-canny-sdxl-1.0", "canny", False),
    "xinsir-openpose": ("xinsir/controlnet-openpose-sdxl-1.0", "openpose", False),
    "xinsir-scribble": ("xinsir/controlnet-scribble-sdxl-1.0", "scribble", False),
    "xinsir-tile": ("xinsir/controlnet-tile-sdxl-1.0", "tile", False),
    "xinsir-union": ("xinsir/controlnet-union-sdxl-1.0", None, True),
    # ProMax (adds tile and repaint): xinsir's *_promax files in diffusers' file names, by a diffusers maintainer.
    "xinsir-union-promax": ("OzzyGT/controlnet-union-promax-sdxl-1.0", None, True),
}

# ControlNet-Union condition types: diffusers' `control_mode` index, by the names the model cards use, and
# the preprocessor each type's control map comes from. ProMax adds tile (6) and repaint (7).
UNION_TYPES = {
    "openpose": (0, "openpose"),
    "depth": (1, "depth"),
    "hed": (2, "softedge"), "scribble": (2, "scribble"), "softedge": (2, "softedge"),
    "canny": (3, "canny"), "lineart": (3, "lineart"), "lineart_anime": (3, "lineart_anime"), "mlsd": (3, "mlsd"),
    "normal": (4, "normalbae"),
    "segment": (5, "seg"),
    "tile": (6, "tile"),
    "repaint": (7, "inpaint"),
}

TINY = "tiny"  # the built-in tiny ControlNet (engine.tiny); with a tiny model every registry name is tiny


def registry_names() -> list[str]:
    return sorted(_FAMILY) + sorted(_SDXL) + [TINY]


def _aliases() -> dict[str, str]:
    table = {}
    for name, (v11, v10) in _FAMILY.items():
        table[name] = name
        table[v11.lower()] = name
        if v10:
            table[v10.lower()] = name
    for name, (source, _, _) in _SDXL.items():
        table[name] = name
        table[source.lower()] = name
    return table


def union_type(value) -> tuple[int, str | None]:
    """A union condition type -> (diffusers' control_mode index, the preprocessor of its maps): a name from
    UNION_TYPES or an index (no preprocessor known for an index: its map must be ready, or preprocess= named)."""
    if isinstance(value, str) and value.lower() in UNION_TYPES:
        return UNION_TYPES[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        names = [n for n, (i, _) in UNION_TYPES.items() if i == value]
        return value, (UNION_TYPES[names[0]][1] if len(names) == 1 else None)
    raise ValueError(f"control_type must be a ControlNet-Union type ({', '.join(UNION_TYPES)}) or diffusers' "
                     f"control_mode index (0-7), got {value!r}")


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
    if name in _SDXL:
        source, preprocessor, union = _SDXL[name]
        return ControlNetSpec(name, source, preprocessor, "sdxl", union)
    if name is not None:
        from engine.preprocess import default_module

        v11, _ = _FAMILY[name]
        # A known 1.0/1.1 id loads from that id; a short name loads the 1.1 weights.
        source = controlnet if "/" in controlnet else v11
        return ControlNetSpec(name, source, default_module(name), "sd15")
    looks_like_path_or_id = "/" in controlnet or "\\" in controlnet or controlnet.endswith(".safetensors")
    if not looks_like_path_or_id:
        raise ValueError(
            f"unknown ControlNet name {controlnet!r}: use one of {', '.join(registry_names())}, "
            "a Hugging Face id (owner/name), a local diffusers folder or a .safetensors file"
        )
    return ControlNetSpec(controlnet, controlnet, None)

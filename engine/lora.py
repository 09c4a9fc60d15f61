"""LoRA: load a file with diffusers' own loader, merge it into the weights as diffusers' `fuse_lora` does.

    adapters = [(load_lora("style.safetensors"), 0.8)]
    weights = merged_weights(adapters, base)   # {"unet": {param: new weight}, "text_encoder": {...}}

Loading is diffusers' path for `StableDiffusionControlNetPipeline.load_lora_weights`, step for step:
`StableDiffusionLoraLoaderMixin.lora_state_dict` reads the file (diffusers/peft format, or kohya/A1111's
`lora_unet_*` / `lora_te_*` with `.alpha`, which it converts), the keys are split by the `unet.` /
`text_encoder.` prefix, converted to peft's names with diffusers' converters, and diffusers'
`_create_lora_config` turns ranks, alphas and adapter metadata into the `LoraConfig` it would use. No key is
parsed here. SDXL models go through `StableDiffusionXLLoraLoaderMixin` (as
`StableDiffusionXLControlNetPipeline.load_lora_weights`): kohya's `lora_te1_` / `lora_te2_` and SGM-named
`lora_unet_input_blocks_*` keys, given the UNet's config, and a third part, `text_encoder_2.`. A LoRA of the
other family is refused, naming both, before any weight changes (its kohya prefixes or `text_encoder_2.`
keys say which it is; otherwise the layer shapes do).

Merging: diffusers' `set_adapters(names, weights)` + `fuse_lora()` set each peft layer's scaling to
`weight * lora_alpha / r` (peft's `set_scale`) and `merge()` adds each adapter's delta into the base weight
in the order of the adapters. Here the same peft layers do that on a stand-in: a module tree holding only
the targeted layers, each a fresh Linear/Conv2d carrying a float32 copy of the base weight. peft's
`inject_adapter_in_model` and `set_peft_model_state_dict` (what diffusers calls) wrap them, `set_scale` and
`merge` run unchanged, and the merged weights are read off. So the arithmetic, its order and its dtype
(float32) are peft's own, and the live models are never wrapped (their forwards, state-dict names and any
compiled or captured step stay as they are). A LoRA's effect on a layer only ever depends on the layer's
shape, never on its current values, so the stand-ins are built from the kept base weights.

The ControlNets get no LoRA, as in diffusers (its ControlNet pipeline loads LoRAs into the UNet and the text
encoder only).
"""
from __future__ import annotations

import hashlib
import math
import re
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

# diffusers' prefixes in a LoRA file, and the backends' graph names, per model family
FAMILY_GRAPHS = {"sd15": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}
GRAPHS = FAMILY_GRAPHS["sd15"]
# After diffusers' conversion, a second text encoder's keys say SDXL (kohya's lora_te2_ becomes text_encoder_2.).
SDXL_MARKERS = ("text_encoder_2.",)
# A file's own keys that say its family before conversion: kohya's two text encoders (SDXL) or one (SD1.5).
# SGM block names (lora_unet_input_blocks_...) say neither: SD1.5 LoRAs use them too (converted below).
FILE_MARKERS = {"sdxl": ("text_encoder_2.", "lora_te1_", "lora_te2_"), "sd15": ("lora_te_",)}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# What diffusers' `load_lora_weights` passes as `unet_config` to number SGM/LDM block names (kohya's
# `lora_unet_input_blocks_4_1_...`) as diffusers' down/mid/up blocks: only `layers_per_block` is read, and
# every SD1.5 UNet has 2 resnets per down block.
SD15_UNET_BLOCKS = types.SimpleNamespace(layers_per_block=2)
EXTENSIONS = (".safetensors",)
# LoRA files LoraSwitch keeps read (the least recently used is dropped): a server whose clients name many
# LoRAs in turn holds this many, not every file ever named.
FILE_CACHE_SIZE = 16


class LoraError(ValueError):
    """A LoRA that cannot be applied: not a LoRA, another architecture, a bad weight, unreachable layers."""


@dataclass
class LoraPart:
    """The LoRA of one model: peft state dict (`<module>.lora_A.weight`, ...) and the LoraConfig diffusers makes."""

    state_dict: dict[str, torch.Tensor]
    config: object  # peft.LoraConfig

    def modules(self) -> list[str]:
        return sorted({key.split(".lora_")[0] for key in self.state_dict})

    def params(self) -> list[str]:
        """The base parameters the LoRA changes: each targeted module's weight."""
        return [f"{module}.weight" for module in self.modules()]


@dataclass
class Lora:
    source: str  # as given (file, folder or hub id)
    name: str  # A1111's name for it: the file name without extension
    path: Path | None  # the local file, when there is one (for its hash)
    parts: dict[str, LoraPart] = field(default_factory=dict)  # "unet" / "text_encoder" -> its part

    @cached_property
    def short_hash(self) -> str | None:
        return lora_short_hash(self.path) if self.path is not None else None


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.endswith(EXTENSIONS) or source.startswith((".", "/", "~")) \
        or source.count("/") != 1


def _file_keys(path: Path) -> list[str]:
    """A local file's raw tensor names, read from its safetensors header only ([] when it is not one: diffusers'
    loader then says what it is)."""
    if not path.is_file():
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file
        return []


def _file_family(path: Path, keys: list[str]) -> tuple[str, str] | None:
    """(family, the key that says so) from a local .safetensors file's raw tensor names, or None."""
    if path.suffix != ".safetensors":
        return None
    for family, markers in FILE_MARKERS.items():
        key = next((k for k in keys for m in markers if k.startswith(m) or f".{m}" in k), None)
        if key is not None:
            return family, key
    return None


def load_lora(source: str | Path, family: str = "sd15", unet_config=None, allow_download: bool = True) -> Lora:
    """Read and convert one LoRA with diffusers' loader of the model's family ("sd15", "sdxl"; kohya files that
    name SGM blocks are mapped with `unet_config`'s layers_per_block); raises LoraError / FileNotFoundError saying
    why, each naming the file. `allow_download=False`: a Hugging Face id is read from the local hub cache only."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise LoraError(f"a LoRA source must be a .safetensors file, a folder or a Hugging Face id, got {source!r}")
    source = str(source)
    path = Path(source).expanduser()
    if _is_local(source) and not path.exists():
        raise FileNotFoundError(f"LoRA file {source!r} does not exist")
    keys = _file_keys(path)  # the header read once, for the DoRA and family checks
    _refuse_dora(source, keys)
    where = str(path) if path.exists() else source
    if not path.exists() and not allow_download:
        where = cached_snapshot(source)
    found = _file_family(path, keys)
    if found is not None and found[0] != family:
        _refuse_family(source, found[0], found[1], family)
    loader = StableDiffusionXLLoraLoaderMixin if family == "sdxl" else StableDiffusionLoraLoaderMixin
    if unet_config is None and family == "sd15":
        unet_config = SD15_UNET_BLOCKS
    extra = {"unet_config": unet_config} if unet_config is not None else {}
    try:
        state_dict, alphas, metadata = loader.lora_state_dict(where, return_lora_metadata=True, **extra)
    except OSError as err:
        if path.exists():
            raise LoraError(f"{source!r} is not a LoRA file diffusers can read ({type(err).__name__}: {err})") from err
        raise OSError(f"could not load the LoRA {source!r}: not a local file and not reachable on the Hugging Face "
                      f"Hub or in its cache ({type(err).__name__}: {err})") from err
    except Exception as err:  # safetensors' and torch's own errors on a file that is something else
        raise LoraError(f"{source!r} is not a LoRA file diffusers can read ({type(err).__name__}: {err})") from err
    if not state_dict or not all("lora" in key for key in state_dict):
        example = next((k for k in state_dict if "lora" not in k), None)
        raise LoraError(f"{source!r} is not a LoRA: its tensors are not LoRA weights (e.g. {example!r}); a LoRA has "
                        "lora_A/lora_B (diffusers, peft) or lora_down/lora_up (kohya, A1111) tensors")
    marker = next((k for k in state_dict for m in SDXL_MARKERS if k.startswith(m) or f".{m}" in k), None)
    if marker is not None and family != "sdxl":
        _refuse_family(source, "sdxl", marker, family)
    embedding = next((k for k in state_dict if "lora_embedding_" in k or ".embeddings." in k), None)
    if embedding is not None:
        raise LoraError(f"{source!r} changes an embedding table (key {embedding!r}): LoRAs on the text encoder's token "
                        "or position embeddings are not merged by this engine (only linear and convolution layers)")
    name = path.name.removesuffix(".safetensors") if path.is_file() else Path(source.rstrip("/")).name
    lora = Lora(source, name, path.resolve() if path.is_file() else None)
    for graph in FAMILY_GRAPHS[family]:
        part = _part(graph, state_dict, alphas, metadata, source)
        if part is not None:
            lora.parts[graph] = part
    if not lora.parts:
        expected = ("unet.* / text_encoder.* / text_encoder_2.* or lora_unet_* / lora_te1_* / lora_te2_*"
                    if family == "sdxl" else "unet.* / text_encoder.* or lora_unet_* / lora_te_*")
        raise LoraError(f"{source!r} has no UNet or text-encoder LoRA weights (its keys start like "
                        f"{sorted(state_dict)[0]!r}); an {FAMILY_NAMES[family]} LoRA has {expected} keys")
    for graph, part in lora.parts.items():
        for key, tensor in part.state_dict.items():
            if not torch.isfinite(tensor).all():
                raise LoraError(f"{source!r}: tensor {graph}.{key} holds non-finite values (NaN or inf): the file is broken")
    return lora


def cached_snapshot(source: str) -> str:
    """The local hub cache's copy of a Hugging Face id, or OSError: nothing is downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - huggingface_hub's errors for an id it has not cached
        raise OSError(f"the LoRA {source!r} is not a local file and not in the local Hugging Face cache, and "
                      f"downloading it was not allowed ({type(err).__name__})") from None


def _refuse_dora(source: str, keys: list[str]) -> None:
    """kohya's DoRA files carry a `dora_scale` per layer, which diffusers' loader drops with only a log line,
    leaving a plain LoRA that is not what was trained: refused by name (read from the file's header only)."""
    dora = next((k for k in keys if k.endswith("dora_scale")), None)
    if dora is not None:
        raise LoraError(f"{source!r} is a DoRA (weight-decomposed LoRA; key {dora!r}): its magnitude vectors "
                        "(dora_scale) cannot be merged as a plain LoRA, and diffusers would silently drop them; DoRA "
                        "files are not supported")


def _refuse_family(source: str, lora_family: str, key: str, family: str):
    raise LoraError(f"{source!r} is an {FAMILY_NAMES[lora_family]} LoRA (key {key!r}) and the model is "
                    f"{FAMILY_NAMES[family]}: they cannot be mixed; use a LoRA trained on {FAMILY_NAMES[family]}")


def _part(graph: str, state_dict: dict, alphas: dict | None, metadata: dict | None, source: str) -> LoraPart | None:
    """One model's part as diffusers' `load_lora_adapter` (UNet) / `_load_lora_into_text_encoder` makes it."""
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    prefix = f"{graph}."
    part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        return None
    meta = None if metadata is None else {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    meta = meta or None
    alphas = None if not alphas else {k.removeprefix(prefix): v for k, v in alphas.items() if k.startswith(prefix)}
    if graph == "unet":
        if "lora_A" not in next(iter(part)):
            part = convert_unet_state_dict_to_peft(part)
        # Ranks keyed "^<key>" as diffusers does (peft#2419: exact module names, no prefix clashes).
        rank = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
        config = _create_lora_config(part, alphas, meta, rank, is_unet=True)
    else:
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        # transformers 5's CLIPTextModel has no `text_model` level; older files still name it (diffusers strips it).
        # Its CLIPTextModelWithProjection (SDXL's text_encoder_2) still has it.
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
        if graph == "text_encoder_2":
            part = {f"text_model.{k}": v for k, v in part.items()}
        rank = {k: v.shape[1] for k, v in part.items() if k.endswith(".lora_B.weight")}
        config = _create_lora_config(part, alphas, meta, rank, is_unet=False)
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        raise LoraError(f"{source!r}: its {graph} part is a DoRA or has LoRA biases; only plain LoRA (lora_A/lora_B) "
                        "is supported")
    return LoraPart(part, config)


def check_weight(weight, what: str = "LoRA weight") -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise LoraError(f"{what} must be a finite number (negative is fine), got {weight!r}")
    return float(weight)


def targets(adapters: list[tuple[Lora, float]], graph: str) -> list[str]:
    """The parameters of `graph` the adapters change, sorted."""
    return sorted({p for lora, _ in adapters if graph in lora.parts for p in lora.parts[graph].params()})


def check_shapes(adapters: list[tuple[Lora, float]], graph: str, base: dict[str, torch.Tensor]) -> None:
    """Every targeted layer exists and has the LoRA's shape, past the first two dims too; else say, naming the
    file, what does not fit. A LoRA written for a linear layer fits a 1x1 convolution (and the reverse): the
    same linear map, reshaped as A1111 applies it (`fit_to_layers`); diffusers' loader refuses those."""
    for lora, _ in adapters:
        part = lora.parts.get(graph)
        if part is None:
            continue
        for module in part.modules():
            weight = base.get(f"{module}.weight")
            down, up = part.state_dict[f"{module}.lora_A.weight"], part.state_dict[f"{module}.lora_B.weight"]
            if weight is None:
                raise LoraError(f"LoRA {lora.source!r} targets {graph} layer {module!r}, which this model does not "
                                "have: a LoRA for another architecture")
            if weight.ndim not in (2, 4) or up.shape[0] != weight.shape[0] or down.shape[1] != weight.shape[1]:
                raise LoraError(
                    f"LoRA {lora.source!r} does not fit {graph} layer {module!r}: it maps {down.shape[1]} -> {up.shape[0]} "
                    f"features, the layer {weight.shape[1]} -> {weight.shape[0]}: a LoRA for another architecture "
                    "(SD1.5 text features are 768 wide, SDXL's 2048; an SD1.5 LoRA on an SDXL model or the reverse)")
            kernel = tuple(weight.shape[2:]) or (1, 1)  # a linear layer is a 1x1 convolution
            for what, tensor, wanted in (("lora_down", down, kernel), ("lora_up", up, (1, 1))):
                got = tuple(tensor.shape[2:]) or (1, 1)
                if tensor.ndim not in (2, 4) or got != wanted:
                    raise LoraError(
                        f"LoRA {lora.source!r} does not fit {graph} layer {module!r}: its {what} has shape "
                        f"{tuple(tensor.shape)}, kernel {got[0]}x{got[1]}, where the layer {tuple(weight.shape)} needs "
                        f"kernel {wanted[0]}x{wanted[1]}: merged as it is, it would change the wrong weights")


def fit_to_layers(part: LoraPart, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part's tensors in the form peft's layer for each base weight takes: (r, in) <-> (r, in, 1, 1) where
    a LoRA for a linear layer targets a 1x1 convolution or the reverse (check_shapes allowed only those)."""
    fitted = {}
    for key, tensor in part.state_dict.items():
        weight = base[f"{key.split('.lora_')[0]}.weight"]
        if weight.ndim == 4 and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        elif weight.ndim == 2 and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        fitted[key] = tensor
    return fitted


def _stand_in(base: dict[str, torch.Tensor], modules: list[str]) -> torch.nn.Module:
    """A module tree with one fresh layer per targeted module path, each holding a float32 copy of its base
    weight: what peft wraps and merges into, instead of the live model."""
    root = torch.nn.Module()
    for module in modules:
        weight = base[f"{module}.weight"].detach().to("cpu", torch.float32)
        # skip_init: no random init of a weight that is overwritten at once (1 s for the tiny model's 172 layers)
        if weight.ndim == 2:
            layer = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0], bias=False)
        else:
            layer = torch.nn.utils.skip_init(torch.nn.Conv2d, weight.shape[1], weight.shape[0], tuple(weight.shape[2:]),
                                             bias=False)
        layer.weight = torch.nn.Parameter(weight.clone().contiguous(), requires_grad=False)
        owner = root
        *path, leaf = module.split(".")
        for name in path:
            if not hasattr(owner, name):
                owner.add_module(name, torch.nn.Module())
            owner = getattr(owner, name)
        owner.add_module(leaf, layer)
    return root


def merged_weights(adapters: list[tuple[Lora, float]], graph: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base + every adapter's delta for each parameter of `graph` the adapters target, float32, computed by
    peft's layers exactly as diffusers' set_adapters + fuse_lora would (see the module docstring)."""
    import warnings

    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = targets(adapters, graph)
    if not names:
        return {}
    check_shapes(adapters, graph, base)
    root = _stand_in(base, [n.removesuffix(".weight") for n in names])
    adapter_names, weights = [], []
    for i, (lora, weight) in enumerate(adapters):
        part = lora.parts.get(graph)
        if part is None:
            continue
        name = f"lora{i}"
        # low_cpu_mem_usage off: diffusers' default (on) makes peft initialise the LoRA layers on the meta device,
        # through slow decompositions; either way the file's tensors end up in the base layer's dtype (float32)
        # before the merge, so the merged weights are the same.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # one adapter per LoRA: meant
            state_dict = fit_to_layers(part, base)
            inject_adapter_in_model(part.config, root, adapter_name=name, state_dict=state_dict)
        result = set_peft_model_state_dict(root, state_dict, name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
        if unexpected:
            raise LoraError(f"LoRA {lora.source!r}: peft did not load {len(unexpected)} of its {graph} tensors "
                            f"(e.g. {unexpected[0]!r})")
        adapter_names.append(name)
        weights.append(weight)
    merged = {}
    with torch.no_grad():
        for module_name, module in root.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            module.set_adapter(adapter_names)  # diffusers' set_weights_and_activate_adapters, then fuse_lora
            for name, weight in zip(adapter_names, weights):
                module.set_scale(name, weight)
            module.merge()
            merged[f"{module_name}.weight"] = module.get_base_layer().weight.detach()
    missing = sorted(set(names) - set(merged))
    if missing:
        raise LoraError(f"peft did not wrap {graph} layers {missing[:3]} of LoRA(s) "
                        f"{[lora.source for lora, _ in adapters]}: these targets cannot be merged")
    return {n: merged[n] for n in names}


# ---- A1111's prompt syntax and hashes -------------------------------------------------------------------

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's modules/extra_networks.re_extra_net


def find_lora(name: str, lora_dir) -> Path:
    """A1111 names a LoRA by its file name without extension, anywhere under the LoRA folder."""
    if lora_dir is None:
        raise LoraError(f"the prompt asks for <lora:{name}:...> but no LoRA folder was given (--lora-dir DIR)")
    root = Path(lora_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"LoRA folder {str(lora_dir)!r} does not exist")
    found = sorted(p for ext in EXTENSIONS for p in root.rglob(f"*{ext}") if p.name.removesuffix(ext) == name)
    if not found:
        have = sorted(p.name.removesuffix(".safetensors") for p in root.rglob("*.safetensors"))[:20]
        raise FileNotFoundError(f"no LoRA named {name!r} in {str(lora_dir)!r}; it has: {', '.join(have) or 'none'}")
    return found[0]


def parse_prompt_loras(prompt: str, lora_dir, max_loras: int | None = None) -> tuple[str, list[tuple[Path, float]]]:
    """A1111's `<lora:NAME>` / `<lora:NAME:WEIGHT>` tags -> (the prompt with the tags removed, [(file, weight)]).

    As A1111 (modules/extra_networks.parse_prompt): each tag is replaced by nothing, the rest of the text is
    left exactly as it was; the weight defaults to 1.0. A name given in several tags is one entry: A1111's
    `networks.load_networks` reuses the one loaded network for every tag of a name, sets its weight from each
    tag in turn and applies it once per tag, so `<lora:x:0.5> <lora:x:0.3>` is x at 2 x 0.3. `max_loras`:
    at most this many distinct names, checked before any is looked up in the folder. A1111's third field (a
    separate UNet weight) and other extra networks (hypernetworks, ...) are refused rather than ignored.
    """
    tags: dict[str, tuple[int, float]] = {}  # name -> (tags naming it, the last tag's weight), in order

    def replace(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind != "lora":
            raise LoraError(f"prompt tag {match.group(0)!r}: only <lora:NAME:WEIGHT> extra networks are supported")
        if len(args) > 2:
            raise LoraError(f"prompt tag {match.group(0)!r}: give <lora:NAME:WEIGHT>; separate text-encoder and UNet "
                            "weights are not supported")
        weight = 1.0
        if len(args) == 2:
            try:
                weight = float(args[1])
            except ValueError:
                raise LoraError(f"prompt tag {match.group(0)!r}: the weight {args[1]!r} is not a number") from None
        weight = check_weight(weight, f"the weight in {match.group(0)!r}")
        tags[args[0]] = (tags.get(args[0], (0, 0.0))[0] + 1, weight)
        return ""

    text = EXTRA_NETWORK.sub(replace, prompt)
    if max_loras is not None and len(tags) > max_loras:
        raise LoraError(f"the prompt names {len(tags)} LoRAs ({', '.join(tags)}); at most {max_loras} are allowed")
    return text, [(find_lora(name, lora_dir), check_weight(count * weight, f"the weight of LoRA {name!r}"))
                  for name, (count, weight) in tags.items()]


def lora_short_hash(path) -> str:
    """A1111's "Lora hashes" value: the first 12 hex digits of sha256 over a .safetensors file's tensor data,
    header skipped (sd-webui-additional-networks' "addnet" hash, which A1111 uses for .safetensors LoRAs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


# ---- the set applied to one backend -------------------------------------------------------------------------


def file_key(source: str) -> tuple:
    """What identifies a LoRA's contents: a local file by path, size and modification time (a file replaced on
    disk gets a new key, so it is read and merged again); anything else (a hub id) by its name."""
    path = Path(source).expanduser()
    if path.is_file():
        stat = path.stat()
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns
    return (str(source),)


def check_lora_list(loras) -> list[tuple[str, float]]:
    """[(source, weight), ...] checked: sources non-empty, weights finite numbers."""
    if loras is None:
        return []
    if not isinstance(loras, (list, tuple)):
        raise LoraError(f"loras must be a list of (source, weight) pairs, got {loras!r}")
    checked = []
    for item in loras:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise LoraError(f"loras must be a list of (source, weight) pairs, got the entry {item!r}")
        source, weight = item
        if not isinstance(source, (str, Path)) or not str(source).strip():
            raise LoraError(f"a LoRA source must be a file, a folder or a Hugging Face id, got {source!r}")
        checked.append((str(source), check_weight(weight, f"the weight of LoRA {str(source)!r}")))
    return checked


class LoraSwitch:
    """The LoRA set merged into one backend's weights, and the base of every weight it has ever changed.

    `set(loras)` replaces the whole set: each targeted weight becomes base + the new set's deltas, and each
    weight the old set changed but the new one does not goes back to its base value (bit for bit: the base is
    kept as read, float32, which holds fp16/bf16/fp32 values exactly). The base is read from the backend the
    first time a weight is targeted, before anything changed it, so the model is never reloaded. Files are
    read once and kept, keyed by path, size and modification time (`file_key`), the FILE_CACHE_SIZE most
    recently used: a file changed on disk is read again, and `is_current` tells a caller that its set must be
    merged again.

    All or nothing: a switch writes the UNet, then the text encoder; if any write fails (a TensorRT refit, an
    ONNX Runtime session rebuild, OpenVINO), every graph it touched gets its previous weights back and the
    error is raised, so `active` always names what the weights hold. Should that restore fail too, the state
    is unknown (`active` None): `describe` (every generation reads it) refuses until a `set` succeeds, and
    that `set` rewrites every weight ever changed.
    """

    def __init__(self, backend, family: str = "sd15", unet_config=None):
        """`family`: the model's ("sd15", "sdxl"): its LoRA loader and graphs; `unet_config`: what SDXL's kohya
        key mapping reads (layers_per_block)."""
        self.backend, self.family, self.unet_config = backend, family, unet_config
        self.graphs = FAMILY_GRAPHS[family]
        self.active: list[tuple[Lora, float]] | None = []  # None: unknown, after a switch that could not be undone
        self.base: dict[str, dict[str, torch.Tensor]] = {g: {} for g in self.graphs}
        self.changed: dict[str, set[str]] = {g: set() for g in self.graphs}
        self._files: OrderedDict[tuple, Lora] = OrderedDict()  # least recently used first
        self._keys: list[tuple] = []  # file_key of each active LoRA, in order

    def _load(self, source: str) -> Lora:
        key = file_key(source)
        if key not in self._files:
            self._files[key] = load_lora(source, self.family, self.unet_config)
            while len(self._files) > FILE_CACHE_SIZE:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    def is_current(self, loras) -> bool:
        """Whether [(source, weight), ...] is the merged set, its files unchanged on disk since they were read."""
        if self.active is None:
            return False
        wanted = check_lora_list(loras)
        if wanted != [(lora.source, weight) for lora, weight in self.active]:
            return False
        return [file_key(source) for source, _ in wanted] == self._keys

    def set(self, loras) -> None:
        """Every check (files, weights, shapes, reachability) runs before any weight changes; a failed write
        is undone on every graph (see the class docstring)."""
        checked = check_lora_list(loras)
        adapters = [(self._load(source), weight) for source, weight in checked]
        keys = [file_key(source) for source, _ in checked]
        plan = {}
        for graph in self.graphs:
            names = targets(adapters, graph)
            new = [n for n in names if n not in self.base[graph]]
            if new:
                self.base[graph].update(self.backend.get_weights(graph, new))
            check_shapes(adapters, graph, self.base[graph])
        for graph in self.graphs:
            weights = merged_weights(adapters, graph, self.base[graph])
            for name in self.changed[graph] - weights.keys():
                weights[name] = self.base[graph][name]
            plan[graph] = weights
        check = getattr(self.backend, "check_set_weights", None)  # a backend that would refuse, refuses now
        for graph in self.graphs:
            if plan[graph] and check is not None:
                check(graph)
        written = []
        try:
            for graph in self.graphs:  # the UNet first: a compiled step that refuses a switch refuses before any change
                if plan[graph]:
                    written.append(graph)
                    self.backend.set_weights(graph, plan[graph])
        except BaseException:
            self._undo(written, plan)
            raise
        for graph in self.graphs:
            self.changed[graph] = set(targets(adapters, graph))
        self.active, self._keys = adapters, keys

    def _undo(self, written: list[str], plan: dict) -> None:
        """Put back, on each graph a failed switch wrote to (the failing one included: it may have taken part
        of its weights), the values it held before; if that fails too, mark the state unknown."""
        try:
            if self.active is None:
                raise RuntimeError("the weights were already in an unknown state")
            for graph in written:
                previous = merged_weights(self.active, graph, self.base[graph])
                self.backend.set_weights(graph, {n: previous.get(n, self.base[graph][n]) for n in plan[graph]})
        except Exception as err:  # noqa: BLE001 - the switch's own error is the one raised
            import warnings

            warnings.warn(f"a failed LoRA switch could not be undone ({type(err).__name__}: {err}); the weights are in "
                          "an unknown state until the next successful set_loras", RuntimeWarning, stacklevel=3)
            self.active, self._keys = None, []
            for graph in self.graphs:  # the next set rewrites every weight any set ever touched
                self.changed[graph] = set(self.base[graph])

    def describe(self) -> list[dict]:
        """The active set, for a result's parameters: name, source, weight and A1111's short hash. Raises
        LoraError while the weights are in an unknown state (a failed switch that could not be undone)."""
        if self.active is None:
            raise LoraError("a LoRA switch failed and the previous weights could not be restored: the weights are "
                            "in an unknown state; set the LoRAs again (set_loras) before generating")
        return [dict(name=lora.name, source=lora.source, weight=weight, hash=lora.short_hash)
                for lora, weight in self.active]

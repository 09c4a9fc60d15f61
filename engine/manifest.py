"""The engine dir's manifest: what was built, from what, and whether the files are still those.

`export/` writes `DIR/manifest.json`; this module reads and checks it, so the runtime never imports
`export/`. The manifest carries each artefact's I/O spec (names, dtypes, symbolic dims) and profile,
which is all a backend needs to bind inputs and allocate outputs. Nothing in an engine dir is trusted
until `load(dir)` has matched every file against the sha256 the build recorded.

Symbolic dims: an int, or "[coef]var[/div]" over the variables B (batch), h and w (latent height and
width): "B", "h", "h/2", "8w". A "/div" rounds up, like a stride-2 convolution with padding 1.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = 1
MANIFEST = "manifest.json"
KINDS = ("text_encoder", "text_encoder_2", "hint_encoder", "controlnet", "unet", "vae_encoder", "vae_decoder")
DTYPES = ("float32", "float16", "int64", "int32")
_DIM = re.compile(r"^(\d*)([Bhw])(?:/(\d+))?$")


class EngineDirError(ValueError):
    """An engine dir that must not be used: missing, unfinished, tampered or built for something else."""


def parse_dim(dim: int | str) -> tuple[int, str, int] | int:
    """"8h" -> (8, "h", 1); "h/2" -> (1, "h", 2); ints stay ints."""
    if isinstance(dim, int):
        return dim
    match = _DIM.match(dim)
    if not match:
        raise ValueError(f"bad symbolic dim {dim!r}: use an int or [coef]var[/div] with var in B, h, w (e.g. '8h', 'h/2')")
    return int(match.group(1) or 1), match.group(2), int(match.group(3) or 1)


def eval_dim(dim: int | str, variables: dict[str, int]) -> int:
    parsed = parse_dim(dim)
    if isinstance(parsed, int):
        return parsed
    coef, var, div = parsed
    return -(-coef * variables[var] // div)  # ceil division


@dataclass(frozen=True)
class TensorIO:
    name: str
    dtype: str  # one of DTYPES
    dims: tuple  # ints and symbolic dims

    def shape(self, variables: dict[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, variables) for d in self.dims)

    @classmethod
    def from_json(cls, data: dict) -> "TensorIO":
        if data.get("dtype") not in DTYPES:
            raise EngineDirError(f"tensor {data.get('name')!r} has dtype {data.get('dtype')!r}; allowed: {', '.join(DTYPES)}")
        for d in data["dims"]:
            parse_dim(d)
        return cls(data["name"], data["dtype"], tuple(data["dims"]))


def solve_variables(inputs: list[TensorIO], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """B, h and w from actual input shapes; every input is then checked against its dims."""
    variables: dict[str, int] = {}
    for io in inputs:
        shape = shapes[io.name]
        if len(shape) != len(io.dims):
            raise ValueError(f"input {io.name!r} has shape {tuple(shape)}; expected rank {len(io.dims)} ({io.dims})")
        for dim, size in zip(io.dims, shape):
            parsed = parse_dim(dim)
            if isinstance(parsed, tuple) and parsed[2] == 1 and parsed[1] not in variables:
                coef, var, _ = parsed
                if size % coef:
                    raise ValueError(f"input {io.name!r}: size {size} for dim {dim!r} is not a multiple of {coef}")
                variables[var] = size // coef
    for io in inputs:
        expected = io.shape(variables)
        if tuple(shapes[io.name]) != expected:
            raise ValueError(f"input {io.name!r} has shape {tuple(shapes[io.name])}; with {variables} it must be {expected}")
    return variables


@dataclass
class Artefact:
    """One exported graph (and its TensorRT plan, where built)."""

    name: str  # text_encoder, unet, vae_encoder, vae_decoder, hint_<net>, controlnet_<net>
    kind: str  # one of KINDS
    net: str | None  # the ControlNet's slug for hint_encoder/controlnet; an extra VAE's name for its vae_* graphs
    onnx: str  # file name of the graph inside the dir
    files: dict[str, str]  # every file of the artefact (graph, external data, plan) -> sha256
    inputs: list[TensorIO]
    outputs: list[TensorIO]
    profile: dict[str, list[list[int]]]  # input name -> [min, opt, max] shapes (TensorRT)
    key: str  # cache key of the ONNX export; equal key + equal file hashes = reuse
    plan: str | None = None  # TensorRT plan file name
    plan_key: str | None = None
    build_s: float = 0.0
    verify: dict | None = None  # the ONNX graph's check: {"max_abs", "max_rel", "ok", "against", "B", "h", "w"}
    plan_verify: dict | None = None  # the same for the TensorRT plan
    # LoRA switching (text_encoder and unet; export/weight_map.py finds them by value in the saved graph):
    weights: dict[str, str] = field(default_factory=dict)  # diffusers parameter name -> ONNX initializer name
    weight_layouts: dict[str, dict] = field(default_factory=dict)  # param -> {shape, onnx_shape, transpose, dtype}
    unreachable_weights: list[str] = field(default_factory=list)  # parameters no single initializer holds
    # parameters the graph's outputs do not depend on (SDXL's first text encoder gives its penultimate layer's
    # states: the last layer is not in the graph) -> their shape; a LoRA's change to them cannot change an image
    unused_weights: dict[str, list[int]] = field(default_factory=dict)

    def failed(self) -> bool:
        return any(v is not None and not v.get("ok", False) for v in (self.verify, self.plan_verify))

    def to_json(self) -> dict:
        data = asdict(self)
        data["inputs"] = [asdict(io) for io in self.inputs]
        data["outputs"] = [asdict(io) for io in self.outputs]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Artefact":
        if data.get("kind") not in KINDS:
            raise EngineDirError(f"artefact {data.get('name')!r} has kind {data.get('kind')!r}; allowed: {', '.join(KINDS)}")
        data = dict(data)
        data["inputs"] = [TensorIO.from_json(io) for io in data["inputs"]]
        data["outputs"] = [TensorIO.from_json(io) for io in data["outputs"]]
        return cls(**data)


@dataclass
class Manifest:
    model: dict  # {"source", "hash"}
    controlnets: list[dict]  # [{"name", "source", "slug", "hash", "preprocessor"}] in build order
    precision: str  # fp32 | fp16
    backend: str  # onnxruntime | tensorrt: what the build compiled for
    sizes: dict  # {"min_size", "max_size", "opt_size", "max_batch"}
    config: dict  # vae_scale_factor, latent_channels, unet_in_channels, scaling_factor, num_residuals, ...
    versions: dict  # library versions at build time
    gpu: str | None
    artefacts: dict[str, Artefact]
    support: dict[str, str] = field(default_factory=dict)  # tokenizer and scheduler files -> sha256
    # Extra VAEs built with --vae (engine/vaes.py): [{"name", "source", "tiny", "scaling_factor", "hash"}];
    # their graphs are the vae_encoder/vae_decoder artefacts whose `net` is the name.
    vaes: list[dict] = field(default_factory=list)
    complete: bool = False  # set only once every artefact is written and verified
    format: int = FORMAT

    def to_json(self) -> str:
        data = asdict(self)
        data["artefacts"] = {k: a.to_json() for k, a in self.artefacts.items()}
        return json.dumps(data, indent=2)  # artefacts stay in build order

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise EngineDirError(f"{where} has format {data.get('format')!r}; this engine reads format {FORMAT}: rebuild")
            data["artefacts"] = {k: Artefact.from_json(a) for k, a in data["artefacts"].items()}
            return cls(**data)
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise EngineDirError(f"{where} is not a valid manifest ({type(err).__name__}: {err}): rebuild the engine dir") from err

    def has(self, kind: str, net: str | None = None) -> bool:
        """Whether an artefact of `kind` (for `net`) was built (dirs built before img2img have no vae_encoder)."""
        return any(a.kind == kind and a.net == net for a in self.artefacts.values())

    def nets(self) -> list[str]:
        return [net["slug"] for net in self.controlnets]

    def artefact(self, kind: str, net: str | None = None) -> Artefact:
        for artefact in self.artefacts.values():
            if artefact.kind == kind and artefact.net == net:
                return artefact
        raise EngineDirError(f"the manifest has no {kind} artefact" + (f" for {net!r}" if net else ""))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def source_id(source: str) -> str:
    """How a model or ControlNet source is recorded and compared: local paths absolute, ids as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def read(engine_dir: str | Path) -> Manifest | None:
    """The manifest as written, unchecked (the build uses this to find reusable artefacts); None if absent."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        return None
    return Manifest.from_json(path.read_text(), str(path))


def check_files(engine_dir: Path, files: dict[str, str], what: str) -> None:
    for name, digest in files.items():
        path = engine_dir / name
        if not path.is_file():
            raise EngineDirError(f"{what}: file {str(path)!r} is missing; rebuild with python -m engine.build")
        if file_sha256(path) != digest:
            raise EngineDirError(
                f"{what}: file {str(path)!r} does not match the sha256 in the manifest (changed after the build, "
                "or a build was interrupted): rebuild with python -m engine.build"
            )


def load(engine_dir: str | Path, artefacts: list[str] | None = None) -> Manifest:
    """The manifest of a finished build, with the files of `artefacts` (default all) and the support files
    hash-checked. Raises EngineDirError saying what is wrong and how to fix it."""
    engine_dir = Path(engine_dir)
    manifest = read(engine_dir)
    if manifest is None:
        raise EngineDirError(f"{str(engine_dir)!r} has no {MANIFEST}: build it with python -m engine.build --out {engine_dir}")
    if not manifest.complete:
        failed = [a.name for a in manifest.artefacts.values() if a.failed()]
        why = f"verification failed for {', '.join(failed)}" if failed else "the build did not finish"
        raise EngineDirError(f"engine dir {str(engine_dir)!r} is not usable: {why}; rebuild with python -m engine.build")
    names = list(manifest.artefacts) if artefacts is None else artefacts
    for name in names:
        if name not in manifest.artefacts:
            raise EngineDirError(f"engine dir {str(engine_dir)!r} has no artefact {name!r}; it has {', '.join(manifest.artefacts)}")
        check_files(engine_dir, manifest.artefacts[name].files, f"artefact {name!r}")
    check_files(engine_dir, manifest.support, "tokenizer/scheduler files")
    return manifest


def match_model(manifest: Manifest, model: str | None) -> None:
    if model is None:
        return
    if source_id(str(model)) != manifest.model["source"]:
        raise EngineDirError(
            f"engine dir was built for model {manifest.model['source']!r}, not {source_id(str(model))!r}: "
            "rebuild it for this model, or leave model unset to use the recorded one"
        )


def match_controlnets(manifest: Manifest, requested: list[tuple[str, str]] | None) -> list[int]:
    """Indices into manifest.controlnets for the requested (name, source) pairs, in the requested order.

    A subset of the built ControlNets is fine (their graphs are separate); one that was not built is not.
    """
    if requested is None:
        return list(range(len(manifest.controlnets)))
    built = manifest.controlnets
    indices = []
    for name, source in requested:
        found = [i for i, net in enumerate(built) if net["source"] == source_id(source) or net["name"] == name]
        if not found:
            have = ", ".join(f"{n['name']} ({n['source']})" for n in built)
            raise EngineDirError(f"ControlNet {name!r} ({source_id(source)}) was not built into this engine dir; it has {have}")
        indices.append(found[0])
    return indices


def match_tensorrt(manifest: Manifest, trt_version: str | None, gpu: str | None) -> None:
    """TensorRT plans only run on the TensorRT version and GPU model that built them."""
    built = manifest.versions.get("tensorrt")
    if built is None:
        raise EngineDirError("engine dir has no TensorRT plans (built for onnxruntime): rebuild with --backend tensorrt")
    if trt_version != built:
        raise EngineDirError(f"TensorRT plans were built with TensorRT {built}, this machine has {trt_version}: rebuild")
    if gpu != manifest.gpu:
        raise EngineDirError(f"TensorRT plans were built on GPU {manifest.gpu!r}, this machine has {gpu!r}: rebuild")


def to_graph_layout(value, layout: dict):
    """A parameter's value (a tensor in the model's shape) as its initializer holds it (numpy): transposed
    where the exporter folded a transpose, reshaped, in the graph's dtype (Artefact.weight_layouts)."""
    import numpy as np

    array = value.detach().cpu().float().numpy()
    if layout["transpose"]:
        array = array.T
    return np.ascontiguousarray(array.reshape(layout["onnx_shape"]).astype(layout["dtype"]))


def from_graph_layout(array, layout: dict):
    """An initializer's value back in the parameter's shape, as a float32 tensor."""
    import numpy as np
    import torch

    array = array.astype(np.float32)
    if layout["transpose"]:
        array = array.reshape(layout["shape"][::-1]).T
    return torch.from_numpy(np.ascontiguousarray(array.reshape(layout["shape"])))

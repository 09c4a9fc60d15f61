"""The ONNX Runtime backend: the engine dir's ONNX graphs, one session each, created once.

Providers: CUDA where onnxruntime-gpu finds CUDA, else CPU. onnxruntime-gpu without CUDA libraries
silently falls back to the CPU, so the provider that actually runs is read back from the session
(`session.get_providers()[0]`) and reported, never assumed. The TensorRT execution provider is used only
when asked for (`OrtConfig(providers=...)`): it builds its own engines at session start, which takes
minutes at full size; the tensorrt backend runs plans built ahead of time instead.

I/O binding: inputs are bound by pointer to the caller's torch tensors (after a cast to the graph's
dtype, a no-op when it already matches) and outputs to fresh torch tensors sized from the manifest's
I/O spec, so ONNX Runtime writes straight into memory the loop then uses. Outputs are fresh each call,
so a caller never holds a buffer a later call overwrites.

LoRA (engine/lora.py): `set_weights` maps parameters to initializers through the manifest's weight map
(export/weight_map.py) and each model's `set_initializers` rebuilds its session with the new values; the
graph files are never rewritten or re-exported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.manifest import Artefact, Manifest, solve_variables
from engine.vaes import MODEL

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
REPLACED = "replaced-in-memory"  # the external-data location of initializers set by set_initializers (no such file)


def machine_cores() -> int:
    """Cores this process may use (the affinity mask, which containers narrow, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class OrtConfig:
    providers: tuple[str, ...] | None = None  # None: CUDA where available, then CPU
    threads: int | None = None  # intra-op threads; None: machine_cores()
    log_severity: int = 3  # errors only: ORT's constant-folding notes on every session are noise
    # ORT's idle workers spin by default. The loop runs torch ops (scheduler, CFG, residual sums) between
    # graphs in this same process, so spinning workers steal the cores torch needs: off by default.
    spin: bool = False

    def pick_providers(self, available: list[str]) -> list[str]:
        if self.providers is not None:
            missing = [p for p in self.providers if p not in available]
            if missing:
                raise ValueError(f"ONNX Runtime providers {missing} are not available here; available: {available}")
            return list(self.providers)
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtModel:
    """One ONNX graph in one session, run with I/O binding on torch tensors."""

    def __init__(self, path: Path, artefact: Artefact, config: OrtConfig = OrtConfig()):
        self.path, self.config = Path(path), config
        self.replaced: dict[str, tuple] = {}  # initializer name -> (array, OrtValue), alive as long as the session
        self._proto = None  # the graph without its external data, loaded at the first replacement
        self.session = self._new_session()
        self.name = artefact.name
        self.inputs = artefact.inputs
        self.outputs = artefact.outputs
        self.provider = self.session.get_providers()[0]  # what really runs (a failed CUDA EP drops out)
        self.device = torch.device("cuda", 0) if self.provider in GPU_PROVIDERS else torch.device("cpu")
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if graph_inputs != [i.name for i in self.inputs] or graph_outputs != [o.name for o in self.outputs]:
            raise ValueError(
                f"{path}: graph I/O {graph_inputs} -> {graph_outputs} does not match the manifest's spec "
                f"{[i.name for i in self.inputs]} -> {[o.name for o in self.outputs]}"
            )

    def _new_session(self, replaced: dict | None = None):
        """A session of the graph file with `replaced` (default: the model's) initializers in place of the file's."""
        import onnxruntime as ort

        replaced = self.replaced if replaced is None else replaced
        config = self.config
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads or machine_cores()
        options.log_severity_level = config.log_severity
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
        providers = config.pick_providers(ort.get_available_providers())
        if not replaced:
            return ort.InferenceSession(str(self.path), options, providers=providers)
        # Replaced initializers go in as "external" ones, which ONNX Runtime puts into the graph before any
        # optimisation, so fusions, NCHWc reordering and pre-packing all see the new values.
        # (`add_initializer` instead shares a value after optimisation: convolution weights that the layout
        # optimiser had already reordered kept their old values.) It only replaces initializers the graph
        # marks external, so the in-memory copy of the graph marks them so; the rest of the graph is the file's.
        names = list(replaced)
        options.add_external_initializers(names, [replaced[n][1] for n in names])
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        return ort.InferenceSession(self._graph_bytes(names, replaced), options, providers=providers)

    def _graph_bytes(self, names: list[str], replaced: dict) -> bytes:
        """The graph file (its external data left on disk) with these initializers marked external."""
        import onnx

        if self._proto is None:
            self._proto = onnx.load(str(self.path), load_external_data=False)
        initializers = {init.name: init for init in self._proto.graph.initializer}
        unknown = [n for n in names if n not in initializers]
        if unknown:
            raise ValueError(f"{self.path.name} has no initializer {unknown[0]!r}: the manifest's weight map does not fit "
                             "this graph; rebuild the engine dir")
        for name in names:
            init = initializers[name]
            if init.data_location == onnx.TensorProto.EXTERNAL and init.external_data[0].value == REPLACED:
                continue
            for part in ("raw_data", "float_data", "int32_data", "double_data", "external_data"):
                init.ClearField(part)
            init.data_location = onnx.TensorProto.EXTERNAL
            nbytes = replaced[name][0].nbytes
            for key, value in (("location", REPLACED), ("offset", "0"), ("length", str(nbytes))):
                init.external_data.add(key=key, value=value)
        return self._proto.SerializeToString()

    def set_initializers(self, named: dict[str, np.ndarray]) -> None:
        """Replace initializers by name (LoRA switching) and rebuild the session from memory: the same graph, no
        re-export, the new values handed over with `SessionOptions.add_external_initializers`. Replacements
        accumulate: each session is the file plus every initializer set so far. Each array must have the
        initializer's shape and dtype. All or nothing: if the new session cannot be made, the old one and its
        replacements stay as they were (the graph marked for the failed set is read again from the file)."""
        import onnxruntime as ort

        replaced = dict(self.replaced)
        for name, array in named.items():
            array = np.ascontiguousarray(array)
            replaced[name] = (array, ort.OrtValue.ortvalue_from_numpy(array))
        try:
            session = self._new_session(replaced)
        except BaseException:
            self._proto = None  # it may mark initializers of the failed set as replaced: reloaded when next needed
            raise
        self.session, self.replaced = session, replaced

    def run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        bound, shapes = [], {}
        for io in self.inputs:
            tensor = feeds[io.name].to(device=self.device, dtype=TORCH_DTYPES[io.dtype]).contiguous()
            bound.append(tensor)  # keeps the memory alive until the run is done
            shapes[io.name] = tuple(tensor.shape)
            binding.bind_input(io.name, kind, index, NUMPY_DTYPES[io.dtype], list(tensor.shape), tensor.data_ptr())
        variables = solve_variables(self.inputs, shapes)
        outputs = []
        for io in self.outputs:
            out = torch.empty(io.shape(variables), dtype=TORCH_DTYPES[io.dtype], device=self.device)
            binding.bind_output(io.name, kind, index, NUMPY_DTYPES[io.dtype], list(out.shape), out.data_ptr())
            outputs.append(out)
        self.session.run_with_iobinding(binding)
        return outputs


def _timestep(t, device: torch.device) -> torch.Tensor:
    """The loop's timestep as the graphs' (1,) float32 input, on the model's device: the loop's timesteps
    live on the Runner's device, and a round trip through the host would sync twice per engine call."""
    return torch.as_tensor(t).reshape(1).to(dtype=torch.float32, device=device)


def _cond_feeds(model, cond: dict) -> dict:
    """The conditioning tensors (engine.families) this graph declares as inputs; a graph ignores the others
    (an LCM UNet's guidance embedding is not a ControlNet input, a union net's types not the UNet's)."""
    return {io.name: cond[io.name] for io in model.inputs if io.name in cond}


class GraphBackend:
    """The backend interface (engine.backends) over built graphs; subclasses make the per-graph models.

    A model is anything with `run(feeds: dict[name, tensor]) -> list[tensor]`, `name`, `inputs` (the
    manifest's TensorIO list) and `device`; for LoRA switching (`set_weights`) also
    `set_initializers(named: dict[initializer name, numpy array])`, arrays already in the initializer's layout.
    """

    name = "graphs"
    float_residuals = True  # residuals back to the loop in float32; TensorRT keeps its plans' dtype

    def __init__(self, manifest: Manifest, nets: list[int], make_model, engine_dir: Path | None = None):
        self.manifest, self.engine_dir = manifest, engine_dir  # the graphs' base weights, for get_weights
        slugs = [manifest.controlnets[i]["slug"] for i in nets]
        # by graph name: text_encoder (and SDXL's text_encoder_2)
        self.text_encoders = {name: make_model(manifest.artefact(name)) for name in ("text_encoder", "text_encoder_2")
                              if manifest.has(name)}
        self.text_encoder = self.text_encoders["text_encoder"]
        self.unet_model = make_model(manifest.artefact("unet"))
        self.vae_decoder = make_model(manifest.artefact("vae_decoder"))
        # None in dirs built before img2img: Runner then refuses img2img/inpaint with a rebuild hint.
        self.vae_encoder = make_model(manifest.artefact("vae_encoder")) if manifest.has("vae_encoder") else None
        # Extra VAEs built with --vae (engine/vaes.py: TAESD): their own decoder and encoder graphs, by name.
        self.vae_decoders = {MODEL: self.vae_decoder}
        self.vae_encoders = {MODEL: self.vae_encoder}
        for vae in manifest.vaes:
            self.vae_decoders[vae["name"]] = make_model(manifest.artefact("vae_decoder", vae["name"]))
            self.vae_encoders[vae["name"]] = make_model(manifest.artefact("vae_encoder", vae["name"]))
        self.hint_encoders = [make_model(manifest.artefact("hint_encoder", s)) for s in slugs]
        self.controlnet_bodies = [make_model(manifest.artefact("controlnet", s)) for s in slugs]
        self.device = self.unet_model.device
        # The UNet's residual inputs (export/spec.py residual_names): after the sample, timestep and conditioning.
        self.residual_inputs = [io for io in self.unet_model.inputs if io.name == "mid" or io.name.startswith("down_")]
        self._zeros: dict[tuple, list[torch.Tensor]] = {}

    def models(self) -> list:
        """Every graph this backend runs, each once."""
        every = [*self.text_encoders.values(), self.unet_model, *self.vae_decoders.values(), *self.hint_encoders,
                 *self.controlnet_bodies]
        return every + [model for model in self.vae_encoders.values() if model is not None]

    def encode_text(self, input_ids: torch.Tensor, encoder: str = "text_encoder"):
        out = [o.float() for o in self.text_encoders[encoder].run({"input_ids": input_ids})]
        return out[0] if len(out) == 1 else tuple(out)

    def encode_hint(self, k: int, control_map: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        model = self.hint_encoders[k]  # a union's also takes its condition's type index and scale
        return model.run({"control_map": control_map, **_cond_feeds(model, inputs or {})})[0]

    def controlnet(self, k, sample, timestep, cond, hint, scales) -> tuple[torch.Tensor, ...]:
        model = self.controlnet_bodies[k]
        feeds = dict(sample=sample, timestep=_timestep(timestep, model.device), hint=hint, scales=scales,
                     **_cond_feeds(model, cond))
        residuals = model.run(feeds)
        return tuple(r.float() for r in residuals) if self.float_residuals else tuple(residuals)

    def combine(self, outputs: list, batch: int) -> list[torch.Tensor]:
        from engine.backends import sum_residuals

        return sum_residuals(outputs, batch)

    def unet(self, sample, timestep, cond, residuals) -> torch.Tensor:
        model = self.unet_model
        feeds = dict(sample=sample, timestep=_timestep(timestep, model.device), **_cond_feeds(model, cond))
        variables = solve_variables(model.inputs[:1], {"sample": tuple(sample.shape)})
        shapes = [io.shape(variables) for io in self.residual_inputs]
        if residuals is None:  # no ControlNet ran this step: adding zeros leaves the UNet's skips exact
            key = (tuple(sample.shape), str(self.device))
            if key not in self._zeros:
                self._zeros[key] = [torch.zeros(s, device=self.device) for s in shapes]
            residuals = self._zeros[key]
        for io, shape, res in zip(self.residual_inputs, shapes, residuals):
            # Global-pool ControlNets give (B, C, 1, 1) means; the UNet graph takes full maps.
            feeds[io.name] = res if tuple(res.shape) == shape else res.expand(shape)
        return model.run(feeds)[0].float()

    def encode_image(self, pixels: torch.Tensor, vae: str = MODEL) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [-1, 1] -> the latent distribution's (mean, std), unscaled (engine.modules.VaeEncoder);
        a TAESD graph's one output, its latents, and None (engine.modules.TinyVaeEncoder)."""
        model = self.vae_encoders[vae]
        if model is None:
            raise ValueError("this engine dir has no vae_encoder graph (built before img2img): rebuild it with "
                             "python -m engine.build")
        out = model.run({"images": pixels})
        return out[0].float(), (out[1].float() if len(out) > 1 else None)

    def decode(self, latents: torch.Tensor, vae: str = MODEL) -> torch.Tensor:
        return self.vae_decoders[vae].run({"latents": latents})[0].float()

    # ---- weights (LoRA: engine/lora.py), by the build's record of where each parameter is ---------------

    def _mapped(self, graph: str, names) -> "Artefact":
        from engine.lora import LoraError

        if graph != "unet" and graph not in self.text_encoders:
            raise ValueError(f"graph must be one of unet, {', '.join(self.text_encoders)}, got {graph!r}")
        artefact = self.manifest.artefact(graph)
        if not artefact.weights:
            raise LoraError(f"this engine dir's {graph} graph has no weight map (built before LoRA support): rebuild "
                            "it with python -m engine.build to switch LoRAs without re-exporting")
        names = [n for n in names if n not in artefact.unused_weights]
        unreachable = [n for n in names if n in artefact.unreachable_weights]
        if unreachable:
            raise LoraError(f"the {graph} graph cannot reach {len(unreachable)} of the LoRA's layers (e.g. "
                            f"{unreachable[0]!r}): no single initializer holds them in the exported graph; use the torch "
                            "backend for this LoRA")
        missing = [n for n in names if n not in artefact.weights]
        if missing:
            raise LoraError(f"the {graph} has no parameter {missing[0]!r} ({len(missing)} missing): a LoRA for another "
                            "architecture")
        return artefact

    def get_weights(self, graph: str, names) -> dict[str, torch.Tensor]:
        """The graph file's values of these parameters (float32, the model's shapes): the base weights."""
        from engine.manifest import from_graph_layout

        artefact = self._mapped(graph, names)
        if self.engine_dir is None:
            raise ValueError(f"{type(self).__name__} was made without its engine dir: cannot read base weights")
        # unused parameters are not in the graph and cannot change an image: zeros stand for their base value
        found = {n: torch.zeros(artefact.unused_weights[n]) for n in names if n in artefact.unused_weights}
        wanted = {artefact.weights[n]: n for n in names if n not in found}
        for init, array in graph_initializers(Path(self.engine_dir) / artefact.onnx, set(wanted)):
            found[wanted[init]] = from_graph_layout(array, artefact.weight_layouts[wanted[init]])
        return {n: found[n] for n in names}

    def set_weights(self, graph: str, weights: dict[str, torch.Tensor]) -> None:
        """New complete weights by parameter name -> the graph model's `set_initializers` by initializer name,
        each in the initializer's layout (transposed, reshaped, cast as the build recorded)."""
        from engine.manifest import to_graph_layout

        artefact = self._mapped(graph, weights)
        named = {artefact.weights[n]: to_graph_layout(v, artefact.weight_layouts[n]) for n, v in weights.items()
                 if n not in artefact.unused_weights}  # not in the graph: the change cannot reach an image
        model = self.unet_model if graph == "unet" else self.text_encoders[graph]
        model.set_initializers(named)


def graph_initializers(onnx_path: Path, names: set[str] | None = None):
    """(name, numpy array) of a graph file's initializers (those in `names`, default all), external data read
    tensor by tensor."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    for init in model.graph.initializer:
        if names is None or init.name in names:
            yield init.name, numpy_helper.to_array(init, str(Path(onnx_path).parent))


class OrtBackend(GraphBackend):
    """The engine dir's ONNX graphs in ONNX Runtime sessions; `providers` says what really runs each."""

    name = "onnxruntime"

    def __init__(self, engine_dir: Path, manifest: Manifest, nets: list[int], config: OrtConfig = OrtConfig()):
        engine_dir = Path(engine_dir)
        super().__init__(manifest, nets, lambda a: OrtModel(engine_dir / a.onnx, a, config), engine_dir)
        self.providers = {m.name: m.provider for m in self.models()}
        self.provider = self.unet_model.provider

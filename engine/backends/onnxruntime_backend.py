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
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.manifest import Artefact, Manifest, solve_variables

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


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
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads or machine_cores()
        options.log_severity_level = config.log_severity
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
        providers = config.pick_providers(ort.get_available_providers())
        self.session = ort.InferenceSession(str(path), options, providers=providers)
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


class GraphBackend:
    """The backend interface (engine.backends) over built graphs; subclasses make the per-graph models.

    A model is anything with `run(feeds: dict[name, tensor]) -> list[tensor]`, `name`, `inputs` (the
    manifest's TensorIO list) and `device`.
    """

    name = "graphs"

    def __init__(self, manifest: Manifest, nets: list[int], make_model):
        slugs = [manifest.controlnets[i]["slug"] for i in nets]
        self.text_encoder = make_model(manifest.artefact("text_encoder"))
        self.unet_model = make_model(manifest.artefact("unet"))
        self.vae_decoder = make_model(manifest.artefact("vae_decoder"))
        # None in dirs built before img2img: Runner then refuses img2img/inpaint with a rebuild hint.
        self.vae_encoder = make_model(manifest.artefact("vae_encoder")) if manifest.has("vae_encoder") else None
        self.hint_encoders = [make_model(manifest.artefact("hint_encoder", s)) for s in slugs]
        self.controlnet_bodies = [make_model(manifest.artefact("controlnet", s)) for s in slugs]
        self.device = self.unet_model.device
        self._zeros: dict[tuple, list[torch.Tensor]] = {}

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.run({"input_ids": input_ids})[0].float()

    def encode_hint(self, k: int, control_map: torch.Tensor) -> torch.Tensor:
        return self.hint_encoders[k].run({"control_map": control_map})[0]

    def controlnet(self, k, sample, timestep, embeddings, hint, scales) -> tuple[torch.Tensor, ...]:
        model = self.controlnet_bodies[k]
        feeds = dict(sample=sample, timestep=_timestep(timestep, model.device), encoder_hidden_states=embeddings,
                     hint=hint, scales=scales)
        return tuple(r.float() for r in model.run(feeds))

    def combine(self, outputs: list, batch: int) -> list[torch.Tensor]:
        from engine.backends import sum_residuals

        return sum_residuals(outputs, batch)

    def unet(self, sample, timestep, embeddings, residuals) -> torch.Tensor:
        model = self.unet_model
        feeds = dict(sample=sample, timestep=_timestep(timestep, model.device), encoder_hidden_states=embeddings)
        variables = solve_variables(model.inputs[:1], {"sample": tuple(sample.shape)})
        shapes = [io.shape(variables) for io in model.inputs[3:]]
        if residuals is None:  # no ControlNet ran this step: adding zeros leaves the UNet's skips exact
            key = (tuple(sample.shape), str(self.device))
            if key not in self._zeros:
                self._zeros[key] = [torch.zeros(s, device=self.device) for s in shapes]
            residuals = self._zeros[key]
        for io, shape, res in zip(model.inputs[3:], shapes, residuals):
            # Global-pool ControlNets give (B, C, 1, 1) means; the UNet graph takes full maps.
            feeds[io.name] = res if tuple(res.shape) == shape else res.expand(shape)
        return model.run(feeds)[0].float()

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> the latent distribution's (mean, std), unscaled (engine.modules.VaeEncoder)."""
        if self.vae_encoder is None:
            raise ValueError("this engine dir has no vae_encoder graph (built before img2img): rebuild it with "
                             "python -m engine.build")
        mean, std = self.vae_encoder.run({"images": pixels})
        return mean.float(), std.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_decoder.run({"latents": latents})[0].float()


class OrtBackend(GraphBackend):
    """The engine dir's ONNX graphs in ONNX Runtime sessions; `providers` says what really runs each."""

    name = "onnxruntime"

    def __init__(self, engine_dir: Path, manifest: Manifest, nets: list[int], config: OrtConfig = OrtConfig()):
        engine_dir = Path(engine_dir)
        super().__init__(manifest, nets, lambda a: OrtModel(engine_dir / a.onnx, a, config))
        every = [self.text_encoder, self.unet_model, self.vae_decoder, *self.hint_encoders, *self.controlnet_bodies]
        every += [self.vae_encoder] if self.vae_encoder is not None else []
        self.providers = {m.name: m.provider for m in every}
        self.provider = self.unet_model.provider

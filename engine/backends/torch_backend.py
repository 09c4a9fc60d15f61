"""The PyTorch backend: the reference every other backend is checked against, on any device.

With `TorchOptimizations(fused_zero_conv=True)` the ControlNets stop before their zero convs and the UNet
applies them inside its skip additions, one fused op per injection point (engine/fused.py). The
model-level switches (attention, fused QKV, GroupNorm+SiLU, channels-last) are applied to the models once,
here (engine.optimizations.apply_to_model).

With `cuda_graphs` or `compile` the step runs as one function, `step_fn`: `controlnet()` and `combine()`
only record their inputs, and `unet()` runs every recorded ControlNet, the combine and the UNet in one
call (one CUDA graph replay). The generation loop is unchanged: it asks the same questions in the same
order; its "controlnet" stage then times ~nothing and "unet" the whole step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import fused
from engine.backends import sum_residuals
from engine.modules import (
    ControlNetBody,
    TinyVaeEncoder,
    UNetWithResiduals,
    VaeDecoder,
    VaeEncoder,
    hint_encoder,
    text_encoders,
)
from engine.optimizations import TorchOptimizations, apply_to_model, check_device
from engine.vaes import MODEL


@dataclass
class _NetCall:
    """A ControlNet call recorded for the step function (cuda_graphs / compile)."""

    k: int
    sample: torch.Tensor
    cond: dict  # engine.families.Conditioning
    hint: torch.Tensor
    scales: torch.Tensor


@dataclass
class _StepCall:
    calls: list[_NetCall]


class TorchBackend:
    name = "torch"

    def __init__(self, sd, controlnets: list, device: torch.device, dtype: torch.dtype,
                 optimizations: TorchOptimizations = TorchOptimizations(), vaes: dict | None = None):
        """`vaes`: extra VAEs by name (engine/vaes.py: TAESD, another AutoencoderKL), beside the model's own."""
        from diffusers import AutoencoderTiny

        check_device(optimizations, torch.device(device))
        self.device = device
        self.dtype = dtype
        self.optimizations = optimizations
        vaes = vaes or {}
        for model in [sd.unet, *controlnets, sd.vae, *vaes.values()]:
            if isinstance(model, AutoencoderTiny):  # no attention, no GroupNorm: only the memory layout applies
                if optimizations.channels_last:
                    model.to(memory_format=torch.channels_last)
                continue
            apply_to_model(model, optimizations)
        self.channels_last = optimizations.channels_last
        self.text_encoders = text_encoders(sd)  # by graph name: text_encoder (and SDXL's text_encoder_2)
        self.text_encoder = self.text_encoders["text_encoder"]
        self.unet_model = UNetWithResiduals(sd.unet)
        self.vae_decoder = VaeDecoder(sd.vae)
        self.vae_encoder = VaeEncoder(sd.vae)
        self.vae_decoders = {MODEL: self.vae_decoder, **{name: VaeDecoder(vae) for name, vae in vaes.items()}}
        self.vae_encoders = {MODEL: self.vae_encoder, **{
            name: TinyVaeEncoder(vae) if isinstance(vae, AutoencoderTiny) else VaeEncoder(vae) for name, vae in vaes.items()}}
        # Each VAE's own dtype: the model's is fp32 in an fp16 run where it overflows (SDXL's).
        self.vae_dtypes = {MODEL: next(sd.vae.parameters()).dtype,
                           **{name: next(vae.parameters()).dtype for name, vae in vaes.items()}}
        self.hint_encoders = [hint_encoder(net) for net in controlnets]
        self.controlnet_bodies = [ControlNetBody(net) for net in controlnets]
        # Global-pool (shuffle) nets average their residuals over the image: nothing to fuse.
        self.fused = optimizations.fused_zero_conv and not any(b.global_pool for b in self.controlnet_bodies)
        self.zero_convs = [fused.zero_conv_params(net) for net in controlnets] if self.fused else []
        # Kernels are chosen once, here: the per-call choice reads os.environ and looks up modules
        # (importlib), which under torch.compile is an environment guard or a graph break at each of the
        # step's ~100 kernel calls (13 zero-conv points, ~60 GroupNorm+SiLU).
        self.zero_conv_impl = None
        if self.fused:
            from kernels.zero_conv import _resolve

            self.zero_conv_impl = _resolve(None, torch.device(device), dtype)
        if optimizations.groupnorm_silu:
            from kernels.groupnorm_silu import choose_impl

            impl = choose_impl(torch.device(device))
            for model in [sd.unet, *controlnets, sd.vae]:
                for module in model.modules():
                    if isinstance(module, torch.nn.GroupNorm):
                        module.kernel_impl = impl  # read by engine.modules._norm_silu
        self.step_runner = None  # None: eager calls, as the reference
        self.frozen_step_ran = False  # a step compiled with frozen weights has read them (set_weights refuses)
        if optimizations.cuda_graphs or optimizations.compile:
            from engine import cuda_graphs
            from engine.compile import compile_step

            step = compile_step(self.step_fn, optimizations.freeze_weights) if optimizations.compile else self.step_fn
            self.step_runner = cuda_graphs.StepGraphs(step, torch.device(device)) if optimizations.cuda_graphs else step

    def _in(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        x = x.to(device=self.device, dtype=dtype or self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the loop: float32, and in the default layout (the loop's cat/chunk/scheduler expect it)."""
        return x.float().contiguous() if self.channels_last else x.float()

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor, encoder: str = "text_encoder"):
        out = self.text_encoders[encoder](input_ids.to(self.device))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    @torch.inference_mode()
    def encode_hint(self, k: int, control_map: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        module = self.hint_encoders[k]  # a union's also takes its condition's type index and scale
        extra = [self._in(x) if x.is_floating_point() else x.to(self.device) for x in
                 (inputs[name] for name in module.extra_inputs)]
        return module(self._in(control_map), *extra)

    @torch.inference_mode()
    def controlnet(self, k, sample, timestep, cond, hint, scales):
        if self.step_runner is not None:
            return _NetCall(k, sample, cond, hint, scales)
        return self._controlnet(k, sample, timestep, cond, hint, scales)

    def combine(self, outputs: list, batch: int):
        if self.step_runner is not None:
            return _StepCall(outputs)
        return self._combine(outputs, batch)

    @torch.inference_mode()
    def unet(self, sample, timestep, cond, residuals) -> torch.Tensor:
        if self.step_runner is not None:
            return self._run_step(residuals.calls if residuals is not None else [], sample, timestep, cond)
        return self._unet(sample, timestep, cond, residuals)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor, vae: str = MODEL) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [-1, 1] -> the latent distribution's (mean, std), unscaled (engine.modules.VaeEncoder);
        TAESD's latents and None (engine.modules.TinyVaeEncoder)."""
        out = self.vae_encoders[vae](self._in(pixels, self.vae_dtypes[vae]))
        if isinstance(out, torch.Tensor):
            return self._out(out), None
        mean, std = out
        return self._out(mean), self._out(std)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, vae: str = MODEL) -> torch.Tensor:
        return self._out(self.vae_decoders[vae](self._in(latents, self.vae_dtypes[vae])))

    # ---- the step's parts, eager ------------------------------------------------------------------------

    def _cond_args(self, module, cond) -> list[torch.Tensor]:
        """The conditioning inputs `module` takes (its `cond_inputs`, in order), in the backend's dtype."""
        return [self._in(cond[name]) for name in module.cond_inputs]

    def _controlnet(self, k, sample, timestep, cond, hint, scales):
        body = self.controlnet_bodies[k]
        if self.fused:
            weights, biases = self.zero_convs[k]
            features = body.features(self._in(sample), timestep, *self._cond_args(body, cond), hint)
            return fused.PendingResiduals(features, weights, biases, scales.to(self.device, torch.float32))
        out = body(self._in(sample), timestep, *self._cond_args(body, cond), hint, self._in(scales))
        return tuple(self._out(r) for r in out)

    def _combine(self, outputs: list, batch: int):
        if self.fused:
            return fused.FusedResiduals(outputs, self.zero_conv_impl)  # summed inside the UNet, one op per point
        return sum_residuals(outputs, batch)

    def _unet(self, sample, timestep, cond, residuals) -> torch.Tensor:
        conds = self._cond_args(self.unet_model, cond)
        if isinstance(residuals, fused.FusedResiduals):
            named = dict(zip(self.unet_model.cond_inputs, conds))
            return self._out(fused.unet_forward(self.unet_model.unet, self._in(sample), timestep, residuals.add_into,
                                                **named))
        residuals = [self._in(r) for r in residuals] if residuals is not None else []
        return self._out(self.unet_model(self._in(sample), timestep, *conds, *residuals))

    # ---- the step as one function (cuda_graphs / compile) -----------------------------------------------

    def step_fn(self, key, sample, timestep, cond, control_sample, control_conds, hints, scales):
        """One denoising step without guidance: the nets in key.nets (each with its conditioning), the combine,
        the UNet. A plain function of its tensors (and lists and dicts of them), so a CUDA graph or
        torch.compile wraps it unchanged."""
        outputs = [self._controlnet(k, control_sample, timestep, control_cond, hint, s)
                   for k, control_cond, hint, s in zip(key.nets, control_conds, hints, scales)]
        residuals = self._combine(outputs, sample.shape[0]) if outputs else None
        return self._unet(sample, timestep, cond, residuals)

    def _run_step(self, calls: list[_NetCall], sample, timestep, cond) -> torch.Tensor:
        from engine.cuda_graphs import step_key

        control_sample = calls[0].sample if calls else sample
        key = step_key([c.k for c in calls], sample, control_sample, self.dtype)
        device = sample.device
        # Scales arrive as CPU tensors; the graph's buffers live on the device.
        scales = [c.scales.to(device, torch.float32) for c in calls]
        inputs = (sample, timestep.to(device), cond, control_sample, [c.cond for c in calls],
                  [c.hint for c in calls], scales)
        if self.optimizations.compile:
            inputs = _as_inference(inputs)
            self.frozen_step_ran = self.optimizations.freeze_weights
        return self.step_runner(key, *inputs)

    # ---- weights (LoRA: engine/lora.py) ------------------------------------------------------------------

    def _weights_module(self, graph: str) -> torch.nn.Module:
        modules = {"unet": self.unet_model.unet, **{name: e.text_encoder for name, e in self.text_encoders.items()}}
        if graph not in modules:
            raise ValueError(f"graph must be one of {', '.join(modules)}, got {graph!r}")
        return modules[graph]

    def _params(self, graph: str, names) -> dict[str, torch.nn.Parameter]:
        from engine.lora import LoraError

        params = dict(self._weights_module(graph).named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise LoraError(f"the {graph} has no parameter {missing[0]!r} ({len(missing)} missing): a LoRA for another "
                            "architecture")
        return {n: params[n] for n in names}

    def get_weights(self, graph: str, names) -> dict[str, torch.Tensor]:
        """Float32 copies of `graph`'s parameters by their diffusers names."""
        return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self._params(graph, names).items()}

    def check_set_weights(self, graph: str) -> None:
        """Raise if `graph`'s weights cannot be changed now (LoraSwitch asks before it writes any graph)."""
        if graph == "unet" and self.frozen_step_ran:
            raise ValueError("this Runner's step was compiled with frozen weights (optimizations freeze_weights, preset "
                             "'cpu-compiled'): they are constants of the compiled code and a LoRA switch would not be "
                             "seen. Pass loras= to Runner(...) (applied before compilation), or use a preset without "
                             "freeze_weights (e.g. 'cpu') to switch LoRAs per request")

    @torch.no_grad()
    def set_weights(self, graph: str, weights: dict[str, torch.Tensor]) -> None:
        """Copy complete new weights into the live parameters, in place (cast to the model's dtype; the same
        storage and memory format). Nothing per step: the merge is done once per switch. CUDA graphs replay
        kernels that read the parameters' memory, so a captured step sees the new values; eager and unfrozen
        compiled steps read parameters at every call. A step compiled with frozen weights baked them into its
        code: once it has run, a switch is refused rather than silently ignored. Fused Q/K/V projections
        (fused_qkv) are refreshed from the updated separate ones."""
        self.check_set_weights(graph)
        params = self._params(graph, weights)
        for name, value in weights.items():
            params[name].copy_(value)
        owners = {name.rsplit(".", 2)[0] for name in weights}
        module = self._weights_module(graph)
        for owner in owners:
            attn = module.get_submodule(owner)
            if getattr(attn, "fused_projections", False):
                _refresh_fused_projections(attn)


def _refresh_fused_projections(attn) -> None:
    """Attention.fuse_projections' concatenation, written into the existing fused weights in place."""
    parts = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
    fused = attn.to_kv if attn.is_cross_attention else attn.to_qkv
    fused.weight.copy_(torch.cat([getattr(attn, p).weight for p in parts]))
    if fused.bias is not None:
        fused.bias.copy_(torch.cat([getattr(attn, p).bias for p in parts]))


def _as_inference(x, copies=None):
    """Tensors as inference tensors, copying those made outside inference mode (the loop's latents and
    embeddings; under 1 MB a step at 512²), one copy per tensor so inputs passed twice stay one tensor.
    Dynamo guards on both the kind and the aliasing: a step compiled for one kind recompiled for the
    other, a minute on a CPU, when a caller's tensors changed kind (the benchmark's step inputs, then a
    generation's)."""
    copies = {} if copies is None else copies
    if isinstance(x, torch.Tensor):
        if x.is_inference():
            return x
        if id(x) not in copies:
            copies[id(x)] = x.clone()
        return copies[id(x)]
    if isinstance(x, dict):
        return {k: _as_inference(v, copies) for k, v in x.items()}
    return type(x)(_as_inference(v, copies) for v in x)

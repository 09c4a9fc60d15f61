"""The PyTorch backend: the reference every other backend is checked against, on any device.

With `TorchOptimizations(fused_zero_conv=True)` the ControlNets stop before their zero convs and the UNet
applies them inside its skip additions, one fused op per injection point (engine/fused.py).
"""
from __future__ import annotations

import torch

from engine import fused
from engine.backends import sum_residuals
from engine.modules import ControlNetBody, HintEncoder, TextEncoder, UNetWithResiduals, VaeDecoder
from engine.optimizations import TorchOptimizations


class TorchBackend:
    name = "torch"

    def __init__(self, sd, controlnets: list, device: torch.device, dtype: torch.dtype,
                 optimizations: TorchOptimizations = TorchOptimizations()):
        self.device = device
        self.dtype = dtype
        self.optimizations = optimizations
        self.text_encoder = TextEncoder(sd.text_encoder)
        self.unet_model = UNetWithResiduals(sd.unet)
        self.vae_decoder = VaeDecoder(sd.vae)
        self.hint_encoders = [HintEncoder(net) for net in controlnets]
        self.controlnet_bodies = [ControlNetBody(net) for net in controlnets]
        # Global-pool (shuffle) nets average their residuals over the image: nothing to fuse.
        self.fused = optimizations.fused_zero_conv and not any(b.global_pool for b in self.controlnet_bodies)
        self.zero_convs = [fused.zero_conv_params(net) for net in controlnets] if self.fused else []

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.device)).float()

    @torch.inference_mode()
    def encode_hint(self, k: int, control_map: torch.Tensor) -> torch.Tensor:
        return self.hint_encoders[k](self._in(control_map))

    @torch.inference_mode()
    def controlnet(self, k, sample, timestep, embeddings, hint, scales):
        body = self.controlnet_bodies[k]
        if self.fused:
            weights, biases = self.zero_convs[k]
            features = body.features(self._in(sample), timestep, self._in(embeddings), hint)
            return fused.PendingResiduals(features, weights, biases, scales.to(self.device, torch.float32))
        out = body(self._in(sample), timestep, self._in(embeddings), hint, self._in(scales))
        return tuple(r.float() for r in out)

    def combine(self, outputs: list, batch: int):
        if self.fused:
            return fused.FusedResiduals(outputs)  # summed inside the UNet, one op per injection point
        return sum_residuals(outputs, batch)

    @torch.inference_mode()
    def unet(self, sample, timestep, embeddings, residuals) -> torch.Tensor:
        if isinstance(residuals, fused.FusedResiduals):
            unet = self.unet_model.unet
            return fused.unet_forward(unet, self._in(sample), timestep, self._in(embeddings), residuals.add_into).float()
        residuals = [self._in(r) for r in residuals] if residuals is not None else []
        return self.unet_model(self._in(sample), timestep, self._in(embeddings), *residuals).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_decoder(self._in(latents)).float()

"""The PyTorch backend: the reference every other backend is checked against, on any device."""
from __future__ import annotations

import torch

from engine.modules import ControlNetBody, HintEncoder, TextEncoder, UNetWithResiduals, VaeDecoder


class TorchBackend:
    name = "torch"

    def __init__(self, sd, controlnets: list, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.text_encoder = TextEncoder(sd.text_encoder)
        self.unet_model = UNetWithResiduals(sd.unet)
        self.vae_decoder = VaeDecoder(sd.vae)
        self.hint_encoders = [HintEncoder(net) for net in controlnets]
        self.controlnet_bodies = [ControlNetBody(net) for net in controlnets]

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.device)).float()

    @torch.inference_mode()
    def encode_hint(self, k: int, control_map: torch.Tensor) -> torch.Tensor:
        return self.hint_encoders[k](self._in(control_map))

    @torch.inference_mode()
    def controlnet(self, k, sample, timestep, embeddings, hint, scales) -> tuple[torch.Tensor, ...]:
        out = self.controlnet_bodies[k](self._in(sample), timestep, self._in(embeddings), hint, self._in(scales))
        return tuple(r.float() for r in out)

    @torch.inference_mode()
    def unet(self, sample, timestep, embeddings, residuals) -> torch.Tensor:
        residuals = [self._in(r) for r in residuals] if residuals is not None else []
        return self.unet_model(self._in(sample), timestep, self._in(embeddings), *residuals).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_decoder(self._in(latents)).float()

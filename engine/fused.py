"""The torch backend's fused residual path: ControlNet zero convs applied inside the UNet's skip additions.

Unfused (diffusers, and our reference), per injection point and per ControlNet: a 1x1 conv (the zero
conv), a multiply by the scale, a sum over nets, and an add into the skip connection — several passes
over memory and temporaries, 13 points x N nets per step. Fused: each ControlNet stops before its zero
convs and hands over its 13 feature maps; the UNet forward below calls one
`kernels.fused_zero_conv_add` per injection point for all nets at once (read each input once, write once).

`unet_forward` is UNet2DConditionModel.forward cut down to what SD1.5 and SDXL configurations use (no class
or GLIGEN embeddings, no attention masks; SDXL's "text_time" added embedding), with a hook at each skip
addition (13 for SD1.5, 10 for SDXL).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.modules import down_blocks, embedding, mid_block


@dataclass
class PendingResiduals:
    """One ControlNet's output before its zero convs: its features, zero convs and scales, one per injection point."""

    features: list[torch.Tensor]
    weights: list[torch.Tensor]  # (C, Ck) per injection point
    biases: list[torch.Tensor]  # (C,)
    scales: torch.Tensor  # (points,) float32


@dataclass
class FusedResiduals:
    """Every active ControlNet's pending residuals for one step; applied inside `unet_forward`."""

    nets: list[PendingResiduals]
    impl: str | None = None  # kernel implementation; None: chosen per call (kernels.zero_conv._resolve)

    def add_into(self, i: int, skip: torch.Tensor) -> torch.Tensor:
        """skip + sum over nets of scale * zero_conv(feature) at injection point i, one fused op."""
        from kernels import fused_zero_conv_add

        feats = [net.features[i] for net in self.nets]
        weights = [net.weights[i] for net in self.nets]
        biases = [net.biases[i] for net in self.nets]
        scales = [net.scales[i] for net in self.nets]
        half = feats[0].shape[0]
        if half == skip.shape[0]:
            return fused_zero_conv_add(skip, feats, weights, biases, scales, impl=self.impl)
        # Guess mode with CFG: the ControlNets saw the conditional half only; the unconditional half of
        # the skip gets nothing added (diffusers adds zeros there).
        cond = fused_zero_conv_add(skip[skip.shape[0] - half:], feats, weights, biases, scales, impl=self.impl)
        return torch.cat([skip[: skip.shape[0] - half], cond])


def zero_conv_params(net) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A ControlNet's zero convs (one per injection point) as (C, Ck) weight matrices and (C,) biases."""
    convs = list(net.controlnet_down_blocks) + [net.controlnet_mid_block]
    return [c.weight.reshape(c.weight.shape[0], -1) for c in convs], [c.bias for c in convs]


def unet_forward(
    unet, sample: torch.Tensor, timestep: torch.Tensor, add_residual: Callable[[int, torch.Tensor], torch.Tensor],
    encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """UNet2DConditionModel.forward for SD1.5 and SDXL configs; `add_residual(i, skip)` at each skip point. The
    conditioning by name (engine.modules.unet_cond_inputs): SDXL's added embeds, an LCM UNet's guidance embedding."""
    emb = embedding(unet, sample, timestep, text_embeds, time_ids, timestep_cond=timestep_cond)
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor for dim in sample.shape[-2:])

    sample, skips = down_blocks(unet, unet.conv_in(sample), emb, encoder_hidden_states)
    skips = [add_residual(i, skip) for i, skip in enumerate(skips)]
    sample = add_residual(len(skips), mid_block(unet, sample, emb, encoder_hidden_states))

    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        res, skips = tuple(skips[-len(block.resnets):]), skips[: -len(block.resnets)]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)

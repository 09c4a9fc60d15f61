"""The models cut at the seams the engine needs: tensors in, tensors out, plain torch.

diffusers' `ControlNetModel.forward` runs the hint (conditioning) encoder on every call although it
depends only on the control image; here it is a module of its own, run once per generation, and the
ControlNet body takes the hint. The body's per-block scales are an input tensor (one per residual: 13 for
SD1.5, 10 for SDXL), so strength, guidance windows and guess mode's log-spaced scales never change the graph.
These modules are what the torch backend runs and what `export/` exports, so every backend runs the same cut.

The conditioning inputs follow the model's family (`cond_inputs`, read from its config): SD1.5's
encoder_hidden_states; SDXL adds text_embeds and time_ids (its "text_time" added embedding). A
ControlNet-Union (engine/controls.py) is the same body plus its condition types' embedding ("control_type"),
and its hint encoder also runs the task transformer, once per condition (UnionHintEncoder).

At the end: the GroupNorm + SiLU fusion (TorchOptimizations.groupnorm_silu), installed by swapping the
classes of existing modules so weights and state-dict keys never change.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

SD15_COND = ("encoder_hidden_states",)
SDXL_COND = ("encoder_hidden_states", "text_embeds", "time_ids")


def cond_inputs(model) -> tuple[str, ...]:
    """The conditioning a UNet or ControlNet takes, by its config: SDXL's "text_time" added embedding needs the
    pooled text embeds and the time ids."""
    added = model.config.addition_embed_type
    if model.class_embedding is not None or added not in (None, "text_time"):
        raise ValueError(f"UNets and ControlNets with class embeddings or addition_embed_type={added!r} are not "
                         "supported (SD1.5: none; SDXL: 'text_time')")
    return SDXL_COND if added == "text_time" else SD15_COND


def block_scales(scale: float, num_residuals: int, guess_mode: bool) -> torch.Tensor:
    """Per-residual scales as diffusers applies them: constant, or 0.1..1.0 log-spaced in guess mode."""
    if guess_mode:
        return torch.logspace(-1, 0, num_residuals) * scale
    return torch.full((num_residuals,), float(scale))


def time_embedding(model, sample: torch.Tensor, timestep: torch.Tensor,
                   timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
    """The timestep embedding of a UNet or ControlNet, as their diffusers forwards compute it (an LCM UNet
    adds its guidance embedding, `timestep_cond`, through the embedding's cond_proj)."""
    timesteps = timestep.reshape(-1).to(sample.device).expand(sample.shape[0])
    return model.time_embedding(model.time_proj(timesteps).to(dtype=sample.dtype), timestep_cond)


def added_embedding(model, emb: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's "text_time" added embedding (pooled text embeds + sinusoidal time ids), as diffusers' UNet and
    ControlNet forwards compute it (UNet2DConditionModel.get_aug_embed)."""
    time_embeds = model.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
    return model.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))


def embedding(model, sample, timestep, text_embeds=None, time_ids=None, control_type=None,
              timestep_cond=None) -> torch.Tensor:
    """The time embedding the blocks see: timestep (with an LCM UNet's guidance embedding), then a union net's
    condition types, then SDXL's added embedding, summed in diffusers' order."""
    emb = time_embedding(model, sample, timestep, timestep_cond)
    if control_type is not None:  # ControlNetUnionModel.forward: control_type_proj, control_add_embedding
        control = model.control_type_proj(control_type.flatten()).reshape((sample.shape[0], -1))
        emb = emb + model.control_add_embedding(control.to(emb.dtype))
    if text_embeds is not None:
        emb = emb + added_embedding(model, emb, text_embeds, time_ids)
    return emb


def down_blocks(model, sample, emb, encoder_hidden_states) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the down blocks from conv_in's output: (last sample, the skips incl. conv_in's output)."""
    skips = [sample]
    for block in model.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips.extend(res)
    return sample, skips


def mid_block(model, sample, emb, encoder_hidden_states) -> torch.Tensor:
    if getattr(model.mid_block, "has_cross_attention", False):
        return model.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
    return model.mid_block(sample, emb)


class HintEncoder(nn.Module):
    """Control map (B, 3, H, W) in [0, 1] -> hint (B, C0, H/8, W/8), added after the body's conv_in."""

    extra_inputs = ()

    def __init__(self, net: ControlNetModel):
        super().__init__()
        self.embedding = net.controlnet_cond_embedding
        self.bgr = net.config.controlnet_conditioning_channel_order == "bgr"

    def forward(self, control_map: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            control_map = torch.flip(control_map, dims=[1])
        return self.embedding(control_map)


class UnionHintEncoder(nn.Module):
    """A ControlNet-Union's hint for one condition: control map (B, 3, H, W), its type's index (1,) and its scale
    (1,) -> embedding(map) * scale + alpha * scale, alpha the task transformer's output for the map's mean
    feature plus the type's task embedding (ControlNetUnionModel.forward; one condition's scale is 1 there).
    The transformer attends across the batch only (diffusers' (batch, conditions, C) layout into a
    sequence-first attention), so a condition's hint does not depend on the others: summed per step. Every
    row of the batch is the same control map (one image per condition), and attention over identical rows
    equals attention over one, so the transformer runs on the first row: its exported attention then has a
    fixed length 1 instead of the batch traced at export (which broke other batch sizes)."""

    extra_inputs = ("control_type_index", "condition_scale")

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, control_map, control_type_index, condition_scale) -> torch.Tensor:
        net = self.net
        condition = net.controlnet_cond_embedding(control_map)
        feat_seq = torch.mean(condition, dim=(2, 3)) + net.task_embedding[control_type_index]
        x = feat_seq[:1].unsqueeze(1) * condition_scale
        for layer in net.transformer_layes:
            x = layer(x)
        alpha = net.spatial_ch_projs(x[:, 0]).unsqueeze(-1).unsqueeze(-1)
        return condition * condition_scale + alpha * condition_scale


def hint_encoder(net) -> HintEncoder | UnionHintEncoder:
    """The hint encoder of a ControlNet, or of a ControlNet-Union (one condition per call)."""
    return UnionHintEncoder(net) if hasattr(net, "task_embedding") else HintEncoder(net)


class ControlNetBody(nn.Module):
    """ControlNet minus its hint encoder: (sample, t, *conditioning, hint, scales) -> the down residuals + mid
    (12 + 1 for SD1.5, 9 + 1 for SDXL).

    `hint` may have batch 1: it broadcasts over the sample batch, so one hint serves every image and the CFG
    halves. `cond_inputs` names the conditioning inputs (engine.families) in the order forward takes them, as
    the graph does: the family's, and for a ControlNet-Union also "control_type" (its types, (B, types)).
    """

    def __init__(self, net: ControlNetModel):
        super().__init__()
        self.union = hasattr(net, "task_embedding")  # ControlNetUnionModel
        self.cond_inputs = cond_inputs(net) + (("control_type",) if self.union else ())
        self.net = net
        self.global_pool = bool(net.config.global_pool_conditions)

    @property
    def num_residuals(self) -> int:
        return len(self.net.controlnet_down_blocks) + 1

    def features(self, sample, timestep, *inputs) -> list[torch.Tensor]:
        """(*conditioning, hint) -> the feature maps before the zero convs (the fused kernel path applies
        those itself)."""
        net = self.net
        cond, hint = dict(zip(self.cond_inputs, inputs)), inputs[len(self.cond_inputs)]
        encoder_hidden_states = cond["encoder_hidden_states"]
        emb = embedding(net, sample, timestep, cond.get("text_embeds"), cond.get("time_ids"), cond.get("control_type"))
        sample, feats = down_blocks(net, net.conv_in(sample) + hint, emb, encoder_hidden_states)
        sample = mid_block(net, sample, emb, encoder_hidden_states)
        feats.append(sample)
        return feats

    def forward(self, sample, timestep, *inputs) -> tuple[torch.Tensor, ...]:
        """(sample, timestep, *conditioning, hint, scales) -> residuals."""
        scales = inputs[-1]
        feats = self.features(sample, timestep, *inputs[:-1])
        zero_convs = list(self.net.controlnet_down_blocks) + [self.net.controlnet_mid_block]
        out = []
        for i, (feat, conv) in enumerate(zip(feats, zero_convs)):
            res = conv(feat) * scales[i]
            if self.global_pool:
                res = torch.mean(res, dim=(2, 3), keepdim=True)
            out.append(res)
        return tuple(out)


def unet_cond_inputs(unet: UNet2DConditionModel) -> tuple[str, ...]:
    """The conditioning inputs a UNet takes, in order: its family's (`cond_inputs`), then an LCM-distilled
    UNet's guidance embedding (`time_cond_proj_dim` set; engine.families computes it from the guidance scale)."""
    extra = ("timestep_cond",) if unet.config.time_cond_proj_dim is not None else ()
    return cond_inputs(unet) + extra


class UNetWithResiduals(nn.Module):
    """UNet taking (sample, t, *conditioning) and the down residuals + mid residual as plain inputs (none:
    no ControlNet active). `cond_inputs` names the conditioning inputs in order, as the graph does."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.cond_inputs = unet_cond_inputs(unet)

    def forward(self, sample, timestep, *inputs) -> torch.Tensor:
        """(sample, timestep, *conditioning, *residuals) -> noise prediction."""
        count = len(self.cond_inputs)
        cond, residuals = dict(zip(self.cond_inputs, inputs[:count])), inputs[count:]
        down, mid = (list(residuals[:-1]), residuals[-1]) if residuals else (None, None)
        added = {name: cond[name] for name in ("text_embeds", "time_ids") if name in cond}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep_cond=cond.get("timestep_cond"),
            added_cond_kwargs=added or None,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


class TextEncoder(nn.Module):
    """Token ids (B, 77) -> CLIP hidden states (B, 77, D): the last (SD1.5), or the penultimate layer's (SDXL,
    `penultimate`); a CLIPTextModelWithProjection (SDXL's second) also returns its pooled projection (B, P)."""

    def __init__(self, text_encoder: nn.Module, penultimate: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.penultimate = penultimate
        self.pooled = hasattr(text_encoder, "text_projection")

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out[0]
        return (hidden, out.text_embeds) if self.pooled else hidden


def text_encoders(sd) -> dict[str, TextEncoder]:
    """The model's text encoders by graph name, cut as its family conditions on (SDXL: penultimate, two)."""
    sdxl = getattr(sd, "text_encoder_2", None) is not None  # SD1.5 parts (benchmarks' namespaces) may lack it
    encoders = {"text_encoder": TextEncoder(sd.text_encoder, penultimate=sdxl)}
    if sdxl:
        encoders["text_encoder_2"] = TextEncoder(sd.text_encoder_2, penultimate=True)
    return encoders


class VaeEncoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> (mean, std) of the latent distribution, each (B, 4, H/8, W/8).

    The distribution's parameters, not a sample, and before the latent scaling: the loop draws the
    sample itself, mean + std * noise from the generation's generator, then scales it, exactly as
    diffusers' retrieve_latents and its pipelines do (engine/modes.py). std is diffusers'
    exp(0.5 * clamp(logvar, -30, 20)).
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images, return_dict=False)[0]
        return dist.mean, dist.std


class TinyVaeEncoder(nn.Module):
    """TAESD (AutoencoderTiny): images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8), unscaled.

    No distribution: diffusers' retrieve_latents takes AutoencoderTiny's `latents` as they are, without a
    generator draw (engine/vaes.py), and scales them by its scaling_factor (1.0)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images, return_dict=False)[0]


class VaeDecoder(nn.Module):
    """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (the latent scaling is applied here).
    An AutoencoderKL or an AutoencoderTiny (TAESD, scaling_factor 1.0)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]


# ---- GroupNorm + SiLU fused (TorchOptimizations.groupnorm_silu) ---------------------------------------


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    from kernels import group_norm_silu

    # kernel_impl: set once by TorchBackend.__init__ (a compiled step must not choose per call)
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, impl=getattr(norm, "kernel_impl", None))


class GroupNormSiLU(nn.GroupNorm):
    """A GroupNorm whose output goes through SiLU, as one op. Installed by swapping the class of an existing
    GroupNorm (weights untouched) whose only consumer is a SiLU that is then made an Identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm_silu(self, x)


def _resnet_supported(block) -> bool:
    return (block.time_embedding_norm == "default" and isinstance(block.nonlinearity, nn.SiLU)
            and isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm))


def fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward (inference, time_embedding_norm="default", SiLU), line for line, with
    each GroupNorm + SiLU pair as one op; the SiLU on the time embedding stays a plain SiLU."""
    hidden_states = _norm_silu(self.norm1, input_tensor)
    if self.upsample is not None:
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        hidden_states = hidden_states + temb
    hidden_states = _norm_silu(self.norm2, hidden_states)
    hidden_states = self.conv2(self.dropout(hidden_states))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


def swap_resnet(block) -> bool:
    """Make a ResnetBlock2D run `fused_resnet_forward` by swapping its class for a subclass (made once per
    base class), so weights and state-dict keys stay as they were; False where its configuration is not
    the one the fused forward covers (the block is left as it is)."""
    if not _resnet_supported(block):
        return False
    base = type(block)
    fused = _FUSED_CLASSES.get(base)
    if fused is None:
        fused = _FUSED_CLASSES[base] = type("Fused" + base.__name__, (base,), {"forward": fused_resnet_forward})
    block.__class__ = fused
    return True


_FUSED_CLASSES: dict = {}


class NativeAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention product by kernels.attention, which runs the native
    bf16 kernel on CPUs with AVX512-BF16 and scaled_dot_product_attention elsewhere. q, k and v stay in
    the (batch, tokens, heads, head dim) layout the projections produce, so no transposes are copied.
    Spatial norms, masks and q/k norms (none in SD1.5) go to AttnProcessor2_0 unchanged."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if (attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None
                or attn.norm_k is not None or attn.norm_cross):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        from kernels.attention import attention

        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, heads = query.shape[0], attn.heads
        head_dim = key.shape[-1] // heads
        out = attention(query.view(batch, -1, heads, head_dim), key.view(batch, -1, heads, head_dim),
                        value.view(batch, -1, heads, head_dim))
        out = attn.to_out[1](attn.to_out[0](out.view(batch, -1, heads * head_dim).to(query.dtype)))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

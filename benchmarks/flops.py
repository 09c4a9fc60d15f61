"""FLOPs per image, counted rather than estimated.

Two halves:
1. `per_sample_flops(preset, height, width)`: each model's FLOPs for ONE sample at the given size,
   counted with `torch.utils.flop_counter` on the meta device (no weights, no time: ~15 s for SD1.5).
2. `calls(...)`: which model runs how often and at what batch in a real generation, recorded with
   forward hooks while the tiny model generates with the same arguments (the schedule — guidance window,
   scale 0, guess mode, CFG — is independent of model size).
FLOPs per image = sum over recorded calls of batch x per-sample FLOPs of that model, / images.
Convolutions and matmuls dominate; flop_counter counts those (2 FLOPs per multiply-add).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

# Model roles. "controlnet_full" is diffusers' ControlNet forward (hint encoder included, every step).
ROLES = ("text_encoder", "hint_encoder", "controlnet_body", "controlnet_full", "unet", "vae_decoder")


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def per_sample_flops(preset: str = "sd15-random", height: int = 512, width: int = 512) -> dict[str, int]:
    """FLOPs of each role for one sample at height x width, counted on the meta device. SDXL presets: both text
    encoders under "text_encoder", the ControlNet with the preset's own config (engine.tiny), and the pooled
    text embeds and time ids the UNet and ControlNet take."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from engine import tiny
    from engine.modules import ControlNetBody, HintEncoder

    p = tiny.PRESETS[preset]
    scale = 2 ** (len(p.vae["block_out_channels"]) - 1)
    h, w = height // scale, width // scale
    with torch.device("meta"):
        unet = UNet2DConditionModel(**p.unet)
        net_unet = UNet2DConditionModel.from_config(dict(unet.config, **p.controlnet)) if p.controlnet else unet
        net = ControlNetModel.from_unet(
            net_unet, conditioning_embedding_out_channels=p.hint_channels, load_weights_from_unet=False
        )
        vae = AutoencoderKL(**p.vae)
        texts = [CLIPTextModel(tiny.text_config(preset))]
        if p.text_2 is not None:
            texts.append(CLIPTextModelWithProjection(tiny.text_config(preset, second=True)))
        sample = torch.randn(1, 4, h, w)
        t = torch.tensor(500)
        emb = torch.randn(1, tiny.MAX_TOKENS, p.unet["cross_attention_dim"])
        added = None
        if p.unet.get("addition_embed_type") == "text_time":
            pooled = p.unet["projection_class_embeddings_input_dim"] - tiny.SDXL_TIME_IDS * p.unet["addition_time_embed_dim"]
            added = dict(text_embeds=torch.randn(1, pooled), time_ids=torch.randn(1, tiny.SDXL_TIME_IDS))
        control = torch.rand(1, 3, height, width)
        ids = torch.zeros(1, tiny.MAX_TOKENS, dtype=torch.long)
        hint_encoder, body = HintEncoder(net), ControlNetBody(net)
        hint = hint_encoder(control)
        cond = dict(encoder_hidden_states=emb, **(added or {}))
        body_inputs = [cond[name] for name in body.cond_inputs]
        residuals = body(sample, t, *body_inputs, hint, torch.ones(body.num_residuals))
        return {
            "text_encoder": sum(_count(lambda text=text: text(ids)) for text in texts),
            "hint_encoder": _count(lambda: hint_encoder(control)),
            "controlnet_body": _count(lambda: body(sample, t, *body_inputs, hint, torch.ones(body.num_residuals))),
            "controlnet_full": _count(lambda: net(sample, t, emb, control, added_cond_kwargs=added, return_dict=False)),
            "unet": _count(
                lambda: unet(sample, t, emb, added_cond_kwargs=added, down_block_additional_residuals=list(residuals[:-1]),
                             mid_block_additional_residual=residuals[-1])
            ),
            "vae_decoder": _count(lambda: vae.decode(sample)),
        }


@dataclass
class CallLog:
    """Samples processed per role during one generation (sum of batch sizes over calls)."""

    samples: Counter
    images: int

    def flops_per_image(self, per_sample: dict[str, int]) -> float:
        return sum(n * per_sample[role] for role, n in self.samples.items()) / self.images


def _hook_batches(modules: dict[str, list[torch.nn.Module]], samples: Counter) -> list:
    handles = []
    for role, mods in modules.items():
        for m in mods:
            def hook(module, args, kwargs, output, role=role):
                first = args[0] if args else next(iter(kwargs.values()))
                samples[role] += first.shape[0]
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
    return handles


def engine_calls(runner, prompt, image, **kwargs) -> CallLog:
    """What `Runner.generate` runs (torch backend), recorded with hooks."""
    b = runner.backend
    modules = {
        "text_encoder": [b.text_encoder],
        "hint_encoder": list(b.hint_encoders),
        "controlnet_body": list(b.controlnet_bodies),
        "unet": [b.unet_model],
        "vae_decoder": [b.vae_decoder],
    }
    samples: Counter = Counter()
    handles = _hook_batches(modules, samples)
    try:
        result = runner.generate(prompt, image, output_type="np", **kwargs)
    finally:
        for h in handles:
            h.remove()
    return CallLog(samples, len(result.images))


def diffusers_calls(pipe, prompt, image, **kwargs) -> CallLog:
    """What `StableDiffusionControlNetPipeline.__call__` runs, recorded with hooks."""
    nets = getattr(pipe.controlnet, "nets", [pipe.controlnet])
    modules = {
        "text_encoder": [pipe.text_encoder],
        "controlnet_full": list(nets),
        "unet": [pipe.unet],
        "vae_decoder": [pipe.vae.decoder],
    }
    samples: Counter = Counter()
    handles = _hook_batches(modules, samples)
    try:
        images = pipe(prompt, image, output_type="np", **kwargs).images
    finally:
        for h in handles:
            h.remove()
    return CallLog(samples, len(images))

"""Model families: what differs between SD1.5-style models and the next ones, one small class each.

The generation loop (engine/runner.py) and the backends never ask which family they run. A family answers:

    encode(backend, plan) -> Conditioning   the prompts' conditioning, CFG batch first ([uncond; cond]
                                            along dim 0 when guidance applies), each prompt repeated
                                            per image as diffusers does

A `Conditioning` is a dict of named tensors, named as the UNet's and ControlNets' graph inputs: SD1.5 gives
{"encoder_hidden_states": (B, 77, 768)}. A backend feeds each model the entries it declares
(engine.backends), so a family that adds inputs (SDXL's pooled text embeds and size ids, an LCM UNet's
guidance embedding) is one more class here and one more I/O spec, not a branch in the loop.
"""
from __future__ import annotations

import torch

Conditioning = dict  # graph input name -> tensor, batch first


def cond_half(cond: Conditioning, batch: int) -> Conditioning:
    """The conditional half of a CFG batch [uncond; cond] (guess mode: the ControlNets see only it)."""
    return {name: tensor[batch:] for name, tensor in cond.items()}


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length and truncated there, as diffusers' pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def guidance_embedding(guidance: float, dim: int, batch: int) -> torch.Tensor:
    """An LCM-distilled UNet's `timestep_cond`: the guidance scale as a (batch, dim) sinusoidal embedding of
    w = guidance - 1, op for op as diffusers' pipelines' get_guidance_scale_embedding (a pipeline method;
    importing a pipeline module takes seconds and pulls in transformers' image processors).
    tests/test_fewstep.py holds it bit-equal to diffusers' own."""
    w = torch.tensor(guidance - 1).repeat(batch) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(torch.float32)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class SD15:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden states as the cross-attention context.

    An LCM-distilled UNet (`time_cond_proj_dim` set) takes the guidance scale as an input instead of CFG: its
    conditioning adds "timestep_cond", and guidance never doubles the batch (`guidance_embedded`), as in
    diffusers' StableDiffusionControlNetPipeline and LatentConsistencyModelPipeline."""

    name = "sd15"

    def __init__(self, tokenizer, time_cond_proj_dim: int | None = None):
        self.tokenizer = tokenizer
        self.time_cond_proj_dim = time_cond_proj_dim

    @property
    def guidance_embedded(self) -> bool:
        return self.time_cond_proj_dim is not None

    def encode_prompts(self, backend, prompts: list[str]) -> Conditioning:
        """The conditioning of these prompts, one row each (no CFG pairing, no repeats)."""
        return {"encoder_hidden_states": backend.encode_text(tokenize(self.tokenizer, prompts))}

    def encode(self, backend, plan) -> Conditioning:
        texts = plan.negatives + plan.prompts if plan.do_cfg else plan.prompts
        cond = self.encode_prompts(backend, texts)
        cond = {name: t.repeat_interleave(plan.per_prompt, dim=0) for name, t in cond.items()}
        if self.guidance_embedded:
            cond["timestep_cond"] = guidance_embedding(plan.guidance, self.time_cond_proj_dim, plan.batch)
        return cond

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


class SD15:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden states as the cross-attention context."""

    name = "sd15"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_prompts(self, backend, prompts: list[str]) -> Conditioning:
        """The conditioning of these prompts, one row each (no CFG pairing, no repeats)."""
        return {"encoder_hidden_states": backend.encode_text(tokenize(self.tokenizer, prompts))}

    def encode(self, backend, plan) -> Conditioning:
        texts = plan.negatives + plan.prompts if plan.do_cfg else plan.prompts
        cond = self.encode_prompts(backend, texts)
        return {name: t.repeat_interleave(plan.per_prompt, dim=0) for name, t in cond.items()}

"""Model families: what differs between SD1.5-style models and SDXL, one small class each.

The generation loop (engine/runner.py) and the backends never ask which family they run. A family answers:

    prepare(args, mode, height, width) -> dict   its own arguments checked and resolved (Plan.family_args),
                                                  before any model work; another family's arguments refused
    encode(backend, plan) -> Conditioning         the prompts' conditioning, CFG batch first ([uncond; cond]
                                                  along dim 0 when guidance applies), each prompt repeated
                                                  per image as diffusers does
    defaults                                      the pipelines' defaults that differ (guidance, strength, scale)

A `Conditioning` is a dict of named tensors, named as the UNet's and ControlNets' graph inputs: SD1.5 gives
{"encoder_hidden_states": (B, 77, 768)}; SDXL adds "text_embeds" (B, 1280), the second text encoder's pooled
projection, and "time_ids" (B, 6), the size micro-conditioning. A backend feeds each model the entries it
declares (engine.backends), so a family that adds inputs is one more class here and one more I/O spec, not a
branch in the loop. The residual layout (13 residuals for SD1.5, 10 for SDXL) is read from the loaded nets.
"""
from __future__ import annotations

import torch

Conditioning = dict  # graph input name -> tensor, batch first

# StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline arguments SD1.5 has no use for (None: the default)
SDXL_ARGS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
             "negative_original_size", "negative_crops_coords_top_left", "negative_target_size")


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


def _per_image(cond: Conditioning, per_prompt: int) -> Conditioning:
    return {name: t.repeat_interleave(per_prompt, dim=0) for name, t in cond.items()}


class SD15:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden states as the cross-attention context.

    An LCM-distilled UNet (`time_cond_proj_dim` set) takes the guidance scale as an input instead of CFG: its
    conditioning adds "timestep_cond", and guidance never doubles the batch (`guidance_embedded`), as in
    diffusers' StableDiffusionControlNetPipeline and LatentConsistencyModelPipeline."""

    name = "sd15"
    # StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline defaults
    default_guidance = 7.5
    default_strength = {"img2img": 0.8, "inpaint": 1.0}
    default_conditioning_scale = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 0.5}
    default_size = 512  # A1111's width/height default for the model

    def __init__(self, tokenizer, time_cond_proj_dim: int | None = None):
        self.tokenizer = tokenizer
        self.time_cond_proj_dim = time_cond_proj_dim

    @property
    def guidance_embedded(self) -> bool:
        return self.time_cond_proj_dim is not None

    def prepare(self, args, mode: str, height: int, width: int) -> dict:
        given = [name for name in SDXL_ARGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]} is an SDXL argument (the second text encoder, size micro-conditioning); "
                             "this model is SD1.5: leave it unset")
        return {}

    def encode_prompts(self, backend, prompts: list[str]) -> Conditioning:
        """The conditioning of these prompts, one row each (no CFG pairing, no repeats)."""
        return {"encoder_hidden_states": backend.encode_text(tokenize(self.tokenizer, prompts))}

    def encode(self, backend, plan) -> Conditioning:
        texts = plan.negatives + plan.prompts if plan.do_cfg else plan.prompts
        cond = _per_image(self.encode_prompts(backend, texts), plan.per_prompt)
        if self.guidance_embedded:
            cond["timestep_cond"] = guidance_embedding(plan.guidance, self.time_cond_proj_dim, plan.batch)
        return cond


def _size(value, what: str, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)):
        raise ValueError(f"{what} must be (height, width), two integers >= 0, got {value!r}")
    return int(value[0]), int(value[1])


def _prompts(value, what: str, count: int, fallback: list[str]) -> list[str]:
    """prompt_2 / negative_prompt_2: None is the first text encoder's prompts, as diffusers' encode_prompt."""
    if value is None:
        return fallback
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{what} must be a string or a list of them, got {value!r}")
    texts = list(texts) * count if len(texts) == 1 else list(texts)
    if len(texts) != count:
        raise ValueError(f"{what} has {len(texts)} entries but prompt has {count}")
    return texts


class SDXL:
    """SDXL: two CLIP text encoders, their penultimate hidden states concatenated as the cross-attention context,
    the second's pooled projection as `text_embeds`, and the size micro-conditioning `time_ids` (original size,
    crop top-left, target size), exactly as StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline and
    StableDiffusionXLControlNetUnionPipeline encode them."""

    name = "sdxl"
    # StableDiffusionXLControlNet{,Img2Img,Inpaint}Pipeline defaults (inpaint's strength is 0.9999 there)
    default_guidance = 5.0
    default_strength = {"img2img": 0.8, "inpaint": 0.9999}
    default_conditioning_scale = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0}
    default_size = 1024

    def __init__(self, tokenizer, tokenizer_2, force_zeros_for_empty_prompt: bool = True):
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros = force_zeros_for_empty_prompt

    def prepare(self, args, mode: str, height: int, width: int) -> dict:
        """The second prompts and the (1, 6) time ids of the positive and negative halves, as each pipeline makes
        them. txt2img: the negative ids are (negative_original_size, negative_crops_coords_top_left,
        negative_target_size) only when both sizes are given, else the positive ids. img2img: each negative size
        defaults to its positive one, and the crop is the positive crop (the img2img pipeline ignores
        negative_crops_coords_top_left). inpaint: the pipeline has no negative_* sizes; the negative ids are the
        positive ones."""
        prompts = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)
        original = _size(args.original_size, "original_size", (height, width))
        crop = _size(args.crops_coords_top_left, "crops_coords_top_left", (0, 0))
        target = _size(args.target_size, "target_size", (height, width))
        negative = [_size(getattr(args, name), name, None) if getattr(args, name) is not None else None
                    for name in ("negative_original_size", "negative_crops_coords_top_left", "negative_target_size")]
        neg_original, neg_crop, neg_target = negative
        if mode == "inpaint":
            given = [name for name, value in zip(("negative_original_size", "negative_crops_coords_top_left",
                                                  "negative_target_size"), negative) if value is not None]
            if given:
                raise ValueError(f"{given[0]}: StableDiffusionXLControlNetInpaintPipeline has no negative size "
                                 "conditioning (its negative time ids are the positive ones); leave it unset")
            negative_ids = original + crop + target
        elif mode == "img2img":
            negative_ids = (neg_original or original) + crop + (neg_target or target)
        elif neg_original is not None and neg_target is not None:
            negative_ids = neg_original + (neg_crop or (0, 0)) + neg_target
        else:
            negative_ids = original + crop + target
        negatives = args.negative_prompt
        return dict(
            prompts_2=_prompts(args.prompt_2, "prompt_2", len(prompts), prompts),
            negatives_2=None if negatives is None and args.negative_prompt_2 is None else _prompts(
                args.negative_prompt_2, "negative_prompt_2", len(prompts),
                [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives or [""] * len(prompts))),
            # diffusers: negative_prompt None with force_zeros_for_empty_prompt -> zero embeddings, not "" encoded
            zero_negative=negatives is None and self.force_zeros,
            time_ids=torch.tensor([original + crop + target], dtype=torch.float32),
            negative_time_ids=torch.tensor([negative_ids], dtype=torch.float32),
        )

    def encode_prompts(self, backend, prompts: list[str], prompts_2: list[str]) -> Conditioning:
        """One row per prompt: both encoders' penultimate hidden states, concatenated; the second's pooled output."""
        first = backend.encode_text(tokenize(self.tokenizer, prompts), "text_encoder")
        second, pooled = backend.encode_text(tokenize(self.tokenizer_2, prompts_2), "text_encoder_2")
        return {"encoder_hidden_states": torch.cat([first, second], dim=-1), "text_embeds": pooled}

    def encode(self, backend, plan) -> Conditioning:
        x = plan.family_args
        cond = _per_image(self.encode_prompts(backend, plan.prompts, x["prompts_2"]), plan.per_prompt)
        ids = x["time_ids"]
        if plan.do_cfg:
            if x["zero_negative"]:
                uncond = {name: torch.zeros_like(t) for name, t in cond.items()}
            else:
                negatives_2 = x["negatives_2"] or plan.negatives
                uncond = _per_image(self.encode_prompts(backend, plan.negatives, negatives_2), plan.per_prompt)
            cond = {name: torch.cat([uncond[name], cond[name]]) for name in cond}
            ids = torch.cat([x["negative_time_ids"], ids])
        # diffusers repeats the [negative; positive] pair per image: (neg, pos, neg, pos, ...), whose halves are
        # the right ids only when they are equal (the default); kept so, to equal its images.
        cond["time_ids"] = ids.repeat(plan.batch, 1)
        return cond

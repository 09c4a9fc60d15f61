"""The A1111 response's texts: per-image infotexts (engine.pngmeta's PNG text), `info` JSON, `parameters`."""
from __future__ import annotations

import json
import time

from engine.serve.a1111 import control
from engine.serve.a1111.plan import CONTROL_MODES, SCHEDULES, Plan, short_hash

def infotext(plan: Plan, runner, seed: int, batch_pos: int, batch_size: int, lora_hashes: dict) -> str:
    """The "parameters" text the engine's PNGs carry (engine.pngmeta), per image; `lora_hashes`: name -> A1111
    hash of each LoRA the run applied."""
    from engine.pngmeta import format_parameters

    by_slot = {u.slot: u for u in plan.units}
    used = sorted(by_slot)
    kw = plan.runner_kwargs
    p = dict(prompt=plan.prompt_as_sent, negative_prompt=plan.negative_prompt,
             num_inference_steps=kw["num_inference_steps"],
             scheduler=kw["scheduler"], guidance_scale=kw["guidance_scale"], seed=seed, width=kw["width"],
             height=kw["height"], model=runner.model, eta=kw["eta"], num_images_per_prompt=batch_size,
             guess_mode=False, controlnet=[], preprocess=[], controlnet_conditioning_scale=[],
             control_guidance_start=[], control_guidance_end=[], image=[], unit_pairs=[])
    if plan.init:  # img2img: A1111's Denoising strength, and its inpainting entries (Mask blur, ...)
        p["strength"] = plan.init["strength"]
        if plan.img2img is not None and plan.img2img.inpaint is not None and plan.init["mask_image"] is not None:
            p.update(plan.img2img.inpaint.parameters())
    if plan.loras:  # A1111's "Lora hashes" (the prompt keeps its tags), written by engine.pngmeta
        p["lora_hashes"] = lora_hashes
    vae = used_vae(plan, runner)
    if vae.name != "model":  # A1111's "VAE: name"
        p["vae"] = vae.name
    canny = next((by_slot[k] for k in used if by_slot[k].module == "canny"), None)
    if canny is not None:  # pngmeta's global canny pair; each unit's own thresholds are in its unit_pairs
        p["canny_low"], p["canny_high"] = int(canny.threshold_a), int(canny.threshold_b)
    for k in used:
        u = by_slot[k]
        p["controlnet"].append(u.model)
        p["preprocess"].append(None if u.module == "none" else u.module)
        p["controlnet_conditioning_scale"].append(u.weight)
        p["control_guidance_start"].append(u.guidance_start)
        p["control_guidance_end"].append(u.guidance_end)
        p["image"].append(None)
        pairs = {"Control Mode": CONTROL_MODES[u.control_mode], "Resize Mode": control.RESIZE_MODES[u.resize_mode],
                 "Pixel Perfect": str(u.pixel_perfect)}
        if u.processor_res is not None:
            pairs["Processor Res"] = int(u.processor_res)
        if u.threshold_a is not None:
            pairs["Threshold A"] = u.threshold_a if u.module != "canny" else int(u.threshold_a)
        if u.threshold_b is not None:
            pairs["Threshold B"] = u.threshold_b if u.module != "canny" else int(u.threshold_b)
        p["unit_pairs"].append(pairs)
    return format_parameters(p, batch_pos=batch_pos if batch_size > 1 else None)


def used_vae(plan: Plan, runner):
    """The engine.vaes.VaeInfo a plan decodes with (override_settings.sd_vae, else the server's default)."""
    from engine.vaes import pick

    return pick(plan.runner_kwargs.get("vae"), runner.vaes, runner.parts.default_vae)


def info_json(plan: Plan, runner, req, infotexts: list[str]) -> str:
    kw = plan.runner_kwargs
    count = len(plan.seeds)
    vae = used_vae(plan, runner)
    return json.dumps(dict(
        prompt=plan.prompt_as_sent, all_prompts=[plan.prompt_as_sent] * count,
        negative_prompt=plan.negative_prompt or "",
        all_negative_prompts=[plan.negative_prompt or ""] * count, seed=plan.seeds[0], all_seeds=plan.seeds,
        subseed=plan.seeds[0], all_subseeds=plan.seeds, subseed_strength=0, width=kw["width"], height=kw["height"],
        sampler_name=plan.sampler, scheduler=SCHEDULES[plan.schedule], cfg_scale=kw["guidance_scale"],
        steps=kw["num_inference_steps"], batch_size=req.batch_size, restore_faces=False, face_restoration_model=None,
        sd_model_name=runner.model, sd_model_hash=short_hash(runner.model, 10), sd_vae_name=None if vae.name == "model" else vae.name,
        sd_vae_hash=None,
        seed_resize_from_w=-1, seed_resize_from_h=-1, denoising_strength=plan.init.get("strength"),
        extra_generation_params={f"ControlNet {u.index}": u.model for u in plan.units}, index_of_first_image=0,
        infotexts=infotexts, styles=[], job_timestamp=time.strftime("%Y%m%d%H%M%S"), clip_skip=1,
        is_using_inpainting_conditioning=False, version="controlnet-engine",
    ))


def parameters(req, plan: Plan) -> dict:
    echoed = req.model_dump()
    echoed.update(seed=plan.seeds[0], sampler_name=plan.sampler, scheduler=SCHEDULES[plan.schedule])
    if "init_images" in echoed and not req.include_init_images:
        echoed.update(init_images=None, mask=None)  # as A1111: the pictures are echoed only when asked
    return echoed

"""A generation's arguments, checked and resolved into the `Plan` the loop reads, before any diffusion model work.

    args = GenerateArgs("a photo", image="edges.png", num_inference_steps=20)   # diffusers' names, defaults
    plan = prepare(args, runner)     # every check, every default, the images loaded and sized; or ValueError
    runner.run(plan)                 # the loop (engine/runner.py) reads only the plan

`GenerateArgs` is the one place an argument is declared (name, default, meaning); `prepare` is the one
place it is checked and resolved (diffusers' check_inputs + prepare_* split, written once for every mode
and family). `Runner.generate(prompt, image, **options)` is `run(prepare(GenerateArgs(...)))`; the CLI
reads its flags' defaults from `GenerateArgs` (engine/cli_flags.py).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch

from engine import controls, modes
from engine import preprocess as pre
from engine.backends import check_request
from engine.controls import CONTROL_MODES, soft_block_scales  # noqa: F401  (the A1111 routes' names for them)
from engine.families import SDXL_ARGS
from engine.schedulers import check_scheduler_steps
from engine.vaes import pick as pick_vae

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class GenerateArgs:
    """`Runner.generate`'s arguments, as diffusers' ControlNet pipelines name them and with their defaults:
    text to image (`StableDiffusionControlNetPipeline`), img2img with `init_image`
    (`StableDiffusionControlNetImg2ImgPipeline`, whose `image` is our `init_image` and whose `control_image`
    is our `image`), inpainting with `init_image` and `mask_image` (`StableDiffusionControlNetInpaintPipeline`);
    for SDXL models their `StableDiffusionXL...` counterparts and `StableDiffusionXLControlNetUnionPipeline`.
    """

    prompt: str | list[str]
    # The raw picture, one per ControlNet (PIL, numpy HWC uint8/float, or a file path); a ControlNet-Union with
    # several conditions takes one per condition (engine/controls.py). An inpaint ControlNet's may be None (or
    # `image` left unset): its map is built from the init image and the mask.
    image: object = None
    negative_prompt: str | list[str] | None = None
    # Default: the init image's size (else the first control map's), rounded down to multiples of 8;
    # control maps are resized to the generation size.
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 20
    guidance_scale: float | None = None  # None: the pipelines' default, SD1.5 7.5, SDXL 5.0
    # None: each pipeline's own default, 1.0 text to image, 0.8 img2img, inpainting 0.5 (SDXL 1.0). One, or one
    # per net (per condition of a ControlNet-Union).
    controlnet_conditioning_scale: float | list[float] | None = None
    guess_mode: bool = False
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0
    scheduler: str = "unipc"
    # seed=s gives the same image as diffusers with generator=torch.Generator("cpu").manual_seed(s).
    seed: int | None = None
    generator: torch.Generator | None = None
    latents: torch.Tensor | None = None  # start noise, text to image only
    num_images_per_prompt: int = 1
    output_type: str = "pil"  # "pil", "np" ((N, H, W, 3) floats in [0, 1]) or "latent"
    # None applies each ControlNet type's preprocessor (canny: cv2.Canny 100/200; inpaint: masked pixels
    # -1); False takes `image` as a ready control map; or a preprocessor (one, or one per net): a module of
    # engine/preprocess's table by the A1111 extension's key or UI name ("depth", "depth_midas"), a
    # Preprocessor with its sliders, or a callable.
    preprocess: object = None
    eta: float = 0.0
    callback: Callable[[int, int], None] | None = None  # callback(step, total) after each denoising step
    init_image: object = None  # img2img and inpainting: loaded like control images
    # White repaints, black keeps (binarised at 0.5 as diffusers does); the init image's size.
    mask_image: object = None
    # In (0, 1]; None is diffusers' default (img2img 0.8, inpaint 1.0, SDXL inpaint 0.9999): only the last
    # int(steps * strength) steps run.
    strength: float | None = None
    # The A1111 ControlNet extension's modes (one, or one per net). "balanced": every block at the net's
    # scale; "prompt" (My prompt is more important): block i of 13 at scale * 0.825**(12-i); "controlnet"
    # (ControlNet is more important): those scales, and the nets see the conditional half only (their
    # residuals are zero for the unconditional one), as guess mode. None: guess_mode decides, as in
    # diffusers. "controlnet" must be on all nets or none.
    control_mode: str | list[str] | None = None
    # Which loaded VAE decodes (and encodes the init image): None is the Runner's default (Runner(vae=...),
    # else the model's own), "model" the model's own, or the name/source of the one given as Runner(vae=...)
    # (engine/vaes.py). A1111's sd_vae values "Automatic" and "None" mean the default and "model".
    vae: str | None = None
    # latents_callback(step, total, latents) after each denoising step, with the step's latents (for
    # previews: Runner.preview decodes them with TAESD where one is loaded).
    latents_callback: Callable[[int, int, torch.Tensor], None] | None = None
    # ControlNet-Union condition types (diffusers' union pipeline's `control_mode`, renamed: control_mode above
    # means A1111's modes): a name (openpose, depth, hed/scribble, canny/lineart, normal, segment, ProMax's tile
    # and repaint) or diffusers' index, a list of them for several conditions; with several nets one entry per
    # net (None for plain ControlNets). engine/controls.py.
    control_type: object = None
    # SDXL (engine/families.py): the second text encoder's prompts (None: prompt / negative_prompt) and the size
    # micro-conditioning, (height, width) pairs; None: (height, width), crop (0, 0), as the SDXL pipelines.
    prompt_2: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None

    @classmethod
    def from_options(cls, prompt, image, options: dict) -> "GenerateArgs":
        names = [f.name for f in fields(cls)]
        unknown = [name for name in options if name not in names]
        if unknown:
            raise ValueError(f"unknown generate() argument {unknown[0]!r}; the arguments are {', '.join(names)}")
        return cls(prompt, image, **options)


@dataclass
class Plan:
    """Everything the loop needs, checked and resolved; no model has run yet."""

    prompts: list[str]
    negatives: list[str]
    per_prompt: int
    batch: int  # images: len(prompts) * per_prompt
    guidance: float
    do_cfg: bool  # guidance > 1 (and a UNet without a guidance embedding): the model batch is [uncond; cond]
    steps: int
    strength: float | None  # None for text to image
    scheduler: str
    eta: float
    mode: str  # txt2img, img2img, inpaint
    height: int
    width: int
    latent_shape: tuple
    seed: int | None
    generator: torch.Generator
    latents: torch.Tensor | None  # given start noise (txt2img)
    control_maps: list  # per condition (one per plain ControlNet), the map after preprocessing (PIL or array)
    controls: controls.Controls  # the conditions, per-net residual scales, union inputs, what runs when
    init_pixels: torch.Tensor | None  # (1, 3, H, W) in [-1, 1]
    mask_pixels: torch.Tensor | None  # (1, 1, H, W), 0/1
    guess: bool  # the ControlNets see the conditional half only
    control_batch: int  # the ControlNets' batch: the CFG batch, or its conditional half in guess mode
    output_type: str
    callback: Callable[[int, int], None] | None
    vae: object  # engine.vaes.VaeInfo: the VAE that encodes and decodes
    latents_callback: Callable[[int, int, torch.Tensor], None] | None = None
    family_args: dict = field(default_factory=dict)  # the family's own resolved arguments (engine/families.py)
    parameters: dict = field(default_factory=dict)  # the arguments as resolved (for reproducing the image)
    preprocess_ms: float = 0.0  # time making the control maps (annotator loads included): the "preprocess" stage


class ImageProcessors:
    """diffusers' image processors configured as its ControlNet pipelines configure them, so sizing,
    resizing and normalising match exactly."""

    def __init__(self, vae_scale_factor: int):
        from diffusers.image_processor import VaeImageProcessor

        self.control = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        self.image = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        # the inpaint pipelines' mask processor: grayscale, resized, binarised at 0.5
        self.mask = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True,
                                      do_convert_grayscale=True)

    def control_tensor(self, control_map, height: int, width: int) -> torch.Tensor:
        return self.control.preprocess(control_map, height=height, width=width).to(torch.float32)

    def default_size(self, image) -> tuple[int, int]:
        """(height, width) of an image rounded down to the VAE's multiple, as the pipelines default them."""
        return self.control.get_default_height_width(image if not isinstance(image, np.ndarray) else image[None])


# ---- checks: each names the bad value and what is allowed ----------------------------------------------

def _check_int(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_prompts(prompt, what: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{what} must be a non-empty string or a list of them, got {prompt!r}")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{what} must be a non-empty string or a list of them, got {p!r} in {prompt!r}")
    return list(prompts)


def _image_inputs(runner, init_image, mask_image, strength, steps: int):
    """(mode, init image, mask, strength) checked, before any model work."""
    if mask_image is not None and init_image is None:
        raise ValueError("mask_image needs an init_image: inpainting repaints the masked part of the init image")
    init = None if init_image is None else pre.load_image(init_image, "init image")
    mask = None if mask_image is None else pre.load_mask(mask_image)
    if mask is not None and pre.image_size(mask) != pre.image_size(init):
        (mw, mh), (iw, ih) = pre.image_size(mask), pre.image_size(init)
        raise ValueError(f"mask_image is {mw}x{mh} but init_image is {iw}x{ih}: give a mask of the init image's size")
    mode = "txt2img" if init is None else ("img2img" if mask is None else "inpaint")
    parts = runner.parts
    if parts.unet_channels != parts.latent_channels and mode != "inpaint":
        raise ValueError(f"model {runner.model!r} has a {parts.unet_channels}-channel inpainting UNet: it needs "
                         "init_image and mask_image (inpainting); for txt2img or img2img use a 4-channel model")
    if mode != "txt2img" and not parts.can_encode_images:
        raise ValueError(f"{mode} needs a VAE encoder, and this engine dir was built without one: rebuild it with "
                         "python -m engine.build (which now exports vae_encoder)")
    default = runner.family.default_strength.get(mode)
    return mode, init, mask, modes.check_strength(strength, mode, steps, default)


def prepare(args: GenerateArgs, runner) -> Plan:
    """Check and resolve `args` for `runner` (its ControlNet specs, loaded parts, family, backend, processors),
    before any model work: a bad call raises ValueError naming the value and leaves nothing behind."""
    specs, family, parts = runner.controlnet_specs, runner.family, runner.parts
    prompts = _check_prompts(args.prompt)
    negatives = [""] * len(prompts) if args.negative_prompt is None else _check_prompts(args.negative_prompt,
                                                                                       "negative_prompt")
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
    steps = _check_int(args.num_inference_steps, "num_inference_steps", 1)
    per_prompt = _check_int(args.num_images_per_prompt, "num_images_per_prompt", 1)
    guidance = controls.check_number(family.default_guidance if args.guidance_scale is None else args.guidance_scale,
                                     "guidance_scale", 0.0)
    for value, what in ((args.height, "height"), (args.width, "width")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
            raise ValueError(f"{what} must be a positive multiple of 8, got {value!r}")
    check_scheduler_steps(args.scheduler, runner.scheduler_config, steps)
    if args.output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {args.output_type!r}")
    mode, init, mask, strength = _image_inputs(runner, args.init_image, args.mask_image, args.strength, steps)
    vae = pick_vae(args.vae, runner.parts.vaes, runner.parts.default_vae)
    latents, generator, seed = args.latents, args.generator, args.seed
    if latents is not None and mode != "txt2img":
        raise ValueError(f"latents are start noise for text to image; {mode} starts from init_image: leave "
                         "latents unset")
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        seed = _check_int(seed, "seed", 0)
    elif generator is None and latents is None:
        seed = random.randrange(2**32)  # recorded in the result, so the image can be reproduced
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed if seed is not None else random.randrange(2**32))

    processors = runner.processors
    preprocess_start = time.perf_counter()
    request = controls.check(specs, parts.unions, args, init, mask, family.default_conditioning_scale[mode],
                             runner.annotators, seed)
    preprocess_ms = (time.perf_counter() - preprocess_start) * 1e3
    height, width = args.height, args.width
    if height is None or width is None:
        sized, what = (init, "init image") if init is not None else (request.maps[0], "control image")
        default_h, default_w = processors.default_size(sized)
        height, width = height or default_h, width or default_w
        if height < 8 or width < 8:
            raise ValueError(f"{what} is too small: {width}x{height} after rounding down to multiples of 8")
    family_args = family.prepare(args, mode, height, width)
    batch = len(prompts) * per_prompt
    check_request(runner.backend, batch, height, width)
    latent_shape = (batch, parts.latent_channels, height // parts.vae_scale_factor, width // parts.vae_scale_factor)
    if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != latent_shape):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a tensor of shape {latent_shape}, got {got}")

    net_modes = request.net_modes
    guess = (args.guess_mode if net_modes is None else net_modes[0] == "controlnet") or parts.global_pool
    # An LCM UNet takes the guidance as an input and never runs the unconditional half (diffusers'
    # do_classifier_free_guidance); families without one have no guidance_embedded.
    do_cfg = guidance > 1.0 and not getattr(family, "guidance_embedded", False)
    control_batch = batch * (2 if do_cfg and not guess else 1)
    resolved = controls.resolve(request, processors, height, width, parts.num_residuals, guess, control_batch)
    per_net = len(request.scales) > 1
    parameters = dict(
        prompt=prompts if len(prompts) > 1 else prompts[0],
        negative_prompt=args.negative_prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        controlnet_conditioning_scale=request.scales if per_net else request.scales[0],
        guess_mode=guess,
        control_guidance_start=request.starts if per_net else request.starts[0],
        control_guidance_end=request.ends if per_net else request.ends[0],
        scheduler=args.scheduler,
        seed=seed,
        num_images_per_prompt=per_prompt,
        strength=strength,  # None for text to image
        mask=mask is not None,
        model=runner.model,
        controlnet=[spec.name for spec in specs],
        loras=runner.loras.describe() if runner.loras is not None else [],
        vae=vae.name,
    )
    if net_modes is not None:
        parameters["control_mode"] = net_modes if len(specs) > 1 else net_modes[0]
    if args.control_type is not None:
        parameters["control_type"] = args.control_type
    parameters.update({name: getattr(args, name) for name in SDXL_ARGS if getattr(args, name) is not None})
    return Plan(
        prompts=prompts, negatives=negatives, per_prompt=per_prompt, batch=batch, guidance=guidance,
        do_cfg=do_cfg, steps=steps, strength=strength, scheduler=args.scheduler, eta=args.eta, mode=mode,
        height=height, width=width, latent_shape=latent_shape, seed=seed, generator=generator, latents=latents,
        control_maps=request.maps, controls=resolved,
        init_pixels=None if init is None else processors.image.preprocess(init, height=height, width=width).to(torch.float32),
        mask_pixels=None if mask is None else processors.mask.preprocess(mask, height=height, width=width),
        guess=guess, control_batch=control_batch, output_type=args.output_type, callback=args.callback,
        vae=vae, latents_callback=args.latents_callback, family_args=family_args, parameters=parameters,
        preprocess_ms=preprocess_ms,
    )

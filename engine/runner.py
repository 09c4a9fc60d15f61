"""`Runner`: SD1.5 + ControlNet text-to-image, img2img and inpainting, equal in output to diffusers'
ControlNet pipelines (StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline).

    runner = Runner(model="tiny", controlnet="canny")
    result = runner.generate("a photo of an astronaut", image="photo.png", seed=0)
    result = runner.generate("a painting", image="photo.png", init_image="photo.png", strength=0.6, seed=0)
    result.images[0].save("out.png"); print(result.timings)

The loop below is the one in shared/ARCHITECTURE.md and is the same for every backend. Where diffusers
wastes work, this does not: the hint encoder runs once per generation (not once per step), and a
ControlNet outside its [start, end] window or at scale 0 is not run at all (diffusers runs it and
multiplies by zero). Both leave the output unchanged; tests/test_parity.py holds that to 1e-5. The modes
differ only in their kept timesteps, start latents and mask blend (engine/modes.py); at strength s only
the kept steps run (diffusers' get_timesteps), and tests/test_img2img.py holds them to diffusers too.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import torch

from engine import modes
from engine import preprocess as pre
from engine.backends import check_backend_name, check_request
from engine.modules import block_scales
from engine.optimizations import TorchOptimizations, resolve_optimizations
from engine.parts import DTYPES, load_engine_dir, load_torch
from engine.schedulers import check_scheduler_name, make_scheduler, step_kwargs

OUTPUT_TYPES = ("pil", "np", "latent")
STAGES = ("preprocess", "text_encoder", "hint_encoder", "vae_encoder", "controlnet", "unet", "scheduler", "vae", "total")
# The A1111 ControlNet extension's control modes ("Balanced", "My prompt is more important", "ControlNet is
# more important"); see Runner.generate's `control_mode`.
CONTROL_MODES = ("balanced", "prompt", "controlnet")
SOFT_INJECTION_BASE = 0.825  # the extension's per-block decay: block i of 13 is scaled by 0.825 ** (12 - i)


@dataclass
class GenerationResult:
    images: list | np.ndarray | torch.Tensor  # PIL images, (N, H, W, 3) floats in [0, 1], or latents
    timings: dict[str, float]  # milliseconds per stage (STAGES); "total" is the whole call
    seed: int | None  # the seed used, when the noise came from a seed (None for a given generator/latents)
    control_maps: list = field(default_factory=list)  # per ControlNet, the map after preprocessing (PIL/array)
    parameters: dict = field(default_factory=dict)  # the arguments as resolved (for reproducing the image)


class _StageTimer:
    """Milliseconds per stage; synchronises CUDA so a stage's time is its own."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.ms = {stage: 0.0 for stage in STAGES}

    @contextmanager
    def __call__(self, stage: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.ms[stage] += (time.perf_counter() - start) * 1e3


def _as_list(value, count: int, what: str) -> list:
    """A per-ControlNet value: one value for all nets, or a list with one entry per net."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{what} has {len(value)} entries but there are {count} ControlNets: give {count}")
        return list(value)
    return [value] * count


def _check_number(value, what: str, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{what} must be >= {low}, got {value!r}")
    return float(value)


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


def soft_block_scales(scale: float, num_residuals: int) -> torch.Tensor:
    """The extension's "soft injection": the deepest block at full scale, each shallower one 0.825 times the next."""
    exponents = torch.arange(num_residuals - 1, -1, -1, dtype=torch.float64)
    return (scale * SOFT_INJECTION_BASE ** exponents).to(torch.float32)


def _check_control_modes(control_mode, count: int, guess_mode: bool) -> list[str] | None:
    if control_mode is None:
        return None
    checked = _as_list(control_mode, count, "control_mode")
    for mode in checked:
        if mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {', '.join(CONTROL_MODES)} (or a list, one per ControlNet), "
                             f"got {mode!r}")
    if guess_mode:
        raise ValueError("give guess_mode or control_mode, not both: control_mode 'controlnet' is the extension's guess mode")
    if len({mode == "controlnet" for mode in checked}) > 1:
        raise ValueError(f"control_mode 'controlnet' must be on every ControlNet or on none, got {checked}: the nets "
                         "share one batch, which holds the unconditional half for all of them or for none")
    return checked


class Runner:
    """SD1.5 + one or more ControlNets behind one backend. Load once, call `generate` many times."""

    loras = None  # engine.lora.LoraSwitch, made by the first set_loras with a LoRA in it

    def __init__(
        self,
        model: str | None = None,
        controlnet: str | Sequence[str] | None = None,
        backend: str = "auto",
        engine_dir: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        optimizations: str | TorchOptimizations | None = None,
        loras: Sequence[tuple[str, float]] | None = None,
        annotators: dict | None = None,
    ):
        """`model` defaults to SD1.5 and `controlnet` to "canny"; with `engine_dir` they default to what the
        dir was built for, and if given must match it (a subset of its ControlNets is fine). `backend`:
        "auto" is torch without `engine_dir`, else what the dir was built for; "onnxruntime",
        "openvino" and "tensorrt" need an `engine_dir` from `python -m engine.build` (openvino also takes
        dtype="bf16" on CPUs with native bf16). `optimizations`: the torch
        backend's switches, a preset name ("reference", "fused") or a TorchOptimizations. `loras`: [(source,
        weight), ...] merged into the UNet and text encoder (engine/lora.py); `set_loras` switches them.
        `annotators`: {preprocessor: Hugging Face id or folder} for model-backed preprocessors (e.g.
        {"depth_anything_v2": DIR}); they load on first use, on this Runner's device (engine/preprocess)."""
        check_backend_name(backend)
        torch_optimizations = resolve_optimizations(optimizations)
        names = None if controlnet is None else ([controlnet] if isinstance(controlnet, str) else list(controlnet))
        if names is not None and not names:
            raise ValueError("controlnet must name at least one ControlNet")
        if engine_dir is not None:
            if optimizations is not None:
                raise ValueError(f"optimizations={optimizations!r} are switches of the torch backend; an engine dir "
                                 "runs its built graphs: leave optimizations unset with engine_dir")
            parts = load_engine_dir(engine_dir, model, names, backend, device, dtype)
        elif backend in ("onnxruntime", "tensorrt", "openvino"):
            raise ValueError(f"backend {backend!r} runs built graphs: pass engine_dir=DIR from "
                             "python -m engine.build, or use backend='torch'")
        else:
            parts = load_torch(model, names, device, dtype, torch_optimizations)
        self.parts = parts
        # The attributes callers read (generate.py, serve/, benchmarks), set once for both kinds of load.
        self.backend, self.device, self.dtype = parts.backend, parts.device, parts.dtype
        self.model, self.controlnet_specs = parts.model, parts.controlnet_specs
        self.tokenizer, self.scheduler_config = parts.tokenizer, parts.scheduler_config
        self.vae_scale_factor, self.latent_channels = parts.vae_scale_factor, parts.latent_channels
        self.global_pool, self.num_residuals = parts.global_pool, parts.num_residuals
        self.annotators = pre.Annotators(annotators, self.device)
        self.set_loras(loras or [])

    def set_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Replace the whole LoRA set: [(source, weight), ...]; [] removes every LoRA (the base model exactly).
        Merged once into the weights (no per-step cost), without reloading the model or re-exporting graphs;
        every check runs before any weight changes (engine/lora.LoraSwitch)."""
        from engine.lora import LoraSwitch

        if self.loras is None:
            if not loras:
                return
            self.loras = LoraSwitch(self.backend)
        self.loras.set(loras)

    @property
    def num_controlnets(self) -> int:
        return len(self.controlnet_specs)

    # ---- preparing inputs (no model work) -------------------------------------------------------

    def _control_maps(self, image, preprocess, init, mask, seed) -> list:
        """Each ControlNet's control map. An inpaint-type net builds its map from its image (default: the
        init image) and the mask; every other net needs its own image."""
        images = [None] * self.num_controlnets if image is None else (image if isinstance(image, (list, tuple)) else [image])
        if len(images) != self.num_controlnets:
            raise ValueError(
                f"got {len(images)} control images for {self.num_controlnets} ControlNets: give one per ControlNet"
            )
        preprocessors = _as_list(preprocess, self.num_controlnets, "preprocess")
        maps = []
        for img, spec, choice in zip(images, self.controlnet_specs, preprocessors):
            fn = pre.pick_preprocessor(choice, spec.preprocessor, self.annotators)
            if getattr(fn, "needs_mask", False) or fn is pre.inpaint:
                source = img if img is not None else init
                if source is None or mask is None:
                    raise ValueError(f"ControlNet {spec.name!r} uses the inpaint preprocessor, which builds its control "
                                     "map from the init image and the mask: give init_image and mask_image")
                maps.append(pre.inpaint(source, mask))  # every inpaint module's map at the image's size
                continue
            if img is None:
                raise ValueError(f"no control image for ControlNet {spec.name!r}: give one image per ControlNet "
                                 "(only inpaint ControlNets build theirs from init_image and mask_image)")
            loaded = pre.load_image(img)
            maps.append(pre.load_image(pre.control_map(fn, loaded, seed)) if fn is not None else loaded)
        return maps

    def _image_inputs(self, init_image, mask_image, strength, steps: int):
        """(mode, init image, mask, strength) checked, before any model work."""
        if mask_image is not None and init_image is None:
            raise ValueError("mask_image needs an init_image: inpainting repaints the masked part of the init image")
        init = None if init_image is None else pre.load_image(init_image, "init image")
        mask = None if mask_image is None else pre.load_mask(mask_image)
        if mask is not None and pre.image_size(mask) != pre.image_size(init):
            (mw, mh), (iw, ih) = pre.image_size(mask), pre.image_size(init)
            raise ValueError(f"mask_image is {mw}x{mh} but init_image is {iw}x{ih}: give a mask of the init image's size")
        mode = "txt2img" if init is None else ("img2img" if mask is None else "inpaint")
        if self.parts.unet_channels != self.latent_channels and mode != "inpaint":
            raise ValueError(f"model {self.model!r} has a {self.parts.unet_channels}-channel inpainting UNet: it needs "
                             "init_image and mask_image (inpainting); for txt2img or img2img use a 4-channel model")
        if mode != "txt2img" and not self.parts.can_encode_images:
            raise ValueError(f"{mode} needs a VAE encoder, and this engine dir was built without one: rebuild it with "
                             "python -m engine.build (which now exports vae_encoder)")
        return mode, init, mask, modes.check_strength(strength, mode, steps)

    @cached_property
    def _control_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        # The processor diffusers' ControlNet pipeline uses, so sizing and resizing match it exactly.
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False)

    @cached_property
    def _image_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @cached_property
    def _mask_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        # diffusers' inpaint pipelines' mask processor: grayscale, resized, binarised at 0.5.
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    def _control_tensor(self, control_map, height: int, width: int) -> torch.Tensor:
        return self._control_processor.preprocess(control_map, height=height, width=width).to(torch.float32)

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    # ---- the generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str],
        image=None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        controlnet_conditioning_scale: float | list[float] | None = None,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        scheduler: str = "unipc",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        preprocess=None,
        eta: float = 0.0,
        callback: Callable[[int, int], None] | None = None,
        init_image=None,
        mask_image=None,
        strength: float | None = None,
        control_mode: str | list[str] | None = None,
    ) -> GenerationResult:
        """Generate images like diffusers' ControlNet pipelines with the same arguments: text to image
        (`StableDiffusionControlNetPipeline`), img2img with `init_image`
        (`StableDiffusionControlNetImg2ImgPipeline`, whose `image` is our `init_image` and whose
        `control_image` is our `image`), inpainting with `init_image` and `mask_image`
        (`StableDiffusionControlNetInpaintPipeline`).

        `image`: the raw picture (one per ControlNet: PIL, numpy HWC uint8/float, or a file path); an
        inpaint ControlNet's may be None (or `image` left unset): its map is built from the init image and
        the mask. `preprocess`: None applies each ControlNet type's preprocessor (canny: cv2.Canny
        100/200; inpaint: masked pixels -1), False takes `image` as a ready control map, or a preprocessor
        name / callable (one, or one per net). `init_image`: loaded like control images. `mask_image`:
        white repaints, black keeps (binarised at 0.5 as diffusers does); it must have the init image's
        size. `controlnet_conditioning_scale` None is the pipeline's default: 1.0 for text to image, 0.8
        for img2img, 0.5 for inpainting, as diffusers' three pipelines default.
        `strength` in (0, 1]: None is diffusers' default (img2img 0.8, inpaint 1.0); only the last
        int(steps * strength) steps run. Sizes default to the init image's (else the first control
        map's), rounded down to multiples of 8; control maps are resized to the generation size.
        `latents` is for text to image only (img2img starts from the init image).
        `callback(step, total)` is called after each denoising step (progress bars).
        `control_mode` (one, or one per net): the A1111 ControlNet extension's modes. "balanced": every block
        at the net's scale; "prompt" (My prompt is more important): block i of 13 at scale * 0.825**(12-i);
        "controlnet" (ControlNet is more important): those scales, and the nets see the conditional half
        only (their residuals are zero for the unconditional one), as guess mode. None (default): guess_mode
        decides, as in diffusers. "controlnet" must be on all nets or none.
        `seed=s` gives the same image as diffusers with `generator=torch.Generator("cpu").manual_seed(s)`.
        """
        n = self.num_controlnets
        # Every check runs before any model work, so a bad call leaves nothing behind.
        prompts = _check_prompts(prompt)
        negatives = [""] * len(prompts) if negative_prompt is None else _check_prompts(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
        steps = _check_int(num_inference_steps, "num_inference_steps", 1)
        per_prompt = _check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        guidance = _check_number(guidance_scale, "guidance_scale", 0.0)
        starts = [_check_number(s, "control_guidance_start", 0.0) for s in
                  _as_list(control_guidance_start, n, "control_guidance_start")]
        ends = [_check_number(e, "control_guidance_end", 0.0) for e in
                _as_list(control_guidance_end, n, "control_guidance_end")]
        for s, e in zip(starts, ends):
            if not (0.0 <= s < e <= 1.0):
                raise ValueError(f"control guidance window must satisfy 0 <= start < end <= 1, got start={s}, end={e}")
        for value, what in ((height, "height"), (width, "width")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
                raise ValueError(f"{what} must be a positive multiple of 8, got {value!r}")
        check_scheduler_name(scheduler)
        net_modes = _check_control_modes(control_mode, n, guess_mode)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        mode, init, mask, strength = self._image_inputs(init_image, mask_image, strength, steps)
        if controlnet_conditioning_scale is None:  # each diffusers pipeline's own default
            controlnet_conditioning_scale = modes.DEFAULT_CONDITIONING_SCALE[mode]
        scales = [_check_number(s, "controlnet_conditioning_scale") for s in
                  _as_list(controlnet_conditioning_scale, n, "controlnet_conditioning_scale")]
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

        timer = _StageTimer(self.device)
        call_start = time.perf_counter()
        with timer("preprocess"):
            control_maps = self._control_maps(image, preprocess, init, mask, seed)
        if height is None or width is None:
            sized, what = (init, "init image") if init is not None else (control_maps[0], "control image")
            default_h, default_w = self._control_processor.get_default_height_width(
                sized if not isinstance(sized, np.ndarray) else sized[None]
            )
            height, width = height or default_h, width or default_w
            if height < 8 or width < 8:
                raise ValueError(f"{what} is too small: {width}x{height} after rounding down to multiples of 8")
        batch = len(prompts) * per_prompt
        check_request(self.backend, batch, height, width)
        latent_shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != latent_shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {latent_shape}, got {got}")

        sched = make_scheduler(scheduler, self.scheduler_config)
        do_cfg = guidance > 1.0
        guess = (guess_mode if net_modes is None else net_modes[0] == "controlnet") or self.global_pool
        backend = self.backend

        # Text: [uncond; cond] in one batch, each prompt repeated per image as diffusers does.
        with timer("text_encoder"):
            ids = self._tokenize(negatives + prompts if do_cfg else prompts)
            embeddings = backend.encode_text(ids).repeat_interleave(per_prompt, dim=0)
            cond_embeddings = embeddings[batch:] if do_cfg else embeddings

        # Which ControlNet runs at which kept step: diffusers' keep rule, plus "scale 0 never runs".
        sched.set_timesteps(steps, device=self.device)
        timesteps = modes.kept_timesteps(sched, steps, strength)
        total = len(timesteps)
        active = [
            [scales[k] != 0.0 and not (i / total < starts[k] or (i + 1) / total > ends[k]) for k in range(n)]
            for i in range(total)
        ]
        # The hint is encoded at the ControlNet's batch size, as diffusers does: convolutions pick their
        # algorithm by batch size, and a batch-1 hint differs from it by ~1e-7, which 20 steps amplify.
        control_batch = batch * (2 if do_cfg and not guess else 1)
        hints = [None] * n
        with timer("hint_encoder"):
            for k in range(n):
                if any(step[k] for step in active):
                    control = self._control_tensor(control_maps[k], height, width)
                    hints[k] = backend.encode_hint(k, control.expand(control_batch, -1, -1, -1))
        if net_modes is None:
            net_scales = [block_scales(s, self.num_residuals, guess) for s in scales]
        else:  # the extension's scales follow the mode only, also for global-pool nets (shuffle)
            net_scales = [block_scales(s, self.num_residuals, False) if net_mode == "balanced"
                          else soft_block_scales(s, self.num_residuals) for s, net_mode in zip(scales, net_modes)]

        inpainting = None
        if latents is not None:
            latents = latents.to(device=self.device, dtype=torch.float32) * sched.init_noise_sigma
        else:
            init_pixels = mask_pixels = None
            if init is not None:
                init_pixels = self._image_processor.preprocess(init, height=height, width=width).to(torch.float32)
            if mask is not None:
                mask_pixels = self._mask_processor.preprocess(mask, height=height, width=width)
            with timer("vae_encoder"):
                latents, inpainting = modes.start_latents(
                    backend, sched, generator, latent_shape, timesteps, strength, init_pixels, mask_pixels,
                    self.parts.unet_channels, self.parts.scaling_factor, self.device)
        extra = step_kwargs(sched, generator, eta)

        for i, t in enumerate(timesteps):
            model_input = sched.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
            if guess and do_cfg:  # guess mode: the ControlNets see the conditional half only
                control_input, control_embeddings = sched.scale_model_input(latents, t), cond_embeddings
            else:
                control_input, control_embeddings = model_input, embeddings
            with timer("controlnet"):
                outputs = [
                    backend.controlnet(k, control_input, t, control_embeddings, hints[k], net_scales[k])
                    for k in range(n)
                    if active[i][k]
                ]
                residuals = backend.combine(outputs, model_input.shape[0]) if outputs else None
            unet_input = model_input if inpainting is None else inpainting.unet_input(model_input)
            with timer("unet"):
                eps = backend.unet(unet_input, t, embeddings, residuals)
            with timer("scheduler"):
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
                if inpainting is not None:
                    latents = inpainting.blend(sched, latents, timesteps, i)
            if callback is not None:
                callback(i + 1, total)

        if output_type == "latent":
            images = latents
        else:
            with timer("vae"):
                decoded = backend.decode(latents)
            images = self._image_processor.postprocess(
                decoded.cpu(), output_type=output_type, do_denormalize=[True] * decoded.shape[0]
            )
        timer.ms["total"] = (time.perf_counter() - call_start) * 1e3
        parameters = dict(
            prompt=prompts if len(prompts) > 1 else prompts[0],
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            controlnet_conditioning_scale=scales if n > 1 else scales[0],
            guess_mode=guess,
            control_guidance_start=starts if n > 1 else starts[0],
            control_guidance_end=ends if n > 1 else ends[0],
            scheduler=scheduler,
            seed=seed,
            num_images_per_prompt=per_prompt,
            strength=strength,  # None for text to image
            mask=mask is not None,
            model=self.model,
            controlnet=[spec.name for spec in self.controlnet_specs],
            loras=self.loras.describe() if self.loras is not None else [],
        )
        if net_modes is not None:
            parameters["control_mode"] = net_modes if n > 1 else net_modes[0]
        return GenerationResult(images, timer.ms, seed, control_maps, parameters)

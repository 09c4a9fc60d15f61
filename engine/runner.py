"""`Runner`: SD1.5 + ControlNet text-to-image, equal in output to diffusers' ControlNet pipeline.

    runner = Runner(model="tiny", controlnet="canny")
    result = runner.generate("a photo of an astronaut", image="photo.png", seed=0)
    result.images[0].save("out.png"); print(result.timings)

The loop below is the one in shared/ARCHITECTURE.md and is the same for every backend. Where diffusers
wastes work, this does not: the hint encoder runs once per generation (not once per step), and a
ControlNet outside its [start, end] window or at scale 0 is not run at all (diffusers runs it and
multiplies by zero). Both leave the output unchanged; tests/test_parity.py holds that to 1e-5.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import torch

from engine import preprocess as pre
from engine.backends import check_backend_name
from engine.loading import DEFAULT_MODEL, load_controlnet, load_sd
from engine.modules import block_scales
from engine.optimizations import TorchOptimizations, cpu_has_native_bf16, resolve_optimizations
from engine.registry import resolve
from engine.schedulers import check_scheduler_name, make_scheduler, step_kwargs

OUTPUT_TYPES = ("pil", "np", "latent")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STAGES = ("text_encoder", "hint_encoder", "controlnet", "unet", "scheduler", "vae", "total")


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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Runner:
    """SD1.5 + one or more ControlNets behind one backend. Load once, call `generate` many times."""

    def __init__(
        self,
        model: str | None = None,
        controlnet: str | Sequence[str] | None = None,
        backend: str = "auto",
        engine_dir: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        optimizations: str | TorchOptimizations | None = None,
    ):
        """`model` defaults to SD1.5 and `controlnet` to "canny"; with `engine_dir` they default to what the
        dir was built for, and if given must match it (a subset of its ControlNets is fine). `backend`:
        "auto" is torch without `engine_dir`, else what the dir was built for; "onnxruntime",
        "openvino" and "tensorrt" need an `engine_dir` from `python -m engine.build` (openvino also takes
        dtype="bf16" on CPUs with native bf16). `optimizations`: the torch
        backend's switches, a preset name ("reference", "fused") or a TorchOptimizations."""
        check_backend_name(backend)
        torch_optimizations = resolve_optimizations(optimizations)
        names = None if controlnet is None else ([controlnet] if isinstance(controlnet, str) else list(controlnet))
        if names is not None and not names:
            raise ValueError("controlnet must name at least one ControlNet")
        if engine_dir is not None:
            if optimizations is not None:
                raise ValueError(f"optimizations={optimizations!r} are switches of the torch backend; an engine dir "
                                 "runs its built graphs: leave optimizations unset with engine_dir")
            # Built graphs: load the manifest-checked backend plus the tokenizer and scheduler config the
            # build copied into the dir; no torch weights are loaded.
            from engine.backends import open_engine_dir

            asked = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
            built = open_engine_dir(engine_dir, model, names, backend, dtype=asked)
            config = built.manifest.config
            if device is not None and torch.device(device).type != built.backend.device.type:
                raise ValueError(f"device {str(device)!r}: this engine dir's {built.backend.name} backend runs on "
                                 f"{built.backend.device}; leave device unset")
            self.device = built.backend.device
            self.dtype = torch.float16 if built.manifest.precision == "fp16" else torch.float32
            self.dtype = getattr(built.backend, "dtype", self.dtype)  # openvino: the precision it runs
            if asked is not None and asked != self.dtype:
                raise ValueError(f"dtype {dtype!r}: this engine dir was built in {built.manifest.precision}; "
                                 "leave dtype unset, or build another dir with --precision")
            self.controlnet_specs = built.controlnet_specs
            self.model = built.manifest.model["source"]
            self.tokenizer = built.tokenizer
            self.scheduler_config = built.scheduler_config
            self.vae_scale_factor = int(config["vae_scale_factor"])
            self.latent_channels = int(config["latent_channels"])
            self.global_pool = built.global_pools[0]
            self.backend = built.backend
            self.num_residuals = int(config["num_residuals"])
            return
        if backend in ("onnxruntime", "tensorrt", "openvino"):
            raise ValueError(f"backend {backend!r} runs built graphs: pass engine_dir=DIR from "
                             "python -m engine.build, or use backend='torch'")
        model = DEFAULT_MODEL if model is None else model
        names = ["canny"] if names is None else names
        self.device = torch.device(device) if device is not None else _default_device()
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype, dtype)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16 ('fp32', 'fp16', 'bf16'), got {dtype!r}")
        if dtype == torch.bfloat16 and self.device.type == "cpu" and cpu_has_native_bf16() is False:
            warnings.warn("dtype bf16 on a CPU without AVX512-BF16 or AMX is emulated, ~30x slower than fp32; "
                          "use dtype='fp32' here", stacklevel=2)
        self.dtype = dtype
        self.controlnet_specs = [resolve(name) for name in names]

        from engine.backends.torch_backend import TorchBackend

        sd = load_sd(model, self.device, self.dtype)
        nets = [load_controlnet(spec, sd, self.device, self.dtype) for spec in self.controlnet_specs]
        self.model = sd.source
        self.tokenizer = sd.tokenizer
        self.scheduler_config = sd.scheduler_config
        self.vae_scale_factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
        self.latent_channels = sd.unet.config.in_channels
        self.global_pool = bool(nets[0].config.global_pool_conditions)
        self.backend = TorchBackend(sd, nets, self.device, self.dtype, torch_optimizations)
        self.num_residuals = self.backend.controlnet_bodies[0].num_residuals

    @property
    def num_controlnets(self) -> int:
        return len(self.controlnet_specs)

    # ---- preparing inputs (no model work) -------------------------------------------------------

    def _control_maps(self, image, preprocess) -> list:
        images = image if isinstance(image, (list, tuple)) else [image]
        if len(images) != self.num_controlnets:
            raise ValueError(
                f"got {len(images)} control images for {self.num_controlnets} ControlNets: give one per ControlNet"
            )
        preprocessors = _as_list(preprocess, self.num_controlnets, "preprocess")
        maps = []
        for img, spec, choice in zip(images, self.controlnet_specs, preprocessors):
            fn = pre.pick_preprocessor(choice, spec.preprocessor)
            loaded = pre.load_image(img)
            maps.append(pre.load_image(fn(loaded)) if fn is not None else loaded)
        return maps

    @cached_property
    def _control_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        # The processor diffusers' ControlNet pipeline uses, so sizing and resizing match it exactly.
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False)

    @cached_property
    def _image_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

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
        image,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        controlnet_conditioning_scale: float | list[float] = 1.0,
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
    ) -> GenerationResult:
        """Generate images like `StableDiffusionControlNetPipeline.__call__` with the same arguments.

        `image`: the raw picture (one per ControlNet: PIL, numpy HWC uint8/float, or a file path).
        `preprocess`: None applies each ControlNet type's preprocessor (canny: cv2.Canny 100/200), False
        takes `image` as a ready control map, or a preprocessor name / callable (one, or one per net).
        `callback(step, total)` is called after each denoising step (progress bars).
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
        scales = [_check_number(s, "controlnet_conditioning_scale") for s in
                  _as_list(controlnet_conditioning_scale, n, "controlnet_conditioning_scale")]
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
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
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
        control_maps = self._control_maps(image, preprocess)
        if height is None or width is None:
            default_h, default_w = self._control_processor.get_default_height_width(
                control_maps[0] if not isinstance(control_maps[0], np.ndarray) else control_maps[0][None]
            )
            height, width = height or default_h, width or default_w
            if height < 8 or width < 8:
                raise ValueError(f"control image is too small: {width}x{height} after rounding down to multiples of 8")
        batch = len(prompts) * per_prompt
        latent_shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != latent_shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {latent_shape}, got {got}")

        sched = make_scheduler(scheduler, self.scheduler_config)
        do_cfg = guidance > 1.0
        guess = guess_mode or self.global_pool
        backend = self.backend

        # Text: [uncond; cond] in one batch, each prompt repeated per image as diffusers does.
        with timer("text_encoder"):
            ids = self._tokenize(negatives + prompts if do_cfg else prompts)
            embeddings = backend.encode_text(ids).repeat_interleave(per_prompt, dim=0)
            cond_embeddings = embeddings[batch:] if do_cfg else embeddings

        # Which ControlNet runs at which step: diffusers' keep rule, plus "scale 0 never runs".
        sched.set_timesteps(steps, device=self.device)
        timesteps = sched.timesteps
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
        net_scales = [block_scales(s, self.num_residuals, guess) for s in scales]

        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(latent_shape, generator=generator, device=self.device, dtype=torch.float32)
        latents = latents.to(device=self.device, dtype=torch.float32) * sched.init_noise_sigma
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
            with timer("unet"):
                eps = backend.unet(model_input, t, embeddings, residuals)
            with timer("scheduler"):
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
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
            model=self.model,
            controlnet=[spec.name for spec in self.controlnet_specs],
        )
        return GenerationResult(images, timer.ms, seed, control_maps, parameters)

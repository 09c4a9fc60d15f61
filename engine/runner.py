"""`Runner`: SD1.5 + ControlNet text-to-image, img2img and inpainting, equal in output to diffusers'
ControlNet pipelines (StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline).

    runner = Runner(model="tiny", controlnet="canny")
    result = runner.generate("a photo of an astronaut", image="photo.png", seed=0)
    result = runner.generate("a painting", image="photo.png", init_image="photo.png", strength=0.6, seed=0)
    result.images[0].save("out.png"); print(result.timings)

`generate` checks and resolves its arguments into a `Plan` first (engine/request.py: every check, every
default, before any model work); `run` is the loop, which reads only the plan. It is the one in
shared/ARCHITECTURE.md and is the same for every backend and model family (engine/families.py says what
differs between families: the prompts' conditioning). Where diffusers wastes work, this does not: the hint
encoder runs once per generation (not once per step), and a ControlNet outside its [start, end] window or
at scale 0 is not run at all (diffusers runs it and multiplies by zero). Both leave the output unchanged; tests/test_parity.py holds that to 1e-5. The modes
differ only in their kept timesteps, start latents and mask blend (engine/modes.py); at strength s only
the kept steps run (diffusers' get_timesteps), and tests/test_img2img.py holds them to diffusers too.
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from engine import modes
from engine.backends import check_backend_name, check_finite
from engine.controls import step_hint
from engine.families import cond_half
from engine.optimizations import TorchOptimizations, resolve_optimizations
from engine.parts import load_engine_dir, load_torch
from engine.preprocess import Annotators
from engine.request import GenerateArgs, ImageProcessors, Plan, prepare
from engine.schedulers import make_scheduler, step_kwargs

STAGES = ("preprocess", "text_encoder", "hint_encoder", "vae_encoder", "controlnet", "unet", "scheduler", "vae", "total")


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
        vae: str | None = None,
        annotators: dict | None = None,
    ):
        """`model` defaults to SD1.5 and `controlnet` to "canny"; with `engine_dir` they default to what the
        dir was built for, and if given must match it (a subset of its ControlNets is fine). `backend`:
        "auto" is torch without `engine_dir`, else what the dir was built for; "onnxruntime" and "openvino"
        without `engine_dir` build one on first use into the engine cache and reuse it on the next start
        (engine/engine_cache.py; ENGINE_CACHE moves it); "tensorrt" needs an `engine_dir` from
        `python -m engine.build` (openvino also takes dtype="bf16" on CPUs with native bf16). `optimizations`: the torch
        backend's switches, a preset name ("reference", "fused") or a TorchOptimizations. `loras`: [(source,
        weight), ...] merged into the UNet and text encoder (engine/lora.py); `set_loras` switches them.
        `vae`: a VAE beside the model's own, which then decodes and encodes by default (engine/vaes.py): an
        AutoencoderTiny (TAESD: "madebyollin/taesd" or a folder) or an AutoencoderKL id or folder; with
        `engine_dir`, one built into it (python -m engine.build --vae).
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
            parts = load_engine_dir(engine_dir, model, names, backend, device, dtype, vae)
        elif backend == "tensorrt":
            raise ValueError(f"backend {backend!r} runs built plans: pass engine_dir=DIR from "
                             "python -m engine.build on the GPU, or use backend='torch'")
        elif backend in ("onnxruntime", "openvino"):  # built on first use into the engine cache, then reused
            if optimizations is not None:
                raise ValueError(f"optimizations={optimizations!r} are switches of the torch backend; backend "
                                 f"{backend!r} runs built graphs: leave optimizations unset")
            from engine.engine_cache import engine_dir_for

            built = engine_dir_for(model, names, [vae] if vae is not None else [], backend)
            parts = load_engine_dir(built, model, names, backend, device, dtype, vae)
        else:
            parts = load_torch(model, names, device, dtype, torch_optimizations, vae)
        self.parts = parts
        # The attributes callers read (generate.py, serve/, benchmarks), set once for both kinds of load.
        self.backend, self.device, self.dtype = parts.backend, parts.device, parts.dtype
        self.model, self.controlnet_specs = parts.model, parts.controlnet_specs
        self.family, self.tokenizer, self.scheduler_config = parts.family, parts.tokenizer, parts.scheduler_config
        self.vae_scale_factor, self.latent_channels = parts.vae_scale_factor, parts.latent_channels
        self.global_pool, self.num_residuals = parts.global_pool, parts.num_residuals
        self.annotators = Annotators(annotators, self.device)
        self.set_loras(loras or [])

    def set_loras(self, loras: Sequence[tuple[str, float]]) -> bool:
        """Replace the whole LoRA set: [(source, weight), ...]; [] removes every LoRA (the base model exactly).
        Merged once into the weights (no per-step cost), without reloading the model or re-exporting graphs;
        every check runs before any weight changes, and a switch that fails part way is undone
        (engine/lora.LoraSwitch). The set already merged, its files unchanged on disk, is left as it is.
        Returns whether the weights changed."""
        from engine.lora import LoraSwitch

        if self.loras is None:
            if not loras:
                return False
            self.loras = LoraSwitch(self.backend, self.family.name,
                                    SimpleNamespace(layers_per_block=self.parts.layers_per_block))
        if self.loras.is_current(loras):
            return False
        self.loras.set(loras)
        return True

    @property
    def num_controlnets(self) -> int:
        return len(self.controlnet_specs)

    @property
    def vaes(self) -> dict:
        """The loaded VAEs by name (engine.vaes.VaeInfo): "model" and the one given as Runner(vae=...)."""
        return self.parts.vaes

    def preview(self, latents: torch.Tensor):
        """The first image of a step's latents (GenerateArgs.latents_callback) as a PIL image, decoded with a
        loaded TAESD (cheap next to a step); None when this Runner has none (the full decoder costs more
        than a step at 512²)."""
        tiny = next((v for v in self.parts.vaes.values() if v.tiny), None)
        if tiny is None:
            return None
        decoded = self.backend.decode(latents[:1], tiny.name)
        return self.processors.image.postprocess(decoded.cpu(), output_type="pil", do_denormalize=[True])[0]

    @cached_property
    def processors(self) -> ImageProcessors:
        return ImageProcessors(self.vae_scale_factor)

    # ---- the generation ---------------------------------------------------------------------------

    def generate(self, prompt: str | list[str], image=None, **options) -> GenerationResult:
        """Generate images like diffusers' ControlNet pipelines with the same arguments (text to image, img2img
        with `init_image`, inpainting with `init_image` and `mask_image`): engine/request.py's GenerateArgs
        lists them with their defaults and meanings. `seed=s` gives the same image as diffusers with
        `generator=torch.Generator("cpu").manual_seed(s)`. Every check runs before any model work."""
        start = time.perf_counter()
        return self.run(self.prepare(prompt, image, **options), start)

    def prepare(self, prompt: str | list[str], image=None, **options) -> Plan:
        """`generate`'s arguments checked and resolved into the plan `run` reads: no diffusion model runs (the
        control maps' preprocessors do, annotator models included; their time is the "preprocess" stage)."""
        return prepare(GenerateArgs.from_options(prompt, image, options), self)

    def run(self, plan: Plan, start: float | None = None) -> GenerationResult:
        """The loop of shared/ARCHITECTURE.md over a prepared plan. `start`: when the call began (perf_counter),
        for the "total" timing; default now."""
        start = time.perf_counter() if start is None else start
        n, backend = self.num_controlnets, self.backend
        timer = _StageTimer(self.device)
        timer.ms["preprocess"] = plan.preprocess_ms  # measured in prepare(), where the control maps are made
        sched = make_scheduler(plan.scheduler, self.scheduler_config)

        with timer("text_encoder"):
            cond = self.family.encode(backend, plan)
        for name, tensor in cond.items():
            check_finite(tensor, f"text conditioning ({name})", backend, self.dtype)
        control_cond = cond_half(cond, plan.batch) if plan.guess and plan.do_cfg else cond
        controls = plan.controls
        net_conds = [{**control_cond, **own} for own in controls.net_cond]  # a union net's types are its own input

        sched.set_timesteps(plan.steps, device=self.device)
        timesteps = modes.kept_timesteps(sched, plan.steps, plan.strength)
        total = len(timesteps)
        active = controls.active(total)
        # The hint is encoded at the ControlNet's batch size, as diffusers does: convolutions pick their
        # algorithm by batch size, and a batch-1 hint differs from it by ~1e-7, which 20 steps amplify.
        hints = [None] * len(controls.conditions)
        with timer("hint_encoder"):
            for j in controls.encoded(active):
                c = controls.conditions[j]
                hints[j] = backend.encode_hint(c.net, c.control.expand(plan.control_batch, -1, -1, -1), c.hint_inputs)
        of_net = [[j for j, c in enumerate(controls.conditions) if c.net == k] for k in range(n)]

        inpainting = None
        if plan.latents is not None:
            latents = plan.latents.to(device=self.device, dtype=torch.float32) * sched.init_noise_sigma
        else:
            with timer("vae_encoder"):
                latents, inpainting = modes.start_latents(
                    backend, sched, plan.generator, plan.latent_shape, timesteps, plan.strength, plan.init_pixels,
                    plan.mask_pixels, self.parts.unet_channels, plan.vae, self.device)
        extra = step_kwargs(sched, plan.generator, plan.eta)

        for i, t in enumerate(timesteps):
            model_input = sched.scale_model_input(torch.cat([latents] * 2) if plan.do_cfg else latents, t)
            # guess mode: the ControlNets see the conditional half only
            control_input = sched.scale_model_input(latents, t) if plan.guess and plan.do_cfg else model_input
            with timer("controlnet"):
                outputs = [
                    backend.controlnet(k, control_input, t, net_conds[k], step_hint(hints, on, of_net[k]),
                                       controls.net_scales[k])
                    for k, on in enumerate(active[i])
                    if on is not None
                ]
                residuals = backend.combine(outputs, model_input.shape[0]) if outputs else None
            unet_input = model_input if inpainting is None else inpainting.unet_input(model_input)
            with timer("unet"):
                eps = backend.unet(unet_input, t, cond, residuals)
            with timer("scheduler"):
                if plan.do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + plan.guidance * (eps_cond - eps_uncond)
                latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
                if inpainting is not None:
                    latents = inpainting.blend(sched, latents, timesteps, i)
            if plan.callback is not None:
                plan.callback(i + 1, total)
            if plan.latents_callback is not None:
                plan.latents_callback(i + 1, total, latents)

        check_finite(latents, "final latents", backend, self.dtype)
        if plan.output_type == "latent":
            images = latents
        else:
            with timer("vae"):
                decoded = backend.decode(latents, plan.vae.name)
            images = self.processors.image.postprocess(
                decoded.cpu(), output_type=plan.output_type, do_denormalize=[True] * decoded.shape[0]
            )
        timer.ms["total"] = (time.perf_counter() - start) * 1e3
        return GenerationResult(images, timer.ms, plan.seed, plan.control_maps, plan.parameters)

"""A1111 requests -> `Runner.generate` calls, and the results -> A1111's response: the mapping, no HTTP.

What each A1111 field does here (docs/SERVING.md has the same as a table):

- Mapped: prompt, negative_prompt, seed (-1 random; image i of the request gets seed + i, as A1111
  does), steps, cfg_scale, width, height, sampler_name/sampler_index + scheduler (SAMPLERS below),
  batch_size x n_iter (one `generate` call per image, each from its own seed, so every image can be
  rerun alone with its seed), eta (DDIM's eta; Euler a runs at eta 1 only), send_images,
  alwayson_scripts.controlnet units (engine/serve/a1111/control.py for the images), `<lora:NAME:W>`
  tags (when engine.lora exists), img2img's init_images, denoising_strength, mask and its options.
- Inert: fields A1111 itself does not read in the request as given (hires fields without enable_hr,
  subseed at subseed_strength 0, ...); INERT lists the values accepted, anything else is a 422.
- Everything else (hires fix, restore_faces, tiling, styles, scripts, refiner, ...) is refused with a
  422 naming the field whenever it is set to a value that would change the image.

ControlNet units map onto the server's loaded ControlNets (one slot each): a unit's `model` picks the
slot; slots no unit uses get scale 0, which the Runner skips entirely. control_mode maps onto
`Runner.generate(control_mode=...)`, which implements the extension's semantics.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field

import numpy as np

from engine.serve.a1111 import control
from engine.serve.api import ApiError, Limits

MAX_SEED = 2**32 - 1
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RUNNER_CONTROL_MODES = ("balanced", "prompt", "controlnet")  # Runner.generate(control_mode=...) per index

# A1111 sampler name -> (aliases, its default schedule, {A1111 schedule name: engine scheduler}).
# "automatic" is the sampler's own default, as in A1111 1.9+ (DPM++ 2M: Karras). DDIM and UniPC are
# timestep samplers there, without a schedule choice.
SAMPLERS = {
    "DPM++ 2M": (["k_dpmpp_2m"], "karras", {"uniform": "dpmpp_2m", "karras": "dpmpp_2m_karras"}),
    "Euler a": (["k_euler_a", "k_euler_ancestral"], "uniform", {"uniform": "euler_a"}),
    "Euler": (["k_euler"], "uniform", {"uniform": "euler"}),
    "DDIM": (["ddim"], "uniform", {"uniform": "ddim"}),
    "UniPC": (["unipc"], "uniform", {"uniform": "unipc"}),
    "LCM": (["k_lcm"], "uniform", {"uniform": "lcm"}),  # LCM-LoRA / LCM models: 2-8 steps, cfg_scale 1-2
}
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}  # name -> label
DEFAULT_SAMPLER = "Euler"  # A1111's API model default (sampler_index)


def _match(value: str, names) -> str | None:
    return next((n for n in names if n.lower() == value.strip().lower()), None)


def resolve_sampler(sampler_name: str | None, scheduler: str | None, sampler_index: str | None) -> tuple[str, str, str]:
    """(A1111 sampler, schedule name, engine scheduler) or ApiError. Legacy names ("DPM++ 2M Karras")
    carry the schedule as a suffix, as A1111 reads them."""
    given = sampler_name or sampler_index or DEFAULT_SAMPLER
    field_name = "sampler_name" if sampler_name else "sampler_index"
    name, suffix = _match(given, SAMPLERS), None
    if name is None:
        for label in SCHEDULES.values():
            if given.lower().endswith(" " + label.lower()):
                name, suffix = _match(given[: -len(label) - 1], SAMPLERS), label.lower()
                break
    if name is None:
        name = next((n for n, (aliases, _, _) in SAMPLERS.items() if _match(given, aliases)), None)
    if name is None:
        raise ApiError(422, field_name, f"{field_name} {given!r} is not available; this server has: {', '.join(SAMPLERS)}")
    aliases, default, engine = SAMPLERS[name]
    schedule = None
    if scheduler:
        schedule = next((k for k, label in SCHEDULES.items() if scheduler.strip().lower() in (k, label.lower())), None)
        if schedule is None:
            raise ApiError(422, "scheduler", f"scheduler {scheduler!r} is not available; this server has: "
                                             f"{', '.join(SCHEDULES.values())}")
    if suffix and schedule not in (None, "automatic", suffix):
        raise ApiError(422, "scheduler", f"sampler {given!r} names the {suffix} schedule but scheduler is {scheduler!r}")
    schedule = suffix or (default if schedule in (None, "automatic") else schedule)
    if schedule not in engine:
        raise ApiError(422, "scheduler", f"scheduler {SCHEDULES[schedule]} is not available for {name}; it has: "
                                         f"Automatic, {', '.join(SCHEDULES[s] for s in engine)}")
    return name, schedule, engine[schedule]


# field -> accepted values (A1111 does not read the field then, or the value changes nothing).
def _none_or(*values):
    return lambda v: v is None or v in values


INERT = {
    "styles": lambda v: not v,
    "subseed": lambda v: True,  # read only when subseed_strength != 0
    "subseed_strength": _none_or(0),
    "seed_resize_from_h": lambda v: v is None or v <= 0,
    "seed_resize_from_w": lambda v: v is None or v <= 0,
    "seed_enable_extras": lambda v: True,
    "restore_faces": _none_or(False),
    "tiling": _none_or(False),
    "do_not_save_samples": lambda v: True,  # this server never saves
    "do_not_save_grid": lambda v: True,
    "s_min_uncond": _none_or(0),
    "s_churn": _none_or(0),
    "s_tmax": lambda v: v is None or v == 0 or v == math.inf,  # A1111 reads 0 as infinity
    "s_tmin": _none_or(0),
    "s_noise": _none_or(1),
    "override_settings": lambda v: not v,
    "override_settings_restore_afterwards": lambda v: True,
    "refiner_checkpoint": lambda v: v in (None, "", "None"),
    "refiner_switch_at": lambda v: True,  # read only with a refiner_checkpoint
    "disable_extra_networks": _none_or(False),
    "firstpass_image": _none_or(""),
    "comments": lambda v: True,
    "script_name": lambda v: v in (None, "", "None"),
    "script_args": lambda v: True,  # read only with a script_name
    "save_images": _none_or(False),
    "force_task_id": lambda v: True,  # a progress-tracking id
    "infotext": _none_or(""),
    # txt2img: read only with enable_hr
    "enable_hr": _none_or(False),
    **{name: (lambda v: True) for name in (
        "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
        "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt")},
    # img2img
    "image_cfg_scale": lambda v: True,  # read by instruct-pix2pix models only
    "initial_noise_multiplier": _none_or(1),
    "latent_mask": _none_or(""),
    "include_init_images": lambda v: True,  # only what `parameters` echoes
    "mask_round": _none_or(True),
}
INERT_UNIT = {
    "low_vram": lambda v: True, "lowvram": lambda v: True, "hr_option": lambda v: True,
    "is_ui": _none_or(False), "input_mode": _none_or("simple", "InputMode.SIMPLE"), "batch_images": _none_or("", []),
    "output_dir": _none_or(""), "loopback": _none_or(False), "inpaint_crop_input_image": lambda v: True,
    "advanced_weighting": _none_or(), "effective_region_mask": _none_or(""), "pulid_mode": lambda v: True,
    "ipadapter_input": _none_or(), "batch_mask_dir": _none_or(""),
    "animatediff_batch": _none_or(False), "batch_modifiers": lambda v: not v, "batch_image_files": lambda v: not v,
    "batch_keyframe_idx": _none_or(),
}
MAPPED = {"prompt", "negative_prompt", "seed", "sampler_name", "scheduler", "sampler_index", "batch_size", "n_iter",
          "steps", "cfg_scale", "width", "height", "eta", "send_images", "alwayson_scripts", "init_images",
          "resize_mode", "denoising_strength", "mask", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill",
          "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert"}


# The Runner's argument names (and words its checks use) -> A1111's fields, for api.runner_error.
UNITS = "alwayson_scripts.controlnet.args"
RUNNER_WORDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "height": "height", "width": "width",
                "num_inference_steps": "steps", "guidance_scale": "cfg_scale", "strength": "denoising_strength",
                "init_image": "init_images", "mask_image": "mask", "scheduler": "sampler_name",
                "num_images_per_prompt": "batch_size", "controlnet_conditioning_scale": UNITS,
                "control guidance": UNITS, "control_guidance_start": UNITS, "control_guidance_end": UNITS,
                "control_mode": UNITS, "preprocessor": UNITS, "control image": UNITS, "ControlNet": UNITS}


def check_inert(values: dict) -> None:
    for name, value in values.items():
        if name in MAPPED:
            continue
        accepts = INERT.get(name)
        if accepts is None:
            raise AssertionError(f"A1111 field {name!r} has no rule")  # a model field without a rule: a bug here
        if not accepts(value):
            raise ApiError(422, name, f"{name}={value!r} is not supported by this server (it would change the image "
                                      "and the engine does not implement it); leave it unset")


# ---- ControlNet model names ------------------------------------------------------------------------

def short_hash(text: str, digits: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


def controlnet_titles(specs) -> list[str]:
    """A1111's list names: the weights' file stem and a short hash. The engine loads hub ids and folders,
    not one file, so the hash is of the source's name (stable per server), not of the file's bytes."""
    titles = []
    for spec in specs:
        stem = spec.source.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".safetensors")
        titles.append(f"{stem} [{short_hash(spec.source, 8)}]")
    return titles


def match_controlnet(model: str, specs, field: str) -> int:
    """The slot of the loaded ControlNet `model` names: its title, or its name with any other [hash] or none
    (a client may carry the hash of A1111's file, e.g. control_v11p_sd15_canny [d14c016b]), or the
    engine's registry name or source."""
    titles = controlnet_titles(specs)
    wanted = re.sub(r"\s*\[[0-9a-f]+\]$", "", model.strip().lower())
    for k, (spec, title) in enumerate(zip(specs, titles)):
        if wanted in {title.rsplit(" [", 1)[0].lower(), spec.name.lower(), spec.source.lower()}:
            return k
    raise ApiError(422, field, f"{field} {model!r} is not loaded; this server has: {', '.join(titles)}")


# ---- a request's plan --------------------------------------------------------------------------------

@dataclass
class Unit:
    script: str  # its key in alwayson_scripts, as sent ("ControlNet", "controlnet")
    index: int  # position in alwayson_scripts.<script>.args
    slot: int  # the loaded ControlNet it drives
    module: str
    model: str  # its title
    weight: float
    resize_mode: int
    processor_res: float | None
    threshold_a: float | None
    threshold_b: float | None
    guidance_start: float
    guidance_end: float
    control_mode: int
    pixel_perfect: bool
    save_detected_map: bool
    control_map: np.ndarray  # height x width x 3 uint8, ready for the Runner
    union_type: int | None = None  # a ControlNet-Union's condition type (diffusers' index)


@dataclass
class Plan:
    prompt: str  # without <lora:...> tags: what the text encoder reads
    negative_prompt: str | None
    seeds: list[int]
    sampler: str
    schedule: str
    runner_kwargs: dict  # everything but prompt, negative_prompt and seed
    units: list[Unit]
    prompt_as_sent: str = ""  # with its tags, as A1111 records it in infotexts and info
    loras: list = field(default_factory=list)  # [(path, weight)] for Runner.set_loras
    init: dict = field(default_factory=dict)  # img2img: init_image, mask_image, strength
    img2img: object = None  # img2img.InitImages: its pictures, and A1111's inpainting (settings, paste-back)


def unit_image(unit, where: str, fallback: np.ndarray | None, limits: Limits) -> np.ndarray:
    image, mask = unit.image, unit.mask if unit.mask is not None else unit.mask_image
    if unit.input_image is not None:
        if image not in (None, ""):
            raise ApiError(422, f"{where}.input_image", f"{where}: give image or its legacy name input_image, not both")
        image = unit.input_image
    if isinstance(image, list):
        if len(image) != 2:
            raise ApiError(422, f"{where}.image", f"{where}.image as a list must be [image, mask], got {len(image)} items")
        image, mask = image
    elif image is not None and not isinstance(image, str):
        image, mask = image.image, image.mask if image.mask is not None else mask
    if mask not in (None, ""):
        raise ApiError(422, f"{where}.mask", f"{where}.mask is not taken by units here (the inpaint modules' maps need "
                                                  "it): POST /generate builds them from mask_image")
    if image in (None, ""):
        if fallback is None:
            raise ApiError(422, f"{where}.image", f"{where}.image is required: the unit is enabled but has no picture")
        return fallback
    return control.decode_rgb(image, f"{where}.image", limits)


def shuffle_seed(req, seed: int) -> int:
    """The numpy seed the extension sets before preprocessing (shuffle): (seed + subseed) & 0xFFFFFFFF, an
    unset subseed (-1) taken as the seed."""
    subseed = seed if req.subseed in (None, -1) else max(int(req.subseed), 0)
    return (seed + subseed) & 0xFFFFFFFF


# The extension's union control types (ControlNetUnionControlType, in diffusers' index order) and the type a
# module implies, by its control-type tag (engine/preprocess's table), when the unit leaves union_control_type
# "Unknown".
UNION_CONTROL_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
UNION_TYPE_OF_TAG = {"OpenPose": 0, "Depth": 1, "SoftEdge": 2, "Scribble": 2, "Canny": 3, "Lineart": 3, "MLSD": 3,
                     "NormalMap": 4, "Segmentation": 5, "Tile": 6, "Inpaint": 7}


def _union_type(u, module, types: int | None, field: str) -> int | None:
    """A unit's ControlNet-Union type index: its union_control_type, else the one its module implies; None for a
    plain ControlNet (which refuses a type)."""
    given = None if u.union_control_type in (None, "", "Unknown") else u.union_control_type
    if types is None:
        if given is not None:
            raise ApiError(422, field, f"{field}={given!r} is for ControlNet-Union models; {u.model!r} is a plain "
                                       "ControlNet: leave it 'Unknown'")
        return None
    if given is not None:
        if given not in UNION_CONTROL_TYPES[:types]:
            raise ApiError(422, field, f"{field} must be one of {', '.join(UNION_CONTROL_TYPES[:types])} (or Unknown "
                                       f"with a module that implies one), got {given!r}")
        return UNION_CONTROL_TYPES.index(given)
    implied = next((UNION_TYPE_OF_TAG[tag] for tag in module.tags if tag in UNION_TYPE_OF_TAG), None)
    if implied is None or implied >= types:
        raise ApiError(422, field, f"{u.model!r} is a ControlNet-Union: module {module.key!r} implies no control type "
                                   f"it has; give {field} (one of {', '.join(UNION_CONTROL_TYPES[:types])})")
    return implied


def plan_units(scripts: dict, specs, height: int, width: int, fallback: np.ndarray | None, limits: Limits,
               annotators=None, seed: int | None = None, unions: list | None = None) -> list[Unit]:
    """`annotators`, `seed`: the Runner's annotators and the shuffle seed the units' modules run with; `unions`:
    per loaded ControlNet, a ControlNet-Union's number of types, None for a plain one."""
    unions = unions or [None] * len(specs)
    units, used = [], {}
    for key, script in scripts.items():
        if key.lower() != "controlnet":
            raise ApiError(422, f"alwayson_scripts.{key}", f"alwayson_scripts.{key}: only the controlnet script runs here")
        for i, u in enumerate(script.args):
            where = f"alwayson_scripts.{key}.args.{i}"
            for name, accepts in INERT_UNIT.items():
                if not accepts(getattr(u, name)):
                    raise ApiError(422, f"{where}.{name}", f"{where}.{name}={getattr(u, name)!r} is not supported by this server")
            if not u.enabled:
                continue
            if u.model in ("", "None", None):
                raise ApiError(422, f"{where}.model", f"{where}.model is required; this server has: "
                                                      f"{', '.join(controlnet_titles(specs))}")
            slot = match_controlnet(u.model, specs, f"{where}.model")
            if slot in used:
                raise ApiError(422, f"{where}.model", f"{where} and unit {used[slot]} both use {u.model!r}; each loaded "
                                                      "ControlNet runs once per generation here")
            used[slot] = i
            module = control.check_module(u.module, f"{where}.module")
            if module.needs_mask or module.sampler_step:
                what = "its map needs the unit's mask, which units here do not take" if module.needs_mask else \
                    f"the extension also changes the sampling for it ({module.sampler_step}), which is not implemented"
                raise ApiError(422, f"{where}.module", f"{where}.module {u.module!r} is not available in units: {what}; "
                                                       "POST /controlnet/detect gives its map")
            union_type = _union_type(u, module, unions[slot], f"{where}.union_control_type")
            end = u.guidance_end if u.guidance is None else u.guidance
            if not u.guidance_start < end:
                raise ApiError(422, f"{where}.guidance_end", f"{where}: guidance_start ({u.guidance_start}) must be less "
                                                             f"than guidance_end ({end})")
            mode = _control_mode(u.control_mode, f"{where}.control_mode")
            resize_mode = control.resize_mode_index(u.resize_mode, f"{where}.resize_mode")
            picture = unit_image(u, where, fallback, limits)
            resolution = control.slider_value(module.resolution, u.processor_res, f"{where}.processor_res")
            if u.pixel_perfect and module.resolution is not None:
                resolution = control.pixel_perfect_resolution(picture, height, width, resize_mode)
            thr_a = control.slider_value(module.threshold_a, u.threshold_a, f"{where}.threshold_a")
            thr_b = control.slider_value(module.threshold_b, u.threshold_b, f"{where}.threshold_b")
            detected = control.detect(module, picture, resolution, thr_a, thr_b, annotators, limits, f"{where}.image",
                                      f"{where}.module", seed)
            units.append(Unit(key, i, slot, module.name, controlnet_titles(specs)[slot], u.weight, resize_mode, resolution,
                              thr_a, thr_b, u.guidance_start, end, mode, u.pixel_perfect, u.save_detected_map,
                              control.fit(detected, resize_mode, height, width, limits, f"{where}.image"), union_type))
    odd = next((u for u in units if (u.control_mode == 2) != (units[0].control_mode == 2)), None)
    if odd is not None:
        raise ApiError(422, f"alwayson_scripts.{odd.script}.args.{odd.index}.control_mode",
                       "'ControlNet is more important' must be on every enabled unit or on none: the engine runs all "
                       "ControlNets on the conditional half of the batch, or all on both halves")
    return units


def _control_mode(value, field: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 3:
        return value
    if isinstance(value, str) and value in CONTROL_MODES:
        return CONTROL_MODES.index(value)
    raise ApiError(422, field, f"{field} must be one of {', '.join(CONTROL_MODES)} or 0/1/2, got {value!r}")


def control_kwargs(units: list[Unit], num_nets: int, height: int, width: int, unions: list | None = None) -> dict:
    """Runner.generate's per-ControlNet arguments: unused slots at scale 0 (never run) and a blank map (an unused
    ControlNet-Union's type: 0, never read)."""
    blank = np.zeros((height, width, 3), np.uint8)
    by_slot = {u.slot: u for u in units}
    cond_only = any(u.control_mode == 2 for u in units)
    idle_mode = "controlnet" if cond_only else "balanced"
    kwargs = dict(
        image=[by_slot[k].control_map if k in by_slot else blank for k in range(num_nets)],
        preprocess=False,
        controlnet_conditioning_scale=[by_slot[k].weight if k in by_slot else 0.0 for k in range(num_nets)],
        control_guidance_start=[by_slot[k].guidance_start if k in by_slot else 0.0 for k in range(num_nets)],
        control_guidance_end=[by_slot[k].guidance_end if k in by_slot else 1.0 for k in range(num_nets)],
        control_mode=[RUNNER_CONTROL_MODES[by_slot[k].control_mode] if k in by_slot else idle_mode
                      for k in range(num_nets)] if units else None,
    )
    if any(types is not None for types in unions or []):
        kwargs["control_type"] = [by_slot[k].union_type if k in by_slot else (0 if unions[k] is not None else None)
                                  for k in range(num_nets)]
    if num_nets == 1:
        kwargs = {k: (v[0] if isinstance(v, list) else v) for k, v in kwargs.items()}
    return kwargs


def with_model_size(req, runner):
    """The request with width/height it left out set to the model's own size (engine.families: SD1.5 512, as
    A1111's defaults, SDXL 1024)."""
    size = runner.family.default_size
    missing = {side: size for side in ("width", "height") if getattr(req, side) is None}
    return req.model_copy(update=missing) if missing else req


def check_size(req, limits: Limits) -> None:
    for side in ("width", "height"):
        v = getattr(req, side)
        if v > limits.max_side:
            raise ApiError(422, side, f"{side} must be a multiple of 8 in [64, {limits.max_side}] on this server, got {v}")
    if req.steps > limits.max_steps:
        raise ApiError(422, "steps", f"steps must be in [1, {limits.max_steps}] on this server, got {req.steps}")
    if req.batch_size * req.n_iter > limits.max_images:
        raise ApiError(422, "batch_size", f"batch_size x n_iter must be at most {limits.max_images} on this server, "
                                          f"got {req.batch_size} x {req.n_iter}")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > limits.max_prompt_chars:
            raise ApiError(422, name, f"{name} must be at most {limits.max_prompt_chars} characters")


class PromptTokenizer:
    """A copy of the Runner's tokenizer for the 75-token check, used from any thread (one at a time). Not the
    Runner's own: a Rust-backed tokenizer keeps truncation and padding as shared state, which each call sets,
    so a check (truncation off) beside the worker's tokenizing (truncation and padding on) could hand the text
    encoder an untruncated prompt."""

    def __init__(self, tokenizer):
        import copy
        import threading

        self.tokenizer = copy.deepcopy(tokenizer)
        self.model_max_length = self.tokenizer.model_max_length
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        with self._lock:
            return len(self.tokenizer(text, truncation=False).input_ids)


def check_prompt_length(text: str, tokenizer: PromptTokenizer, field: str) -> None:
    """The text encoder reads model_max_length tokens (77 with start and end); more would be cut off unseen."""
    count = tokenizer.count(text)
    if count > tokenizer.model_max_length:
        raise ApiError(422, field, f"{field} is {count - 2} tokens; this engine reads at most "
                                   f"{tokenizer.model_max_length - 2} (A1111 splits longer prompts into chunks of 75, "
                                   "which is not implemented)")


def plan_request(req, runner, limits: Limits, tokenizer: PromptTokenizer, lora_dir=None,
                 init_rgb: np.ndarray | None = None) -> Plan:
    """Every check, and the control maps, before any model work (on a thread: it decodes and preprocesses)."""
    req = with_model_size(req, runner)
    values = dict(req)
    check_inert(values)
    check_size(req, limits)
    sampler, schedule, scheduler = resolve_sampler(req.sampler_name, req.scheduler, req.sampler_index)
    eta = 0.0
    if scheduler == "ddim":
        eta = 0.0 if req.eta is None else float(req.eta)  # A1111: opts.eta_ddim (0) unless given
    elif scheduler == "euler_a" and req.eta not in (None, 1, 1.0):
        raise ApiError(422, "eta", f"eta={req.eta!r}: Euler a runs at eta 1 here; other values are not implemented")
    prompt, loras = req.prompt, []
    if "<lora:" in req.negative_prompt:
        raise ApiError(422, "negative_prompt", "negative_prompt: <lora:...> tags apply in prompt only")
    if "<lora:" in prompt:
        prompt, loras = _parse_loras(prompt, lora_dir, limits)
    if not prompt.strip():
        raise ApiError(422, "prompt", "prompt is required: this engine does not generate from an empty prompt")
    negative = req.negative_prompt if req.negative_prompt.strip() else None
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if text is not None:
            check_prompt_length(text, tokenizer, name)
    seed = random.randrange(MAX_SEED + 1) if req.seed == -1 else req.seed
    unions = runner.parts.unions
    units = plan_units(req.alwayson_scripts, runner.controlnet_specs, req.height, req.width, init_rgb, limits,
                       runner.annotators, shuffle_seed(req, seed), unions)
    count = req.batch_size * req.n_iter
    kwargs = dict(height=req.height, width=req.width, num_inference_steps=req.steps, guidance_scale=float(req.cfg_scale),
                  scheduler=scheduler, eta=eta, **control_kwargs(units, runner.num_controlnets, req.height, req.width, unions))
    return Plan(prompt=prompt, negative_prompt=negative,
                seeds=[(seed + i) % (MAX_SEED + 1) for i in range(count)], sampler=sampler, schedule=schedule,
                runner_kwargs=kwargs, units=units, prompt_as_sent=req.prompt, loras=loras)


def _parse_loras(prompt: str, lora_dir, limits: Limits):
    from engine.lora import parse_prompt_loras

    if lora_dir is None:
        raise ApiError(422, "prompt", "prompt has <lora:...> tags, but this server was started without a lora_dir")
    try:
        return parse_prompt_loras(prompt, lora_dir, max_loras=limits.max_loras)
    except (ValueError, FileNotFoundError) as err:
        raise ApiError(422, "prompt", f"prompt: {err}") from None

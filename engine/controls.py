"""The control side of a generation: each ControlNet's conditions, their scales and guidance windows, and
what runs at each step, checked and resolved before any model work (engine/request.py calls `resolve`).

A plain ControlNet has one condition: one control image, one scale, one [start, end] window; its scale
multiplies its residuals and outside its window it does not run. A ControlNet-Union (`ControlNetUnionModel`)
takes one or several conditions, each with a type (`control_type`: openpose, depth, canny, ...; diffusers'
`control_mode` indices), in one net, exactly as diffusers' ControlNetUnionModel computes them:

    one condition      as a plain net: hint = embedding(map) + alpha, residuals * scale, its window gates the net
    several conditions each condition's hint_i = embedding(map_i) * s_i + alpha_i * s_i, with s_i its scale
                       inside its window and 0 outside (diffusers' cond_scale * keep); the net runs at every
                       step on the sum of the hints (zeros when none is active), residuals unscaled

alpha_i is the task transformer's output for condition i; it attends across the batch only (diffusers' layout:
(batch, conditions, C) into an nn.MultiheadAttention that is not batch_first), so each condition's hint depends
on its own map, type and scale alone and is encoded once per generation (engine.modules.UnionHintEncoder), and
only the sum changes per step. The union net also adds the embedding of its condition types (`control_type`,
a 0/1 vector per image) to its time embedding: a conditioning input of that net (Plan.net_cond).

Several nets (plain or union, one condition each) combine as diffusers' MultiControlNetModel and
MultiControlNetUnionModel do. The per-condition arguments (`image`, `preprocess`,
`controlnet_conditioning_scale`, `control_guidance_start/end`) take one value or one per condition, in order
(with one condition per net: one per net); `control_type` and `control_mode` one per net.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import preprocess as pre
from engine.modules import block_scales
from engine.registry import union_type

# The A1111 ControlNet extension's control modes ("Balanced", "My prompt is more important", "ControlNet is
# more important"); see GenerateArgs.control_mode.
CONTROL_MODES = ("balanced", "prompt", "controlnet")
SOFT_INJECTION_BASE = 0.825  # the extension's per-block decay: block i of 13 is scaled by 0.825 ** (12 - i)


@dataclass
class Condition:
    """One control image of one ControlNet, resolved."""

    net: int  # the ControlNet it conditions
    control_map: object  # the map after preprocessing (PIL or array), returned with the result
    control: torch.Tensor  # the map as the hint encoder takes it, (1, C, H, W) in [0, 1]
    hint_inputs: dict  # union: the hint encoder's control_type_index (1,) int64 and condition_scale (1,)
    scale: float
    start: float
    end: float
    control_type: int | None = None  # union: diffusers' control_mode index


@dataclass
class Controls:
    """Every ControlNet's conditions and scales for one generation (fields of the Plan)."""

    conditions: list[Condition]
    net_scales: list[torch.Tensor]  # per net, one scale per residual
    net_cond: list[dict]  # per net, conditioning inputs of its own (union: "control_type", (batch, types))
    always: list[bool]  # per net: runs at every step (a union net with several conditions)

    def active(self, total: int) -> list[list[tuple | None]]:
        """Per kept step, per net: the indices of its conditions whose hints it sums this step, or None where it
        does not run (diffusers' keep rule, plus "scale 0 never runs" for nets that scale their residuals)."""
        steps = []
        for i in range(total):
            row = []
            for k, always in enumerate(self.always):
                on = tuple(j for j, c in enumerate(self.conditions) if c.net == k and c.scale != 0.0
                           and not (i / total < c.start or (i + 1) / total > c.end))
                row.append(on if on or always else None)
            steps.append(row)
        return steps

    def encoded(self, active: list[list[tuple | None]]) -> list[int]:
        """The conditions whose hints are needed: those some step uses, and every condition of an always-run net
        (its zero hint takes their shape)."""
        used = {j for row in active for on in row if on for j in on}
        used |= {j for j, c in enumerate(self.conditions) if self.always[c.net]}
        return sorted(used)


def step_hint(hints: list, on: tuple, net_conditions: list[int]):
    """The hint a net runs on this step: its one condition's, or the sum of its active conditions' (in order, as
    diffusers' fuser adds them), zeros when none is active."""
    if len(on) == 1:
        return hints[on[0]]
    if not on:
        return torch.zeros_like(hints[net_conditions[0]])
    total = hints[on[0]]
    for j in on[1:]:
        total = total + hints[j]
    return total


# ---- checks and resolution ----------------------------------------------------------------------------------


def as_list(value, count: int, what: str, noun: str = "ControlNets") -> list:
    """One value for all, or a list with one entry per item."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{what} has {len(value)} entries but there are {count} {noun}: give {count}")
        return list(value)
    return [value] * count


def check_number(value, what: str, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{what} must be >= {low}, got {value!r}")
    return float(value)


def _condition_types(specs, unions: list[int | None], control_type) -> list[list[int | None]]:
    """Per net, the union type of each of its conditions (plain nets: [None])."""
    n = len(specs)
    if control_type is None:
        per_net = [None] * n
    elif n == 1:
        per_net = [control_type]
    elif not isinstance(control_type, (list, tuple)) or len(control_type) != n:
        raise ValueError(f"control_type must be a list with one entry per ControlNet ({n}; None for plain "
                         f"ControlNets), got {control_type!r}")
    else:
        per_net = list(control_type)
    types = []
    for spec, types_count, given in zip(specs, unions, per_net):
        if types_count is None:
            if given is not None:
                raise ValueError(f"control_type={given!r} is for ControlNet-Union nets; ControlNet {spec.name!r} is "
                                 "a plain ControlNet: leave its control_type None")
            types.append([None])
            continue
        if given is None or (isinstance(given, (list, tuple)) and not given):
            raise ValueError(f"ControlNet {spec.name!r} is a ControlNet-Union: give control_type= the type of each of "
                             "its control images (openpose, depth, hed, scribble, canny, lineart, normal, segment, "
                             "tile, repaint, or diffusers' indices)")
        indices = []
        for value in (given if isinstance(given, (list, tuple)) else [given]):
            index, _ = union_type(value)
            if index >= types_count:
                raise ValueError(f"control_type {value!r} (index {index}) is not one of ControlNet {spec.name!r}'s "
                                 f"{types_count} types (0-{types_count - 1}; tile and repaint are ProMax's)")
            indices.append(index)
        types.append(indices)
    return types


def _check_control_modes(control_mode, count: int, guess_mode: bool) -> list[str] | None:
    if control_mode is None:
        return None
    checked = as_list(control_mode, count, "control_mode")
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


def soft_block_scales(scale: float, num_residuals: int) -> torch.Tensor:
    """The extension's "soft injection": the deepest block at full scale, each shallower one 0.825 times the next."""
    exponents = torch.arange(num_residuals - 1, -1, -1, dtype=torch.float64)
    return (scale * SOFT_INJECTION_BASE ** exponents).to(torch.float32)


def _control_maps(specs, owners: list[int], preprocessors: list, image, preprocess, init, mask, noun: str,
                  annotators=None, seed: int | None = None) -> list:
    """Each condition's control map. An inpaint-type condition builds its map from its image (default: the
    init image) and the mask; every other one needs its own image. Modules run on the Runner's `annotators`,
    with the generation's `seed` (shuffle)."""
    count = len(owners)
    images = [None] * count if image is None else (image if isinstance(image, (list, tuple)) else [image])
    if len(images) != count:
        raise ValueError(f"got {len(images)} control images for {count} {noun}: give one per "
                         f"{'ControlNet' if noun == 'ControlNets' else 'condition'}")
    maps = []
    for img, k, registered, choice in zip(images, owners, preprocessors, as_list(preprocess, count, "preprocess", noun)):
        spec = specs[k]
        fn = pre.pick_preprocessor(choice, registered, annotators)
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


@dataclass
class Request:
    """The control arguments of one call, checked, before the images are sized (resolve() finishes them)."""

    owners: list[int]  # per condition, its net
    types: list[int | None]  # per condition, its union type index
    maps: list  # per condition, the control map
    scales: list[float]
    starts: list[float]
    ends: list[float]
    net_modes: list[str] | None
    unions: list[int | None]


def check(specs, unions: list[int | None], args, init, mask, default_scale: float, annotators=None,
          seed: int | None = None) -> Request:
    """Every control argument checked and the maps made (on `annotators`, with `seed`), before any model work."""
    types = _condition_types(specs, unions, args.control_type)
    owners = [k for k, net_types in enumerate(types) for _ in net_types]
    flat = [t for net_types in types for t in net_types]
    count = len(owners)
    noun = "ControlNets" if count == len(specs) else "ControlNet conditions (one per control image)"
    starts = [check_number(s, "control_guidance_start", 0.0) for s in
              as_list(args.control_guidance_start, count, "control_guidance_start", noun)]
    ends = [check_number(e, "control_guidance_end", 0.0) for e in
            as_list(args.control_guidance_end, count, "control_guidance_end", noun)]
    for s, e in zip(starts, ends):
        if not (0.0 <= s < e <= 1.0):
            raise ValueError(f"control guidance window must satisfy 0 <= start < end <= 1, got start={s}, end={e}")
    net_modes = _check_control_modes(args.control_mode, len(specs), args.guess_mode)
    scale = args.controlnet_conditioning_scale
    scales = [check_number(s, "controlnet_conditioning_scale") for s in
              as_list(default_scale if scale is None else scale, count, "controlnet_conditioning_scale", noun)]
    preprocessors = [specs[k].preprocessor if t is None else union_type(t)[1] for k, t in zip(owners, flat)]
    maps = _control_maps(specs, owners, preprocessors, args.image, args.preprocess, init, mask, noun, annotators, seed)
    return Request(owners, flat, maps, scales, starts, ends, net_modes, unions)


def resolve(request: Request, processors, height: int, width: int, num_residuals: int, guess: bool,
            control_batch: int) -> Controls:
    """The checked request at the generation's size: control tensors, per-net residual scales (diffusers'
    guess-mode log scales, or the A1111 control modes' soft injection), the union inputs."""
    r = request
    nets = len(r.unions)
    multi = [sum(1 for owner in r.owners if owner == k) > 1 for k in range(nets)]
    conditions = []
    for owner, t, control_map, scale, start, end in zip(r.owners, r.types, r.maps, r.scales, r.starts, r.ends):
        hint_inputs = {}
        if t is not None:  # one condition: scaled at the output, as a plain net; several: inside the hint
            inner = scale if multi[owner] else 1.0
            hint_inputs = {"control_type_index": torch.tensor([t], dtype=torch.int64),
                           "condition_scale": torch.tensor([inner], dtype=torch.float32)}
        conditions.append(Condition(owner, control_map, processors.control_tensor(control_map, height, width),
                                    hint_inputs, scale, start, end, t))
    net_scales, net_cond = [], []
    for k in range(nets):
        first = next(c for c in conditions if c.net == k)
        out = 1.0 if multi[k] else first.scale  # several conditions: their scales are in the hint
        if r.net_modes is None:
            net_scales.append(block_scales(out, num_residuals, guess))
        elif r.net_modes[k] == "balanced":  # the extension's scales follow the mode only
            net_scales.append(block_scales(out, num_residuals, False))
        else:
            net_scales.append(soft_block_scales(out, num_residuals))
        cond = {}
        if r.unions[k] is not None:  # diffusers' control_type: a 0/1 vector of the net's types, per image
            types = torch.zeros(r.unions[k])
            types[[c.control_type for c in conditions if c.net == k]] = 1.0
            cond["control_type"] = types.reshape(1, -1).repeat(control_batch, 1)
        net_cond.append(cond)
    return Controls(conditions, net_scales, net_cond, multi)

"""Scheduler names -> diffusers schedulers built from the model's own scheduler config.

Never a hand-written scheduler: each name is a diffusers class plus the overrides the usual sampler name
implies (A1111/ComfyUI naming). A fresh scheduler is made for every generation, because diffusers'
schedulers keep per-run state (step index, multistep history) that must not leak into the next call.

The few-step names, for distilled models and LoRAs, as their model cards ask (guidance 1-1.5, 1-8 steps):

    lcm             LCMScheduler: LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) and LCM-distilled UNets
                    (SimianLuo/LCM_Dreamshaper_v7), 2-8 steps
    tcd             TCDScheduler: TCD-LoRA (h1t/TCD-SD15-LoRA) and Hyper-SD's 1-step unified LoRA; `eta` is
                    TCD's gamma (the stochasticity; the cards use 0.3, Hyper-SD's 1-step LoRA 1.0), passed to
                    step() as diffusers' pipelines pass `eta`, so the default 0.0 is deterministic sampling
    ddim_trailing   DDIMScheduler with timestep_spacing="trailing": Hyper-SD's 2/4/8-step SD1.5 LoRAs
    euler_trailing  EulerDiscreteScheduler with timestep_spacing="trailing": Lightning-style LoRAs

LCM and TCD draw fresh noise at every step but the last (LCM from the generator, TCD when eta > 0), as
euler_a does: STEP_NOISE names them for callers that must not share a generator between images.
"""
from __future__ import annotations

import inspect

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
    "ddim_trailing": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "euler_trailing": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
}
# Schedulers whose step() draws noise from the generation's generator (all but the last step).
STEP_NOISE = ("euler_a", "lcm", "tcd")


def check_scheduler_name(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def check_scheduler_steps(name: str, config: dict, steps: int) -> None:
    """The name, and the step count against the scheduler's own limits (LCM: at most its
    original_inference_steps, 50 by default), before any model work: set_timesteps is cheap."""
    try:
        make_scheduler(name, config).set_timesteps(steps)
    except ValueError as err:
        raise ValueError(f"scheduler {name!r} cannot run num_inference_steps={steps}: {err}") from None


def make_scheduler(name: str, config: dict):
    """A fresh scheduler of the named kind from a model's scheduler config (a FrozenDict or dict)."""
    check_scheduler_name(name)
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def step_kwargs(scheduler, generator, eta: float = 0.0) -> dict:
    """The extra arguments `scheduler.step` takes, as diffusers' pipelines pass them (TCD's gamma is `eta`)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs

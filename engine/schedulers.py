"""Scheduler names -> diffusers schedulers built from the model's own scheduler config.

Never a hand-written scheduler: each name is a diffusers class plus the overrides the usual sampler name
implies (A1111/ComfyUI naming). A fresh scheduler is made for every generation, because diffusers'
schedulers keep per-run state (step index, multistep history) that must not leak into the next call.
"""
from __future__ import annotations

import inspect

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
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
}


def check_scheduler_name(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, config: dict):
    """A fresh scheduler of the named kind from a model's scheduler config (a FrozenDict or dict)."""
    check_scheduler_name(name)
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def step_kwargs(scheduler, generator, eta: float = 0.0) -> dict:
    """The extra arguments `scheduler.step` takes, as diffusers' pipelines pass them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs

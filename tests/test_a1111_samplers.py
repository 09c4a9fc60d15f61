"""The A1111 sampler names against A1111's own schedules (docs/SERVING.md's table): what is the same is
checked to the stated tolerance, what differs is checked to be written in the table. A1111's schedules are
computed here from their definitions (k-diffusion's CompVisDenoiser.get_sigmas and get_sigmas_karras, the
compvis DDIM "uniform" discretisation), on SD1.5's scheduler config (engine.tiny.SCHEDULER_CONFIG, key for key)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.schedulers import make_scheduler
from engine.serve.a1111.plan import resolve_sampler
from engine.tiny import SCHEDULER_CONFIG

STEPS = 20
DOCS = Path(__file__).resolve().parents[1] / "docs" / "SERVING.md"


def scheduler(a1111_name: str, schedule: str | None = None):
    _, _, name = resolve_sampler(a1111_name, schedule, None)
    made = make_scheduler(name, SCHEDULER_CONFIG)
    made.set_timesteps(STEPS)
    return made


def training_sigmas() -> np.ndarray:
    alphas = make_scheduler("euler", SCHEDULER_CONFIG).alphas_cumprod.double().numpy()
    return ((1 - alphas) / alphas) ** 0.5


def kdiffusion_uniform(n: int) -> np.ndarray:
    """k-diffusion's discrete schedule: t = linspace(999, 0, n), log-sigma interpolated between the training sigmas."""
    log_sigmas = np.log(training_sigmas())
    t = np.linspace(len(log_sigmas) - 1, 0, n)
    low, w = np.floor(t).astype(int), t - np.floor(t)
    high = np.minimum(low + 1, len(log_sigmas) - 1)
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


@pytest.mark.parametrize("name", ["Euler", "Euler a"])
def test_euler_starts_at_sigma_max_and_follows_kdiffusion(name):
    sched = scheduler(name)
    ours, theirs = sched.sigmas.double().numpy()[:-1], kdiffusion_uniform(STEPS)
    assert ours[0] == pytest.approx(training_sigmas()[-1], rel=1e-6) and float(sched.sigmas[-1]) == 0.0
    assert np.max(np.abs(ours - theirs) / theirs) < 2e-5


def test_ddim_timesteps_are_a1111s():
    assert scheduler("DDIM").timesteps.tolist() == [t + 1 for t in range(0, 1000, 1000 // STEPS)][::-1]


def test_dpmpp_2m_karras_sigmas_are_a1111s():
    sched = scheduler("DPM++ 2M", "Karras")
    sigmas = training_sigmas()
    ramp = np.linspace(0, 1, STEPS)
    rho = 7.0
    karras = (sigmas[-1] ** (1 / rho) + ramp * (sigmas[0] ** (1 / rho) - sigmas[-1] ** (1 / rho))) ** rho
    assert np.max(np.abs(sched.sigmas.double().numpy()[:-1] - karras)) < 1e-5 and float(sched.sigmas[-1]) == 0.0
    assert all(float(t).is_integer() for t in sched.timesteps)  # rounded: the table says so


def test_differences_are_in_the_docs():
    unipc = scheduler("UniPC")
    a1111_unipc = dict(solver_type="bh1", solver_order=3)  # A1111's uni_pc_variant, uni_pc_order defaults
    assert {k: unipc.config[k] for k in a1111_unipc} != a1111_unipc
    table = DOCS.read_text().split("**What the sampler names mean here, against A1111**", 1)[1].split("\n\n", 2)[1]
    for words in ("bh1", "`uni_pc_order` 3", "time_uniform", "rounded to an integer", "Euler a images differ"):
        assert words in table, words

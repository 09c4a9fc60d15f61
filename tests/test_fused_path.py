"""The torch backend's fused residual path equals the reference path (fp32, CPU).

Each kernel implementation the op can pick on the CPU is checked: the native C++ one (the CPU default
when built), Triton under TRITON_INTERPRET=1, and torch's unfused fallback.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine import Runner
from tests.conftest import max_errors

TOL = 1e-5
ARGS = dict(num_inference_steps=3, height=64, width=64, seed=2, output_type="np")
CASES = {
    "one_net": (1, {}),
    "one_net_guess_mode": (1, dict(guess_mode=True)),
    "two_nets": (2, dict(controlnet_conditioning_scale=[0.8, 1.3])),
    "two_nets_guess_mode_window": (2, dict(guess_mode=True, control_guidance_start=[0.0, 0.3])),
}


@pytest.fixture(scope="module")
def runners():
    nets = {1: ["canny"], 2: ["canny", "tile"]}
    return {
        (n, opt): Runner(model="tiny", controlnet=nets[n], device="cpu", optimizations=opt)
        for n in (1, 2)
        for opt in ("reference", "fused")
    }


def _impl_available(impl: str) -> bool:
    """On the CPU, where these runners run: Triton only under its interpreter (on a GPU machine triton
    is installed but CPU tensors are not its to take)."""
    import os

    import torch

    from kernels.zero_conv import native_available, triton_available

    interpreted = lambda: triton_available() and os.environ.get("TRITON_INTERPRET") == "1"  # noqa: E731
    return {"native": lambda: native_available(torch.device("cpu")), "triton": interpreted,
            "torch": lambda: True}[impl]()


@pytest.mark.parametrize("impl", ["native", "triton", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_reference(runners, photo, monkeypatch, case, impl):
    if not _impl_available(impl):
        pytest.skip(f"kernel implementation {impl} is not available for CPU tensors here")
    import kernels

    real = kernels.fused_zero_conv_add
    calls = []

    def pinned(*args, **kwargs):
        calls.append(impl)
        return real(*args, **{**kwargs, "impl": impl})

    monkeypatch.setattr(kernels, "fused_zero_conv_add", pinned)
    nets, kwargs = CASES[case]
    images = [photo] * nets
    expected = runners[(nets, "reference")].generate("a photo", images, **ARGS, **kwargs).images
    got = runners[(nets, "fused")].generate("a photo", images, **ARGS, **kwargs).images
    abs_err, rel_err = max_errors(got, expected)
    print(f"fused[{impl}] {case}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert calls, "the fused op was never called"
    assert abs_err <= TOL


def test_unknown_optimization_preset():
    with pytest.raises(ValueError, match="one of reference, fused, fast, cpu, cpu-compiled, got 'turbo'"):
        Runner(model="tiny", controlnet="canny", device="cpu", optimizations="turbo")

"""Named, switchable optimisations of the torch backend, each with its trade-off written where it is defined.

Choose a preset by name (`Runner(optimizations="fused")`) or pass a `TorchOptimizations`. "reference" has
every switch off: it is the path every other one is checked against. A bad switch is found by turning it
off.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TorchOptimizations:
    fused_zero_conv: bool = False
    """ControlNet zero convs, scale and skip addition in one kernel per injection point for all nets
    (engine/fused.py, kernels.fused_zero_conv_add). Speed: one pass over the skip and feature maps instead
    of conv -> mul -> sum -> add with temporaries; benchmarks/bench_kernels.py measures 2.7x on the 13
    SD1.5 points on a 2-core CPU (native kernel). Quality: same math, other summation order: fp32 equal to
    the reference within 1e-5 (tests/test_fused_path.py). Not used for global-pool (shuffle) ControlNets,
    which average their residuals over the image."""


PRESETS = {
    "reference": TorchOptimizations(),
    "fused": TorchOptimizations(fused_zero_conv=True),
}


def resolve_optimizations(value: str | TorchOptimizations | None) -> TorchOptimizations:
    if value is None:
        return PRESETS["reference"]
    if isinstance(value, TorchOptimizations):
        return value
    if isinstance(value, str) and value in PRESETS:
        return PRESETS[value]
    raise ValueError(
        f"optimizations must be a TorchOptimizations or one of {', '.join(PRESETS)}, got {value!r}"
    )


def describe(opts: TorchOptimizations) -> dict[str, bool]:
    return {f.name: getattr(opts, f.name) for f in fields(opts)}

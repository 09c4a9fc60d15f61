"""LoRA switch time per backend, beside what a re-export costs, in the same run.

The LoRA: rank 16 on every attention projection (to_q, to_k, to_v, to_out.0 of self- and cross-attention)
of the UNet and every q/k/v/out projection of the text encoder, random weights, saved as diffusers saves
LoRAs. A switch is `Runner.set_loras` from one weight of it to another: read nothing from disk (the file
is cached after the warm-up), merge with peft on the kept base weights, and hand the new weights to the
backend (torch: in-place copies; ONNX Runtime: the two sessions rebuilt with replaced initializers).

The re-export it replaces: the engine dir build of this run, timed by bench_pipeline's own fixture
(`build_engine_dir`: a fresh process, every graph, no verification), and within it the UNet and text
encoder exports alone (what a LoRA touches). Each row records both, so the speed-up reads off one file.
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks.bench_pipeline import _after, _run, give_back_memory, held_for_the_module, sd15_only

RANK = 16
UNET_PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TEXT_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
SWITCH_ROUNDS, SWITCH_WARMUPS = 3, 1  # the warm-up reads the file and the base weights once


def _lora_tensors(module: torch.nn.Module, suffixes: tuple[str, ...], gen: torch.Generator) -> dict:
    """peft-named LoRA tensors (rank RANK) for every Linear of `module` whose name ends with a suffix."""
    tensors = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(suffixes):
            tensors[f"{name}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=gen) * 0.01
            tensors[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=gen) * 0.01
    return tensors


@pytest.fixture(scope="module")
def lora_setup(request, bench_config, tmp_path_factory):
    yield from held_for_the_module(_lora_setup(request, bench_config, tmp_path_factory))


def _lora_setup(request, bench_config, tmp_path_factory) -> dict:
    sd15_only(bench_config, "LoRA switch")
    from diffusers import StableDiffusionPipeline

    from engine import Runner

    engine_dir, engine_build = (request.getfixturevalue("built_engine_dir")
                                if "onnxruntime" in bench_config.backends else (None, None))
    runner = Runner(model=bench_config.preset, controlnet="canny", device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    unet = _lora_tensors(runner.backend.unet_model.unet, UNET_PROJECTIONS, gen)
    text = _lora_tensors(runner.backend.text_encoder.text_encoder, TEXT_PROJECTIONS, gen)
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=unet, text_encoder_lora_layers=text,
                                              safe_serialization=True)
    targets = dict(unet=len(unet) // 2, text_encoder=len(text) // 2,
                   params=sum(t.numel() for t in [*unet.values(), *text.values()]))
    return dict(runner=runner, engine_dir=engine_dir, engine_build=engine_build,
                lora=str(out / "pytorch_lora_weights.safetensors"), targets=targets)


def _reexport(engine_build: dict | None) -> dict:
    if engine_build is None:
        return {}
    parts = engine_build["artefacts"]
    return dict(reexport_s=engine_build["seconds"],
                reexport_lora_graphs_s=sum(parts[g]["build_s"] for g in ("unet", "text_encoder") if g in parts))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_lora_switch(benchmark, lora_setup, bench_config, machine_info, backend):
    from engine import Runner
    from engine.lora import merged_weights

    if backend not in bench_config.backends:
        pytest.skip(f"backend {backend} not selected (--backends {','.join(bench_config.backends)})")
    benchmark.group = f"lora switch {bench_config.size} rank {RANK}"
    if backend == "onnxruntime":
        if lora_setup.pop("runner", None) is not None:  # the torch row's fp32 modules, beside ORT's own graphs
            give_back_memory()
        runner = Runner(engine_dir=str(lora_setup["engine_dir"]), backend="onnxruntime")
    else:
        runner = lora_setup["runner"]
    weights = iter([0.8, 0.6] * 64)  # each round a real switch: another weight of the same LoRA

    def switch():
        runner.set_loras([(lora_setup["lora"], next(weights))])

    _run(benchmark, bench_config, switch, SWITCH_ROUNDS, SWITCH_WARMUPS)
    # The merge alone (peft on the kept base weights), once: the rest of a switch is the backend's.
    switcher = runner.loras
    start = time.perf_counter()
    for graph in ("unet", "text_encoder"):
        merged_weights(switcher.active, graph, switcher.base[graph])
    merge_s = time.perf_counter() - start
    benchmark.extra_info.update(size=bench_config.size, backend=backend, kind="lora_switch", rank=RANK,
                                merge_s=merge_s, **lora_setup["targets"], **_reexport(lora_setup["engine_build"]),
                                **machine_info)
    _after(benchmark)
    runner.set_loras([])
    if backend == "onnxruntime":
        del runner

"""Every torch-backend switch that runs on the CPU equals the reference path (fp32, tiny model, 1e-5).

GPU-only switches (fp16, cuda_graphs) have tests that skip without CUDA; the GPU suite
(benchmarks/gpu_suite.py) runs them. compile runs here too, in the "cpu-compiled" preset. Each Runner here shares nothing with the others: switches change the
models in place (fused QKV, class swaps, channels-last), so each gets its own freshly built tiny model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Runner
from engine.optimizations import (PRESETS, TorchOptimizations, cpu_has_native_bf16, cpu_isa, cpu_preset, cumulative,
                                  resolve_optimizations, with_switches)
from tests.conftest import max_errors

TOL = 1e-5
ARGS = dict(num_inference_steps=3, height=64, width=64, seed=3, output_type="np")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
ERRORS: dict[str, float] = {}


def runner(opts, nets=("canny",), device="cpu", dtype=torch.float32) -> Runner:
    return Runner(model="tiny", controlnet=list(nets), device=device, dtype=dtype, optimizations=opts)


@pytest.fixture(scope="module")
def reference(photo):
    """Reference images: one net, and two nets in guess mode with a guidance window (two active sets)."""
    one = runner("reference").generate("a photo", photo, **ARGS).images
    two = runner("reference", ("canny", "tile")).generate("a photo", [photo, photo], **ARGS, **TWO_NETS).images
    return {1: one, 2: two}


TWO_NETS = dict(guess_mode=True, control_guidance_end=[1.0, 0.5], controlnet_conditioning_scale=[0.8, 1.2])


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for name, err in sorted(ERRORS.items()):
        print(f"\n{name:40s} max abs err vs reference {err:.2e}")


def check(name, got, expected):
    abs_err, _ = max_errors(got, expected)
    ERRORS[name] = max(ERRORS.get(name, 0.0), abs_err)
    assert abs_err <= TOL, f"{name}: max abs {abs_err:.2e}"


CPU_SWITCHES = {
    "channels_last": dict(channels_last=True),
    "attention=sdpa": dict(attention="sdpa"),
    "attention=plain": dict(attention="plain"),
    "attention=native": dict(attention="native"),  # fp32: the processor around SDPA
    "fused_qkv": dict(fused_qkv=True),
    "fused_zero_conv": dict(fused_zero_conv=True),
    "groupnorm_silu(torch)": dict(groupnorm_silu=True),
    "all_cpu_switches": dict(channels_last=True, attention="sdpa", fused_qkv=True, fused_zero_conv=True,
                             groupnorm_silu=True),
}


@pytest.mark.parametrize("name", sorted(CPU_SWITCHES))
def test_switch_equals_reference(reference, photo, name):
    # Two nets, guess mode and a window ending at 0.5: two active sets, half-batch ControlNets; all
    # switches together also with one net.
    for nets in ([1, 2] if name == "all_cpu_switches" else [2]):
        _check_switch(reference, photo, name, nets)


def _check_switch(reference, photo, name, nets):
    r = runner(with_switches(**CPU_SWITCHES[name]), ("canny", "tile")[:nets])
    kwargs = TWO_NETS if nets == 2 else {}
    got = r.generate("a photo", [photo] * nets, **ARGS, **kwargs).images
    check(f"{name} ({nets} net{'s' * (nets > 1)})", got, reference[nets])


def test_switches_are_applied():
    from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0

    from engine.modules import GroupNormSiLU, fused_resnet_forward

    r = runner(with_switches(channels_last=True, attention="plain", groupnorm_silu=True))
    unet = r.backend.unet_model.unet
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
    assert type(unet.down_blocks[0].resnets[0]).forward is fused_resnet_forward
    assert isinstance(unet.conv_norm_out, GroupNormSiLU) and isinstance(unet.conv_act, torch.nn.Identity)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    r = runner(with_switches(fused_qkv=True))
    net = r.backend.controlnet_bodies[0].net
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in net.attn_processors.values())


def test_groupnorm_silu_triton_interpreted_on_tiny_model(photo, monkeypatch):
    """The Triton kernel itself (TRITON_INTERPRET=1) in the tiny model: one UNet step at a 4x4 latent (the
    interpreter runs each program in Python; scale 0 skips the ControlNet, whose resnets are the same
    class). Latents reach |x| ~ 30: compared relatively."""
    import os

    from kernels import groupnorm_silu as gn

    if not gn.triton_available():
        pytest.skip("triton is not installed or ENGINE_DISABLE_TRITON is set")
    if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine: these are CPU tensors
        pytest.skip("Triton takes CPU tensors only under TRITON_INTERPRET=1")
    args = dict(ARGS, num_inference_steps=1, height=32, width=32, output_type="latent",
                controlnet_conditioning_scale=0.0)
    expected = runner("reference").generate("a photo", photo, **args).images
    calls = []
    monkeypatch.setattr(gn, "_resolve", lambda impl, x: calls.append(1) or "triton")
    got = runner(with_switches(groupnorm_silu=True)).generate("a photo", photo, **args).images
    assert len(calls) >= 45, "the fused GroupNorm+SiLU op was not called in every resnet"  # 22 x 2 + 1
    abs_err, rel_err = max_errors(got, expected)
    ERRORS["groupnorm_silu(triton interpreted) rel"] = rel_err
    assert rel_err <= TOL, f"max abs {abs_err:.2e}, rel {rel_err:.2e}"


@pytest.mark.parametrize("fused", [False, True])
def test_step_function_equals_reference(reference, photo, fused):
    """The step as one function (what CUDA graphs capture and torch.compile wraps), run eagerly on the CPU:
    the recorded ControlNet calls, two active sets (window) and guess mode's half batch."""
    r = runner(with_switches(fused_zero_conv=fused), ("canny", "tile"))
    r.backend.step_runner = r.backend.step_fn  # the deferred path without the graph
    got = r.generate("a photo", [photo, photo], **ARGS, **TWO_NETS).images
    check(f"step_fn eager (fused={fused})", got, reference[2])


class ReplayByRerun:
    """A stand-in for a CUDA graph on the CPU: 'replay' reruns the step over the same fixed buffers."""

    def __init__(self, fn, key, static, output):
        self.fn, self.key, self.static, self.output = fn, key, static, output

    def replay(self):
        self.output.copy_(self.fn(self.key, *self.static))


def test_step_graphs_keying_on_cpu(photo):
    """StepGraphs' keys, fixed buffers, copy-in/copy-out and dropping on a shape change, with the capture
    itself (the only CUDA part) replaced by re-running the step over the captured buffers."""
    from engine.cuda_graphs import StepGraphs

    class CpuGraphs(StepGraphs):
        def _new_pool(self):
            return object()

        def _record(self, key, static):
            output = self.fn(key, *static)
            return ReplayByRerun(self.fn, key, static, output), output

    ref = runner("reference", ("canny", "tile"))
    r = runner(with_switches(fused_zero_conv=True), ("canny", "tile"))
    graphs = r.backend.step_runner = CpuGraphs(r.backend.step_fn, "cpu")
    for size in (64, 32, 64):
        args = dict(ARGS, height=size, width=size)
        expected = ref.generate("a photo", [photo, photo], **args, **TWO_NETS).images
        got = r.generate("a photo", [photo, photo], **args, **TWO_NETS).images
        check("step graphs (CPU stand-in)", got, expected)
    # Window [1.0, 0.5] over 3 steps: both nets, then canny alone; guess mode keyed in.
    assert sorted(k.nets for k in graphs.graphs) == [(0,), (0, 1)] and all(k.guess for k in graphs.graphs)
    assert graphs.captures == 6 and {k.height for k in graphs.graphs} == {8}  # the 32² graphs were dropped


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown optimization switch 'turbo'; known: fused_zero_conv"):
        with_switches(turbo=True)
    with pytest.raises(ValueError, match="one of reference, fused, fast, cpu, cpu-compiled, got 'ludicrous'"):
        runner("ludicrous")
    with pytest.raises(ValueError, match="attention must be one of default, sdpa, plain, native, got 'flash'"):
        TorchOptimizations(attention="flash")
    with pytest.raises(ValueError, match="fused_qkv needs SDPA"):
        TorchOptimizations(fused_qkv=True, attention="plain")
    with pytest.raises(ValueError, match="channels_last must be True or False, got 'yes'"):
        TorchOptimizations(channels_last="yes")
    with pytest.raises(ValueError, match="freeze_weights is a step of torch.compile: set compile=True"):
        TorchOptimizations(freeze_weights=True)


def test_cuda_graphs_refused_off_cuda():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, got 'cpu'"):
        runner(with_switches(cuda_graphs=True))


def test_presets_and_ablation_order():
    assert PRESETS["reference"] == TorchOptimizations()
    assert PRESETS["fused"] == TorchOptimizations(fused_zero_conv=True)
    # per instruction-set class (engine/optimizations.py CPU_PRESETS says which CPU each was measured on)
    assert cpu_preset("cpu", "avx512_bf16") == TorchOptimizations(channels_last=True, attention="native")
    assert cpu_preset("cpu", "avx2") == TorchOptimizations(attention="native")
    assert cpu_preset("cpu", "amx") == PRESETS["reference"]  # diffusers' own modules: faster there in fp32
    for isa in ("avx512_bf16", "avx2"):
        assert cpu_preset("cpu-compiled", isa) == with_switches(cpu_preset("cpu", isa), compile=True, freeze_weights=True)
    assert cpu_preset("cpu-compiled", "amx") == with_switches("reference", channels_last=True, attention="native",
                                                              compile=True, freeze_weights=True)
    assert resolve_optimizations("cpu") == cpu_preset("cpu", cpu_isa() or "other")
    steps = cumulative()
    assert steps[0] == ("reference", PRESETS["reference"])
    assert [name for name, _ in steps][1:3] == ["+attention=sdpa", "+channels_last"]
    assert steps[-2][1] == PRESETS["fast"]  # the ablation ends at "fast", then adds compile
    assert steps[-1][1].compile


def test_optimizations_with_an_engine_dir_are_refused():
    with pytest.raises(ValueError, match="optimizations='fused' are switches of the torch backend"):
        Runner(engine_dir="any/dir", optimizations="fused")


def test_compiled_step_with_frozen_weights_equals_reference(reference, photo):
    """Preset "cpu-compiled" (inductor, frozen pre-packed weights) in fp32. A new conditioning scale reuses
    the compiled step (the scales are inputs, not frozen constants) and still takes effect. One active
    set only: each compilation costs ~80 s on 2 cores (C++ code generation and g++), and the step
    function's handling of several sets is held eagerly by test_step_function_equals_reference."""
    from torch._dynamo.utils import counters

    packed = counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"]
    r = runner("cpu-compiled")
    check("cpu-compiled", r.generate("a photo", photo, **ARGS).images, reference[1])
    # Freezing took effect: the convs run from pre-packed weights (without it they stay graph inputs).
    assert counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] > packed, "no conv weight was pre-packed"
    graphs = counters["stats"]["unique_graphs"]
    args = dict(ARGS, controlnet_conditioning_scale=0.4)
    got = r.generate("a photo", photo, **args).images
    assert counters["stats"]["unique_graphs"] == graphs, "a new scale recompiled the step"
    check("cpu-compiled, scale 0.4", got, runner("reference").generate("a photo", photo, **args).images)
    # Inputs made inside inference mode (the loop's are made outside) reuse the same compiled step.
    b = r.backend
    with torch.inference_mode():
        sample, cond = torch.randn(2, 4, 8, 8), r.family.encode_prompts(b, ["", "a photo"])
        hint = b.encode_hint(0, torch.rand(2, 3, 64, 64))
    b.unet(sample, torch.tensor(500), cond,
           b.combine([b.controlnet(0, sample, torch.tensor(500), cond, hint, torch.ones(r.num_residuals))], 2))
    assert counters["stats"]["unique_graphs"] == graphs, "inference-mode inputs recompiled the step"


# ---- bf16 on the CPU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, native, isa", [("fpu avx2 avx512f avx512_bf16", True, "avx512_bf16"),
                                                ("fpu avx2 avx512_bf16 amx_bf16 amx_tile", True, "amx"),
                                                ("fpu avx2 fma", False, "avx2"), ("fpu sse4_2", False, "other")])
def test_native_bf16_read_from_cpu_flags(tmp_path, flags, native, isa):
    from engine.optimizations import cpu_description

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(info)) is native
    assert cpu_isa(str(info)) == isa
    assert cpu_description(str(info)) == f"AMD EPYC (family 25 model 17, {isa})"
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is None and cpu_isa(str(tmp_path / "missing")) is None


def test_bf16_tests_run_where_the_cpu_flags_say_bf16():
    """The bf16 tests and benchmark rows are conditioned on the CPU, never skipped outright: OpenVINO's bf16
    branches (tests/test_openvino_backend.py: the model cache, a bf16 Runner after an f32 one) and rows follow
    OpenVINO's BF16 capability, the native attention tests (tests/test_attention.py) the kernel's own
    AVX512-BF16 check, the torch bf16 rows cpu_has_native_bf16(). On a CPU whose flags list amx_bf16 or avx512_bf16 all of them must say yes, so
    none of those tests skips there; here (AVX2) all say no."""
    from engine.optimizations import cpu_flags

    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert cpu_has_native_bf16() is native
    ov = pytest.importorskip("openvino")
    from engine.backends.openvino_backend import ov_has_bf16

    assert ov_has_bf16(ov.Core()) is native, ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    from kernels.native import _load

    module = _load("_attention_cpu")
    if module is not None:  # built by the install (kernels/build_native.py)
        assert module.supported() is ("avx512_bf16" in flags)


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    import engine.parts  # where the Runner's torch models are loaded and the dtype is checked

    monkeypatch.setattr(engine.parts, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 on a CPU without AVX512-BF16 or AMX is emulated"):
        runner("cpu", dtype=torch.bfloat16)


def test_bf16_cpu_preset_close_to_fp32(reference, photo):
    """The "cpu" preset in bf16 (native bf16 attention where the CPU has it, bf16 weights, fp32 latents and
    scheduler) against fp32."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 where the CPU lacks it: slower, same numbers
        got = runner("cpu", dtype=torch.bfloat16).generate("a photo", photo, **ARGS).images
    db = psnr(got, reference[1])
    print(f"\nbf16, preset cpu: PSNR {db:.1f} dB against fp32")
    assert db >= 35


# ---- GPU only: skipped cleanly without CUDA ------------------------------------------------------------


def _gpu_pair(photo, opts, steps=4):
    """(fp32 reference image, image with opts in fp16) on the GPU."""
    from benchmarks.gpu_rows import fp32_math

    args = dict(ARGS, num_inference_steps=steps)
    with fp32_math():  # the reference without TF32
        ref = runner("reference", device="cuda").generate("a photo", photo, **args).images
    r = runner(opts, device="cuda", dtype=torch.float16)
    return ref, r, r.generate("a photo", photo, **args).images


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@needs_cuda
def test_fp16_close_to_fp32(photo):
    ref, _, got = _gpu_pair(photo, "reference")
    assert psnr(got, ref) >= 35


@needs_cuda
def test_cuda_graphs_equal_eager_and_recapture_on_shape_change(photo):
    eager = runner(with_switches("fast", cuda_graphs=False), device="cuda", dtype=torch.float16)
    graphs = runner("fast", device="cuda", dtype=torch.float16)
    for size in (64, 128, 64):
        args = dict(ARGS, height=size, width=size, control_guidance_end=0.5)
        a = eager.generate("a photo", photo, **args).images
        b = graphs.generate("a photo", photo, **args).images
        assert max_errors(b, a)[0] <= 2e-3, size  # same kernels; fp16 atomics/algorithms may differ
    g = graphs.backend.step_runner
    assert len(g.graphs) == 2  # window: all nets, then none; the 128 graphs were dropped
    assert g.captures == 6


@needs_cuda
def test_compile_close_to_eager(photo):
    _, _, a = _gpu_pair(photo, with_switches("fast", cuda_graphs=False))
    _, r, b = _gpu_pair(photo, with_switches("fast", cuda_graphs=False, compile=True))
    assert psnr(b, a) >= 35
    r.generate("a photo", photo, **dict(ARGS, controlnet_conditioning_scale=0.5))  # new scale: no recompile

"""Named, switchable optimisations of the torch backend, each with its trade-off written where it is defined.

Choose a preset by name (`Runner(optimizations="fast")`) or pass a `TorchOptimizations`. "reference" has
every switch off: it is the path every other one is checked against. The CPU presets "cpu" and
"cpu-compiled" differ per instruction-set class (`CPU_PRESETS`, `cpu_isa()`: AMX, AVX512-BF16, AVX2),
each from measurements on a CPU of that class, named where it is defined. A bad switch is found by turning it
off. Each switch is one helper below (`apply_to_model`), applied to the UNet, the ControlNets and the VAE
alike, in the order the fields are listed.

Two things are deliberately not switches:
- Precision. fp16 (or bf16) weights with fp32 latents and scheduler is `Runner(dtype="fp16")`, the default
  on CUDA: the Runner keeps latents, scheduler and guidance in fp32 and the backend casts each model
  input to its dtype and each output back to fp32 (engine/backends/__init__.py). One dtype, not a
  boolean per precision, so a preset never contradicts the dtype. Speed on an H100: ~2-3x over fp32
  (tensor cores, half the bytes). Quality: the GPU suite holds the final image to >= 35 dB PSNR vs fp32
  (benchmarks/gpu_suite.py).
  bf16 on a CPU (`Runner(dtype="bf16")`) pays only where the CPU multiplies bf16 natively (AVX512-BF16 or
  AMX; `cpu_has_native_bf16`): there oneDNN's bf16 convolutions and matmuls run at ~2.3x the fp32 rate,
  and a whole 256², 4-step generation of the full SD1.5 architecture took 8.9 s against diffusers' 19.4 s
  in fp32 on a 2-core Zen 4 (2.17x), 49.4 dB PSNR from the fp32 image. diffusers cast to bf16 is as
  fast (8.8 s): the gain is the precision's, not the engine's (benchmarks/README.md, rows torch-bf16 and
  diffusers-bf16). Without native bf16 it is emulated and ~30x slower than fp32 (FACTS.md): the Runner
  warns. fp32 stays the CPU default, as in diffusers.
- The ControlNet hint encoder once per image. Always on: the Runner encodes the control image once per
  generation (engine/modules.HintEncoder) where diffusers re-runs it every step (0.029 of 0.567 TFLOP
  of a 512² ControlNet step, ~5%). Same math, same output (tests/test_parity.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

ATTENTION = ("default", "sdpa", "plain", "native")


@dataclass(frozen=True)
class TorchOptimizations:
    fused_zero_conv: bool = False
    """ControlNet zero convs, scale and skip addition in one kernel per injection point for all nets
    (engine/fused.py, kernels.fused_zero_conv_add). Speed: one pass over the skip and feature maps instead
    of conv -> mul -> sum -> add with temporaries. Pays on a GPU (Triton; the GPU suite measures it); on
    the CPU the op runs torch's unfused path, since the native kernel lost to it there (0.71x on the 13
    SD1.5 points, benchmarks/bench_kernels.py), so the step is no faster (1.00x). Quality: same math, other summation order: fp32 equal to
    the reference within 1e-5 (tests/test_fused_path.py). Not used for global-pool (shuffle) ControlNets,
    which average their residuals over the image."""

    channels_last: bool = False
    """Weights and 4-D activations in NHWC (torch.channels_last). Speed: cuDNN's fp16 tensor-core
    convolutions are NHWC-native; NCHW costs layout transforms around convs (diffusion-fast reports a
    gain on an A100; ours: the GPU suite's ablation row). On this CPU it is no faster in fp32; in bf16 it
    makes the VAE decode 1.18x faster (preset "cpu"). Quality: same math, other conv algorithms: fp32
    within 1e-5 of the reference (tests/test_optimizations.py). Outputs are handed back contiguous."""

    attention: str = "default"
    """Attention processor: "default" leaves diffusers' choice (AttnProcessor2_0, i.e. SDPA, on torch 2,
    so the reference already has it), "sdpa" sets AttnProcessor2_0 explicitly, "plain" the unfused
    AttnProcessor (softmax(QK^T)V as three ops, an (HW)^2 score matrix in memory: 4096^2 per head at
    512²). Speed: SDPA picks flash / memory-efficient kernels on a GPU and never materialises the
    scores; "plain" exists to measure what that buys. "native": the product by kernels.attention, the best
    attention for the CPU's class: a bf16 kernel for CPUs with AVX512-BF16 but no AMX (torch's CPU flash
    attention runs bf16 at its fp32 speed there; this one is 1.4-2.6x faster on the SD1.5 shapes on a
    Zen 4, kernels/attention.py), SDPA on AMX (where it loses to torch's) and for every other dtype and
    device, so fp32 is the reference exactly. Quality: same math, probabilities rounded to bf16 as
    torch's bf16 kernels do; within SDPA-bf16's error of fp32 (tests/test_attention.py)."""

    fused_qkv: bool = False
    """One matmul for Q, K and V in self-attention (K and V in cross-attention): diffusers'
    Attention.fuse_projections + FusedAttnProcessor2_0, on every attention layer. Speed: one GEMM with 3x
    the N instead of three launches reading the same input (diffusion-fast: a small gain). Quality:
    same products, the weights concatenated: fp32 within 1e-5. Memory: the unfused projections are kept
    beside the fused ones (+~2% of the UNet's weights). Needs SDPA (attention "default" or "sdpa")."""

    groupnorm_silu: bool = False
    """GroupNorm + SiLU as one Triton kernel (kernels.group_norm_silu), NHWC-aware, in every ResnetBlock2D
    (twice per block) and before conv_out. Speed: 3 passes over the activation instead of 4 and no
    temporary; stable-fast found it pays in NHWC, where cuDNN's GroupNorm is slow. Quality: statistics in
    fp32 with a parallel-variance merge; within 1e-5 of fp32 GroupNorm. Off the GPU it runs torch's two
    ops (Triton only under TRITON_INTERPRET=1, for tests); ENGINE_DISABLE_TRITON=1 forces those too."""

    cuda_graphs: bool = False
    """The whole denoising step (every active ControlNet, the residual combine, the UNet) replayed as one
    CUDA graph per shape key (engine/cuda_graphs.py). Speed: removes the CPU cost of launching the
    step's ~1000+ kernels one by one, which at batch 1 on an H100 is comparable to the GPU time (the gap
    between diffusers' 35.8 it/s and stable-fast's 72.6 is mostly this). Quality: bitwise the eager step. Costs: one capture per (batch, size, active nets,
    guess mode, dtype), ~1 step's time, and the graph's activation memory held while the shape lasts.
    CUDA only (an error elsewhere). CFG guidance and the scheduler stay outside (they are in the Runner's
    loop), ~20 small launches per step."""

    compile: bool = False
    """torch.compile (inductor, no autotuning) of the step function (engine/compile.compile_step), on
    any device. Speed: fuses the elementwise tails of convs and attention into their neighbours. The step
    traces as one graph per active-net set with no graph breaks (checked on the CPU with dynamo's eager
    backend: 2 graphs for a window, 0 breaks).
    Costs: 1-3 minutes of compilation per active-net set and image size on first use (75-105 s for the
    full SD1.5 step on 2 CPU cores; 60-90 s even for the tiny model, most of it fixed cost). The scales
    are tensors and the guidance window only decides which nets run (a set already seen), so changing
    either never recompiles; nor do inputs made inside or outside inference mode (the backend hands the
    step inference tensors, TorchBackend._run_step). On the CPU alone it buys nothing (bf16 step 1.49 s,
    as eager): pair it with freeze_weights there. Quality: inductor reorders arithmetic: not bitwise; fp32
    within 1e-5 of the reference on the CPU (tests/test_optimizations.py), fp16 held by the GPU suite's
    PSNR."""

    freeze_weights: bool = False
    """Inductor's freezing (needs compile): the weights become constants of the compiled step, folded and
    pre-packed once into oneDNN's blocked layouts, with bias and activation fused into the conv or linear
    that feeds them (engine/compile.compile_step says how the flag is set). Speed: on the CPU this is
    what makes compile pay. Unfrozen, every conv re-lays-out its weight on every call: 80 ms of the step
    went to three 2560->1280 convs at 4x4 (70 GFLOP/s), and the step took 83 k page faults. Frozen, the
    full SD1.5 step at 256² in bf16 took 1.29 s against 1.49 s compiled unfrozen (1.15x against 1.35x the
    floor at the measured bf16 matmul rate; 4 page faults a step), alone in a process on a 2-core Zen 4,
    and 1.21 s in the benchmark's process, 1.05x its floor (benchmarks/README.md). Costs: the packed
    weights are a second copy beside the modules' (peak RSS 5.8 GB in bf16 alone in a process against
    4.5 GB eager), and weights are read once, at compilation: changing a model's weights afterwards
    has no effect (the Runner never does). Quality: same math, other kernels: fp32 within 3e-6 of the
    reference (tests/test_optimizations.py)."""

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.fused_qkv and self.attention in ("plain", "native"):
            raise ValueError("fused_qkv needs SDPA (FusedAttnProcessor2_0): use attention='default' or 'sdpa', "
                             f"not {self.attention!r}")
        if self.freeze_weights and not self.compile:
            raise ValueError("freeze_weights is a step of torch.compile: set compile=True with it")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")


PRESETS = {
    "reference": TorchOptimizations(),
    "fused": TorchOptimizations(fused_zero_conv=True),
    # Everything that pays on an NVIDIA GPU and keeps the output to eager fp16's (compile is opt-in:
    # its minutes of compilation are worth it only for long-running servers).
    "fast": TorchOptimizations(fused_zero_conv=True, channels_last=True, attention="sdpa", fused_qkv=True,
                               groupnorm_silu=True, cuda_graphs=True),
}

# The CPU presets, per instruction-set class (cpu_isa(), read when the preset is resolved): a default
# measured on one CPU was a regression on another (FACTS.md). "native" attention is itself per class
# (kernels/attention.py): our bf16 kernel on AVX512-BF16, torch's SDPA on AMX and everywhere in fp32.
# Figures: benchmarks/bench_pipeline.py --size sd15 (full SD1.5 architecture, 256², batch 2, 2 cores),
# one CFG step; "diffusers-bf16" is diffusers' pipeline cast to bf16 (NCHW, SDPA).
CPU_PRESETS = {
    # For the CPU, with dtype="bf16" where it is native.
    "cpu": {
        # AMD EPYC Zen 4 (AVX512-BF16, no AMX; family 25 model 17): 1593 ms a bf16 step against
        # diffusers-bf16's 1819, a 4-step generation 8.2 s against 9.2 s (results/cpu-sd15-20261201-085022
        # .json). oneDNN's bf16 convolutions want NHWC: the VAE decode took 1.49 s against 1.76 s in NCHW;
        # the native bf16 attention took the step's attention from 216 to 100 ms (profiled).
        "avx512_bf16": TorchOptimizations(channels_last=True, attention="native"),
        # Intel Xeon with AMX (family 6 model 167): diffusers' own modules, every switch off, in bf16 and
        # fp32. bf16 (2026-12-01): the Zen 4 preset (channels-last, our attention kernel) took 1085 ms a
        # step against diffusers-bf16's 809: AMX's oneDNN kernels and torch's flash attention beat it;
        # with diffusers' layout and SDPA ("native" attention is SDPA on AMX) 849 ms against 874, a
        # generation 3.72 s against 4.76 s (FACTS.md, 2026-12-05). fp32 (2026-12-05, same run, FACTS.md):
        # the reference switches took 2620 ms a step against diffusers' 2434 (0.93x), 12.51 s a
        # generation against 12.16 (0.97x); with attention="native" (SDPA through our op) 2706 ms (0.90x)
        # and 13.78 s (0.88x): the reference is the better of the two, so fp32 gets it (issue #22). No
        # eager switch measured there beat diffusers in fp32; the compiled preset did (1.42x, 1.33x). The
        # eager step is diffusers' own ops minus the per-step hint encoder (profiled, op by op, 256² full
        # SD1.5 on a Zen 3, 2026-12-05), and the same reference step took 1947 ms against diffusers'
        # 2527 on an AMX Xeon on 2026-12-01: the 0.93x is run-to-run spread on a shared 2-core VM, not
        # extra work, and is to be measured again on AMX.
        "amx": TorchOptimizations(),
        # AVX2 only (AMD EPYC Zen 3, family 25 model 1; bf16 emulated, ~30x slower: fp32 here):
        # channels-last made one SD1.5 down block (CrossAttnDownBlock2D, 320 ch, latent 32x32, batch 2)
        # no faster in fp32 (1138 vs 1141 ms, interleaved, 1 thread, 2026-12-01). Diffusers' layout, so
        # diffusers' images exactly: 6720 ms an fp32 step against diffusers' 6810 (1.01x), a 4-step
        # generation 31.2 s against 33.2 s (1.06x) (results/cpu-sd15-20261201-234707.json, rows torch-cpu).
        "avx2": TorchOptimizations(attention="native"),
    },
    # "cpu" plus the step compiled with frozen, pre-packed weights: the fastest CPU path, for servers and
    # batch jobs that can pay 1-2 minutes of compilation per image size and active-net set on first use.
    "cpu-compiled": {
        # Zen 4: 1211 ms a bf16 step (diffusers-bf16 1819), a generation 6.7 s (9.2 s).
        "avx512_bf16": TorchOptimizations(channels_last=True, attention="native", compile=True, freeze_weights=True),
        # Xeon with AMX: 581 ms a bf16 step (diffusers-bf16 809), a generation 2.77 s (4.47 s), measured
        # with channels-last and our attention kernel; the attention is now torch's SDPA there.
        "amx": TorchOptimizations(channels_last=True, attention="native", compile=True, freeze_weights=True),
        # AVX2 only (Zen 3), fp32: frozen and compiled, the SD1.5 down block above took 2807 ms against
        # 2990 eager in NCHW (1.07x) and 2958 in channels-last (interleaved, 1 thread, loaded machine).
        # The whole step: 3945 ms against diffusers' 6810 (1.73x), a generation 21.8 s against 33.2 s
        # (1.53x, 119.6 dB), after 198 s of compilation (results/cpu-sd15-20261201-234707.json).
        "avx2": TorchOptimizations(attention="native", compile=True, freeze_weights=True),
    },
}
CPU_PRESETS["cpu"]["other"] = CPU_PRESETS["cpu"]["avx2"]  # no bf16 and unmeasured: diffusers' layout
CPU_PRESETS["cpu-compiled"]["other"] = CPU_PRESETS["cpu-compiled"]["avx2"]
PRESET_NAMES = (*PRESETS, *CPU_PRESETS)

# The ablation's order: each step adds one switch to all before it (benchmarks/gpu_suite.py).
ABLATION = (
    ("attention", "sdpa"),
    ("channels_last", True),
    ("fused_qkv", True),
    ("fused_zero_conv", True),
    ("groupnorm_silu", True),
    ("cuda_graphs", True),
    ("compile", True),
)


def cpu_preset(name: str, isa: str | None = None) -> TorchOptimizations:
    """A CPU preset's switches for an instruction-set class (default: this CPU's, cpu_isa())."""
    isa = isa or cpu_isa() or "other"
    if name not in CPU_PRESETS or isa not in ISAS:
        raise ValueError(f"cpu_preset({name!r}, {isa!r}): name must be one of {', '.join(CPU_PRESETS)}, "
                         f"isa one of {', '.join(ISAS)}")
    return CPU_PRESETS[name][isa]


def resolve_optimizations(value: str | TorchOptimizations | None) -> TorchOptimizations:
    if value is None:
        return PRESETS["reference"]
    if isinstance(value, TorchOptimizations):
        return value
    if isinstance(value, str) and value in PRESETS:
        return PRESETS[value]
    if isinstance(value, str) and value in CPU_PRESETS:
        return cpu_preset(value)
    raise ValueError(
        f"optimizations must be a TorchOptimizations or one of {', '.join(PRESET_NAMES)}, got {value!r}"
    )


def with_switches(base: TorchOptimizations | str | None = None, **switches) -> TorchOptimizations:
    """`base` with some switches changed; an unknown switch name is an error naming the known ones."""
    known = [f.name for f in fields(TorchOptimizations)]
    unknown = [name for name in switches if name not in known]
    if unknown:
        raise ValueError(f"unknown optimization switch {unknown[0]!r}; known: {', '.join(known)}")
    return replace(resolve_optimizations(base), **switches)


def cumulative(order=ABLATION) -> list[tuple[str, TorchOptimizations]]:
    """[("reference", ref), ("+attention=sdpa", ...), ...]: each switch added to all before it."""
    opts = PRESETS["reference"]
    steps = [("reference", opts)]
    for name, value in order:
        opts = with_switches(opts, **{name: value})
        steps.append((f"+{name}" if value is True else f"+{name}={value}", opts))
    return steps


def describe(opts: TorchOptimizations) -> dict[str, bool | str]:
    return {f.name: getattr(opts, f.name) for f in fields(opts)}


def check_device(opts: TorchOptimizations, device) -> None:
    """Switches that cannot run on this device raise here, before any model work."""
    if opts.cuda_graphs and getattr(device, "type", str(device)) != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {str(device)!r}: turn it off or use device='cuda'")


ISAS = ("amx", "avx512_bf16", "avx2", "other")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str] | None:
    """This CPU's flags as the kernel lists them; None where they cannot be read (no /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def cpu_isa(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The instruction-set class CPU defaults are chosen by: "amx" (AMX-BF16 tiles, Intel Xeon Sapphire
    Rapids and later), "avx512_bf16" (e.g. AMD Zen 4, Intel Cooper Lake), "avx2" (e.g. AMD Zen 3),
    "other"; None where the flags cannot be read. Read when asked, not at import."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return None
    for isa, flag in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx2", "avx2")):
        if flag in flags:
            return isa
    return "other"


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """What result files record of the CPU: "AMD EPYC (family 25 model 1, avx2)". VMs often show only
    the brand, so family and model (which tell Zen 3 from Zen 4) and the class go with it."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    return (f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}, {cpu_isa(cpuinfo)})")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16); None where it cannot be
    read (no /proc/cpuinfo). Read when asked, not at import."""
    isa = cpu_isa(cpuinfo)
    return None if isa is None else isa in ("amx", "avx512_bf16")


# ---- applying the model-level switches, one helper each --------------------------------------------------


def set_attention(model, attention: str) -> None:
    if attention == "default":
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from engine.modules import NativeAttnProcessor

    processors = {"sdpa": AttnProcessor2_0, "plain": AttnProcessor, "native": NativeAttnProcessor}
    model.set_attn_processor(processors[attention]())


def fuse_qkv(model) -> None:
    import torch
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
                module.set_processor(FusedAttnProcessor2_0())


def use_groupnorm_silu(model) -> int:
    """Fuse every GroupNorm + SiLU pair that only feeds each other; returns how many blocks changed."""
    from diffusers.models.resnet import ResnetBlock2D
    from torch import nn

    from engine.modules import GroupNormSiLU, swap_resnet

    changed = sum(swap_resnet(m) for m in list(model.modules()) if isinstance(m, ResnetBlock2D))
    # UNet and VAE decoder: conv_norm_out -> conv_act -> conv_out, the act used nowhere else.
    for owner in [model, getattr(model, "decoder", None)]:
        norm, act = getattr(owner, "conv_norm_out", None), getattr(owner, "conv_act", None)
        if type(norm) is nn.GroupNorm and isinstance(act, nn.SiLU):
            norm.__class__ = GroupNormSiLU
            owner.conv_act = nn.Identity()
            changed += 1
    return changed


def apply_to_model(model, opts: TorchOptimizations) -> None:
    """Apply the model-level switches to one diffusers model (UNet, ControlNet or VAE), in place."""
    import torch

    set_attention(model, opts.attention)
    if opts.fused_qkv:
        fuse_qkv(model)
    if opts.groupnorm_silu:
        use_groupnorm_silu(model)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)

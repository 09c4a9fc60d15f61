"""Fused zero-conv residual add vs torch's unfused path at SD1.5's 13 injection points.

Shapes (one CFG step at 512x512: batch 2, latent 64x64; Ck == C, one ControlNet), 13 points:
    64x64: 320 x3 (conv_in + 2 resnets)   32x32: 320 (downsample), 640 x2
    16x16: 640 (downsample), 1280 x2      8x8: 1280 (downsample), 1280 x2, mid block 1280

Bytes the fused op must move per injection point: read skip (B*C*H*W), read features (B*Ck*H*W),
write out (B*C*H*W), read weights (C*Ck, plus C of bias). Weights are not negligible at low
resolution: at 8x8 a 1280x1280 fp16 weight is 3.3 MB against 1.0 MB of activations.
    fp16, per point: 320@64² 15.7 MB act + 0.2 MB w; 640@32² 7.9 + 0.8; 1280@16² 3.9 + 3.3; 1280@8² 1.0 + 3.3
    fp16, per step (13 points): 96.3 MB activations + 23.2 MB weights = 119.5 MB
        -> floor 36 us at 3.35 TB/s (H100 SXM HBM3); fp32 doubles it: 239 MB, 71 us.
    Compute: 15.9 GFLOP per step per net. fp16 tensor cores (~990 TFLOP/s dense) need 16 us, under
    the memory floor; fp32 with ieee dots (no tf32, ~67 TFLOP/s) needs 240 us: fp32 is compute bound.
The unfused path (conv -> mul -> add) moves 7 activation passes instead of 3 (conv reads features,
writes r; mul reads r, writes r*s; add reads skip and r*s, writes out): ~2.3x the bytes.

CPU (2 cores, fp32): torch unfused vs native C++ (impl="native"). Triton under the interpreter is
far too slow to time. GPU (skipped without CUDA): Triton vs torch unfused in fp16, plus a
device-to-device copy of the same byte count; each result's extra_info holds the achieved GB/s.
Timed runs (`--benchmark`) are small: 3 warm-up rounds, 7 timed; without it each runs once.
"""
import pytest
import torch

import kernels
from kernels import native

SD15_POINTS = [(320, 64)] * 3 + [(320, 32), (640, 32), (640, 32), (640, 16), (1280, 16), (1280, 16)] + [(1280, 8)] * 4
DISTINCT = sorted(set(SD15_POINTS), key=lambda cs: (-cs[1], cs[0]))
BATCH = 2
HAS_CUDA = torch.cuda.is_available()
HAS_NATIVE_CPU = native.module_for(torch.device("cpu")) is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def make_point(C, S, device, dtype, nets=1, seed=0, channels_last=False):
    """One injection point's tensors. channels_last: the layout the engine's "fast" preset runs in; the
    scales then come as device tensors, as the engine passes them (python floats would cost a
    host-to-device copy per call)."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    skip = torch.randn(BATCH, C, S, S, generator=g).to(device, dtype).to(memory_format=fmt)
    features = [torch.randn(BATCH, C, S, S, generator=g).to(device, dtype).to(memory_format=fmt) for _ in range(nets)]
    weights = [(torch.randn(C, C, 1, 1, generator=g) / C**0.5).to(device, dtype) for _ in range(nets)]
    biases = [torch.randn(C, generator=g).to(device, dtype) for _ in range(nets)]
    scales = [torch.tensor(0.8, device=device) for _ in range(nets)] if channels_last else [0.8] * nets
    return skip, features, weights, biases, scales


def bytes_moved(skip, features, weights):
    return 2 * skip.nbytes + sum(f.nbytes for f in features) + sum(w.nbytes for w in weights)


def run(benchmark, fn, nbytes, sync=False):
    def call():
        fn()
        if sync:
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=7, iterations=1, warmup_rounds=3)
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:  # None without --benchmark (benchmarks/conftest.py: one untimed call)
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.mean / 1e9


def cpu_fn(impl, point):
    skip, features, weights, biases, scales = point
    if impl == "torch_unfused":
        return lambda: kernels.zero_conv_add_torch(skip, features, weights, biases, scales)
    out = torch.empty_like(skip)
    return lambda: kernels.fused_zero_conv_add(skip, features, weights, biases, scales, out=out, impl=impl)


CPU_IMPLS = ["torch_unfused", pytest.param("native", marks=pytest.mark.skipif(
    not HAS_NATIVE_CPU, reason="native CPU module not built (python -m kernels.build_native)"))]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("C,S", DISTINCT, ids=[f"{c}x{s}x{s}" for c, s in DISTINCT])
def test_cpu_point(benchmark, impl, C, S):
    benchmark.group = f"cpu {C}x{S}x{S}"
    point = make_point(C, S, "cpu", torch.float32)
    run(benchmark, cpu_fn(impl, point), bytes_moved(*point[:3]))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_step(benchmark, impl):
    """All 13 injection points of one CFG step, in order."""
    benchmark.group = "cpu step (13 points)"
    points = [make_point(C, S, "cpu", torch.float32, seed=i) for i, (C, S) in enumerate(SD15_POINTS)]
    fns = [cpu_fn(impl, p) for p in points]
    run(benchmark, lambda: [f() for f in fns], sum(bytes_moved(*p[:3]) for p in points))


def gpu_fn(impl, point):
    skip, features, weights, biases, scales = point
    if impl == "torch_unfused":
        return lambda: kernels.zero_conv_add_torch(skip, features, weights, biases, scales)
    if impl == "copy":
        # A device-to-device copy of the same byte count: the achievable bandwidth reference.
        nbytes = bytes_moved(skip, features, weights)
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=skip.device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    out = torch.empty_like(skip)
    return lambda: kernels.fused_zero_conv_add(skip, features, weights, biases, scales, out=out, impl=impl)


GPU_IMPLS = ["torch_unfused", "triton", "copy"]


@needs_cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("C,S", DISTINCT, ids=[f"{c}x{s}x{s}" for c, s in DISTINCT])
def test_gpu_point(benchmark, impl, C, S):
    benchmark.group = f"gpu fp16 {C}x{S}x{S}"
    point = make_point(C, S, "cuda", torch.float16)
    run(benchmark, gpu_fn(impl, point), bytes_moved(*point[:3]), sync=True)


@needs_cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_step(benchmark, impl):
    benchmark.group = "gpu fp16 step (13 points)"
    points = [make_point(C, S, "cuda", torch.float16, seed=i) for i, (C, S) in enumerate(SD15_POINTS)]
    fns = [gpu_fn(impl, p) for p in points]
    run(benchmark, lambda: [f() for f in fns], sum(bytes_moved(*p[:3]) for p in points), sync=True)

"""Native C++/OpenMP CPU fused zero-conv add vs float64; skipped when the module is not built
(python -m kernels.build_native). The CUDA module runs the same cases when a GPU is present."""
import pytest
import torch

import kernels
from kernels import native

DEVICES = [pytest.param(torch.device("cpu"), marks=pytest.mark.skipif(
    native.module_for(torch.device("cpu")) is None, reason="native CPU module not built (python -m kernels.build_native)"))]
if torch.cuda.is_available():
    DEVICES.append(pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(
        native.module_for(torch.device("cuda")) is None, reason="native CUDA module not built (needs nvcc)")))
ERRORS: dict = {}


def make_case(device, B, C, H, W, cks, channels_last, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    skip = torch.randn(B, C, H, W, generator=g).to(device, dtype).to(memory_format=fmt)
    features = [torch.randn(B, ck, H, W, generator=g).to(device, dtype).to(memory_format=fmt) for ck in cks]
    weights = [(torch.randn(C, ck, 1, 1, generator=g) / ck**0.5).to(device, dtype) for ck in cks]
    biases = [torch.randn(C, generator=g).to(device, dtype) for _ in cks]
    return skip, features, weights, biases


def check(out, ref, tol=1e-5):
    assert torch.isfinite(out).all(), "some output elements were not written (NaN poison survived)"
    abs_err = (out.double() - ref).abs().max().item()
    rel = abs_err / ref.abs().max().item()
    seen = ERRORS.get((out.device.type, out.dtype), (0.0, 0.0))
    ERRORS[(out.device.type, out.dtype)] = (max(seen[0], abs_err), max(seen[1], rel))
    assert rel <= tol, f"max abs {abs_err:.3g}, rel {rel:.3g}"


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    for key, (a, r) in ERRORS.items():
        print(f"\nnative {key}: max abs err {a:.3g}  max rel err {r:.3g}")


SCALES = {1: [-0.75], 3: [1.0, 0.0, -1.5]}
NET_CKS = {1: (40,), 3: (40, 24, 56)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nets", [1, 3])
@pytest.mark.parametrize("B,C,H,W", [(1, 40, 7, 9), (3, 40, 7, 9), (1, 17, 1, 5), (2, 70, 9, 11)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_native_fp32(device, nets, B, C, H, W, channels_last, in_place):
    skip, features, weights, biases = make_case(device, B, C, H, W, NET_CKS[nets], channels_last)
    scales = SCALES[nets]
    ref = kernels.zero_conv_add_reference(skip, features, weights, biases, scales)
    out = skip.clone() if in_place else torch.full_like(skip, float("nan"))
    source = out if in_place else skip
    kernels.fused_zero_conv_add(source, features, weights, biases, scales, out=out, impl="native")
    check(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_native_many_nets_functional(device):
    cks = (5, 9, 17, 3, 40)
    skip, features, weights, biases = make_case(device, 2, 19, 3, 5, cks, False)
    scales = [0.3, -0.2, 1.0, 0.0, torch.tensor(0.9)]
    ref = kernels.zero_conv_add_reference(skip, features, weights, biases, scales)
    check(kernels.fused_zero_conv_add(skip, features, weights, biases, scales, impl="native"), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_native_rejects_what_it_cannot_take(device):
    skip, features, weights, biases = make_case(device, 1, 8, 6, 4, (8,), False)
    # Mixed layouts: skip NCHW, features channels-last.
    mixed = [features[0].to(memory_format=torch.channels_last)]
    with pytest.raises(ValueError, match="impl='native'"):
        kernels.fused_zero_conv_add(skip, mixed, weights, biases, [1.0], impl="native")
    ref = kernels.zero_conv_add_reference(skip, mixed, weights, biases, [1.0])
    check(kernels.fused_zero_conv_add(skip, mixed, weights, biases, [1.0]), ref)  # impl=None falls back
    if device.type == "cpu":
        half = make_case(device, 1, 8, 6, 4, (8,), False, dtype=torch.float16)
        with pytest.raises(ValueError, match="float32 only"):
            kernels.fused_zero_conv_add(*half, [1.0], impl="native")


def test_native_cpu_module_uses_openmp():
    module = native.module_for(torch.device("cpu"))
    if module is None:
        pytest.skip("native CPU module not built")
    assert module.openmp


def test_cpu_default_is_native_for_fp32_unless_disabled(monkeypatch):
    from kernels import zero_conv

    if native.module_for(torch.device("cpu")) is None:
        pytest.skip("native CPU module not built")
    cpu = torch.device("cpu")
    assert zero_conv._resolve(None, cpu, torch.float32) == zero_conv.CPU_DEFAULT_IMPL
    assert zero_conv._resolve(None, cpu, torch.float16) == "torch"
    monkeypatch.setenv("ENGINE_DISABLE_NATIVE", "1")
    assert zero_conv._resolve(None, cpu, torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="ENGINE_DISABLE_NATIVE"):
        zero_conv._resolve("native", cpu, torch.float32)

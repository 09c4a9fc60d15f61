"""Fused GroupNorm + SiLU: Triton (interpreted on CPU) and torch, vs float64.

Triton runs on CUDA when there is one; otherwise under TRITON_INTERPRET=1 (tests/conftest.py). Shapes are
small and deliberately odd: P = 35 pixels spans two splits of 16-pixel tiles with the last one masked,
3 channels per group pad to a 4-wide tile, 1x1 images have a single pixel. Outputs start as NaN (written
by the op's own empty_like, so checked for being fully overwritten by the finite check) and inputs carry
a large mean, which E[x²] - mean² variance would get wrong.
"""
import pytest
import torch

import kernels
from kernels import groupnorm_silu as gn
from tests.conftest import run_fresh_python

HAS_TRITON = gn.triton_available()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Max |out - ref| / max |ref| against float64 on the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed or disabled")
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]


def make_case(B, C, H, W, dtype, channels_last, mean=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 2.0 + mean
    weight = 1.0 + 0.3 * torch.randn(C, generator=g)
    bias = 0.5 * torch.randn(C, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(DEVICE, dtype).to(memory_format=fmt), weight.to(DEVICE, dtype), bias.to(DEVICE, dtype)


def check(out, ref, dtype, tolerance=None):
    assert torch.isfinite(out).all(), "some output elements were not written"
    rel = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    assert rel <= (tolerance or TOLERANCE[dtype]), f"{dtype}: max rel {rel:.3g}"


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Every output buffer the op allocates starts as NaN, so an element a kernel skips fails the test."""
    real = torch.empty_like

    def poisoned(t, *args, **kwargs):
        return real(t, *args, **kwargs).fill_(float("nan")) if t.is_floating_point() else real(t, *args, **kwargs)

    monkeypatch.setattr(gn.torch, "empty_like", poisoned)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,C,G,H,W", [(2, 12, 4, 5, 7), (1, 8, 2, 1, 1), (1, 32, 8, 4, 4)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mean", [0.0, 50.0], ids=["centred", "offset"])
def test_fp32(impl, B, C, G, H, W, channels_last, mean):
    x, w, b = make_case(B, C, H, W, torch.float32, channels_last, mean)
    out = kernels.group_norm_silu(x, G, w, b, 1e-5, impl=impl)
    assert out.shape == x.shape and out.stride() == x.stride()  # the layout is kept
    # torch's own CPU GroupNorm loses ~1e-4 (relative) on channels-last inputs with a large mean (seen
    # here: 8.6e-5); the Triton kernel's parallel-variance merge keeps 1e-5.
    loose = 1e-3 if impl == "torch" and mean else None
    check(out, kernels.group_norm_silu_reference(x, G, w, b, 1e-5), torch.float32, loose)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_half(impl, dtype, channels_last):
    x, w, b = make_case(2, 12, 5, 7, dtype, channels_last)
    out = kernels.group_norm_silu(x, 4, w, b, 1e-6, impl=impl)
    assert out.dtype == dtype
    check(out, kernels.group_norm_silu_reference(x, 4, w, b, 1e-6), dtype)


def test_defaults_and_non_flat_layout():
    x, _, _ = make_case(1, 8, 6, 4, torch.float32, False)
    check(kernels.group_norm_silu(x, 2), kernels.group_norm_silu_reference(x, 2, None, None, 1e-5), torch.float32)
    xt = x.transpose(2, 3)  # H and W do not flatten: impl=None falls back to torch, triton refuses
    check(kernels.group_norm_silu(xt, 2), kernels.group_norm_silu_reference(xt, 2, None, None, 1e-5), torch.float32)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="impl='triton' cannot take x"):
            kernels.group_norm_silu(xt, 2, impl="triton")


@pytest.mark.parametrize("bad,match", [
    ("dim", r"x must be a 4-D"),
    ("groups", "num_groups must be a positive integer dividing the 8 channels, got 3"),
    ("weight", r"weight is \(4,\)"),
    ("dtype", r"bias is \(8,\) torch.float16"),
    ("impl", "impl='cuda' is not one of"),
])
def test_errors_name_the_bad_value(bad, match):
    x, w, b = make_case(1, 8, 3, 3, torch.float32, False)
    groups, impl = 2, "torch"
    if bad == "dim":
        x = x[0]
    elif bad == "groups":
        groups = 3
    elif bad == "weight":
        w = w[:4]
    elif bad == "dtype":
        b = b.half()
    elif bad == "impl":
        impl = "cuda"
    with pytest.raises(ValueError, match=match):
        kernels.group_norm_silu(x, groups, w, b, impl=impl)


def test_disable_triton_switch(monkeypatch):
    monkeypatch.setenv("ENGINE_DISABLE_TRITON", "1")
    x, w, b = make_case(1, 8, 3, 3, torch.float32, False)
    assert gn._resolve(None, x.to("meta")) == "torch"
    with pytest.raises(RuntimeError, match="ENGINE_DISABLE_TRITON"):
        kernels.group_norm_silu(x, 2, w, b, impl="triton")


def test_op_registered_with_fake_impl():
    x, w, b = make_case(1, 8, 3, 3, torch.float32, True)
    torch.library.opcheck(torch.ops.controlnet_engine.group_norm_silu.default, (x, w, b, 2, 1e-5, "torch"),
                          test_utils=("test_schema", "test_faketensor"))


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "x = torch.randn(1, 4, 2, 2)\n"
        "y = kernels.group_norm_silu(x, 2)\n"
        "assert torch.allclose(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2)))\n"
        "assert 'kernels.groupnorm_silu_triton' not in sys.modules\n"
    )
    done = run_fresh_python(code)
    assert done.returncode == 0, done.stderr

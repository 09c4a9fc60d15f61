"""Fused zero-conv add and residual combine: Triton (interpreted on CPU) and torch, vs float64.

Triton runs on CUDA when there is one; otherwise under TRITON_INTERPRET=1, set here before
kernels.zero_conv_triton (imported lazily on the first Triton call) decorates its kernels.
Shapes are deliberately not multiples of any block size (C=40 spans 1.25 blocks of 32, H*W=63).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import zero_conv  # noqa: E402
from tests.conftest import run_fresh_python  # noqa: E402

HAS_TRITON = zero_conv.importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Max |out - ref| / max |ref| against float64 on the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
ERRORS: dict = {}  # (impl, dtype) -> (max abs, max normwise rel) seen, printed at the end with -s

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def make_case(B, C, H, W, cks, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    skip = torch.randn(B, C, H, W, generator=g)
    features = [torch.randn(B, ck, H, W, generator=g) for ck in cks]
    # Weights scaled like a trained 1x1 conv so sums of many products stay O(1).
    weights = [torch.randn(C, ck, 1, 1, generator=g) / ck**0.5 for ck in cks]
    biases = [torch.randn(C, generator=g) for _ in cks]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    skip = skip.to(DEVICE, dtype).to(memory_format=fmt)
    features = [f.to(DEVICE, dtype).to(memory_format=fmt) for f in features]
    weights = [w.to(DEVICE, dtype) for w in weights]
    biases = [b.to(DEVICE, dtype) for b in biases]
    return skip, features, weights, biases


def check(impl, out, ref):
    assert torch.isfinite(out).all(), "some output elements were not written (NaN poison survived)"
    abs_err = (out.double() - ref).abs().max().item()
    rel = abs_err / ref.abs().max().item()
    key = (impl, out.dtype)
    seen = ERRORS.get(key, (0.0, 0.0))
    ERRORS[key] = (max(seen[0], abs_err), max(seen[1], rel))
    assert rel <= TOLERANCE[out.dtype], f"{impl} {out.dtype}: max abs {abs_err:.3g}, rel {rel:.3g}"


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    """fp32 means fp32: cuDNN's convolutions (the torch path's 1x1 conv) default to TF32 on Ampere and
    later, 10-bit mantissas, far outside the fp32 tolerance."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    for (impl, dtype), (a, r) in sorted(ERRORS.items(), key=str):
        print(f"\n{impl:7s} {str(dtype):14s} max abs err {a:.3g}  max rel err {r:.3g}")


SCALES = {1: [-0.75], 3: [1.0, 0.0, -1.5]}
NET_CKS = {1: (40,), 3: (40, 24, 56)}
IMPL_PARAMS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("nets", [1, 3])
@pytest.mark.parametrize("B,C,H,W", [(1, 40, 7, 9), (3, 40, 7, 9), (1, 17, 1, 5)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_fused_fp32(impl, nets, B, C, H, W, channels_last, in_place):
    skip, features, weights, biases = make_case(B, C, H, W, NET_CKS[nets], torch.float32, channels_last)
    scales = SCALES[nets]
    ref = kernels.zero_conv_add_reference(skip, features, weights, biases, scales)
    out = skip.clone() if in_place else torch.full_like(skip, float("nan"))
    source = out if in_place else skip
    result = kernels.fused_zero_conv_add(source, features, weights, biases, scales, out=out, impl=impl)
    assert result is out and out.stride() == skip.stride()
    check(impl, out, ref)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype,shape", [
    (torch.float16, (3, 40, 7, 9)),
    (torch.bfloat16, (1, 17, 3, 5)),  # bf16 matmuls are very slow on this CPU: tiny
])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_half(impl, dtype, shape, channels_last):
    B, C, H, W = shape
    cks = (C, 24, 56)
    skip, features, weights, biases = make_case(B, C, H, W, cks, dtype, channels_last)
    scales = [0.5, torch.tensor(-1.0), 2.0]  # 0-d tensors are accepted too
    ref = kernels.zero_conv_add_reference(skip, features, weights, biases, scales)
    out = torch.full_like(skip, float("nan"))
    kernels.fused_zero_conv_add(skip, features, weights, biases, scales, out=out, impl=impl)
    check(impl, out, ref)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_functional_and_many_nets(impl):
    # Five nets: Triton takes four per launch and chains the fifth, reading out as its skip.
    cks = (5, 9, 17, 3, 40)
    skip, features, weights, biases = make_case(2, 19, 3, 5, cks, torch.float32, False)
    scales = [0.3, -0.2, 1.0, 0.0, 0.9]
    ref = kernels.zero_conv_add_reference(skip, features, weights, biases, scales)
    out = kernels.fused_zero_conv_add(skip, features, [w[:, :, 0, 0] for w in weights], biases, scales, impl=impl)
    assert out is not skip
    check(impl, out, ref)


def test_torch_helper_is_the_unfused_sum():
    skip, features, weights, biases = make_case(2, 40, 7, 9, (40, 24), torch.float32, False)
    scales = [0.5, -1.0]
    ref = kernels.zero_conv_add_reference(skip, features, weights, biases, scales)
    check("unfused", kernels.zero_conv_add_torch(skip, features, weights, biases, scales), ref)


def test_non_flat_layout_falls_back_or_raises():
    skip, features, weights, biases = make_case(1, 8, 6, 4, (8,), torch.float32, False)
    skip_t = skip.transpose(2, 3)  # (1, 8, 4, 6) with H and W not flattenable
    features_t = [f.transpose(2, 3) for f in features]
    ref = kernels.zero_conv_add_reference(skip_t, features_t, weights, biases, [1.0])
    check("torch", kernels.fused_zero_conv_add(skip_t, features_t, weights, biases, [1.0]), ref)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="impl='triton'"):
            kernels.fused_zero_conv_add(skip_t, features_t, weights, biases, [1.0], impl="triton")


@pytest.mark.parametrize("bad,match", [
    ("feature_shape", r"features\[0\] has shape"),
    ("weight_shape", r"weights\[0\] has shape"),
    ("bias_shape", r"biases\[0\] has shape"),
    ("dtype", r"features\[0\] is torch.float16"),
    ("lengths", "one entry per ControlNet"),
    ("impl", "impl='cuda' is not one of"),
    ("scale", r"scales\[0\] has shape"),
])
def test_errors_name_the_bad_value(bad, match):
    skip, features, weights, biases = make_case(1, 8, 3, 3, (4,), torch.float32, False)
    scales, impl = [1.0], "torch"
    if bad == "feature_shape":
        features = [features[0][:, :, :2]]
    elif bad == "weight_shape":
        weights = [weights[0][:, :3]]
    elif bad == "bias_shape":
        biases = [biases[0][:5]]
    elif bad == "dtype":
        features = [features[0].half()]
    elif bad == "lengths":
        scales = [1.0, 2.0]
    elif bad == "impl":
        impl = "cuda"
    elif bad == "scale":
        scales = [torch.ones(2)]
    with pytest.raises(ValueError, match=match):
        kernels.fused_zero_conv_add(skip, features, weights, biases, scales, impl=impl)


def test_disable_triton_switch(monkeypatch):
    monkeypatch.setenv("ENGINE_DISABLE_TRITON", "1")
    assert zero_conv._resolve(None, torch.device("cuda"), torch.float16) != "triton"
    skip, features, weights, biases = make_case(1, 8, 3, 3, (4,), torch.float32, False)
    with pytest.raises(RuntimeError, match="ENGINE_DISABLE_TRITON"):
        kernels.fused_zero_conv_add(skip, features, weights, biases, [1.0], impl="triton")
    monkeypatch.delenv("ENGINE_DISABLE_TRITON")
    if HAS_TRITON:
        assert zero_conv._resolve(None, torch.device("cuda"), torch.float16) == "triton"


def test_import_and_fallback_without_triton():
    # A fresh interpreter where `import triton` fails: kernels must import and run the torch path.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "s = torch.ones(1, 2, 2, 2); f = [torch.ones(1, 3, 2, 2)]\n"
        "o = kernels.fused_zero_conv_add(s, f, [torch.ones(2, 3)], [torch.zeros(2)], [2.0])\n"
        "assert torch.equal(o, torch.full_like(s, 7.0)), o\n"
        "assert 'kernels.zero_conv_triton' not in sys.modules\n"
    )
    done = run_fresh_python(code)
    assert done.returncode == 0, done.stderr


def test_op_registered_with_fake_impl():
    skip, features, weights, biases = make_case(1, 8, 3, 3, (4,), torch.float32, True)
    args = (skip, features, [w[:, :, 0, 0] for w in weights], biases, torch.tensor([0.5]), "torch")
    torch.library.opcheck(torch.ops.controlnet_engine.fused_zero_conv_add.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.controlnet_engine.fused_zero_conv_add(*[mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                                 else [mode.from_tensor(t) for t in a]
                                                                 if isinstance(a, list) else a for a in args])
    assert fake.shape == skip.shape and fake.stride() == skip.stride()


def make_residuals(nets, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 40, 7, 9), (1, 17, 3, 5), (3, 1025), (2, 8, 1, 1)]  # 1025: one past a Triton block
    return [[torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes] for _ in range(nets)]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("nets", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_combine_residuals(impl, nets, dtype, in_place):
    lists = make_residuals(nets, dtype)
    scales = [-0.5, 0.0, 1.25][:nets]
    refs = [sum(float(s) * r[i].double() for s, r in zip(scales, lists)) for i in range(len(lists[0]))]
    out = lists[0] if in_place else [torch.full_like(r, float("nan")) for r in lists[0]]
    result = kernels.combine_residuals(lists, scales, out=out, impl=impl)
    assert all(a is b for a, b in zip(result, out))
    for o, ref in zip(result, refs):
        check(f"{impl}-combine", o, ref)


def test_combine_functional_and_errors():
    lists = make_residuals(2, torch.float32)
    refs = [r0.double() * 2 - r1.double() for r0, r1 in zip(*lists)]
    for o, ref in zip(kernels.combine_residuals(lists, [2.0, -1.0]), refs):
        check("combine", o, ref)
    with pytest.raises(ValueError, match=r"residual_lists\[1\]\[0\]"):
        kernels.combine_residuals([lists[0], [lists[1][0][:1]] + lists[1][1:]], [1.0, 1.0])
    with pytest.raises(ValueError, match="one scale per residual list"):
        kernels.combine_residuals(lists, [1.0])

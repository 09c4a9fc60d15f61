"""kernels.attention: the native bf16 kernel (kernels/csrc/attention_cpu.cpp) against fp64 attention, on
fresh random inputs with the output poisoned before the kernel writes it. Its error must stay within
bf16's: no more than 1.5x torch's own bf16 SDPA error on the same inputs (and < 1.5e-2 relative).
Skipped where the module is not built or the CPU lacks AVX512-BF16; the fallback and the errors run
everywhere."""
import pytest
import torch
import torch.nn.functional as F

from kernels.attention import attention, attention_native, native_unsupported

ERRORS: dict = {}


def _native_reason() -> str | None:
    x = torch.zeros(1, 2, 1, 2, dtype=torch.bfloat16)
    return native_unsupported(x, x, x)


needs_native = pytest.mark.skipif(_native_reason() is not None, reason=f"native attention: {_native_reason()}")


def qkv(B, N, M, H, D, seed, dtype=torch.bfloat16):
    """q, k, v in the projections' layout: views of (B, tokens, H * D), head dim contiguous."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, H * D, generator=g).to(dtype).view(B, n, H, D) for n in (N, M, M))
    return q, k, v


def reference(q, k, v) -> torch.Tensor:
    """fp64 attention in (B, N, H, D)."""
    return F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    for name, (native, sdpa) in sorted(ERRORS.items()):
        print(f"\nattention {name}: native max rel err {native:.2e} (bf16 SDPA {sdpa:.2e})")


# SD1.5's shapes at small token counts (heads of 40, 80, 160; cross-attention over 77 text tokens), the
# tiny model's, and odd sizes: tokens not a multiple of the 48-row tile, 16-key blocks or key pairs.
SHAPES = [
    (2, 256, 256, 8, 40), (2, 256, 77, 8, 40), (2, 64, 64, 8, 80), (1, 16, 77, 8, 160),
    (2, 64, 64, 1, 512), (2, 16, 16, 4, 8), (1, 37, 13, 3, 6), (1, 49, 31, 2, 2), (3, 1, 1, 1, 18),
]


@needs_native
@pytest.mark.parametrize("B, N, M, H, D", SHAPES)
def test_native_matches_fp64_within_bf16_error(B, N, M, H, D):
    q, k, v = qkv(B, N, M, H, D, seed=N * 1000 + M)
    out = torch.full((B, N, H, D), float("nan"), dtype=torch.bfloat16)
    attention_native(q, k, v, out=out)
    assert torch.isfinite(out).all(), "some outputs were not written (NaN poison survived)"
    ref = reference(q, k, v)
    scale = ref.abs().max().item()
    native = (out.double() - ref).abs().max().item() / scale
    sdpa = (attention(q, k, v, impl="torch").double() - ref).abs().max().item() / scale
    ERRORS[f"{(B, N, M, H, D)}"] = (native, sdpa)
    assert native <= max(1.5 * sdpa, 1e-3) and native < 1.5e-2, f"native {native:.2e} vs bf16 SDPA {sdpa:.2e}"


@needs_native
def test_native_takes_strided_views_and_leaves_other_heads_alone():
    """q from a fused projection (a slice of a wider row) and an output view inside a larger buffer."""
    B, N, H, D = 2, 40, 4, 16
    g = torch.Generator().manual_seed(7)
    qkv_rows = torch.randn(B, N, 3 * H * D, generator=g).to(torch.bfloat16)
    q, k, v = (qkv_rows[..., i * H * D:(i + 1) * H * D].view(B, N, H, D) for i in range(3))
    buffer = torch.full((B, N, H, 2 * D), float("nan"), dtype=torch.bfloat16)
    attention_native(q, k, v, out=buffer[..., :D])
    assert torch.isnan(buffer[..., D:]).all(), "the kernel wrote outside its output view"
    rel = (buffer[..., :D].double() - reference(q, k, v)).abs().max().item() / reference(q, k, v).abs().max().item()
    assert rel < 1.5e-2


@needs_native
def test_default_picks_native_for_bf16_where_it_pays():
    """Ours on AVX512-BF16 without AMX; torch's SDPA on AMX, where ours loses."""
    from engine.optimizations import cpu_isa
    from kernels.attention import DEFAULT_NATIVE_ISAS

    q, k, v = qkv(1, 24, 24, 2, 8, seed=3)
    want = "native" if cpu_isa() in DEFAULT_NATIVE_ISAS else "torch"
    assert torch.equal(attention(q, k, v), attention(q, k, v, impl=want))


def test_fp32_and_disabled_native_fall_back_to_sdpa(monkeypatch):
    q, k, v = qkv(2, 24, 10, 2, 8, seed=4, dtype=torch.float32)
    got = attention(q, k, v)
    assert got.is_contiguous() and got.shape == (2, 24, 2, 8)
    assert torch.allclose(got.double(), reference(q, k, v), atol=1e-6)
    monkeypatch.setenv("ENGINE_DISABLE_NATIVE", "1")
    qb, kb, vb = qkv(1, 8, 8, 2, 8, seed=5)
    assert native_unsupported(qb, kb, vb) == "ENGINE_DISABLE_NATIVE is set"
    assert torch.equal(attention(qb, kb, vb), attention(qb, kb, vb, impl="torch"))


def test_bad_inputs_are_clear_errors():
    q, k, v = qkv(1, 8, 8, 2, 8, seed=6, dtype=torch.float32)
    with pytest.raises(ValueError, match="native attention cannot run: .*"):
        attention_native(q, k, v)
    with pytest.raises(ValueError, match="impl must be one of native, torch or None, got 'flash'"):
        attention(q, k, v, impl="flash")
    qb, kb, vb = qkv(1, 8, 8, 2, 7, seed=6)
    if _native_reason() is None:
        assert native_unsupported(qb, kb, vb) == "the head dim must be even (bf16 pairs); got 7"
        with pytest.raises(ValueError, match="out must be"):
            attention_native(*qkv(1, 8, 8, 2, 8, seed=6), out=torch.empty(1, 8, 2, 6, dtype=torch.bfloat16))

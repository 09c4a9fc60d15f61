"""The compiled step traces with 0 graph breaks when its kernels take their CUDA branches (Triton for the
fused zero convs and GroupNorm+SiLU), shown on the CPU with torch._dynamo.explain: the backend resolves
the kernel implementations as on a CUDA device with Triton. What runs inside the custom ops is opaque
to dynamo, so on the CPU their bodies run torch's path (the interpreted Triton kernels would add a
minute and prove nothing about tracing). On a GPU machine the same test runs on CUDA, Triton and all.
Tiny model, 32² (a 4x4 latent)."""
from __future__ import annotations

import pytest
import torch

from engine import Runner
from engine.cuda_graphs import step_key
from engine.optimizations import with_switches
from kernels import groupnorm_silu, zero_conv

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(HAS_CUDA and not zero_conv.importlib.util.find_spec("triton"), reason="triton is not installed")
def test_step_has_no_graph_breaks_with_the_cuda_kernel_choices(monkeypatch):
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if not HAS_CUDA:  # force the CUDA branches of the once-per-backend choice
        real = zero_conv._resolve
        monkeypatch.setattr(zero_conv, "_resolve", lambda impl, dev, dtype: real(impl, torch.device("cuda"), dtype))
        monkeypatch.setattr(groupnorm_silu, "choose_impl", lambda dev: "triton")
        run_zero_conv, run_gn = zero_conv._run, groupnorm_silu._run  # the ops' bodies: torch's path
        monkeypatch.setattr(zero_conv, "_run", lambda impl, *args: run_zero_conv("torch", *args))
        monkeypatch.setattr(groupnorm_silu, "_run", lambda impl, *args: run_gn("torch", *args))
    monkeypatch.setattr(zero_conv, "triton_available", lambda: True)
    opts = with_switches("fast", cuda_graphs=False)  # every switch the compile row stacks on
    runner = Runner(model="tiny", controlnet="canny", device=device, dtype=torch.float32, optimizations=opts)
    backend = runner.backend
    assert backend.zero_conv_impl == "triton"
    assert backend.unet_model.unet.down_blocks[0].resnets[0].norm1.kernel_impl == "triton"
    with torch.inference_mode():
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(2, 4, 4, 4, generator=g).to(device)
        cond = runner.family.encode_prompts(backend, ["", "a photo"])
        hint = backend.encode_hint(0, torch.rand(2, 3, 32, 32, generator=g).to(device))
        scales = torch.ones(runner.num_residuals, device=device)
        t = torch.tensor(500, device=device)
        key = step_key([0], sample, sample, torch.float32)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(backend.step_fn)(key, sample, t, cond, sample, [cond], [hint], [scales])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = {str(node.target) for gm in explanation.graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("fused_zero_conv_add" in op for op in ops) and any("group_norm_silu" in op for op in ops)

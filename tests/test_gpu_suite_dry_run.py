"""The GPU suite's whole flow runs on the CPU (--dry-run), so it cannot rot between GPU sessions."""
from __future__ import annotations

import json

import torch

from engine.optimizations import ABLATION


def test_dry_run_writes_json_and_table(tmp_path):
    from benchmarks import gpu_suite

    results = gpu_suite.main(["--dry-run", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    assert written["config"]["dry_run"] and written["config"]["preset"] == "tiny"
    assert [t["passed"] for t in written["tests"]] == [True], written["tests"]
    rows = {r["path"]: r for r in written["benchmark"]["rows"]}
    # The baseline and the reference always run; later rows may be skipped by the time budget on a
    # loaded CPU, and then say so.
    assert {"diffusers eager (SDPA)", "reference"} <= set(rows)
    ref = rows["reference"]
    assert ref["it_per_s"] > 0 and ref["switches"]["fused_zero_conv"] is False
    assert ref["psnr_vs_fp32_db"] >= gpu_suite.MIN_PSNR_DB  # fp32 vs fp32 here: identical
    skipped = {s["path"]: s["why"] for s in written["benchmark"]["skipped"]}
    # Every ablation step (reference + one per switch) ran or says why not; so does the kernel section.
    assert len(rows) - 1 + len(skipped) == 1 + len(ABLATION) + 1
    if not torch.cuda.is_available():
        assert skipped["+cuda_graphs"] == "needs CUDA" and skipped["kernel GB/s"] == "needs CUDA"
    assert "| path | it/s | ms/step |" in table and "| reference |" in table
    assert results["seconds"] < 60

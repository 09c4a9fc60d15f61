"""The GPU suite's whole flow runs on the CPU (--dry-run), so it cannot rot between GPU sessions: results
are written after every row, a failing row is recorded beside the others and fails the exit code, and
rows past the deadline are recorded as skipped with the reason."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import gpu_suite
from engine.optimizations import ABLATION

FORCED = "+channels_last"


@pytest.fixture(scope="module")
def forced_failure_run(tmp_path_factory):
    """One dry run with FORCED made to raise; every write of results.json is kept."""
    out = tmp_path_factory.mktemp("suite")
    writes = []
    real = gpu_suite.write_atomic

    def recording(path, text):
        real(path, text)
        if path.name == "results.json":
            writes.append(json.loads(text))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_suite, "write_atomic", recording)
        mp.setenv(gpu_suite.FAIL_ROW_VARIABLE, FORCED)
        code = gpu_suite.main(["--dry-run", "--out", str(out)])
    return code, out, writes


def test_dry_run_records_every_row_and_the_forced_failure(forced_failure_run):
    code, out, writes = forced_failure_run
    written = json.loads((out / "results.json").read_text())
    assert code == 1 and written["exit_code"] == 1
    assert written["config"]["dry_run"] and written["config"]["preset"] == "tiny"
    rows = {r["name"]: r for r in written["rows"]}
    assert rows[FORCED]["status"] == "error" and "forced failure" in rows[FORCED]["error"]
    # Every ablation step (reference + one per switch), the baseline, the kernels, TensorRT and the tests
    # ran or say why not.
    expected = {"matmul rate", "fp32 reference", "diffusers eager (SDPA)", "reference", "kernel GB/s",
                "tensorrt tiny fp16"} | {f"+{n}" if v is True else f"+{n}={v}" for n, v in ABLATION}
    assert expected <= set(rows) and any(name.startswith("tests ") for name in rows)
    for name, row in rows.items():
        assert row["status"] in ("ok", "skipped", "error"), (name, row)
        if row["status"] == "skipped":
            assert row["why"], name
    assert rows["+cuda_graphs"]["why"].startswith("needs CUDA") and rows["kernel GB/s"]["why"].startswith("needs CUDA")
    assert rows["tensorrt tiny fp16"]["status"] == "skipped" and "TensorRT cannot run here" in rows["tensorrt tiny fp16"]["why"]
    ref = rows["reference"]
    assert ref["status"] == "ok" and ref["it_per_s"] > 0 and ref["switches"]["fused_zero_conv"] is False
    assert math.isinf(ref["psnr_vs_fp32_db"])  # fp32 vs fp32 here: identical
    assert rows["+groupnorm_silu"]["status"] == "ok"  # rows after the failed one still ran
    assert rows["tests tests/test_groupnorm_silu.py"]["status"] == "ok", rows["tests tests/test_groupnorm_silu.py"]
    # Written after every row: each row appears first as "running" (or skipped), then with its result.
    finished = [sum(r["status"] != "running" for r in w["rows"]) for w in writes]
    assert finished == sorted(finished) and finished[-1] == len(rows)
    assert len(writes) >= 2 * sum(r["status"] != "skipped" for r in rows.values())
    table = (out / "results.md").read_text()
    assert "| row | status | it/s |" in table and f"| {FORCED} | error |" in table
    assert "forced failure" in (out / "suite.log").read_text()


def test_rows_past_the_deadline_are_skipped_with_the_reason(tmp_path):
    code = gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--deadline-s", "1"])
    written = json.loads((tmp_path / "results.json").read_text())
    assert code == 0 and written["rows"]
    assert all(r["status"] == "skipped" for r in written["rows"])
    assert all("of the 1 s deadline were gone" in r["why"] or r["why"] for r in written["rows"])
    assert "of the 1 s deadline were gone" in written["rows"][0]["why"]


def test_nan_and_low_psnr_fail_a_row():
    from benchmarks.gpu_rows import psnr, quality

    assert math.isnan(psnr([[float("nan")]], [[0.5]]))
    assert quality(psnr([[float("nan")]], [[0.5]]))["status"] == "failed"
    assert quality(psnr([[0.5]], [[0.51]])) == {}  # 40 dB
    assert "< 35 dB" in quality(psnr([[0.5]], [[0.6]]))["why"]  # 20 dB


def test_failed_preflight_writes_the_reason_and_stops(tmp_path):
    """The real (non-dry) flow on a machine without CUDA: the preflight says so in results.json, exit 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine passes this preflight")
    code = gpu_suite.main(["--out", str(tmp_path), "--wheels", str(tmp_path / "no-wheels")])
    written = json.loads((tmp_path / "results.json").read_text())
    assert code == 2 and written["exit_code"] == 2 and written["rows"] == []
    assert "torch sees no CUDA device" in written["preflight_error"]
    assert "no wheels" in written["wheels"]["note"]

"""The pipeline benchmark keeps what it measured: each row goes to the result file as it finishes, with its
peak RSS, so a run killed midway (the sd15 run was OOM-killed at its 17th row and wrote nothing, issue #22)
keeps its finished rows; benchmarks/report.py shows the peak beside each row."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.conftest import REPO

KILLER = '''
import os
import signal

import pytest

calls = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    calls.append(item.nodeid)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no session end, no final write
'''


def test_a_killed_run_keeps_its_finished_rows(tmp_path):
    from benchmarks.report import table

    (tmp_path / "kill_second_row.py").write_text(KILLER)
    out = tmp_path / "cpu-tiny-killed.json"
    # Not an xdist worker's environment: pytest-benchmark turns itself off where it sees xdist (the README's
    # `-n auto` runs this test in a worker), and nothing would be measured or written.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    # One kernel row (the hooks are benchmarks/conftest.py's, the same for every row; this one is cheap),
    # then the next row is killed as it starts.
    cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_kernels.py", "--benchmark", "-k", "test_cpu_point",
           "--benchmark-json", str(out), "-p", "kill_second_row", "-p", "no:cacheprovider", "-p", "no:xdist", "-q"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["benchmarks"]
    assert [r["name"] for r in rows] == ["test_cpu_point[320x64x64-torch_unfused]"]
    assert 0.1 < rows[0]["extra_info"]["peak_rss_gb"] < 24
    assert "| peak RSS GB (+ over its start) |" in table(out) and "Peak RSS of the benchmark process over all rows" in table(out)


def test_a_released_compiled_step_frees_its_frozen_weights():
    """benchmarks/bench_pipeline.forget_compiled_code frees a frozen step's weights: torch._dynamo.reset()
    alone left them in inductor's generated module (kept by PyCodeCache and sys.modules), ~6 GB held
    through every later row of the sd15 run (issue #22)."""
    import gc
    import weakref

    import torch

    from benchmarks.bench_pipeline import forget_compiled_code
    from engine.compile import compile_step

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    net.requires_grad_(False)
    step = compile_step(lambda x: net(x), freeze_weights=True)
    with torch.inference_mode():
        step(torch.randn(2, 16))
    weights = [weakref.ref(p) for p in net.parameters()]
    del net, step
    gc.collect()
    assert any(w() is not None for w in weights), "the frozen step no longer holds its weights: test is moot"
    forget_compiled_code()
    gc.collect()
    assert all(w() is None for w in weights)

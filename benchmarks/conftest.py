"""`pytest benchmarks/ --benchmark [--size tiny|sd15|sdxl] [--resolution N] [--steps N] [--backends a,b]`.

Without --benchmark every benchmark runs once, untimed, as a smoke check (CI keeps them working). With
it, pytest-benchmark times them (several rounds, medians) and writes JSON to benchmarks/results/, from
which `python -m benchmarks.report` rebuilds benchmarks/README.md and its plot.

The JSON is rewritten after every row (as benchmarks/gpu_suite.py writes its results), not only when the
session ends: an sd15 run killed by the OOM killer at its 17th row had written nothing (issue #22). Each
row records `peak_rss_gb`, the process's peak resident memory from the start of the row's setup (its
fixtures: models loaded for it) to the end of its timed call (Linux: the peak is reset through
/proc/self/clear_refs before each row).
"""
from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

RESULTS = Path(__file__).parent / "results"
# --size -> engine model preset. "tiny-sdxl" runs the sdxl size's code paths in seconds (a smoke check).
SIZES = {"tiny": "tiny", "tiny-sdxl": "tiny-sdxl", "sd15": "sd15-random", "sdxl": "sdxl-random"}
DEFAULTS = {"tiny": dict(resolution=64, steps=4), "tiny-sdxl": dict(resolution=64, steps=4),
            "sd15": dict(resolution=256, steps=4), "sdxl": dict(resolution=512, steps=4)}


def pytest_addoption(parser):
    group = parser.getgroup("engine benchmarks")
    group.addoption("--benchmark", action="store_true", help="time the benchmarks for real and write JSON")
    group.addoption("--size", choices=sorted(SIZES), default="tiny", help="model size: tiny, tiny-sdxl, sd15 = full "
                    "SD1.5 architecture with random weights, or sdxl = full SDXL base architecture with random "
                    "weights and the -small SDXL ControlNet (bench_pipeline.py only)")
    group.addoption("--resolution", type=int, default=None, help="image side in pixels (tiny 64, sd15 256, sdxl 512)")
    group.addoption("--steps", type=int, default=None, help="denoising steps for end-to-end runs (default 4)")
    group.addoption("--backends", default="torch,onnxruntime,openvino",
                    help="comma-separated engine backends to measure besides diffusers (torch, onnxruntime, "
                         "openvino, tensorrt)")


def pytest_configure(config):
    if not config.getoption("--benchmark", default=False):
        config.option.benchmark_disable = True  # one untimed call per benchmark
        return
    if not config.getoption("benchmark_json", default=None):
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        config.option.benchmark_json = RESULTS / f"cpu-{config.getoption('--size')}-{stamp}.json"


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux; elsewhere the peak stays the process's own)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_gb(field: str = "VmHWM") -> float | None:
    """This process's resident memory (GB): VmHWM its peak since the last reset_peak_rss, VmRSS now; None
    where unreadable."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 / 1e9 if found else None


START_RSS = pytest.StashKey[float]()  # the resident memory a row started from
ROW = pytest.StashKey[pytest.Item]()  # the row being set up or run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.config.stash[ROW] = item
    restart_row_memory(item.config)  # before the row's fixtures are made: what it loads counts as its own
    yield


def restart_row_memory(config) -> None:
    """Start the current row's memory window now. Also called by a fixture that has just released what an
    earlier row held (bench_pipeline's `backend`: pytest tears the previous backend down inside the next
    row's setup), so the row starts from what is really held, not from what is about to be freed."""
    reset_peak_rss()
    config.stash[ROW].stash[START_RSS] = rss_gb("VmRSS")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is None or not hasattr(bench, "extra_info"):
        return
    # The start says what earlier rows left behind; peak minus start is what this row itself added.
    bench.extra_info.update(peak_rss_gb=rss_gb(), start_rss_gb=item.stash.get(START_RSS, None))
    if outcome.excinfo is None:
        write_results_so_far(item.config)


RUN_INFO = pytest.StashKey[tuple]()  # (machine info, commit info) of this run


def write_results_so_far(config) -> None:
    """pytest-benchmark's JSON of the rows finished so far, written atomically where the session will write
    its final one, so a run killed midway keeps every finished row."""
    from pytest_benchmark.utils import safe_dumps

    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.json or not session.benchmarks:
        return
    if RUN_INFO not in config.stash:  # py-cpuinfo and git, once per run
        commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
        config.hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
        config.stash[RUN_INFO] = (session.get_machine_info(), commit_info)
    machine_info, commit_info = config.stash[RUN_INFO]
    output = config.hook.pytest_benchmark_generate_json(config=config, benchmarks=session.benchmarks,
                                                        include_data=True, machine_info=machine_info,
                                                        commit_info=commit_info)
    config.hook.pytest_benchmark_update_json(config=config, benchmarks=session.benchmarks, output_json=output)
    path = Path(session.json)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(safe_dumps(output, ensure_ascii=True, indent=4))
    os.replace(tmp, path)


@dataclass(frozen=True)
class BenchConfig:
    real: bool  # --benchmark given: timed rounds; else one smoke call
    size: str
    preset: str
    resolution: int
    steps: int
    backends: tuple[str, ...]


@pytest.fixture(scope="session")
def bench_config(request) -> BenchConfig:
    opt = request.config.getoption
    size = opt("--size")
    resolution = opt("--resolution") or DEFAULTS[size]["resolution"]
    if resolution % 64:
        raise pytest.UsageError(f"--resolution must be a multiple of 64, got {resolution}")
    steps = opt("--steps") or DEFAULTS[size]["steps"]
    backends = tuple(b.strip() for b in opt("--backends").split(",") if b.strip())
    return BenchConfig(opt("--benchmark"), size, SIZES[size], resolution, steps, backends)


def measure_matmul_rate(dtype_name: str = "float32") -> float:
    """Matrix-multiply FLOP/s in this dtype, measured now: the practical ceiling the floor is taken at.

    The best of at least 5 calls and 1 s of them: on this shared 2-core VM a best of 5 alone ranged over
    384-426 GFLOP/s in bf16 between runs, moving every row's "x floor" by 10%."""
    import torch

    n = 2048
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best, calls, began = float("inf"), 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - began < 1.0:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        calls += 1
    return 2 * n**3 / best


@pytest.fixture(scope="session")
def matmul_rate() -> float:
    """fp32 matrix-multiply FLOP/s measured in this run."""
    return measure_matmul_rate("float32")


@pytest.fixture(scope="session")
def matmul_rate_bf16() -> float:
    """bf16 matrix-multiply FLOP/s measured in this run: the floor of the bf16 rows."""
    return measure_matmul_rate("bfloat16")


@pytest.fixture(scope="session")
def machine_info() -> dict:
    import torch

    from engine.optimizations import cpu_description

    return dict(
        cpu=cpu_description(),  # brand, family and model, instruction-set class: the CPU each default is for
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


@pytest.fixture(scope="session")
def built_engine_dir(bench_config, tmp_path_factory):
    """(engine dir, what its build cost), built once per run for every bench module that runs graphs: a
    full-size build takes minutes (benchmarks/bench_pipeline.build_engine_dir)."""
    from benchmarks.bench_pipeline import build_engine_dir

    return build_engine_dir(bench_config, tmp_path_factory)

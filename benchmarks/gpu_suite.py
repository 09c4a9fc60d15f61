"""The one-call GPU suite: benchmark every engine path against diffusers, then run the GPU tests.

One 10-minute command on the GPU machine brings back every figure, or says per row why not: results.json
(and results.md, suite.log) are rewritten after every row, each row's error is caught into that row,
and no row starts once `--deadline-s` (default 480 s) is near; a row still running at the hard stop
(deadline + 60 s) is interrupted and recorded. Exit code 0 when every row that ran passed, 1 when a row
failed or raised, 2 when the preflight failed (nothing else ran).

## Running it (device tool, kind nvidia-h200)

Once, here, in the repository root: the one wheel the GPU image lacks, into the ignored folder .whl

    echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl diffusers==0.42.1

then run(command="PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --wheels .whl --out $OUT",
carry=[".whl"], timeout_s=600), and commit what comes back from $OUT under benchmarks/results/gpu-<date>/.

What the image has (KINDS.md, read 2026-11): Python 3.12, torch 2.11 + CUDA 13, triton 3.6,
transformers 5.17, onnx 1.23.1, onnxruntime 1.30 (CPU), onnxscript, huggingface_hub 1.33,
safetensors 0.8, opencv, pytest, pybind11, cmake, ninja and nvcc 13. So:
- diffusers 0.42.1 (pure Python, 6.4 MB) is carried; its needs (hub >= 1.32, safetensors >= 0.8, regex,
  requests, Pillow, numpy, filelock) are all there.
- transformers is NOT carried: the engine uses only CLIPTextModel, CLIPTextConfig and CLIPTokenizer,
  the same in 5.17 as in the pinned 5.24 (the preflight builds the tiny tokenizer and a CLIP text model
  to show it). Carrying 5.24 would also need a newer regex than the image may have (5.24 checks
  `regex>=2025.10.22` at import).
- tensorrt, onnxruntime-gpu: not carried. TensorRT's wheels download from NVIDIA's index, which is
  unreachable from here (FACTS.md); onnxruntime-gpu is 256 MB, over the 64 MiB a call carries. The
  TensorRT row is recorded as skipped with the reason when `import tensorrt` fails.

## Estimated device time of one run (H200; SD1.5 architecture, random weights, 512², 20 UniPC steps)

    machine start and transfers (outside the command)              60-120 s
    wheel install, imports, preflight                                  20 s
    native CUDA build (cmake + nvcc, 4 jobs)              60 s, in the background under the rows below
    matmul rate, random SD1.5 models built, fp32 reference (TF32 off)  35 s
    diffusers eager fp16                                                8 s
    ablation, 6 eager rows (model copies, warm-up, 2 timed runs each)  45 s
    +cuda_graphs                                                       10 s
    kernel GB/s (13 points and GroupNorm+SiLU, in CUDA graphs)         10 s
    TensorRT tiny build + generate                       0 s today (skipped: no tensorrt), else ~60 s
    SDXL (sdxl-random, -small ControlNet, 1024², fp16): flops, fp32 reference,
      diffusers, engine eager, +cuda_graphs                        ~130 s
    +compile (inductor, the whole step; rows before it end at ~130 s) 150 s
    tests, one pytest per file, one kernel config (timeouts 30-90 s)  145 s
    total inside the command                                ~555 s, deadline 480 s, hard stop 540 s

With the SDXL rows (before the compile row, so they are measured on the first try) the estimate passes the
deadline: on a machine as fast as estimated the compile row still runs and the last test files
(test_optimizations, test_compile_graph_breaks, the TensorRT fakes; all also run on the CPU) are recorded
as not started, with the time. `--no-sdxl` gives the SD1.5-only plan back.

Rows start only when their own estimate fits before the deadline, so a slow machine loses the last
rows (recorded as skipped, with the time), never the file.

`--dry-run` runs the same rows on the CPU in well under a minute: the tiny model, 2 steps, 32², fp32,
no wheels, no native build, a quick slice of the tests; GPU-only rows are skipped with the reason.
tests/test_gpu_suite_dry_run.py runs it, with a forced row failure (ENGINE_GPU_SUITE_FAIL_ROW=<row>)
and with `--deadline-s 1`, so it cannot rot.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from benchmarks import gpu_rows as rows

REPO = Path(__file__).resolve().parents[1]
FAIL_ROW_VARIABLE = "ENGINE_GPU_SUITE_FAIL_ROW"  # a row name: that row raises (tests of this file)
HARD_STOP_GRACE_S = 60  # a row running at the deadline may finish within this, then is interrupted
# The GPU tests, one pytest process per file, after the benchmark rows (each file's Triton compiles
# would otherwise eat the benchmarks' time). test_optimizations.py's compile test is left to the
# compile row (the same check): compiling twice takes minutes of the 10.
# (file, extra pytest arguments, typical seconds there: a row starts only if that fits, timeout seconds)
GPU_TESTS = [
    ("tests/test_kernels.py", [], 25, 60),
    ("tests/test_groupnorm_silu.py", [], 15, 40),
    ("tests/test_fused_path.py", [], 20, 40),
    ("tests/test_optimizations.py", ["-k", "not compile"], 40, 90),
    ("tests/test_compile_graph_breaks.py", [], 25, 60),
    ("tests/test_kernels_native.py", [], 10, 30),
    ("tests/test_trt_logic.py", ["tests/test_trt_versions.py"], 10, 30),
]
DRY_TESTS = [("tests/test_groupnorm_silu.py", ["-k", "test_fp32 and torch and centred"], 1, 40)]


@dataclass(frozen=True)
class SuiteConfig:
    dry_run: bool
    preset: str  # engine model preset
    resolution: int
    steps: int
    runs: int  # timed generations per row (the best is reported)
    warmup: bool  # one untimed generation first (captures, compiles, autotunes)
    deadline_s: float  # no row starts whose estimate would end after this
    compile: bool
    tests: bool
    sdxl_preset: str | None = "sdxl-random"  # the SDXL rows' model preset; None: no SDXL rows
    sdxl_resolution: int = 1024


def suite_config(args) -> SuiteConfig:
    if args.dry_run:
        # 32²: a 4x4 latent, the smallest the tiny UNet's three downsamplers take; no warm-up (nothing to
        # capture or compile on the CPU), so each row is one 2-step generation.
        return SuiteConfig(True, "tiny", 32, 2, 1, False, args.deadline_s, False, not args.skip_tests,
                           None if args.no_sdxl else "tiny-sdxl", 32)
    return SuiteConfig(False, "sd15-random", args.resolution, args.steps, 2, True, args.deadline_s, not args.no_compile,
                       not args.skip_tests, None if args.no_sdxl else "sdxl-random", args.sdxl_resolution)


@dataclass
class Row:
    name: str
    run: Callable[[], dict]
    estimate_s: float  # GPU seconds it needs; in a dry run every row is given 1 s
    skip: str | None = None  # why it cannot run here at all


class RowTimeout(Exception):
    """Raised in the running row at the hard stop (SIGALRM)."""


@contextmanager
def hard_stop(seconds: float):
    """Interrupt the running row after `seconds` (main thread only; elsewhere the deadline alone holds)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def interrupt(signum, frame):
        raise RowTimeout(f"interrupted at the hard stop, {seconds:.0f} s after it started")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Suite:
    """The results, written to out_dir after every change; rows run in order against the deadline."""

    def __init__(self, cfg: SuiteConfig, out_dir: Path, started: float):
        self.cfg, self.out_dir, self.started = cfg, out_dir, started
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = out_dir / "suite.log"
        self.log_file.write_text("")
        self.results = dict(date=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", config=asdict(cfg), rows=[])

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {message}"
        print(line, flush=True)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        self.results["seconds"] = self.elapsed()
        write_atomic(self.out_dir / "results.json", json.dumps(self.results, indent=2, default=str))
        write_atomic(self.out_dir / "results.md", markdown(self.results))

    def run(self, row: Row) -> dict:
        entry = dict(name=row.name, status="running", started_s=round(self.elapsed(), 1))
        self.results["rows"].append(entry)
        left = self.cfg.deadline_s - self.elapsed()
        estimate = 1.0 if self.cfg.dry_run else row.estimate_s
        if row.skip or estimate > left:
            why = row.skip or (f"not started: {self.elapsed():.0f} s of the {self.cfg.deadline_s:.0f} s deadline "
                               f"were gone and it needs ~{estimate:.0f} s")
            entry.update(status="skipped", why=why)
            self.log(f"{row.name}: skipped ({why})")
            self.save()
            return entry
        self.save()  # "running": a row killed from outside is still named
        start = time.perf_counter()
        try:
            with hard_stop(left + HARD_STOP_GRACE_S):
                if os.environ.get(FAIL_ROW_VARIABLE) == row.name:
                    raise RuntimeError(f"forced failure ({FAIL_ROW_VARIABLE}={row.name})")
                entry.update(row.run() or {})
            entry["status"] = entry["status"] if entry["status"] != "running" else "ok"
        except (Exception, RowTimeout) as err:
            entry.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.log(f"{row.name}: {entry['status']}" + (f" ({entry.get('why') or entry.get('error')})"
                                                     if entry["status"] != "ok" else "") + f", {entry['seconds']:.1f} s")
        self.save()
        return entry


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- wheels and preflight --------------------------------------------------------------------------------


def install_wheels(folder: Path, target: str = "/tmp/site") -> dict:
    """pip-install every wheel in folder into target (no index, no deps) and put target on the path."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return {"installed": [], "note": f"no wheels in {str(folder)!r}: using what is installed"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", target, *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip install of {[w.name for w in wheels]} failed: {(done.stdout + done.stderr)[-2000:]}")
    sys.path.insert(0, target)
    os.environ["PYTHONPATH"] = target + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {"installed": [w.name for w in wheels], "target": target}


def preflight(cfg: SuiteConfig) -> dict:
    """What every later row needs, checked in seconds: the carried diffusers and the image's transformers
    import, the tiny tokenizer and a CLIP text model run, CUDA is there, Triton has a driver."""
    import diffusers
    import torch
    import transformers
    from diffusers.utils import logging as diffusers_logging

    from engine.backends import tensorrt_usable
    from engine.tiny import tiny_text_encoder, tiny_tokenizer

    diffusers_logging.set_verbosity_error()  # the per-copy "kept in float32: []" notices of .to(fp16)
    ids = tiny_tokenizer()(["an astronaut"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        tiny_text_encoder()(ids)
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                diffusers=diffusers.__version__, transformers=transformers.__version__,
                tensorrt=tensorrt_usable()[1], cpu=platform.processor() or platform.machine())
    if cfg.dry_run:
        return dict(info, device="cpu (dry run)", triton="not checked (dry run)")
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    import triton

    target = triton.runtime.driver.active.get_current_target()
    return dict(info, device=torch.cuda.get_device_name(0), triton=f"{triton.__version__}, target {target}")


# ---- the rows, in order ----------------------------------------------------------------------------------


def benchmark_rows(cfg: SuiteConfig, state: dict) -> list[Row]:
    from engine.optimizations import cumulative

    def bind(fn):
        return lambda: fn(cfg, state)

    out = [Row("matmul rate", bind(rows.matmul_row), 5), Row("fp32 reference", bind(rows.reference_row), 35),
           Row("diffusers eager (SDPA)", bind(rows.diffusers_row), 10)]
    gpu_only = None if not cfg.dry_run else "needs CUDA (dry run on the CPU)"
    for name, opts in cumulative():
        skip = gpu_only if (opts.cuda_graphs or opts.compile) else None
        if opts.compile and not cfg.compile and not skip:
            skip = "--no-compile" if not cfg.dry_run else "dry run"
        estimate = 150 if opts.compile else 12 if opts.cuda_graphs else 8
        out.append(Row(name, bind(rows.engine_row(opts)), estimate, skip))
        if name == "+cuda_graphs":  # the compile row goes last: the longest, and the one most likely to be cut
            out.append(Row("kernel GB/s", bind(rows.kernels_row), 10, gpu_only))
            out.append(Row("tensorrt tiny fp16", bind(rows.tensorrt_row), 60))
            out += sdxl_rows(cfg) if cfg.sdxl_preset else []
    return out


def sdxl_rows(cfg: SuiteConfig) -> list[Row]:
    """The same measurements on SDXL (sdxl_preset at sdxl_resolution, the -small SDXL ControlNet), in state of
    their own: the fp32 reference, diffusers' SDXL pipeline in fp16, the engine with every eager switch, and
    with CUDA graphs on top. Before the compile row, so a lent GPU measures them on the first try."""
    import dataclasses

    from engine.optimizations import cumulative

    sdxl_cfg, state = dataclasses.replace(cfg, preset=cfg.sdxl_preset, resolution=cfg.sdxl_resolution), {}

    def bind(fn):
        return lambda: fn(sdxl_cfg, state)

    steps = dict(cumulative())
    eager = [name for name, opts in steps.items() if not (opts.cuda_graphs or opts.compile)][-1]
    gpu_only = None if not cfg.dry_run else "needs CUDA (dry run on the CPU)"
    # Estimates (H100/H200, 1024², 20 steps): the random fp32 models built on the CPU (~3.5 B parameters)
    # dominate the reference row.
    return [Row("sdxl matmul rate", bind(rows.matmul_row), 5),
            Row("sdxl fp32 reference", bind(rows.reference_row), 60),
            Row("sdxl diffusers eager (SDPA)", bind(rows.diffusers_row), 20),
            Row(f"sdxl {eager}", bind(rows.engine_row(steps[eager])), 20),
            Row("sdxl +cuda_graphs", bind(rows.engine_row(steps["+cuda_graphs"])), 25, gpu_only)]


def test_rows(cfg: SuiteConfig, native) -> list[Row]:
    env = dict(os.environ, ENGINE_TRITON_FIXED_CONFIG="1", PYTHONUNBUFFERED="1")
    out = []
    if not cfg.dry_run:
        out.append(Row("native CUDA build", lambda: native.row(timeout_s=60), 5))
    for path, extra, estimate, cap in (DRY_TESTS if cfg.dry_run else GPU_TESTS):
        out.append(Row(f"tests {path}", lambda p=path, e=extra, c=cap: rows.run_tests([p, *e], c, env), estimate,
                       None if cfg.tests else "--skip-tests"))
    return out


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"# GPU suite, {results['date']}", "", f"{env.get('device', '?')}; torch {env.get('torch', '?')}, diffusers "
             f"{env.get('diffusers', '?')}, transformers {env.get('transformers', '?')}, triton {env.get('triton', '?')}. "
             f"Model {results['config']['preset']}, {results['config']['resolution']}², batch 1, CFG, "
             f"{results['config']['steps']} UniPC steps, ControlNet canny.", "",
             "| row | status | it/s | ms/step | x diffusers | x floor | PSNR vs fp32 (dB) | s | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def num(row, key, fmt):
        value = row.get(key)
        return "" if value is None else ("NaN" if isinstance(value, float) and math.isnan(value) else format(value, fmt))

    for r in results["rows"]:
        note = r.get("why") or r.get("error") or r.get("summary") or ""
        lines.append(f"| {r['name']} | {r['status']} | {num(r, 'it_per_s', '.2f')} | {num(r, 'ms_per_step', '.2f')} | "
                     f"{num(r, 'x_diffusers', '.2f')} | {num(r, 'x_floor', '.2f')} | {num(r, 'psnr_vs_fp32_db', '.1f')} | "
                     f"{num(r, 'seconds', '.1f')} | {str(note).splitlines()[0][:160] if note else ''} |")
    for r in results["rows"]:
        for k in r.get("kernels", []):
            lines.append(f"| kernel {k['kernel']} {k['impl']} | {k['us']:.1f} µs, {k['GBps']:.0f} GB/s ({k['timed']}) | | | | | | | |")
    lines += ["", f"Whole suite: {results.get('seconds', 0):.0f} s; exit code {results.get('exit_code', '?')}."]
    return "\n".join(lines) + "\n"


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return REPO / "benchmarks" / "results" / f"gpu-{datetime.now(timezone.utc):%Y%m%d-%H%M}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else benchmarks/results/gpu-<date>/)")
    parser.add_argument("--wheels", type=Path, default=Path(".whl"), help="folder of wheels to install first (default .whl)")
    parser.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU, tiny model, 2 steps, fp32")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--deadline-s", type=float, default=480.0,
                        help="start no row whose estimate ends after this many seconds (default 480, for a 600 s command)")
    parser.add_argument("--sdxl-resolution", type=int, default=1024, help="image side of the SDXL rows (default 1024)")
    parser.add_argument("--no-sdxl", action="store_true", help="skip the SDXL rows")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    suite = Suite(suite_config(args), args.out or default_out(), time.perf_counter())
    cfg, state = suite.cfg, {}
    try:
        wheels = REPO / args.wheels if not args.wheels.is_absolute() else args.wheels
        suite.results["wheels"] = {"note": "dry run: no wheels"} if cfg.dry_run else install_wheels(wheels)
        suite.results["environment"] = preflight(cfg)
    except Exception as err:  # nothing below could run: say why, and stop
        suite.results["preflight_error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
        suite.results["exit_code"] = 2
        suite.log(f"preflight failed: {type(err).__name__}: {err}")
        suite.save()
        return 2
    suite.log(f"preflight: {suite.results['environment']}")
    suite.save()
    native = None if cfg.dry_run else rows.NativeBuild()
    for row in benchmark_rows(cfg, state) + test_rows(cfg, native):
        suite.run(row)
    failed = [r["name"] for r in suite.results["rows"] if r["status"] in ("failed", "error")]
    suite.results["exit_code"] = 1 if failed else 0
    suite.log(f"done: {len(suite.results['rows'])} rows, failed: {failed or 'none'}; wrote {suite.out_dir / 'results.json'}")
    suite.save()
    return suite.results["exit_code"]


if __name__ == "__main__":
    sys.exit(main())

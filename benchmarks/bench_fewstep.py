"""Few-step ControlNet end to end on the CPU: 4 LCM steps at guidance 1, with the full VAE and with TAESD.

    flock /tmp/heavy.lock pytest benchmarks/bench_fewstep.py --benchmark --size sd15     # 512², ~1 hour
    python -m benchmarks.bench_fewstep --table benchmarks/results/fewstep-cpu-sd15-STAMP.json

What fastsdcpu runs on a CPU, measured whole (text encoder, 4 steps, decode) on the full SD1.5 architecture
with random weights and a canny ControlNet, 512² (`--resolution`), seed 0. Rows: diffusers fp32 with the
full VAE (fastsdcpu's PyTorch LCM-LoRA mode), diffusers fp32 with TAESD (the baseline of the target),
diffusers cast to bf16 (CPUs with native bf16 only), and every engine backend and precision, each with the
full VAE (`vae="model"`) and TAESD (`Runner(vae=...)`'s default): torch (reference switches), torch-cpu
and torch-compiled (the CPU presets in fp32), torch-bf16 and torch-compiled-bf16 (native bf16 only),
onnxruntime, openvino-f32 and openvino-bf16 (native bf16 only), the graph rows on one engine dir built
with `--vae` before the rows run.

Per row: seconds per image (median of ROUNDS calls after one untimed first call), the first call's
seconds (OpenVINO's compile, inductor's compilation, oneDNN's kernel choice; the graph rows' build is
recorded beside it), the stage split (text encoder, the steps, decode), peak RSS, and PSNR against
diffusers fp32 with the same VAE (same seed). Each backend runs in a process of its own (its two rows),
so what one row held is given back before the next, and each row is written to the result file
(results/fewstep-cpu-SIZE-STAMP.json) as it finishes. Without --benchmark (CI) the tiny model runs each
torch and diffusers row once in this process; the graph rows, which need a build, run with --benchmark
only (tests/test_fewstep_graphs.py holds them to diffusers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

ASSET = Path(__file__).resolve().parents[1] / "engine" / "assets" / "astronaut.png"
PROMPT = "an astronaut, best quality"
TAESD = {"tiny": "tiny-taesd", "sd15": "taesd-random"}  # engine.tiny.TAESD_PRESETS for each --size
RESOLUTION = {"tiny": 64, "sd15": 512}
ROUNDS = 3
STEPS, GUIDANCE, SCHEDULER = 4, 1.0, "lcm"
# Each process: (backend, its two rows). Rows whose hardware or build is missing are skipped with why.
# The compiled torch rows run last: their first call compiles for minutes, and the rows before them are
# written to the result file whatever happens to it.
BACKENDS = ["diffusers", "diffusers-bf16", "torch", "torch-cpu", "torch-bf16", "onnxruntime", "openvino-f32",
            "openvino-bf16", "torch-compiled", "torch-compiled-bf16"]


# ---- one backend's rows (in a process of its own with --benchmark) -------------------------------------

def _control(resolution: int):
    import PIL.Image

    from engine.preprocess import canny

    with PIL.Image.open(ASSET) as im:
        return canny(im.convert("RGB").resize((resolution, resolution), PIL.Image.LANCZOS))


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Timed:
    """Wraps a module's method and sums the seconds spent in it (diffusers' stages)."""

    def __init__(self, owner, name: str):
        self.seconds, self.inner = 0.0, getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _diffusers_calls(backend: str, preset: str, taesd: str, resolution: int) -> dict:
    """{"full": call, "taesd": call}, each a diffusers ControlNet pipeline over the engine's own random
    modules (the same seeded weights as the engine rows) with diffusers' LCMScheduler."""
    import copy

    import torch
    from diffusers import LCMScheduler, StableDiffusionControlNetPipeline

    from engine import Runner

    runner = Runner(model=preset, controlnet="canny", backend="torch", device="cpu", vae=taesd)
    b, tokenizer, scheduler_config = runner.backend, runner.tokenizer, runner.scheduler_config
    dtype = torch.bfloat16 if backend.endswith("-bf16") else torch.float32

    def own(module):
        return copy.deepcopy(module).to(dtype) if dtype != torch.float32 else module

    parts = dict(text_encoder=own(b.text_encoder.text_encoder), unet=own(b.unet_model.unet),
                 controlnet=own(b.controlnet_bodies[0].net))
    vaes = dict(full=own(b.vae_decoders["model"].vae), taesd=own(b.vae_decoders[taesd].vae))
    del runner, b
    control = _control(resolution)
    calls = {}
    for which, vae in vaes.items():
        pipe = StableDiffusionControlNetPipeline(
            vae=vae, tokenizer=tokenizer, scheduler=LCMScheduler.from_config(scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)
        pipe.set_progress_bar_config(disable=True)
        text, decode = _Timed(pipe.text_encoder, "forward"), _Timed(pipe.vae, "decode")

        def call(pipe=pipe, text=text, decode=decode):
            text.seconds = decode.seconds = 0.0
            start = time.perf_counter()
            images = pipe(PROMPT, control, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=resolution,
                          width=resolution, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
            total = time.perf_counter() - start
            return images, dict(text=text.seconds, steps=total - text.seconds - decode.seconds, decode=decode.seconds)

        calls[which] = call
    return calls


def _engine_calls(backend: str, preset: str, taesd: str, resolution: int, engine_dir: str | None) -> dict:
    """{"full": call, "taesd": call} over one Runner that holds both VAEs."""
    from engine import Runner
    from engine.optimizations import cpu_preset

    dtype = "bf16" if backend.endswith("-bf16") else "fp32"
    if backend.startswith(("onnxruntime", "openvino")):
        runner = Runner(engine_dir=engine_dir, backend=backend.split("-")[0], dtype=dtype, vae=taesd)
    else:
        presets = {"torch": None, "torch-cpu": "cpu", "torch-compiled": "cpu-compiled", "torch-bf16": "cpu",
                   "torch-compiled-bf16": "cpu-compiled"}
        name = presets[backend]
        runner = Runner(model=preset, controlnet="canny", backend="torch", device="cpu", dtype=dtype, vae=taesd,
                        optimizations=None if name is None else cpu_preset(name))
    control = _control(resolution)

    def make(vae):
        def call():
            result = runner.generate(PROMPT, control, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                     scheduler=SCHEDULER, height=resolution, width=resolution, seed=0,
                                     preprocess=False, output_type="np", vae=vae)
            ms = result.timings
            steps = sum(ms[k] for k in ("hint_encoder", "controlnet", "unet", "scheduler"))
            return result.images, dict(text=ms["text_encoder"] / 1e3, steps=steps / 1e3, decode=ms["vae"] / 1e3)

        return call

    return dict(full=make("model"), taesd=make(taesd))


def run_backend(backend: str, size: str, resolution: int, rounds: int, engine_dir: str | None,
                images_dir: Path | None) -> list[dict]:
    """The backend's two rows: timings, stage split, first call, peak RSS (and its images, saved)."""
    preset, taesd = {"tiny": "tiny", "sd15": "sd15-random"}[size], TAESD[size]
    start = time.perf_counter()
    if backend.startswith("diffusers"):
        calls = _diffusers_calls(backend, preset, taesd, resolution)
    else:
        calls = _engine_calls(backend, preset, taesd, resolution, engine_dir)
    load_s = time.perf_counter() - start
    rows = []
    for which, call in calls.items():
        began = time.perf_counter()
        images, split = call()
        first_call_s = time.perf_counter() - began
        seconds, splits = ([], []) if rounds else ([first_call_s], [split])  # no rounds: the smoke check's one call
        for _ in range(rounds):
            began = time.perf_counter()
            images, split = call()
            seconds.append(time.perf_counter() - began)
            splits.append(split)
        row = dict(row=backend + ("+taesd" if which == "taesd" else ""), backend=backend, vae=which,
                   seconds=statistics.median(seconds), all_seconds=seconds, first_call_s=first_call_s,
                   load_s=load_s, stages={k: statistics.median(s[k] for s in splits) for k in splits[0]},
                   peak_rss=_peak_rss())
        if images_dir is not None:
            import numpy as np

            np.save(images_dir / f"{row['row']}.npy", np.asarray(images, dtype=np.float32))
        rows.append(row)
    return rows


# ---- the pytest side: one test per backend, each in a fresh process with --benchmark ----------------------

def _skip_reason(backend: str, real: bool) -> str | None:
    from engine.optimizations import cpu_has_native_bf16

    if backend.endswith("-bf16"):
        if backend.startswith("openvino"):
            import openvino

            from engine.backends.openvino_backend import ov_has_bf16

            if not ov_has_bf16(openvino.Core()):
                return "OpenVINO lists no BF16 on this CPU (no AVX512-BF16 or AMX): asked for bf16 it would run f32"
        elif not cpu_has_native_bf16():
            return "this CPU has no native bf16 (AVX512-BF16 or AMX): emulated bf16 is ~30x slower than fp32"
    if not real and (backend.startswith(("onnxruntime", "openvino")) or "compiled" in backend):
        return "runs with --benchmark only: it needs a build or minutes of compilation (tests cover the path)"
    return None


@pytest.fixture(scope="module")
def fewstep(request, bench_config, machine_info, tmp_path_factory):
    """The run's settings, result file, images folder, and the engine dir (--vae) the graph rows share."""
    size = bench_config.size
    resolution = request.config.getoption("--resolution") or RESOLUTION[size]
    work = tmp_path_factory.mktemp("fewstep")
    state = dict(size=size, resolution=resolution, images=work, rows=[], engine_dir=None, build=None, result=None,
                 machine=machine_info)
    if bench_config.real:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        from benchmarks.conftest import RESULTS

        RESULTS.mkdir(parents=True, exist_ok=True)
        state["result"] = RESULTS / f"fewstep-cpu-{size}-{stamp}.json"
        state["floor"] = _floor(size, resolution, request.getfixturevalue("matmul_rate"))
        if {"onnxruntime", "openvino"} & set(bench_config.backends):
            state["engine_dir"], state["build"] = _build(size, resolution, work, bench_config.backends)
    return state


def _floor(size: str, resolution: int, rate: float) -> dict:
    """The 4 steps' FLOPs (ControlNet body + UNet at batch 1, and the hint encoder once), counted, at the
    fp32 matmul rate measured in this run: no fp32 backend's steps can take less."""
    from benchmarks.flops import per_sample_flops

    flops = per_sample_flops({"tiny": "tiny", "sd15": "sd15-random"}[size], resolution, resolution)
    steps_flops = STEPS * (flops["controlnet_body"] + flops["unet"]) + flops["hint_encoder"]
    return dict(matmul_gflops=rate / 1e9, steps_tflop=steps_flops / 1e12, steps_floor_s=steps_flops / rate)


def _build(size: str, resolution: int, work: Path, backends) -> tuple[str, dict]:
    """The engine dir of the graph rows, with TAESD (--vae), built in a process of its own (its export
    peaks at several GB, given back before the rows)."""
    preset = {"tiny": "tiny", "sd15": "sd15-random"}[size]
    out = work / "engine"
    backend = "onnxruntime" if "onnxruntime" in backends else "openvino"
    cmd = [sys.executable, "-m", "engine.build", "--model", preset, "--controlnet", "canny", "--vae", TAESD[size],
           "--out", str(out), "--backend", backend, "--min-size", str(resolution), "--opt-size", str(resolution),
           "--max-size", str(resolution), "--max-batch", "1", "--no-verify", "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"engine build failed ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}")
    return str(out), dict(seconds=time.perf_counter() - start)


def psnr(images, reference) -> float | None:
    import numpy as np

    mse = float(np.mean((np.asarray(images, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(1 / mse)


def _finish_rows(state: dict, rows: list[dict]) -> None:
    """PSNR against diffusers fp32 with the same VAE, the ratios, and the result file rewritten."""
    import numpy as np

    for row in rows:
        reference = state["images"] / f"diffusers{'+taesd' if row['vae'] == 'taesd' else ''}.npy"
        if reference.exists() and row["backend"] != "diffusers":
            row["psnr_db"] = psnr(np.load(state["images"] / f"{row['row']}.npy"), np.load(reference))
        if row["backend"] in ("onnxruntime", "openvino-f32", "openvino-bf16") and state["build"]:
            row["build_s"] = state["build"]["seconds"]
        state["rows"].append(row)
    base = {r["vae"]: r["seconds"] for r in state["rows"] if r["backend"] == "diffusers"}
    for row in state["rows"]:
        if row["vae"] in base:
            row["x_diffusers_same_vae"] = base[row["vae"]] / row["seconds"]
        if "taesd" in base:
            row["x_diffusers_taesd"] = base["taesd"] / row["seconds"]
    if state["result"] is not None:
        settings = dict(size=state["size"], resolution=state["resolution"], steps=STEPS, guidance=GUIDANCE,
                        scheduler=SCHEDULER, rounds=ROUNDS, controlnet="canny", taesd=TAESD[state["size"]],
                        floor=state.get("floor"))
        state["result"].write_text(json.dumps(dict(machine=state["machine"], settings=settings, rows=state["rows"]),
                                              indent=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewstep(fewstep, bench_config, backend):
    selected = backend.startswith("diffusers") or backend.split("-")[0] in bench_config.backends
    if not selected:
        pytest.skip(f"backend {backend} not selected (--backends {','.join(bench_config.backends)})")
    why = _skip_reason(backend, bench_config.real)
    if why:
        pytest.skip(why)
    if not bench_config.real:  # smoke: the tiny model, one call per row, in this process
        rows = run_backend(backend, "tiny", RESOLUTION["tiny"], 0, None, fewstep["images"])
    else:
        rows = _in_own_process(backend, fewstep)
    _finish_rows(fewstep, rows)
    for row in rows:
        print(f"{row['row']}: {row['seconds']:.2f} s/image, first call {row['first_call_s']:.1f} s, "
              f"stages {row['stages']}, PSNR {row.get('psnr_db')}, peak RSS {row['peak_rss'] / 2**30:.1f} GiB")


def _in_own_process(backend: str, state: dict) -> list[dict]:
    out = state["images"] / f"{backend}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_fewstep", "--row", backend, "--size", state["size"],
           "--resolution", str(state["resolution"]), "--images", str(state["images"]), "--out", str(out)]
    if state["engine_dir"]:
        cmd += ["--engine-dir", state["engine_dir"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ASSET.parents[2]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"row {backend} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


# ---- the table for benchmarks/README.md ----------------------------------------------------------------------

def table(path: Path) -> str:
    data = json.loads(Path(path).read_text())
    s, rows = data["settings"], data["rows"]
    lines = [f"{data['machine']['cpu']}, {data['machine']['threads']} threads; {s['size']} {s['resolution']}², "
             f"{s['steps']} {s['scheduler']} steps, guidance {s['guidance']}, canny, median of {s['rounds']} "
             f"({Path(path).name})", "",
             "| row | s/image | x diffusers+TAESD | x diffusers, same VAE | text s | steps s | decode s | "
             "PSNR vs diffusers, same VAE | first call s | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stages"]
        quality = "ref" if r["backend"] == "diffusers" else (
            "identical" if r.get("psnr_db") is None else f"{r['psnr_db']:.1f} dB")
        first = f"{r['first_call_s']:.1f}" + (f" (+ build {r['build_s']:.0f})" if r.get("build_s") else "")
        lines.append(f"| {r['row']} | {r['seconds']:.2f} | {r.get('x_diffusers_taesd', 0):.2f} | "
                     f"{r.get('x_diffusers_same_vae', 0):.2f} | {st['text']:.2f} | {st['steps']:.2f} | "
                     f"{st['decode']:.2f} | {quality} | {first} | {r['peak_rss'] / 1e9:.1f} |")
    floor, base = s.get("floor"), next((r for r in rows if r["row"] == "diffusers+taesd"), None)
    engine = [r for r in rows if r["vae"] == "taesd" and not r["backend"].startswith("diffusers")]
    if floor and base and engine:
        best = min(engine, key=lambda r: r["seconds"])
        bound = base["seconds"] / (floor["steps_floor_s"] + best["stages"]["text"] + best["stages"]["decode"])
        lines += ["", f"Best engine row: {best['row']}, {best.get('x_diffusers_taesd', 0):.2f}x diffusers+TAESD. The "
                      f"4 steps are {floor['steps_tflop']:.2f} TFLOP: {floor['steps_floor_s']:.1f} s at this run's fp32 "
                      f"matmul rate ({floor['matmul_gflops']:.0f} GFLOP/s), so no fp32 row can beat diffusers+TAESD by "
                      f"more than {bound:.2f}x here (the floor plus the best row's text and TAESD decode)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row", choices=BACKENDS, help="run one backend's two rows (what the benchmark spawns)")
    parser.add_argument("--size", choices=sorted(RESOLUTION), default="sd15")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--engine-dir", default=None)
    parser.add_argument("--images", default=None, help="folder for the rows' images (.npy)")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--table", metavar="RESULT.json", help="print the README table of a result file")
    args = parser.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return 0
    rows = run_backend(args.row, args.size, args.resolution or RESOLUTION[args.size], ROUNDS, args.engine_dir,
                       Path(args.images) if args.images else None)
    Path(args.out).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

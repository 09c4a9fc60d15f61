"""What int8 would buy on this CPU: one ControlNet + UNet step in OpenVINO, f32 against NNCF int8, one run.

    flock /tmp/heavy.lock pytest benchmarks/bench_openvino_int8.py --benchmark --size sd15 --resolution 512

Why this exists: the few-step target of issue #25 (3x diffusers fp32 + TAESD) is beyond what fp32 can do on
a CPU: the 4 steps' FLOPs at the fp32 matmul rate allow at most ~1.37x (bench_fewstep.py's floor, AVX2 Zen 3).
The lever left is precision. This measures the one that needs no bf16 hardware: post-training int8
quantization by NNCF (`nncf.quantize`, every Convolution, MatMul and FullyConnected, weights and
activations) of the engine dir's own ONNX graphs, compiled by OpenVINO's CPU plugin beside the f32 compile
of the same graphs, at batch 1 (guidance 1) and the run's resolution.

Rows (results/int8-cpu-SIZE-STAMP.json): per graph (unet, controlnet_canny), f32 and int8 seconds a call
(median of ROUNDS, the two timed in turn each round), int8/f32 speed ratio, the kernels OpenVINO ran int8 under, and
the int8 output's error against f32 on inputs the calibration never saw (max abs, relative RMS), and the
quantization's seconds and peak RSS beside the graph's weights (what quantizing a bigger UNet would need). Calibration
is CALIBRATION seeded random feeds in the graphs' natural ranges (engine.parity.sample_feeds): a speed
measure, not a quality recipe (a product int8 path calibrates on its own generations' step inputs).
The engine dir is bench_fewstep.py's (built as there) unless INT8_ENGINE_DIR names one.

Without --benchmark (CI) the tiny model runs each row once, untimed. Needs NNCF (`pip install -c
requirements/constraints.txt -e ".[int8]"`); skipped with that reason where it is not installed.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

GRAPHS = ("unet", "controlnet_canny")
ROUNDS, CALIBRATION = 5, 4


@pytest.fixture(scope="module")
def engine_dir(bench_config, tmp_path_factory) -> Path:
    if os.environ.get("INT8_ENGINE_DIR"):
        return Path(os.environ["INT8_ENGINE_DIR"])
    from benchmarks.bench_fewstep import _build  # the few-step rows' engine dir: these are its graphs

    return Path(_build(bench_config.size, bench_config.resolution, tmp_path_factory.mktemp("int8"), ("openvino",))[0])


@pytest.fixture(scope="module")
def result_file(bench_config):
    if not bench_config.real:
        return None
    from benchmarks.conftest import RESULTS

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return RESULTS / f"int8-cpu-{bench_config.size}-{stamp}.json"


def _alternate(requests: dict, feeds: dict, rounds: int) -> dict:
    """Median seconds a call per request, the requests timed in turn each round (a load that comes and goes
    on a shared machine then weighs on every row alike), after one warm-up call each (oneDNN's kernel choice)."""
    times = {name: [] for name in requests}
    for request in requests.values():
        request.infer(feeds)
    for _ in range(rounds):
        for name, request in requests.items():
            start = time.perf_counter()
            request.infer(feeds)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@pytest.mark.parametrize("graph", GRAPHS)
def test_int8_step(graph, engine_dir, bench_config, machine_info, result_file):
    nncf = pytest.importorskip("nncf", reason="int8 needs NNCF: pip install -c requirements/constraints.txt -e '.[int8]'")
    import numpy as np
    import openvino as ov
    import torch

    from benchmarks.conftest import reset_peak_rss, rss_gb
    from engine.manifest import load
    from engine.parity import sample_feeds

    manifest = load(engine_dir, list(GRAPHS))
    artefact = manifest.artefacts[graph]
    latent = bench_config.resolution // manifest.config["vae_scale_factor"]
    variables = dict(B=1, h=latent, w=latent)

    def feeds(seed: int) -> dict:
        return {name: t.numpy() for name, t in sample_feeds(artefact.inputs, variables, 0, seed).items()}

    core = ov.Core()
    model = core.read_model(str(engine_dir / artefact.onnx))
    model.reshape({name: list(value.shape) for name, value in feeds(0).items()})
    properties = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    reset_peak_rss()
    start, start_rss = time.perf_counter(), rss_gb("VmRSS")
    quantized = nncf.quantize(model, nncf.Dataset([feeds(1 + i) for i in range(CALIBRATION)]),
                              subset_size=CALIBRATION)
    quantize_s, quantize_peak = time.perf_counter() - start, rss_gb("VmHWM")
    rounds = ROUNDS if bench_config.real else 1
    test_feeds = feeds(100)  # never calibrated on
    row = dict(graph=graph, size=bench_config.size, resolution=bench_config.resolution, batch=1,
               quantize_s=round(quantize_s, 1),
               # what quantizing costs in memory: OpenVINO maps the graph's weights unread, so the start is small
               # and the peak counts the f32 weights once NNCF touches them
               quantize_start_rss_gb=start_rss and round(start_rss, 2),
               quantize_peak_rss_gb=quantize_peak and round(quantize_peak, 2),
               weights_gb=round(sum(c.data.nbytes for c in model.get_ops() if c.get_type_name() == "Constant") / 1e9, 2),
               calibration=CALIBRATION, machine=machine_info)
    requests = {name: core.compile_model(ov_model, "CPU", {**properties, "PERF_COUNT": name == "int8"})
                .create_infer_request() for name, ov_model in (("f32", model), ("int8", quantized))}
    for name, seconds in _alternate(requests, test_feeds, rounds).items():
        row[f"{name}_s"] = round(seconds, 4)
    outputs = {name: [np.array(t.data) for t in request.output_tensors] for name, request in requests.items()}
    row["int8_kernels"] = sorted({p.exec_type for p in requests["int8"].profiling_info if "8" in p.exec_type.lower()})
    want, got = np.concatenate([o.ravel() for o in outputs["f32"]]), np.concatenate([o.ravel() for o in outputs["int8"]])
    assert np.isfinite(got).all(), f"int8 {graph} produced NaN or inf"
    row["int8_over_f32_speed"] = round(row["f32_s"] / row["int8_s"], 3)
    row["max_abs"] = float(np.abs(got - want).max())
    row["rel_rms"] = float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))
    print(f"\n{graph}: f32 {row['f32_s']} s, int8 {row['int8_s']} s ({row['int8_over_f32_speed']}x), "
          f"rel RMS {row['rel_rms']:.3g}, quantize {row['quantize_s']} s, peak RSS {row['quantize_peak_rss_gb']} GB "
          f"({row['weights_gb']} GB of weights)")
    if result_file is not None:
        rows = json.loads(result_file.read_text())["rows"] if result_file.exists() else []
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(dict(benchmark="bench_openvino_int8", rows=rows + [row]), indent=1))

"""Check built artefacts against the PyTorch reference: `python -m engine.verify DIR`.

Each artefact runs on seeded sample inputs made from its manifest I/O spec, next to the fp32 torch
module it was exported from (engine.modules, the cut every backend runs); the table gives max abs error
and max abs error relative to the output's magnitude. The build measures with the same functions
(engine/parity.py), so the errors in the manifest and the ones printed here are measured the same way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from engine import manifest as mf
from engine.parity import TOLERANCE, compare, format_table, load_references, reference_module, verify_point

def runners(engine_dir: Path, manifest: mf.Manifest, backend: str) -> dict[str, Callable]:
    """name -> run(feeds) for each artefact, on `backend` (onnxruntime or openvino, or tensorrt for the plans)."""
    if backend == "tensorrt":
        from engine.backends.tensorrt_backend import TrtModel, TrtRunConfig, TrtRuntime

        runtime = TrtRuntime.create(TrtRunConfig(cuda_graphs=False))  # each plan runs once: no graph pays
        mf.match_tensorrt(manifest, runtime.version, runtime.gpu)
        models = {name: TrtModel(runtime, engine_dir / a.plan, a) for name, a in manifest.artefacts.items()}
        runtime.allocate_shared_memory()
        return {name: m.run for name, m in models.items()}
    if backend == "openvino":
        from engine.backends.openvino_backend import OvConfig, OvModel

        config = OvConfig(precision="f32", cache=False)
        return {name: OvModel(engine_dir / a.onnx, a, config).run for name, a in manifest.artefacts.items()}
    from engine.backends.onnxruntime_backend import OrtModel

    return {name: OrtModel(engine_dir / a.onnx, a).run for name, a in manifest.artefacts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.verify", description=__doc__.split("\n")[0])
    parser.add_argument("engine_dir", help="an engine dir written by python -m engine.build")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt", "openvino"), default="auto",
                        help="run the ONNX graphs (onnxruntime) or the TensorRT plans; auto: what the dir was built for")
    parser.add_argument("--size", type=int, default=None, help="image side to verify at (default: the build's min size)")
    parser.add_argument("--batch", type=int, default=None, help="batch to verify at (default: the profile's opt batch)")
    args = parser.parse_args(argv)
    engine_dir = Path(args.engine_dir)
    try:
        manifest = mf.load(engine_dir)
        backend = manifest.backend if args.backend == "auto" else args.backend
        run = runners(engine_dir, manifest, backend)
        sd, nets = load_references(manifest)
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tolerance = TOLERANCE[manifest.precision]
    rows, ok = [], True
    for name, artefact in manifest.artefacts.items():
        module = reference_module(artefact.kind, sd, nets.get(artefact.net), sd.extra_vaes.get(artefact.net))
        opt_batch = artefact.profile[artefact.inputs[0].name][1][0]
        point = verify_point(opt_batch, manifest.sizes["min_size"], manifest.config["vae_scale_factor"], args.size, args.batch)
        errors = compare(module, run[name], artefact, point, manifest.config["vocab_size"])
        passed = errors["max_rel"] <= tolerance
        ok &= passed
        size = sum((engine_dir / f).stat().st_size for f in artefact.files)
        rows.append(dict(artefact=name, status="ok" if passed else "FAIL", size=size, **errors))
    print(f"{engine_dir}: backend {backend}, precision {manifest.precision}, tolerance max rel {tolerance:g}")
    print(format_table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

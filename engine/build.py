"""Build an engine dir: `python -m engine.build --controlnet canny [--controlnet NAME|ID|PATH ...]`.

Exports the text encoder, UNet, VAE decoder and each ControlNet's hint encoder and body to ONNX, builds
TensorRT plans where TensorRT can run (--backend auto) or is asked for, verifies every artefact against
the torch reference, writes DIR/manifest.json and prints a summary table. Run it again with nothing
changed and it rebuilds nothing. Exit codes: 0 built and verified, 1 a verification failed (the dir is
marked unusable), 2 bad arguments or a failed build.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# The pip extra that brings what a build needs, per --backend (the README's default install has none).
EXTRA = {"auto": "onnx", "onnxruntime": "onnx", "tensorrt": "tensorrt", "openvino": "openvino"}


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m engine.build", description=__doc__.split("\n")[0])
    p.add_argument("--controlnet", action="append", default=None, metavar="NAME|ID|PATH",
                   help="a ControlNet to build (repeatable; default: canny, for SDXL models sdxl-canny)")
    p.add_argument("--model", default=None,
                   help="SD1.5 or SDXL model (read from its config): Hugging Face id, folder, .safetensors, tiny or "
                        "tiny-sdxl (default: SD1.5's hub id)")
    p.add_argument("--out", default="engines/default", help="engine dir to write (default engines/default)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime", "openvino"), default="auto",
                   help="auto: tensorrt where it can run, else onnxruntime (says which); openvino: verified "
                        "with OpenVINO, and what Runner(engine_dir=...) picks by default")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--min-size", type=int, default=256, help="smallest image side in pixels (default 256)")
    p.add_argument("--opt-size", type=int, default=None,
                   help="image side TensorRT tunes for (default: the model's, SD1.5 512, SDXL 1024, within min/max)")
    p.add_argument("--max-size", type=int, default=1024, help="largest image side in pixels (default 1024)")
    p.add_argument("--max-batch", type=int, default=4, help="images per call; CFG models get twice this (default 4)")
    p.add_argument("--vae", action="append", default=None, metavar="ID|PATH",
                   help="an extra VAE beside the model's own, e.g. madebyollin/taesd (TAESD) or a folder: its "
                        "own encoder and decoder graphs, picked with Runner(vae=...) or --vae at generation")
    p.add_argument("--no-verify", action="store_true", help="skip checking artefacts against torch")
    p.add_argument("--no-slim", action="store_true", help="skip the onnxslim graph clean-up")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def missing_modules(backend: str, slim: bool) -> list[str]:
    """Modules the build imports that are not installed: the exporter, the graph clean-up, and the
    runtime that verifies the graphs (OpenVINO for --backend openvino, else ONNX Runtime)."""
    needed = ["onnx"] + (["onnxslim"] if slim else []) + (["openvino"] if backend == "openvino" else ["onnxruntime"])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_modules(args.backend, not args.no_slim)
    if missing:
        print(f"error: python -m engine.build --backend {args.backend} needs {', '.join(missing)}, not installed: "
              f"pip install -e '.[{EXTRA[args.backend]}]' -c requirements/constraints.txt", file=sys.stderr)
        return 2
    from engine.loading import DEFAULT_CONTROLNET, DEFAULT_MODEL, model_family
    from engine.parity import format_table
    from export.build import BuildConfig, build
    from export.onnx_export import ExportConfig
    from export.spec import Sizes

    model = args.model or DEFAULT_MODEL
    try:
        family = model_family(model)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    default_opt = 1024 if family == "sdxl" else 512
    opt = args.opt_size if args.opt_size is not None else min(max(default_opt, args.min_size), args.max_size)
    config = BuildConfig(
        controlnets=tuple(args.controlnet or [DEFAULT_CONTROLNET[family]]),
        model=model,
        out=Path(args.out),
        backend=args.backend,
        precision=args.precision,
        sizes=Sizes(min_size=args.min_size, opt_size=opt, max_size=args.max_size, max_batch=args.max_batch),
        verify=not args.no_verify,
        export=ExportConfig(slim=not args.no_slim),
        progress=not args.no_progress,
        vaes=tuple(args.vae or ()),
    )
    try:
        result = build(config)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result.rows))
    built = result.built()
    print(f"{result.out}: {len(built)} built, {len(result.rows) - len(built)} reused; backend {result.backend}")
    if not result.ok:
        failed = [r["artefact"] for r in result.rows if not r["ok"]]
        print(f"verification FAILED for {', '.join(failed)}: the engine dir is marked unusable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

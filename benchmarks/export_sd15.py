"""Full-size export check: SD1.5 + one ControlNet with random weights, through the real build.

    python -m benchmarks.export_sd15 [--precision fp32|fp16] [--out DIR] [--size 256] [--no-slim]

Builds an onnxruntime engine dir for the `sd15-random` preset (the full SD1.5 architecture, random
weights, engine.tiny) with a random full-size ControlNet: exports the five graphs (the UNet and the
ControlNet with external data), cleans them with onnxslim, checks them with onnx.checker, runs each once
in ONNX Runtime next to the fp32 torch module at --size px (batch 2, batch 1 for the VAE), and prints per
graph: export + check time, file size, peak RSS so far, and max abs/rel error. Not a test: it needs
~9 GB of memory and minutes of CPU. Run one precision per process so each peak RSS is its own.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_sd15", description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--out", default="engines/sd15-random", help="parent dir; the build goes to OUT/<precision>")
    parser.add_argument("--size", type=int, default=256, help="image side the graphs are run at (default 256)")
    parser.add_argument("--no-slim", action="store_true", help="skip the onnxslim clean-up")
    args = parser.parse_args(argv)

    from export.build import BuildConfig, build
    from export.onnx_export import ExportConfig
    from export.spec import Sizes

    config = BuildConfig(
        controlnets=("canny",),
        model="sd15-random",
        out=Path(args.out) / args.precision,
        backend="onnxruntime",
        precision=args.precision,
        sizes=Sizes(min_size=args.size, opt_size=max(512, args.size), max_size=max(1024, args.size), max_batch=4),
        export=ExportConfig(slim=not args.no_slim),
    )
    start = time.perf_counter()
    result = build(config)
    total = time.perf_counter() - start
    head = f"{'graph':<22} {'status':<7} {'files':>10} {'time s':>8} {'peak RSS':>9} {'max abs':>9} {'max rel':>9}"
    print(f"\nsd15-random + canny, {args.precision}, run at {args.size}x{args.size}, {result.out}")
    print(head)
    print("-" * len(head))
    for r in result.rows:
        err = lambda v: "-" if v is None else f"{v:.2e}"
        files = sorted(result.manifest.artefacts[r["artefact"]].files)
        print(f"{r['artefact']:<22} {r['status']:<7} {r['size'] / 2**30:>8.2f}GB {r['seconds']:>8.1f} "
              f"{r['peak_rss'] / 2**30:>7.2f}GB {err(r['max_abs']):>9} {err(r['max_rel']):>9}  {' + '.join(files)}")
    print(f"total {total:.0f} s (model loading and hashing included); dir usable: {result.ok}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

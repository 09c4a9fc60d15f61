"""Start the server on this machine: `python -m engine.serve --model tiny` (Ctrl-C stops it).

A local Ray instance with a small CPU budget, one replica, HTTP on --host:--port. For a cluster use
`serve deploy engine/serve/config.yaml` instead (docs/SERVING.md).
"""
from __future__ import annotations

import argparse
import signal
import time

from engine.preprocess.loading import annotator_flag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.serve", description="Serve SD1.5 + ControlNet over HTTP with Ray Serve")
    parser.add_argument("--model", default="tiny", help="'tiny', a Hugging Face id or a local diffusers folder")
    parser.add_argument("--controlnet", action="append", default=None, help="ControlNet name/id/path (repeat for several)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 to listen on all interfaces)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use on this machine")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 if CUDA is available)")
    parser.add_argument("--batch-mode", default="exact", choices=["exact", "merge"])
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads per replica")
    parser.add_argument("--no-demo", action="store_true", help="do not mount the Gradio demo at /demo")
    parser.add_argument("--lora-dir", default=None, help="folder of LoRAs (.safetensors) requests may name in 'loras'")
    parser.add_argument("--annotator", action="append", type=annotator_flag, metavar="MODULE=ID_OR_DIR",
                        help="weights of a model-backed preprocessor: a Hugging Face id or a local folder "
                             "(e.g. depth_anything_v2=/models/da2); repeatable")
    args = parser.parse_args(argv)

    import ray
    import torch
    from ray import serve

    from engine.serve.app import build_app
    from engine.serve.local import start_local_serve

    num_gpus = args.num_gpus if args.num_gpus is not None else (1 if torch.cuda.is_available() else 0)
    start_local_serve(args.host, args.port, args.num_cpus, int(torch.cuda.device_count()), quiet=False)
    controlnets = args.controlnet or ["canny"]
    app_args = dict(model=args.model, controlnet=controlnets if len(controlnets) > 1 else controlnets[0], device=args.device, dtype=args.dtype,
                    batch_mode=args.batch_mode, max_batch_size=args.max_batch_size,
                    torch_threads=args.torch_threads, demo=not args.no_demo, num_gpus=num_gpus,
                    lora_dir=args.lora_dir, annotators=dict(args.annotator or []))
    serve.run(build_app(app_args), name="controlnet", route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    print(f"serving {args.model} at {url}  (POST /generate, GET /healthz, GET /models, demo: {url}/demo, "
          f"A1111 web UI API: {url}/sdapi/v1)")
    # SIGTERM (docker stop, kill) shuts down like Ctrl-C, so the local Ray processes do not outlive us.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

"""Start the server on this machine: `python -m engine.serve --model tiny` (Ctrl-C stops it).

A local Ray instance with a small CPU budget, `--replicas` replicas, HTTP on --host:--port. A built engine
dir (`python -m engine.build`) is served with `--engine-dir DIR --backend onnxruntime|openvino|tensorrt`.
For a cluster use `serve deploy engine/serve/config.yaml` instead (docs/SERVING.md).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.serve", description="Serve SD1.5 + ControlNet over HTTP with Ray Serve")
    parser.add_argument("--model", default=None, help="'tiny' (the default), a Hugging Face id or a local diffusers "
                                                      "folder; with --engine-dir: the dir's model unless given")
    parser.add_argument("--controlnet", action="append", default=None, help="ControlNet name/id/path (repeat for several)")
    parser.add_argument("--engine-dir", default=None, help="a built engine dir (python -m engine.build) to run its graphs")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "openvino", "tensorrt"],
                        help="what runs the model (default: torch, or the engine dir's graphs)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas (each its own Runner), spread over --num-cpus")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 to listen on all interfaces: "
                                                            "turn on --api-auth or --api-key first)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use on this machine")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 if CUDA is available)")
    parser.add_argument("--batch-mode", default="exact", choices=["exact", "merge"])
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="requests Serve holds waiting for a replica; beyond them 503 with Retry-After (default 128)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads per replica")
    parser.add_argument("--no-demo", action="store_true", help="do not mount the Gradio demo at /demo")
    parser.add_argument("--lora-dir", default=None, help="folder of LoRAs (.safetensors) requests may name in 'loras'")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help="a request limit (engine.serve.api.Limits; repeat), e.g. max_side=768 or max_loras=4")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                        help="HTTP Basic credentials every route asks for, /docs and the demo included (A1111's flag)")
    parser.add_argument("--api-key", default=None, metavar="KEY[,KEY]",
                        help="API keys every route accepts (Authorization: Bearer KEY, or X-API-Key: KEY)")
    return parser.parse_args(argv)


def app_args(args: argparse.Namespace, num_gpus: float) -> dict:
    """`build_app`'s arguments for the parsed flags."""
    from engine.serve.guard import parse_credentials

    parse_credentials(args.api_auth)  # a malformed pair stops here, not in every replica
    limits = parse_limits(args.limit)
    controlnets = args.controlnet or (None if args.engine_dir else ["canny"])
    model = args.model or (None if args.engine_dir else "tiny")
    return dict(model=model, controlnet=controlnets if controlnets is None or len(controlnets) > 1 else controlnets[0],
                engine_dir=args.engine_dir, backend=args.backend, num_replicas=args.replicas,
                max_queued_requests=args.max_queued_requests, device=args.device, dtype=args.dtype,
                batch_mode=args.batch_mode, max_batch_size=args.max_batch_size, torch_threads=args.torch_threads,
                demo=not args.no_demo, num_gpus=num_gpus, num_cpus=min(1.0, args.num_cpus / max(1, args.replicas)),
                lora_dir=args.lora_dir, api_auth=args.api_auth, api_key=args.api_key, limits=limits)


def parse_limits(items: list[str]) -> dict:
    """["max_side=768", ...] -> {"max_side": 768}: names and values checked against api.Limits."""
    import dataclasses

    from engine.serve.api import Limits

    names = {f.name for f in dataclasses.fields(Limits)}
    limits = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--limit takes NAME=VALUE with NAME one of {', '.join(sorted(names))} and VALUE a "
                             f"positive integer, got {item!r}")
        limits[name] = int(value)
    return limits


def exposure_warning(host: str, api_auth: str | None, api_key: str | None) -> str | None:
    """What to print when the server listens beyond this machine with no authentication."""
    if host in LOCAL_HOSTS or api_auth or api_key:
        return None
    return (f"WARNING: serving on {host} without authentication: anyone who can reach this port can generate, read "
            "/docs and use the demo; pass --api-auth USER:PASS or --api-key KEY")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import ray
    import torch
    from ray import serve

    from engine.serve.app import build_app
    from engine.serve.local import start_local_serve

    num_gpus = args.num_gpus if args.num_gpus is not None else (1 if torch.cuda.is_available() else 0)
    built = app_args(args, num_gpus)
    warning = exposure_warning(args.host, args.api_auth, args.api_key)
    if warning:
        print(warning, file=sys.stderr)
    start_local_serve(args.host, args.port, args.num_cpus, int(torch.cuda.device_count()), quiet=False)
    serve.run(build_app(built), name="controlnet", route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    what = args.engine_dir or built["model"]
    print(f"serving {what} ({args.replicas} replica{'s' if args.replicas > 1 else ''}) at {url}  (POST /generate, "
          f"GET /healthz, GET /models, demo: {url}/demo, A1111 web UI API: {url}/sdapi/v1)")
    # SIGTERM (docker stop, kill) shuts down like Ctrl-C, so the local Ray processes do not outlive us.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray.shutdown()  # the local Ray and everything on it; serve.shutdown() first would wait out each replica's grace


if __name__ == "__main__":
    main()

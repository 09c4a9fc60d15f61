"""The Ray Serve application: one deployment, a `Runner` per replica, a FastAPI ingress, the Gradio demo.

    serve run engine.serve.app:build_app model=tiny        # or: python -m engine.serve --model tiny
    serve deploy engine/serve/config.yaml                   # a GPU cluster (see docs/SERVING.md)

Routes: POST /generate, GET /healthz, GET /models, GET /stats, the demo at /demo, and the A1111 web UI
API (POST /sdapi/v1/txt2img, /sdapi/v1/img2img, /controlnet/detect, ...: engine/serve/a1111/routes.py),
all behind engine/serve/guard.py (authentication, the body-size cap). `Replica` is one replica's Runner,
thread pools, limits and routes, usable without Serve; `ControlNetServer` is the deployment: a Replica
whose POST /generate requests are batched.

Batching. `@serve.batch` hands the replica up to `max_batch_size` requests that arrived within
`batch_wait_timeout_s`; they are grouped by `api.batch_key` (size, steps, scheduler, guidance, ControlNet
settings). One `Runner.generate` call takes many prompts but only one control image and one noise
generator, and its kernels see a different batch size, so merging requests changes their pixels. Two
modes, chosen by `batch_mode`:

- "exact" (default): each request of a group gets its own `generate` call, back to back in the batch
  handler's worker thread. Its image equals `Runner.generate` with the same arguments bit for bit.
  What batching buys here is queueing and grouping only, not arithmetic throughput.
- "merge": requests of a group that also share the control image (by pixel digest) and negative-prompt
  presence become one `generate` call with a prompt list; each request's noise is drawn from its own
  seed and passed as `latents`, so the starting noise is the request's own. The result equals a single
  call up to float rounding of the batched kernels (not bit for bit). Schedulers that draw noise at
  every step (euler_a) are never merged, because the step noise would come from a shared generator.
"""
import asyncio
import base64
import io
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# No `from __future__ import annotations` here: Serve ships this class to replicas by value, and FastAPI
# must see the route's `Request` annotation as a class, not a string to look up in module globals.
from fastapi import Request
from ray import serve
from ray.serve.config import BackpressureConfig

from engine.serve import api
from engine.serve.proxy import RETRY_AFTER_S

BATCH_MODES = ("exact", "merge")
STEP_NOISE_SCHEDULERS = ("euler_a",)  # draw fresh noise in every step from the call's generator


@dataclass
class Outcome:
    images: list  # PIL images of this request
    control_maps: list
    timings: dict
    seed: int
    parameters: dict
    batch_size: int  # requests in the @serve.batch call this request was part of
    group_size: int  # of those, requests with the same batch key
    merged: int  # requests in the Runner.generate call that produced this image (1 in exact mode)


@dataclass
class Stats:
    """Per replica: what batching did. Read by GET /stats and by the tests."""

    batch_sizes: Counter = field(default_factory=Counter)  # @serve.batch call size -> count
    group_sizes: Counter = field(default_factory=Counter)  # same-key group size -> count
    generate_calls: Counter = field(default_factory=Counter)  # requests per generate() call -> count
    recent_batches: deque = field(default_factory=lambda: deque(maxlen=256))
    requests: int = 0
    failures: int = 0
    lora_switches: int = 0  # LoRA set changes between generate() calls

    def as_dict(self) -> dict:
        import os

        def table(c):
            return {str(k): v for k, v in sorted(c.items())}

        return dict(
            pid=os.getpid(),  # which replica answered: its process, as in Ray's logs
            requests=self.requests, failures=self.failures, batch_sizes=table(self.batch_sizes),
            group_sizes=table(self.group_sizes), generate_calls=table(self.generate_calls),
            recent_batches=list(self.recent_batches), lora_switches=self.lora_switches,
        )


def png_bytes(image) -> bytes:
    if not hasattr(image, "save"):  # a float array control map (preprocess="none" on a float input)
        import numpy as np
        import PIL.Image

        image = PIL.Image.fromarray(np.round(np.asarray(image) * 255).astype("uint8"))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64_png(image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def _json_error(err: api.ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status)


class Replica:
    """One replica's state and routes: its Runner, limits, thread pools and FastAPI app. Runs each POST
    /generate request alone (`submit`), which is what a process without Serve (tests, a plain ASGI server)
    gets; ControlNetServer, below, is the Serve deployment and batches them."""

    def __init__(
        self,
        model: str | None = "tiny",  # None with engine_dir: the dir's model
        controlnet: str | list[str] | None = "canny",  # None with engine_dir: the dir's ControlNets
        backend: str = "auto",
        engine_dir: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_mode: str = "exact",
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.05,
        torch_threads: int | None = None,
        demo: bool = True,
        demo_size: int | None = None,
        limits: dict | None = None,
        lora_dir: str | None = None,
        prepare_threads: int = 2,
        api_auth: str | None = None,
        api_key: str | None = None,
    ):
        import torch

        from engine.runner import Runner
        from engine.serve.a1111.plan import PromptTokenizer
        from engine.serve.guard import parse_credentials, parse_keys

        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {', '.join(BATCH_MODES)}, got {batch_mode!r}")
        if torch_threads:
            # Replicas sharing a CPU node each get a slice; torch otherwise takes every core per replica.
            torch.set_num_threads(int(torch_threads))
        self.runner = Runner(model=model, controlnet=controlnet, backend=backend, engine_dir=engine_dir,
                             device=device, dtype=dtype)
        self.lora_dir = lora_dir  # requests name LoRAs in it (api.GenerateRequest.loras)
        self.batch_mode = batch_mode
        self.max_batch_size = int(max_batch_size)
        self.limits = api.Limits(**(limits or {}))
        self.demo = bool(demo)
        self.demo_size = int(demo_size or (64 if self.runner.model == "tiny" else 512))
        self.stats = Stats()
        # One worker: the Runner is not thread-safe, and generation must not block the event loop that
        # answers /healthz and parses the next requests.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner")
        # Decoding pictures, planning A1111 requests, preprocessing (canny) and PNG encoding: off the event loop,
        # on a few threads, so one heavy request can neither stall the loop nor take every core.
        self.prepare_pool = ThreadPoolExecutor(max_workers=int(prepare_threads), thread_name_prefix="prepare")
        # The A1111 routes' 75-token check, with its own tokenizer: the Runner's, shared, would have its
        # truncation switched off while the worker tokenizes with it (a Rust tokenizer's settings are shared).
        self.prompt_tokenizer = PromptTokenizer(self.runner.tokenizer)
        self.credentials, self.api_keys = parse_credentials(api_auth), parse_keys(api_key)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)

    # ---- batching ---------------------------------------------------------------------------------

    def _run_batch(self, requests: list[api.GenerateRequest]) -> list:
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(api.batch_key(req), []).append(i)
        self.stats.batch_sizes[len(requests)] += 1
        self.stats.recent_batches.append(len(requests))
        outcomes: list = [None] * len(requests)
        for members in groups.values():
            self.stats.group_sizes[len(members)] += 1
            for call in self._calls(requests, members):
                results = self._generate([requests[i] for i in call])
                for i, result in zip(call, results):
                    if isinstance(result, Outcome):
                        result.batch_size, result.group_size = len(requests), len(members)
                    outcomes[i] = result
        self.stats.requests += len(requests)
        self.stats.failures += sum(isinstance(o, api.ApiError) for o in outcomes)
        return outcomes

    def _calls(self, requests: list, members: list[int]) -> list[list[int]]:
        """How one same-key group is split into generate() calls (see the module docstring)."""
        first = requests[members[0]]
        # img2img/inpaint start from the init image, not from latents a merged call could pass in.
        if self.batch_mode == "exact" or first.scheduler in STEP_NOISE_SCHEDULERS or first.init_image is not None:
            return [[i] for i in members]
        calls: dict[tuple, list[int]] = {}
        for i in members:
            req = requests[i]
            calls.setdefault((req.image_digest, req.negative_prompt is None), []).append(i)
        # At most limits.max_images_per_call images a call (the group shares num_images_per_prompt).
        size = max(1, self.limits.max_images_per_call // first.num_images_per_prompt)
        return [call[k:k + size] for call in calls.values() for k in range(0, len(call), size)]

    def _generate(self, reqs: list[api.GenerateRequest]) -> list:
        """One Runner.generate call for `reqs` (all same key); an Outcome or ApiError per request."""
        first = reqs[0]
        kwargs = api.runner_kwargs(first, [s.preprocessor for s in self.runner.controlnet_specs])
        images = first.images if len(first.images) != 1 else first.images[0]
        images = images or None  # none given: inpaint ControlNets build theirs from init image and mask
        try:
            self._use_loras(first.loras)
        except api.ApiError as err:
            return [err] * len(reqs)
        try:
            if len(reqs) == 1:
                result = self.runner.generate(first.prompt, images, negative_prompt=first.negative_prompt,
                                              seed=first.seed, **kwargs)
            else:
                negatives = None if first.negative_prompt is None else [r.negative_prompt for r in reqs]
                result = self.runner.generate([r.prompt for r in reqs], images, negative_prompt=negatives,
                                              latents=self._merged_latents(reqs, first.images[0]), **kwargs)
            self.stats.generate_calls[len(reqs)] += 1
        except (ValueError, TypeError) as err:  # the Runner's own argument checks
            return [api.runner_error(err, api.GENERATE_WORDS)] * len(reqs)
        except Exception as err:  # noqa: BLE001 - one failed call must not take the replica down
            return [api.ApiError(500, None, f"generation failed: {type(err).__name__}: {err}")] * len(reqs)
        per = first.num_images_per_prompt
        outcomes = []
        for j, req in enumerate(reqs):
            parameters = dict(result.parameters, prompt=req.prompt, negative_prompt=req.negative_prompt,
                              seed=req.seed, preprocess=req.preprocess, canny_low=req.canny_low,
                              canny_high=req.canny_high)
            outcomes.append(Outcome(
                images=result.images[j * per:(j + 1) * per], control_maps=result.control_maps,
                timings=result.timings, seed=req.seed, parameters=parameters, batch_size=1, group_size=1,
                merged=len(reqs),
            ))
        return outcomes

    def _use_loras(self, loras: tuple) -> None:
        """Switch the replica to a request group's LoRA set, between generate() calls (a no-op when it is the
        set already merged). Requests with different sets are in different groups (api.batch_key)."""
        from engine.lora import LoraError, find_lora

        try:
            self.switch_loras([(find_lora(name, self.lora_dir), w) for name, w in loras])
        except (LoraError, FileNotFoundError) as err:
            raise api.ApiError(422, "loras", str(err)) from None

    def switch_loras(self, loras: list) -> None:
        """Make [(path, weight), ...] the merged set, on the worker thread, unless it already is. Every route
        sets the set it needs (the empty one too), so a request never runs with another's LoRAs."""
        runner = self.runner
        current = tuple((lora.source, w) for lora, w in runner.loras.active) if runner.loras is not None else ()
        wanted = tuple((str(path), float(w)) for path, w in loras)
        if wanted != current:
            runner.set_loras(list(wanted))
            self.stats.lora_switches += 1

    def available_loras(self) -> list[str]:
        from pathlib import Path

        if self.lora_dir is None:
            return []
        return sorted(p.name.removesuffix(".safetensors") for p in Path(self.lora_dir).rglob("*.safetensors"))

    def _merged_latents(self, reqs: list, image):
        """Each request's starting noise, drawn from its own seed exactly as Runner.generate draws it."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        runner, first = self.runner, reqs[0]
        if first.height is None or first.width is None:
            from diffusers.image_processor import VaeImageProcessor

            h, w = VaeImageProcessor(vae_scale_factor=runner.vae_scale_factor).get_default_height_width(image)
        height, width = first.height or h, first.width or w
        shape = (first.num_images_per_prompt, runner.latent_channels,
                 height // runner.vae_scale_factor, width // runner.vae_scale_factor)
        return torch.cat([
            randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(r.seed), device=runner.device,
                         dtype=torch.float32)
            for r in reqs
        ])

    async def submit(self, req: api.GenerateRequest) -> Outcome:
        """One request, as a batch of one on the worker thread (ControlNetServer batches)."""
        outcome = (await asyncio.get_running_loop().run_in_executor(self.pool, self._run_batch, [req]))[0]
        if isinstance(outcome, api.ApiError):
            raise outcome
        return outcome

    def check_health(self) -> None:
        # Serve calls this periodically; a dead worker thread is the one state a request could leave.
        if self.pool._shutdown:  # noqa: SLF001
            raise RuntimeError("the generation worker has shut down")

    # ---- HTTP ---------------------------------------------------------------------------------------

    def models(self) -> dict:
        import dataclasses

        from engine.preprocess import PREPROCESSORS
        from engine.schedulers import SCHEDULERS

        r = self.runner
        return dict(
            model=r.model, controlnets=[s.name for s in r.controlnet_specs], backend=r.backend.name, device=str(r.device),
            dtype=str(r.dtype).replace("torch.", ""), schedulers=list(SCHEDULERS),
            preprocessors=["auto", "none", *sorted(PREPROCESSORS)], limits=dataclasses.asdict(self.limits),
            batching=dict(mode=self.batch_mode, max_batch_size=self.max_batch_size), loras=self.available_loras(),
        )

    def __serve_build_asgi_app__(self):
        """The FastAPI app, built per replica after __init__ so routes and demo can close over the Runner."""
        from fastapi import FastAPI
        from fastapi.responses import Response

        from engine.serve.guard import Auth, BodyLimit
        from engine.serve.openapi import generate_operation

        app = FastAPI(title="ControlNet engine", docs_url="/docs")

        @app.get("/healthz")
        async def healthz():
            return {"status": "ok", "model": self.runner.model}

        @app.get("/models")
        async def models():
            return self.models()

        @app.get("/stats")
        async def stats():
            return self.stats.as_dict()

        inpaint_only = all(s.preprocessor == "inpaint" for s in self.runner.controlnet_specs)
        operation = generate_operation(self.limits, self.runner.num_controlnets, inpaint_only)

        @app.post("/generate", openapi_extra=operation)
        async def generate(request: Request):
            loop = asyncio.get_running_loop()
            try:
                req = await api.parse_http(request, self.limits, self.runner.num_controlnets, self.prepare_pool)
                outcome = await self.submit(req)
            except api.ApiError as err:
                return _json_error(err)
            if req.response_format == "png":
                headers = {"X-Seed": str(outcome.seed), "X-Batch-Size": str(outcome.batch_size),
                           "X-Merged": str(outcome.merged), "X-Total-Ms": f"{outcome.timings['total']:.1f}"}
                data = await loop.run_in_executor(self.prepare_pool, png_bytes, outcome.images[0])
                return Response(data, media_type="image/png", headers=headers)
            images, maps = await loop.run_in_executor(
                self.prepare_pool, lambda: ([b64_png(im) for im in outcome.images], [b64_png(m) for m in outcome.control_maps]))
            return dict(
                images=images, control_maps=maps, seed=outcome.seed, timings=outcome.timings,
                parameters=outcome.parameters,
                batch=dict(mode=self.batch_mode, size=outcome.batch_size, group_size=outcome.group_size,
                           merged=outcome.merged),
            )

        from engine.serve.a1111.routes import add_routes

        add_routes(app, self)  # the A1111 web UI API: /sdapi/v1/*, /controlnet/*
        if self.demo:
            import gradio as gr

            from engine.serve.demo import build_demo

            blocks = build_demo(self._demo_run, self.limits, self.demo_size, self.available_loras())
            app = gr.mount_gradio_app(app, blocks, path="/demo")
        # Around every route, the demo and /docs included: authentication (outermost: a stranger's body is
        # never read), then the body-size cap (engine/serve/guard.py).
        app.add_middleware(BodyLimit, max_bytes=self.limits.max_body_bytes)
        if self.credentials or self.api_keys:
            app.add_middleware(Auth, credentials=self.credentials, keys=self.api_keys)
        return app

    async def _demo_run(self, fields: dict, image, init_image=None, mask_image=None):
        images = [image] if image is not None else []
        req = api.build_request(fields, images, self.limits, self.runner.num_controlnets,
                                init_image=init_image, mask_image=mask_image)
        outcome = await self.submit(req)
        return outcome.control_maps[0], outcome.images[0], outcome.seed


@serve.deployment(
    name="ControlNet",
    # Back-pressure: a replica takes at most max_ongoing_requests requests (build_app sets it to max_batch_size
    # unless given: the batch it runs), so the rest wait in Serve's queue, from which any live replica takes
    # them: a replica that dies loses only what it had taken. Beyond max_queued_requests per caller Serve
    # answers 503 with Retry-After (in JSON: engine/serve/proxy.py).
    max_ongoing_requests=8,
    max_queued_requests=128,
    backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
    health_check_period_s=10,
)
@serve.ingress()
class ControlNetServer(Replica):
    """The Serve deployment: a Replica whose POST /generate requests are batched (`@serve.batch`, see the
    module docstring)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._batched.set_max_batch_size(self.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, requests: list[api.GenerateRequest]) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._run_batch, requests)

    async def submit(self, req: api.GenerateRequest) -> Outcome:
        outcome = await self._batched(req)
        if isinstance(outcome, api.ApiError):
            raise outcome
        return outcome


def build_app(args: dict | None = None):
    """Serve's application builder (`serve run engine.serve.app:build_app model=tiny`).

    `args` are ControlNetServer's arguments, plus deployment options for running without a config file:
    num_gpus/num_cpus (per replica), num_replicas, max_ongoing_requests (default: max_batch_size, the batch a
    replica runs), max_queued_requests. In a config file, prefer the deployment section for those (see
    config.yaml).
    """
    args = dict(args or {})
    options = {}
    actor = {k: float(args.pop(k)) for k in ("num_gpus", "num_cpus") if k in args}
    if actor:
        options["ray_actor_options"] = actor
    for key in ("num_replicas", "max_ongoing_requests", "max_queued_requests"):
        if args.get(key) is not None:
            options[key] = int(args.pop(key))
        args.pop(key, None)
    for key in ("max_batch_size", "torch_threads", "demo_size", "prepare_threads"):
        if key in args and args[key] is not None:
            args[key] = int(args[key])
    options.setdefault("max_ongoing_requests", args.get("max_batch_size", 8))
    if "batch_wait_timeout_s" in args:
        args["batch_wait_timeout_s"] = float(args["batch_wait_timeout_s"])
    if isinstance(args.get("demo"), str):  # from `serve run ... demo=false`
        args["demo"] = args["demo"].lower() not in ("0", "false", "no", "off")
    return ControlNetServer.options(**options).bind(**args)

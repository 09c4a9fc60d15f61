"""The A1111 web UI API on the engine's FastAPI ingress: `add_routes(app, server)` (engine/serve/app.py).

    POST /sdapi/v1/txt2img, /sdapi/v1/img2img          generation, ControlNet units in alwayson_scripts
    GET  /sdapi/v1/sd-models, sd-vae, samplers, schedulers, options (POST: only the values in force),
         progress (current_image: the running step decoded with TAESD where one is loaded), scripts
    GET  /controlnet/version, model_list, module_list, control_types, settings; POST /controlnet/detect

Generation runs on the replica's single worker thread (`server.pool`), the one POST /generate's batches
use, so the Runner never runs two calls at once. Planning (decoding the pictures, preprocessing, fitting) and
PNG encoding run on the replica's small `server.prepare_pool`, never on the event loop, so /healthz and the
other routes answer while a heavy request is prepared. Errors have A1111's shape plus the offending field:
{"error", "detail", "body", "errors", "field"}; a bad request costs no model work and disturbs nothing.
"""
import asyncio
import base64
import io
import random
import time
from dataclasses import dataclass

from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.serve.a1111 import control as a1111_control, plan as a1111, response as a1111_response
from engine.serve.a1111.models import (
    ControlNetSettingsResponse,
    ControlTypesResponse,
    DetectRequest,
    DetectResponse,
    ErrorResponse,
    ImageResponse,
    Img2ImgRequest,
    ModelListResponse,
    ModuleListResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    SDVaeItem,
    Txt2ImgRequest,
    VersionResponse,
)
from engine.lora import LoraError
from engine.serve.api import ApiError, runner_error
from engine.vaes import A1111_AUTOMATIC

EXTENSION_API_VERSION = 3  # what sd-webui-controlnet's GET /controlnet/version answers
ERRORS = {status: {"model": ErrorResponse} for status in (400, 422, 500, 501)}


def error_response(status: int, field, message: str, kind: str = "HTTPException") -> JSONResponse:
    return JSONResponse({"error": kind, "detail": message, "body": "", "errors": message, "field": field},
                        status_code=status)


def _from_api_error(err: ApiError) -> JSONResponse:
    return error_response(err.status, err.field, err.message)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own 4xx (a body it cannot parse, 404, 405), in the same shape as every other error.
    field = {404: "path", 405: "method"}.get(exc.status_code, "body" if exc.status_code < 500 else None)
    return error_response(exc.status_code, field, str(exc.detail))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or "body"  # "body": the body as a whole (not a JSON object, say)
    message = f"{field}: {first.get('msg')}"
    return error_response(422, field, message, "RequestValidationError")


def png_b64(image, text: str | None = None) -> str:
    import numpy as np
    import PIL.Image

    from engine.pngmeta import png_info

    if not hasattr(image, "save"):
        image = PIL.Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(text) if text else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Progress:
    """What GET /sdapi/v1/progress reports: the A1111 job running on this replica, if any."""

    job_count: int = 0
    job_no: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0
    job_timestamp: str = "0"
    # The live preview: the last step's latents (first image), and its PNG once a poll asked for it. Decoded
    # only when polled, so a client that never asks pays nothing.
    latents: object = None
    latents_no: int = 0  # counts steps; the preview below is of step `preview_no`
    preview: str | None = None
    preview_no: int = -1

    def fraction(self) -> float:
        if not self.job_count or not self.steps:
            return 0.0
        return min(1.0, (self.job_no + self.step / self.steps) / self.job_count)

    def as_dict(self) -> dict:
        done = self.fraction()
        elapsed = time.time() - self.started if self.started else 0.0
        eta = elapsed / done - elapsed if done > 0 else 0.0
        state = dict(skipped=False, interrupted=False, stopping_generation=False, job="" if not self.job_count else
                     f"Batch {self.job_no + 1} out of {self.job_count}", job_count=self.job_count,
                     job_timestamp=self.job_timestamp, job_no=self.job_no, sampling_step=self.step,
                     sampling_steps=self.steps)
        return dict(progress=done, eta_relative=eta, state=state, current_image=self.preview if self.job_count else None,
                    textinfo=None)


def add_routes(app, server) -> None:
    """The A1111 routes, closing over the ControlNetServer replica `server` (its runner, pool, limits)."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    progress = Progress()
    runner = server.runner
    can_preview = any(vae.tiny for vae in runner.vaes.values())  # TAESD: a preview costs a fraction of a step

    def run_plan(plan: a1111.Plan) -> tuple[list, dict]:
        """Worker thread: one generate() per image, each from its own seed (A1111's seed + i). Returns the
        images and the applied LoRAs' A1111 hashes by name (hashed once per file, engine.lora.Lora)."""
        progress.job_count, progress.job_no, progress.step, progress.steps = len(plan.seeds), 0, 0, 0
        progress.started, progress.job_timestamp = time.time(), time.strftime("%Y%m%d%H%M%S")

        def on_step(step: int, total: int) -> None:
            progress.step, progress.steps = step, total

        def on_latents(step: int, total: int, latents) -> None:
            progress.latents, progress.latents_no = latents[:1].clone(), progress.latents_no + 1

        previews = dict(latents_callback=on_latents) if can_preview else {}
        try:
            try:
                server.switch_loras(plan.loras)  # [] too: a /generate request before may have left its set merged
            except (LoraError, FileNotFoundError) as err:
                raise ApiError(422, "prompt", f"prompt: {err}") from None
            images = []
            for i, seed in enumerate(plan.seeds):
                progress.job_no = i
                extra = {k: (v[i % len(v)] if k == "init_image" else v) for k, v in plan.init.items()}
                result = runner.generate(plan.prompt, negative_prompt=plan.negative_prompt, seed=seed,
                                         callback=on_step, **previews, **plan.runner_kwargs, **extra)
                images.append(plan.img2img.finish(result.images[0], i) if plan.img2img else result.images[0])
            return images, {lora["name"]: lora["hash"] for lora in result.parameters["loras"]}
        finally:
            progress.job_count, progress.latents, progress.preview = 0, None, None

    def prepare(fn, *args):
        """`fn(*args)` on the replica's prepare pool: decoding, preprocessing and encoding stay off the event loop."""
        return asyncio.get_running_loop().run_in_executor(server.prepare_pool, lambda: fn(*args))

    async def generate(req, plan: a1111.Plan) -> dict:
        loop = asyncio.get_running_loop()
        try:
            images, lora_hashes = await loop.run_in_executor(server.pool, run_plan, plan)
        except (ValueError, TypeError) as err:  # the Runner's own argument checks
            raise runner_error(err, a1111.RUNNER_WORDS) from None
        texts = [a1111_response.infotext(plan, runner, seed, i % req.batch_size, req.batch_size, lora_hashes)
                 for i, seed in enumerate(plan.seeds)]

        def encode():
            encoded = [png_b64(im, text) for im, text in zip(images, texts)]
            return encoded + [png_b64(u.control_map) for u in plan.units if u.save_detected_map]

        encoded = await prepare(encode) if req.send_images else []
        return dict(images=encoded, parameters=a1111_response.parameters(req, plan),
                    info=a1111_response.info_json(plan, runner, req, texts))

    def check_overrides(req) -> dict:
        """The per-request overrides this server honours, as Runner.generate arguments: sd_vae picks a loaded
        VAE (GET /sdapi/v1/sd-vae; "Automatic" the default, "None" the model's own). Any other key must
        equal the option in force."""
        from engine.vaes import pick

        current, kwargs = options(), {}
        for key, value in (req.override_settings or {}).items():
            if key == "sd_vae":
                try:
                    pick(value, runner.vaes, runner.parts.default_vae)
                except ValueError as err:
                    raise ApiError(422, "override_settings.sd_vae", f"override_settings.sd_vae: {err}") from None
                kwargs["vae"] = value
            elif current.get(key, object()) != value:
                raise ApiError(422, f"override_settings.{key}", f"override_settings.{key}={value!r}: this server's "
                                                                 f"options are fixed (GET /sdapi/v1/options)")
        req.override_settings = None
        return kwargs

    async def guarded(work):
        try:
            return await work()
        except ApiError as err:
            return _from_api_error(err)
        except Exception as err:  # noqa: BLE001 - one failed request must not take the replica down
            return error_response(500, None, f"generation failed: {type(err).__name__}: {err}", type(err).__name__)

    @app.post("/sdapi/v1/txt2img", response_model=ImageResponse, responses=ERRORS, tags=["A1111"])
    async def txt2img(req: Txt2ImgRequest):
        req = a1111.with_model_size(req, runner)

        async def work():
            overrides = check_overrides(req)
            plan = await prepare(a1111.plan_request, req, runner, server.limits, server.prompt_tokenizer,
                                 server.lora_dir)
            plan.runner_kwargs.update(overrides)
            return await generate(req, plan)

        return await guarded(work)

    @app.post("/sdapi/v1/img2img", response_model=ImageResponse, responses=ERRORS, tags=["A1111"])
    async def img2img(req: Img2ImgRequest):
        req = a1111.with_model_size(req, runner)

        async def work():
            overrides = check_overrides(req)
            from engine.serve.a1111.img2img import decode_init

            def plan_img2img():
                init = decode_init(req, server.limits)
                plan = a1111.plan_request(req, runner, server.limits, server.prompt_tokenizer, server.lora_dir,
                                          init.first_rgb)
                plan.init, plan.img2img = init.runner_kwargs, init
                plan.runner_kwargs.update(overrides)
                return plan

            return await generate(req, await prepare(plan_img2img))

        return await guarded(work)

    def model_title() -> str:
        name = runner.model.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
        return f"{name} [{a1111.short_hash(runner.model, 10)}]"

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], tags=["A1111"])
    async def sd_models():
        title = model_title()
        digest = a1111.short_hash(runner.model, 64)
        return [dict(title=title, model_name=title.rsplit(" [", 1)[0], hash=digest[:10], sha256=digest,
                     filename=runner.model, config=None)]

    @app.get("/sdapi/v1/sd-vae", response_model=list[SDVaeItem], tags=["A1111"])
    async def sd_vae():
        """The VAEs a request may pick with override_settings.sd_vae, beside "Automatic" and "None"."""
        return [dict(model_name=vae.name, filename=vae.source) for vae in runner.vaes.values() if vae.name != "model"]

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem], tags=["A1111"])
    async def samplers():
        return [dict(name=name, aliases=aliases, options={} if default == "uniform" else {"scheduler": default})
                for name, (aliases, default, _) in a1111.SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem], tags=["A1111"])
    async def schedulers():
        rho = {"karras": 7.0}
        return [dict(name=name, label=label, aliases=None, default_rho=rho.get(name, -1.0), need_inner_model=False)
                for name, label in a1111.SCHEDULES.items()]

    def options() -> dict:
        return dict(sd_model_checkpoint=model_title(), sd_checkpoint_hash=a1111.short_hash(runner.model, 64),
                    samples_format="png", eta_ddim=0.0, eta_ancestral=1.0, CLIP_stop_at_last_layers=1,
                    sd_vae=A1111_AUTOMATIC, control_net_unit_count=runner.num_controlnets,
                    control_net_models=a1111.controlnet_titles(runner.controlnet_specs))

    @app.get("/sdapi/v1/options", response_model=dict, tags=["A1111"])
    async def get_options():
        return options()

    @app.post("/sdapi/v1/options", response_model=dict, responses=ERRORS, tags=["A1111"])
    async def set_options(values: dict):
        current = options()
        for key, value in values.items():
            if current.get(key, object()) != value:
                field = key or "body"  # an option named "" (the fuzz sends one) is still a named field
                return error_response(422, field, f"{key!r}={value!r}: this server's options are fixed; in force: "
                                                  f"{current.get(key, 'no such option')!r}")
        return {}

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, responses=ERRORS, tags=["A1111"])
    async def get_progress(skip_current_image: bool = Query(False)):
        latents, number = progress.latents, progress.latents_no
        if not skip_current_image and latents is not None and number != progress.preview_no:
            image = await asyncio.get_running_loop().run_in_executor(None, runner.preview, latents)
            progress.preview, progress.preview_no = png_b64(image), number
        return progress.as_dict()

    @app.get("/sdapi/v1/scripts", response_model=ScriptsList, tags=["A1111"])
    async def scripts():
        return dict(txt2img=["controlnet"], img2img=["controlnet"])

    @app.get("/controlnet/version", response_model=VersionResponse, tags=["ControlNet"])
    async def cn_version():
        return dict(version=EXTENSION_API_VERSION)

    @app.get("/controlnet/model_list", response_model=ModelListResponse, responses=ERRORS, tags=["ControlNet"])
    async def cn_model_list(update: bool = Query(True)):
        return dict(model_list=a1111.controlnet_titles(runner.controlnet_specs))

    @app.get("/controlnet/module_list", response_model=ModuleListResponse, responses=ERRORS, tags=["ControlNet"])
    async def cn_module_list(alias_names: bool = Query(False)):
        from engine.preprocess import available, sorted_modules

        def sliders(m):
            return [dict(name=s.label, value=s.value, min=s.minimum, max=s.maximum, step=s.step)
                    for s in (m.resolution, m.threshold_a, m.threshold_b) if s is not None and s.visible]

        # The extension's order and names (alias_names: its UI names); model_free is its "needs no ControlNet
        # model" flag (reference_only and the like), false for every module here.
        modules = {(m.alias if alias_names else m.key): m for m in sorted_modules() if available(m)}
        return dict(module_list=list(modules),
                    module_detail={name: dict(model_free=False, sliders=sliders(m)) for name, m in modules.items()})

    @app.get("/controlnet/control_types", response_model=ControlTypesResponse, tags=["ControlNet"])
    async def cn_control_types():
        from engine.preprocess import available, find_module, sorted_modules

        titles = a1111.controlnet_titles(runner.controlnet_specs)
        usable = [m for m in sorted_modules() if available(m)]
        types = {"All": dict(module_list=[m.key for m in usable], model_list=["None", *titles],
                             default_option="none", default_model="None")}
        for spec, title in zip(runner.controlnet_specs, titles):
            default = find_module(spec.preprocessor) if spec.preprocessor else None
            tag = default.tags[0] if default is not None else None  # the extension's control type of the net
            modules = ["none", *(m.key for m in usable if tag in m.tags)]
            types[spec.name.replace("_", " ").title()] = dict(
                module_list=modules, model_list=["None", title], default_model=title,
                default_option=default.key if default is not None and default.key in modules else "none")
        return dict(control_types=types)

    @app.get("/controlnet/settings", response_model=ControlNetSettingsResponse, tags=["ControlNet"])
    async def cn_settings():
        return dict(control_net_unit_count=runner.num_controlnets)

    @app.post("/controlnet/detect", response_model=DetectResponse, responses=ERRORS, tags=["ControlNet"])
    async def cn_detect(req: DetectRequest):
        async def work():
            field = "controlnet_input_images" if req.controlnet_input_images else "controlnet_images"
            pictures = req.controlnet_input_images or req.controlnet_images or []
            module = a1111_control.check_module(req.controlnet_module, "controlnet_module")
            if module.needs_mask:
                raise ApiError(422, "controlnet_module", f"controlnet_module {req.controlnet_module!r} builds its map from "
                                                         "a picture and a mask, which /controlnet/detect here does not take")
            if not pictures:
                raise ApiError(422, "controlnet_input_images", "controlnet_input_images: no image given")
            if len(pictures) > server.limits.max_images:
                raise ApiError(422, field, f"{field}: at most {server.limits.max_images} images per call")
            if req.controlnet_masks:
                raise ApiError(422, "controlnet_masks", "controlnet_masks are not taken here: the inpaint modules' maps "
                                                        "need a mask (POST /generate builds them from mask_image)")
            resolution = a1111_control.slider_value(module.resolution, req.controlnet_processor_res,
                                                    "controlnet_processor_res")
            thr_a = a1111_control.slider_value(module.threshold_a, req.controlnet_threshold_a, "controlnet_threshold_a")
            thr_b = a1111_control.slider_value(module.threshold_b, req.controlnet_threshold_b, "controlnet_threshold_b")

            seed = random.randrange(2**32)  # the extension's detect runs on numpy's unseeded state (shuffle)

            def run():
                maps = []
                for i, picture in enumerate(pictures):
                    where = f"{field}.{i}"
                    image = a1111_control.decode_rgb(picture, where, server.limits)
                    detected = a1111_control.detect(module, image, resolution, thr_a, thr_b, runner.annotators,
                                                      server.limits, where, "controlnet_module", seed)
                    maps.append(png_b64(detected))
                return maps

            return dict(images=await prepare(run), info="Success")

        return await guarded(work)

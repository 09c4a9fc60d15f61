"""The HTTP request format of `POST /generate`: parsing, validation, and the batching key.

A request is JSON or multipart form data with the fields in FIELDS (the names of `Runner.generate`'s
arguments) plus `image`: one control image per ControlNet, as a base64 string (a data URL is fine) in
JSON, or as a file (or base64 text) in a multipart form. `init_image` (img2img) and `mask_image`
(inpainting, with init_image; white repaints) come the same way; with a mask, `image` may be left out
when every ControlNet is an inpaint one (its map is built from init image and mask). Every check runs here, before the request
reaches a replica's batch queue, so a bad request costs no model work and is answered with
`ApiError` -> 4xx JSON `{"error": message, "field": name}`. Nothing here imports torch or Ray.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import random
import re
from dataclasses import dataclass

import PIL.Image

MAX_SEED = 2**32 - 1
RESPONSE_FORMATS = ("json", "png")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; keeps a single client from tying a replica up for minutes."""

    max_side: int = 1024  # height/width, pixels, given or taken from the init / control image
    max_steps: int = 100
    max_images: int = 4  # num_images_per_prompt; A1111: batch_size x n_iter; images per /controlnet/detect
    max_prompt_chars: int = 2000
    # Of any picture the server holds: an upload (checked from its header, before decoding) and every image made
    # from it (A1111's preprocessor resolution and resize modes), so a thin strip cannot ask for gigabytes.
    max_image_pixels: int = 4096 * 4096
    max_body_bytes: int = 32 * 2**20  # every route (engine/serve/guard.py)
    max_loras: int = 8  # LoRAs per request: the loras field, or distinct <lora:...> names in an A1111 prompt
    max_images_per_call: int = 16  # batch_mode "merge": images one generate() call makes


class ApiError(Exception):
    """An error: HTTP status, the offending field ("body" for the request as a whole; None only on a 5xx) and
    why."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {"error": self.message, "field": self.field}


def runner_error(err: Exception, words: dict[str, str]) -> ApiError:
    """A Runner argument check that a request passed the API's own checks to fail (a preprocessor without
    its annotator, a strength that keeps no step), as a 422 naming the field: the one whose word comes first
    in the message (`words`: the Runner's names -> the route's fields), else "body" (the request as a whole)."""
    text = str(err)
    found = [(m.start(), field) for word, field in words.items()
             for m in [re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", text)] if m]
    return ApiError(422, min(found)[1] if found else "body", text)


@dataclass
class GenerateRequest:
    prompt: str
    images: list  # PIL RGB images, one per ControlNet
    image_digest: str  # sha256 over the decoded pixels: requests with equal digests share a control map
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    controlnet_conditioning_scale: float | None = None  # None: diffusers' default for the mode (1.0, 0.8, 0.5)
    guess_mode: bool = False
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    scheduler: str = "unipc"
    seed: int = 0
    num_images_per_prompt: int = 1
    preprocess: str = "auto"
    canny_low: int = 100
    canny_high: int = 200
    response_format: str = "json"
    strength: float | None = None  # img2img/inpaint; None: the mode's default (0.8, 1.0)
    init_image: object = None  # PIL RGB image (img2img, inpaint)
    mask_image: object = None  # PIL image, the init image's size (inpaint)
    loras: tuple = ()  # ((name, weight), ...): LoRAs of the server's --lora-dir, by A1111 name
    eta: float = 0.0  # DDIM's eta; TCD's gamma (the tcd scheduler's stochasticity)
    vae: str | None = None  # a loaded VAE by name ("model", or the server's --vae, e.g. "taesd"); None: the default
    control_type: object = None  # ControlNet-Union types: one (a name or diffusers' index), or a tuple per ControlNet


@dataclass(frozen=True)
class Field:
    """One field of POST /generate: its kind, default and bounds. The server's checks (`_check_ranges`) and the
    OpenAPI schema (engine/serve/openapi.py) are both read from this table, so the two cannot disagree.
    A bound given as a string names the `Limits` attribute that holds it."""

    kind: str  # "str", "int", "float", "bool", "loras" or "control_type"
    default: object = None  # None: not given (the Runner's default, or required for `prompt`)
    minimum: float | None = None
    maximum: float | str | None = None
    exclusive_minimum: bool = False
    multiple_of: int | None = None
    max_length: str | None = None  # strings: characters; loras: entries
    choices: object = None  # a function returning the allowed values

    def bounds(self, limits: Limits) -> tuple:
        high = getattr(limits, self.maximum) if isinstance(self.maximum, str) else self.maximum
        return self.minimum, high

    def length(self, limits: Limits) -> int | None:
        return None if self.max_length is None else getattr(limits, self.max_length)


FIELDS = {
    "prompt": Field("str", max_length="max_prompt_chars"),
    "negative_prompt": Field("str", max_length="max_prompt_chars"),
    "height": Field("int", None, 64, "max_side", multiple_of=8),
    "width": Field("int", None, 64, "max_side", multiple_of=8),
    "num_inference_steps": Field("int", 20, 1, "max_steps"),
    "guidance_scale": Field("float", 7.5, 0.0, 30.0),
    "controlnet_conditioning_scale": Field("float", None, 0.0, 2.0),
    "guess_mode": Field("bool", False),
    "control_guidance_start": Field("float", 0.0, 0.0, 1.0),
    "control_guidance_end": Field("float", 1.0, 0.0, 1.0),
    "scheduler": Field("str", "unipc", choices=lambda: _schedulers()),
    "seed": Field("int", None, 0, MAX_SEED),
    "num_images_per_prompt": Field("int", 1, 1, "max_images"),
    "preprocess": Field("str", "auto", choices=lambda: _preprocessors()),
    "canny_low": Field("int", 100, 0, 255),
    "canny_high": Field("int", 200, 0, 255),
    "response_format": Field("str", "json", choices=lambda: RESPONSE_FORMATS),
    "strength": Field("float", None, 0.0, 1.0, exclusive_minimum=True),
    "loras": Field("loras", (), max_length="max_loras"),
    "eta": Field("float", 0.0, 0.0, 1.0),  # DDIM's eta, TCD's gamma
    "vae": Field("str", None, max_length="max_prompt_chars"),  # a loaded VAE's name: the Runner checks which
    "control_type": Field("control_type"),  # a name or diffusers' index, or one per ControlNet (_coerce_control_type)
}
IMAGE_FIELDS = ("image", "init_image", "mask_image")  # decoded pictures, not in FIELDS
# The Runner's argument names (and words its checks use for them) -> POST /generate's fields, for
# `runner_error`. The rest (control images, ControlNets) is the `image` field.
GENERATE_WORDS = {**{name: name for name in (*FIELDS, *IMAGE_FIELDS)}, "preprocessor": "preprocess",
                  "control guidance": "control_guidance_start", "control image": "image", "ControlNet": "image"}
LORA_NAME = re.compile(r"^[\w][\w .\-]*$")  # a file name without extension: no folders, so no paths


def _schedulers() -> tuple[str, ...]:
    from engine.schedulers import SCHEDULERS  # imported here: it pulls in diffusers

    return tuple(SCHEDULERS)


def _preprocessors() -> tuple[str, ...]:
    """auto, then every module of engine/preprocess's table this server can run (keys and UI names)."""
    from engine.preprocess import available, find_module, names

    return ("auto", *(n for n in names() if available(find_module(n))))


def _coerce(name: str, kind: str, value, from_form: bool):
    """One field to its Python type. Form fields arrive as text; JSON values must already have the type."""
    if value is None:
        return None
    if kind == "loras":
        return _coerce_loras(value, from_form)
    if kind == "control_type":
        return _coerce_control_type(value, from_form)
    if from_form and isinstance(value, str):
        text = value.strip()
        if text == "" and kind != "str":
            return None  # an empty form field means "not given"
        try:
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
            if kind == "bool":
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(text)
        except ValueError:
            raise ApiError(422, name, f"{name} must be {_KIND_WORDS[kind]}, got {value!r}") from None
        return value
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 4.0 is the integer 4 (as JSON schema's "integer" says)
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        raise ApiError(422, name, f"{name} must be {_KIND_WORDS[kind]}, got {value!r}")
    return float(value) if kind == "float" else value


def _json_or_plain(text: str, plain):
    """A form field's text that is JSON or a plain-text form of it: the JSON where it parses, else plain(text)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return plain(text)


def _coerce_loras(value, from_form: bool) -> tuple:
    """`loras`: [[name, weight], ...] or [{"name": ..., "weight": ...}, ...] in JSON; in a form, that JSON as
    text or "name:weight, name:weight". Names are LoRA file names in the server's LoRA folder (no paths)."""
    def name_weight_pairs(text: str) -> list:
        pairs = [item.strip().rpartition(":")[::2] if ":" in item else (item.strip(), 1.0)
                 for item in text.split(",") if item.strip()]
        try:
            return [(name, float(weight)) for name, weight in pairs]
        except ValueError:
            raise ApiError(422, "loras", f"loras must be 'name:weight, ...' or JSON, got {text!r}") from None

    if from_form and isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        value = _json_or_plain(text, name_weight_pairs)
    if not isinstance(value, (list, tuple)):
        raise ApiError(422, "loras", f"loras must be a list of [name, weight] pairs, got {value!r}")
    pairs = []
    for item in value:
        if isinstance(item, dict) and set(item) <= {"name", "weight"} and "name" in item:
            item = (item["name"], item.get("weight", 1.0))
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ApiError(422, "loras", f"each LoRA must be [name, weight] or {{name, weight}}, got {item!r}")
        name, weight = item
        if not isinstance(name, str) or not LORA_NAME.match(name):
            raise ApiError(422, "loras", f"a LoRA name must be a file name in the server's LoRA folder (no path), "
                                         f"got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ApiError(422, "loras", f"the weight of LoRA {name!r} must be a finite number, got {weight!r}")
        pairs.append((name, float(weight)))
    return tuple(pairs)


def _coerce_control_type(value, from_form: bool):
    """`control_type`: a ControlNet-Union's condition type (a name or diffusers' index), or a list with one per
    ControlNet (null for plain ones; one condition per net over HTTP). A form gives the name, or the list as JSON
    or "none,depth"."""
    from engine.registry import union_type

    if from_form and isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        value = _json_or_plain(text, lambda text: [None if t.strip() == "none" else t.strip() for t in text.split(",")]
                               if "," in text else text)
        number = lambda v: int(v) if isinstance(v, str) and v.isdigit() else v  # noqa: E731
        value = [number(v) for v in value] if isinstance(value, list) else number(value)
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        try:
            if item is not None:
                union_type(item)
        except ValueError as err:
            raise ApiError(422, "control_type", str(err)) from None
    return tuple(items) if isinstance(value, (list, tuple)) else value


_KIND_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _check_field(name: str, spec: Field, value, limits: Limits) -> None:
    """The bounds, step, length and choices of one field's value, as FIELDS states them."""
    if value is None:  # unset: the Runner's default
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(422, name, f"{name} must be a finite number, got {value!r}")
    low, high = spec.bounds(limits)
    if spec.multiple_of is not None and (value % spec.multiple_of or not low <= value <= high):
        raise ApiError(422, name, f"{name} must be a multiple of {spec.multiple_of} in [{low}, {high}], got {value!r}")
    if spec.exclusive_minimum and not low < value <= high:
        raise ApiError(422, name, f"{name} must be a number with {low:g} < {name} <= {high:g}, got {value!r}")
    if low is not None and not low <= value <= high:
        raise ApiError(422, name, f"{name} must be in [{low}, {high}], got {value!r}")
    length = spec.length(limits)
    if length is not None and len(value) > length:
        what = "LoRAs per request" if spec.kind == "loras" else "characters"
        raise ApiError(422, name, f"{name}: at most {length} {what}, got {len(value)}")
    if spec.choices is not None and value not in spec.choices():
        raise ApiError(422, name, f"{name} must be one of {', '.join(spec.choices())}, got {value!r}")


def _check_ranges(values: dict, limits: Limits) -> None:
    from engine.preprocess import find_module, missing_extra

    module = find_module(values["preprocess"]) if isinstance(values["preprocess"], str) else None
    if module is not None and missing_extra(module):  # a known module whose pip extra is missing: say which
        raise ApiError(422, "preprocess", f"preprocess {values['preprocess']!r} is not available: {missing_extra(module)}")
    for name, spec in FIELDS.items():
        _check_field(name, spec, values[name], limits)
    # What one field's bounds cannot say (the OpenAPI schema states these in words or as dependencies).
    if values["control_guidance_start"] >= values["control_guidance_end"]:
        raise ApiError(
            422, "control_guidance_end",
            f"control_guidance_end must be greater than control_guidance_start, got start="
            f"{values['control_guidance_start']}, end={values['control_guidance_end']}",
        )
    if values["canny_low"] > values["canny_high"]:
        raise ApiError(422, "canny_low", f"canny_low must be <= canny_high, got {values['canny_low']} > {values['canny_high']}")
    if values["response_format"] == "png" and values["num_images_per_prompt"] != 1:
        raise ApiError(422, "response_format", "response_format 'png' returns one image: use 'json' for num_images_per_prompt > 1")
    if not (values["prompt"] or "").strip():
        raise ApiError(422, "prompt", "prompt is required and must be a non-empty string")
    if "<lora:" in values["prompt"]:  # never sent to the text encoder as words, never silently dropped
        raise ApiError(422, "prompt", "<lora:NAME:WEIGHT> tags are not read from the prompt over HTTP: give the LoRAs "
                                      "in the loras field, e.g. [[\"NAME\", 0.8]]")


def open_image(data: bytes | str, limits: Limits, name: str = "image") -> PIL.Image.Image:
    """Raw file bytes or base64 text (a data URL is fine) -> a PIL image whose header is read and checked but whose
    pixels are not decoded yet (`to_rgb` decodes), or ApiError naming `name`. `build_request` decodes only once
    every field and size check has passed, so a refused request costs no decoding."""
    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, name, f"{name} must be base64-encoded image bytes (PNG, JPEG, WebP, ...): not valid base64") from None
    if not data:
        raise ApiError(422, name, f"{name} is empty")
    try:
        opened = PIL.Image.open(io.BytesIO(data))
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ApiError(422, name, f"{name} is not a readable image (PNG, JPEG, WebP, ...): {type(err).__name__}") from None
    w, h = opened.size  # from the header: huge images are refused before they are decoded
    if w * h > limits.max_image_pixels:
        raise ApiError(422, name, f"{name} is {w}x{h}; at most {limits.max_image_pixels} pixels are allowed")
    return opened


def to_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """Decode an `open_image` result (or convert a ready image) to RGB; a broken file is an ApiError naming `name`."""
    try:
        return image.convert("RGB")
    except Exception as err:  # truncated or corrupt data surfaces only now
        raise ApiError(422, name, f"{name} is not a readable image (PNG, JPEG, WebP, ...): {type(err).__name__}") from None


def image_digest(images: list) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def _check_image_count(count: int, num_controlnets: int, inpaint: bool = False) -> None:
    # Called before decoding too, so a body with a thousand images is refused without decoding them.
    if count == 0 and inpaint:
        return  # inpaint ControlNets build their maps from init image and mask (the Runner checks the rest)
    if count == 0:
        raise ApiError(422, "image", "image is required: a control image as a file (multipart) or base64 string (JSON)")
    if count != num_controlnets:
        raise ApiError(422, "image", f"give one image per ControlNet: this server has {num_controlnets}, got {count}")


def _check_derived_size(values: dict, source, field: str, limits: Limits) -> None:
    """A side left out comes from the init image, else the first control image, rounded down to a multiple of 8
    (`Runner.generate`); it is held to max_side like a side given, so a large picture cannot ask for a large
    generation."""
    if source is None:
        return
    width, height = source.size
    for side, derived in (("height", height // 8 * 8), ("width", width // 8 * 8)):
        if values[side] is None and derived > limits.max_side:
            raise ApiError(422, field, f"{side} was not given, so it comes from {field} ({width}x{height}): {derived} "
                                       f"is over this server's max_side {limits.max_side}; give height and width, or a "
                                       f"picture at most {limits.max_side} pixels on each side")


def build_request(fields: dict, images: list, limits: Limits, num_controlnets: int, from_form: bool = False,
                  init_image=None, mask_image=None) -> GenerateRequest:
    """Checked request from field values (JSON types, or form text when from_form) and images (`open_image`'s,
    decoded here after the checks, or ready PIL images)."""
    unknown = sorted(set(fields) - set(FIELDS) - set(IMAGE_FIELDS))
    if unknown:
        raise ApiError(422, unknown[0], f"unknown field(s) {', '.join(unknown)}; allowed: "
                                        f"{', '.join(IMAGE_FIELDS)}, {', '.join(FIELDS)}")
    values = {}
    for name, spec in FIELDS.items():
        value = _coerce(name, spec.kind, fields.get(name), from_form)
        values[name] = spec.default if value is None else value
    _check_ranges(values, limits)
    if mask_image is not None and init_image is None:
        raise ApiError(422, "mask_image", "mask_image needs an init_image: inpainting repaints the masked part of it")
    if values["strength"] is not None and init_image is None:
        raise ApiError(422, "strength", "strength needs an init_image (img2img or inpaint)")
    if mask_image is not None and mask_image.size != init_image.size:
        raise ApiError(422, "mask_image", f"mask_image is {mask_image.size[0]}x{mask_image.size[1]} but init_image is "
                                          f"{init_image.size[0]}x{init_image.size[1]}: give a mask of its size")
    _check_image_count(len(images), num_controlnets, inpaint=mask_image is not None)
    _check_derived_size(values, init_image if init_image is not None else (images[0] if images else None),
                        "init_image" if init_image is not None else "image", limits)
    images = [to_rgb(im, "image") for im in images]  # every check passed: now decode
    init_image = None if init_image is None else to_rgb(init_image, "init_image")
    mask_image = None if mask_image is None else to_rgb(mask_image, "mask_image")
    if values["negative_prompt"] is not None and not values["negative_prompt"].strip():
        values["negative_prompt"] = None  # the Runner's "no negative prompt"; it refuses blank strings
    if values["seed"] is None:
        # Drawn here, not by the Runner, so the batch handler knows each request's seed up front.
        values["seed"] = random.randrange(MAX_SEED + 1)
    return GenerateRequest(images=images, image_digest=image_digest(images), init_image=init_image,
                           mask_image=mask_image, **values)


def parse_json(body: bytes, limits: Limits, num_controlnets: int) -> GenerateRequest:
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ApiError(400, "body", f"request body is not valid JSON: {err}") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "body", f"request body must be a JSON object, got {type(fields).__name__}")
    raw = fields.get("image")
    raw = raw if isinstance(raw, list) else ([] if raw is None else [raw])
    _check_image_count(len(raw), num_controlnets, inpaint=fields.get("mask_image") is not None)
    for item in raw:
        if not isinstance(item, str):
            raise ApiError(422, "image", f"image must be a base64 string (or a list of them), got {type(item).__name__}")
    extra = {}
    for name in ("init_image", "mask_image"):
        item = fields.get(name)
        if item is not None and not isinstance(item, str):
            raise ApiError(422, name, f"{name} must be a base64 string, got {type(item).__name__}")
        extra[name] = None if item is None else open_image(item, limits, name)
    images = [open_image(item, limits) for item in raw]
    return build_request(fields, images, limits, num_controlnets, **extra)


def parse_form(items: list, limits: Limits, num_controlnets: int) -> GenerateRequest:
    """A form's [(name, value)] (`form_items`): `image` fields are uploaded files' bytes or base64 text; the rest
    are text."""
    fields, images, extra = {}, [], {}
    _check_image_count(sum(key == "image" for key, _ in items), num_controlnets,
                       inpaint=any(key == "mask_image" for key, _ in items))
    for key, value in items:
        if key == "image":
            images.append(open_image(value, limits))
        elif key in ("init_image", "mask_image"):
            if key in extra:
                raise ApiError(422, key, f"{key} is given more than once")
            extra[key] = open_image(value, limits, key)
        elif isinstance(value, bytes):
            raise ApiError(422, key, f"{key} must be a text field, not a file")
        elif key in fields:
            raise ApiError(422, key, f"{key} is given more than once")
        else:
            fields[key] = value
    return build_request(fields, images, limits, num_controlnets, from_form=True, **extra)


async def form_items(form) -> list:
    """A starlette FormData as [(name, text or an uploaded file's bytes)]."""
    return [(key, await value.read() if hasattr(value, "read") else value) for key, value in form.multi_items()]


async def parse_http(request, limits: Limits, num_controlnets: int, pool=None) -> GenerateRequest:
    """A starlette Request (JSON or multipart) -> GenerateRequest, or ApiError. The body is read on the event
    loop; parsing and decoding the pictures run on `pool` (an executor; None: asyncio's default), so a large
    picture never stalls the loop. The body's size is capped before this, for every route (guard.BodyLimit)."""
    import asyncio
    import functools

    def off_loop(fn, *args):
        return asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, limits, num_controlnets))

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("application/json", ""):
        return await off_loop(parse_json, await request.body())
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_part_size=limits.max_body_bytes)
        except Exception as err:  # malformed multipart bodies raise from the parser
            raise ApiError(400, "body", f"request body is not valid form data: {err}") from None
        try:
            return await off_loop(parse_form, await form_items(form))
        finally:
            await form.close()
    raise ApiError(415, "content-type", f"content type {ctype!r} is not supported; send application/json or multipart/form-data")


def batch_key(req: GenerateRequest) -> tuple:
    """Requests with equal keys do the same work per image: same shape, steps, schedule and control settings.

    The size comes from the control image when height/width are not given, so it is in the key too.
    Prompt, negative prompt, seed and the image itself are not: they change values, not the shape.
    The LoRA set is: it changes the weights, so requests with different sets never share a generate() call.
    """
    return (
        req.height, req.width, tuple(im.size for im in req.images), req.num_inference_steps, req.guidance_scale,
        req.controlnet_conditioning_scale, req.guess_mode, req.control_guidance_start, req.control_guidance_end,
        req.scheduler, req.num_images_per_prompt, req.preprocess, req.canny_low, req.canny_high,
        None if req.init_image is None else req.init_image.size, req.mask_image is not None, req.strength, req.loras,
        req.eta, req.vae,
        req.control_type,
    )


def runner_kwargs(req: GenerateRequest, registered_preprocessors: list) -> dict:
    """`Runner.generate` arguments for a request (all but prompt/negative prompt/image/seed)."""
    from engine.preprocess import canny_with, find_module

    choices = []
    for registered in registered_preprocessors:
        name = registered if req.preprocess == "auto" else req.preprocess
        if name is not None and find_module(name).key == "canny":
            choices.append(canny_with(req.canny_low, req.canny_high))
        elif req.preprocess == "auto":
            choices.append(None)
        elif name == "none":
            choices.append(False)
        else:
            choices.append(name)
    return dict(
        height=req.height,
        width=req.width,
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        controlnet_conditioning_scale=req.controlnet_conditioning_scale,
        guess_mode=req.guess_mode,
        control_guidance_start=req.control_guidance_start,
        control_guidance_end=req.control_guidance_end,
        scheduler=req.scheduler,
        num_images_per_prompt=req.num_images_per_prompt,
        preprocess=choices if len(choices) > 1 else choices[0],
        init_image=req.init_image,
        mask_image=req.mask_image,
        strength=req.strength,
        eta=req.eta,
        vae=req.vae,
        control_type=list(req.control_type) if isinstance(req.control_type, tuple) else req.control_type,
    )

"""The OpenAPI entry of `POST /generate`, built from the table the server checks (`api.FIELDS`) and the
replica's `Limits`, so the schema states every bound the server enforces, and a body the server accepts
validates against it. What one field's schema cannot say (start < end, canny_low <= canny_high) is in the
field's description. The route parses its body itself (JSON or multipart), so FastAPI cannot infer this:
it goes in as `openapi_extra`. Nothing here imports torch or Ray.
"""
from __future__ import annotations

from engine.serve.api import FIELDS, IMAGE_FIELDS, LORA_NAME, Field, Limits

_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
_NOTES = {
    "control_guidance_end": "must be greater than control_guidance_start",
    "canny_low": "must be <= canny_high",
    "response_format": "'png' returns one image (num_images_per_prompt 1)",
    "control_type": "ControlNet-Union condition type: openpose, depth, hed, scribble, canny, lineart, normal, segment, "
                    "tile, repaint, or diffusers' index; or a list with one per ControlNet (null for plain ones)",
    "loras": "LoRAs of the server's lora_dir, by file name without extension: [name, weight] or {name, weight}",
}
BASE64_IMAGE = {"type": "string", "minLength": 1, "contentEncoding": "base64", "contentMediaType": "image/*"}


def field_schema(name: str, spec: Field, limits: Limits) -> dict:
    """One field: its type, bounds, step, length and choices; null where null means "not given"."""
    if spec.kind == "loras":
        pair = {"type": "array", "prefixItems": [{"type": "string", "pattern": LORA_NAME.pattern}, {"type": "number"}],
                "items": False, "minItems": 2, "maxItems": 2}
        named = {"type": "object", "required": ["name"], "additionalProperties": False,
                 "properties": {"name": {"type": "string", "pattern": LORA_NAME.pattern}, "weight": {"type": "number"}}}
        return {"type": ["array", "null"], "items": {"oneOf": [pair, named]}, "maxItems": spec.length(limits),
                "default": [], "description": _NOTES[name]}
    if spec.kind == "control_type":
        per_net = {"type": "array", "items": {"type": ["string", "integer", "null"]}}
        return {"oneOf": [{"type": ["string", "integer", "null"]}, per_net], "description": _NOTES[name]}
    prop: dict = {"type": _TYPES[spec.kind] if name == "prompt" else [_TYPES[spec.kind], "null"]}
    low, high = spec.bounds(limits)
    if low is not None:
        prop["exclusiveMinimum" if spec.exclusive_minimum else "minimum"] = low
        prop["maximum"] = high
    if spec.multiple_of is not None:
        prop["multipleOf"] = spec.multiple_of
    if spec.length(limits) is not None:
        prop["maxLength"] = spec.length(limits)
    if spec.choices is not None:
        prop["enum"] = [*spec.choices(), None]
    if spec.default is not None:
        prop["default"] = spec.default
    if name == "prompt":  # required, with a word in it, and no <lora:...> tags (the loras field holds LoRAs)
        prop.update(minLength=1, pattern=r"\S", **{"not": {"pattern": "<lora:"}})
    if name in _NOTES:
        prop["description"] = _NOTES[name]
    return prop


def _when_given(field: str, schema: dict) -> dict:
    return {"properties": {field: schema}, "required": [field]}


def request_schema(limits: Limits, num_controlnets: int, inpaint_only: bool) -> dict:
    """The JSON body. `inpaint_only`: every ControlNet is an inpaint one, so `image` may be left out when a
    mask is given (its map is built from init image and mask)."""
    properties = {name: field_schema(name, spec, limits) for name, spec in FIELDS.items()}
    many = {"type": "array", "items": BASE64_IMAGE, "minItems": num_controlnets, "maxItems": num_controlnets}
    image = {"oneOf": [BASE64_IMAGE, many]} if num_controlnets == 1 else many
    image["description"] = f"control image(s), base64 (a data URL is fine): one per ControlNet ({num_controlnets})"
    properties.update(
        image=image,
        init_image={**BASE64_IMAGE, "type": ["string", "null"], "description": "img2img / inpaint: the picture to start from"},
        mask_image={**BASE64_IMAGE, "type": ["string", "null"],
                    "description": "inpaint (needs init_image, same size): white is repainted"},
    )
    assert set(properties) == {*FIELDS, *IMAGE_FIELDS}
    # What holds between fields, where JSON schema can say it.
    rules = [
        {"if": _when_given("mask_image", {"type": "string"}), "then": _when_given("init_image", {"type": "string"})},
        {"if": _when_given("strength", {"type": "number"}), "then": _when_given("init_image", {"type": "string"})},
        {"if": _when_given("response_format", {"const": "png"}),
         "then": {"properties": {"num_images_per_prompt": {"enum": [1, None]}}}},
    ]
    required = ["prompt"]
    if inpaint_only:
        rules.append({"anyOf": [{"required": ["image"]}, _when_given("mask_image", {"type": "string"})]})
    else:
        required.append("image")
    return {"type": "object", "required": required, "additionalProperties": False, "properties": properties,
            "allOf": rules}


def generate_operation(limits: Limits, num_controlnets: int, inpaint_only: bool = False) -> dict:
    """Request and response schemas of POST /generate, for FastAPI's `openapi_extra`."""
    form_body = {"type": "object", "required": ["prompt"],
                 "properties": {**{k: {"type": "string"} for k in FIELDS},
                                "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                                "init_image": {"type": "string", "format": "binary"},
                                "mask_image": {"type": "string", "format": "binary"}}}
    b64_list = {"type": "array", "items": {"type": "string"}}
    result = {"type": "object", "required": ["images", "control_maps", "seed", "timings", "parameters", "batch"],
              "properties": {"images": b64_list, "control_maps": b64_list, "seed": {"type": "integer"},
                             "timings": {"type": "object", "additionalProperties": {"type": "number"}},
                             "parameters": {"type": "object"}, "batch": {"type": "object"}}}
    error = {"description": "bad request: {error, field}", "content": {"application/json": {"schema": error_schema()}}}
    return {
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": request_schema(limits, num_controlnets, inpaint_only)},
                                    "multipart/form-data": {"schema": form_body}}},
        "responses": {
            "200": {"description": "the images (JSON), or one PNG with response_format 'png'",
                    "content": {"application/json": {"schema": result},
                                "image/png": {"schema": {"type": "string", "format": "binary"}}}},
            **{str(status): error for status in (400, 401, 413, 415, 422, 500, 503)},
        },
    }


def error_schema() -> dict:
    return {"type": "object", "required": ["error", "field"],
            "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}}}

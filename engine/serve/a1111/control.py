"""ControlNet unit images as the A1111 ControlNet extension prepares them: decode, preprocess, fit.

The extension turns a unit's picture into the control map in three steps, reproduced here from its
documented behaviour (sd-webui-controlnet `scripts/controlnet.py`, `internal_controlnet/external_code.py`):

1. Decode: base64 (a data URL is fine); an alpha channel is composited over white, as its HWC3 does.
2. Preprocess (`module`) at `processor_res`: the picture is scaled so its short side is processor_res
   (INTER_CUBIC up, INTER_AREA down), padded to a multiple of 64 with its edge pixels, run, and the pad
   cut off. `pixel_perfect` picks processor_res from the target size and resize mode instead.
3. Fit to the generation size (`resize_mode`): "Just Resize" stretches; "Crop and Resize" scales to cover
   and crops the centre; "Resize and Fill" scales to fit and pads with the median border colour.
   Interpolation as the extension chooses it: NEAREST for maps of 3..199 colours (segmentation),
   AREA when shrinking, CUBIC when growing; binary maps are re-binarised with Otsu's threshold after.
   Not reproduced: its non-maximum suppression and thinning of one-pixel edges when a binary map is
   resized (maps already at the target size, e.g. with pixel_perfect, are not resized at all).

Every image made on the way (the picture at processor resolution, the scaled map before its crop) is held to
`Limits.max_image_pixels` like an upload: scaling by the short side makes the long side of a thin strip grow
without bound (a 16000x1 picture in a 512x512 unit would ask for ~12 GB), so such a request is refused with
a 422 naming the unit's field, before anything is allocated. Within the bound the steps are the extension's.

The engine ships model-free preprocessors only: none, canny, invert, tile_resample. The result is an
HxWx3 uint8 array, handed to `Runner.generate(preprocess=False)`. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.serve.api import ApiError, Limits, open_image

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # index = the extension's number
RESIZE_MODE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Envelope (Outer Fit)": "Resize and Fill",
}


@dataclass(frozen=True)
class Slider:
    label: str
    value: float  # the extension's default, used when the request sends -1
    minimum: float
    maximum: float
    step: float = 1.0


@dataclass(frozen=True)
class Module:
    name: str
    resolution: Slider | None  # None: the module ignores processor_res
    threshold_a: Slider | None
    threshold_b: Slider | None


RESOLUTION = Slider("Resolution", 512, 64, 2048)
MODULES = {
    "none": Module("none", None, None, None),
    "canny": Module("canny", RESOLUTION, Slider("Canny Low Threshold", 100, 1, 255),
                    Slider("Canny High Threshold", 200, 1, 255)),
    "invert": Module("invert", None, None, None),
    "tile_resample": Module("tile_resample", None, Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01), None),
}
# The extension's preprocessors that need annotator models: named so the error can say why.
ANNOTATOR_MODULES = ("depth_midas", "depth_zoe", "depth_leres", "openpose", "openpose_full", "mlsd", "normal_bae",
                     "seg_ofade20k", "scribble_hed", "softedge_hed", "softedge_pidinet", "lineart_realistic",
                     "lineart_anime", "shuffle", "inpaint_only", "reference_only", "ip-adapter_clip_sd15")


def check_module(name: str, field: str) -> Module:
    if name in MODULES:
        return MODULES[name]
    why = "it needs an annotator model that this engine does not ship" if name in ANNOTATOR_MODULES else "it is unknown"
    raise ApiError(422, field, f"{field} {name!r} is not available ({why}); this server has: {', '.join(MODULES)}. "
                               "Send a ready control map with module 'none'")


def slider_value(slider: Slider | None, value: float, field: str) -> float | None:
    """-1 (the extension's "unset") means the default; a value outside the slider's range is an error."""
    if slider is None:
        return None
    if value == -1:
        return slider.value
    if not slider.minimum <= value <= slider.maximum:
        raise ApiError(422, field, f"{field} must be in [{slider.minimum:g}, {slider.maximum:g}] (or -1 for "
                                   f"{slider.value:g}), got {value!r}")
    return float(value)


def resize_mode_index(value, field: str) -> int:
    if isinstance(value, bool):
        raise ApiError(422, field, f"{field} must be one of {', '.join(RESIZE_MODES)} or 0/1/2, got {value!r}")
    if isinstance(value, int) and 0 <= value < len(RESIZE_MODES):
        return value
    if isinstance(value, str):
        name = RESIZE_MODE_ALIASES.get(value, value)
        if name in RESIZE_MODES:
            return RESIZE_MODES.index(name)
    raise ApiError(422, field, f"{field} must be one of {', '.join(RESIZE_MODES)} or 0/1/2, got {value!r}")


# ---- decoding ---------------------------------------------------------------------------------------

def decode_rgb(data, field: str, limits: Limits) -> np.ndarray:
    """Base64 text (a data URL is fine) -> HxWx3 uint8; alpha composited over white, as the extension does."""
    if not isinstance(data, str) or not data:
        raise ApiError(422, field, f"{field} must be a base64-encoded image (PNG, JPEG, WebP, ...)")
    opened = open_image(data, limits, field)  # base64 and the header's size checked, nothing decoded yet
    try:
        rgba = opened.convert("RGBA") if "A" in opened.getbands() or "transparency" in opened.info else None
        rgb = None if rgba is not None else np.asarray(opened.convert("RGB"))
    except Exception as err:  # truncated or corrupt data surfaces when decoding
        raise ApiError(422, field, f"{field} is not a readable image (PNG, JPEG, WebP, ...): {type(err).__name__}") from None
    if rgb is not None:
        return rgb
    pixels = np.asarray(rgba).astype(np.float32)
    alpha = pixels[:, :, 3:4] / 255.0
    return (pixels[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


# ---- preprocessing ----------------------------------------------------------------------------------

def pixel_perfect_resolution(image: np.ndarray, height: int, width: int, resize_mode: int) -> int:
    """The processor_res at which the map comes out at the generation size's scale (the extension's rule)."""
    raw_h, raw_w = image.shape[:2]
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if RESIZE_MODES[resize_mode] == "Resize and Fill" else max(k_h, k_w)
    return int(np.round(k * min(raw_h, raw_w)))


def check_size(width: int, height: int, limits: Limits, field: str, what: str) -> None:
    """An image the server would make from a picture: at least 1 pixel a side, at most max_image_pixels."""
    if width < 1 or height < 1 or width * height > limits.max_image_pixels:
        raise ApiError(422, field, f"{field}: {what} would be {width}x{height} pixels; this server makes images of at "
                                   f"most {limits.max_image_pixels} pixels and at least 1 a side: the picture's aspect "
                                   "ratio is too far from the target's (crop it first)")


def _at_resolution(image: np.ndarray, resolution: float, limits: Limits, field: str):
    """Scale so the short side is `resolution`, pad to multiples of 64 with edge pixels; and the un-padder."""
    import cv2

    raw_h, raw_w = image.shape[:2]
    k = float(resolution) / min(raw_h, raw_w)
    h, w = int(np.round(raw_h * k)), int(np.round(raw_w * k))
    check_size(w + -w % 64, h + -h % 64, limits, field, f"the picture at processor resolution {resolution:g}")
    scaled = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad_h, pad_w = -h % 64, -w % 64
    padded = np.pad(scaled, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")
    return np.ascontiguousarray(padded), lambda out: np.ascontiguousarray(out[:h, :w])


def detect(module: Module, image: np.ndarray, resolution: float | None, threshold_a: float | None,
           threshold_b: float | None, limits: Limits, field: str) -> np.ndarray:
    """The module's map (HxWx3 uint8) of an HxWx3 uint8 picture, at processor resolution, before fitting;
    an ApiError naming `field` when an image on the way would be out of bounds (`check_size`)."""
    import cv2

    if module.name == "none":
        return image
    if module.name == "tile_resample":
        if threshold_a < 1.1:
            return image
        h, w = int(image.shape[0] / threshold_a), int(image.shape[1] / threshold_a)
        check_size(w, h, limits, field, f"the picture down-sampled by {threshold_a:g}")
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    if module.name == "invert":  # white-background line art -> the black-background map ControlNets expect
        return 255 - image
    if module.name == "canny":
        padded, unpad = _at_resolution(image, resolution, limits, field)
        return _rgb(unpad(cv2.Canny(padded, int(threshold_a), int(threshold_b))))
    raise AssertionError(f"no detector for module {module.name!r}")


# ---- fitting to the generation size -------------------------------------------------------------------

def _rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def _resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if x.shape[:2] == (height, width):
        return x
    colours = len(np.unique(x.reshape(-1, 3), axis=0))
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST  # label maps: never blend two labels into a third
    elif width * height < x.shape[0] * x.shape[1]:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if binary:  # keep an edge map black and white
        grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = _rgb(grey)
    return y


def fit(detected: np.ndarray, resize_mode: int, height: int, width: int, limits: Limits, field: str) -> np.ndarray:
    """The detected map at height x width (HxWx3 uint8) by the unit's resize mode; an ApiError naming `field`
    when the scaled map would be out of bounds (`check_size`)."""
    x = _rgb(detected)
    mode = RESIZE_MODES[resize_mode]
    if mode == "Just Resize":
        return np.ascontiguousarray(_resize(x, width, height))
    old_h, old_w = x.shape[:2]
    k_h, k_w = height / old_h, width / old_w
    k = min(k_h, k_w) if mode == "Resize and Fill" else max(k_h, k_w)
    scaled_w, scaled_h = int(np.round(old_w * k)), int(np.round(old_h * k))
    check_size(scaled_w, scaled_h, limits, field, f"the map scaled for {mode}")
    if mode == "Resize and Fill":
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        canvas = np.tile(np.median(borders, axis=0).astype(x.dtype)[None, None], [height, width, 1])
        inner = _resize(x, scaled_w, scaled_h)
        top, left = max(0, (height - inner.shape[0]) // 2), max(0, (width - inner.shape[1]) // 2)
        canvas[top:top + inner.shape[0], left:left + inner.shape[1]] = inner
        return canvas
    outer = _resize(x, scaled_w, scaled_h)  # Crop and Resize
    top, left = max(0, (outer.shape[0] - height) // 2), max(0, (outer.shape[1] - width) // 2)
    return np.ascontiguousarray(outer[top:top + height, left:left + width])

"""img2img's pictures as A1111 prepares them, for `Runner.generate(init_image=, mask_image=, strength=)`.

A1111 (`modules/processing.py`, `modules/images.py`) fits each init image to width x height by
`resize_mode` (0: stretch; 1: scale to cover, centre crop; both with LANCZOS), and for a mask: inverts
it when `inpainting_mask_invert` is 1, blurs it with a Gaussian of sigma mask_blur_x / mask_blur_y
(kernel 2 * int(2.5 * sigma + 0.5) + 1), and fits it like the picture. Implemented only as far as the
engine's inpainting goes: the whole picture (`inpaint_full_res` false) and the original content under
the mask (`inpainting_fill` 1); other values are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image

from engine.serve.a1111 import control
from engine.serve.api import ApiError, Limits

RESIZE_MODES = ("Just resize", "Crop and resize")  # 2 (Resize and fill) and 3 (latent upscale) are not implemented


@dataclass
class InitImages:
    first_rgb: np.ndarray  # the first picture as sent: a ControlNet unit without an image uses it
    runner_kwargs: dict  # init_image (a list, cycled over the images), mask_image, strength


def fit_picture(image: PIL.Image.Image, mode: int, width: int, height: int, limits: Limits,
                field: str) -> PIL.Image.Image:
    """A1111's resize to width x height; mode 1 scales to cover first, an image held to max_image_pixels
    (control.check_size: a thin strip would otherwise be scaled to gigabytes)."""
    if mode == 0:
        return image.resize((width, height), resample=PIL.Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    w = width if ratio > src_ratio else image.width * height // image.height
    h = height if ratio <= src_ratio else image.height * width // image.width
    control.check_size(w, h, limits, field, f"the picture scaled for {RESIZE_MODES[mode]}")
    scaled = image.resize((w, h), resample=PIL.Image.LANCZOS)
    canvas = PIL.Image.new(image.mode, (width, height))
    canvas.paste(scaled, box=(width // 2 - w // 2, height // 2 - h // 2))
    return canvas


def _blur(mask: np.ndarray, sigma_x: int, sigma_y: int) -> np.ndarray:
    import cv2

    if sigma_x > 0:
        mask = cv2.GaussianBlur(mask, (2 * int(2.5 * sigma_x + 0.5) + 1, 1), sigma_x)
    if sigma_y > 0:
        mask = cv2.GaussianBlur(mask, (1, 2 * int(2.5 * sigma_y + 0.5) + 1), sigma_y)
    return mask


def decode_init(req, limits: Limits) -> InitImages:
    if not req.init_images:
        raise ApiError(422, "init_images", "init_images is required: one or more base64 pictures")
    if len(req.init_images) > limits.max_images:
        raise ApiError(422, "init_images", f"init_images: at most {limits.max_images} pictures")
    if req.resize_mode not in (0, 1):
        raise ApiError(422, "resize_mode", f"resize_mode must be 0 ({RESIZE_MODES[0]}) or 1 ({RESIZE_MODES[1]}), "
                                           f"got {req.resize_mode!r}; 2 and 3 are not implemented")
    pictures = [control.decode_rgb(data, f"init_images.{i}", limits) for i, data in enumerate(req.init_images)]
    init = [fit_picture(PIL.Image.fromarray(p), req.resize_mode, req.width, req.height, limits, f"init_images.{i}")
            for i, p in enumerate(pictures)]
    mask = None
    if req.mask:
        if req.inpainting_fill != 1:
            raise ApiError(422, "inpainting_fill", f"inpainting_fill={req.inpainting_fill!r}: only 1 (original) is "
                                                   "implemented")
        if req.inpaint_full_res:
            raise ApiError(422, "inpaint_full_res", "inpaint_full_res=true ('Only masked') is not implemented; send "
                                                    "false (whole picture)")
        if req.inpainting_mask_invert not in (0, 1):
            raise ApiError(422, "inpainting_mask_invert", "inpainting_mask_invert must be 0 or 1")
        grey = control.decode_rgb(req.mask, "mask", limits).mean(axis=2).round().astype(np.uint8)
        if req.inpainting_mask_invert:
            grey = 255 - grey
        sigma_x, sigma_y = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
        if min(sigma_x, sigma_y) < 0:
            raise ApiError(422, "mask_blur", "mask_blur must be >= 0")
        mask = fit_picture(PIL.Image.fromarray(_blur(grey, sigma_x, sigma_y)), req.resize_mode, req.width, req.height,
                           limits, "mask")
    return InitImages(pictures[0], dict(init_image=init, mask_image=mask, strength=float(req.denoising_strength)))

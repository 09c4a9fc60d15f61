"""img2img's pictures as A1111 prepares them, for `Runner.generate(init_image=, mask_image=, strength=)`.

A1111 (`modules/processing.py`, `modules/images.py`) fits each init image to width x height by
`resize_mode` (0: stretch; 1: scale to cover, centre crop; both with LANCZOS). With a mask, the whole of
A1111's inpainting runs (engine/a1111_inpaint.py): the mask read by its alpha when it is RGBA and not all
opaque, inverted (`inpainting_mask_invert`), blurred (`mask_blur`, or `mask_blur_x` / `mask_blur_y`), the
masked content filled (`inpainting_fill` 0) or kept (1), the whole picture or only the box around the mask
(`inpaint_full_res`, `inpaint_full_res_padding`) generated, and after decoding the original pasted back
over what was not to change (`InitImages.finish`). `inpainting_fill` 2 and 3 (latent noise, latent
nothing) are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import PIL.Image

from engine.a1111_inpaint import MASKED_CONTENT, A1111Inpaint, cover_size
from engine.serve.a1111 import control
from engine.serve.api import ApiError, Limits

# A1111's UI sliders: its API takes any integer, but a blur of sigma s costs a kernel of 5 s pixels per row.
MAX_BLUR, MAX_PADDING = 64, 256
RESIZE_MODES = ("Just resize", "Crop and resize")  # 2 (Resize and fill) and 3 (latent upscale) are not implemented


@dataclass
class InitImages:
    first_rgb: np.ndarray  # the first picture as sent: a ControlNet unit without an image uses it
    runner_kwargs: dict  # init_image (a list, cycled over the images), mask_image, strength
    inpaint: A1111Inpaint | None = None  # with a mask: A1111's settings (the infotext records them)
    jobs: list = field(default_factory=list)  # with a mask: per init picture, its InpaintJob (cycled like them)

    def finish(self, image, i: int):
        """Image i of the request with its picture pasted back over what was not to change (no mask: as is)."""
        return self.jobs[i % len(self.jobs)].finish(image) if self.jobs else image


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


def decode_init(req, limits: Limits) -> InitImages:
    if not req.init_images:
        raise ApiError(422, "init_images", "init_images is required: one or more base64 pictures")
    if len(req.init_images) > limits.max_images:
        raise ApiError(422, "init_images", f"init_images: at most {limits.max_images} pictures")
    if req.resize_mode not in (0, 1):
        raise ApiError(422, "resize_mode", f"resize_mode must be 0 ({RESIZE_MODES[0]}) or 1 ({RESIZE_MODES[1]}), "
                                           f"got {req.resize_mode!r}; 2 and 3 are not implemented")
    pictures = [control.decode_rgb(data, f"init_images.{i}", limits) for i, data in enumerate(req.init_images)]
    if not req.mask:
        init = [fit_picture(PIL.Image.fromarray(p), req.resize_mode, req.width, req.height, limits, f"init_images.{i}")
                for i, p in enumerate(pictures)]
        return InitImages(pictures[0], dict(init_image=init, mask_image=None, strength=float(req.denoising_strength)))
    inpaint = inpaint_settings(req)
    mask = decode_mask(req.mask, limits)
    jobs = []
    for i, picture in enumerate(pictures):
        image = PIL.Image.fromarray(picture)
        if req.resize_mode == 1 and not inpaint.only_masked:
            control.check_size(*cover_size(image.width, image.height, req.width, req.height), limits, f"init_images.{i}",
                               "the picture scaled to cover width x height")
        try:
            job = inpaint.prepare(image, mask, req.width, req.height)
        except ValueError as err:
            raise ApiError(422, "mask", f"mask: {err}") from None
        if job.box is not None:  # the result is scaled to cover the box, which need not have its aspect ratio
            x1, y1, x2, y2 = job.box
            control.check_size(*cover_size(req.width, req.height, x2 - x1, y2 - y1), limits, "mask",
                               "the result scaled back into the box around the mask")
        jobs.append(job)
    kwargs = dict(init_image=[job.init for job in jobs], mask_image=jobs[0].mask, strength=float(req.denoising_strength))
    return InitImages(pictures[0], kwargs, inpaint, jobs)


def inpaint_settings(req) -> A1111Inpaint:
    """A1111's inpainting fields -> A1111Inpaint, or a 422 naming the field."""
    if req.inpainting_mask_invert not in (0, 1):
        raise ApiError(422, "inpainting_mask_invert", "inpainting_mask_invert must be 0 or 1")
    if req.inpainting_fill not in range(len(MASKED_CONTENT)):
        raise ApiError(422, "inpainting_fill", f"inpainting_fill must be 0..3 ({', '.join(MASKED_CONTENT)}), got "
                                               f"{req.inpainting_fill!r}")
    if req.inpainting_fill > 1:
        raise ApiError(422, "inpainting_fill", f"inpainting_fill={req.inpainting_fill} ({MASKED_CONTENT[req.inpainting_fill]}) "
                                               "changes the latents and is not implemented; use 0 (fill) or 1 (original)")
    blur_x, blur_y = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
    for value, name, most in ((blur_x, "mask_blur_x" if req.mask_blur is None else "mask_blur", MAX_BLUR),
                              (blur_y, "mask_blur_y" if req.mask_blur is None else "mask_blur", MAX_BLUR),
                              (req.inpaint_full_res_padding, "inpaint_full_res_padding", MAX_PADDING)):
        if not 0 <= value <= most:
            raise ApiError(422, name, f"{name} must be in [0, {most}] (A1111's slider), got {value}")
    return A1111Inpaint(blur_x=blur_x, blur_y=blur_y, invert=bool(req.inpainting_mask_invert),
                        masked_content=MASKED_CONTENT[req.inpainting_fill], only_masked=bool(req.inpaint_full_res),
                        padding=req.inpaint_full_res_padding, resize_mode=req.resize_mode)


def decode_mask(data, limits: Limits) -> PIL.Image.Image:
    """The mask as sent, alpha kept (A1111 reads an RGBA mask by its alpha); checked as every picture is."""
    import base64
    import io

    control.decode_rgb(data, "mask", limits)  # every check of a picture (base64, readable, size)
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    with PIL.Image.open(io.BytesIO(base64.b64decode(text))) as opened:
        opened.load()
        return opened.convert("RGBA") if opened.mode == "RGBA" else opened.copy()


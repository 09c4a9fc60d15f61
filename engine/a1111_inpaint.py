"""Inpainting as the AUTOMATIC1111 web UI does it around one generation: the mask it reads, the picture and
mask it hands the sampler, and the original pasted back over what was not to change.

    inpaint = A1111Inpaint(blur_x=4, blur_y=4, masked_content="fill", only_masked=True, padding=32)
    job = inpaint.prepare(init, mask, width, height)          # PIL images in, as the client sent them
    result = runner.generate(prompt, init_image=job.init, mask_image=job.mask, height=height, width=width, ...)
    image = job.finish(result.images[0])                       # the original outside the (blurred) mask

What A1111 does (`modules/processing.py` StableDiffusionProcessingImg2Img.init and apply_overlay,
`modules/images.py` resize_image, `modules/masking.py`), step by step, and so here:
- the mask is read by its alpha channel when it is RGBA and not all opaque (alpha > 128 repaints; a canvas
  mask), else as greyscale (`create_binary_mask`); inverted when asked ("Inpaint not masked");
- blurred by a Gaussian of sigma blur_x across, then blur_y down (kernel 2 * int(2.5 * sigma + 0.5) + 1);
- whole picture: picture and mask are fitted to width x height by `resize_mode` (0 stretch, 1 cover and
  centre-crop; LANCZOS); the overlay mask is the blurred mask doubled and clipped, so the original shows
  fully where the blurred mask is 0 and not at all where it reaches 128;
- only masked (`inpaint_full_res`): the box around the mask's non-zero pixels, widened by `padding` and
  then to the generation's aspect ratio, is cut from the picture and mask and fitted to width x height
  ("Resize and fill", mode 2); the result is scaled back into the box of the original picture, and the
  output has the original picture's size; an all-black mask falls back to plain img2img, as in A1111;
- masked content "fill" (`inpainting_fill` 0) paints the masked part with blurred colours of the rest
  before encoding (`masking.fill`); "original" (1) leaves it; "latent noise" (2) and "latent nothing" (3)
  change the latents and are not implemented (refused by name);
- after decoding, the original picture (before any fill) is composited over the result through the inverted
  overlay mask (`apply_overlay`), so unmasked pixels are the input's.

The sampler's mask itself is diffusers' (engine.runner: binarised at 0.5 at the generation size), where A1111
rounds a bicubic resize of the blurred mask to the latent size: the two differ along the mask's edge, which
the overlay then covers with the original wherever the blurred mask is under 128.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
IMPLEMENTED_CONTENT = ("fill", "original")
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")  # A1111's resize_mode 0..2
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # masking.fill: (blur radius, composites)


def resize_image(mode: int, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """A1111's images.resize_image without an upscaler (its default): 0 stretch, 1 scale to cover and centre-
    crop, 2 scale to fit and fill the bands by stretching the edge rows or columns. LANCZOS throughout."""
    if mode == 0:
        return image.resize((width, height), resample=PIL.Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == 1
    if cover:  # the scaled picture covers width x height
        w, h = cover_size(image.width, image.height, width, height)
    else:  # it fits inside
        w = width if ratio < src_ratio else image.width * height // image.height
        h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((w, h), resample=PIL.Image.LANCZOS)
    canvas = PIL.Image.new(image.mode, (width, height))
    canvas.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if cover:
        return canvas
    if ratio < src_ratio:
        band = height // 2 - h // 2
        if band > 0:
            canvas.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)), box=(0, band + h))
    elif ratio > src_ratio:
        band = width // 2 - w // 2
        if band > 0:
            canvas.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)), box=(band + w, 0))
    return canvas


def cover_size(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int]:
    """The size resize_image's mode 1 scales a picture to before its crop (it can be far larger than width x
    height for a thin picture: callers bound it)."""
    ratio, src_ratio = width / height, src_width / src_height
    return (width if ratio > src_ratio else src_width * height // src_height,
            height if ratio <= src_ratio else src_height * width // src_width)


def binary_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """A1111's create_binary_mask (mask_round on): an RGBA mask not all opaque is read by its alpha (> 128
    repaints), anything else as greyscale."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.split()[-1].point(lambda a: 255 if a > 128 else 0)
    return mask.convert("L")


def blur_mask(mask: PIL.Image.Image, blur_x: int, blur_y: int) -> PIL.Image.Image:
    import cv2

    pixels = np.asarray(mask)
    if blur_x > 0:
        pixels = cv2.GaussianBlur(pixels, (2 * int(2.5 * blur_x + 0.5) + 1, 1), blur_x)
    if blur_y > 0:
        pixels = cv2.GaussianBlur(pixels, (1, 2 * int(2.5 * blur_y + 0.5) + 1), blur_y)
    return PIL.Image.fromarray(pixels)


def mask_box(mask: PIL.Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box around the mask's non-zero pixels, widened by `padding` within the picture; None if all black
    (A1111's masking.get_crop_region_v2)."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def widen_to_ratio(box, width: int, height: int, image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """The box grown to the generation's aspect ratio, kept inside the picture where it fits
    (A1111's masking.expand_crop_region)."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        grow = int((x2 - x1) / ratio - (y2 - y1))
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
        if y2 >= image_height:
            y1, y2 = y1 - (y2 - image_height), image_height
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, image_height)
    else:
        grow = int((y2 - y1) * ratio - (x2 - x1))
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
        if x2 >= image_width:
            x1, x2 = x1 - (x2 - image_width), image_width
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, image_width)
    return x1, y1, x2, y2


def fill_masked(image: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """A1111's masking.fill: the masked part painted with ever less blurred copies of the unmasked part."""
    filled = PIL.Image.new("RGBA", image.size)
    kept = PIL.Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=PIL.ImageOps.invert(mask.convert("L")))
    for radius, repeats in FILL_LAYERS:
        blurred = kept.filter(PIL.ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return filled.convert("RGB")


@dataclass
class InpaintJob:
    """What one picture's generation takes (`init`, `mask`, both width x height) and what `finish` needs."""

    init: PIL.Image.Image
    mask: PIL.Image.Image | None  # None: an all-black mask with only_masked, which A1111 runs as img2img
    overlay: PIL.Image.Image | None  # RGBA: the original where it is kept, transparent where repainted
    box: tuple[int, int, int, int] | None  # only masked: where the result goes in the original picture

    def finish(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The generated image with the original pasted over what was not to change (A1111's apply_overlay)."""
        if self.overlay is None:
            return image
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            base = PIL.Image.new("RGBA", self.overlay.size)
            base.paste(resize_image(1, image, x2 - x1, y2 - y1), (x1, y1))
            image = base
        image = image.convert("RGBA")
        image.alpha_composite(self.overlay)
        return image.convert("RGB")


@dataclass(frozen=True)
class A1111Inpaint:
    """A1111's inpainting settings, by its API's names: mask_blur_x/_y, inpainting_mask_invert,
    inpainting_fill (as its name), inpaint_full_res (only_masked) and inpaint_full_res_padding, resize_mode."""

    blur_x: int = 4
    blur_y: int = 4
    invert: bool = False
    masked_content: str = "original"
    only_masked: bool = False
    padding: int = 0
    resize_mode: int = 0

    def __post_init__(self):
        for name in ("blur_x", "blur_y", "padding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.masked_content not in MASKED_CONTENT:
            raise ValueError(f"masked content must be one of {', '.join(MASKED_CONTENT)}, got {self.masked_content!r}")
        if self.masked_content not in IMPLEMENTED_CONTENT:
            raise ValueError(f"masked content {self.masked_content!r} (inpainting_fill "
                             f"{MASKED_CONTENT.index(self.masked_content)}) changes the latents and is not implemented; "
                             f"use {' or '.join(IMPLEMENTED_CONTENT)}")
        if self.resize_mode not in (0, 1):
            raise ValueError(f"resize_mode must be 0 ({RESIZE_MODES[0]}) or 1 ({RESIZE_MODES[1]}), got {self.resize_mode!r}")

    def prepare(self, init: PIL.Image.Image, mask: PIL.Image.Image, width: int, height: int) -> InpaintJob:
        """`init` (RGB, any size) and `mask` (as sent: RGBA read by its alpha) -> the generation's inputs."""
        init = init.convert("RGB")
        mask = binary_mask(mask)
        if self.invert:
            mask = PIL.ImageOps.invert(mask)
        mask = blur_mask(mask, self.blur_x, self.blur_y)
        box = None
        if self.only_masked:
            if mask.size != init.size:
                raise ValueError(f"the mask is {mask.width}x{mask.height} but the picture {init.width}x{init.height}: "
                                 "'only masked' needs a mask of the picture's size")
            box = mask_box(mask, self.padding)
            if box is None:  # A1111: "Unable to perform Inpaint Only mask because mask is blank": img2img
                return InpaintJob(resize_image(self.resize_mode, init, width, height), None, None, None)
            box = widen_to_ratio(box, width, height, mask.width, mask.height)
            overlay_mask, sampler_mask, picture = mask, resize_image(2, mask.crop(box), width, height), init
        else:
            sampler_mask = resize_image(self.resize_mode, mask, width, height)
            overlay_mask = PIL.Image.fromarray(np.clip(np.asarray(sampler_mask).astype(np.float32) * 2, 0, 255)
                                               .astype(np.uint8))
            picture = resize_image(self.resize_mode, init, width, height)
        overlay = PIL.Image.new("RGBa", picture.size)
        overlay.paste(picture.convert("RGBA").convert("RGBa"), mask=PIL.ImageOps.invert(overlay_mask.convert("L")))
        if box is not None:
            picture = resize_image(2, picture.crop(box), width, height)
        if self.masked_content == "fill":
            picture = fill_masked(picture, sampler_mask)
        return InpaintJob(picture, sampler_mask, overlay.convert("RGBA"), box)

    def parameters(self, always_blur: bool = False) -> dict:
        """The infotext entries A1111 writes for these settings (engine.pngmeta's keys): Mask blur when it is
        > 0 and the same both ways (`always_blur`: also 0, so a reader knows A1111's inpainting was used),
        Mask mode, Inpaint area with Masked area padding, Masked content (fill only)."""
        p = {}
        if self.invert:
            p["mask_invert"] = True
        if self.blur_x == self.blur_y and (self.blur_x > 0 or always_blur):
            p["mask_blur"] = self.blur_x
        if self.only_masked:
            p["inpaint_only_masked"], p["inpaint_padding"] = True, self.padding
        if self.masked_content == "fill":
            p["masked_content"] = "fill"
        return p

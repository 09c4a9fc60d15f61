"""Pictures as users pass them: reading, normalising to RGB, masks, and the inpaint map.

A control image is a PIL image, a numpy array or a file path; `load_image` turns each into RGB (a PIL
image, or an HxWx3 float32 array for ready float maps), and the Runner resizes the map to the generation
size exactly as diffusers' ControlNet pipeline does (its own `VaeImageProcessor`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image

ImageInput = Union[PIL.Image.Image, np.ndarray, str, Path]

def load_image(image: ImageInput, what: str = "control image") -> PIL.Image.Image | np.ndarray:
    """Normalise an input picture to RGB: a PIL image, or an HxWx3 float32 array in [0, 1].

    Accepts PIL images (any mode), file paths, HxW / HxWx1 / HxWx3 / HxWx4 arrays of uint8 (0..255) or
    floats (0..1). Grayscale is repeated to 3 channels; alpha is dropped. Floats stay floats so a ready
    control map is not quantised. `what` names the input in error messages (control image, init image).
    """
    if isinstance(image, (str, Path)):
        return _open(image, what).convert("RGB")
    if isinstance(image, PIL.Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(
        f"{what} must be a PIL image, a numpy array (HWC uint8 or float in [0, 1]) or a file path, "
        f"got {type(image).__name__}"
    )


def _open(path: str | Path, what: str) -> PIL.Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (PIL.UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{what} file {str(path)!r} is not a readable image: {err}") from err


def load_mask(mask: ImageInput) -> PIL.Image.Image:
    """An inpainting mask as a grayscale ("L") PIL image: white (> 0.5) is repainted, black is kept.

    Accepts what `load_image` accepts; colour is converted to grayscale as PIL does (diffusers' mask
    processor does the same), float arrays are rounded to 0..255. diffusers then binarises at 0.5.
    """
    if isinstance(mask, (str, Path)):
        mask = _open(mask, "mask image")
    elif isinstance(mask, np.ndarray):
        mask = load_image(mask, "mask image")
        mask = PIL.Image.fromarray(to_uint8(mask), mode="RGB") if isinstance(mask, np.ndarray) else mask
    elif not isinstance(mask, PIL.Image.Image):
        raise TypeError(f"mask image must be a PIL image, a numpy array or a file path, got {type(mask).__name__}")
    return mask if mask.mode == "L" else mask.convert("L")


def image_size(image: PIL.Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height) of a loaded picture."""
    return image.size if isinstance(image, PIL.Image.Image) else (image.shape[1], image.shape[0])


def _array_to_rgb(array: np.ndarray) -> PIL.Image.Image | np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(array.shape)}"
        )
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"float image arrays must hold finite values in [0, 1], got range "
                f"[{np.nanmin(array):.4g}, {np.nanmax(array):.4g}]"
            )
        return np.ascontiguousarray(array, dtype=np.float32)
    raise ValueError(f"image array dtype must be uint8 or float, got {array.dtype}")


def to_uint8(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 uint8 view of a normalised image (floats are rounded from [0, 1])."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image)
    return np.round(image * 255.0).astype(np.uint8)


def inpaint(image: ImageInput, mask: ImageInput | None = None) -> np.ndarray:
    """The inpaint ControlNet's control map, as the diffusers recipe (make_inpaint_condition) builds it:
    the picture as HxWx3 float32 in [0, 1] with every masked pixel (mask > 0.5) set to -1.

    Runner.generate calls it with the init image (or this net's own image) and mask_image.
    """
    if mask is None:
        raise ValueError("the inpaint preprocessor needs a mask: pass mask_image (and init_image) to generate")
    pixels = np.asarray(to_uint8(load_image(image, "inpaint image")), dtype=np.float32) / 255.0
    masked = np.asarray(load_mask(mask), dtype=np.float32) / 255.0 > 0.5
    if masked.shape != pixels.shape[:2]:
        raise ValueError(f"the mask is {masked.shape[1]}x{masked.shape[0]} but the inpaint image is "
                         f"{pixels.shape[1]}x{pixels.shape[0]}: give a mask of the image's size")
    pixels[masked] = -1.0
    return pixels

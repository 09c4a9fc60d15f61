"""The model-free annotators: the A1111 ControlNet extension's pixel formulas, one small class each.

Every annotator has the same call shape, `annotator(image, resolution, threshold_a, threshold_b, seed)`:
`image` is HxWx3 uint8 RGB, already scaled to the processor resolution (and padded to multiples of 64
for the modules whose table entry says "pad"), the sliders hold the values in force (the table's defaults
filled in), and the result is an HxW or HxWx3 uint8 map. Written from the extension's documented
behaviour (sd-webui-controlnet: `scripts/preprocessor/model_free_preprocessors.py`,
`scripts/preprocessor/legacy/processor.py`, `annotator/shuffle`, `annotator/color`), including its
quirks where they change pixels (each is said where it is kept), so a map equals the extension's.
"""
from __future__ import annotations

import numpy as np

CANNY_LOW, CANNY_HIGH = 100, 200  # the extension's and the diffusers canny recipe's thresholds


def _cv2():
    import cv2  # imported on use: nothing here runs at import time

    return cv2


class Identity:
    """none, tile_colorfix, tile_colorfix+sharp: the picture is the map (the colour fix of the tile_colorfix
    modules is a step of the extension's sampler, not of the preprocessor)."""

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        return image


class Canny:
    def __call__(self, image, resolution=None, threshold_a=CANNY_LOW, threshold_b=CANNY_HIGH, seed=None):
        low, high = int(threshold_a), int(threshold_b)
        if not 0 <= low <= high:
            raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
        return _cv2().Canny(image, low, high)


class Invert:
    """White-background line art -> the black-background map ControlNets expect."""

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        return 255 - image


class Threshold:
    """White where every channel is above the threshold, black elsewhere."""

    def __call__(self, image, resolution=None, threshold_a=127, threshold_b=None, seed=None):
        out = np.zeros(image.shape[:2], np.uint8)
        out[image.min(axis=2) > threshold_a] = 255
        return out


class ScribbleXdog:
    """Difference of Gaussians (sigma 0.5 and 5), darkest channel, thresholded."""

    def __call__(self, image, resolution=None, threshold_a=32, threshold_b=None, seed=None):
        cv2 = _cv2()
        pixels = image.astype(np.float32)
        fine = cv2.GaussianBlur(pixels, (0, 0), 0.5)
        coarse = cv2.GaussianBlur(pixels, (0, 0), 5.0)
        dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
        # The extension doubles `255 - dog` in uint8, so values of 128 and up wrap around; kept, so maps match.
        strength = np.uint8(2) * (np.uint8(255) - dog)
        out = np.zeros(image.shape[:2], np.uint8)
        out[strength > threshold_a] = 255
        return out


class LineartStandard:
    """Dark lines on a light ground: how much darker each pixel is than its blur (sigma 6), scaled so the
    median line pixel is at 127."""

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        pixels = image.astype(np.float32)
        blurred = _cv2().GaussianBlur(pixels, (0, 0), 6.0)
        intensity = np.min(blurred - pixels, axis=2).clip(0, 255)
        lines = intensity[intensity > 8]
        intensity /= max(16.0, float(np.median(lines))) if lines.size else 16.0
        return (intensity * 127).clip(0, 255).astype(np.uint8)


class BlurGaussian:
    def __call__(self, image, resolution=None, threshold_a=9.0, threshold_b=None, seed=None):
        return _cv2().GaussianBlur(image, (0, 0), float(threshold_a))


class TileResample:
    """Down-sampled by the rate (INTER_AREA); rates below 1.1 leave the picture as it is."""

    def __call__(self, image, resolution=None, threshold_a=1.0, threshold_b=None, seed=None):
        if threshold_a < 1.1:
            return image
        h, w = int(image.shape[0] / threshold_a), int(image.shape[1] / threshold_a)
        return _cv2().resize(image, (w, h), interpolation=_cv2().INTER_AREA)


class Recolor:
    """Luminance (recolor_luminance) or intensity (recolor_intensity) as grey, gamma-corrected.

    The extension converts its RGB picture with OpenCV's BGR conversions: LAB's L then weighs red as blue
    (HSV's V, the channel maximum, does not care); kept, so maps match."""

    def __init__(self, channel: str):
        self.channel = channel  # "luminance" or "intensity"

    def __call__(self, image, resolution=None, threshold_a=1.0, threshold_b=None, seed=None):
        cv2 = _cv2()
        if self.channel == "luminance":
            grey = cv2.cvtColor(image, cv2.COLOR_BGR2LAB)[:, :, 0]
        else:
            grey = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[:, :, 2]
        grey = (grey.astype(np.float32) / 255.0) ** threshold_a
        return (grey * 255.0).clip(0, 255).astype(np.uint8)


class ColorGrid:
    """t2ia_color_grid: short side to the resolution (INTER_AREA), then 64x64-pixel cells of colour
    (down INTER_CUBIC to 1/64, back up INTER_NEAREST)."""

    def __call__(self, image, resolution=512, threshold_a=None, threshold_b=None, seed=None):
        cv2 = _cv2()
        h, w = image.shape[:2]
        size = int(resolution)
        if h < w:
            h, w = size, int(round(w / h * size))
        else:
            h, w = int(round(h / w * size)), size
        scaled = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        cells = cv2.resize(scaled, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
        return cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)


def noise_disk(height: int, width: int, cell: int, rng: np.random.RandomState) -> np.ndarray:
    """Smooth noise in [0, 1] (HxWx1): uniform noise on a grid of `cell`-pixel cells, cubic-upsampled."""
    cv2 = _cv2()
    coarse = rng.uniform(low=0, high=1, size=(height // cell + 2, width // cell + 2, 1))
    noise = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell:cell + height, cell:cell + width]
    noise -= noise.min()
    noise /= noise.max()
    return noise[:, :, None]


class Shuffle:
    """Content shuffle: the picture warped by two smooth noise fields (cells of 256 pixels).

    `seed` seeds numpy's legacy generator as the extension does (np.random.seed, then uniform draws: x
    field first, then y); in a generation the extension's seed is (seed + subseed) & 0xFFFFFFFF, with an
    unset subseed taken as the seed. None draws a fresh seed."""

    CELL = 256

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        rng = np.random.RandomState(np.random.randint(2**32, dtype=np.int64) if seed is None else seed)
        h, w = image.shape[:2]
        x = noise_disk(h, w, self.CELL, rng) * float(w - 1)
        y = noise_disk(h, w, self.CELL, rng) * float(h - 1)
        flow = np.concatenate([x, y], axis=2).astype(np.float32)
        return _cv2().remap(image, flow, None, _cv2().INTER_LINEAR)

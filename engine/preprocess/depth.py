"""Depth and normal maps on transformers models: MiDaS (DPT-Hybrid), Depth Anything v1/v2, ZoeDepth.

Each annotator has model_free.py's call shape and is built as `Class(sources, device, module)`; its model
loads through loading.shared (once per process). The maps follow the extension's annotators
(sd-webui-controlnet `annotator/midas`, `annotator/depth_anything*.py`, `annotator/zoe`): near is white.

- depth (depth_midas): DPT-Hybrid on the picture at processor resolution, normalised as x/127.5 - 1;
  the prediction (inverse depth) min-max scaled to 0..255.
- normal_map (normal_midas): from the same prediction: Sobel x and y (3x3), z = 2 pi, zeroed x/y where
  the scaled depth is below the background threshold, unit length, *127.5 + 127.5, channels reversed.
- depth_anything, depth_anything_v2: the picture scaled to at least 518 on both sides keeping its aspect
  (sides rounded to multiples of 14, INTER_CUBIC), ImageNet-normalised, bilinear back to the picture's
  size, min-max scaled to 0..255 and truncated. The extension converts its RGB picture with
  cv2.COLOR_BGR2RGB first, so the network sees BGR; kept, so maps match.
- depth_zoe: ZoeDepth through its transformers image processor (aspect-keeping resize to multiples of 32,
  reflect padding) and its post-processing (flip averaging, resize, pad cut off), then the extension's scaling: depth between its
  2nd and 85th percentiles mapped to 1..0 (near is white), clipped, truncated.
"""
from __future__ import annotations

import math

import numpy as np

from engine.preprocess.loading import shared


def _torch():
    import torch

    return torch


def _pad64(image: np.ndarray) -> np.ndarray:
    """Edge-pad to multiples of 64 (the extension's processor sizes already are): DPT needs whole patches."""
    h, w = image.shape[:2]
    return np.pad(image, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")


def load_dpt(source: str, device):
    import functools

    from transformers import DPTForDepthEstimation

    model = DPTForDepthEstimation.from_pretrained(source).to(device).eval()
    if model.config.is_hybrid:  # its embedding refuses other sizes than the config's unless asked to interpolate
        embeddings = model.dpt.embeddings
        embeddings.forward = functools.partial(type(embeddings).forward, embeddings, interpolate_pos_encoding=True)
    return model


def dpt_depth(model, pixel_values):
    """DPTForDepthEstimation's depth for any multiple-of-patch size: its own forward reshapes the tokens as a
    square grid, so its parts are run here with the real grid (equal to its forward on square inputs)."""
    config = model.config
    outputs = model.dpt(pixel_values, output_hidden_states=True)
    chosen = config.backbone_out_indices[2:] if config.is_hybrid else config.backbone_out_indices
    features = [f for i, f in enumerate(outputs.hidden_states[1:]) if i in chosen]
    if config.is_hybrid:
        features = list(outputs.intermediate_activations) + features
    height, width = pixel_values.shape[2:]
    return model.head(model.neck(features, height // config.patch_size, width // config.patch_size))


def midas_prediction(model, image: np.ndarray, device) -> np.ndarray:
    """DPT's inverse-depth prediction (float32, HxW) of an HxWx3 uint8 picture, as the extension runs it."""
    torch = _torch()
    h, w = image.shape[:2]
    pixels = torch.from_numpy(_pad64(image)).float().to(device) / 127.5 - 1.0
    with torch.no_grad():
        depth = dpt_depth(model, pixels.permute(2, 0, 1)[None])[0]
    return depth[:h, :w].float().cpu().numpy()


def scaled_depth(depth: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1], as the extension scales MiDaS' prediction."""
    depth = depth - depth.min()
    return depth / depth.max() if depth.max() > 0 else depth


class MidasDepth:
    def __init__(self, sources, device, module: str):
        self.device = device
        self.model = shared(load_dpt, sources[0], device, module)

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        depth = scaled_depth(midas_prediction(self.model, image, self.device))
        return (depth * 255.0).clip(0, 255).astype(np.uint8)


def normal_from_depth(depth: np.ndarray, background: float, z: float = 2 * math.pi) -> np.ndarray:
    """The extension's normal map from a MiDaS prediction (HxW float32): HxWx3 uint8."""
    import cv2

    scaled = scaled_depth(depth)
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    x[scaled < background] = 0
    y[scaled < background] = 0
    normal = np.stack([x, y, np.full_like(x, z)], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1]


class MidasNormal(MidasDepth):
    def __call__(self, image, resolution=None, threshold_a=0.4, threshold_b=None, seed=None):
        return normal_from_depth(midas_prediction(self.model, image, self.device), threshold_a)


def load_depth_anything(source: str, device):
    from transformers import DepthAnythingForDepthEstimation

    return DepthAnythingForDepthEstimation.from_pretrained(source).to(device).eval()


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def lower_bound_size(height: int, width: int, side: int = 518, multiple: int = 14) -> tuple[int, int]:
    """(h, w) scaled so both sides are at least `side`, keeping the aspect, each rounded to a multiple
    (rounded up where rounding would fall below `side`): MiDaS' "lower_bound" Resize."""
    scale = max(side / height, side / width)

    def constrain(x: float) -> int:
        y = int(np.round(x / multiple) * multiple)
        return int(np.ceil(x / multiple) * multiple) if y < side else y

    return constrain(scale * height), constrain(scale * width)


class DepthAnything:
    def __init__(self, sources, device, module: str):
        self.device = device
        self.model = shared(load_depth_anything, sources[0], device, module)

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        import cv2

        torch = _torch()
        h, w = image.shape[:2]
        pixels = image[:, :, ::-1].astype(np.float32) / 255.0  # the extension's BGR2RGB on an RGB picture
        new_h, new_w = lower_bound_size(h, w)
        pixels = (cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_CUBIC) - IMAGENET_MEAN) / IMAGENET_STD
        batch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].to(self.device)
        with torch.no_grad():
            depth = self.model(pixel_values=batch).predicted_depth
            depth = torch.nn.functional.interpolate(depth[None].float(), (h, w), mode="bilinear",
                                                    align_corners=False)[0, 0]
        depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
        return depth.cpu().numpy().astype(np.uint8)


def load_zoe(source: str, device):
    from transformers import AutoImageProcessor, ZoeDepthForDepthEstimation

    model = ZoeDepthForDepthEstimation.from_pretrained(source).to(device).eval()
    return model, AutoImageProcessor.from_pretrained(source)


def zoe_scaled(depth: np.ndarray) -> np.ndarray:
    """The extension's ZoeDepth scaling: the 2nd..85th percentile of metric depth to 1..0, uint8."""
    low, high = np.percentile(depth, 2), np.percentile(depth, 85)
    near = 1.0 - (depth - low) / (high - low)
    return (near * 255.0).clip(0, 255).astype(np.uint8)


class ZoeDepth:
    def __init__(self, sources, device, module: str):
        self.device = device
        self.model, self.processor = shared(load_zoe, sources[0], device, module)

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        torch = _torch()
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
            flipped = self.model(pixel_values=torch.flip(inputs.pixel_values, dims=[3]))
        depth = zoe_depth_at(outputs.predicted_depth, flipped.predicted_depth, image.shape[:2], self.processor.do_pad)
        return zoe_scaled(depth.float().cpu().numpy())


def zoe_depth_at(depth, flipped, size: tuple[int, int], padded: bool):
    """ZoeDepth's image processor's post-processing (flip average, bicubic resize, the reflect pad of
    int(sqrt(side / 2) * 3) cut off), written with torch: transformers 5.24's PIL processor calls torchvision."""
    import torch

    depth = ((depth + torch.flip(flipped, dims=[-1])) / 2)[:, None].float()
    pad_h, pad_w = (int(np.sqrt(side / 2) * 3) for side in size) if padded else (0, 0)
    depth = torch.nn.functional.interpolate(depth, size=(size[0] + 2 * pad_h, size[1] + 2 * pad_w), mode="bicubic",
                                            align_corners=False)[0, 0]
    return depth[pad_h:depth.shape[0] - pad_h, pad_w:depth.shape[1] - pad_w]

"""Segmentation maps on transformers models: OneFormer (ADE20K, COCO) and UperNet (ADE20K).

Each annotator has model_free.py's call shape. The model's semantic labels (its own image processor's
resizing and post-processing back to the picture's size) are painted in the dataset's palette
(palettes.py): the exact colours the seg ControlNets were trained on, as the extension's annotators draw
them (sd-webui-controlnet `annotator/oneformer`: a white canvas, every label filled at alpha 1).
"""
from __future__ import annotations

import numpy as np

from engine.preprocess.loading import AnnotatorUnavailable, shared
from engine.preprocess.palettes import PALETTES


def paint(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 in the palette; ids outside it (none from a matching model) stay white."""
    out = np.full((*labels.shape, 3), 255, np.uint8)
    known = (labels >= 0) & (labels < len(palette))
    out[known] = palette[labels[known]]
    return out


def _check_classes(model, palette: np.ndarray, module: str, source: str) -> None:
    if model.config.num_labels != len(palette):
        raise AnnotatorUnavailable(f"{module}: {source!r} predicts {model.config.num_labels} classes, but its palette has "
                         f"{len(palette)}: give a model trained on that dataset")


def load_oneformer(source: str, device):
    from transformers import AutoImageProcessor, AutoTokenizer, OneFormerForUniversalSegmentation, OneFormerProcessor

    model = OneFormerForUniversalSegmentation.from_pretrained(source).to(device).eval()
    # class_info_file is the panoptic class table the processor fetches from the Hub; semantic maps never read it.
    image_processor = AutoImageProcessor.from_pretrained(source, class_info_file=None)
    processor = OneFormerProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(source))
    return model, processor


class OneFormer:
    def __init__(self, sources, device, module: str, dataset: str):
        self.device, self.palette = device, PALETTES[dataset]
        self.model, self.processor = shared(load_oneformer, sources[0], device, module)
        _check_classes(self.model, self.palette, module, sources[0])

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        import torch

        inputs = self.processor(images=image, task_inputs=["semantic"], return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        labels = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0]
        return paint(labels.cpu().numpy(), self.palette)


def load_upernet(source: str, device):
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    model = UperNetForSemanticSegmentation.from_pretrained(source).to(device).eval()
    return model, AutoImageProcessor.from_pretrained(source)


class UperNet:
    def __init__(self, sources, device, module: str):
        self.device, self.palette = device, PALETTES["ade20k"]
        self.model, self.processor = shared(load_upernet, sources[0], device, module)
        _check_classes(self.model, self.palette, module, sources[0])

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        import torch

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits
        logits = torch.nn.functional.interpolate(logits.float(), size=image.shape[:2], mode="bilinear",
                                                 align_corners=False)
        return paint(logits.argmax(dim=1)[0].cpu().numpy(), self.palette)

"""The controlnet_aux adapter (the `aux` extra): the extension's own annotator networks for the modules no
transformers model covers (softedge, scribble, lineart, mlsd, normal_bae, openpose with hands and face,
LeReS depth).

controlnet_aux needs torchvision, which does not import next to every torch build; where it is missing
these modules are refused in one line naming the extra (engine.preprocess.missing_extra). Each adapter
has model_free.py's call shape: the picture (already at processor resolution, padded to multiples of 64)
is handed to the detector at its own size (detect_resolution = image_resolution = its short side, so
controlnet_aux scales nothing), and what the extension does after its annotator that controlnet_aux does
not (the scribble modules' thinning, after the pad is cut off: `finish`) is done here. Weights load with the
detector's `from_pretrained` from the table's repository (lllyasviel/Annotators) or a local folder holding
the same files.
"""
from __future__ import annotations

import numpy as np

from engine.preprocess.loading import AnnotatorUnavailable, shared


def _controlnet_aux():
    try:
        import controlnet_aux
    except ImportError as err:  # installed but broken (a torchvision built for another torch), or absent
        raise AnnotatorUnavailable(f"the 'aux' extra does not import here ({err}): pip install "
                                   "'controlnet-engine[aux]' with a torch that torchvision matches") from None
    return controlnet_aux


def _loader(class_name: str):
    def load(source: str, device):
        return getattr(_controlnet_aux(), class_name).from_pretrained(source).to(device)

    load.__qualname__ = f"load_{class_name}"  # loading.shared keys its cache by loader name
    return load


LOADERS = {name: _loader(name) for name in ("HEDdetector", "PidiNetDetector", "LineartDetector",
                                            "LineartAnimeDetector", "MLSDdetector", "NormalBaeDetector",
                                            "OpenposeDetector", "LeresDetector")}


def scribble(edges: np.ndarray) -> np.ndarray:
    """The extension's scribble from soft edges: non-maximum suppression at 127 (sigma 3), blur (sigma 3),
    everything above 4 white."""
    import cv2

    from controlnet_aux.util import nms

    thin = cv2.GaussianBlur(nms(edges, 127, 3.0), (0, 0), 3.0)
    thin[thin > 4] = 255
    thin[thin < 255] = 0
    return thin


class AuxAdapter:
    detector = ""  # controlnet_aux class name

    def __init__(self, sources, device, module: str, *options):
        self.options = set(options)
        self.model = shared(LOADERS[self.detector], sources[0], device, module)

    def detect(self, image: np.ndarray, threshold_a, threshold_b) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, image, resolution=None, threshold_a=None, threshold_b=None, seed=None):
        h, w = image.shape[:2]
        padded = np.pad(image, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
        side = min(padded.shape[:2])
        out = self.detect(padded, threshold_a, threshold_b, detect_resolution=side, image_resolution=side,
                          output_type="np")
        return np.ascontiguousarray(out[:h, :w])

    def finish(self, out: np.ndarray) -> np.ndarray:
        """After the pad is cut off (engine.preprocess.run): the scribble modules thin the soft edges."""
        if "scribble" in self.options:  # grey, stacked to 3 channels by controlnet_aux
            return scribble(np.ascontiguousarray(out[:, :, 0]) if out.ndim == 3 else out)
        return out


class Hed(AuxAdapter):
    detector = "HEDdetector"

    def detect(self, image, threshold_a, threshold_b, **sizes):
        return self.model(image, safe="safe" in self.options, **sizes)


class Pidinet(AuxAdapter):
    detector = "PidiNetDetector"

    def detect(self, image, threshold_a, threshold_b, **sizes):
        return self.model(image, safe="safe" in self.options, apply_filter="sketch" in self.options, **sizes)


class Lineart(AuxAdapter):
    detector = "LineartDetector"

    def detect(self, image, threshold_a, threshold_b, **sizes):
        return self.model(image, coarse="coarse" in self.options, **sizes)


class LineartAnime(AuxAdapter):
    detector = "LineartAnimeDetector"

    def detect(self, image, threshold_a, threshold_b, **sizes):
        return self.model(image, **sizes)


class Mlsd(AuxAdapter):
    detector = "MLSDdetector"

    def detect(self, image, threshold_a, threshold_b, **sizes):
        return self.model(image, thr_v=threshold_a, thr_d=threshold_b, **sizes)


class NormalBae(AuxAdapter):
    detector = "NormalBaeDetector"

    def detect(self, image, threshold_a, threshold_b, **sizes):
        return self.model(image, **sizes)


class Openpose(AuxAdapter):
    detector = "OpenposeDetector"

    def detect(self, image, threshold_a, threshold_b, **sizes):
        return self.model(image, include_body="body" in self.options, include_hand="hand" in self.options,
                          include_face="face" in self.options, **sizes)


class Leres(AuxAdapter):
    detector = "LeresDetector"

    def detect(self, image, threshold_a, threshold_b, **sizes):
        return self.model(image, thr_a=threshold_a, thr_b=threshold_b, boost="boost" in self.options, **sizes)

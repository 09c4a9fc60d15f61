"""Preprocessors (the A1111 ControlNet extension's "modules"): one table that every interface reads.

A module turns a picture into a control map. `MODULES` holds each one under the extension's name (its
internal key, e.g. "depth"; its UI name, e.g. "depth_midas", is accepted too), with the extension's
sliders (defaults and ranges), control-type tags and list order, how its picture is sized, the weights a
model-backed module loads and the pip extra it needs. Python (`Runner.generate(preprocess=...)`), the CLI
(`--preprocess`, `--annotator`), `POST /generate`, the A1111 units and `/controlnet/detect`,
`/controlnet/module_list` and each registry ControlNet type's default preprocessor all read it; none
lists module names itself.

Sizing, as the extension does it (`run`): "pad" scales the picture so its short side is the processor
resolution (INTER_CUBIC up, INTER_AREA down), pads it to multiples of 64 with its edge pixels, runs the
annotator and cuts the pad off; "resize" scales without padding; "none" hands the picture over as it is.
A resolution of None (Python's default) keeps the picture's own size: no scaling, no padding.

Annotators are small classes with one call shape (engine/preprocess/model_free.py says it); model-backed
ones live in depth.py, segmentation.py and pose.py (transformers models) and aux.py (controlnet_aux, the
`aux` extra), and load through engine/preprocess/loading.py: lazily, once per process, shared.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, replace

import numpy as np

from engine.preprocess.images import ImageInput, image_size, inpaint, load_image, load_mask, to_uint8
from engine.preprocess.loading import AnnotatorUnavailable, Annotators
from engine.preprocess.model_free import CANNY_HIGH, CANNY_LOW

__all__ = ["MODULES", "Module", "Slider", "Preprocessor", "Annotators", "AnnotatorUnavailable", "find_module",
           "default_module", "pick_preprocessor", "preprocessor", "run", "canny", "canny_with", "inpaint",
           "load_image", "load_mask", "image_size", "to_uint8", "ImageInput", "CANNY_LOW", "CANNY_HIGH"]


@dataclass(frozen=True)
class Slider:
    label: str
    value: float  # the extension's default, used when a request sends -1 or nothing
    minimum: float
    maximum: float
    step: float = 0.01
    visible: bool = True  # hidden: the module always runs at `value` (shuffle's resolution)


@dataclass(frozen=True)
class Module:
    key: str  # the extension's internal name: what module_list lists and what this engine records
    annotator: str  # "file:Class" in engine/preprocess, built with `options`
    options: tuple = ()
    label: str | None = None  # the extension's UI name when it differs (module_list?alias_names=true)
    sizing: str = "pad"  # "pad", "resize" or "none" (the module docstring)
    resolution: Slider | None = None  # None: the module does not show a resolution slider
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    tags: tuple = ()  # the extension's control types, for control_types
    priority: int = 0  # the extension's list order: higher first
    weights: tuple = ()  # default Hugging Face ids of the model(s) it loads, in the annotator's order
    extra: str | None = None  # the pip extra it needs beyond the base install
    needs_mask: bool = False  # inpaint modules: the map is built from a picture and a mask
    default_for: tuple = ()  # engine/registry.py ControlNet types whose default preprocessor this is
    sampler_step: str = ""  # what the extension also does inside its sampler for this module (not done here)

    @property
    def name(self) -> str:
        return self.key

    @property
    def alias(self) -> str:
        return self.label or self.key

    @property
    def model_backed(self) -> bool:
        return bool(self.weights)


RES = Slider("Resolution", 512, 64, 2048, 8)
GAMMA = Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001)
VARIATION = Slider("Variation", 8.0, 3.0, 32.0, 1.0)
REMOVE_NEAR = Slider("Remove Near %", 0, 0, 100, 0.1)
REMOVE_BACKGROUND = Slider("Remove Background %", 0, 0, 100, 0.1)
DPT_HYBRID = ("Intel/dpt-hybrid-midas",)
COLORFIX = "each step's prediction takes the picture's blurred colours (its VAE latent, blur size Variation)"
RECOLOR = "the image's colours are recombined with the map's lightness after decoding"
ANNOTATORS_REPO = ("lllyasviel/Annotators",)

_TABLE = [
    # ---- model-free (engine/preprocess/model_free.py) ----
    Module("none", "model_free:Identity", sizing="none", resolution=RES, tags=("InstructP2P",), priority=10),
    Module("canny", "model_free:Canny", resolution=RES, threshold_a=Slider("Low Threshold", 100, 1, 255, 1),
           threshold_b=Slider("High Threshold", 200, 1, 255, 1), tags=("Canny",), priority=100,
           default_for=("canny",)),
    Module("invert", "model_free:Invert", label="invert (from white bg & black line)", sizing="none",
           tags=("Canny", "Lineart", "Scribble", "MLSD"), priority=20),
    Module("blur_gaussian", "model_free:BlurGaussian", sizing="resize", resolution=RES,
           threshold_a=Slider("Sigma", 9.0, 0.01, 64.0), tags=("Tile",)),
    Module("scribble_xdog", "model_free:ScribbleXdog", resolution=RES, threshold_a=Slider("XDoG Threshold", 32, 1, 64),
           tags=("Scribble", "SparseCtrl")),
    Module("shuffle", "model_free:Shuffle", sizing="resize", resolution=Slider("Resolution", 512, 64, 2048, 8, False),
           tags=("Shuffle",), default_for=("shuffle",)),
    Module("lineart_standard", "model_free:LineartStandard", label="lineart_standard (from white bg & black line)",
           resolution=RES, tags=("Lineart",), priority=100, default_for=("lineart",)),
    Module("threshold", "model_free:Threshold", resolution=RES,
           threshold_a=Slider("Binarization Threshold", 127, 0, 255)),
    Module("tile_resample", "model_free:TileResample", sizing="none", resolution=RES,
           threshold_a=Slider("Down Sampling Rate", 1.0, 1.0, 8.0), tags=("Tile",), priority=100, default_for=("tile",)),
    Module("tile_colorfix", "model_free:Identity", sizing="none", resolution=RES, threshold_a=VARIATION, tags=("Tile",),
           sampler_step=COLORFIX),
    Module("tile_colorfix+sharp", "model_free:Identity", sizing="none", resolution=RES, threshold_a=VARIATION,
           threshold_b=Slider("Sharpness", 1.0, 0.0, 2.0), tags=("Tile",), sampler_step=COLORFIX),
    Module("recolor_luminance", "model_free:Recolor", ("luminance",), sizing="none", resolution=RES,
           threshold_a=GAMMA, tags=("Recolor",), priority=100, sampler_step=RECOLOR),
    Module("recolor_intensity", "model_free:Recolor", ("intensity",), sizing="none", resolution=RES,
           threshold_a=GAMMA, tags=("Recolor",), sampler_step=RECOLOR),
    Module("color", "model_free:ColorGrid", label="t2ia_color_grid", sizing="none", resolution=RES,
           tags=("T2I-Adapter",)),
    Module("inpaint", "model_free:Identity", label="inpaint_global_harmonious", sizing="none", tags=("Inpaint",),
           needs_mask=True, default_for=("inpaint",)),
    Module("inpaint_only", "model_free:Identity", sizing="none", tags=("Inpaint",), priority=100, needs_mask=True,
           sampler_step="each step's prediction keeps the unmasked part of the picture, then a blurred-mask blend"),
    # ---- transformers models (depth.py, segmentation.py, pose.py) ----
    Module("depth", "depth:MidasDepth", label="depth_midas", resolution=RES, tags=("Depth",), priority=100,
           weights=DPT_HYBRID, default_for=("depth",)),
    Module("normal_map", "depth:MidasNormal", label="normal_midas", resolution=RES,
           threshold_a=Slider("Normal Background Threshold", 0.4, 0.0, 1.0), tags=("NormalMap",), weights=DPT_HYBRID),
    Module("depth_anything", "depth:DepthAnything", resolution=RES, tags=("Depth",),
           weights=("LiheYoung/depth-anything-large-hf",)),
    Module("depth_anything_v2", "depth:DepthAnything", resolution=RES, tags=("Depth",),
           weights=("depth-anything/Depth-Anything-V2-Large-hf",)),
    Module("depth_zoe", "depth:ZoeDepth", resolution=RES, tags=("Depth",), weights=("Intel/zoedepth-nyu",)),
    Module("oneformer_ade20k", "segmentation:OneFormer", ("ade20k",), label="seg_ofade20k", resolution=RES,
           tags=("Segmentation",), priority=100, weights=("shi-labs/oneformer_ade20k_swin_large",),
           default_for=("seg",)),
    Module("oneformer_coco", "segmentation:OneFormer", ("coco",), label="seg_ofcoco", resolution=RES,
           tags=("Segmentation",), weights=("shi-labs/oneformer_coco_swin_large",)),
    # UperNet (ConvNeXt) on ADE20K: not the extension's seg_ufade20k (UniFormer), so under its own name.
    Module("seg_upernet_ade20k", "segmentation:UperNet", resolution=RES, tags=("Segmentation",),
           weights=("openmmlab/upernet-convnext-small",)),
    # ViTPose on RT-DETR's person boxes, drawn as OpenPose's 18-point body map (not the CMU OpenPose network).
    Module("openpose", "pose:VitPoseOpenpose", resolution=RES, tags=("OpenPose",),
           weights=("usyd-community/vitpose-base-simple", "PekingU/rtdetr_r50vd_coco_o365"), default_for=("openpose",)),
    # ---- controlnet_aux, the `aux` extra (aux.py): the extension's own networks ----
    Module("hed", "aux:Hed", label="softedge_hed", resolution=RES, tags=("SoftEdge",), weights=ANNOTATORS_REPO,
           extra="aux"),
    Module("hed_safe", "aux:Hed", ("safe",), label="softedge_hedsafe", resolution=RES, tags=("SoftEdge",),
           weights=ANNOTATORS_REPO, extra="aux"),
    Module("pidinet", "aux:Pidinet", label="softedge_pidinet", resolution=RES, tags=("SoftEdge",), priority=100,
           weights=ANNOTATORS_REPO, extra="aux", default_for=("softedge",)),
    Module("pidinet_safe", "aux:Pidinet", ("safe",), label="softedge_pidisafe", resolution=RES, tags=("SoftEdge",),
           weights=ANNOTATORS_REPO, extra="aux"),
    Module("scribble_hed", "aux:Hed", ("scribble",), resolution=RES, tags=("Scribble", "SparseCtrl"),
           weights=ANNOTATORS_REPO, extra="aux"),
    Module("pidinet_scribble", "aux:Pidinet", ("scribble",), label="scribble_pidinet", resolution=RES,
           tags=("Scribble", "SparseCtrl"), priority=100, weights=ANNOTATORS_REPO, extra="aux",
           default_for=("scribble",)),
    Module("pidinet_sketch", "aux:Pidinet", ("sketch",), label="t2ia_sketch_pidi", resolution=RES,
           tags=("T2I-Adapter",), weights=ANNOTATORS_REPO, extra="aux"),
    Module("lineart", "aux:Lineart", ("realistic",), label="lineart_realistic", resolution=RES, tags=("Lineart",),
           weights=ANNOTATORS_REPO, extra="aux"),
    Module("lineart_coarse", "aux:Lineart", ("coarse",), resolution=RES, tags=("Lineart",), weights=ANNOTATORS_REPO,
           extra="aux"),
    Module("lineart_anime", "aux:LineartAnime", resolution=RES, tags=("Lineart",), weights=ANNOTATORS_REPO,
           extra="aux", default_for=("lineart_anime",)),
    Module("mlsd", "aux:Mlsd", resolution=RES, threshold_a=Slider("MLSD Value Threshold", 0.1, 0.01, 2.0),
           threshold_b=Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0), tags=("MLSD",), priority=100,
           weights=ANNOTATORS_REPO, extra="aux", default_for=("mlsd",)),
    Module("normal_bae", "aux:NormalBae", resolution=RES, tags=("NormalMap",), priority=100, weights=ANNOTATORS_REPO,
           extra="aux", default_for=("normalbae",)),
    Module("openpose_full", "aux:Openpose", ("body", "hand", "face"), resolution=RES, tags=("OpenPose",),
           priority=100, weights=ANNOTATORS_REPO, extra="aux"),
    Module("openpose_hand", "aux:Openpose", ("body", "hand"), resolution=RES, tags=("OpenPose",),
           weights=ANNOTATORS_REPO, extra="aux"),
    Module("openpose_face", "aux:Openpose", ("body", "face"), resolution=RES, tags=("OpenPose",),
           weights=ANNOTATORS_REPO, extra="aux"),
    Module("openpose_faceonly", "aux:Openpose", ("face",), resolution=RES, tags=("OpenPose",),
           weights=ANNOTATORS_REPO, extra="aux"),
    Module("depth_leres", "aux:Leres", resolution=RES, threshold_a=REMOVE_NEAR, threshold_b=REMOVE_BACKGROUND,
           tags=("Depth",), weights=ANNOTATORS_REPO, extra="aux"),
    Module("depth_leres++", "aux:Leres", ("boost",), resolution=RES, threshold_a=REMOVE_NEAR,
           threshold_b=REMOVE_BACKGROUND, tags=("Depth",), weights=ANNOTATORS_REPO, extra="aux"),
]
MODULES: dict[str, Module] = {m.key: m for m in _TABLE}
_BY_NAME = {**{m.alias: m for m in _TABLE}, **MODULES}


def find_module(name: str) -> Module | None:
    """The module a name means: its key or its UI name (either spelling the extension accepts)."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def names() -> list[str]:
    """Every name `find_module` knows (keys, then UI names that differ), for choices and errors."""
    return [*MODULES, *(m.label for m in _TABLE if m.label)]


def sorted_modules() -> list[Module]:
    """The extension's list order: none first, then by priority and UI name, highest first."""
    rest = sorted((m for m in _TABLE if m.key != "none"), key=lambda m: str(m.priority).zfill(8) + m.alias,
                  reverse=True)
    return [MODULES["none"], *rest]


def default_module(controlnet_type: str) -> str | None:
    """The default preprocessor of a registry ControlNet type (engine/registry.py), by key; None: none."""
    return next((m.key for m in _TABLE if controlnet_type in m.default_for), None)


EXTRAS = {"aux": ("controlnet_aux", "torchvision")}  # extra -> the modules it must make importable


def missing_extra(module: Module) -> str | None:
    """Why the module cannot run in this environment (its extra is not installed), or None."""
    if module.extra is None:
        return None
    absent = [name for name in EXTRAS[module.extra] if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    return (f"preprocessor {module.key!r} needs the {module.extra!r} extra ({', '.join(absent)} not installed): "
            f"pip install 'controlnet-engine[{module.extra}]'")


def available(module: Module) -> bool:
    return missing_extra(module) is None


def annotator_class(module: Module):
    file, cls = module.annotator.split(":")
    return getattr(importlib.import_module(f"engine.preprocess.{file}"), cls)


# ---- running a module -------------------------------------------------------------------------------

def at_resolution(image: np.ndarray, resolution: float, pad: bool):
    """Scale so the short side is `resolution` (INTER_CUBIC up, INTER_AREA down), then pad to multiples of
    64 with edge pixels when `pad`; returns the picture and the function that cuts a map back to size."""
    import cv2

    raw_h, raw_w = image.shape[:2]
    k = float(resolution) / min(raw_h, raw_w)
    h, w = int(np.round(raw_h * k)), int(np.round(raw_w * k))
    scaled = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    if not pad:
        return scaled, lambda out: out
    padded = np.pad(scaled, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    return np.ascontiguousarray(padded), lambda out: np.ascontiguousarray(out[:h, :w])


def _hwc3(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def check_slider(slider: Slider | None, value, what: str) -> float | None:
    """A slider's value in force: the default for None or -1 (the extension's "unset"), else the value,
    which must lie in the slider's range. A hidden slider always holds its default."""
    if slider is None:
        return None
    if value is None or value == -1 or not slider.visible:
        return slider.value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not slider.minimum <= value <= slider.maximum:
        raise ValueError(f"{what} must be in [{slider.minimum:g}, {slider.maximum:g}] (or -1 for {slider.value:g}), "
                         f"got {value!r}")
    return float(value)


def run(module: Module, image: np.ndarray, annotators: Annotators, resolution=None, threshold_a=None,
        threshold_b=None, seed: int | None = None) -> np.ndarray:
    """The module's map (HxWx3 uint8) of an HxWx3 uint8 picture. `resolution` None: at the picture's own
    size; sliders None: the module's defaults. Model-backed annotators load on first use (loading.py)."""
    a = check_slider(module.threshold_a, threshold_a, f"{module.key} threshold_a")
    b = check_slider(module.threshold_b, threshold_b, f"{module.key} threshold_b")
    annotator = annotators.get(module)
    finish = getattr(annotator, "finish", lambda out: out)  # what the extension does after cutting the pad off
    if resolution is None or module.sizing == "none":
        return _hwc3(finish(annotator(image, resolution, a, b, seed)))
    sized, unpad = at_resolution(image, resolution, pad=module.sizing == "pad")
    return _hwc3(finish(unpad(annotator(sized, resolution, a, b, seed))))


@dataclass(frozen=True)
class Preprocessor:
    """A module with its settings, as a callable `image -> map` to pass as `Runner.generate(preprocess=)`.

    `resolution` None runs at the picture's own size; sliders None are the module's defaults. The Runner
    binds its own `Annotators` (its device and weights); unbound, the module runs with the defaults."""

    module: Module
    resolution: float | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    annotators: Annotators | None = None

    @property
    def needs_mask(self) -> bool:
        return self.module.needs_mask

    def __call__(self, image: ImageInput, seed: int | None = None, mask: ImageInput | None = None):
        if self.module.needs_mask:
            return inpaint(image, mask)
        pixels = to_uint8(load_image(image))
        annotators = self.annotators if self.annotators is not None else Annotators()
        detected = run(self.module, pixels, annotators, self.resolution, self.threshold_a, self.threshold_b, seed)
        import PIL.Image

        return PIL.Image.fromarray(detected)


def preprocessor(name: str, resolution: float | None = None, threshold_a: float | None = None,
                 threshold_b: float | None = None) -> Preprocessor:
    """A configured module, e.g. `preprocessor("threshold", threshold_a=100)`, to pass as `preprocess=`."""
    module = _checked(name)
    for slider, value, what in ((module.threshold_a, threshold_a, "threshold_a"),
                                (module.threshold_b, threshold_b, "threshold_b")):
        if value is not None and slider is None:
            raise ValueError(f"preprocessor {module.key!r} has no {what}")
        check_slider(slider, value, f"{module.key} {what}")
    return Preprocessor(module, resolution, threshold_a, threshold_b)


def canny_with(low: int, high: int) -> Preprocessor:
    """A canny preprocessor with other thresholds, to pass as `preprocess=`."""
    if not (0 <= low <= high):
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    return Preprocessor(MODULES["canny"], threshold_a=low, threshold_b=high)


def canny(image: ImageInput, low: int = CANNY_LOW, high: int = CANNY_HIGH):
    """OpenCV Canny edges stacked to 3 channels, as in the diffusers ControlNet canny recipe (a PIL image)."""
    return canny_with(low, high)(image)


def _checked(name: str) -> Module:
    module = find_module(name)
    if module is None:
        raise ValueError(f"unknown preprocessor {name!r}; known: {', '.join(sorted(names()))}")
    return module


def pick_preprocessor(preprocess, registered: str | None, annotators: Annotators | None = None):
    """What `Runner.generate(preprocess=...)` means for one ControlNet: a callable or None (no preprocessing).

    None: the ControlNet type's own preprocessor (none for ControlNets given by id or path); False: the
    image is already a control map; a module name (MODULES, key or UI name); a `Preprocessor`; or any
    callable image -> control map. Modules run with `annotators` (the Runner's device and weights); a
    module whose extra is not installed is refused here, before any model work."""
    if preprocess is None:
        preprocess = registered
        if preprocess is None:
            return None
    if preprocess is False:
        return None
    if isinstance(preprocess, str):
        preprocess = Preprocessor(_checked(preprocess))
    if isinstance(preprocess, Preprocessor):
        missing = missing_extra(preprocess.module)
        if missing:
            raise AnnotatorUnavailable(missing)
        return replace(preprocess, annotators=preprocess.annotators or annotators)
    if callable(preprocess):
        return preprocess
    raise TypeError(f"preprocess must be None, False, a preprocessor name or a callable, got {preprocess!r}")


def control_map(fn, image, seed: int | None, mask=None):
    """Apply what `pick_preprocessor` returned: a module gets the generation's seed (shuffle) and the mask
    (inpaint modules); any other callable gets the image only."""
    if isinstance(fn, Preprocessor):
        return fn(image, seed=seed, mask=mask)
    return fn(image)

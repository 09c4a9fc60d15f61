"""The model-free preprocessors and the module table (engine/preprocess).

Each module's map is compared with a reference formula written here from the A1111 ControlNet extension's
documented behaviour (sd-webui-controlnet's model-free preprocessors): on random pictures, through the
processor-resolution path the extension takes (scale the short side, pad to 64, run, cut the pad), exactly
or to 1 level in 255. No model is loaded.
"""
import numpy as np
import PIL.Image
import pytest

cv2 = pytest.importorskip("cv2")

from engine import preprocess as pre  # noqa: E402
from engine.preprocess import MODULES, Annotators, find_module, run  # noqa: E402


@pytest.fixture(scope="module")
def annotators():
    return Annotators()


def picture(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    """A random picture with some structure (smooth blobs plus noise), so edges and lines exist."""
    rng = np.random.default_rng(seed)
    smooth = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth.astype(np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def extension_sized(image, resolution, pad=True):
    """The extension's resize_image_with_pad, written out: (sized picture, un-padder)."""
    h, w = image.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    scaled = cv2.resize(image, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    if not pad:
        return scaled, lambda x: x
    ph, pw = int(np.ceil(th / 64) * 64 - th), int(np.ceil(tw / 64) * 64 - tw)
    return np.pad(scaled, [[0, ph], [0, pw], [0, 0]], mode="edge"), lambda x: x[:th, :tw]


def grey3(x):
    return np.stack([x] * 3, axis=2) if x.ndim == 2 else x


def ref_threshold(img, t):
    return np.where(img.min(axis=2) > t, 255, 0).astype(np.uint8)


def ref_xdog(img, t):
    f = img.astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(f, (0, 0), 5.0) - cv2.GaussianBlur(f, (0, 0), 0.5), axis=2)).clip(0, 255)
    doubled = (2 * (255 - dog.astype(np.int32))) % 256  # the extension doubles in uint8
    return np.where(doubled > t, 255, 0).astype(np.uint8)


def ref_lineart_standard(img, _):
    f = img.astype(np.float32)
    line = np.min(cv2.GaussianBlur(f, (0, 0), 6.0) - f, axis=2).clip(0, 255)
    strong = line[line > 8]
    line = line / (max(16.0, float(np.median(strong))) if strong.size else 16.0) * 127
    return line.clip(0, 255).astype(np.uint8)


def ref_canny(img, a, b):
    return cv2.Canny(img, int(a), int(b))


PADDED = [  # module, reference(img, a[, b]), threshold_a, threshold_b
    ("canny", ref_canny, 60, 140),
    ("threshold", lambda img, a, b: ref_threshold(img, a), 100, None),
    ("scribble_xdog", lambda img, a, b: ref_xdog(img, a), 20, None),
    ("lineart_standard", lambda img, a, b: ref_lineart_standard(img, a), None, None),
]


@pytest.mark.parametrize("name,reference,a,b", PADDED, ids=[p[0] for p in PADDED])
@pytest.mark.parametrize("resolution", [None, 64, 100])
def test_padded_modules_equal_their_formula(annotators, name, reference, a, b, resolution):
    for seed in range(3):
        img = picture(seed)
        if resolution is None:  # Python's default: the picture as it is
            expected = reference(img, a, b)
        else:
            sized, unpad = extension_sized(img, resolution)
            expected = unpad(reference(sized, a, b))
        got = run(MODULES[name], img, annotators, resolution, a, b)
        assert got.shape == (*expected.shape[:2], 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, grey3(expected))
        assert got.max() == 255 or name == "lineart_standard"  # not vacuous


def test_resize_modules_equal_their_formula(annotators):
    img = picture(4, 50, 70)
    sized, _ = extension_sized(img, 64, pad=False)
    np.testing.assert_array_equal(run(MODULES["blur_gaussian"], img, annotators, 64, 3.5),
                                  cv2.GaussianBlur(sized, (0, 0), 3.5))
    np.testing.assert_array_equal(run(MODULES["blur_gaussian"], img, annotators), cv2.GaussianBlur(img, (0, 0), 9.0))


def ref_noise(rng, h, w, f=256):
    coarse = rng.uniform(low=0, high=1, size=(h // f + 2, w // f + 2, 1))
    noise = cv2.resize(coarse, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
    noise = noise - noise.min()
    return (noise / noise.max())[:, :, None]


def test_shuffle_is_the_seeded_content_shuffle(annotators):
    img = picture(5, 64, 96)
    np.random.seed(1234)  # the extension seeds numpy's global generator, then draws x, then y
    x = ref_noise(np.random, 64, 96) * 95.0
    y = ref_noise(np.random, 64, 96) * 63.0
    expected = cv2.remap(img, np.concatenate([x, y], axis=2).astype(np.float32), None, cv2.INTER_LINEAR)
    np.testing.assert_array_equal(run(MODULES["shuffle"], img, annotators, seed=1234), expected)
    assert not np.array_equal(run(MODULES["shuffle"], img, annotators, seed=1235), expected)
    # In A1111 the resolution slider is hidden: any processor_res means 512 (pixel_perfect aside).
    assert pre.check_slider(MODULES["shuffle"].resolution, 64, "r") == 512


def test_per_pixel_modules_equal_their_formula(annotators):
    img = picture(6)
    np.testing.assert_array_equal(run(MODULES["invert"], img, annotators), 255 - img)
    for name, convert, channel in (("recolor_luminance", cv2.COLOR_BGR2LAB, 0),
                                   ("recolor_intensity", cv2.COLOR_BGR2HSV, 2)):
        grey = (cv2.cvtColor(img, convert)[:, :, channel].astype(np.float32) / 255.0) ** 0.7
        np.testing.assert_array_equal(run(MODULES[name], img, annotators, None, 0.7),
                                      grey3((grey * 255.0).clip(0, 255).astype(np.uint8)))
    for name in ("none", "tile_colorfix", "tile_colorfix+sharp"):
        np.testing.assert_array_equal(run(MODULES[name], img, annotators, 64), img)
    np.testing.assert_array_equal(run(MODULES["tile_resample"], img, annotators, None, 1.05), img)
    np.testing.assert_array_equal(run(MODULES["tile_resample"], img, annotators, None, 2.5),
                                  cv2.resize(img, (32, 19), interpolation=cv2.INTER_AREA))


def test_color_grid_equals_its_formula(annotators):
    img = picture(7, 90, 150)
    scaled = cv2.resize(img, (int(round(150 / 90 * 128)), 128), interpolation=cv2.INTER_AREA)
    h, w = scaled.shape[:2]
    cells = cv2.resize(scaled, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(run(MODULES["color"], img, annotators, 128),
                                  cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST))


def test_inpaint_modules_build_the_inpaint_map():
    img = picture(8, 32, 32)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:30] = 255
    for name in ("inpaint", "inpaint_global_harmonious", "inpaint_only"):
        got = pre.preprocessor(name)(img, mask=mask)
        expected = img.astype(np.float32) / 255.0
        expected[mask > 127] = -1.0
        np.testing.assert_array_equal(got, expected)


def test_table_names_order_sliders_and_defaults():
    assert find_module("depth_midas") is MODULES["depth"] and find_module("seg_ofade20k").key == "oneformer_ade20k"
    assert find_module("invert (from white bg & black line)").key == "invert" and find_module("sobel") is None
    order = [m.key for m in pre.sorted_modules()]
    assert order[0] == "none" and order.index("canny") < order.index("invert")  # priority 100 before 20
    assert MODULES["canny"].threshold_a.value == 100 and MODULES["canny"].resolution.step == 8
    assert MODULES["normal_map"].threshold_a == pre.Slider("Normal Background Threshold", 0.4, 0.0, 1.0)
    from engine import registry

    defaults = {n: registry.resolve(n).preprocessor for n in ("canny", "depth", "openpose", "seg", "tile", "inpaint")}
    assert defaults == dict(canny="canny", depth="depth", openpose="openpose", seg="oneformer_ade20k",
                            tile="tile_resample", inpaint="inpaint")
    assert registry.resolve("ip2p").preprocessor is None
    for module in MODULES.values():  # every annotator class exists, with the one call shape
        cls = pre.annotator_class(module)
        assert callable(cls) and "threshold_a" in cls.__call__.__code__.co_varnames
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        pre.preprocessor("threshold", threshold_a=300)
    with pytest.raises(ValueError, match="unknown preprocessor 'sobel'"):
        pre.pick_preprocessor("sobel", None)


def test_missing_extra_is_refused_in_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "controlnet_aux" else real(name, *a))
    with pytest.raises(pre.AnnotatorUnavailable, match=r"'hed' needs the 'aux' extra .*controlnet_aux.*\[aux\]"):
        pre.pick_preprocessor("softedge_hed", None)


def test_python_preprocessor_objects(photo):
    edges = pre.preprocessor("canny", threshold_a=50, threshold_b=150)(photo)
    np.testing.assert_array_equal(np.asarray(edges)[:, :, 0], cv2.Canny(np.asarray(photo), 50, 150))
    at_64 = pre.preprocessor("threshold", resolution=64)(photo)  # 128 px photo at processor resolution 64
    assert isinstance(at_64, PIL.Image.Image) and at_64.size == (64, 64)


def test_annotators_config_is_checked():
    with pytest.raises(ValueError, match="'canny' is not a model-backed preprocessor"):
        Annotators({"canny": "x"})
    with pytest.raises(ValueError, match="give 2 Hugging Face id"):
        Annotators({"openpose": "a,b,c"})
    given = Annotators({"depth_midas": "/models/dpt", "openpose": "/models/vitpose"})
    assert given.sources_for(MODULES["depth"]) == ("/models/dpt",)
    assert given.sources_for(MODULES["openpose"]) == ("/models/vitpose", "PekingU/rtdetr_r50vd_coco_o365")
    from engine.preprocess.loading import annotator_flag

    assert annotator_flag("depth_anything_v2=/m/da2") == ("depth_anything_v2", "/m/da2")
    with pytest.raises(Exception, match="not a model-backed preprocessor"):
        annotator_flag("canny=/m")

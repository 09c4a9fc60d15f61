"""The model-backed preprocessors on tiny random-weight configs of their real transformers classes, saved to
disk and loaded as the table's weights are (tests/annotator_models.py), each map checked by its own rules:
depth scaled as the extension scales it (near is white), normals from the depth by its formula, segmentation
in the dataset palette's exact colours, OpenPose colours and limbs from known keypoints. Also: one load per
process shared by modules, Runners and threads; a missing download fails in one line naming the id.
"""
import threading

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")

from engine import preprocess as pre  # noqa: E402
from engine.preprocess import MODULES, Annotators, run  # noqa: E402
from engine.preprocess.palettes import ADE20K, COCO  # noqa: E402
from tests.annotator_models import TinyAnnotators  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinyAnnotators(tmp_path_factory.mktemp("annotators"))


@pytest.fixture(scope="module")
def annotators(tiny):
    return Annotators(tiny.all(), "cpu")


def picture(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)


def sized(image, resolution):
    """The extension's processor-resolution picture (short side scaled, padded to 64) and its size."""
    h, w = image.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    scaled = cv2.resize(image, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    return np.pad(scaled, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge"), (th, tw)


def test_depth_midas_and_normals_follow_the_extension(annotators):
    img = picture(0)
    padded, (th, tw) = sized(img, 64)
    model = annotators.get(MODULES["depth"]).model
    with torch.no_grad():
        x = torch.from_numpy(padded).float().permute(2, 0, 1)[None] / 127.5 - 1.0
        raw = pre.depth.dpt_depth(model, x)[0].numpy()[:th, :tw]
    scaled = (raw - raw.min()) / (raw - raw.min()).max()
    got = run(MODULES["depth"], img, annotators, 64)
    np.testing.assert_array_equal(got[:, :, 0], (scaled * 255.0).clip(0, 255).astype(np.uint8))
    near, far = np.unravel_index(raw.argmax(), raw.shape), np.unravel_index(raw.argmin(), raw.shape)
    assert got[near].tolist() == [255] * 3 and got[far].tolist() == [0] * 3  # MiDaS: larger = nearer = white

    gx, gy = cv2.Sobel(raw, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(raw, cv2.CV_32F, 0, 1, ksize=3)
    gx[scaled < 0.3], gy[scaled < 0.3] = 0, 0
    normal = np.stack([gx, gy, np.full_like(gx, 2 * np.pi)], axis=2)
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    expected = (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1]
    got = run(MODULES["normal_map"], img, annotators, 64, 0.3)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert annotators.get(MODULES["normal_map"]).model is model  # one DPT for both modules


@pytest.mark.parametrize("key", ["depth_anything", "depth_anything_v2"])
def test_depth_anything_follows_the_extension(annotators, key):
    img = picture(1, 64, 96)
    model = annotators.get(MODULES[key]).model
    # The extension: BGR (its BGR2RGB on an RGB picture), both sides >= 518 in multiples of 14, ImageNet.
    x = cv2.resize(img[:, :, ::-1].astype(np.float32) / 255.0, (784, 518), interpolation=cv2.INTER_CUBIC)
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        raw = model(pixel_values=torch.from_numpy(x.transpose(2, 0, 1)).float()[None]).predicted_depth
        raw = torch.nn.functional.interpolate(raw[None], (64, 96), mode="bilinear", align_corners=False)[0, 0]
    expected = ((raw - raw.min()) / (raw.max() - raw.min()) * 255.0).numpy().astype(np.uint8)
    got = run(MODULES[key], img, annotators)
    np.testing.assert_array_equal(got[:, :, 0], expected)
    assert got.max() == 255 and got.min() == 0


def test_depth_zoe_scales_percentiles_near_white(annotators):
    img = picture(2, 64, 64)
    zoe = annotators.get(MODULES["depth_zoe"])
    inputs = zoe.processor(images=img, return_tensors="pt")
    with torch.no_grad():
        out, flipped = zoe.model(**inputs), zoe.model(pixel_values=torch.flip(inputs.pixel_values, dims=[3]))
    averaged = ((out.predicted_depth + torch.flip(flipped.predicted_depth, dims=[-1])) / 2)[:, None]
    pad = int(np.sqrt(64 / 2) * 3)  # ZoeDepth's reflect pad, cut off after a bicubic resize
    depth = torch.nn.functional.interpolate(averaged, size=(64 + 2 * pad, 64 + 2 * pad), mode="bicubic")[0, 0]
    depth = depth[pad:-pad, pad:-pad].numpy()
    low, high = np.percentile(depth, 2), np.percentile(depth, 85)
    expected = ((1.0 - (depth - low) / (high - low)) * 255.0).clip(0, 255).astype(np.uint8)
    got = run(MODULES["depth_zoe"], img, annotators)
    np.testing.assert_array_equal(got[:, :, 0], expected)
    assert (got[depth <= low] == 255).all() and (got[depth >= high] == 0).all()  # metric depth: near is white


@pytest.mark.parametrize("key,palette", [("oneformer_ade20k", ADE20K), ("oneformer_coco", COCO),
                                         ("seg_upernet_ade20k", ADE20K)])
def test_segmentation_paints_the_dataset_palette(annotators, key, palette):
    img = picture(3, 64, 96)
    got = run(MODULES[key], img, annotators, 64)
    seg = annotators.get(MODULES[key])
    assert got.shape == (64, 96, 3)
    colours = {tuple(c) for c in np.unique(got.reshape(-1, 3), axis=0)}
    assert colours <= {tuple(c) for c in palette}  # only the palette's exact colours
    labels = np.array([[next(i for i, p in enumerate(palette) if tuple(p) == tuple(c)) for c in row] for row in got[::16, ::16]])
    np.testing.assert_array_equal(pre.segmentation.paint(labels, seg.palette), got[::16, ::16])


def test_palettes_are_the_datasets():
    assert len(ADE20K) == 150 and len(COCO) == 133
    assert ADE20K[0].tolist() == [120, 120, 120] and ADE20K[2].tolist() == [6, 230, 230]  # wall, sky
    assert COCO[0].tolist() == [220, 20, 60] and COCO[80].tolist() == [255, 255, 128]  # person, banner (first stuff)


def test_openpose_drawing_from_known_keypoints():
    from engine.preprocess.pose import COLORS, LIMBS, draw_bodies, openpose_points

    coco = np.array([[50, 24], [45, 15], [55, 15], [36, 20], [64, 20], [40, 40], [60, 40], [36, 60], [64, 60],
                     [34, 80], [66, 80], [44, 80], [56, 80], [44, 105], [56, 105], [44, 125], [56, 125]], float)
    scores = np.full(17, 0.9)
    scores[16] = 0.1  # the right ankle unseen
    points = openpose_points(coco, scores)
    assert points[1] == (50.0, 40.0)  # the neck: the shoulders' midpoint
    assert points[2] == (60.0, 40.0) and points[5] == (40.0, 40.0)  # OpenPose's right shoulder is COCO 6
    assert points[10] is None and points[13] == (44.0, 125.0)  # right ankle (COCO 16) unseen, left seen
    canvas = draw_bodies(140, 100, [points])
    for i, point in enumerate(points):
        if point is not None:
            assert canvas[int(point[1]), int(point[0])].tolist() == list(COLORS[i])
    # Limb k in 60% of colour k, e.g. neck->right hip (k 6) and right hip->knee (k 7), at their midpoints.
    for k in (6, 7, 9):
        a, b = points[LIMBS[k][0]], points[LIMBS[k][1]]
        mid = (int((a[0] + b[0]) / 2), int((a[1] + b[1]) / 2))
        assert canvas[mid[1], mid[0]].tolist() == [int(c * 0.6) for c in COLORS[k]]
    assert canvas[115:, 52:62].max() == 0  # nothing of the right lower leg: its ankle is unseen
    assert canvas[0, 0].tolist() == [0, 0, 0]


def test_openpose_pipeline_draws_openpose_colours(annotators):
    pose = annotators.get(MODULES["openpose"])
    pose.person_threshold = pose.keypoint_threshold = 0.0  # random weights: take every box and point
    try:
        got = run(MODULES["openpose"], picture(4, 64, 96), annotators, 64)
    finally:
        pose.person_threshold, pose.keypoint_threshold = 0.3, 0.3
    from engine.preprocess.pose import COLORS

    allowed = {(0, 0, 0), *COLORS, *(tuple(int(c * 0.6) for c in col) for col in COLORS)}
    colours = {tuple(c) for c in np.unique(got.reshape(-1, 3), axis=0)}
    assert len(colours) > 3 and colours <= allowed


def test_loaded_once_shared_and_thread_safe(tiny, annotators):
    from engine.preprocess.loading import loads

    other = Annotators({"depth_midas": tiny["depth"], "oneformer_ade20k": tiny["oneformer_ade20k"]}, "cpu")
    assert other.get(MODULES["depth"]).model is annotators.get(MODULES["depth"]).model  # another Runner's set
    assert sum(1 for load in loads() if load["source"] == tiny["depth"]) == 1
    assert all(load["mb"] > 0 and load["ms"] > 0 for load in loads())
    pictures = [picture(10 + i) for i in range(4)]
    expected = [run(MODULES[k], p, annotators, 64) for k in ("depth", "oneformer_ade20k") for p in pictures]
    results = [None] * len(expected)

    def work(i):
        results[i] = run(MODULES[("depth", "oneformer_ade20k")[i // 4]], pictures[i % 4], other if i % 2 else annotators, 64)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(expected))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_missing_weights_fail_in_one_line_naming_the_id(tmp_path):
    missing = str(tmp_path / "no-such-dpt")
    broken = Annotators({"depth": missing})
    for _ in range(2):  # the second answer comes from memory
        with pytest.raises(pre.AnnotatorUnavailable) as err:
            run(MODULES["depth"], picture(5), broken)
        message = str(err.value)
        assert "\n" not in message and repr(missing) in message and "--annotator depth=DIR" in message


def test_runner_uses_the_type_default_and_its_annotators(tiny, photo):
    from engine import Runner

    runner = Runner(model="tiny", controlnet="depth", device="cpu", annotators={"depth_midas": tiny["depth"]})
    result = runner.generate("a photo", photo, num_inference_steps=1, height=64, width=64, seed=0)
    expected = run(MODULES["depth"], np.asarray(photo), runner.annotators)
    np.testing.assert_array_equal(np.asarray(result.control_maps[0]), expected)
    assert result.timings["preprocess"] > 0
    shuffled = runner.generate("a photo", photo, num_inference_steps=1, height=64, width=64, seed=3,
                               preprocess="shuffle").control_maps[0]
    np.testing.assert_array_equal(np.asarray(shuffled), run(MODULES["shuffle"], np.asarray(photo), runner.annotators,
                                                             seed=3))

"""The controlnet_aux adapter (the `aux` extra), for real: controlnet_aux's own networks with random weights,
saved as the files its `from_pretrained` reads, loaded through the table's Annotators, each map equal to the
extension's path (processor resolution, pad to 64, the detector at that size, pad cut off, its
post-processing).

It needs an environment where controlnet_aux imports (torchvision matching torch), which the main test
environment is not; there this module is skipped. Its own environment and command (README, "Preprocessors"):
    python3 -m venv .venv-aux && .venv-aux/bin/pip install -c requirements/constraints-aux.txt -e ".[aux]" pytest
    .venv-aux/bin/python -m pytest tests/test_aux.py -q
"""
import numpy as np
import pytest

aux = pytest.importorskip("controlnet_aux", reason="the aux extra (controlnet_aux + torchvision) is not installed")
cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")

from engine.preprocess import MODULES, Annotators, run  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A folder holding lllyasviel/Annotators' file names, each a random-weight network of its class."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model
    from controlnet_aux.pidi.model import pidinet

    folder = tmp_path_factory.mktemp("annotators")
    torch.manual_seed(0)
    hed = ControlNetHED_Apache2()
    with torch.no_grad():
        hed.norm.normal_(0, 1)  # zeros in the checkpoint class: make the map depend on the picture
    torch.save(hed.state_dict(), folder / "ControlNetHED.pth")
    torch.save({"state_dict": pidinet().state_dict()}, folder / "table5_pidinet.pth")
    torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
    torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")
    torch.save(MobileV2_MLSD_Large().state_dict(), folder / "mlsd_large_512_fp32.pth")
    for net, name in ((bodypose_model(), "body_pose_model.pth"), (handpose_model(), "hand_pose_model.pth")):
        # OpenPose's checkpoints name layers without the network's first module name (open_pose/util.transfer)
        torch.save({k.split(".", 1)[1]: v for k, v in net.state_dict().items()}, folder / name)
    torch.save(FaceNet().state_dict(), folder / "facenet.pth")
    return str(folder)


def picture(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)


def extension_path(image, resolution, detect):
    """The extension: short side to the resolution, edge-pad to 64, the annotator, the pad cut off."""
    h, w = image.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    scaled = cv2.resize(image, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(scaled, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge")
    side = min(padded.shape[:2])
    return detect(padded, dict(detect_resolution=side, image_resolution=side, output_type="np"))[:th, :tw]


def scribble(edges):
    from controlnet_aux.util import nms

    thin = cv2.GaussianBlur(nms(edges, 127, 3.0), (0, 0), 3.0)
    return np.where(thin > 4, 255, 0).astype(np.uint8)


CASES = [  # module, detector class, call options, scribble afterwards
    ("hed", "HEDdetector", {}, False),
    ("hed_safe", "HEDdetector", {"safe": True}, False),
    ("scribble_hed", "HEDdetector", {}, True),
    ("pidinet", "PidiNetDetector", {}, False),
    ("pidinet_safe", "PidiNetDetector", {"safe": True}, False),
    ("pidinet_scribble", "PidiNetDetector", {}, True),
    ("pidinet_sketch", "PidiNetDetector", {"apply_filter": True}, False),
    ("lineart", "LineartDetector", {}, False),
    ("lineart_coarse", "LineartDetector", {"coarse": True}, False),
    ("mlsd", "MLSDdetector", {"thr_v": 0.1, "thr_d": 0.1}, False),
    ("openpose_full", "OpenposeDetector", {"include_body": True, "include_hand": True, "include_face": True}, False),
]


@pytest.mark.parametrize("key,detector,options,thin", CASES, ids=[c[0] for c in CASES])
def test_adapter_equals_the_extension_path(weights, key, detector, options, thin):
    annotators = Annotators({key: weights})
    reference = getattr(aux, detector).from_pretrained(weights)
    img = picture(0)
    expected = extension_path(img, 64, lambda x, sizes: reference(x, **options, **sizes))
    if thin:
        expected = scribble(np.ascontiguousarray(expected[:, :, 0]))
    expected = np.repeat(expected[:, :, None], 3, axis=2) if expected.ndim == 2 else expected
    got = run(MODULES[key], img, annotators, 64, MODULES[key].threshold_a and 0.1, MODULES[key].threshold_b and 0.1)
    np.testing.assert_array_equal(got, expected)


def test_aux_modules_are_listed_and_load_once(weights):
    from engine.preprocess import available, find_module
    from engine.preprocess.loading import loads

    assert all(available(find_module(name)) for name in ("softedge_hed", "lineart_realistic", "openpose_full"))
    one, two = Annotators({"hed": weights, "scribble_hed": weights}), Annotators({"hed_safe": weights})
    assert one.get(MODULES["hed"]).model is one.get(MODULES["scribble_hed"]).model is two.get(MODULES["hed_safe"]).model
    assert sum(1 for load in loads() if load["module"] in ("hed", "hed_safe", "scribble_hed")) == 1

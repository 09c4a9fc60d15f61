"""The OpenVINO backend in every mode the other backends have: img2img and inpainting (4-channel UNet with
the session's shared engine dir, 9-channel inpainting UNet with its own) and LoRA switches without export,
each equal to the torch backend (fp32, max abs <= 1e-4). The same cases as tests/test_img2img_ort.py and
tests/test_lora_ort.py, run through `Runner(engine_dir=..., backend="openvino")` on the same ONNX files."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import max_errors
from tests.test_build import _cli, one_torch_thread, staged_build  # noqa: F401 (a fixture)
from tests.test_img2img_ort import BASE, CASES, pics  # noqa: F401 (a fixture)
from tests.test_lora import control, lora_files, ours  # noqa: F401 (fixtures)

pytest.importorskip("openvino")

TOL = 1e-4


@pytest.fixture(scope="module")
def four(request, tmp_path_factory, tiny_dir):
    from engine import Runner

    engine_dir = staged_build(request.config, tmp_path_factory.mktemp("build"), tiny_dir)["dir"]
    nets = [str(tiny_dir["canny"]), str(tiny_dir["depth"])]
    return dict(dir=engine_dir, ours=Runner(engine_dir=str(engine_dir), backend="openvino"),
                torch=Runner(model=str(tiny_dir["model"]), controlnet=nets, backend="torch", device="cpu"))


@pytest.mark.parametrize("case", list(CASES))
def test_four_channel_modes_match_torch(four, pics, case):  # noqa: F811 (pics is a fixture)
    kwargs = {**BASE, **CASES[case]}
    if kwargs.pop("nets", 1) == 1:  # both runners hold both nets; scale 0 keeps the second from running
        kwargs.setdefault("controlnet_conditioning_scale", [1.0, 0.0])
    if kwargs.pop("mask", False):
        kwargs["mask_image"] = pics["mask"]
    call = dict(image=[pics["edges"], pics["init"]], init_image=pics["init"], **kwargs)
    got = four["ours"].generate(**call).images
    want = four["torch"].generate(**call).images
    abs_err, rel_err = max_errors(got, want)
    print(f"openvino {case}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{case}: {abs_err:.3g}"
    assert float(np.abs(want).max()) > 0


def test_nine_channel_inpaint_matches_torch(tmp_path_factory, pics):  # noqa: F811
    from engine import Runner
    from engine.tiny import save_tiny

    root = tmp_path_factory.mktemp("nine-ov")
    paths = save_tiny(root / "model", controlnets=("canny",), preset="tiny-inpaint")
    out = root / "engine"
    code, log = _cli("--model", str(paths["model"]), "--controlnet", str(paths["canny"]), "--out", str(out),
                     "--min-size", "64", "--max-size", "64", "--max-batch", "2", "--backend", "openvino")
    assert code == 0, log
    kwargs = dict(BASE, image=pics["edges"], init_image=pics["init"], mask_image=pics["mask"], strength=0.5)
    got = Runner(engine_dir=str(out), backend="openvino").generate(**kwargs).images
    want = Runner(model=str(paths["model"]), controlnet=str(paths["canny"]), backend="torch",
                  device="cpu").generate(**kwargs).images
    abs_err, rel_err = max_errors(got, want)
    print(f"openvino nine-channel: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL


def test_lora_switches_equal_torch_without_export(four, tiny_dir, lora_files, control, monkeypatch):  # noqa: F811
    import torch

    from engine import Runner

    def no_export(*args, **kwargs):
        raise AssertionError("a LoRA switch must not export")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    net = [str(tiny_dir["canny"])]
    graphs = Runner(engine_dir=str(four["dir"]), controlnet=net, backend="openvino")
    reference = Runner(model=str(tiny_dir["model"]), controlnet=net, backend="torch", device="cpu")
    base = ours(graphs, control)
    f = lora_files
    for label, loras in [("unet+te 1.0", [(f["unet_text"], 1.0)]),
                         ("two 0.7 / -0.4", [(f["unet_only"], 0.7), (f["second"], -0.4)]),
                         ("none", [])]:
        graphs.set_loras(loras)
        reference.set_loras(loras)
        image = ours(graphs, control)
        abs_err, _ = max_errors(image, ours(reference, control))
        print(f"openvino lora {label}: max abs vs torch {abs_err:.2e}")
        assert abs_err <= TOL, label
        if loras:
            assert max_errors(image, base)[0] > 100 * TOL, label
    assert np.array_equal(image, base), "[] gives the built graphs' own image"

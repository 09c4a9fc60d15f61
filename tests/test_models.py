"""The tiny model, loading from disk, the registry and the canny preprocessor."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from engine import Runner, preprocess, registry, tiny
from engine.tiny import save_tiny


def state_checksum(module: torch.nn.Module) -> float:
    return float(sum(p.double().abs().sum() for p in module.state_dict().values()))


def test_tiny_model_is_deterministic_and_keeps_global_rng():
    before = torch.random.get_rng_state()
    a, b = tiny.tiny_components(), tiny.tiny_components()
    assert torch.equal(before, torch.random.get_rng_state())
    for key in ("text_encoder", "unet", "vae"):
        for (name, pa), pb in zip(a[key].state_dict().items(), b[key].state_dict().values()):
            assert torch.equal(pa, pb), (key, name)


# Sums of |weights|, recorded with torch 2.13.0 on x86-64: the same weights on every machine.
# A change here means the tiny model changed, and every recorded figure built on it too.
EXPECTED_CHECKSUMS = {"unet": 94036.87508, "vae": 4213.767061, "text_encoder": 1887.876066, "controlnet": 48288.23267}


def test_tiny_model_weights_are_pinned():
    parts = tiny.tiny_components()
    sums = {key: state_checksum(parts[key]) for key in ("unet", "vae", "text_encoder")}
    sums["controlnet"] = state_checksum(tiny.tiny_controlnet("canny", parts["unet"]))
    print(sums)
    for key, expected in EXPECTED_CHECKSUMS.items():
        assert sums[key] == pytest.approx(expected, rel=1e-6), key


def test_tiny_controlnet_zero_layers_are_randomised():
    net = tiny.tiny_controlnet("canny")
    zero_convs = list(net.controlnet_down_blocks) + [net.controlnet_mid_block]
    assert len(zero_convs) == 13
    for conv in zero_convs + [net.controlnet_cond_embedding.conv_out]:
        assert conv.weight.abs().max() > 0
    # Different names give different ControlNets, same name the same one.
    other = tiny.tiny_controlnet("depth")
    assert not torch.equal(net.controlnet_mid_block.weight, other.controlnet_mid_block.weight)
    assert torch.equal(net.controlnet_mid_block.weight, tiny.tiny_controlnet("canny").controlnet_mid_block.weight)


def test_hint_encoder_keeps_the_signal():
    """He-style init: the hint is not shrunk to nothing through its 8 convs."""
    net = tiny.tiny_controlnet("canny")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hint = net.controlnet_cond_embedding(image)
    assert hint.shape == (1, 32, 8, 8)
    # Default init (conv_out drawn at std 0.02 instead of zeros) gives ~0.006 here; ours ~0.04.
    assert hint.std() > 0.02


def test_saved_tiny_model_reloads_identically(tmp_path, photo):
    paths = save_tiny(tmp_path, controlnets=("canny",))
    assert json.loads((paths["model"] / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    built = Runner(model="tiny", controlnet="canny", device="cpu")
    loaded = Runner(model=str(paths["model"]), controlnet=str(paths["canny"]), device="cpu")
    kwargs = dict(num_inference_steps=3, height=64, width=64, seed=0, output_type="np")
    assert_same_weights(built, loaded)
    a = built.generate("a photo", photo, **kwargs).images
    b = loaded.generate("a photo", photo, preprocess="canny", **kwargs).images
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def assert_same_weights(a: Runner, b: Runner) -> None:
    """Every module's weights equal bit for bit. The images are held to 1e-5 (1.7e-6 seen), not to bit equality: the
    same weights at another memory alignment (safetensors maps a folder's file at a 40-byte offset; a
    single file is copied into aligned memory) take other oneDNN/MKL code paths, which at one thread
    differed in the last bit."""
    pairs = [(a.backend.unet_model.unet, b.backend.unet_model.unet),
             (a.backend.text_encoder.text_encoder, b.backend.text_encoder.text_encoder),
             (a.backend.vae_decoder.vae, b.backend.vae_decoder.vae),
             *((x.net, y.net) for x, y in zip(a.backend.controlnet_bodies, b.backend.controlnet_bodies, strict=True))]
    for x, y in pairs:
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        assert all(torch.equal(sx[k], sy[k]) and sx[k].dtype == sy[k].dtype for k in sx), type(x).__name__


def test_controlnet_from_single_safetensors_file(tiny_dir, tmp_path, photo):
    folder = tmp_path / "cn"
    shutil.copytree(tiny_dir["canny"], folder)
    single = folder / "diffusion_pytorch_model.safetensors"
    from_file = Runner(model=str(tiny_dir["model"]), controlnet=str(single), device="cpu")
    from_folder = Runner(model=str(tiny_dir["model"]), controlnet=str(tiny_dir["canny"]), device="cpu")
    kwargs = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="np", preprocess="canny")
    assert_same_weights(from_file, from_folder)
    np.testing.assert_allclose(from_file.generate("x", photo, **kwargs).images,
                               from_folder.generate("x", photo, **kwargs).images, rtol=0, atol=1e-5)


def test_model_folder_missing_a_component(tiny_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_dir["model"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="missing the component folder\\(s\\) vae"):
        Runner(model=str(broken), controlnet=str(tiny_dir["canny"]), device="cpu")


def test_controlnet_folder_without_config(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Runner(model=str(tiny_dir["model"]), controlnet=str(tmp_path), device="cpu")


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown ControlNet name 'cany'"):
        Runner(model="tiny", controlnet="cany", device="cpu")
    with pytest.raises(ValueError, match="unknown backend 'trt'"):
        Runner(model="tiny", controlnet="canny", backend="trt", device="cpu")
    with pytest.raises(FileNotFoundError, match="is not a folder, a .safetensors file or a Hugging Face id"):
        Runner(model="./nowhere", controlnet="canny", device="cpu")


def test_registry_names_and_aliases():
    assert registry.resolve("canny").source == "lllyasviel/control_v11p_sd15_canny"
    assert registry.resolve("lllyasviel/sd-controlnet-canny") == registry.ControlNetSpec(
        "canny", "lllyasviel/sd-controlnet-canny", "canny", "sd15"
    )
    assert registry.resolve("lllyasviel/control_v11f1p_sd15_depth").preprocessor == "depth"
    unregistered = registry.resolve("someone/my-controlnet")
    assert unregistered.preprocessor is None and unregistered.source == "someone/my-controlnet"


def test_canny_equals_opencv(photo):
    rgb = np.asarray(photo)
    expected = np.stack([cv2.Canny(rgb, 100, 200)] * 3, axis=2)
    got = np.asarray(preprocess.canny(photo))
    assert got.dtype == np.uint8 and got.shape == rgb.shape
    assert np.array_equal(got, expected)
    assert expected.max() == 255  # the photo has edges: the comparison is not vacuous
    other = np.asarray(preprocess.canny_with(50, 150)(photo))
    assert np.array_equal(other, np.stack([cv2.Canny(rgb, 50, 150)] * 3, axis=2))


def test_canny_through_the_runner(photo):
    runner = Runner(model="tiny", controlnet="canny", device="cpu")
    result = runner.generate("a photo", photo, num_inference_steps=1, height=64, width=64, seed=0)
    expected = np.stack([cv2.Canny(np.asarray(photo), 100, 200)] * 3, axis=2)
    assert np.array_equal(np.asarray(result.control_maps[0]), expected)

"""`python -m engine.generate --lora FILE[:WEIGHT] --lora-dir DIR` with `<lora:NAME:WEIGHT>` tags: PNGs record
"Lora hashes" as A1111 writes them, and --from-png reapplies the LoRAs (same pixels) or refuses a changed one."""
from __future__ import annotations

import shutil

import numpy as np
import PIL.Image

from engine import generate, pngmeta
from tests.test_build import one_torch_thread  # noqa: F401 (an autouse fixture)


def test_lora_flags_tags_png_and_from_png(tiny_dir, lora_files, tmp_path, capsys):
    from engine.lora import lora_short_hash

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(lora_files["second"], folder / "ink.safetensors")
    base = ["--model", str(tiny_dir["model"]), "--controlnet", str(tiny_dir["canny"]), "--image",
            "engine/assets/astronaut.png", "--height", "64", "--width", "64", "--steps", "2", "--seed", "1", "--quiet"]
    first = tmp_path / "first.png"
    assert generate.main([*base, "--prompt", "a cat <lora:ink:0.7>", "--lora-dir", str(folder),
                          "--lora", f"{lora_files['unet_text']}:-0.5", "--out", str(first)]) == 0
    p = pngmeta.read_parameters(first)
    assert p["prompt"] == "a cat <lora:ink:0.7>"  # kept as A1111 keeps it
    assert p["lora_hashes"] == {"unet_text": lora_short_hash(lora_files["unet_text"]),
                                "ink": lora_short_hash(folder / "ink.safetensors")}
    assert p["lora_files"] == [(str(lora_files["unet_text"]), -0.5)]
    plain = tmp_path / "plain.png"
    assert generate.main([*base, "--prompt", "a cat", "--out", str(plain)]) == 0
    again = tmp_path / "again.png"
    assert generate.main(["--from-png", str(first), "--lora-dir", str(folder), "--out", str(again), "--quiet"]) == 0
    pixels = [np.asarray(PIL.Image.open(path)) for path in (first, again, plain)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    shutil.copy(lora_files["unet_only"], folder / "ink.safetensors")  # another file under the same name
    capsys.readouterr()
    assert generate.main(["--from-png", str(first), "--lora-dir", str(folder), "--out", str(again), "--quiet"]) == 1
    assert "hash" in capsys.readouterr().err


def test_from_png_downloads_no_lora_unless_asked(tmp_path, monkeypatch, capsys):
    """A PNG's "Lora files" naming a Hugging Face id: --from-png reads it from the local hub cache only, and says
    how to allow the download; with --allow-lora-download the loader may fetch it."""
    from engine import lora

    p = dict(prompt="a cat", negative_prompt="", num_inference_steps=2, scheduler="unipc", guidance_scale=7.5, seed=1,
             width=64, height=64, model="tiny", eta=0.0, num_images_per_prompt=1, controlnet=["canny"],
             controlnet_conditioning_scale=[1.0], control_guidance_start=[0.0], control_guidance_end=[1.0],
             image=["engine/assets/astronaut.png"], preprocess=["canny"], canny_low=100, canny_high=200,
             guess_mode=False, lora_files=[("someone/ink-lora", 0.7)])
    png = tmp_path / "from_elsewhere.png"
    PIL.Image.new("RGB", (8, 8)).save(png, pnginfo=pngmeta.png_info(pngmeta.format_parameters(p)))
    asked, looked_up, real = [], [], lora.cached_snapshot

    def spy(source, family="sd15", unet_config=None, allow_download=True):
        asked.append((str(source), allow_download))
        raise OSError("this test's stand-in for a download")

    def cache_spy(source):
        looked_up.append(source)
        return real(source)

    monkeypatch.setattr(lora, "load_lora", spy)
    monkeypatch.setattr(lora, "cached_snapshot", cache_spy)
    out = ["--out", str(tmp_path / "x.png"), "--quiet"]
    assert generate.main(["--from-png", str(png), *out]) == 1
    err = capsys.readouterr().err
    assert "--allow-lora-download" in err and looked_up == ["someone/ink-lora"] and asked == [], err
    assert generate.main(["--from-png", str(png), "--allow-lora-download", *out]) == 1
    assert "stand-in for a download" in capsys.readouterr().err and asked[-1] == ("someone/ink-lora", True)

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

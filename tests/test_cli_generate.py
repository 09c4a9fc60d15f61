"""`python -m engine.generate` as users run it: a subprocess on the tiny model, 64x64, two steps."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from engine import cli_flags, generate, pngmeta

ROOT = Path(__file__).resolve().parents[1]
PHOTO = str(ROOT / "engine" / "assets" / "astronaut.png")
FAST = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---- the flags mirror Runner, with Runner's defaults ------------------------------------------------

def test_defaults_are_runners_own():
    from engine.request import GenerateArgs
    from engine.runner import Runner

    for where, signature, read in (
        ("Runner.__init__", inspect.signature(Runner.__init__), cli_flags.signature_defaults("engine.runner", "Runner", "__init__")),
        ("GenerateArgs", inspect.signature(GenerateArgs), cli_flags.signature_defaults("engine.request", "GenerateArgs")),
    ):
        real = {name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
        assert read == {name: real[name] for name in read}, where
    parser = cli_flags.build_parser()
    dests = {action.dest for action in parser._actions}
    missing = set(inspect.signature(GenerateArgs).parameters) - cli_flags.NOT_FLAGS - dests
    assert not missing, f"Runner.generate arguments without a flag: {missing}"


def test_every_scheduler_has_a_sampler_name():
    from engine.schedulers import SCHEDULERS

    assert set(pngmeta.SAMPLERS) == set(SCHEDULERS)


def test_parameters_text_round_trips():
    p = dict(
        prompt='a "quoted", colon: prompt\nover two lines, ünïcode', negative_prompt="blurry, low: quality",
        num_inference_steps=7, scheduler="dpmpp_2m_karras", guidance_scale=0.1 + 0.2, seed=2**63 + 5,
        width=512, height=768, model="/models/my, model", eta=0.25, num_images_per_prompt=3,
        controlnet=["canny", "owner/net"], controlnet_conditioning_scale=[1.0, 0.35],
        control_guidance_start=[0.0, 0.1], control_guidance_end=[1.0, 0.9],
        image=["/pics/a, b.png", "c.png"], preprocess=["canny", None], canny_low=50, canny_high=150,
        guess_mode=True, dtype="bf16", optimizations="cpu",
    )
    text = pngmeta.format_parameters(p, batch_pos=2)
    assert text.splitlines()[-1].startswith("Steps: 7, Sampler: DPM++ 2M Karras, CFG scale: 0.30000000000000004")
    assert pngmeta.parse_parameters(text) == {**p, "batch_pos": 2}
    # The extension's control modes round-trip too, apart from guess mode (a different set of scales).
    moded = {**p, "guess_mode": False, "control_mode": ["prompt", "balanced"]}
    text = pngmeta.format_parameters(moded)
    assert "Control Mode: My prompt is more important" in text and "Guess Mode" not in text
    assert pngmeta.parse_parameters(text) == moded
    with pytest.raises(ValueError, match="unknown Control Mode 'Loud'"):
        pngmeta.parse_parameters(text.replace("My prompt is more important", "Loud"))


def test_parameters_written_by_a1111_parse():
    text = ("a cat\nNegative prompt: lowres\nSteps: 25, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, "
            'Model hash: abc, Model: v1-5, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], '
            'Weight: 1, Resize Mode: Crop and Resize, Threshold A: 100, Threshold B: 200, Guidance Start: 0, '
            'Guidance End: 1, Control Mode: Balanced", Version: v1.6.0')
    p = pngmeta.parse_parameters(text)
    assert (p["scheduler"], p["width"], p["height"], p["image"]) == ("euler_a", 512, 768, [None])
    assert p["extra"] == {"Model hash": "abc", "Version": "v1.6.0"}
    with pytest.raises(ValueError, match="unknown sampler 'Heun'; this engine has: UniPC"):
        pngmeta.parse_parameters(text.replace("Euler a", "Heun"))


# ---- a real run -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two images, no --seed (the Runner picks one and the PNG must record it), control map saved."""
    out = tmp_path_factory.mktemp("gen") / "astro.png"
    proc = cli(*FAST, "--prompt", "an astronaut, riding: a horse", "--negative-prompt", "blurry", "--image", PHOTO,
               "--num-images", "2", "--scale", "0.8", "--canny-low", "50", "--save-control", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_writes_images_grid_control_map_and_timings(run):
    out, proc = run
    for name in ("astro_0.png", "astro_1.png", "astro_grid.png", "astro_control.png"):
        assert (out.parent / name).is_file(), name
    assert pixels(out.parent / "astro_0.png").shape == (64, 64, 3)
    assert pixels(out.parent / "astro_grid.png").shape == (64, 128, 3)
    assert "UNet x 2" in proc.stdout and "it/s" in proc.stdout


def test_metadata_parses_back_into_the_parameters(run):
    out, _ = run
    p = pngmeta.read_parameters(out.parent / "astro_1.png")
    seed = p.pop("seed")
    assert isinstance(seed, int) and seed >= 0
    assert p == dict(
        prompt="an astronaut, riding: a horse", negative_prompt="blurry", num_inference_steps=2,
        scheduler="unipc", guidance_scale=7.5, width=64, height=64, model="tiny", eta=0.0,
        num_images_per_prompt=2, batch_pos=1, controlnet=["canny"], controlnet_conditioning_scale=[0.8],
        control_guidance_start=[0.0], control_guidance_end=[1.0], image=[PHOTO], preprocess=["canny"],
        canny_low=50, canny_high=200, guess_mode=False, dtype="fp32",
    )


def test_rerun_from_the_png_alone_gives_the_same_pixels(run, tmp_path):
    out, _ = run
    proc = cli("--from-png", str(out.parent / "astro_1.png"), "--out", str(tmp_path / "again.png"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    for j in (0, 1):
        np.testing.assert_array_equal(pixels(tmp_path / f"again_{j}.png"), pixels(out.parent / f"astro_{j}.png"))


def test_precision_and_preset_are_recorded_and_rerun(tmp_path):
    """A bf16 image (preset "cpu") differs from the fp32 one: its PNG must bring both back on a rerun."""
    first = tmp_path / "bf16.png"
    proc = cli(*FAST, "--prompt", "an astronaut", "--image", PHOTO, "--seed", "3", "--dtype", "bf16",
               "--optimizations", "cpu", "--out", str(first), "--quiet")
    assert proc.returncode == 0, proc.stderr
    p = pngmeta.read_parameters(first)
    assert (p["dtype"], p["optimizations"]) == ("bf16", "cpu")
    again = tmp_path / "again.png"
    proc = cli("--from-png", str(first), "--out", str(again), "--quiet")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(pixels(again), pixels(first))


# ---- failures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (["--height", "65"], "argument --height: must be a positive multiple of 8"),
    (["--scheduler", "heun"], "argument --scheduler: invalid choice: 'heun'"),
    (["--optimizations", "turbo"], "argument --optimizations: invalid choice: 'turbo'"),
    (["--controlnet", "cany"], "unknown ControlNet name 'cany'"),
    (["--controlnet", "canny", "--controlnet", "depth", "--scale", "1", "--scale", "1", "--scale", "1"],
     "--scale given 3 times for 2 ControlNet(s)"),
    (["--control-start", "0.6", "--control-end", "0.4"], "--control-start (0.6) must be below --control-end (0.4)"),
    (["--out", "out.jpg"], "argument --out: must be a .png path"),
    (["--prompt", " "], "--prompt is required"),
    (["--preprocess", "sobel"], "argument --preprocess: invalid choice: 'sobel'"),
    (["--annotator", "canny=/m"], "'canny' is not a model-backed preprocessor"),
])
def test_bad_arguments_exit_2_with_the_reason(args, message):
    proc = cli(*FAST, "--prompt", "x", "--image", PHOTO, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_engine_dir_exits_1_with_one_line(tmp_path):
    proc = cli("--engine-dir", str(tmp_path / "nope"), "--prompt", "x", "--image", PHOTO)
    assert proc.returncode == 1
    expected = f"error: engine dir {str(tmp_path / 'nope')!r} does not exist or is not a folder"
    assert proc.stderr.strip().splitlines() == [expected]
    verbose = cli("--engine-dir", str(tmp_path / "nope"), "--prompt", "x", "--image", PHOTO, "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_missing_image_exits_1_with_one_line(tmp_path):
    proc = cli(*FAST, "--prompt", "x", "--image", str(tmp_path / "none.png"))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "none.png" in proc.stderr


def test_model_backed_preprocessor_with_its_weights(tmp_path):
    from tests.annotator_models import TinyAnnotators

    dpt = TinyAnnotators(tmp_path / "annotators")["depth"]
    out = tmp_path / "depth.png"
    proc = cli(*FAST, "--controlnet", "depth", "--prompt", "x", "--image", PHOTO, "--annotator", f"depth_midas={dpt}",
               "--save-control", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "preprocess" in proc.stdout and f"annotator depth: {dpt} loaded in" in proc.stdout
    from engine.pngmeta import read_parameters

    assert read_parameters(str(out))["preprocess"] == ["depth"]  # the type's default, from the table


def test_prompt_file_bad_line_keeps_the_others(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('# comment\na red astronaut\n\n--prompt "blue" --steps zero\n--prompt "green" --seed 7\n')
    proc = cli(*FAST, "--image", PHOTO, "--seed", "3", "--prompt-file", str(prompts), "--out", str(tmp_path / "b.png"))
    assert proc.returncode == 1
    assert f"{prompts}:4: argument --steps: must be an integer >= 1, got 'zero'" in proc.stderr
    assert "1 of 3 prompt lines failed (lines 4)" in proc.stderr
    assert sorted(p.name for p in tmp_path.glob("b_*.png")) == ["b_0.png", "b_2.png"]
    assert pngmeta.read_parameters(tmp_path / "b_0.png")["seed"] == 3
    green = pngmeta.read_parameters(tmp_path / "b_2.png")
    assert (green["prompt"], green["seed"], green["num_inference_steps"]) == ("green", 7, 2)

"""`python -m engine.generate`: SD1.5 + ControlNet from the shell, with progress, timings and PNGs that
carry their own parameters.

    python -m engine.generate --model tiny --prompt "an astronaut" --image engine/assets/astronaut.png \\
        --steps 4 --height 64 --width 64 --seed 1 --out out.png
    python -m engine.generate --from-png out.png --out again.png        # same pixels
    python -m engine.generate --model tiny --image photo.png --prompt-file prompts.txt --out batch/x.png
    python -m engine.generate --model tiny --prompt "a painting" --image photo.png --init-image photo.png \
        --strength 0.6 --out painted.png                                   # img2img
    python -m engine.generate --model tiny --controlnet inpaint --prompt "a helmet" --init-image photo.png \
        --mask mask.png --out repainted.png                                # inpaint (the map from image + mask)
    python -m engine.generate --lora latent-consistency/lcm-lora-sdv1-5 --scheduler lcm --steps 4 \
        --guidance 1 --vae madebyollin/taesd --backend openvino --prompt "an astronaut" --image photo.png \
        --out fast.png                                                     # few-step: LCM-LoRA + TAESD on a CPU

Flags mirror `Runner(...)` and `Runner.generate(...)` one to one (engine/cli_flags.py); their defaults
are read from `Runner.__init__` and `GenerateArgs`, so the numbers live in engine/runner.py and
engine/request.py only. Exit status: 0 done; 2 bad
arguments (checked before any model loads); 1 a runtime failure (missing engine dir or image, load error,
a failed prompt line), reported as one `error: ...` line, with the traceback only under --verbose.

`--prompt-file`: one prompt per line (blank lines and `#` comments skipped). A line starting with `--`
is instead flags for that line only (`--prompt "a cat" --seed 5 --steps 30`), on top of the command
line's. The i-th prompt (from 0) writes STEM_i.png; a failing line is reported, the others still run.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

from engine import pngmeta
from engine.families import SDXL_ARGS
from engine.cli_flags import apply_png, build_parser, check_job, line_args, read_prompt_file

STAGE_LABELS = {"preprocess": "preprocess", "text_encoder": "text encoder", "hint_encoder": "hint encoder", "vae_encoder": "VAE encoder",
                "controlnet": "ControlNet",
                "scheduler": "scheduler", "vae": "VAE", "total": "total"}
LOOP_STAGES = ("controlnet", "unet", "scheduler")  # the stages that run once per denoising step


class _Progress:
    """`callback(step, total)` for Runner.generate, drawing a tqdm bar (made on the first step, when
    the total is known)."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __call__(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _preprocessors(args, specs) -> tuple[list, list]:
    """Per ControlNet: what to pass as `preprocess=` and the module name recorded in the PNG."""
    from engine.preprocess import canny_with, find_module

    given, names = [], []
    for choice, spec in zip(args.preprocess, specs):
        module = spec.preprocessor if choice == "auto" else (None if choice == "none" else choice)
        names.append(module)
        is_canny = module is not None and find_module(module).key == "canny"
        given.append(False if module is None else canny_with(args.canny_low, args.canny_high) if is_canny else module)
    return given, names


def _outputs(out: Path, index: int | None, count: int) -> tuple[list[Path], Path]:
    """Image paths and the stem for extras (grid, control maps) of one prompt."""
    stem = out.with_suffix("") if index is None else out.with_name(f"{out.stem}_{index}")
    if index is None and count == 1:
        return [out], stem
    if count == 1:
        return [stem.with_suffix(".png")], stem
    return [stem.with_name(f"{stem.name}_{j}.png") for j in range(count)], stem


def _grid(images: list):
    import PIL.Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (cols * w, rows * h))
    for j, im in enumerate(images):
        grid.paste(im, ((j % cols) * w, (j // cols) * h))
    return grid


def _as_pil(picture):
    import numpy as np
    import PIL.Image

    if isinstance(picture, PIL.Image.Image):
        return picture
    return PIL.Image.fromarray((np.clip(picture, 0.0, 1.0) * 255).round().astype(np.uint8))


def _as_list(value, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def _run_job(runner, args, label: str, index: int | None, enabled_bar: bool) -> tuple[dict, list[Path]]:
    from engine.parts import DTYPES
    from engine.preprocess import find_module

    for path in args.image:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"control image {path!r} does not exist")
    for path, what in ((args.init_image, "init image"), (args.mask_image, "mask")):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path!r} does not exist")
    preprocess, modules = _preprocessors(args, runner.controlnet_specs)
    prompt, loras = _apply_loras(runner, args)
    progress = _Progress(enabled_bar, label)
    given_scales = [s for s in args.controlnet_conditioning_scale if s is not None]
    scales = list(args.controlnet_conditioning_scale) if given_scales else None  # None: the mode's default
    given_modes = [m for m in args.control_mode or [] if m is not None]
    control_mode = [m or "balanced" for m in args.control_mode] if given_modes else None
    inpaint, job = _a1111_inpainting(args)
    init_image, mask_image, height, width = args.init_image, args.mask_image, args.height, args.width
    if job is not None:
        init_image, mask_image, height, width = job.init, job.mask, job.init.height, job.init.width
    control_type = list(args.control_type) if any(t is not None for t in args.control_type) else None
    sdxl = {name: getattr(args, name) for name in SDXL_ARGS if getattr(args, name) is not None}
    try:
        result = runner.generate(
            prompt, image=list(args.image), negative_prompt=args.negative_prompt or None,
            height=height, width=width, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, controlnet_conditioning_scale=scales,
            guess_mode=args.guess_mode, control_guidance_start=args.control_guidance_start,
            control_guidance_end=args.control_guidance_end, scheduler=args.scheduler, seed=args.seed,
            num_images_per_prompt=args.num_images_per_prompt, preprocess=preprocess, eta=args.eta,
            callback=progress, init_image=init_image, mask_image=mask_image, strength=args.strength,
            control_mode=control_mode, control_type=control_type, **sdxl,
        )
    finally:
        progress.close()
    used = result.parameters
    count = len(args.controlnet)
    record = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt or "",
        num_inference_steps=used["num_inference_steps"], guidance_scale=used["guidance_scale"],
        scheduler=used["scheduler"], seed=result.seed, width=used["width"], height=used["height"],
        eta=float(args.eta), num_images_per_prompt=used["num_images_per_prompt"],
        guess_mode=used["guess_mode"] if control_mode is None else False,  # the mode implies its own
        model=used["model"], controlnet=list(args.controlnet),  # as given: an id re-resolves to the same weights
        controlnet_conditioning_scale=[float(s) for s in _as_list(used["controlnet_conditioning_scale"], count)],
        control_guidance_start=[float(s) for s in args.control_guidance_start],
        control_guidance_end=[float(s) for s in args.control_guidance_end],
        image=[None if p is None else str(p) for p in args.image], preprocess=modules,
        dtype=next(name for name, dtype in DTYPES.items() if dtype == runner.dtype),
    )
    if control_mode is not None:
        record["control_mode"] = control_mode
    if control_type is not None:
        record["control_type"] = control_type
    if sdxl:
        record["sdxl"] = {name: list(v) if isinstance(v, tuple) else v for name, v in sdxl.items()}
    if args.optimizations is not None:
        record["optimizations"] = args.optimizations
    if used["vae"] != "model":  # the source as given, so --from-png loads the same VAE
        record["vae"] = args.vae
    if args.init_image is not None:  # the strength used (the mode's default when not given), and the files
        record.update(strength=used["strength"], init_image=str(args.init_image))
        if args.mask_image is not None:
            record["mask_image"] = str(args.mask_image)
        if inpaint is not None:  # A1111's entries, Mask blur also at 0: it says A1111's inpainting was used
            record.update(inpaint.parameters(always_blur=True))
    if loras:  # the prompt keeps its <lora:...> tags, as A1111 records it
        record["lora_hashes"] = {lora["name"]: lora["hash"] for lora in used["loras"] if lora["hash"]}
        record["lora_files"] = [(str(path), weight) for path, weight in args.lora or []]
    if any(m is not None and find_module(m).key == "canny" for m in modules):
        record.update(canny_low=args.canny_low, canny_high=args.canny_high)

    images = [job.finish(im) for im in result.images] if job is not None else result.images  # the original pasted back
    paths, stem = _outputs(Path(args.out), index, len(images))
    stem.parent.mkdir(parents=True, exist_ok=True)
    batch = len(images) > 1
    for j, (image, path) in enumerate(zip(images, paths)):
        text = pngmeta.format_parameters(record, batch_pos=j if batch else None)
        image.save(path, pnginfo=pngmeta.png_info(text))
        if args.verbose:
            print(f"{path}:\n{text}\n")
    if batch:
        paths.append(stem.with_name(stem.name + "_grid.png"))
        _grid(images).save(paths[-1], pnginfo=pngmeta.png_info(pngmeta.format_parameters(record)))
    if args.save_control:
        maps = result.control_maps
        for k, picture in enumerate(maps):
            paths.append(stem.with_name(stem.name + ("_control.png" if len(maps) == 1 else f"_control_{k}.png")))
            _as_pil(picture).save(paths[-1])
    run = {"timings": result.timings, "steps": record["num_inference_steps"], "images": len(images),
           "seed": result.seed}
    return run, paths


def _a1111_inpainting(args):
    """(settings, job) for inpainting as A1111 does it (--mask-blur given), else (None, None)."""
    from engine.cli_flags import a1111_mask_blur

    blur = a1111_mask_blur(args)
    if args.mask_image is None or blur is None:
        return None, None
    import PIL.Image

    from engine.a1111_inpaint import A1111Inpaint

    with PIL.Image.open(args.init_image) as opened:
        init = opened.copy()
    with PIL.Image.open(args.mask_image) as opened:
        mask = opened.copy()  # as it is: an RGBA mask is read by its alpha
    inpaint = A1111Inpaint(blur_x=blur, blur_y=blur, invert=args.mask_invert,
                           masked_content=args.masked_content, only_masked=args.inpaint_area == "masked",
                           padding=args.inpaint_padding)
    width, height = args.width or init.width // 8 * 8, args.height or init.height // 8 * 8
    return inpaint, inpaint.prepare(init, mask, width, height)


def _check_png_loras(args) -> None:
    """LoRAs a PNG's metadata names (--from-png) are read from files or the local hub cache only: a PNG from
    elsewhere must not make this machine download whatever it names, unless --allow-lora-download."""
    from engine.lora import cached_snapshot

    from_png = set(getattr(args, "lora_from_png", None) or [])
    if getattr(args, "allow_lora_download", False):
        return
    for source, _ in args.lora or []:
        if source in from_png and not Path(source).expanduser().exists():
            try:
                cached_snapshot(source)  # no conversion yet: the model (and so the LoRA loader) is not loaded
            except OSError as err:
                raise OSError(f"the PNG names the LoRA {source!r}, which is neither a file here nor in the local "
                              "Hugging Face cache; it is not downloaded unless you pass --allow-lora-download (or "
                              f"give --lora FILE): {err}") from None


def _apply_loras(runner, args) -> tuple[str, list]:
    """The job's LoRA set (--lora flags, then the prompt's <lora:NAME:WEIGHT> tags) merged into the Runner
    when it differs from the one there; returns the prompt without its tags and the set. A PNG's recorded
    "Lora hashes" (--from-png) must match the files found now."""
    from engine.lora import parse_prompt_loras

    prompt, tagged = parse_prompt_loras(args.prompt, args.lora_dir)
    wanted = [(str(path), float(weight)) for path, weight in [*(args.lora or []), *tagged]]
    runner.set_loras(wanted)  # a no-op when it is the set merged already (and its files are unchanged)
    expected = getattr(args, "expected_lora_hashes", None) or {}
    found = {lora["name"]: lora["hash"] for lora in runner.loras.describe()} if runner.loras is not None else {}
    for name, digest in expected.items():
        if found.get(name) != digest:
            raise ValueError(f"the PNG was made with LoRA {name!r} of hash {digest}; here it is "
                             f"{'missing' if name not in found else 'hash ' + str(found[name])}: give that LoRA with "
                             "--lora FILE or --lora-dir DIR")
    return prompt, wanted


def timing_table(runs: list[dict], load_ms: float | None = None, annotator_loads: list | None = None) -> str:
    """Per-stage milliseconds summed over `runs` (each: timings, steps, images), with per-step times for
    the stages inside the denoising loop, and the loop's it/s; then each annotator model loaded (its load
    time is inside the first preprocess) with its size."""
    steps = sum(r["steps"] for r in runs)
    images = sum(r["images"] for r in runs)
    totals: dict[str, float] = {}
    for r in runs:
        for stage, ms in r["timings"].items():
            totals[stage] = totals.get(stage, 0.0) + ms
    lines = [f"{'stage':<16}{'ms':>10}{'ms/step':>10}"]
    if load_ms is not None:
        lines.append(f"{'model load':<16}{load_ms:>10.1f}")
    for stage, ms in totals.items():
        label = f"UNet x {steps}" if stage == "unet" else STAGE_LABELS.get(stage, stage)
        per_step = f"{ms / steps:>10.2f}" if stage in LOOP_STAGES and steps else ""
        lines.append(f"{label:<16}{ms:>10.1f}{per_step}")
    loop_s = sum(totals.get(s, 0.0) for s in LOOP_STAGES) / 1e3
    rate = f"{steps / loop_s:.2f} it/s" if loop_s > 0 else "n/a it/s"
    per_image = totals.get("total", 0.0) / 1e3 / images if images else 0.0
    lines.append(f"{steps} steps, {images} image(s): {rate} in the denoising loop, {per_image:.2f} s/image")
    for load in annotator_loads or []:
        lines.append(f"annotator {load['module']}: {load['source']} loaded in {load['ms']:.0f} ms, "
                     f"{load['mb']:.1f} MB on {load['device']}")
    return "\n".join(lines)


def _raise_value_error(message: str):
    raise ValueError(message)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> int:
    if args.from_png:
        args = apply_png(parser, argv, args.from_png)
    check_job(args, len(args.controlnet) if args.controlnet else None, parser.error, whole=not args.prompt_file)
    jobs = read_prompt_file(args.prompt_file) if args.prompt_file else [(None, None)]
    if args.engine_dir is not None and not Path(args.engine_dir).is_dir():
        raise FileNotFoundError(f"engine dir {args.engine_dir!r} does not exist or is not a folder")
    for path in args.image or []:  # a missing image fails now, not after seconds of model loading
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"control image {path!r} does not exist")
    for path, _ in args.lora or []:
        if (path.endswith(".safetensors") or path.startswith((".", "/"))) and not Path(path).is_file():
            raise FileNotFoundError(f"LoRA file {path!r} does not exist")
    _check_png_loras(args)
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise FileNotFoundError(f"LoRA folder {args.lora_dir!r} does not exist or is not a folder")

    from engine.runner import Runner

    load_start = time.perf_counter()
    runner = Runner(model=args.model, controlnet=args.controlnet, backend=args.backend,
                    engine_dir=args.engine_dir, device=args.device, dtype=args.dtype,
                    optimizations=args.optimizations, vae=args.vae,
                    annotators=dict(args.annotator or []))
    load_ms = (time.perf_counter() - load_start) * 1e3
    count = runner.num_controlnets
    check_job(args, count, _raise_value_error, whole=not args.prompt_file)  # now the count is known
    args.controlnet = args.controlnet or [spec.name for spec in runner.controlnet_specs]
    bar = not args.quiet and sys.stderr.isatty()

    runs, failures = [], []
    for index, (number, line) in enumerate(jobs):
        label = f"line {number}" if number is not None else "denoising"
        try:
            job = line_args(args, line, count) if number is not None else args
            run, paths = _run_job(runner, job, label, index if number is not None else None, bar)
        except Exception as err:  # one bad line must not lose the others
            if number is None:
                raise
            if args.verbose:
                traceback.print_exc()
            failures.append(number)
            print(f"error: {args.prompt_file}:{number}: {_one_line(err)}", file=sys.stderr)
            continue
        runs.append(run)
        if not args.quiet:
            for path in paths:
                print(f"wrote {path}" + (f"  ({label})" if number is not None else ""))
            print(f"seed {run['seed']}")
    if runs and not args.quiet:
        from engine.preprocess.loading import loads

        print(timing_table(runs, load_ms, loads()))
    if failures:
        print(f"error: {len(failures)} of {len(jobs)} prompt lines failed (lines {', '.join(map(str, failures))}); "
              "the others were written", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args, argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # runtime failures: one line, the traceback only when asked for
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

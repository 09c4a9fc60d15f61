"""The flags of `python -m engine.generate`, and their checks: the command line, a PNG's parameters as its
defaults (`--from-png`) and the lines of a `--prompt-file`. The flags mirror `Runner(...)` and
`Runner.generate(...)` one to one; their defaults are read from `Runner.__init__` and `GenerateArgs`
(`signature_defaults`), so the numbers live in engine/runner.py and engine/request.py only. Everything here runs before any model loads, so a bad flag
exits 2 at once. Running the jobs is engine/generate.py's.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import shlex
from pathlib import Path

from engine import pngmeta
from engine.a1111_inpaint import IMPLEMENTED_CONTENT as A1111_CONTENT
from engine.optimizations import PRESET_NAMES
from engine.preprocess.loading import annotator_flag

# Runner.generate arguments a shell cannot give: tensors, in-memory generators, hooks, non-image outputs.
NOT_FLAGS = {"self", "generator", "latents", "output_type", "callback", "latents_callback"}

# Runner.generate argument -> its flag, where the flag is not just the argument's name with dashes.
FLAG_NAMES = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "controlnet_conditioning_scale": "--scale",
    "control_guidance_start": "--control-start",
    "control_guidance_end": "--control-end",
    "control_mode": "--control-mode",
    "control_type": "--control-type",
    "num_images_per_prompt": "--num-images",
    "mask_image": "--mask",
}
PER_NET = ("image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "preprocess",
           "control_mode", "control_type")
# SDXL's second prompts and size micro-conditioning (engine.families.SDXL_ARGS), flags by their names
SDXL_SIZES = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
              "negative_crops_coords_top_left", "negative_target_size")


class LineError(Exception):
    """A bad flag on one --prompt-file line: reported for that line, the other lines still run."""


class _LineParser(argparse.ArgumentParser):
    def error(self, message):
        raise LineError(message)


def signature_defaults(module: str, cls: str, method: str | None = None) -> dict:
    """The literal defaults of `module.cls.method`, or of the dataclass `module.cls`'s fields when `method` is
    None, read from its source without importing it.

    Importing engine.runner pulls in torch and diffusers (seconds); --help and argument errors should
    not wait for that. Non-literal defaults (e.g. model=DEFAULT_MODEL) are left out: the CLI then passes
    nothing and the Runner applies its own. tests/test_cli_generate.py checks this equals
    inspect.signature, so the two cannot drift.
    """
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == cls]
    if method is None:
        pairs = [(node.target.id, node.value) for c in classes for node in c.body
                 if isinstance(node, ast.AnnAssign) and node.value is not None]
        if not classes:
            raise LookupError(f"{module} has no {cls}")
    else:
        fns = [node for c in classes for node in c.body if isinstance(node, ast.FunctionDef) and node.name == method]
        if not fns:
            raise LookupError(f"{module} has no {cls}.{method}")
        a = fns[0].args
        positional = a.posonlyargs + a.args
        pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
        pairs += list(zip(a.kwonlyargs, a.kw_defaults))
        pairs = [(arg.arg, node) for arg, node in pairs]
    defaults = {}
    for name, node in pairs:
        try:
            defaults[name] = ast.literal_eval(node) if node is not None else None
        except ValueError:
            continue
    return defaults


# ---- argument types: each names the bad value and what is allowed (argparse turns them into exit 2) ----

def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            allowed = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value
    return parse


def _float_in(low: float | None = None, high: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            bounds = [f">= {low}"] if low is not None else []
            bounds += [f"<= {high}"] if high is not None else []
            allowed = " ".join(["a finite number", " and ".join(bounds)]).strip()
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value
    return parse


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number with 0 < strength <= 1, got {text!r}")
    return value


def _pair(text: str) -> tuple[int, int]:
    """SDXL's sizes and crop: "H,W" (height, width), two integers >= 0."""
    try:
        first, second = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be H,W (two integers, height then width), got {text!r}") from None
    if first < 0 or second < 0:
        raise argparse.ArgumentTypeError(f"must be two integers >= 0, got {text!r}")
    return first, second


def _control_type(text: str):
    """A ControlNet-Union type name or diffusers' index; "none" for a plain ControlNet."""
    from engine.registry import union_type

    if text == "none":
        return None
    value = int(text) if text.isdigit() else text
    try:
        union_type(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _multiple_of_8(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (64, 512, 768...), got {text!r}")
    return value


def _controlnet_name(text: str) -> str:
    from engine.registry import resolve

    try:
        resolve(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _lora_flag(text: str) -> tuple[str, float]:
    """--lora FILE[:WEIGHT] -> (FILE, WEIGHT); the weight defaults to 1 and may be negative."""
    path, sep, weight = text.rpartition(":")
    try:
        value = float(weight) if sep else None
    except ValueError:  # a ":" that is part of the name (a hub id or path), not a weight
        value = None
    if value is None:
        path, value = text, 1.0
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the weight in {text!r} must be a finite number")
    if not path.strip():
        raise argparse.ArgumentTypeError(f"--lora needs a file: FILE[:WEIGHT], got {text!r}")
    return path, value


def _png_path(text: str) -> str:
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"must be a .png path (the parameters live in a PNG text chunk), got {text!r}")
    return text


class _PerNet(argparse.Action):
    """Repeatable per-ControlNet flag. The first use replaces the default (which may come from
    --from-png), so `--scale 0.5` means [0.5], never [png's value, 0.5] as argparse's "append" would."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given_per_net", set())
        items = [] if self.dest not in given else list(getattr(namespace, self.dest))
        given.add(self.dest)
        setattr(namespace, self.dest, items + [values])


# ---- the parsers ------------------------------------------------------------------------------------

def _add_job_flags(parser: argparse.ArgumentParser, gen: dict) -> None:
    """The Runner.generate flags: shared by the command line and each --prompt-file line."""
    from engine.preprocess import CANNY_HIGH, CANNY_LOW, names

    def d(name):  # help text suffix showing the Runner's default
        return f" (default: {gen[name]})"

    parser.add_argument("--prompt", metavar="TEXT", help="what to draw")
    parser.add_argument("--image", action=_PerNet, metavar="PATH",
                        help="control picture; once for all ControlNets or once per --controlnet")
    parser.add_argument("--init-image", metavar="PATH", help="img2img: start from this picture instead of noise")
    parser.add_argument("--mask", dest="mask_image", metavar="PATH",
                        help="inpaint (with --init-image): white repaints, black keeps; the init image's size")
    parser.add_argument("--mask-blur", type=_int_at_least(0), metavar="N",
                        help="inpaint as the A1111 web UI does (engine/a1111_inpaint.py): the mask blurred by a "
                             "Gaussian of sigma N (A1111's mask blur, its default 4), read by its alpha when it has "
                             "one, and the init image pasted back over the unmasked part after decoding; without "
                             "it the mask is diffusers' (binarised, nothing pasted back)")
    parser.add_argument("--mask-invert", action="store_true",
                        help="with --mask-blur: repaint what the mask leaves black (A1111's 'Inpaint not masked')")
    parser.add_argument("--masked-content", choices=A1111_CONTENT, default="original",
                        help="with --mask-blur: what the masked part starts from (A1111's masked content: fill "
                             "paints it with blurred colours of the rest; default: original)")
    parser.add_argument("--inpaint-area", choices=("whole", "masked"), default="whole",
                        help="with --mask-blur: masked = A1111's 'Only masked': the box around the mask, widened "
                             "by --inpaint-padding, is generated at --width x --height and pasted back (default: "
                             "whole picture)")
    parser.add_argument("--inpaint-padding", type=_int_at_least(0), default=0, metavar="PX",
                        help="with --inpaint-area masked: pixels around the mask's box (default: 0)")
    parser.add_argument("--strength", type=_strength, default=gen["strength"],
                        help="how much of the init image to repaint, 0 < S <= 1: only the last S of the steps "
                             "run (default: img2img 0.8, inpaint 1.0)")
    parser.add_argument("--negative-prompt", metavar="TEXT", help="what to avoid")
    parser.add_argument("--height", type=_multiple_of_8, default=gen["height"], help="pixels (default: the image's)")
    parser.add_argument("--width", type=_multiple_of_8, default=gen["width"], help="pixels (default: the image's)")
    parser.add_argument("--steps", dest="num_inference_steps", type=_int_at_least(1), metavar="N",
                        default=gen["num_inference_steps"], help="denoising steps" + d("num_inference_steps"))
    parser.add_argument("--guidance", dest="guidance_scale", type=_float_in(0.0), default=gen["guidance_scale"],
                        metavar="CFG", help="classifier-free guidance scale" + d("guidance_scale"))
    parser.add_argument("--scale", dest="controlnet_conditioning_scale", action=_PerNet, type=_float_in(),
                        metavar="S", help="ControlNet weight; once, or once per ControlNet (default: diffusers' "
                        "per mode: 1.0 text to image, 0.8 img2img, 0.5 inpaint)")
    parser.add_argument("--guess-mode", action=argparse.BooleanOptionalAction, default=gen["guess_mode"],
                        help="ControlNets see the conditional half only (A1111: 'ControlNet is more important')")
    parser.add_argument("--control-mode", action=_PerNet, choices=list(pngmeta.CONTROL_MODES),
                        help="the A1111 ControlNet extension's control mode (balanced; prompt: 'My prompt is more "
                             "important'; controlnet: 'ControlNet is more important'); once, or once per ControlNet")
    parser.add_argument("--control-type", action=_PerNet, type=_control_type, metavar="TYPE",
                        help="a ControlNet-Union's condition type (openpose, depth, hed, scribble, canny, lineart, "
                             "normal, segment, tile, repaint, or diffusers' index); none for plain ControlNets; once "
                             "per ControlNet (one condition per net here; several per net from Python or HTTP)")
    parser.add_argument("--prompt-2", metavar="TEXT", help="SDXL: the second text encoder's prompt (default: --prompt)")
    parser.add_argument("--negative-prompt-2", metavar="TEXT",
                        help="SDXL: the second text encoder's negative prompt (default: --negative-prompt)")
    for name in SDXL_SIZES:
        parser.add_argument("--" + name.replace("_", "-"), type=_pair, metavar="H,W",
                            help=f"SDXL size micro-conditioning: diffusers' {name} (default: the pipeline's)")
    parser.add_argument("--control-start", dest="control_guidance_start", action=_PerNet, type=_float_in(0.0, 1.0),
                        metavar="F", help="fraction of steps before a ControlNet starts; per ControlNet"
                        + d("control_guidance_start"))
    parser.add_argument("--control-end", dest="control_guidance_end", action=_PerNet, type=_float_in(0.0, 1.0),
                        metavar="F", help="fraction of steps after which it stops; per ControlNet"
                        + d("control_guidance_end"))
    parser.add_argument("--scheduler", choices=list(pngmeta.SAMPLERS), default=gen["scheduler"],
                        help="sampler" + d("scheduler"))
    parser.add_argument("--seed", type=_int_at_least(0, 2**64 - 1), default=gen["seed"],
                        help="noise seed (default: a random one, written into the PNG)")
    parser.add_argument("--num-images", dest="num_images_per_prompt", type=_int_at_least(1), metavar="N",
                        default=gen["num_images_per_prompt"], help="images per prompt" + d("num_images_per_prompt"))
    parser.add_argument("--eta", type=_float_in(0.0), default=gen["eta"], help="DDIM eta" + d("eta"))
    parser.add_argument("--preprocess", action=_PerNet, choices=["auto", *(n for n in names() if " " not in n)],
                        metavar="MODULE", help="auto: the ControlNet type's own (canny for canny, depth for depth, "
                        "...); none: --image is already a control map; or a preprocessor of the A1111 ControlNet "
                        "extension (README: which needs which extra or weights); once, or once per ControlNet")
    parser.add_argument("--canny-low", type=_int_at_least(0), default=CANNY_LOW,
                        help=f"canny preprocessor's low threshold (default: {CANNY_LOW})")
    parser.add_argument("--canny-high", type=_int_at_least(0), default=CANNY_HIGH,
                        help=f"canny preprocessor's high threshold (default: {CANNY_HIGH})")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser; its help is engine/generate.py's docstring (the user's page)."""
    from engine import generate
    from engine.backends import BACKENDS

    gen = signature_defaults("engine.request", "GenerateArgs")
    init = signature_defaults("engine.runner", "Runner", "__init__")
    parser = argparse.ArgumentParser(
        prog="python -m engine.generate", usage="%(prog)s --prompt TEXT --image PATH [options]",
        description=generate.__doc__.split("\n\n")[0], epilog="\n\n".join(generate.__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--engine-dir", help="a built engine folder (onnxruntime, openvino, tensorrt backends)")
    source.add_argument("--model", default=init.get("model"),
                        help="'tiny', a Hugging Face id, a diffusers folder or a .safetensors file "
                             "(default: the Runner's, SD1.5 from the Hub)")
    parser.add_argument("--controlnet", action=_PerNet, type=_controlnet_name, metavar="NAME",
                        help="registry name, Hugging Face id, folder or .safetensors; repeat for several "
                             "(default: the Runner's: canny, or the ControlNets --engine-dir was built for)")
    parser.add_argument("--backend", choices=BACKENDS, default=init["backend"], help=f"(default: {init['backend']})")
    parser.add_argument("--device", default=init["device"], help="e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=list(pngmeta.PRECISIONS), default=init["dtype"],
                        help="(default: fp16 on CUDA, fp32 on CPU; bf16 pays on CPUs with AVX512-BF16 or AMX)")
    parser.add_argument("--optimizations", choices=list(PRESET_NAMES), default=init["optimizations"],
                        help="torch backend preset (default: reference; 'cpu' with --dtype bf16 on a CPU)")
    parser.add_argument("--vae", default=init["vae"], metavar="ID|PATH",
                        help="a VAE to decode (and encode --init-image) with instead of the model's own: TAESD "
                             "(madebyollin/taesd or a folder; fast previews-quality decoding) or an AutoencoderKL; "
                             "with --engine-dir, one it was built with (python -m engine.build --vae)")
    parser.add_argument("--lora", action=_PerNet, type=_lora_flag, metavar="FILE[:WEIGHT]",
                        help="a LoRA (.safetensors: diffusers/peft or kohya/A1111 format, or a Hugging Face id) merged "
                             "into the UNet and text encoder at WEIGHT (default 1, may be negative); repeatable")
    parser.add_argument("--lora-dir", metavar="DIR",
                        help="folder of LoRAs named in the prompt as A1111 does: <lora:NAME:WEIGHT> (the tags are "
                             "removed from the text the model sees)")
    parser.add_argument("--annotator", action="append", type=annotator_flag, metavar="MODULE=ID_OR_DIR",
                        help="weights of a model-backed preprocessor: a Hugging Face id or a local folder "
                             "(e.g. depth_anything_v2=/models/da2; openpose takes VITPOSE,RTDETR); repeatable")
    _add_job_flags(parser, gen)
    parser.add_argument("--prompt-file", help="one prompt (or one line of flags) per line; one output each")
    parser.add_argument("--from-png", metavar="PNG", help="take every parameter from a PNG this CLI (or A1111) "
                                                          "wrote; flags given here override")
    parser.add_argument("--allow-lora-download", action="store_true",
                        help="with --from-png: LoRAs the PNG names by Hugging Face id may be downloaded (without "
                             "it they must be files here or in the local hub cache)")
    parser.add_argument("--out", type=_png_path, default="output.png",
                        help="PNG path; several images: STEM_0.png, STEM_1.png ... and STEM_grid.png")
    parser.add_argument("--save-control", action="store_true", help="also write the control map(s): STEM_control.png")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_true", help="no progress bar, timing table or file list")
    talk.add_argument("--verbose", action="store_true", help="tracebacks on errors, parameters of each image")
    return parser


def _line_parser(base: argparse.Namespace) -> _LineParser:
    """Parses one --prompt-file line of flags, starting from the command line's values."""
    parser = _LineParser(prog="prompt-file line", add_help=False)
    _add_job_flags(parser, signature_defaults("engine.request", "GenerateArgs"))
    parser.set_defaults(**{k: v for k, v in vars(base).items() if k != "_given_per_net"})
    return parser


def _per_net(values, count: int, flag: str, default, fail) -> list:
    if values is None:
        return [default] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        fail(f"{flag} given {len(values)} times for {count} ControlNet(s): give it once (for all) or "
             f"{count} times (one per --controlnet, in order)")
    return list(values)


def check_job(args: argparse.Namespace, count: int | None, fail, whole: bool = True) -> None:
    """Cross-flag checks argparse cannot do alone; normalises the per-ControlNet lists to `count`.

    `count=None`: the number of ControlNets is not known yet (no --controlnet: the Runner or the engine
    dir picks), so only checks that need no count run; call again once the Runner is built.
    `whole=False` for the command line under --prompt-file: prompt and image may come from the lines.
    """
    if whole and not (args.prompt or "").strip():
        fail("--prompt is required (a non-empty text), or --prompt-file")
    if args.canny_low > args.canny_high:
        fail(f"--canny-low ({args.canny_low}) must not exceed --canny-high ({args.canny_high})")
    if count is None:
        lengths = {len(getattr(args, name)) for name in PER_NET if getattr(args, name)} - {1}
        if len(lengths) > 1:
            fail("per-ControlNet flags (--image, --scale, --control-mode, --control-type, --control-start, --control-end, "
                 "--preprocess) are "
                 f"given {' and '.join(map(str, sorted(lengths)))} times: give each once or once per ControlNet")
        # Check the rest against the count the flags imply, on a copy: the real count may still differ.
        check_job(argparse.Namespace(**vars(args)), next(iter(lengths), 1), fail, whole)
        return
    gen = signature_defaults("engine.request", "GenerateArgs")
    flags = {"image": "--image", "preprocess": "--preprocess"}
    for name in PER_NET:
        default = {"image": None, "preprocess": "auto"}.get(name, gen.get(name))
        setattr(args, name, _per_net(getattr(args, name), count, flags.get(name) or FLAG_NAMES[name], default, fail))
    if args.mask_image and not args.init_image:
        fail("--mask needs --init-image: inpainting repaints the masked part of the init image")
    a1111 = [flag for flag, used in (("--mask-invert", args.mask_invert), ("--masked-content", args.masked_content != "original"),
                                     ("--inpaint-area", args.inpaint_area != "whole"), ("--inpaint-padding", args.inpaint_padding))
             if used]
    if (a1111 or args.mask_blur is not None) and not args.mask_image:
        fail(f"{(a1111 or ['--mask-blur'])[0]} is an inpainting setting: it needs --mask (and --init-image)")
    if a1111 and a1111_mask_blur(args) is None:
        fail(f"{a1111[0]} is a setting of A1111's inpainting: give --mask-blur N (0 for no blur) with it")
    if args.strength is not None and not args.init_image:
        fail(f"--strength {args.strength} needs --init-image (img2img or inpaint)")
    if whole and args.image[0] is None and not args.mask_image:  # inpaint ControlNets build theirs from the mask
        fail("--image is required: the control picture (e.g. engine/assets/astronaut.png)")
    for k, (start, end) in enumerate(zip(args.control_guidance_start, args.control_guidance_end)):
        if not start < end:
            fail(f"ControlNet {k}: --control-start ({start}) must be below --control-end ({end})")


def a1111_mask_blur(args: argparse.Namespace) -> int | None:
    """The mask blur of inpainting as A1111 does it: --mask-blur, else an A1111 PNG's (--from-png: its Mask blur,
    0 when it has none); None: diffusers' inpainting."""
    return args.mask_blur if args.mask_blur is not None else getattr(args, "png_mask_blur", None)


def apply_png(parser: argparse.ArgumentParser, argv: list[str] | None, png: str) -> argparse.Namespace:
    """Re-parse the command line with a PNG's parameters as defaults, so explicit flags still win."""
    p = pngmeta.read_parameters(png)
    defaults = {k: v for k, v in p.items() if k not in ("extra", "batch_pos")}
    defaults["preprocess"] = [m or "none" for m in p["preprocess"]]
    defaults["negative_prompt"] = p["negative_prompt"] or None
    defaults["lora"] = [tuple(item) for item in defaults.pop("lora_files", [])] or None
    defaults["expected_lora_hashes"] = defaults.pop("lora_hashes", {})  # checked once the LoRAs are loaded
    defaults["lora_from_png"] = [path for path, _ in defaults["lora"] or []]  # never downloaded unless asked
    if "strength" in p and p.get("init_image") is None:  # A1111's img2img (no Init image key): with --mask, its
        defaults["png_mask_blur"] = p.get("mask_blur", 0)  # inpainting; A1111 writes Mask blur only when not 0
    defaults["inpaint_area"] = "masked" if defaults.pop("inpaint_only_masked", False) else "whole"
    defaults.update(defaults.pop("sdxl", {}))  # SDXL's second prompts and sizes, by their flags' names
    for name in ("controlnet", *PER_NET):  # a PNG from A1111 may lack these: then the flags decide
        if not defaults.get(name) or (None in defaults[name] and name != "control_type"):
            defaults.pop(name, None)
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def read_prompt_file(path: str) -> list[tuple[int, str]]:
    """(line number, text) of each line that is a prompt or flags; blank lines and # comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise OSError(f"cannot read --prompt-file {path!r}: {err}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"--prompt-file {path!r} holds no prompts (blank lines and # comments are skipped)")
    return lines


def line_args(base: argparse.Namespace, line: str, count: int) -> argparse.Namespace:
    if not line.startswith("--"):
        args = argparse.Namespace(**vars(base))
        args.prompt = line
    else:
        try:
            args = _line_parser(base).parse_args(shlex.split(line))
        except ValueError as err:  # shlex: unbalanced quotes
            raise LineError(str(err)) from None
    args.controlnet, args.out, args.verbose = base.controlnet, base.out, base.verbose
    args.save_control = base.save_control

    def fail(message):
        raise LineError(message)

    check_job(args, count, fail)
    return args

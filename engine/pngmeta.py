"""The "parameters" PNG text chunk, in the format AUTOMATIC1111's web UI writes and most tools read.

    a photo of an astronaut                      <- prompt (may span lines)
    Negative prompt: blurry                      <- absent when there is none
    Steps: 20, Sampler: UniPC, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: ..., ControlNet 0: "..."

The last line is `Key: value` pairs; a value holding `,`, `:`, `"` or a newline is JSON-quoted. Each
ControlNet is one pair whose quoted value is itself a list of pairs, as the A1111 ControlNet extension
writes it (Module, Model, Weight, Guidance Start/End, Threshold A/B, Control Mode), plus `Guess Mode`
(diffusers' guess mode, not one of the extension's control modes) and `Image`: the
control picture's path, and `Precision` (fp32, fp16, bf16) and `Optimizations` (a preset name, when one
was chosen) and `VAE` (the source given to --vae, e.g. TAESD; absent: the model's own), so the file alone
says how to reproduce it. LoRAs: the prompt keeps its `<lora:NAME:WEIGHT>`
tags and `Lora hashes: "name: hash, ..."` is written as A1111 writes it (engine/lora.lora_short_hash);
LoRAs given as files (not tags) are listed with their weights under `Lora files` (JSON).

img2img and inpainting add A1111's `Denoising strength` and our `Init image` and `Mask` (the files' paths;
A1111 records neither, so its PNGs say only that a strength was used). Inpainting done as A1111 does it
(engine/a1111_inpaint.py: the A1111 routes, or the CLI's --mask-blur) adds A1111's own `Mask blur`,
`Mask mode`, `Inpaint area` with `Masked area padding`, and `Masked content`, as A1111 writes them.

`format_parameters` and `parse_parameters` are inverses on the dict the CLI records (keys named as
`Runner`'s arguments); keys this module does not know are kept under `extra` when parsing. Text from
A1111 itself parses too: without ControlNets the per-ControlNet lists are empty, and `image` is None
where a ControlNet entry has no Image.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# Our scheduler names -> the sampler names A1111 and most UIs show.
SAMPLERS = {
    "unipc": "UniPC",
    "euler_a": "Euler a",
    "euler": "Euler",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "lcm": "LCM",  # A1111's own LCM sampler name
    "tcd": "TCD",  # Forge's and ComfyUI's name; A1111 has none
    "ddim_trailing": "DDIM Trailing",  # not A1111's: DDIM with trailing timestep spacing (Hyper-SD LoRAs)
    "euler_trailing": "Euler Trailing",  # not A1111's: Euler with trailing spacing (Lightning-style LoRAs)
}
SCHEDULERS_BY_SAMPLER = {sampler: name for name, sampler in SAMPLERS.items()}

# The A1111 ControlNet extension's control modes, by Runner.generate's `control_mode` names. diffusers'
# guess mode is not one of them (its per-block scales differ): it is written as our own `Guess Mode: True`.
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "controlnet": "ControlNet is more important"}
CONTROL_MODES_BY_NAME = {name: mode for mode, name in CONTROL_MODES.items()}

PRECISIONS = ("fp32", "fp16", "bf16")
INVERTED_MASK = "Inpaint not masked"  # A1111's "Mask mode" for inpainting_mask_invert 1
ONLY_MASKED = "Only masked"  # A1111's "Inpaint area" for inpaint_full_res
NEGATIVE = "Negative prompt:"
CHUNK = "parameters"
# A1111's own pair pattern: a key, then a JSON-quoted value or anything up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_PER_NET = ("controlnet", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
            "image", "preprocess")


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _number(x: float) -> str:
    """Shortest exact text: 7.0 -> '7', 0.1 -> '0.1' (repr round-trips every float)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _pairs(line: str) -> dict[str, str]:
    return {key.strip(): _unquote(value.strip()) for key, value in _PAIR.findall(line)}


def _join(pairs: dict) -> str:
    return ", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items())


def format_parameters(p: dict, batch_pos: int | None = None) -> str:
    """The chunk text for one image. `p` as `parse_parameters` returns it; `batch_pos`: the image's
    index in its batch (A1111's "Batch pos"), written when the batch holds more than one image."""
    if p["scheduler"] not in SAMPLERS:
        raise ValueError(f"unknown scheduler {p['scheduler']!r}; known: {', '.join(SAMPLERS)}")
    pairs = {
        "Steps": p["num_inference_steps"],
        "Sampler": SAMPLERS[p["scheduler"]],
        "CFG scale": _number(p["guidance_scale"]),
        "Seed": p["seed"],
        "Size": f"{p['width']}x{p['height']}",
        "Model": p["model"],
    }
    if p.get("eta", 0.0) != 0.0:  # A1111 writes Eta only when it is not the sampler's default (0)
        pairs["Eta"] = _number(p["eta"])
    if p.get("strength") is not None:  # img2img / inpaint
        pairs["Denoising strength"] = _number(p["strength"])
        pairs.update(_inpaint_pairs(p))
        if p.get("init_image"):
            pairs["Init image"] = p["init_image"]
        if p.get("mask_image"):
            pairs["Mask"] = p["mask_image"]
    # Not A1111's keys, but the image depends on them: a bf16 image rerun in fp32 differs.
    if p.get("dtype"):
        pairs["Precision"] = p["dtype"]
    if p.get("optimizations"):
        pairs["Optimizations"] = p["optimizations"]
    if p.get("vae"):  # A1111's key; here the source given to --vae (absent: the model's own VAE)
        pairs["VAE"] = p["vae"]
    if p.get("lora_hashes"):  # as A1111 writes it: "name: hash, name: hash" (":" and "," dropped from names)
        strip = str.maketrans("", "", ":,")
        pairs["Lora hashes"] = ", ".join(f"{name.translate(strip)}: {h}" for name, h in p["lora_hashes"].items())
    if p.get("sdxl"):  # not A1111's: SDXL's second prompts and size micro-conditioning (diffusers' names), as JSON
        pairs["SDXL conditioning"] = json.dumps(p["sdxl"], ensure_ascii=False)
    if p.get("lora_files"):  # not A1111's: LoRAs given by file (--lora), with their weights, as JSON
        pairs["Lora files"] = json.dumps([[str(path), float(w)] for path, w in p["lora_files"]])
    if p["num_images_per_prompt"] > 1:
        pairs["Batch size"] = p["num_images_per_prompt"]
        if batch_pos is not None:
            pairs["Batch pos"] = batch_pos
    for k, name in enumerate(p["controlnet"]):
        module = p["preprocess"][k] or "none"
        net = {"Module": module, "Model": name, "Weight": _number(p["controlnet_conditioning_scale"][k])}
        if module == "canny":  # the extension's names for a preprocessor's two sliders
            net["Threshold A"], net["Threshold B"] = p["canny_low"], p["canny_high"]
        net["Guidance Start"] = _number(p["control_guidance_start"][k])
        net["Guidance End"] = _number(p["control_guidance_end"][k])
        net["Control Mode"] = CONTROL_MODES[p["control_mode"][k] if p.get("control_mode") else "balanced"]
        if p.get("control_type") and p["control_type"][k] is not None:  # a ControlNet-Union's condition type
            net["Union Control Type"] = p["control_type"][k]
        if p["guess_mode"]:
            net["Guess Mode"] = "True"
        net.update(p["unit_pairs"][k] if p.get("unit_pairs") else {})  # the A1111 API's per-unit settings
        if p["image"][k] is not None:  # an inpaint ControlNet's map comes from Init image and Mask
            net["Image"] = p["image"][k]
        pairs[f"ControlNet {k}"] = _join(net)
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"{NEGATIVE} {p['negative_prompt']}")
    lines.append(_join(pairs))
    return "\n".join(lines)


def _inpaint_pairs(p: dict) -> dict:
    """A1111's inpainting entries, in the order it writes them (engine/a1111_inpaint.A1111Inpaint.parameters)."""
    pairs = {}
    if p.get("mask_invert"):
        pairs["Mask mode"] = INVERTED_MASK
    if p.get("mask_blur") is not None:
        pairs["Mask blur"] = p["mask_blur"]
    if p.get("inpaint_only_masked"):
        pairs["Inpaint area"] = ONLY_MASKED
        pairs["Masked area padding"] = p.get("inpaint_padding", 0)
    if p.get("masked_content"):
        pairs["Masked content"] = p["masked_content"]
    return pairs


def _parse_inpaint(pairs: dict, p: dict) -> None:
    if "Mask mode" in pairs:
        mode = pairs.pop("Mask mode")
        if mode != INVERTED_MASK:
            raise ValueError(f"unknown Mask mode {mode!r}; known: {INVERTED_MASK!r} (and none, 'Inpaint masked')")
        p["mask_invert"] = True
    if "Mask blur" in pairs:
        p["mask_blur"] = int(pairs.pop("Mask blur"))
    if "Inpaint area" in pairs:
        area = pairs.pop("Inpaint area")
        if area != ONLY_MASKED:
            raise ValueError(f"unknown Inpaint area {area!r}; known: {ONLY_MASKED!r} (and none, 'Whole picture')")
        p["inpaint_only_masked"], p["inpaint_padding"] = True, int(pairs.pop("Masked area padding", 0))
    if "Masked content" in pairs:
        p["masked_content"] = pairs.pop("Masked content")


def _need(pairs: dict, key: str, where: str = "parameters") -> str:
    if key not in pairs:
        raise ValueError(f"{where} has no {key!r} entry; found: {', '.join(pairs) or 'nothing'}")
    return pairs.pop(key)


def parse_parameters(text: str) -> dict:
    """The dict `format_parameters` was given, from the chunk text. Raises ValueError naming what is
    missing or malformed. Unknown keys (another tool's extras) land in `extra`, unknown to the CLI."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"parameters text must be a non-empty string, got {text!r}")
    *head, last = text.split("\n")
    if not _PAIR.match(last) or not head:
        raise ValueError(f"the last line of the parameters text must be 'Key: value, ...' pairs, got {last!r}")
    negative_at = next((i for i, line in enumerate(head) if line.startswith(NEGATIVE)), len(head))
    negative = "\n".join(head[negative_at:])[len(NEGATIVE):].removeprefix(" ") if negative_at < len(head) else ""
    pairs = _pairs(last)
    width, _, height = _need(pairs, "Size").partition("x")
    sampler = _need(pairs, "Sampler")
    if sampler not in SCHEDULERS_BY_SAMPLER:
        raise ValueError(f"unknown sampler {sampler!r}; this engine has: {', '.join(SCHEDULERS_BY_SAMPLER)}")
    p = {
        "prompt": "\n".join(head[:negative_at]),
        "negative_prompt": negative,
        "num_inference_steps": int(_need(pairs, "Steps")),
        "scheduler": SCHEDULERS_BY_SAMPLER[sampler],
        "guidance_scale": float(_need(pairs, "CFG scale")),
        "seed": int(_need(pairs, "Seed")),
        "width": int(width),
        "height": int(height),
        "model": _need(pairs, "Model"),
        "eta": float(pairs.pop("Eta", 0.0)),
        "num_images_per_prompt": int(pairs.pop("Batch size", 1)),
    }
    if "Batch pos" in pairs:
        p["batch_pos"] = int(pairs.pop("Batch pos"))
    if "Denoising strength" in pairs:
        p["strength"] = float(pairs.pop("Denoising strength"))
        _parse_inpaint(pairs, p)
        p["init_image"] = pairs.pop("Init image", None)  # None in A1111's PNGs: give --init-image
        if "Mask" in pairs:
            p["mask_image"] = pairs.pop("Mask")
    if "Precision" in pairs:
        p["dtype"] = pairs.pop("Precision")
        if p["dtype"] not in PRECISIONS:
            raise ValueError(f"unknown Precision {p['dtype']!r}; known: {', '.join(PRECISIONS)}")
    if "Optimizations" in pairs:
        p["optimizations"] = pairs.pop("Optimizations")
    if "VAE" in pairs:
        p["vae"] = pairs.pop("VAE")
    if "Lora hashes" in pairs:
        entries = [entry.rpartition(":") for entry in pairs.pop("Lora hashes").split(",") if entry.strip()]
        p["lora_hashes"] = {name.strip(): digest.strip() for name, _, digest in entries}
    if "Lora files" in pairs:
        try:
            p["lora_files"] = [(str(path), float(weight)) for path, weight in json.loads(pairs.pop("Lora files"))]
        except (ValueError, TypeError) as err:
            raise ValueError(f"'Lora files' must be a JSON list of [path, weight] pairs ({err})") from None
    if "SDXL conditioning" in pairs:
        try:
            p["sdxl"] = {k: tuple(v) if isinstance(v, list) else v
                         for k, v in json.loads(pairs.pop("SDXL conditioning")).items()}
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"'SDXL conditioning' must be a JSON object of diffusers' SDXL arguments ({err})") from None
    for key in _PER_NET:
        p[key] = []
    guess, modes, types = [], [], []
    for k in range(len(pairs)):
        if f"ControlNet {k}" not in pairs:
            break
        where = f"ControlNet {k}"
        net = _pairs(pairs.pop(where))
        module = _need(net, "Module", where)
        p["controlnet"].append(_need(net, "Model", where))
        p["controlnet_conditioning_scale"].append(float(_need(net, "Weight", where)))
        p["control_guidance_start"].append(float(_need(net, "Guidance Start", where)))
        p["control_guidance_end"].append(float(_need(net, "Guidance End", where)))
        p["image"].append(net.pop("Image", None))  # A1111 does not record the control picture
        p["preprocess"].append(None if module == "none" else module)
        if module == "canny":
            p["canny_low"] = int(_need(net, "Threshold A", where))
            p["canny_high"] = int(_need(net, "Threshold B", where))
        mode = net.pop("Control Mode", CONTROL_MODES["balanced"])
        if mode not in CONTROL_MODES_BY_NAME:
            raise ValueError(f"{where}: unknown Control Mode {mode!r}; known: {', '.join(CONTROL_MODES_BY_NAME)}")
        modes.append(CONTROL_MODES_BY_NAME[mode])
        guess.append(net.pop("Guess Mode", "False") == "True")
        kind = net.pop("Union Control Type", None)
        types.append(int(kind) if kind is not None and kind.isdigit() else kind)
    p["guess_mode"] = any(guess)
    if any(mode != "balanced" for mode in modes):  # all Balanced is the same image as no control mode
        p["control_mode"] = modes
    if any(t is not None for t in types):
        p["control_type"] = types
    if pairs:
        p["extra"] = pairs
    return p


def png_info(text: str):
    """A PIL PngInfo holding the chunk (PIL stores non-Latin-1 text as iTXt by itself)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(CHUNK, text)
    return info


def read_parameters(path: str | Path) -> dict:
    """The parameters a PNG written by `python -m engine.generate` (or A1111) carries."""
    import PIL.Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PNG file {str(path)!r} does not exist")
    with PIL.Image.open(path) as im:
        im.load()  # text chunks after the image data are only read with the pixels
        text = im.info.get(CHUNK)
    if text is None:
        raise ValueError(f"{str(path)!r} has no {CHUNK!r} text chunk: it was not written by engine.generate or A1111")
    return parse_parameters(text)

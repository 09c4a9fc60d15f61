"""How a built graph is held to the fp32 torch module it was exported from (engine.modules, the cut every
backend runs): seeded sample inputs made from the artefact's manifest I/O spec, max abs error and max abs
error relative to the output's magnitude, the tolerance per precision, the point each is checked at. The
build (export/build.py) and `python -m engine.verify` both use these, so the errors in the manifest and
the ones the command prints are measured the same way.
"""
from __future__ import annotations

from typing import Callable

import torch

from engine import manifest as mf
from engine.manifest import Artefact, TensorIO

# Max abs error / max |reference| allowed per precision. fp32 graphs measure 1e-6 (tiny) to 2e-5 (full
# size) against torch; fp16 graphs against the fp32 reference ~1e-3.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


def sample_feeds(inputs: list[TensorIO], variables: dict[str, int], vocab_size: int, seed: int = 0) -> dict:
    """Seeded float32/int64 inputs of the spec's shapes; values in each input's natural range."""
    gen = torch.Generator("cpu").manual_seed(seed)
    feeds = {}
    for io in inputs:
        shape = io.shape(variables)
        if io.name == "input_ids":
            feeds[io.name] = torch.randint(0, vocab_size, shape, generator=gen)
        elif io.name == "time_ids":  # SDXL's sizes: original (h, w), crop top-left, target (h, w)
            h, w = 8 * variables["h"], 8 * variables["w"]
            feeds[io.name] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(shape).clone()
        elif io.name == "control_type":  # a union's types: 0/1 per image
            feeds[io.name] = (torch.arange(shape[1]) % 2 == 0).float().expand(shape).clone()
        elif io.name == "control_type_index":
            feeds[io.name] = torch.ones(shape, dtype=torch.int64)
        elif io.name == "condition_scale":
            feeds[io.name] = torch.full(shape, 0.7)
        elif io.name == "timestep":
            feeds[io.name] = torch.full(shape, 537.0)
        elif io.name == "scales":
            feeds[io.name] = torch.linspace(0.5, 1.5, shape[0])
        elif io.name == "control_map":
            feeds[io.name] = torch.rand(shape, generator=gen)
        elif io.name == "images":  # the VAE encoder's pictures, in [-1, 1]
            feeds[io.name] = torch.rand(shape, generator=gen) * 2 - 1
        else:
            feeds[io.name] = torch.randn(shape, generator=gen)
    return feeds


def reference_module(kind: str, sd=None, net=None, vae=None) -> torch.nn.Module:
    """The engine.modules wrapper an artefact of `kind` is exported from; `vae`: an extra VAE (TAESD) for
    its vae_* artefacts, else the model's own."""
    from diffusers import AutoencoderTiny

    from engine import modules

    vae = sd.vae if vae is None else vae
    makers = {
        "text_encoder": lambda: modules.TextEncoder(sd.text_encoder, penultimate=sd.family == "sdxl"),
        "text_encoder_2": lambda: modules.TextEncoder(sd.text_encoder_2, penultimate=True),
        "unet": lambda: modules.UNetWithResiduals(sd.unet),
        "vae_encoder": lambda: (modules.TinyVaeEncoder if isinstance(vae, AutoencoderTiny) else modules.VaeEncoder)(vae),
        "vae_decoder": lambda: modules.VaeDecoder(vae),
        "hint_encoder": lambda: modules.hint_encoder(net),
        "controlnet": lambda: modules.ControlNetBody(net),
    }
    if kind not in makers:
        raise ValueError(f"unknown artefact kind {kind!r}; allowed: {', '.join(makers)}")
    return makers[kind]().eval()


def compare(module: torch.nn.Module, run: Callable[[dict], list], artefact: Artefact, variables: dict[str, int],
            vocab_size: int) -> dict:
    """Run the graph and the torch module on the same sample inputs: {"max_abs", "max_rel"}."""
    feeds = sample_feeds(artefact.inputs, variables, vocab_size)
    with torch.inference_mode():
        expected = module(*[feeds[io.name] for io in artefact.inputs])
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    actual = run(feeds)
    max_abs = max_rel = 0.0
    for io, got, ref in zip(artefact.outputs, actual, expected):
        got, ref = got.detach().float().cpu(), ref.float().expand(got.shape)  # global-pool outputs broadcast
        err = float((got - ref).abs().max())
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / max(float(ref.abs().max()), 1e-12))
    return dict(max_abs=max_abs, max_rel=max_rel, **variables)


def verify_point(opt_batch: int, min_size: int, vae_scale_factor: int, size: int | None = None,
                 batch: int | None = None) -> dict[str, int]:
    """Where to verify: the build's smallest size (cheap, and as exact as any) at the profile's opt batch
    (2 for the CFG models, 1 for the VAE), unless told otherwise."""
    side = (size or min_size) // vae_scale_factor
    return dict(B=batch or opt_batch, h=side, w=side)


def load_references(manifest: mf.Manifest, device: str = "cpu"):
    """The fp32 torch models the engine dir was built from (loaded from the recorded sources): (sd, nets by
    slug); the extra VAEs by name are `sd.extra_vaes`."""
    from engine.loading import load_controlnet, load_sd
    from engine.registry import ControlNetSpec
    from engine.vaes import load_vae

    sd = load_sd(manifest.model["source"], torch.device(device), torch.float32)
    nets = {}
    for net in manifest.controlnets:
        spec = ControlNetSpec(net["name"], net["source"], net.get("preprocessor"))
        nets[net["slug"]] = load_controlnet(spec, sd, torch.device(device), torch.float32)
    sd.extra_vaes = {vae["name"]: load_vae(vae["source"], torch.device(device)) for vae in manifest.vaes}
    return sd, nets


def format_table(rows: list[dict]) -> str:
    """artefact | status | size | seconds | max abs | max rel, one row per artefact."""
    head = ("artefact", "status", "size", "time s", "max abs", "max rel")
    lines = []
    for r in rows:
        err = lambda v: "-" if v is None else f"{v:.2e}"
        size = r.get("size")
        lines.append((r["artefact"], r.get("status", ""), "-" if size is None else f"{size / 2**20:.1f} MiB",
                      "-" if r.get("seconds") is None else f"{r['seconds']:.1f}", err(r.get("max_abs")), err(r.get("max_rel"))))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines])

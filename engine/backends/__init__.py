"""Backends: the tensor-in, tensor-out questions the generation loop asks, answered per runtime.

    encode_text(ids, encoder="text_encoder") -> that text encoder's outputs (the family asks which:
                               engine/families.py; SDXL's text_encoder_2 gives (hidden states, pooled))
    encode_hint(k, control_map, inputs=None) -> hint of ControlNet k (a ControlNet-Union's also takes its
                               condition's `inputs`: type index and scale; engine/controls.py)
    controlnet(k, sample, t, cond, hint, scales) -> the residuals (13 in SD1.5, 10 in SDXL), already scaled
    combine(outputs, batch) -> the active nets' outputs summed (one launch where the backend can),
                               guess mode's conditional-half residuals padded to the full batch
    unet(sample, t, cond, residuals | None) -> noise prediction
    encode_image(pixels in [-1, 1], vae="model") -> (mean, std) of the VAE's latent distribution, unscaled
                               (img2img and inpaint: the loop draws the sample with its generator);
                               a TAESD's (latents, None): it has no distribution to sample
    decode(latents, vae="model") -> images in [-1, 1]

`vae` names one of the loaded VAEs (engine/vaes.py): "model", the model's own, or the extra one (TAESD).

`cond` is the family's conditioning, a dict of named tensors (SD1.5: {"encoder_hidden_states": ...}); each
model takes the entries it declares (graphs: their inputs of those names; torch modules: `cond_inputs`).
A backend knows nothing of schedulers, CFG or guidance windows: the loop in `engine.runner` is written
once and is the same for every backend, which is what makes "every backend equals the reference" a test.
Inputs come in float32 (latents, scales) and outputs go back as float32; a backend casts to its own dtype.

Weights, for LoRA switching (engine/lora.py), by the diffusers model's own parameter names:

    get_weights(graph, names) -> {name: float32 tensor}   graph: "unet", "text_encoder" (SDXL also
                                                         "text_encoder_2"); the base values
    set_weights(graph, {name: complete new weight})      in place (torch) or replaced initializers (graphs)
    check_set_weights(graph)   optional: raises if the graph's weights cannot change now (asked before any write)

A failed set_weights may leave the graph holding part of the new weights; engine.lora.LoraSwitch then writes
the previous values back on every graph it touched, so a backend need not undo its own partial writes.

`pick_backend` says which built backend can run here (and why); `open_engine_dir` checks an engine dir's
manifest against the request and returns the backend over its graphs (onnxruntime, openvino or tensorrt;
onnxruntime and openvino run the same ONNX files, so either runs a dir built for the other).
"""
from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "openvino")


def sum_residuals(outputs: list, batch: int) -> list:
    """Per-net residual tuples -> one list, summed in net order (as diffusers' MultiControlNetModel);
    residuals of the conditional half only (guess mode with CFG) get zeros for the unconditional half."""
    import torch

    residuals = list(outputs[0])
    for out in outputs[1:]:
        residuals = [a + b for a, b in zip(residuals, out)]
    if residuals[0].shape[0] < batch:
        residuals = [torch.cat([torch.zeros_like(r), r]) for r in residuals]
    return residuals


class NonFiniteError(RuntimeError):
    """A backend produced NaN or inf where a generation needs finite values."""


def check_finite(tensor, what: str, backend, dtype) -> None:
    """Raise NonFiniteError, naming the backend and precision, where `tensor` holds a NaN or inf: never a NaN
    image returned. The Runner checks the text conditioning (each tensor of the family's dict) and the final
    latents, once per generation each (a NaN anywhere in the loop reaches the final latents), so the cost is
    a few reductions over small tensors. It caught OpenVINO running bf16 from an f32 compile's cached blob (issue #22)."""
    import torch

    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        raise NonFiniteError(f"the {backend.name} backend ({precision}) produced NaN or inf in the {what} "
                             f"({int((~finite).sum())} of {finite.numel()} values): refusing to return a NaN image")


def check_request(backend, images: int, height: int, width: int) -> None:
    """A request against the range a backend's engines were built for, before any model work: backends
    with fixed ranges (TensorRT: its plans' optimisation profiles) expose the manifest's `sizes`; the
    others (torch, ONNX Runtime's dynamic graphs) take any size and have none."""
    sizes = getattr(backend, "sizes", None)
    if sizes is None:
        return
    if images > sizes["max_batch"]:
        raise ValueError(f"{images} images in one call, but this engine dir's {backend.name} plans take at most "
                         f"{sizes['max_batch']}: ask for fewer, or rebuild with --max-batch {images}")
    for value, what in ((height, "height"), (width, "width")):
        if not sizes["min_size"] <= value <= sizes["max_size"]:
            raise ValueError(f"{what} {value} is outside this engine dir's {backend.name} plans' range "
                             f"{sizes['min_size']}-{sizes['max_size']} px: rebuild with --min-size/--max-size to cover it")


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def tensorrt_usable() -> tuple[bool, str]:
    """Whether TensorRT can run here, and why (or why not), without raising."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt module is not installed"
    try:
        import tensorrt
    except (ImportError, OSError) as err:  # the bindings wheel alone fails on its missing libraries
        return False, f"tensorrt does not import ({err})"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, f"TensorRT {tensorrt.__version__} on {torch.cuda.get_device_name(0)}"


def openvino_usable() -> tuple[bool, str]:
    """Whether OpenVINO can run here, and why (or why not), without raising."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return False, "the openvino module is not installed (pip install -e .[openvino])"
    import openvino

    return True, f"OpenVINO {openvino.__version__}"


def pick_backend(requested: str) -> tuple[str, str]:
    """(backend to build/run with, the reason) for auto | onnxruntime | tensorrt | openvino."""
    check_backend_name(requested)
    if requested == "torch":
        raise ValueError("backend 'torch' runs the model itself and has nothing to build: choose auto, onnxruntime, "
                         "tensorrt or openvino")
    if requested == "onnxruntime":
        return "onnxruntime", "asked for"
    if requested == "openvino":
        usable, why = openvino_usable()
        if not usable:
            raise ValueError(f"backend 'openvino' cannot run here: {why}")
        return "openvino", f"asked for: {why}"
    usable, why = tensorrt_usable()
    if requested == "tensorrt":
        if not usable:
            raise ValueError(f"backend 'tensorrt' cannot run here: {why}; use --backend onnxruntime or auto")
        return "tensorrt", why
    return ("tensorrt", f"auto: {why}") if usable else ("onnxruntime", f"auto: TensorRT unavailable, {why}")


@dataclass
class EngineDir:
    """What Runner needs from an engine dir: a backend over its graphs and the files the build copied."""

    manifest: object
    backend: object
    tokenizer: object
    scheduler_config: dict
    controlnet_specs: list
    global_pools: list[bool]
    nets: list[dict]  # the manifest's entries of the chosen ControlNets
    tokenizer_2: object = None  # SDXL's second tokenizer


def open_engine_dir(engine_dir, model: str | None, controlnets: list[str] | None, backend: str,
                    dtype=None) -> EngineDir:
    """Load and check an engine dir for the requested model, ControlNets and backend. `dtype` is read by
    the openvino backend only (bf16 inference precision of fp32 graphs); the others run the dir's own.

    Raises engine.manifest.EngineDirError when the dir is missing, unfinished, tampered with, or built for
    another model, ControlNet set, TensorRT version or GPU.
    """
    import json
    from pathlib import Path

    from engine import manifest as mf
    from engine.registry import ControlNetSpec, resolve

    check_backend_name(backend)
    if backend == "torch":
        raise ValueError("backend='torch' runs the torch models, not an engine dir: leave engine_dir unset, or pick "
                         "auto, onnxruntime, tensorrt or openvino")
    engine_dir = Path(engine_dir)
    manifest = mf.read(engine_dir)
    if manifest is None:
        raise mf.EngineDirError(f"{str(engine_dir)!r} has no {mf.MANIFEST}: build it with python -m engine.build --out {engine_dir}")
    mf.match_model(manifest, model)
    requested = None if controlnets is None else [(s.name, s.source) for s in map(resolve, controlnets)]
    indices = mf.match_controlnets(manifest, requested)
    chosen = manifest.backend if backend == "auto" else backend
    nets = [manifest.controlnets[i] for i in indices]
    needed = ["text_encoder", "unet", "vae_decoder"] + [f"{p}_{n['slug']}" for n in nets for p in ("hint", "controlnet")]
    if manifest.has("text_encoder_2"):  # SDXL
        needed.append("text_encoder_2")
    if manifest.has("vae_encoder"):  # img2img and inpaint; dirs built before them lack it (Runner says so)
        needed.append("vae_encoder")
    needed += [f"{p}_{vae['name']}" for vae in manifest.vaes for p in ("vae_encoder", "vae_decoder")]
    manifest = mf.load(engine_dir, needed)  # hashes every file it will use
    if chosen == "tensorrt":
        from engine.backends.tensorrt_backend import TrtBackend, TrtRuntime

        usable, why = tensorrt_usable()
        if not usable:
            raise ValueError(f"engine dir {str(engine_dir)!r} holds TensorRT plans, but TensorRT cannot run here: {why}; "
                             "pass backend='onnxruntime' to run its ONNX graphs")
        runtime = TrtRuntime.create()
        mf.match_tensorrt(manifest, runtime.version, runtime.gpu)
        runner_backend = TrtBackend(engine_dir, manifest, indices, runtime)
    elif chosen == "openvino":
        from engine.backends.openvino_backend import OvBackend

        usable, why = openvino_usable()
        if not usable:
            raise ValueError(f"backend 'openvino' cannot run here: {why}")
        runner_backend = OvBackend(engine_dir, manifest, indices, dtype=dtype)
    else:
        from engine.backends.onnxruntime_backend import OrtBackend

        runner_backend = OrtBackend(engine_dir, manifest, indices)
    from transformers import CLIPTokenizer

    return EngineDir(
        manifest=manifest,
        backend=runner_backend,
        tokenizer=CLIPTokenizer.from_pretrained(str(engine_dir / "tokenizer")),
        scheduler_config=json.loads((engine_dir / "scheduler_config.json").read_text()),
        controlnet_specs=[ControlNetSpec(n["name"], n["source"], n["preprocessor"], union=n.get("union") is not None)
                          for n in nets],
        global_pools=[bool(n["global_pool"]) for n in nets],
        nets=nets,
        tokenizer_2=(CLIPTokenizer.from_pretrained(str(engine_dir / "tokenizer_2"))
                     if (engine_dir / "tokenizer_2").is_dir() else None),
    )

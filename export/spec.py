"""One I/O spec per exported model: names, dtypes, symbolic dims, batch range and profiles.

The same `ModelSpec` drives the ONNX export (input/output names, dynamic axes, sample inputs), the
TensorRT optimisation profiles (min/opt/max shapes) and, through the manifest, the runtime's buffer
allocation. Dims are symbolic over B (batch) and h, w (latent size); see `engine.manifest`.

Batch ranges: every model the CFG loop calls runs at up to 2 x max_batch (uncond + cond halves), and so
does the hint encoder, which encodes at the ControlNet's batch (see the comment in Runner.generate). The
VAE decodes only the images: up to max_batch; its encoder (img2img, inpaint) sees the init image, batch 1,
up to max_batch.

Channels: the ControlNets and the VAE work on `latent_channels` (4); the UNet's sample has
`unet_in_channels`, 9 for an inpainting UNet (latents, mask, masked-image latents). An LCM-distilled
UNet (`time_cond_proj_dim` set) takes one more conditioning input, `timestep_cond`. Extra VAEs (TAESD,
`python -m engine.build --vae`) get their own encoder and decoder graphs, `vae_{encoder,decoder}_<name>`.

Families (engine/families.py): the conditioning inputs of the UNet and ControlNets are named as the family's
Conditioning dict, after sample and timestep (ControlNets: before hint and scales). SD1.5:
encoder_hidden_states. SDXL: encoder_hidden_states (both encoders' hidden states, `context_dim` wide),
text_embeds (the pooled projection) and time_ids (6 sizes, float32 in every precision: sizes are exact there),
and a second text encoder graph (text_encoder_2: hidden states and the pooled text_embeds). A ControlNet-Union
adds control_type (its types, 0/1 per image) to its body and a condition's type index and scale to its hint
encoder (engine/controls.py). SDXL's VAE overflows in fp16 (its config's `force_upcast`): in an fp16 build its
graphs stay fp32, as diffusers' SDXL pipelines upcast it.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.manifest import TensorIO

FLOAT = {"fp32": "float32", "fp16": "float16"}


@dataclass(frozen=True)
class Sizes:
    """The image sizes and batch an engine serves (pixels; each of height and width independently)."""

    min_size: int = 256
    opt_size: int = 512
    max_size: int = 1024
    max_batch: int = 4  # images per call; CFG models see twice this

    def check(self, multiple: int) -> None:
        for what in ("min_size", "opt_size", "max_size"):
            value = getattr(self, what)
            if not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"{what} must be a positive multiple of {multiple} (the UNet downsamples the latent "
                                 f"{multiple // 8}x after the VAE's 8x), got {value!r}")
        if not self.min_size <= self.opt_size <= self.max_size:
            raise ValueError(f"need min_size <= opt_size <= max_size, got {self.min_size}, {self.opt_size}, {self.max_size}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What the specs need to know about the models; recorded in the manifest as `config`."""

    vae_scale_factor: int
    latent_channels: int
    text_length: int
    text_dim: int
    vocab_size: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    unet_out_channels: int
    image_channels: int  # VAE output channels
    control_channels: int  # control map channels (3)
    unet_in_channels: int = 4  # 9 for an inpainting UNet
    scaling_factor: float = 0.18215  # the VAE's latent scaling (the loop scales the encoder's sample)
    time_cond_proj_dim: int | None = None  # an LCM-distilled UNet's guidance embedding width (input timestep_cond)
    family: str = "sd15"  # engine/families.py
    context_dim: int = 0  # the UNet's cross-attention width (SD1.5: text_dim; SDXL: both encoders' widths)
    text_dim_2: int = 0  # SDXL's second text encoder: hidden width, pooled projection width, vocabulary
    pooled_dim: int = 0
    vocab_size_2: int = 0
    time_ids: int = 6  # SDXL's size conditioning
    vae_fp32: bool = False  # the VAE overflows in fp16 (force_upcast): its graphs stay fp32
    force_zeros_for_empty_prompt: bool = True  # SDXL: no negative prompt -> zero embeddings (the family reads it)

    @property
    def num_residuals(self) -> int:
        levels = len(self.block_out_channels)
        return 1 + levels * self.layers_per_block + (levels - 1) + 1

    @property
    def size_multiple(self) -> int:
        """Image sizes the graphs accept: the latent must survive every UNet downsampling exactly."""
        return self.vae_scale_factor * 2 ** (len(self.block_out_channels) - 1)


def model_config(sd, controlnets: list) -> ModelConfig:
    unet, vae, text = sd.unet.config, sd.vae.config, sd.text_encoder.config
    second = sd.text_encoder_2.config if sd.text_encoder_2 is not None else None
    layers = unet.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"UNets with per-block layers_per_block ({layers!r}) are not supported; SD1.5 has one int")
    channels = {int(net.config.conditioning_channels) for net in controlnets} or {3}
    if len(channels) != 1:
        raise ValueError(f"ControlNets take control maps with different channel counts {sorted(channels)}; use one kind")
    return ModelConfig(
        vae_scale_factor=2 ** (len(vae.block_out_channels) - 1),
        latent_channels=int(vae.latent_channels),
        text_length=int(sd.tokenizer.model_max_length),
        text_dim=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        block_out_channels=tuple(int(c) for c in unet.block_out_channels),
        layers_per_block=int(layers),
        unet_out_channels=int(unet.out_channels),
        image_channels=int(vae.out_channels),
        control_channels=channels.pop(),
        unet_in_channels=int(unet.in_channels),
        scaling_factor=float(vae.scaling_factor),
        time_cond_proj_dim=unet.time_cond_proj_dim,
        family=sd.family,
        context_dim=int(unet.cross_attention_dim),
        text_dim_2=int(second.hidden_size) if second else 0,
        pooled_dim=int(second.projection_dim) if second else 0,
        vocab_size_2=int(second.vocab_size) if second else 0,
        vae_fp32=bool(vae.get("force_upcast", False)),
        force_zeros_for_empty_prompt=bool(sd.force_zeros_for_empty_prompt),
    )


def residual_names(count: int) -> list[str]:
    return [f"down_{i}" for i in range(count - 1)] + ["mid"]


def residual_dims(config: ModelConfig, global_pool: bool = False) -> list[tuple]:
    """(B, C, h/f, w/f) of the 13 residuals: conv_in, each resnet and downsampler, then the mid block."""
    channels = config.block_out_channels
    pairs = [(channels[0], 1)]
    for i, ch in enumerate(channels):
        pairs += [(ch, 2**i)] * config.layers_per_block
        if i < len(channels) - 1:
            pairs.append((ch, 2 ** (i + 1)))
    pairs.append((channels[-1], 2 ** (len(channels) - 1)))
    if global_pool:  # the residuals are spatial means, broadcast into the UNet's skips
        return [("B", ch, 1, 1) for ch, _ in pairs]
    return [("B", ch, "h" if f == 1 else f"h/{f}", "w" if f == 1 else f"w/{f}") for ch, f in pairs]


@dataclass(frozen=True)
class ModelSpec:
    name: str  # artefact name: text_encoder, unet, vae_encoder, vae_decoder, hint_<net>, controlnet_<net>
    kind: str
    net: str | None
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    cfg_batch: bool  # True: batch up to 2 x max_batch (CFG halves), else up to max_batch

    def batch_range(self, sizes: Sizes) -> tuple[int, int, int]:
        return (1, 2, 2 * sizes.max_batch) if self.cfg_batch else (1, 1, sizes.max_batch)

    def variables(self, sizes: Sizes, vae_scale_factor: int) -> list[dict[str, int]]:
        """[min, opt, max] values of B, h, w."""
        batches = self.batch_range(sizes)
        pixels = (sizes.min_size, sizes.opt_size, sizes.max_size)
        return [dict(B=b, h=p // vae_scale_factor, w=p // vae_scale_factor) for b, p in zip(batches, pixels)]

    def profile(self, sizes: Sizes, vae_scale_factor: int) -> dict[str, list[list[int]]]:
        """Input name -> [min, opt, max] shape: one TensorRT optimisation profile."""
        points = self.variables(sizes, vae_scale_factor)
        return {io.name: [list(io.shape(v)) for v in points] for io in self.inputs}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For torch.onnx.export: every symbolic axis, named after its dim ("h/2" -> "h_2")."""
        axes = {}
        for io in self.inputs + self.outputs:
            named = {i: str(d).replace("/", "_") for i, d in enumerate(io.dims) if isinstance(d, str)}
            if named:
                axes[io.name] = named
        return axes

    def output_shapes(self, variables: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {io.name: io.shape(variables) for io in self.outputs}


def cond_inputs(config: ModelConfig, f: str) -> tuple[TensorIO, ...]:
    """The family's conditioning inputs (engine.families), in the order the torch modules take them."""
    c = config
    text = TensorIO("encoder_hidden_states", f, ("B", c.text_length, c.context_dim or c.text_dim))
    if c.family != "sdxl":
        return (text,)
    return (text, TensorIO("text_embeds", f, ("B", c.pooled_dim)), TensorIO("time_ids", "float32", ("B", c.time_ids)))


def build_specs(config: ModelConfig, nets: list[tuple], precision: str,
                vaes: list[tuple[str, bool]] = ()) -> list[ModelSpec]:
    """Every artefact's spec, in build order. `nets`: (slug, global_pool[, union types or None]) per ControlNet;
    `vaes`: (name, tiny) per extra VAE (engine/vaes.py), whose encoder gives latents (TAESD) or a distribution's
    mean and std."""
    if precision not in FLOAT:
        raise ValueError(f"precision must be one of {', '.join(FLOAT)}, got {precision!r}")
    f = FLOAT[precision]
    c = config
    s = c.vae_scale_factor
    fv = "float32" if c.vae_fp32 else f  # the VAE's graphs: fp32 where it overflows in fp16
    latent = TensorIO("sample", f, ("B", c.latent_channels, "h", "w"))
    unet_sample = TensorIO("sample", f, ("B", c.unet_in_channels, "h", "w"))
    timestep = TensorIO("timestep", "float32", (1,))  # float32 in every precision: 999.0 is exact there
    conds = cond_inputs(c, f)
    # An LCM UNet's guidance embedding (engine.families.guidance_embedding); ControlNets take none.
    unet_cond = conds + ((TensorIO("timestep_cond", f, ("B", c.time_cond_proj_dim)),)
                         if c.time_cond_proj_dim is not None else ())
    hint = TensorIO("hint", f, ("B", c.block_out_channels[0], "h", "w"))
    names = residual_names(c.num_residuals)
    unet_residuals = tuple(TensorIO(n, f, d) for n, d in zip(names, residual_dims(c)))
    ids = (TensorIO("input_ids", "int64", ("B", c.text_length)),)
    specs = [ModelSpec("text_encoder", "text_encoder", None, ids,
                       (TensorIO("text_embeddings", f, ("B", c.text_length, c.text_dim)),), cfg_batch=True)]
    if c.family == "sdxl":
        specs.append(ModelSpec("text_encoder_2", "text_encoder_2", None, ids,
                               (TensorIO("text_embeddings", f, ("B", c.text_length, c.text_dim_2)),
                                TensorIO("text_embeds", f, ("B", c.pooled_dim))), cfg_batch=True))
    specs += [
        ModelSpec("unet", "unet", None, (unet_sample, timestep) + unet_cond + unet_residuals,
                  (TensorIO("noise_pred", f, ("B", c.unet_out_channels, "h", "w")),), cfg_batch=True),
        # Before the decoder: the build lets go of the VAE after its last graph.
        ModelSpec("vae_encoder", "vae_encoder", None, (TensorIO("images", fv, ("B", c.image_channels, f"{s}h", f"{s}w")),),
                  (TensorIO("latent_mean", fv, ("B", c.latent_channels, "h", "w")),
                   TensorIO("latent_std", fv, ("B", c.latent_channels, "h", "w"))), cfg_batch=False),
        ModelSpec("vae_decoder", "vae_decoder", None, (TensorIO("latents", fv, ("B", c.latent_channels, "h", "w")),),
                  (TensorIO("images", fv, ("B", c.image_channels, f"{s}h", f"{s}w")),), cfg_batch=False),
    ]
    for name, tiny in vaes:
        images = TensorIO("images", f, ("B", c.image_channels, f"{s}h", f"{s}w"))
        latents = TensorIO("latents", f, ("B", c.latent_channels, "h", "w"))
        encoded = (latents,) if tiny else (TensorIO("latent_mean", f, ("B", c.latent_channels, "h", "w")),
                                           TensorIO("latent_std", f, ("B", c.latent_channels, "h", "w")))
        specs.append(ModelSpec(f"vae_encoder_{name}", "vae_encoder", name, (images,), encoded, cfg_batch=False))
        specs.append(ModelSpec(f"vae_decoder_{name}", "vae_decoder", name, (latents,), (images,), cfg_batch=False))
    for slug, global_pool, *rest in nets:
        union = rest[0] if rest else None
        control = TensorIO("control_map", f, ("B", c.control_channels, f"{s}h", f"{s}w"))
        hint_inputs = (control,)
        net_conds = conds
        if union is not None:  # engine.modules.UnionHintEncoder, and the body's own "control_type"
            hint_inputs += (TensorIO("control_type_index", "int64", (1,)), TensorIO("condition_scale", f, (1,)))
            net_conds = conds + (TensorIO("control_type", "float32", ("B", union)),)
        specs.append(ModelSpec(f"hint_{slug}", "hint_encoder", slug, hint_inputs, (hint,), cfg_batch=True))
        outputs = tuple(TensorIO(n, f, d) for n, d in zip(names, residual_dims(c, global_pool)))
        scales = TensorIO("scales", f, (c.num_residuals,))
        specs.append(ModelSpec(f"controlnet_{slug}", "controlnet", slug, (latent, timestep) + net_conds + (hint, scales),
                               outputs, cfg_batch=True))
    return specs

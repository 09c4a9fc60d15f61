"""What img2img and inpainting change in the one generation loop: kept timesteps, start latents, the mask.

    txt2img   every step, from seeded noise
    img2img   the last `strength` part of the schedule, from the init image's latents noised to its
              first step
    inpaint   as img2img, and the UNet is told what to repaint: a 9-channel inpainting UNet gets the
              mask and the masked image's latents as extra input channels at every step; after a step
              of a 4-channel UNet, the unmasked part is reset to the init latents noised to the next
              step (the re-blend)

All as diffusers' StableDiffusionControlNetImg2ImgPipeline and StableDiffusionControlNetInpaintPipeline
do, with the same generator draws in the same order (then the scheduler's own, for ancestral ones):

    img2img   the init image's VAE sample, the noise
    inpaint   the init image's VAE sample (4-channel UNet, or strength < 1), the noise, the masked
              image's VAE sample

diffusers draws the masked image's sample for a 4-channel UNet too, and never uses it. The draw is made
here as well, so later draws stay aligned, but the VAE encoder does not run for it. TAESD (AutoencoderTiny)
encodes without a distribution, so with it none of the VAE draws happen, in diffusers as here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_strength(strength, mode: str, steps: int, default: float | None) -> float | None:
    """The strength for `mode` (None: `default`, the family's pipeline's: engine/families.py), checked before any
    model work."""
    if mode == "txt2img":
        if strength is not None:
            raise ValueError(f"strength={strength!r} needs an init_image (img2img or inpaint); leave it unset for "
                             "text to image")
        return None
    if strength is None:
        strength = default
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be a number with 0 < strength <= 1, got {strength!r}")
    if int(steps * strength) < 1:
        raise ValueError(f"strength {strength} of num_inference_steps {steps} keeps no step "
                         f"(int({steps} * {strength}) = 0): raise strength or num_inference_steps")
    return float(strength)


def kept_timesteps(sched, steps: int, strength: float | None) -> torch.Tensor:
    """The timesteps that run: all for txt2img; for a strength, diffusers' get_timesteps (the last
    int(steps * strength) of them, the scheduler told where it begins)."""
    if strength is None:
        return sched.timesteps
    t_start = max(steps - min(int(steps * strength), steps), 0)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    return sched.timesteps[t_start * sched.order:]


def _vae_sample(backend, pixels: torch.Tensor, generator, vae) -> torch.Tensor:
    """diffusers' retrieve_latents(vae.encode(pixels), generator) * scaling_factor: a sample of the
    distribution, or TAESD's latents as they are, with no draw (engine/vaes.py)."""
    from diffusers.utils.torch_utils import randn_tensor

    mean, std = backend.encode_image(pixels, vae.name)
    if std is None:
        return vae.scaling_factor * mean
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return vae.scaling_factor * (mean + std * noise)


def _skip_vae_sample(latent_shape: tuple, generator, vae) -> None:
    """The generator draw of a VAE sample whose encode is not needed (see the module docstring); TAESD's
    encode draws nothing."""
    from diffusers.utils.torch_utils import randn_tensor

    if not vae.tiny:
        randn_tensor((1, *latent_shape[1:]), generator=generator, device=torch.device("cpu"), dtype=torch.float32)


@dataclass
class Inpainting:
    """The mask (latent size, 0/1, one per image) and what the loop does with it each step."""

    mask: torch.Tensor  # (batch, 1, h, w)
    masked_latents: torch.Tensor | None  # 9-channel UNet: the masked image's latents, (batch, 4, h, w)
    image_latents: torch.Tensor | None  # 4-channel UNet: the init image's latents, for the re-blend
    noise: torch.Tensor  # the start noise, re-used to noise the init latents to each next step

    def unet_input(self, model_input: torch.Tensor) -> torch.Tensor:
        """A 9-channel UNet's input: the latents, then the mask and the masked-image latents (CFG-doubled
        like the latents); a 4-channel UNet's input is the latents."""
        if self.masked_latents is None:
            return model_input
        copies = model_input.shape[0] // self.mask.shape[0]
        return torch.cat([model_input, torch.cat([self.mask] * copies), torch.cat([self.masked_latents] * copies)], dim=1)

    def blend(self, sched, latents: torch.Tensor, timesteps: torch.Tensor, i: int) -> torch.Tensor:
        """After step i of a 4-channel UNet: keep the new latents inside the mask, the init latents
        (noised to the next step, clean after the last) outside it."""
        if self.image_latents is None:
            return latents
        init = self.image_latents
        if i < len(timesteps) - 1:
            init = sched.add_noise(init, self.noise, torch.tensor([timesteps[i + 1]]))
        return (1 - self.mask) * init + self.mask * latents


def start_latents(backend, sched, generator, latent_shape: tuple, timesteps: torch.Tensor, strength: float | None,
                  init_pixels: torch.Tensor | None, mask_pixels: torch.Tensor | None, unet_channels: int,
                  vae, device) -> tuple[torch.Tensor, Inpainting | None]:
    """The loop's start latents and, for inpainting, the mask's part in it. `init_pixels` (1, 3, H, W) in
    [-1, 1] and `mask_pixels` (1, 1, H, W) binarised, as diffusers' image and mask processors give them;
    `vae` the engine.vaes.VaeInfo of the VAE that encodes."""
    from diffusers.utils.torch_utils import randn_tensor

    batch = latent_shape[0]
    if init_pixels is None:  # txt2img
        noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
        return noise * sched.init_noise_sigma, None
    first = timesteps[:1].repeat(batch)
    if mask_pixels is None:  # img2img
        image_latents = _vae_sample(backend, init_pixels, generator, vae).to(device)
        image_latents = torch.cat([image_latents] * (batch // image_latents.shape[0]))
        noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
        return sched.add_noise(image_latents, noise, first), None
    reblend = unet_channels == latent_shape[1]
    image_latents = None
    if reblend or strength < 1.0:
        image_latents = _vae_sample(backend, init_pixels, generator, vae).to(device)
        image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)
    noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
    if strength == 1.0:
        latents = noise * sched.init_noise_sigma
    else:
        latents = sched.add_noise(image_latents, noise, first)
    mask = torch.nn.functional.interpolate(mask_pixels, size=latent_shape[2:]).to(device)
    masked_latents = None
    if reblend:
        _skip_vae_sample(latent_shape, generator, vae)
    else:
        masked = init_pixels * (mask_pixels < 0.5)
        masked_latents = _vae_sample(backend, masked, generator, vae).to(device)
        masked_latents = masked_latents.repeat(batch // masked_latents.shape[0], 1, 1, 1)
    mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
    return latents, Inpainting(mask, masked_latents, image_latents if reblend else None, noise)

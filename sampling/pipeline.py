"""Text -> images with an SDXL bundle: `generate(model, prompts, ...)`.

The steps of the reference StableDiffusionXLPipeline (zeroed empty negatives, micro-conditioning, scaled initial
noise, CFG on one batched UNet call, the scheduler's sigmas, VAE decode) over the sampler functions of
`sdxl.samplers`. Image i's noise comes from its own seed: a batch equals its prompts made one by one, on any device.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from sdxl.samplers import cfg_denoiser


def micro_conditioning(num_ids: int, height: int, width: int, aesthetic_score: float) -> list[float]:
    """SDXL's size conditioning: base (orig_h, orig_w, crop_top, crop_left, target_h, target_w);
    refiner (orig_h, orig_w, crop_top, crop_left, aesthetic_score). Original = target = output size, crop 0."""
    if num_ids == 5:
        return [height, width, 0, 0, aesthetic_score]
    return [height, width, 0, 0, height, width]


def image_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Unit-variance noise, one CPU generator per image: identical on every device and batch composition."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL, rounded as the reference pipeline's postprocessing."""
    arr = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy())) for a in arr]


@torch.no_grad()
def generate(model, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
             height: int = 1024, width: int = 1024, steps: int = 30, guidance_scale: float = 5.0,
             sampler: str = "euler", seed: int | Sequence[int] = 0, latents: torch.Tensor | None = None, *,
             guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
             clip_skip: int | None = None, spacing: str = "leading", eta: float | None = None,
             aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, output_type: str = "pil",
             callback=None):
    """Images for `prompts` (a string or a list), from any model family (`sdxl.load_model`).

    seed: an int gives image i the seed `seed + i`; a list gives each image's seed. latents: unit-variance
    noise in model space (B, 4, H/8, W/8 for a latent SDXL) instead, as the reference pipeline's `latents`.
    guidance_interval: (lo, hi) in model timesteps (0..1000): guidance only there (default: the model's).
    sampler: a name of `sdxl.samplers.sampler_names()` the model accepts. output_type: "pil" (list of PIL images),
    "pt" (tensor in [-1, 1]) or "latent" (model space, e.g. unscaled latents).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    B = len(prompts)
    shape = model.space(height, width)
    fn, schedule = model.sampling(sampler, steps, spacing=spacing)
    params = inspect.signature(fn).parameters
    if eta is not None and "eta" not in params:
        raise ValueError(f"eta does not apply to sampler {sampler!r}")
    unet = model.unet
    device, dtype = unet.device, unet.dtype
    seeds = [seed + i for i in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
    if latents is None:
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} prompts")
        latents = image_noise(seeds, shape)
    if tuple(latents.shape) != (B, *shape):
        raise ValueError(f"latents must have shape {(B, *shape)}, got {tuple(latents.shape)}")

    ctx, pooled, neg_ctx, neg_pooled = model.text.encode_pair(prompts, negative_prompt, clip_skip)
    n_ids = unet.config.num_time_ids
    ids = torch.tensor([micro_conditioning(n_ids, height, width, aesthetic_score)] * B, device=device)
    neg_ids = torch.tensor([micro_conditioning(n_ids, height, width, negative_aesthetic_score)] * B, device=device)
    # Both CFG branches in one UNet call, negative first as in the reference.
    both = (torch.cat([neg_ctx, ctx]).to(device, dtype), torch.cat([neg_pooled, pooled]).to(device, dtype),
            torch.cat([neg_ids, ids]).to(device, dtype))

    def unet_cond(x_in, t):
        return unet(x_in.to(dtype), t, ctx.to(device, dtype), pooled.to(device, dtype), ids.to(dtype)).float()

    def unet_both(x_in, t):
        return unet(x_in.to(dtype), t, *both).float()

    # As the reference: no guidance at all (one UNet branch) when guidance_scale <= 1.
    guided = cfg_denoiser(unet_cond, scale=max(guidance_scale, 1.0), batched_fn=unet_both, rescale=guidance_rescale,
                          interval=guidance_interval or model.guidance_interval)
    denoiser = model.denoiser(guided, schedule)

    x = latents.to(device, torch.float32) * schedule.init_noise_sigma
    kwargs = {"callback": callback, **({"eta": eta} if eta is not None else {})}
    if "noise_sampler" in params:
        # Stochastic samplers: per-image generators again, continuing from seeds offset by a constant.
        gens = [torch.Generator().manual_seed(s + 0x5EED) for s in seeds]
        kwargs["noise_sampler"] = lambda s, s_next: torch.cat(
            [torch.randn((1, *shape), generator=g) for g in gens]).to(device)
    # Sigmas stay on the CPU: 0-d CPU tensors mix freely with device tensors, and reading one per step
    # (for the timestep lookup) then costs no device sync.
    x = fn(denoiser, x, schedule.sigmas, **kwargs) * schedule.final_scale
    if output_type == "latent":
        return x
    images = model.decode(x)
    return images if output_type == "pt" else to_pil(images)

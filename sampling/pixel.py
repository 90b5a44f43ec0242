"""Text -> images with a pixel-space SDXL (`sdxl.patch_codec.PixelSDXL`): `generate_pixel(model, prompts, ...)`.

Same arguments as `sampling.pipeline.generate`. The model brings its own parameterisation and schedule: the net
predicts x0 directly, so the denoiser is the net itself, denoiser(x, s) = net(x, timestep 1000 s) with s = 1 - t
(`PixelSDXL.to_timestep`), over `flow_sigmas(steps, config.flow_shift)`; "euler" / "heun" are the flow Euler /
Heun steps (Heun's last step is Euler, as JiT). Initial noise: unit noise * config.noise_scale.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sdxl.samplers import cfg_denoiser, flow_sigmas, sample_flow_euler, sample_flow_heun

from .pipeline import initial_noise, micro_conditioning, to_pil

PIXEL_SAMPLERS = {"euler": sample_flow_euler, "heun": sample_flow_heun,
                  "flow_euler": sample_flow_euler, "flow_heun": sample_flow_heun}


@torch.no_grad()
def generate_pixel(model, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                   height: int = 1024, width: int = 1024, steps: int = 50, guidance_scale: float = 5.0,
                   sampler: str = "heun", seed: int | Sequence[int] = 0, latents: torch.Tensor | None = None, *,
                   guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
                   output_type: str = "pil", callback=None, **unused):
    """Images for `prompts` from a pixel model.

    latents: unit-variance noise (B, 3, H, W) instead of the seeded noise. guidance_interval: (lo, hi) in model
    timesteps (0..1000, i.e. 1000 s); default the model's JiT interval (CFG for t in config.guidance_interval).
    Latent-only options (guidance_rescale, spacing, eta, aesthetic scores) are accepted and ignored.
    output_type: "pil" or "pt" (tensor in [-1, 1]).
    """
    if sampler not in PIXEL_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} does not apply to a pixel model; known: {', '.join(PIXEL_SAMPLERS)}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    B = len(prompts)
    cfg, unet = model.config, model.unet
    m = cfg.size_multiple
    if height % m or width % m or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} must be positive multiples of {m} "
                         f"(patch {cfg.patch_size} times the body's downsampling)")
    device, dtype = unet.device, unet.dtype
    shape = (3, height, width)
    latents = initial_noise(seed, latents, B, shape)

    ctx, pooled, neg_ctx, neg_pooled = model.text.encode_pair(prompts, negative_prompt, clip_skip)
    ids = torch.tensor([micro_conditioning(unet.config.unet.num_time_ids, height, width, 6.0)] * B, device=device)
    cond = (ctx.to(device, dtype), pooled.to(device, dtype), ids.to(dtype))
    both = (torch.cat([neg_ctx, ctx]).to(device, dtype), torch.cat([neg_pooled, pooled]).to(device, dtype),
            torch.cat([ids, ids]).to(dtype))

    def net_cond(x, s):  # already a denoiser: the net predicts x0
        return unet(x.to(dtype), model.to_timestep(s), *cond).float()

    def net_both(x, s):
        return unet(x.to(dtype), model.to_timestep(s), *both).float()

    if guidance_interval is None:  # JiT t in (lo, hi) -> s = 1 - t in (1 - hi, 1 - lo)
        s_interval = (1.0 - cfg.guidance_interval[1], 1.0 - cfg.guidance_interval[0])
    else:
        s_interval = (guidance_interval[0] / 1000.0, guidance_interval[1] / 1000.0)
    denoiser = cfg_denoiser(net_cond, scale=max(guidance_scale, 1.0), batched_fn=net_both, interval=s_interval)
    sigmas = flow_sigmas(steps, cfg.flow_shift).sigmas.to(device)
    x = latents.to(device, torch.float32) * cfg.noise_scale
    images = PIXEL_SAMPLERS[sampler](denoiser, x, sigmas, callback=callback)
    return images if output_type == "pt" else to_pil(images)

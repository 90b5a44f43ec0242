"""Text (and images) -> images with an SDXL bundle: `generate(model, prompts, ...)`.

The steps of the reference StableDiffusionXLPipeline (zeroed empty negatives, micro-conditioning, scaled initial
noise, CFG on one batched UNet call, the scheduler's sigmas, VAE decode) over the sampler functions of
`sdxl.samplers`. Image i's noise comes from its own seed: a batch equals its prompts made one by one, on any device.
Beyond text: the img2img, inpainting and refiner steps of the reference's Img2Img / Inpaint pipelines, all as cuts of
the one sigma schedule (the samplers never know):
    img2img   x0 = model.encode(init image) (the VAE posterior mean); the first int(strength * steps) steps of the
              schedule are dropped and sampling starts from model.noised(x0, latents, sigma_start)
    inpaint   a 4-channel model: after every step the known region (mask 0) is set back to x0 noised to the level
              reached (the sampler continues from the x it hands its callback); a 9-channel inpainting UNet takes the
              mask and the masked image's latents as extra input channels instead
    refiner   ensemble of experts: the base samples down to the timestep 1000 (1 - refiner_switch), the refiner
              from there (the reference's denoising_end / denoising_start)
"""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def load_images(images, B: int, height: int, width: int, mask: bool = False) -> torch.Tensor:
    """init_image (RGB in [-1, 1]) or mask_image (one channel, binarized at 0.5 as the reference; white = repaint) as
    (B, C, height, width) float32 on the CPU. `images`: a PIL image or a tensor ((C, H, W) or (n, C, H, W)) for every
    prompt, or a list with one per prompt. PIL images are resized (Lanczos) to the output size, as the reference."""
    C, out = 1 if mask else 3, []
    for im in images if isinstance(images, (list, tuple)) else [images]:
        if isinstance(im, Image.Image):
            im = im.convert("L" if mask else "RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.LANCZOS)
            t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)
            t = t[None] if mask else t.permute(2, 0, 1) * 2 - 1  # (H, W[, 3]) -> (C, H, W), RGB to [-1, 1]
        else:
            t = torch.as_tensor(im, dtype=torch.float32)
        out.append(t.reshape(-1, C, *t.shape[-2:]))  # (C, H, W) | (n, C, H, W) -> (n, C, H, W)
    x = torch.cat(out)
    if tuple(x.shape[-2:]) != (height, width) or len(x) not in (1, B):
        raise ValueError(f"{'mask_image' if mask else 'init_image'}: {len(x)} image(s) of {x.shape[-1]}x"
                         f"{x.shape[-2]} for {B} prompt(s) of {width}x{height}")
    x = x.expand(B, *x.shape[1:])
    return (x >= 0.5).float() if mask else x


def _size(im) -> tuple[int, int]:
    return im.size if isinstance(im, Image.Image) else tuple(torch.as_tensor(im).shape[-1:-3:-1])


def prepare_inpaint(model, init_image, mask_image, B: int, height: int, width: int, takes_mask: bool):
    """(x0, mask in model space or None, an inpainting UNet's extra input channels or None) from the init image
    and mask; `takes_mask`: a model that samples takes them (then mask_image is required)."""
    image = load_images(init_image, B, height, width).to(model.device)
    x0 = model.encode(image)
    if mask_image is None:
        if takes_mask:
            raise ValueError("an inpainting UNet (9 input channels) needs init_image and mask_image")
        return x0, None, None
    pairs = zip(*(x if isinstance(x, (list, tuple)) else [x] for x in (init_image, mask_image)))
    for i, (im, m) in enumerate(pairs):
        if _size(im) != _size(m):
            raise ValueError(f"mask_image {i} is {'x'.join(map(str, _size(m)))}, its init_image "
                             f"{'x'.join(map(str, _size(im)))}: they must have the same size")
    full = load_images(mask_image, B, height, width, mask=True).to(model.device)
    mask = F.interpolate(full, size=x0.shape[-2:])  # nearest, as the reference
    # The inpainting UNet's extra channels: the mask, then the latents of the image with the mask region black.
    return x0, mask, torch.cat([mask, model.encode(image * (full < 0.5))], dim=1) if takes_mask else None


def check_refiner(model, refiner, height: int, width: int, sampler: str = "euler", steps: int = 30,
                  spacing: str = "leading") -> None:
    """A refiner continues the base's sampling: it takes the aesthetic score (5 time ids, as the published refiner)
    and has the base's model space and noise schedule; else a one-line ValueError."""
    if refiner.unet.config.num_time_ids != 5:
        raise ValueError("not a refiner model: its UNet takes no aesthetic score (a base model?)")
    if refiner.space(height, width) != model.space(height, width) or not torch.equal(
            refiner.sampling(sampler, steps, spacing=spacing)[1].sigmas,
            model.sampling(sampler, steps, spacing=spacing)[1].sigmas):
        raise ValueError("the refiner does not share the base model's latent space and noise schedule")


def make_guided_denoiser(model, schedule, prompts, negative_prompt, height: int, width: int, extra, *,
                         guidance_scale, guidance_rescale, guidance_interval, clip_skip, prompt_weighting,
                         aesthetic_score, negative_aesthetic_score):
    """`model`'s denoiser(x, sigma) with CFG over its own text encoders and micro-conditioning; `extra`: channels
    appended to the UNet input (an inpainting UNet's mask and masked-image latents) or None."""
    unet = model.unet
    device, dtype, B = unet.device, unet.dtype, len(prompts)
    ctx, pooled, neg_ctx, neg_pooled = model.text.encode_pair(prompts, negative_prompt, clip_skip,
                                                              weighting=prompt_weighting)
    n_ids = unet.config.num_time_ids
    ids = torch.tensor([micro_conditioning(n_ids, height, width, aesthetic_score)] * B, device=device)
    neg_ids = torch.tensor([micro_conditioning(n_ids, height, width, negative_aesthetic_score)] * B, device=device)
    # Both CFG branches in one UNet call, negative first as in the reference.
    both = (torch.cat([neg_ctx, ctx]).to(device, dtype), torch.cat([neg_pooled, pooled]).to(device, dtype),
            torch.cat([neg_ids, ids]).to(device, dtype))
    ctx, pooled, ids = ctx.to(device, dtype), pooled.to(device, dtype), ids.to(dtype)

    def inputs(x_in):  # the inpainting UNet's extra channels follow the scaled model input, as the reference
        return x_in.to(dtype) if extra is None else torch.cat([x_in, extra.repeat(len(x_in) // B, 1, 1, 1)], 1).to(
            dtype)

    # The sampler gives t as a float: torch.full makes it a device tensor without a host-to-device copy (no sync).
    def unet_cond(x_in, t):
        return unet(inputs(x_in), torch.full((x_in.shape[0],), t, device=device), ctx, pooled, ids).float()

    def unet_both(x_in, t):
        return unet(inputs(x_in), torch.full((x_in.shape[0],), t, device=device), *both).float()

    # As the reference: no guidance at all (one UNet branch) when guidance_scale <= 1.
    guided = cfg_denoiser(unet_cond, scale=max(guidance_scale, 1.0), batched_fn=unet_both, rescale=guidance_rescale,
                          interval=guidance_interval or model.guidance_interval)
    return model.denoiser(guided, schedule)


def plan_steps(schedule, steps: int, strength: float | None, switch: float | None) -> tuple[int, int]:
    """(first, split): sampling runs sigmas[first:], the refiner from sigmas[split:]. first drops the first
    steps - int(strength * steps) steps (the reference's get_timesteps); split is the first step whose timestep is
    below 1000 (1 - switch) (denoising_end / denoising_start)."""
    first = 0
    if strength is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        first = steps - min(int(steps * strength), steps)
        if first == steps:
            raise ValueError(f"strength {strength} with {steps} steps runs no step")
    if switch is None:
        return first, steps
    if not 0 < switch < 1:
        raise ValueError(f"refiner_switch must be in (0, 1), got {switch}")
    cutoff = int(round(1000 - switch * 1000))
    return first, max(first, int((schedule.timesteps >= cutoff).sum()))


class _Switch(Exception):
    """Raised by the step callback to end the base's sampling at the refiner switch, with x."""


@torch.no_grad()
def generate(model, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
             height: int = 1024, width: int = 1024, steps: int = 30, guidance_scale: float = 5.0,
             sampler: str = "euler", seed: int | Sequence[int] = 0, latents: torch.Tensor | None = None, *,
             init_image=None, strength: float = 0.6, mask_image=None, refiner=None, refiner_switch: float = 0.8,
             prompt_weighting: bool = False, guidance_rescale: float = 0.0,
             guidance_interval: tuple[float, float] | None = None, clip_skip: int | None = None,
             spacing: str = "leading", eta: float | None = None, aesthetic_score: float = 6.0,
             negative_aesthetic_score: float = 2.5, output_type: str = "pil", callback=None):
    """Images for `prompts` (a string or a list), from any model family (`sdxl.load_model`).

    seed: an int gives image i the seed `seed + i`; a list gives each image's seed. latents: unit-variance
    noise in model space (B, 4, H/8, W/8 for a latent SDXL) instead, as the reference pipeline's `latents`; with an
    init image, the noise added to it. guidance_interval: (lo, hi) in model timesteps (0..1000): guidance only there
    (default: the model's). sampler: a name of `sdxl.samplers.sampler_names()` the model accepts. output_type: "pil"
    (list of PIL images), "pt" (tensor in [-1, 1]) or "latent" (model space, e.g. unscaled latents).
    init_image: a PIL image, a (B, 3, H, W) tensor in [-1, 1] or a list, one per prompt: img2img, about
    strength * steps steps from the image noised to that level (at 1 with a mask: from pure noise, as the reference
    inpaint pipeline). mask_image: same forms, white (>= 0.5) is repainted, the size of init_image. refiner: a
    refiner model (the same model space) sampling from the timestep 1000 (1 - refiner_switch) on; aesthetic_score /
    negative_aesthetic_score condition a refiner's UNet. prompt_weighting: A1111 emphasis and BREAK (sdxl.prompts).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    B = len(prompts)
    shape = model.space(height, width)
    fn, schedule = model.sampling(sampler, steps, spacing=spacing)
    params = inspect.signature(fn).parameters
    if eta is not None and "eta" not in params:
        raise ValueError(f"eta does not apply to sampler {sampler!r}")
    if mask_image is not None and init_image is None:
        raise ValueError("mask_image needs init_image")
    seeds = [seed + i for i in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
    if latents is None:
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} prompts")
        latents = image_noise(seeds, shape)
    if tuple(latents.shape) != (B, *shape):
        raise ValueError(f"latents must have shape {(B, *shape)}, got {tuple(latents.shape)}")
    if refiner is not None:
        check_refiner(model, refiner, height, width, sampler, steps, spacing)
    first, split = plan_steps(schedule, steps, None if init_image is None else strength,
                              None if refiner is None else refiner_switch)
    noise = latents.to(model.device, torch.float32)
    sigmas = schedule.sigmas.tolist()
    stages = [(m, a, b) for m, a, b in ((model, first, split), (refiner, split, steps)) if m is not None and b > a]
    # The published inpainting layout: latents, mask, masked-image latents (diffusers' 9-channel UNet).
    takes_mask = {id(m): m.unet.config.in_channels == 2 * shape[0] + 1 for m, _, _ in stages}
    x0 = mask = extra = None
    if init_image is None:
        x = noise * schedule.init_noise_sigma
    else:
        x0, mask, extra = prepare_inpaint(model, init_image, mask_image, B, height, width, any(takes_mask.values()))
        pure = mask_image is not None and strength == 1
        x = noise * schedule.init_noise_sigma if pure else model.noised(x0, noise, sigmas[first])

    kwargs = {"eta": eta} if eta is not None else {}
    if "noise_sampler" in params:
        # Stochastic samplers: per-image generators again, continuing from seeds offset by a constant.
        gens = [torch.Generator().manual_seed(s + 0x5EED) for s in seeds]
        kwargs["noise_sampler"] = lambda s, s_next: torch.cat(
            [torch.randn((1, *shape), generator=g) for g in gens]).to(x.device)
    for m, a, b in stages:
        den = make_guided_denoiser(
            m, m.sampling(sampler, steps, spacing=spacing)[1], prompts, negative_prompt, height, width,
            extra if takes_mask[id(m)] else None, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval, clip_skip=clip_skip, prompt_weighting=prompt_weighting,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)

        def on_step(i, x, denoised, a=a, b=b, blend=None if takes_mask[id(m)] else mask):
            j = a + i + 1  # the level just reached
            if blend is not None:  # the known region back, noised to that level (in place)
                known = x0 / schedule.final_scale if j == steps else model.noised(x0, noise, sigmas[j])
                x.copy_((1 - blend) * known + blend * x)
            if callback is not None:
                callback(a - first + i, x, denoised)
            if j == b < steps:
                raise _Switch(x)
        try:  # the sampler sees the schedule to its end (no "final step" at the switch, as the reference)
            x = fn(den, x, schedule.sigmas[a:], callback=on_step, **kwargs)
        except _Switch as stop:
            x = stop.args[0]
    x = x * schedule.final_scale
    if output_type == "latent":
        return x
    images = stages[-1][0].decode(x)  # the model that finished: a refiner decodes with its own VAE, as the reference
    return images if output_type == "pt" else to_pil(images)

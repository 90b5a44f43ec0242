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
    control   ControlNets add their residuals to the UNet's skips and mid block at each step between
              control_guidance_start and _end (the reference's StableDiffusionXLControlNetPipeline; `Control`)
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


def image_noise_sampler(seeds: Sequence[int], shape: tuple[int, ...], device):
    """A stochastic sampler's per-step noise: per-image generators again, continuing from seeds offset by a
    constant."""
    gens = [torch.Generator().manual_seed(s + 0x5EED) for s in seeds]
    return lambda s, s_next: torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL, rounded as the reference pipeline's postprocessing."""
    arr = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy())) for a in arr]


def load_images(images, B: int, height: int, width: int, mask: bool = False, control: bool = False) -> torch.Tensor:
    """init_image (RGB in [-1, 1]), mask_image (one channel, binarized at 0.5 as the reference; white = repaint) or
    control_image (RGB in [0, 1]) as (B, C, height, width) float32 on the CPU. `images`: a PIL image or a tensor
    ((C, H, W) or (n, C, H, W)) for every prompt, or a list with one per prompt. PIL images are resized (Lanczos) to
    the output size, as the reference; control tensors too (nearest, as its control image processor)."""
    C, out = 1 if mask else 3, []
    for im in images if isinstance(images, (list, tuple)) else [images]:
        if isinstance(im, Image.Image):
            im = im.convert("L" if mask else "RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.LANCZOS)
            t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)  # (H, W[, 3]) in [0, 1]
            t = t[None] if mask else t.permute(2, 0, 1) if control else t.permute(2, 0, 1) * 2 - 1  # (C, H, W)
        else:
            t = torch.as_tensor(im, dtype=torch.float32)
            if control and tuple(t.shape[-2:]) != (height, width):
                t = F.interpolate(t.reshape(-1, C, *t.shape[-2:]), size=(height, width))
        out.append(t.reshape(-1, C, *t.shape[-2:]))  # (C, H, W) | (n, C, H, W) -> (n, C, H, W)
    x = torch.cat(out)
    if tuple(x.shape[-2:]) != (height, width) or len(x) not in (1, B):
        raise ValueError(f"{'mask_image' if mask else 'control_image' if control else 'init_image'}: {len(x)} "
                         f"image(s) of {x.shape[-1]}x{x.shape[-2]} for {B} prompt(s) of {width}x{height}")
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


def _per_net(value, n: int, name: str) -> list:
    """One value of a ControlNet argument per net: a list as given, or one value for all."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} ControlNet(s)")
    return values


class Control:
    """ControlNets steering a UNet as the reference's StableDiffusionXLControlNetPipeline: each net's residuals for
    its conditioning image (in [0, 1], both CFG branches), times its scale at step i of the n run, scale * keep[i]
    with keep[i] = 1 - (i / n < start or (i + 1) / n > end), are summed and added to the UNet's skips and mid block.
    A net with global_pool_conditions (shuffle) sees only the conditional branch, as the reference's guess mode."""

    def __init__(self, model, controlnet, control_image, scale, start, end, B: int, height: int, width: int,
                 sigmas: list[float]):
        multi = isinstance(controlnet, (list, tuple))
        nets = list(controlnet) if multi else [controlnet]
        if control_image is None:
            raise ValueError("a ControlNet needs control_image")
        images = _per_net(control_image if multi else [control_image], len(nets), "control_image")
        self.B, self.step, self.nets = B, 0, []
        self.levels = sigmas[1:-1]  # a call at sigma belongs to step i: the run's inner levels >= sigma are i
        n = len(sigmas) - 1
        for net, image, s, a, b in zip(nets, images, *(_per_net(v, len(nets), name) for v, name in (
                (scale, "controlnet_scale"), (start, "control_guidance_start"), (end, "control_guidance_end")))):
            net.check_unet(model.unet)  # one-line CheckpointError (a ValueError): a pixel model, another UNet
            if not 0 <= a < b <= 1:
                raise ValueError(f"control guidance start {a} and end {b}: need 0 <= start < end <= 1")
            keep = [s * (1.0 - float(i / n < a or (i + 1) / n > b)) for i in range(n)]
            self.nets.append((net, load_images(image, B, height, width, control=True).to(model.device), keep))

    def track(self, denoiser):
        """`denoiser` noting the step each call belongs to (from its sigma: the sampler's float, no sync)."""
        def tracked(x, sigma):
            self.step = sum(s >= float(sigma) for s in self.levels)
            return denoiser(x, sigma)
        return tracked

    def residuals(self, x_in: torch.Tensor, t: torch.Tensor, cond: tuple) -> dict:
        """The UNet's residual inputs for x_in (B rows, or 2B: the CFG branches, negative first) and its t and
        (context, pooled, time ids); none when every net is off at this step."""
        down = mid = None
        for net, image, keep in self.nets:
            if not keep[self.step]:  # the reference runs it at scale 0: its residuals add nothing
                continue
            half = net.controlnet_config.global_pool_conditions and len(x_in) > self.B
            x, tt, c = (x_in[self.B:], t[self.B:], [v[self.B:] for v in cond]) if half else (x_in, t, cond)
            d, m = net(x, tt, *c, image.repeat(len(x) // self.B, 1, 1, 1), keep[self.step])
            if half:  # nothing for the negative branch
                d, m = [torch.cat([torch.zeros_like(r), r]) for r in d], torch.cat([torch.zeros_like(m), m])
            down, mid = (d, m) if down is None else ([u + v for u, v in zip(down, d)], mid + m)
        return {} if down is None else {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def text_conditioning(model, prompts, negative_prompt, height: int, width: int, *, clip_skip, prompt_weighting,
                      aesthetic_score, negative_aesthetic_score) -> tuple[tuple, tuple]:
    """The UNet's (context, pooled, time ids) for the prompts, and for both CFG branches (negative first, as the
    reference) on the UNet's device and dtype."""
    unet = model.unet
    device, dtype, B = unet.device, unet.dtype, len(prompts)
    ctx, pooled, neg_ctx, neg_pooled = model.text.encode_pair(prompts, negative_prompt, clip_skip,
                                                              weighting=prompt_weighting)
    n_ids = unet.config.num_time_ids
    ids = torch.tensor([micro_conditioning(n_ids, height, width, aesthetic_score)] * B, device=device)
    neg_ids = torch.tensor([micro_conditioning(n_ids, height, width, negative_aesthetic_score)] * B, device=device)
    both = (torch.cat([neg_ctx, ctx]).to(device, dtype), torch.cat([neg_pooled, pooled]).to(device, dtype),
            torch.cat([neg_ids, ids]).to(device, dtype))
    return (ctx.to(device, dtype), pooled.to(device, dtype), ids.to(dtype)), both


def make_guided_denoiser(model, schedule, prompts, negative_prompt, height: int, width: int, extra, *,
                         guidance_scale, guidance_rescale, guidance_interval, control: Control | None = None,
                         **text_options):
    """`model`'s denoiser(x, sigma) with CFG over its own text encoders and micro-conditioning; `extra`: channels
    appended to the UNet input (an inpainting UNet's mask and masked-image latents) or None; `control`: ControlNets
    adding residuals; text_options: text_conditioning's."""
    unet, B = model.unet, len(prompts)
    cond, both = text_conditioning(model, prompts, negative_prompt, height, width, **text_options)

    def call(x_in, t, c):  # both CFG branches in one call (c = both), or the conditional one
        if extra is not None:  # the inpainting UNet's extra channels follow the scaled model input, as the reference
            x_in = torch.cat([x_in, extra.repeat(len(x_in) // B, 1, 1, 1)], 1)
        # The sampler gives t as a float: torch.full makes it a device tensor without a host-to-device copy (no sync).
        x_in, t = x_in.to(unet.dtype), torch.full((x_in.shape[0],), t, device=unet.device)
        return unet(x_in, t, *c, **({} if control is None else control.residuals(x_in, t, c))).float()

    # As the reference: no guidance at all (one UNet branch) when guidance_scale <= 1.
    guided = cfg_denoiser(lambda x, t: call(x, t, cond), scale=max(guidance_scale, 1.0),
                          batched_fn=lambda x, t: call(x, t, both), rescale=guidance_rescale,
                          interval=guidance_interval or model.guidance_interval)
    denoiser = model.denoiser(guided, schedule)
    return denoiser if control is None else control.track(denoiser)


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
             negative_aesthetic_score: float = 2.5, controlnet=None, control_image=None, controlnet_scale=1.0,
             control_guidance_start=0.0, control_guidance_end=1.0, output_type: str = "pil", callback=None):
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
    controlnet: a ControlNet (sdxl.load_controlnet) for the model's UNet, or a list (their residuals summed), steering
    the model (not a refiner); control_image: as init_image but in [0, 1] (a list of those for a list of nets);
    controlnet_scale, control_guidance_start / _end: a number, or one per net; a net acts on the steps i of the n run
    with start <= i / n and (i + 1) / n <= end, as the reference's StableDiffusionXLControlNetPipeline.
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
    if control_image is not None and controlnet is None:
        raise ValueError("control_image needs a controlnet")
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
    control = None if controlnet is None else Control(
        model, controlnet, control_image, controlnet_scale, control_guidance_start, control_guidance_end, B, height,
        width, sigmas[first:])
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

    kwargs = ({"eta": eta} if eta is not None else {}) | (
        {"noise_sampler": image_noise_sampler(seeds, shape, x.device)} if "noise_sampler" in params else {})
    for m, a, b in stages:
        den = make_guided_denoiser(
            m, m.sampling(sampler, steps, spacing=spacing)[1], prompts, negative_prompt, height, width,
            extra if takes_mask[id(m)] else None, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval, control=control if m is model else None, clip_skip=clip_skip,
            prompt_weighting=prompt_weighting, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score)

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

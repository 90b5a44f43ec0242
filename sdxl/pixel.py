"""Pixel-space SDXL: a patch encoder / decoder around the body of the SDXL UNet (the seed pixel-sdxl).

    x (B, 3, H, W) -> PatchEncoder -> (B, C[k-1], H/P, W/P) -> down_blocks[k:] -> mid_block -> up_blocks[:n-k]
                   -> (B, C[k], H/P, W/P) -> PatchDecoder -> x0 prediction (B, 3, H, W)

The body enters at level k, where the latent UNet holds H/P x W/P tensors (P 16 -> level 1, 64x64 at 1024 px;
P 32 -> level 2). The encoder emits the tensor the latent UNet's level k-1 downsampler hands to level k, which is
also the one skip the body's last up block takes from outside the body, so every skip exists, no zeros are fed,
and the body keeps the latent UNet's parameter names and shapes: `load_body` fills it from any SDXL checkpoint.
Dropped latent keys: conv_in, down_blocks[:k], up_blocks[n-k:], up_blocks[n-1-k].upsamplers, conv_norm_out,
conv_out.

Objective (JiT, arXiv 2511.13720): z = t x + (1 - t) e, t = 1 clean, the net predicts x. The samplers use the SD3
flow convention s = 1 - t (x_s = (1 - s) x + s e, sigma = s) and the net's timestep input is 1000 s, so high
timesteps are noisy as in the latent UNet; `JiTObjective` and `PixelSDXL.denoiser` are where they meet.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import diffusion
from .config import PRESETS, PixelConfig, pixel_config_from_latent
from .samplers import flow_sigmas, make_denoiser, resolve_sampler
from .text_encoders import CLIPTokenizer, DualCLIP
from .unet import ResnetBlock2D, UNet
from .weights import CheckpointError, find_weights, load_into, read_config, read_weights, save_json, save_safetensors

PIXEL_PIPELINE = "SDXLPixelPipeline"  # model_index.json _class_name of a pixel folder
PIXEL_CONFIG = "pixel_config.json"
CODEC = ("encoder.", "decoder.")  # parameter-name prefixes of the patch codec; everything else is the body


# ----------------------------------------------------------------------------------------------------------------
# The codec


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C p p, H/p, W/p): each p x p patch becomes one position's channels."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {W}x{H} is not a multiple of the patch size {p}")
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, H // p, W // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C p p, h, w) -> (B, C, h p, w p), the inverse of `patchify`."""
    B, D, h, w = x.shape
    C = D // (p * p)
    x = x.reshape(B, C, p, p, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


class PatchEncoder(nn.Module):
    """patchify -> 1x1 conv to `hidden` -> residual conv blocks -> GroupNorm, SiLU, 1x1 conv to the body's width."""

    def __init__(self, patch: int, hidden: int, blocks: int, out_ch: int, groups: int, in_ch: int = 3):
        super().__init__()
        self.patch = patch
        self.conv_in = nn.Conv2d(in_ch * patch * patch, hidden, 1)
        self.resnets = nn.ModuleList([ResnetBlock2D(hidden, hidden, None, groups) for _ in range(blocks)])
        self.norm_out = nn.GroupNorm(groups, hidden)
        self.conv_out = nn.Conv2d(hidden, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(patchify(x, self.patch))
        for block in self.resnets:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchDecoder(nn.Module):
    """The encoder mirrored: 1x1 conv from the body's width -> residual conv blocks -> 1x1 conv -> unpatchify."""

    def __init__(self, patch: int, hidden: int, blocks: int, in_ch: int, groups: int, out_ch: int = 3):
        super().__init__()
        self.patch = patch
        self.conv_in = nn.Conv2d(in_ch, hidden, 1)
        self.resnets = nn.ModuleList([ResnetBlock2D(hidden, hidden, None, groups) for _ in range(blocks)])
        self.norm_out = nn.GroupNorm(groups, hidden)
        self.conv_out = nn.Conv2d(hidden, out_ch * patch * patch, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(h)
        for block in self.resnets:
            h = block(h)
        return unpatchify(self.conv_out(F.silu(self.norm_out(h))), self.patch)


# ----------------------------------------------------------------------------------------------------------------
# The pixel UNet


class PixelUNet(UNet):
    """The SDXL UNet body from level k (`UNet(entry_level=k)`) with the patch encoder as its stem and the patch
    decoder as its head: forward(x, timesteps, context, pooled, time_ids) -> x0 prediction (B, 3, H, W)."""

    def __init__(self, cfg: PixelConfig):
        super().__init__(cfg.unet, cfg.entry_level)
        self.pixel_config = cfg
        ch, k, groups = cfg.unet.block_out_channels, cfg.entry_level, cfg.unet.norm_num_groups
        self.encoder = PatchEncoder(cfg.patch_size, cfg.codec_hidden, cfg.codec_blocks, ch[k - 1], groups)
        self.decoder = PatchDecoder(cfg.patch_size, cfg.codec_hidden, cfg.codec_blocks, ch[k], groups)

    def blank(self) -> PixelUNet:
        with torch.device("meta"):
            return PixelUNet(self.pixel_config)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The entry tensor (B, C[k-1], H/P, W/P), also the skip the level-k up block takes from its input side."""
        m = self.pixel_config.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"image size {x.shape[-1]}x{x.shape[-2]} is not a multiple of {m} "
                             f"(patch {self.pixel_config.patch_size} times the body's downsampling)")
        return self.encoder(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h)


@torch.no_grad()
def load_body(unet: PixelUNet, latent_state: dict[str, torch.Tensor], source: str = "latent UNet") -> list[str]:
    """Copy a latent SDXL UNet's body weights (its state dict without the levels outside the body) into `unet`;
    every body parameter must be found with its shape. Returns the names filled."""
    own = unet.state_dict()
    expected = [n for n in own if not n.startswith(CODEC)]
    missing = [n for n in expected if n not in latent_state]
    if missing:
        raise CheckpointError(f"{source}: no {missing[0]!r} for the pixel UNet's body ({len(missing)} missing)")
    for n in expected:
        if tuple(latent_state[n].shape) != tuple(own[n].shape):
            raise CheckpointError(f"{source}: {n!r} has shape {tuple(latent_state[n].shape)}, the body expects "
                                  f"{tuple(own[n].shape)}")
        own[n].copy_(latent_state[n])
    return expected


# ----------------------------------------------------------------------------------------------------------------
# Objectives


def _per_sample(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """One unit-normal tensor of `shape` per generator, stacked (B, *shape), drawn on the generator's device."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


def _jit_timesteps(generators, mode: str, mean: float, std: float, device) -> torch.Tensor:
    return torch.cat([diffusion.sample_timesteps(1, mode, mean=mean, std=std, num_train_timesteps=None,
                                                 generator=g) for g in generators]).to(device)


@dataclass
class JiTObjective:
    """JiT (arXiv 2511.13720): z = t x + (1 - t) e with e ~ N(0, noise_scale^2), t = 1 clean, t drawn logit-normal
    or uniform; the net predicts x at timestep 1000 (1 - t); the loss is the MSE between the velocities
    v = (x - z) / max(1 - t, t_eps) and v_pred = (x_pred - z) / max(1 - t, t_eps), or their huber / smooth_l1
    distance (diffusion.elementwise_loss), the Huber constant scheduled over the noise fraction s = 1 - t and the
    noise level sigma = noise_scale (1 - t) / t of z / t = x + sigma e (diffusion.huber_c_schedule)."""
    noise_scale: float = 1.0
    t_eps: float = 0.05
    timestep_sampling: str = "logit_normal"
    logit_mean: float = -0.8
    logit_std: float = 0.8
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"

    def distance(self, diff: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The element-wise loss of `diff` for samples at t."""
        c = None if self.loss_type == "l2" else diffusion.huber_c_schedule(
            self.huber_schedule, self.huber_c, 1 - t, self.noise_scale * (1 - t) / t)
        return diffusion.elementwise_loss(diff, self.loss_type, c)

    def noisy(self, x: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, t): each sample's noise, then its t, from its own generator."""
        e = _per_sample(generators, x.shape[1:], x.device)
        t = _jit_timesteps(generators, self.timestep_sampling, self.logit_mean, self.logit_std, x.device)
        return t.reshape(-1, 1, 1, 1) * x + (1 - t.reshape(-1, 1, 1, 1)) * self.noise_scale * e, t

    def loss(self, net, x: torch.Tensor, cond: tuple, generators: list[torch.Generator],
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss (B,); `weight` (B, 1, H, W): a loss mask (diffusion.per_sample_mean)."""
        z, t = self.noisy(x, generators)
        x_pred = net(z, 1000 * (1 - t), *cond).float()
        denom = (1 - t).clamp(min=self.t_eps).reshape(-1, 1, 1, 1)
        return diffusion.per_sample_mean(self.distance((x - x_pred) / denom, t), weight)  # v - v_pred


@dataclass
class DistilObjective:
    """Codec distillation from a latent SDXL teacher whose UNet is the body (stage 1 of the pixel recipe).

    The encoder learns the teacher UNet's hidden state at the body's entry (its level k-1 downsampler output) for
    the VAE latent noised to the same signal-to-noise ratio as the pixels at t (t^2 / (1 - t)^2 = abar / (1 - abar));
    the decoder learns to turn the teacher's level-k up-path output into the clean pixels. `side`: encoder |
    decoder | both."""
    teacher: nn.Module
    jit: JiTObjective
    side: str = "both"

    def features(self, pixels, cond, t, generators, level: int):
        unet, vae, got = self.teacher.unet, self.teacher.vae, {}
        n = len(unet.down_blocks)
        hooks = [unet.down_blocks[level - 1].downsamplers[0].register_forward_hook(
                     lambda m, a, out: got.__setitem__("entry", out)),
                 unet.up_blocks[n - 1 - level].upsamplers[0].register_forward_pre_hook(
                     lambda m, a: got.__setitem__("exit", a[0]))]
        try:
            with torch.no_grad():
                lat = vae.encode_latents(pixels.to(vae.dtype))
                abar = (t**2 / (t**2 + (1 - t) ** 2)).clamp(1e-4, 1 - 1e-6)
                if getattr(self, "table", None) is None:  # on the device once, not copied every step
                    self.table = diffusion.get_alphas_cumprod().to(abar.device)
                ddpm_t = (self.table[None] - abar[:, None]).abs().argmin(dim=1).float()  # the nearest SDXL step
                noise = _per_sample(generators, lat.shape[1:], lat.device)
                unet(diffusion.add_noise(lat, noise, abar), ddpm_t, *cond)
        finally:
            for h in hooks:
                h.remove()
        return got["entry"].float(), got["exit"].float()

    def loss(self, net, x: torch.Tensor, cond: tuple, generators: list[torch.Generator],
             weight: torch.Tensor | None = None) -> torch.Tensor:
        z, t = self.jit.noisy(x, generators)
        entry, exit_ = self.features(x, cond, t, generators, net.pixel_config.entry_level)
        loss = x.new_zeros(x.shape[0])
        if self.side in ("encoder", "both"):  # the mask on the body's entry grid
            loss = loss + diffusion.per_sample_mean((net.encoder(z.to(net.dtype)).float() - entry).pow(2), weight)
        if self.side in ("decoder", "both"):
            loss = loss + diffusion.per_sample_mean((net.decoder(exit_.to(net.dtype)).float() - x).pow(2), weight)
        return loss


# ----------------------------------------------------------------------------------------------------------------
# The bundle and its folder


class PixelSDXL(nn.Module):
    """`.unet` (PixelUNet), `.text` (DualCLIP), `.config` (PixelConfig); no VAE. The same surface as
    `sdxl.model.SDXL` (see there); model space is pixel space."""
    family = "pixel"
    # Training options that need a VAE, a latent or a DDPM schedule: with a pixel model each is an error.
    unused_options = {
        "cache_latents": "it has no latents to cache", "vae": "it has no VAE", "vae_precision": "it has no VAE",
        "prediction_type": "it predicts x (JiT)", "min_snr_gamma": "a DDPM loss weight",
        "debiased_estimation": "a DDPM loss weight", "noise_offset": "a DDPM-noise option",
        "zero_terminal_snr": "a DDPM-schedule option", "timestep_range": "a DDPM-timestep option",
        **{f"timestep_bias_{k}": "a DDPM-timestep option" for k in ("strategy", "multiplier", "begin", "end",
                                                                     "portion")},
        "controlnet": "a ControlNet steers a latent UNet"}
    autoencoder = None  # model space is pixel space

    def __init__(self, config: PixelConfig, unet: PixelUNet, text: DualCLIP):
        super().__init__()
        self.config, self.unet, self.text = config, unet, text

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # ---- model space
    def space(self, height: int, width: int) -> tuple[int, int, int]:
        m = self.config.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"image size {width}x{height} must be positive multiples of {m} (patch "
                             f"{self.config.patch_size} times the body's downsampling)")
        return (3, height, width)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    # ---- training
    def objective(self, timestep_sampling=None, logit_mean=None, logit_std=None, teacher=None,
                  train_encoder: str = "both", loss_type: str = "l2", huber_c: float = 0.1,
                  huber_schedule: str = "snr", **unused):
        """JiT's loss (loss_type native = l2, huber or smooth_l1 on the velocity; "velocity" is what it already is),
        or codec distillation from a latent `teacher` (MSE only)."""
        c, loss_type = self.config, "l2" if loss_type == "native" else loss_type
        if loss_type not in diffusion.LOSS_TYPES:
            raise ValueError(f"--loss_type {loss_type} does not apply to a pixel model (its JiT loss is on the "
                             "velocity already): use l2, huber or smooth_l1")
        if teacher is not None and loss_type != "l2":
            raise ValueError(f"--loss_type {loss_type} does not apply to codec distillation (--teacher_checkpoint): "
                             "it is an MSE")
        jit = JiTObjective(c.noise_scale, c.t_eps, timestep_sampling or "logit_normal",
                           c.logit_mean if logit_mean is None else logit_mean,
                           c.logit_std if logit_std is None else logit_std, loss_type, huber_c, huber_schedule)
        if teacher is None:
            return jit
        if getattr(teacher, "family", None) != "latent" or teacher.config.unet != c.unet:
            raise CheckpointError("--teacher_checkpoint must be a latent SDXL whose UNet is the pixel model's body "
                                  f"({c.unet.block_out_channels})")
        return DistilObjective(teacher, jit, train_encoder)

    def param_groups(self, lr: float, teacher=None, train_encoder: str = "both", lr_sdxl_unet_body=None,
                     **unused) -> list[dict]:
        """The recipe's stages: distil (only the chosen codec side, with a teacher), codec (body lr 0), or all."""
        sides = {"encoder": ("encoder.",), "decoder": ("decoder.",)}.get(train_encoder, ("encoder.", "decoder."))
        codec = [p for n, p in self.unet.named_parameters() if n.startswith(sides if teacher else CODEC)]
        body = [p for n, p in self.unet.named_parameters() if not n.startswith(CODEC)]
        body_lr = lr if lr_sdxl_unet_body is None else lr_sdxl_unet_body
        return [{"name": "codec", "params": codec, "lr": lr}] + (
            [{"name": "body", "params": body, "lr": body_lr}] if body_lr > 0 and teacher is None else [])

    # ---- sampling
    def sampling(self, sampler: str, steps: int, spacing: str = "leading", **unused):
        """(sampler function, flow schedule): Euler or Heun over `flow_sigmas`, starting from noise * noise_scale."""
        if sampler not in ("euler", "heun"):
            raise ValueError(f"sampler {sampler!r} does not apply to a pixel model; known: euler, heun")
        if spacing != "leading":
            raise ValueError("timestep spacing does not apply to a pixel model (its schedule is flow_shift's)")
        return resolve_sampler(sampler)[0], flow_sigmas(steps, self.config.flow_shift)._replace(
            init_noise_sigma=self.config.noise_scale)

    @property
    def guidance_interval(self) -> tuple[float, float]:
        """JiT's CFG interval t in (lo, hi) as model timesteps 1000 s = 1000 (1 - t)."""
        lo, hi = self.config.guidance_interval
        return (1000 * (1 - hi), 1000 * (1 - lo))

    def denoiser(self, model_fn, schedule):
        """The net is already a denoiser: x0 = net(x, 1000 s) on the flow scale."""
        return make_denoiser(model_fn, None, "sample", schedule)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0 at flow level s for unit noise: (1 - s) x0 + s noise_scale noise (JiT's z at t = 1 - s)."""
        return (1 - sigma) * x0 + sigma * self.config.noise_scale * noise

    # ---- files
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """model_index.json ("SDXLPixelPipeline"), pixel_config.json, unet/, text_encoder*/, tokenizer*/."""
        folder = Path(folder)
        save_json(self.config.to_dict(), folder / PIXEL_CONFIG)
        save_safetensors(self.unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors")
        self.text.save_pretrained(folder)
        save_json({"_class_name": PIXEL_PIPELINE, "unet": ["sdxl", "PixelUNet"],
                   "text_encoder": ["transformers", "CLIPTextModel"] if self.text.text_encoder is not None
                   else [None, None],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
                  folder / "model_index.json")  # last: a folder with an index is complete

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, merge: bool = True):
        from .lora import load_lora
        return load_lora(self, path, scale, merge)


def is_pixel_folder(folder: str | os.PathLike) -> bool:
    """True for a folder `PixelSDXL.save_pretrained` wrote."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file() or not (folder / PIXEL_CONFIG).is_file():
        return False
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name") == PIXEL_PIPELINE
    except (json.JSONDecodeError, OSError):
        return False


def pixel_preset(name: str, seed: int = 0) -> PixelSDXL:
    """A pixel preset with random weights from `seed`, without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = PRESETS[name]
        model = PixelSDXL(cfg, PixelUNet(cfg), DualCLIP.from_config(cfg.text_encoder, cfg.text_encoder_2))
        if name == "pixel-demo":
            # A random CLIP's token embeddings (std 0.02) make every prompt's context nearly the same, and the
            # UNet then needs hundreds of steps to start reading it; at std 1 colour words stand apart at once.
            for enc in (model.text.text_encoder, model.text.text_encoder_2):
                enc.text_model.embeddings.token_embedding.weight.data.normal_(0, 1)
    return model


def load_pixel_folder(folder: Path, device, dtype) -> PixelSDXL:
    """A folder `PixelSDXL.save_pretrained` wrote."""
    cfg = read_config(folder / PIXEL_CONFIG, PixelConfig.from_dict)
    has_te1 = (folder / "text_encoder").is_dir()
    tok1 = CLIPTokenizer.from_pretrained(folder / "tokenizer") if has_te1 else None
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    with torch.device("meta"):
        model = PixelSDXL(cfg, PixelUNet(cfg), DualCLIP.from_config(cfg.text_encoder if has_te1 else None,
                                                                     cfg.text_encoder_2, tok1, tok2))
    load_into(model.unet, read_weights(find_weights(folder / "unet"), dtype), str(folder / "unet"), device)
    model.text.load_folder(folder, device, dtype)
    return model


def pixel_from_latent(latent, base_resolution: int = 64, **kw) -> PixelSDXL:
    """A pixel SDXL built around a latent SDXL bundle: its UNet body (copied) and its text encoders (shared)."""
    cfg = pixel_config_from_latent(latent.config, base_resolution, **kw)
    unet = PixelUNet(cfg).to(latent.unet.device, latent.unet.dtype)
    load_body(unet, latent.unet.state_dict(), "latent UNet")
    return PixelSDXL(cfg, unet, latent.text)

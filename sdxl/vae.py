"""AutoencoderKL (the SDXL VAE) from scratch, with diffusers' parameter names. The latent scaling lives in
`encode_latents` / `decode_latents`: (z - shift) * scale, and back. Tiling splits only the full-resolution
convolutional half (`Encoder.down`, `Decoder.up`) into overlapping tiles blended linearly; the low-resolution half
(`head`, with global attention) sees the whole image, so tiles agree far better (GroupNorm stats stay per tile)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .unet import Downsample2D, ResnetBlock2D, Upsample2D
from .weights import CheckpointError, find_weights, load_into, read_config, read_state_dict, read_weights

_EPS = 1e-6  # every norm in the VAE


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual (diffusers names)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=_EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q, k, v = (t.unsqueeze(1) for t in (self.to_q(h), self.to_k(h), self.to_v(h)))  # one head
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class VAEMidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, _EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEBlock(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: `n` resnets, then (unless `last`) a 2x down- or upsampler."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, resample: str, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, _EPS)
                                      for i in range(n)])
        layer = Downsample2D(out_ch, asymmetric_pad=True) if resample == "down" else Upsample2D(out_ch)
        setattr(self, f"{resample}samplers", nn.ModuleList([] if last else [layer]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layers in self.children():  # resnets, then the resampler
            for m in layers:
                x = m(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n, g = cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([VAEBlock(ch[max(i - 1, 0)], ch[i], n, g, "down", i == len(ch) - 1)
                                          for i in range(len(ch))])
        self.mid_block = VAEMidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def down(self, x: torch.Tensor) -> torch.Tensor:
        for m in [self.conv_in, *self.down_blocks]:
            x = m(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n, g = cfg.block_out_channels[::-1], cfg.layers_per_block + 1, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([VAEBlock(ch[max(i - 1, 0)], ch[i], n, g, "up", i == len(ch) - 1)
                                        for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.mid_block(self.conv_in(z))

    def up(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)); logvar clamped to [-30, 20] as in the reference."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn on the generator's device (as diffusers' randn_tensor: a CPU
        generator gives the same latents on any device) and moved to the mean's."""
        where = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=where, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        # Memory controls: slicing runs one image at a time; tiling splits images larger than `tile_size` px.
        self.use_slicing = self.use_tiling = False
        self.tile_size, self.tile_overlap = 512, 128  # pixels

    dtype = property(lambda self: self.post_quant_conv.weight.dtype)

    def _tiled(self, fn, x: torch.Tensor, scale: float, tile: int) -> torch.Tensor:
        """`fn` (input size s -> output size s * scale) over tiles of `tile` input pixels, when tiling and x is larger;
        each tile's output weighted by ramps k / (overlap + 1), k = 1..overlap, on each side with a neighbour."""
        if not self.use_tiling or max(x.shape[-2:]) <= tile:
            return fn(x)
        overlap = max(int(tile * self.tile_overlap / self.tile_size), 1)
        stride = tile - overlap
        out_ch = self.config.block_out_channels[-1] if scale < 1 else self.config.out_channels
        B, _, H, W = x.shape
        out = torch.zeros(B, out_ch, int(H * scale), int(W * scale), device=x.device, dtype=torch.float32)
        weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=x.device, dtype=torch.float32)
        starts = lambda n: sorted({min(i, max(n - tile, 0)) for i in range(0, max(n - overlap, 1), stride)})  # noqa
        ys, xs, ov = starts(H), starts(W), int(overlap * scale)

        def ramp(n: int, a: int, b: int) -> torch.Tensor:  # over a outputs at the start and b at the end
            i = torch.arange(n, device=x.device, dtype=torch.float32)
            return torch.minimum((i + 1) / (a + 1), (n - i) / (b + 1)).clamp(max=1)
        for y in ys:
            for x0 in xs:
                part = fn(x[:, :, y:y + tile, x0:x0 + tile]).float()
                oy, ox, oh, ow = int(y * scale), int(x0 * scale), part.shape[2], part.shape[3]
                m = ramp(oh, ov * (y > 0), ov * (y < ys[-1]))[:, None] * ramp(ow, ov * (x0 > 0), ov * (x0 < xs[-1]))
                out[:, :, oy:oy + oh, ox:ox + ow] += part * m
                weight[:, :, oy:oy + oh, ox:ox + ow] += m
        return (out / weight).to(x.dtype)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self._tiled(self.encoder.down, x, 1 / self.config.downsample_factor, self.tile_size)
        return self.quant_conv(self.encoder.head(h))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        f = self.config.downsample_factor
        return self._tiled(self.decoder.up, self.decoder.head(self.post_quant_conv(z)), f, self.tile_size // f)

    def _sliced(self, fn, x: torch.Tensor) -> torch.Tensor:
        # The published SDXL VAE's activations exceed fp16's range (NaN / black images); compute it in fp32.
        if self.dtype == torch.float16 and self.config.force_upcast:
            self.float()
        x = x.to(self.dtype)
        return torch.cat([fn(part) for part in x.split(1)]) if self.use_slicing else fn(x)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> posterior over (B, 4, H/8, W/8) latents."""
        return DiagonalGaussian(self._sliced(self._encode, images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1]."""
        return self._sliced(self._decode, latents)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images -> the UNet's latents (mean - shift_factor) * scaling_factor, float32; the mean: deterministic."""
        return (self.encode(images).mean.float() - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> images, float32: decode(latents / scaling_factor + shift_factor), one image at a time (the
        memory peak at 1024 px; a batch then gives exactly what its images give alone)."""
        sf, shift = self.config.scaling_factor, self.config.shift_factor
        return torch.cat([self.decode(z[None].float() / sf + shift).float() for z in latents])


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             config: VAEConfig | None = None) -> AutoencoderKL:
    """A diffusers `vae/` folder (config.json + weights) or a single VAE .safetensors file in diffusers names
    (e.g. the fp16-fix VAE); a single file is read with `config` (default: the SDXL VAE)."""
    path = Path(path)
    if path.is_dir():
        cfg = read_config(path / "config.json", VAEConfig.from_diffusers)
        files = find_weights(path)
        sd, source = read_weights(files), str(files[0] if len(files) == 1 else path)
    elif path.is_file():
        cfg, sd, source = config or VAEConfig(), read_state_dict(path), str(path)
        if any(k.startswith(("encoder.down.", "first_stage_model.")) for k in sd):
            from .convert import vae_from_original  # original (SGM/ldm) key layout
            sd = vae_from_original(sd)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    return load_into(vae, sd, source, device, dtype)

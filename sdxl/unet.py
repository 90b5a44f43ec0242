"""The SDXL UNet, written from scratch; parameter names are diffusers' UNet2DConditionModel names.

Leaf modules first, the UNet last. Attention goes through F.scaled_dot_product_attention. Shapes: B batch,
C channels, H/W latent height/width, L tokens, D context width.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import UNetConfig
from .weights import CheckpointError, find_weights, load_into, read_config, read_weights


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding: freq_i = max_period^(-i / (dim/2 - freq_shift)); [cos(t f), sin(t f)] if flipped.

    Computed in float32 whatever the model dtype: t * f reaches ~1000 where fp16/bf16 lose the phase.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (N,) -> (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear; used for the time embedding and the "text_time" additional embedding."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding added between; 1x1 conv shortcut on a width change.

    `temb_dim=None` gives the VAE's variant without time conditioning.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor | None = None) -> torch.Tensor:
        """`temb_act` is SiLU(time embedding), computed once per UNet forward rather than once per block."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nn.Module):
    """Multi-head attention; q/k/v without bias, output projection with bias (the diffusers names)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # "to_out.0"; diffusers' to_out.1 is a no-op dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, L, C = x.shape
        # (B, L, C) -> (B, heads, L, C/heads)
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(B, L, C))  # (B, heads, L, c) -> (B, L, C)


class GEGLU(nn.Module):
    """proj: C -> 2 * inner; value * gelu(gate) (the first half is the value, the second the gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Indices match diffusers ("net.0.proj", "net.2"); index 1 is its dropout.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU feed-forward; residual each."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> Linear proj_in -> `depth` transformer blocks over the H*W tokens -> proj_out, + residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int = 32,
                 eps: float = 1e-6):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, C, H, W) -> (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        # (B, HW, C) -> (B, C, H, W) as a strided view: the residual add writes the result in x's layout, so
        # there is no separate .contiguous() copy (and channels_last inputs stay channels_last).
        return x + self.proj_out(h).view(B, H, W, C).permute(0, 3, 1, 2)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The UNet pads 1 on every side; the VAE encoder pads (0, 1, 0, 1) then convolves."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric_pad else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `size`, for odd skip sizes) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def _run(module: nn.Module, ckpt: bool, *args):
    """Call `module`, through activation checkpointing when asked and gradients are being recorded."""
    if ckpt and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class DownBlock(nn.Module):
    """diffusers' DownBlock2D (depth 0) or CrossAttnDownBlock2D: resnets (+ transformers), then a downsampler."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, depth: int, heads: int, add_downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg.time_embed_dim,
                                                    cfg.norm_num_groups, cfg.norm_eps) for i in range(n)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, heads, depth, cfg.cross_attention_dim, cfg.norm_num_groups,
                                cfg.transformer_norm_eps) for _ in range(n)] if depth else [])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if add_downsample else [])
        self.gradient_checkpointing = False

    def forward(self, x, temb_act, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = _run(resnet, self.gradient_checkpointing, x, temb_act)
            if self.attentions:
                x = _run(self.attentions[i], self.gradient_checkpointing, x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """diffusers' UpBlock2D / CrossAttnUpBlock2D: each resnet eats one skip (concatenated on channels)."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, cfg: UNetConfig, depth: int, heads: int,
                 add_upsample: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        # Skip widths, last resnet first: the skip from the level's input side has `in_ch` channels.
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch), out_ch,
                          cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps) for i in range(n)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, heads, depth, cfg.cross_attention_dim, cfg.norm_num_groups,
                                cfg.transformer_norm_eps) for _ in range(n)] if depth else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])
        self.gradient_checkpointing = False

    def forward(self, x, skips, temb_act, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)
            x = _run(resnet, self.gradient_checkpointing, x, temb_act)
            if self.attentions:
                x = _run(self.attentions[i], self.gradient_checkpointing, x, context)
        for up in self.upsamplers:
            x = up(x, upsample_size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(
            ch, cfg.num_attention_heads[-1], cfg.mid_transformer_depth, cfg.cross_attention_dim,
            cfg.norm_num_groups, cfg.transformer_norm_eps)])
        self.gradient_checkpointing = False

    def forward(self, x, temb_act, context):
        x = _run(self.resnets[0], self.gradient_checkpointing, x, temb_act)
        x = _run(self.attentions[0], self.gradient_checkpointing, x, context)
        return _run(self.resnets[1], self.gradient_checkpointing, x, temb_act)


def conditioning(time_embedding: TimestepEmbedding, add_embedding: TimestepEmbedding, cfg: UNetConfig,
                 timesteps: torch.Tensor | float, pooled: torch.Tensor, time_ids: torch.Tensor, B: int, device,
                 dtype: torch.dtype) -> torch.Tensor:
    """SiLU(time embedding + "text_time" embedding): what every resnet's time projection takes."""
    t = torch.as_tensor(timesteps, device=device)
    t = t.expand(B) if t.ndim == 0 else t.reshape(B)
    # Micro-conditioning: each value through its own sinusoidal embedding, then concatenated with pooled text.
    ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                             cfg.freq_shift).reshape(B, -1)  # (B * n_ids, E) -> (B, n_ids * E)
    emb = time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                            cfg.freq_shift).to(dtype))
    emb = emb + add_embedding(torch.cat([pooled.to(dtype), ids.to(dtype)], dim=-1))
    return F.silu(emb)  # every resnet applies SiLU before its time projection; do it once


def run_levels(down_blocks, mid_block: MidBlock, up_blocks, h: torch.Tensor, temb_act: torch.Tensor,
               context: torch.Tensor) -> torch.Tensor:
    """Down blocks (collecting skips, h itself first), the mid block, then up blocks eating the skips."""
    skips = [h]
    for block in down_blocks:
        h, block_skips = block(h, temb_act, context)
        skips += block_skips
    h = mid_block(h, temb_act, context)
    for block in up_blocks:
        block_skips = skips[-len(block.resnets):]
        del skips[-len(block.resnets):]
        # Upsample to the next skip's size so odd latent sizes (e.g. 1000 px / 8 at a lower level) line up.
        h = block(h, block_skips, temb_act, context, skips[-1].shape[-2:] if skips else None)
    return h


class UNet(nn.Module):
    """The SDXL UNet: forward(x, timesteps, context, pooled, time_ids) -> prediction shaped like x."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.add_embedding = TimestepEmbedding(cfg.add_embed_in_dim, cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg, cfg.transformer_depth[i], cfg.num_attention_heads[i],
                      add_downsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], cfg)
        rch, rdepth, rheads = ch[::-1], cfg.transformer_depth[::-1], cfg.num_attention_heads[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], cfg, rdepth[i], rheads[i],
                    add_upsample=i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each resnet and transformer in the backward pass instead of storing its activations."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) latents; timesteps scalar or (B,); context (B, L, D); pooled (B, P); time_ids (B, 6|5)."""
        dtype = self.dtype
        temb_act = conditioning(self.time_embedding, self.add_embedding, self.config, timesteps, pooled, time_ids,
                                x.shape[0], x.device, dtype)
        h = self.conv_in(x.to(dtype))
        h = run_levels(self.down_blocks, self.mid_block, self.up_blocks, h, temb_act, context.to(dtype))
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def load_unet(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              variant: str | None = None) -> UNet:
    """Load a diffusers `unet/` folder: config.json + diffusion_pytorch_model(.fp16).safetensors or shards."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    cfg = read_config(folder / "config.json", UNetConfig.from_diffusers)
    with torch.device("meta"):
        unet = UNet(cfg)
    files = find_weights(folder, variant=variant)
    return load_into(unet, read_weights(files), str(files[0] if len(files) == 1 else folder), device, dtype)

"""The SDXL UNet from scratch, with diffusers' UNet2DConditionModel parameter names; leaf modules first.
Shapes: B batch, C channels, H/W latent height/width, L tokens, D context width."""
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
    Computed in float32 whatever the model dtype: t * f reaches ~1000 where fp16/bf16 lose the phase."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (N,) -> (N, half)
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
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
    """(GroupNorm-SiLU-Conv) x 2, + time embedding between (temb_dim None: the VAE's); 1x1 shortcut on width change."""

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
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)  # (B, L, C) -> (B, heads, L, C/heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(B, L, C))  # (B, heads, L, c) -> (B, L, C)


class FeedForward(nn.Module):
    """GEGLU: value, gate = proj(x).chunk(2); out = Linear(value * gelu(gate))."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # diffusers' names: "net.0.proj" (in its GEGLU module), "net.2"; index 1 is its dropout.
        self.net = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(dim, dim * mult * 2)}), nn.Identity(),
                                  nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.net[0]["proj"](x).chunk(2, dim=-1)
        return self.net[2](value * F.gelu(gate))


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

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)
                                                 for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, C, H, W) -> (B, HW, C)
        for block in self.transformer_blocks:  # checkpointed one block at a time, as diffusers: a depth-10 stack
            h = checkpoint(block, h, context, use_reentrant=False) if self.gradient_checkpointing and \
                torch.is_grad_enabled() else block(h, context)  # never holds all 10 blocks' activations at once
        # (B, HW, C) -> (B, C, H, W) as a strided view: the add writes x's layout (no copy; channels_last stays).
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
        return self.conv(F.interpolate(x, size=size, scale_factor=2.0 if size is None else None, mode="nearest"))


class _Level(nn.Module):
    """Resnets (input widths `in_chs`), the first `n_attn` each followed by a Transformer2DModel of `depth` blocks;
    each runs through activation checkpointing when asked and gradients are being recorded."""

    def __init__(self, in_chs: list[int], out_ch: int, cfg: UNetConfig, depth: int, heads: int, n_attn: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out_ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps)
                                      for c in in_chs])
        self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, depth, cfg.cross_attention_dim,
                                                            cfg.norm_num_groups, cfg.transformer_norm_eps)
                                         for _ in range(n_attn)])
        self.gradient_checkpointing = False

    def _run(self, module: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def layer(self, i: int, x, temb_act, context):  # resnet i, then transformer i (it checkpoints its own blocks)
        x = self._run(self.resnets[i], x, temb_act)
        return self.attentions[i](x, context) if i < len(self.attentions) else x


class DownBlock(_Level):
    """diffusers' DownBlock2D (depth 0) or CrossAttnDownBlock2D: resnets (+ transformers), then a downsampler."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, depth: int, heads: int, add_downsample: bool):
        n = cfg.layers_per_block
        super().__init__([in_ch if i == 0 else out_ch for i in range(n)], out_ch, cfg, depth, heads, n if depth else 0)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if add_downsample else [])

    def forward(self, x, temb_act, context):  # -> (x, its skips: each resnet's output and the downsampler's)
        skips = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb_act, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(_Level):
    """diffusers' UpBlock2D / CrossAttnUpBlock2D: each resnet pops one skip (concatenated on channels)."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, cfg: UNetConfig, depth: int, heads: int,
                 add_upsample: bool):
        n = cfg.layers_per_block + 1
        # Skip widths, last resnet first: the skip from the level's input side has `in_ch` channels.
        super().__init__([(prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch) for i in range(n)],
                         out_ch, cfg, depth, heads, n if depth else 0)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])

    def forward(self, x, skips, temb_act, context, size=None):  # eats `skips` last first; upsamples to `size`
        for i in range(len(self.resnets)):
            x = self.layer(i, torch.cat([x, skips[-1 - i]], dim=1), temb_act, context)
        for up in self.upsamplers:
            x = up(x, size)
        return x


class MidBlock(_Level):
    """UNetMidBlock2DCrossAttn: resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__([ch, ch], ch, cfg, cfg.mid_transformer_depth, cfg.num_attention_heads[-1], 1)

    def forward(self, x, temb_act, context):
        return self.layer(1, self.layer(0, x, temb_act, context), temb_act, context)


class UNetEncoder(nn.Module):
    """The UNet's first half: conv_in, the time and "text_time" embeddings, the down blocks and the mid block. The
    UNet adds the up blocks; the ControlNet (sdxl/controlnet.py) adds its conditioning embedding and zero convs."""

    def __init__(self, cfg: UNetConfig, entry_level: int = 0):
        super().__init__()
        self.config, self.entry_level = cfg, entry_level
        ch, k, n = cfg.block_out_channels, entry_level, len(cfg.block_out_channels)
        if k == 0:
            self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.add_embedding = TimestepEmbedding(cfg.add_embed_in_dim, cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg, cfg.transformer_depth[i], cfg.num_attention_heads[i],
                      add_downsample=i < n - 1) if i >= k else nn.Identity() for i in range(n)])
        self.mid_block = MidBlock(ch[-1], cfg)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each resnet and transformer in the backward pass instead of storing its activations."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled

    dtype = property(lambda self: self.time_embedding.linear_1.weight.dtype)
    device = property(lambda self: self.time_embedding.linear_1.weight.device)

    def embed(self, timesteps: torch.Tensor | float, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SiLU(time embedding + "text_time" embedding) (B, time_embed_dim), what every resnet takes."""
        cfg, dtype, B = self.config, self.dtype, pooled.shape[0]
        # A Python number becomes a device tensor by a fill, not a host-to-device copy (which would sync).
        t = timesteps if isinstance(timesteps, torch.Tensor) else \
            torch.full((B,), float(timesteps), device=pooled.device)
        t = t.expand(B) if t.ndim == 0 else t.reshape(B)
        # Micro-conditioning: each value through its own sinusoidal embedding, then concatenated with pooled text.
        ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                 cfg.freq_shift).reshape(B, -1)  # (B * n_ids, E) -> (B, n_ids * E)
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                     cfg.freq_shift).to(dtype))
        return F.silu(emb + self.add_embedding(torch.cat([pooled.to(dtype), ids.to(dtype)], dim=-1)))

    def encode(self, h: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor):
        """(the mid block's output, the skips: h itself first, then each down resnet's and downsampler's output)."""
        # Blocks take and return their skips (no list shared across blocks: FSDP may copy a block's inputs).
        skips = [h]
        for block in self.down_blocks[self.entry_level:]:
            h, block_skips = block(h, temb_act, context)
            skips += block_skips
        return self.mid_block(h, temb_act, context), skips


class UNet(UNetEncoder):
    """forward(x, timesteps, context, pooled, time_ids) -> prediction shaped like x. entry_level k > 0 (sdxl/pixel.py):
    only the body from level k; down_blocks[:k] are parameter-free placeholders (keeping the latent UNet's indices),
    up_blocks the first n - k levels; conv_in / conv_out are left to a subclass's `stem` / `head`."""

    def __init__(self, cfg: UNetConfig, entry_level: int = 0):
        super().__init__(cfg, entry_level)
        ch, k, n = cfg.block_out_channels, entry_level, len(cfg.block_out_channels)
        rch, rdepth, rheads = ch[::-1], cfg.transformer_depth[::-1], cfg.num_attention_heads[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], cfg, rdepth[i], rheads[i],
                    add_upsample=i < n - 1 - k) for i in range(n - k)])
        if k == 0:
            self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
            self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def blank(self) -> UNet:
        """The same network on the meta device (no memory): for plans and for gathering sharded weights."""
        with torch.device("meta"):
            return UNet(self.config, self.entry_level)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_in(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                pooled: torch.Tensor, time_ids: torch.Tensor,
                down_block_additional_residuals: list[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents; timesteps scalar or (B,); context (B, L, D); pooled (B, P); time_ids (B, 6|5).
        The residuals (a ControlNet's) are added to the skips and to the mid block's output, as diffusers does."""
        temb_act = self.embed(timesteps, pooled, time_ids)
        context = context.to(self.dtype)
        h, skips = self.encode(self.stem(x.to(self.dtype)), temb_act, context)
        if down_block_additional_residuals is not None:  # the skips only: the mid block already took h
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"{len(down_block_additional_residuals)} down residuals for {len(skips)} skips")
            skips = [s + r.to(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.to(h.dtype)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size so odd sizes (e.g. 1000 px / 8 at a lower level) line up.
            h = block(h, block_skips, temb_act, context, skips[-1].shape[-2:] if skips else None)
        return self.head(h)


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


COMPILE_BACKEND = "inductor"  # tests swap in a cheaper backend


def compile_unet(unet: nn.Module, scope: str = "unet") -> nn.Module:
    """torch.compile `unet` in place, its state-dict names unchanged. scope "unet": one graph for the whole network
    (fullgraph; the most fusion). "blocks": each transformer and ResNet block on its own (regional: a fraction of
    the compile time, and between blocks DDP overlaps its gradient all-reduce with the backward). Compile after
    LoRA is attached or merged. A second bucket shape marks the changed dims dynamic (dynamo's automatic dynamic
    shapes), so bucketed training compiles each region at most twice per distinct layer shape."""
    if scope == "unet":
        unet.compile(fullgraph=True, backend=COMPILE_BACKEND)
    elif scope == "blocks":
        # Every ResNet shape of SDXL (about 15: channels change along the path) shares one code object's cache.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for m in unet.modules():
            if isinstance(m, (BasicTransformerBlock, ResnetBlock2D)):
                m.compile(fullgraph=True, backend=COMPILE_BACKEND)
    else:
        raise ValueError(f"unknown compile scope {scope!r}; known: unet, blocks")
    return unet

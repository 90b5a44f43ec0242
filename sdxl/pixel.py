"""Pixel-space SDXL: a patch encoder / decoder around the body of the SDXL UNet (the seed pixel-sdxl).

    x (B, 3, H, W) -> PatchEncoder -> (B, C[k-1], H/P, W/P) -> down_blocks[k:] -> mid_block -> up_blocks[:n-k]
                   -> (B, C[k], H/P, W/P) -> PatchDecoder -> x0 prediction (B, 3, H, W)

The body enters at level k, where the latent UNet holds H/P x W/P tensors (P = 8 * 2^k for SDXL's 8x VAE: P 16
-> level 1, 64x64 at 1024 px; P 32 -> level 2, 32x32). The encoder emits exactly the tensor the latent UNet's
level k-1 downsampler hands to level k (C[k-1] channels: 320 at level 1 of sdxl-base). That tensor is also the one
skip the body's last up block takes from outside the body (the latent UNet's "input side" skip of level k), so
every skip the body needs exists, no zeros are fed, and the body's parameter names and shapes are those of the
latent UNet: `load_body` fills it from any SDXL checkpoint. The up block at level k loses its upsampler; the
decoder reads its output (C[k] channels: 640 at level 1). Dropped latent keys: conv_in, down_blocks[:k],
up_blocks[n-k:], up_blocks[n-1-k].upsamplers, conv_norm_out, conv_out.

Objective (JiT, arXiv 2511.13720): z = t x + (1 - t) e, t = 1 clean, the net predicts x (see training/pixel.py).
The samplers use the SD3 flow convention s = 1 - t (x_s = (1 - s) x + s e, sigma = s); the net's timestep input is
1000 s, so high timesteps are noisy as in the latent UNet. `PixelSDXL.denoiser` is the one place they meet.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIP_BIGG, CLIP_L, TINY, TextEncoderConfig, UNetConfig
from .text_encoders import CLIPTokenizer, DualCLIP
from .unet import DownBlock, MidBlock, ResnetBlock2D, TimestepEmbedding, UpBlock, conditioning, run_levels
from .weights import CheckpointError, find_weights, load_into, read_json, read_weights, save_json, save_safetensors

PIXEL_PIPELINE = "SDXLPixelPipeline"  # model_index.json _class_name of a pixel folder
PIXEL_CONFIG = "pixel_config.json"


@dataclass(frozen=True)
class PixelConfig:
    """A pixel SDXL: the latent UNet config whose body it uses, the codec, the text towers and the objective."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    patch_size: int = 16
    entry_level: int = 1  # the body starts at down_blocks[entry_level]
    codec_hidden: int = 512
    codec_blocks: int = 3
    text_encoder: TextEncoderConfig | None = field(default_factory=lambda: CLIP_L)  # None: bigG only
    text_encoder_2: TextEncoderConfig = field(default_factory=lambda: CLIP_BIGG)
    # JiT objective and sampling defaults
    noise_scale: float = 1.0  # e ~ N(0, noise_scale^2): 1 at 256 px, 2 at 512 px in JiT
    t_eps: float = 0.05  # velocity = (x - z) / max(1 - t, t_eps)
    logit_mean: float = -0.8
    logit_std: float = 0.8
    flow_shift: float = 1.0  # sampling schedule s' = k s / (1 + (k - 1) s)
    guidance_interval: tuple[float, float] = (0.1, 1.0)  # CFG only for t in this range (JiT t, 1 = clean)

    def __post_init__(self):
        n = len(self.unet.block_out_channels)
        if not 1 <= self.entry_level <= n - 1:
            raise ValueError(f"entry_level must be in [1, {n - 1}], got {self.entry_level}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")

    @property
    def entry_channels(self) -> int:
        return self.unet.block_out_channels[self.entry_level - 1]

    @property
    def exit_channels(self) -> int:
        return self.unet.block_out_channels[self.entry_level]

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the patch times the body's own downsampling."""
        return self.patch_size * 2 ** (len(self.unet.block_out_channels) - 1 - self.entry_level)

    def replace(self, **changes) -> "PixelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PixelConfig":
        tup = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}  # noqa: E731
        d = tup(d)
        d["unet"] = UNetConfig(**tup(d["unet"]))
        d["text_encoder"] = TextEncoderConfig(**d["text_encoder"]) if d.get("text_encoder") else None
        d["text_encoder_2"] = TextEncoderConfig(**d["text_encoder_2"])
        return cls(**d)


def patch_for_base_resolution(base_resolution: int) -> tuple[int, int]:
    """`--base_resolution 64|32` (the body's entry side at 1024 px) -> (patch size, entry level), as the seed."""
    table = {64: (16, 1), 32: (32, 2)}
    if base_resolution not in table:
        raise ValueError(f"base_resolution must be 64 or 32, got {base_resolution}")
    return table[base_resolution]


def pixel_config_from_latent(unet: UNetConfig, text_encoder: TextEncoderConfig | None,
                             text_encoder_2: TextEncoderConfig, base_resolution: int = 64, **kw) -> PixelConfig:
    """The pixel model whose body is the given latent UNet's (the seed's codec widths: 512 at P 16, 768 at P 32)."""
    patch, level = patch_for_base_resolution(base_resolution)
    hidden = kw.pop("codec_hidden", 512 if patch == 16 else 768)
    if unet.block_out_channels[0] < 320:  # a tiny test UNet: keep the codec as small
        hidden = min(hidden, 4 * unet.block_out_channels[0])
    return PixelConfig(unet=unet, patch_size=patch, entry_level=level, codec_hidden=hidden,
                       codec_blocks=kw.pop("codec_blocks", 3 if patch == 16 else 4), text_encoder=text_encoder,
                       text_encoder_2=text_encoder_2, **kw)


# The built-in demo: ~2M parameters, 64 px images in 16 px patches (4x4 at the body's entry, 2x2 below), small
# enough to train on two CPU cores in minutes.
DEMO = PixelConfig(
    unet=UNetConfig(block_out_channels=(32, 64, 64), layers_per_block=1, transformer_depth=(0, 1, 1),
                    mid_transformer_depth=1, num_attention_heads=(1, 2, 2), cross_attention_dim=64, pooled_dim=32,
                    addition_time_embed_dim=8, norm_num_groups=16, sample_size=8),
    patch_size=16, entry_level=1, codec_hidden=128, codec_blocks=1,
    text_encoder=TINY.text_encoder, text_encoder_2=TINY.text_encoder_2,
)
PIXEL_PRESETS: dict[str, PixelConfig] = {
    "pixel-demo": DEMO,
    "pixel-tiny": pixel_config_from_latent(TINY.unet, TINY.text_encoder, TINY.text_encoder_2, 64),
}


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


class PixelUNet(nn.Module):
    """encoder + SDXL UNet body + decoder: forward(x, timesteps, context, pooled, time_ids) -> x0 prediction.

    down_blocks keeps the latent UNet's indices (levels below the entry are parameter-free placeholders) and
    up_blocks its first n - k entries, so body keys equal the latent UNet's.
    """

    def __init__(self, cfg: PixelConfig):
        super().__init__()
        self.config = cfg
        ucfg, k = cfg.unet, cfg.entry_level
        ch = ucfg.block_out_channels
        n = len(ch)
        groups = ucfg.norm_num_groups
        self.encoder = PatchEncoder(cfg.patch_size, cfg.codec_hidden, cfg.codec_blocks, ch[k - 1], groups)
        self.time_embedding = TimestepEmbedding(ch[0], ucfg.time_embed_dim)
        self.add_embedding = TimestepEmbedding(ucfg.add_embed_in_dim, ucfg.time_embed_dim)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], ucfg, ucfg.transformer_depth[i], ucfg.num_attention_heads[i],
                      add_downsample=i < n - 1) if i >= k else nn.Identity() for i in range(n)])
        self.mid_block = MidBlock(ch[-1], ucfg)
        rch, rdepth, rheads = ch[::-1], ucfg.transformer_depth[::-1], ucfg.num_attention_heads[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], ucfg, rdepth[i], rheads[i],
                    add_upsample=i < n - 1 - k) for i in range(n - k)])
        self.decoder = PatchDecoder(cfg.patch_size, cfg.codec_hidden, cfg.codec_blocks, ch[k], groups)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled

    def codec_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def body_parameters(self) -> list[nn.Parameter]:
        codec = {id(p) for p in self.codec_parameters()}
        return [p for p in self.parameters() if id(p) not in codec]

    def embed(self, timesteps, pooled: torch.Tensor, time_ids: torch.Tensor, B: int, device) -> torch.Tensor:
        """SiLU(time embedding + text_time embedding), as the latent UNet computes it."""
        return conditioning(self.time_embedding, self.add_embedding, self.config.unet, timesteps, pooled, time_ids,
                            B, device, self.dtype)

    def body(self, h: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet body from the entry tensor (B, C[k-1], h, w) to the up path's level-k output (B, C[k], h, w).
        The entry tensor is also the skip the level-k up block takes from its input side."""
        return run_levels(self.down_blocks[self.config.entry_level:], self.mid_block, self.up_blocks, h, temb_act,
                          context)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) noisy pixels; timesteps 1000 s (s = 1 - t, 0 clean); -> x0 prediction (B, 3, H, W)."""
        m = self.config.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"image size {x.shape[-1]}x{x.shape[-2]} is not a multiple of {m} "
                             f"(patch {self.config.patch_size} times the body's downsampling)")
        temb_act = self.embed(timesteps, pooled, time_ids, x.shape[0], x.device)
        h = self.body(self.encoder(x.to(self.dtype)), temb_act, context.to(self.dtype))
        return self.decoder(h)


def body_keys(unet_state: dict[str, torch.Tensor], cfg: PixelConfig) -> dict[str, torch.Tensor]:
    """The entries of a latent UNet state dict that belong to the pixel UNet's body."""
    k, n = cfg.entry_level, len(cfg.unet.block_out_channels)
    drop = ("conv_in.", "conv_norm_out.", "conv_out.", *(f"down_blocks.{i}." for i in range(k)),
            *(f"up_blocks.{i}." for i in range(n - k, n)), f"up_blocks.{n - 1 - k}.upsamplers.")
    return {name: v for name, v in unet_state.items() if not name.startswith(drop)}


@torch.no_grad()
def load_body(unet: PixelUNet, latent_state: dict[str, torch.Tensor], source: str = "latent UNet") -> list[str]:
    """Copy a latent SDXL UNet's body weights into `unet`; every body parameter must be found with its shape.
    Returns the names filled."""
    body = body_keys(latent_state, unet.config)
    own = unet.state_dict()
    expected = [n for n in own if not n.startswith(("encoder.", "decoder."))]
    missing = [n for n in expected if n not in body]
    if missing:
        raise CheckpointError(f"{source}: no {missing[0]!r} for the pixel UNet's body ({len(missing)} missing)")
    for n in expected:
        if tuple(body[n].shape) != tuple(own[n].shape):
            raise CheckpointError(f"{source}: {n!r} has shape {tuple(body[n].shape)}, the body expects "
                                  f"{tuple(own[n].shape)}")
        own[n].copy_(body[n])
    return expected


# ----------------------------------------------------------------------------------------------------------------
# The bundle and its folder


class PixelSDXL(nn.Module):
    """`.unet` (PixelUNet), `.text` (DualCLIP), `.config` (PixelConfig); no VAE."""
    is_pixel = True

    def __init__(self, config: PixelConfig, unet: PixelUNet, text: DualCLIP):
        super().__init__()
        self.config, self.unet, self.text = config, unet, text

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Sampler noise level s (x_s = (1 - s) x + s e) -> the net's timestep input 1000 s (JiT t = 1 - s)."""
        return sigma * 1000.0

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


def build_pixel_model(cfg: PixelConfig, text: DualCLIP | None = None) -> PixelSDXL:
    """Random init on the current default device; `text` reuses existing towers (e.g. a latent model's)."""
    if text is None:
        text = DualCLIP.from_config(cfg.text_encoder, cfg.text_encoder_2)
    return PixelSDXL(cfg, PixelUNet(cfg), text)


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


def load_pixel_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, seed: int = 0) -> PixelSDXL:
    """A pixel SDXL folder (see `save_pretrained`), or a preset name of PIXEL_PRESETS (random init from `seed`)."""
    if isinstance(folder, str) and folder in PIXEL_PRESETS and not Path(folder).exists():
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(seed)
            model = build_pixel_model(PIXEL_PRESETS[folder])
        return model.to(device, dtype).eval().requires_grad_(False)
    folder = Path(folder)
    if not is_pixel_folder(folder):
        raise CheckpointError(f"{folder}: not a pixel SDXL folder (no model_index.json naming {PIXEL_PIPELINE} "
                              f"with a {PIXEL_CONFIG})")
    try:
        cfg = PixelConfig.from_dict(read_json(folder / PIXEL_CONFIG))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder / PIXEL_CONFIG}: {e}") from None
    has_te1 = (folder / "text_encoder").is_dir()
    tok1 = CLIPTokenizer.from_pretrained(folder / "tokenizer") if has_te1 else None
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    with torch.device("meta"):
        model = PixelSDXL(cfg, PixelUNet(cfg), DualCLIP.from_config(cfg.text_encoder if has_te1 else None,
                                                                     cfg.text_encoder_2, tok1, tok2))
    load_into(model.unet, read_weights(find_weights(folder / "unet"), dtype), str(folder / "unet"), device)
    sd1 = read_weights(find_weights(folder / "text_encoder", "model"), dtype) if has_te1 else None
    sd2 = read_weights(find_weights(folder / "text_encoder_2", "model"), dtype)
    try:
        model.text.load_weights(None if sd1 is None else {k: v.to(device) for k, v in sd1.items()},
                                {k: v.to(device) for k, v in sd2.items()})
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return model.eval().requires_grad_(False)


def pixel_from_latent(latent, base_resolution: int = 64, **kw) -> PixelSDXL:
    """A pixel SDXL built around a latent SDXL bundle: its UNet body (copied) and its text encoders (shared)."""
    text = latent.text
    te1 = latent.config.text_encoder
    cfg = pixel_config_from_latent(latent.config.unet, te1, latent.config.text_encoder_2, base_resolution, **kw)
    unet = PixelUNet(cfg).to(latent.unet.device, latent.unet.dtype)
    load_body(unet, latent.unet.state_dict(), "latent UNet")
    return PixelSDXL(cfg, unet, text)

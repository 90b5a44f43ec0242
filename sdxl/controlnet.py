"""ControlNet for the SDXL UNet, with diffusers' ControlNetModel parameter names: the UNet's encoder (its conv_in,
embeddings, down blocks and mid block: `UNetEncoder`), a small conditioning-image encoder added after conv_in, and
1x1 zero convolutions turning each skip and the mid block's output into residuals for the UNet
(`UNet.forward(..., down_block_additional_residuals=, mid_block_additional_residual=)`).

Files: a diffusers folder (config.json + diffusion_pytorch_model.safetensors), or one file in diffusers names (what
kohya's sdxl_train_control_net writes and A1111's `diffusers_xl_*` files hold) or in the original ControlNet layout
(`control_model.` + ldm names: zero_convs, input_hint_block, middle_block_out; sdxl/convert.py). A single file has no
config: its UNet structure is the one given (default sdxl-base), its conditioning encoder read from the shapes.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import SDXL_BASE, UNetConfig
from .unet import UNetEncoder
from .weights import (CheckpointError, atomic_path, find_weights, load_into, read_config, read_header, read_weights,
                      save_json, save_safetensors)

COND_EMBEDDING = "controlnet_cond_embedding."


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the encoder: the same structure as the UNet it steers
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)  # each step after the first halves H, W
    global_pool_conditions: bool = False  # residuals averaged over H, W (diffusers' shuffle ControlNets)
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the conditioning image's channels are flipped

    def __post_init__(self):
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"unknown channel order {self.controlnet_conditioning_channel_order!r}")

    def to_diffusers(self) -> dict:
        """The diffusers ControlNetModel config.json."""
        unet_only = ("out_channels", "up_block_types", "center_input_sample", "sample_size")
        d = {k: v for k, v in self.unet.to_diffusers().items() if k not in unet_only}
        return {**d, "_class_name": "ControlNetModel", "conditioning_channels": self.conditioning_channels,
                "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
                "global_pool_conditions": self.global_pool_conditions,
                "controlnet_conditioning_channel_order": self.controlnet_conditioning_channel_order}

    @classmethod
    def from_diffusers(cls, d: dict) -> ControlNetConfig:
        if d.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise ValueError(f"not a ControlNetModel config: _class_name is {d['_class_name']!r}")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name != "unet" and d.get(f.name) is not None}
        if "conditioning_embedding_out_channels" in kw:
            kw["conditioning_embedding_out_channels"] = tuple(kw["conditioning_embedding_out_channels"])
        return cls(unet=UNetConfig.from_diffusers(d), **kw)


class ControlNetConditioningEmbedding(nn.Module):
    """Conditioning image (B, c, 8H, 8W) -> (B, C0, H, W): conv, then pairs (conv, stride-2 conv), SiLU after each;
    a zero-initialised conv_out, so a new ControlNet adds nothing."""

    def __init__(self, out_ch: int, in_ch: int = 3, widths: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(a, b, 3, padding=1, stride=s) for a, c in zip(widths, widths[1:])
                                     for b, s in ((a, 1), (c, 2))])
        self.conv_out = zero(nn.Conv2d(widths[-1], out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(UNetEncoder):
    """forward(x, timesteps, context, pooled, time_ids, controlnet_cond) -> (down residuals, mid residual)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg.unet)
        ch = cfg.unet.block_out_channels
        self.controlnet_config = cfg
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels)
        # One zero conv per skip the UNet keeps: conv_in's output, each down resnet's, each downsampler's.
        widths = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(cfg.unet.layers_per_block + (i < len(ch) - 1))]
        self.controlnet_down_blocks = nn.ModuleList([zero(nn.Conv2d(c, c, 1)) for c in widths])
        self.controlnet_mid_block = zero(nn.Conv2d(ch[-1], ch[-1], 1))

    @classmethod
    def from_unet(cls, unet: UNetEncoder, conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  conditioning_channels: int = 3, load_weights_from_unet: bool = True) -> ControlNet:
        """A new ControlNet whose encoder is a copy of the UNet's (diffusers' from_unet); zero convs at zero."""
        if unet.entry_level:
            raise ValueError("a ControlNet steers a latent UNet; this one starts at level "
                             f"{unet.entry_level} (a pixel model)")
        cfg = ControlNetConfig(unet.config, conditioning_channels, tuple(conditioning_embedding_out_channels))
        with torch.device(unet.device):
            net = cls(cfg).to(unet.dtype)
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
                getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net

    def check_unet(self, unet: UNetEncoder, source: str = "ControlNet") -> None:
        """CheckpointError (one line) unless this ControlNet's residuals fit `unet`'s skips."""
        if unet.entry_level:
            raise CheckpointError(f"{source}: a ControlNet steers a latent UNet, not a pixel model's body")
        # out_channels and sample_size do not shape the encoder (and diffusers' ControlNet config leaves them out)
        for name in (f.name for f in dataclasses.fields(UNetConfig) if f.name not in ("out_channels", "sample_size")):
            if (ours := getattr(self.config, name)) != (theirs := getattr(unet.config, name)):
                raise CheckpointError(f"{source}: made for another UNet ({name} {ours}, the UNet has {theirs})")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor, pooled: torch.Tensor,
                time_ids: torch.Tensor, controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0,
                guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x and the UNet's other inputs; controlnet_cond (B, c, 8H, 8W) in [0, 1] as diffusers' pipelines feed it.
        guess_mode scales the residuals from 0.1 (the first skip) to 1 (the mid block), log-spaced."""
        cfg, dtype = self.controlnet_config, self.dtype
        temb_act = self.embed(timesteps, pooled, time_ids)
        cond = controlnet_cond.to(dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond.flip(1)
        h = self.conv_in(x.to(dtype)) + self.controlnet_cond_embedding(cond)
        h, skips = self.encode(h, temb_act, context.to(dtype))
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if guess_mode and not cfg.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=h.device) * conditioning_scale  # 0.1 ... 1
            down, mid = [d * s for d, s in zip(down, scales)], mid * scales[-1]
        else:
            down, mid = [d * conditioning_scale for d in down], mid * conditioning_scale
        if cfg.global_pool_conditions:
            down, mid = [d.mean(dim=(2, 3), keepdim=True) for d in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """A diffusers ControlNetModel folder, written under a temporary name and renamed when complete."""
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_safetensors(self.state_dict(), tmp / "diffusion_pytorch_model.safetensors")
            save_json(self.controlnet_config.to_diffusers(), tmp / "config.json")


def _single_file_config(path: Path, keys: dict[str, torch.Tensor], unet: UNetConfig) -> ControlNetConfig:
    """The config of a diffusers-named single file: the UNet structure given, the conditioning encoder's widths
    and input channels from its tensor shapes."""
    conv_in, n = keys.get(COND_EMBEDDING + "conv_in.weight"), 0
    if conv_in is None:
        raise CheckpointError(f"{path}: not a ControlNet (no {COND_EMBEDDING}conv_in.weight)")
    while COND_EMBEDDING + f"blocks.{n}.weight" in keys:
        n += 1
    widths = [conv_in.shape[0]] + [keys[COND_EMBEDDING + f"blocks.{j}.weight"].shape[0] for j in range(1, n, 2)]
    return ControlNetConfig(unet, conditioning_channels=conv_in.shape[1],
                            conditioning_embedding_out_channels=tuple(widths))


def load_controlnet(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    unet_config: UNetConfig | None = None) -> ControlNet:
    """A diffusers ControlNetModel folder, or a single .safetensors / .pth file in diffusers names or the original
    ControlNet layout (`control_model.*`); a single file is read as a ControlNet for `unet_config` (default
    sdxl-base). Unusable input raises CheckpointError (one line naming the file)."""
    from .convert import CONTROLNET_PREFIX, controlnet_from_original
    path = Path(path)
    if path.is_dir():
        cfg = read_config(path / "config.json", ControlNetConfig.from_diffusers)
        files = find_weights(path)
        sd, source = read_weights(files), str(files[0] if len(files) == 1 else path)
    else:
        keys, _ = read_header(path)
        original = any(k.startswith((CONTROLNET_PREFIX, "input_hint_block.")) for k in keys)
        sd, source = read_weights([path]), str(path)
        if original:
            try:
                sd = controlnet_from_original(sd, unet_config or SDXL_BASE.unet)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e} (a ControlNet for another UNet?)") from None
        cfg = _single_file_config(path, sd, unet_config or SDXL_BASE.unet)
    with torch.device("meta"):
        net = ControlNet(cfg)
    return load_into(net, sd, source, device, dtype)

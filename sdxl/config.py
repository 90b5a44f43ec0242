"""Typed configs for every network and the named presets ("tiny": SDXL-shaped, a few million parameters). Field
names follow the diffusers config.json where one exists, so `from_diffusers` / `to_diffusers` are plain renames."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the --precision names


def from_dict(cls, d: dict):
    """A config dataclass from `dataclasses.asdict` output (JSON lists back to tuples, nested configs rebuilt)."""
    hints, names = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field {unknown[0]!r}")
    kw = {}
    for k in [k for k in names if k in d]:
        v, nested = d[k], [t for t in typing.get_args(hints[k]) or (hints[k],) if dataclasses.is_dataclass(t)]
        kw[k] = from_dict(nested[0], v) if nested and isinstance(v, dict) else tuple(v) if isinstance(v, list) else v
    return cls(**kw)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    # Transformer blocks per attention layer at each level; 0 = a level without attention (DownBlock2D).
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    mid_transformer_depth: int = 10
    num_attention_heads: tuple[int, ...] = (5, 10, 20)  # heads per level (diffusers calls this attention_head_dim)
    cross_attention_dim: int = 2048
    pooled_dim: int = 1280  # pooled text embedding fed to the "text_time" embedding
    num_time_ids: int = 6  # micro-conditioning values: 6 (base) or 5 (refiner, with aesthetic score)
    addition_time_embed_dim: int = 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6  # the Transformer2D GroupNorm
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    sample_size: int = 128

    def __post_init__(self):
        if not len(self.transformer_depth) == len(self.num_attention_heads) == len(self.block_out_channels):
            raise ValueError("transformer_depth and num_attention_heads need one entry per level")
        if self.transformer_depth[-1] and self.transformer_depth[-1] != self.mid_transformer_depth:
            # diffusers derives the mid block's depth from the last level's, so they cannot differ.
            raise ValueError("the mid block's transformer depth must equal the last level's")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def add_embed_in_dim(self) -> int:
        return self.pooled_dim + self.num_time_ids * self.addition_time_embed_dim

    def to_diffusers(self) -> dict:
        """The diffusers UNet2DConditionModel config.json for this config."""
        same = ("sample_size", "in_channels", "out_channels", "layers_per_block", "cross_attention_dim",
                "addition_time_embed_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift")
        return {
            "_class_name": "UNet2DConditionModel", **{k: getattr(self, k) for k in same},
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.transformer_depth],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(self.transformer_depth)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": list(self.block_out_channels),
            "transformer_layers_per_block": [max(d, 1) for d in self.transformer_depth[:-1]]
            + [self.mid_transformer_depth],
            "attention_head_dim": list(self.num_attention_heads),
            "projection_class_embeddings_input_dim": self.add_embed_in_dim,
            "use_linear_projection": True, "addition_embed_type": "text_time", "act_fn": "silu",
            "center_input_sample": False, "upcast_attention": False,
        }

    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        """Read a diffusers UNet2DConditionModel config.json (SDXL-family layouts only)."""
        down = d["down_block_types"]
        n = len(down)
        if d.get("addition_embed_type") != "text_time":
            raise ValueError(f"not an SDXL UNet: addition_embed_type is {d.get('addition_embed_type')!r}, "
                             "expected 'text_time' (an SD1.x/2.x UNet?)")
        if not d.get("use_linear_projection", False):
            raise ValueError("not an SDXL UNet: use_linear_projection is false")
        if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"unsupported mid_block_type {d.get('mid_block_type')!r}")
        per_level = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
        layers = per_level(d.get("transformer_layers_per_block", 1))
        # diffusers' historical misnomer: attention_head_dim holds the head count (unless num_attention_heads is set)
        heads = per_level(d["num_attention_heads"] if d.get("num_attention_heads") is not None
                          else d.get("attention_head_dim", 8))
        depth = tuple(layers[i] if t.startswith("CrossAttn") else 0 for i, t in enumerate(down))
        add_dim = d.get("addition_time_embed_dim", 256)
        total, cross = d["projection_class_embeddings_input_dim"], d["cross_attention_dim"]
        # The pooled width is not stated: the refiner (bigG only: pooled == context width) has 5 time ids, others 6.
        ids = 5 if total - 5 * add_dim == cross else 6
        pooled = total - ids * add_dim
        if pooled <= 0:
            raise ValueError(f"cannot split projection_class_embeddings_input_dim={total} into pooled text "
                             f"+ {ids} time ids of {add_dim}")
        same = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-5,
                "freq_shift": 0, "flip_sin_to_cos": True, "sample_size": 128}
        return cls(**{k: d.get(k, v) for k, v in same.items()}, block_out_channels=tuple(d["block_out_channels"]),
                   transformer_depth=depth, mid_transformer_depth=layers[-1], num_attention_heads=tuple(heads),
                   cross_attention_dim=cross, pooled_dim=pooled, num_time_ids=ids, addition_time_embed_dim=add_dim)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    shift_factor: float = 0.0
    force_upcast: bool = True  # the published SDXL VAE overflows in fp16; the fp16-fix VAE sets this False
    sample_size: int = 1024

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self), "act_fn": "silu",
                "block_out_channels": list(self.block_out_channels), "shift_factor": self.shift_factor or None,
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        for t in d.get("down_block_types", ["DownEncoderBlock2D"]):
            if t != "DownEncoderBlock2D":
                raise ValueError(f"not an SDXL-style AutoencoderKL: down block type {t!r}")
        if d.get("use_quant_conv", True) is False or d.get("use_post_quant_conv", True) is False:
            raise ValueError("VAEs without quant_conv / post_quant_conv are not SDXL VAEs")
        # diffusers' defaults where a key is missing (scaling 0.18215: an SD1-era config without the key)
        kw = {f.name: d.get(f.name, f.default) for f in dataclasses.fields(cls)}
        return cls(**{**kw, "block_out_channels": tuple(d["block_out_channels"]),
                      "scaling_factor": d.get("scaling_factor", 0.18215), "shift_factor": d.get("shift_factor") or 0.0})


@dataclass(frozen=True)
class TextEncoderConfig:
    """One CLIP text tower; mirrors transformers' CLIPTextConfig fields."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    projection_dim: int | None = None  # set for the bigG tower (CLIPTextModelWithProjection)
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    pad_token: str = "<|endoftext|>"  # tokenizer padding: CLIP-L pads with <|endoftext|>, bigG with "!"


@dataclass(frozen=True)
class ModelConfig:
    """A whole SDXL bundle. `text_encoder` is None for the refiner (bigG only)."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    text_encoder_2: TextEncoderConfig = field(default_factory=lambda: CLIP_BIGG)
    prediction_type: str = "epsilon"

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    from_dict = classmethod(from_dict)  # the inverse of `to_dict`; unknown keys are an error


CLIP_L = TextEncoderConfig()
CLIP_BIGG = TextEncoderConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                              intermediate_size=5120, hidden_act="gelu", projection_dim=1280, pad_token="!")

SDXL_BASE = ModelConfig()
SDXL_REFINER = ModelConfig(
    unet=UNetConfig(block_out_channels=(384, 768, 1536, 1536), transformer_depth=(0, 4, 4, 0),
                    mid_transformer_depth=4, num_attention_heads=(6, 12, 24, 24), cross_attention_dim=1280,
                    num_time_ids=5),
    text_encoder=None,
)

_TINY_TE1 = TextEncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_TINY_TE2 = dataclasses.replace(_TINY_TE1, hidden_act="gelu", projection_dim=32, pad_token="!")
TINY = ModelConfig(
    unet=UNetConfig(block_out_channels=(32, 64, 128), transformer_depth=(0, 1, 2), mid_transformer_depth=2,
                    num_attention_heads=(1, 2, 4), cross_attention_dim=64, pooled_dim=32,
                    addition_time_embed_dim=8, sample_size=32),
    vae=VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=256),
    text_encoder=_TINY_TE1,
    text_encoder_2=_TINY_TE2,
)

PRESETS: dict[str, ModelConfig] = {"sdxl-base": SDXL_BASE, "sdxl-refiner": SDXL_REFINER, "tiny": TINY}


def from_diffusers(config_dict: dict) -> UNetConfig | VAEConfig:
    """A UNetConfig or VAEConfig from a diffusers config.json, chosen by its class name."""
    cls = config_dict.get("_class_name")
    if cls == "AutoencoderKL" or (cls is None and "latent_channels" in config_dict):
        return VAEConfig.from_diffusers(config_dict)
    if cls in ("UNet2DConditionModel", None):
        return UNetConfig.from_diffusers(config_dict)
    raise ValueError(f"unsupported diffusers class {cls!r}")


@dataclass(frozen=True)
class PixelConfig(ModelConfig):
    """A pixel SDXL (sdxl/pixel.py): the latent UNet config whose body it uses from `entry_level` on, the patch
    codec, the text towers, and the JiT objective and sampling defaults. No VAE."""
    vae: None = None
    prediction_type: str = "sample"  # the net predicts clean pixels
    patch_size: int = 16
    entry_level: int = 1  # the body starts at down_blocks[entry_level]
    codec_hidden: int = 512
    codec_blocks: int = 3
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
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the patch times the body's own downsampling."""
        return self.patch_size * 2 ** (len(self.unet.block_out_channels) - 1 - self.entry_level)


def pixel_config_from_latent(cfg: ModelConfig, base_resolution: int = 64, **kw) -> PixelConfig:
    """The pixel model whose body is `cfg`'s UNet; `--base_resolution 64|32` (the body's entry side at 1024 px)
    picks patch 16 at level 1 or patch 32 at level 2, with the seed's codec widths (512 / 768)."""
    table = {64: (16, 1), 32: (32, 2)}
    if base_resolution not in table:
        raise ValueError(f"base_resolution must be 64 or 32, got {base_resolution}")
    patch, level = table[base_resolution]
    hidden = kw.pop("codec_hidden", 512 if patch == 16 else 768)
    if cfg.unet.block_out_channels[0] < 320:  # a tiny test UNet: keep the codec as small
        hidden = min(hidden, 4 * cfg.unet.block_out_channels[0])
    return PixelConfig(unet=cfg.unet, patch_size=patch, entry_level=level, codec_hidden=hidden,
                       codec_blocks=kw.pop("codec_blocks", 3 if patch == 16 else 4), text_encoder=cfg.text_encoder,
                       text_encoder_2=cfg.text_encoder_2, **kw)


# The built-in demo: ~2M parameters, 64 px images in 16 px patches; trains on two CPU cores in minutes.
PRESETS["pixel-demo"] = PixelConfig(
    unet=UNetConfig(block_out_channels=(32, 64, 64), layers_per_block=1, transformer_depth=(0, 1, 1),
                    mid_transformer_depth=1, num_attention_heads=(1, 2, 2), cross_attention_dim=64, pooled_dim=32,
                    addition_time_embed_dim=8, norm_num_groups=16, sample_size=8),
    patch_size=16, entry_level=1, codec_hidden=128, codec_blocks=1,
    text_encoder=TINY.text_encoder, text_encoder_2=TINY.text_encoder_2,
)
PRESETS["pixel-tiny"] = pixel_config_from_latent(TINY, 64)

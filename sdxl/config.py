"""Typed configs for every network, and the named presets.

Field names follow the diffusers `config.json` where one exists, so `from_diffusers` / `to_diffusers` are
plain renames. Presets: "sdxl-base", "sdxl-refiner" and "tiny" (SDXL-shaped, a few million parameters, for
tests and the demo).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
        n = len(self.block_out_channels)
        if not (len(self.transformer_depth) == len(self.num_attention_heads) == n):
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

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers(self) -> dict:
        """The diffusers UNet2DConditionModel config.json for this config."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.transformer_depth],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(self.transformer_depth)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": [max(d, 1) for d in self.transformer_depth[:n - 1]]
            + [self.mid_transformer_depth],
            "attention_head_dim": list(self.num_attention_heads),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.add_embed_in_dim,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "act_fn": "silu",
            "center_input_sample": False,
            "upcast_attention": False,
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
        if d.get("num_attention_heads") is not None:
            heads = per_level(d["num_attention_heads"])
        else:  # diffusers' historical misnomer: attention_head_dim holds the head count
            heads = per_level(d.get("attention_head_dim", 8))
        depth = tuple(layers[i] if t.startswith("CrossAttn") else 0 for i, t in enumerate(down))
        add_dim = d.get("addition_time_embed_dim", 256)
        total, cross = d["projection_class_embeddings_input_dim"], d["cross_attention_dim"]
        # The config does not state the pooled width. The refiner (bigG only: pooled width == context width)
        # has 5 time ids; base-style models have 6.
        ids = 5 if total - 5 * add_dim == cross else 6
        pooled = total - ids * add_dim
        if pooled <= 0:
            raise ValueError(f"cannot split projection_class_embeddings_input_dim={total} into pooled text "
                             f"+ {ids} time ids of {add_dim}")
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d["block_out_channels"]),
            layers_per_block=d.get("layers_per_block", 2),
            transformer_depth=depth,
            mid_transformer_depth=layers[-1],
            num_attention_heads=tuple(heads),
            cross_attention_dim=cross,
            pooled_dim=pooled,
            num_time_ids=ids,
            addition_time_embed_dim=add_dim,
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            freq_shift=d.get("freq_shift", 0),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            sample_size=d.get("sample_size", 128),
        )


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
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor or None,
            "force_upcast": self.force_upcast,
        }

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        for t in d.get("down_block_types", ["DownEncoderBlock2D"]):
            if t != "DownEncoderBlock2D":
                raise ValueError(f"not an SDXL-style AutoencoderKL: down block type {t!r}")
        if d.get("use_quant_conv", True) is False or d.get("use_post_quant_conv", True) is False:
            raise ValueError("VAEs without quant_conv / post_quant_conv are not SDXL VAEs")
        return cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            block_out_channels=tuple(d["block_out_channels"]),
            layers_per_block=d.get("layers_per_block", 2),
            latent_channels=d.get("latent_channels", 4),
            norm_num_groups=d.get("norm_num_groups", 32),
            scaling_factor=d.get("scaling_factor", 0.18215),
            shift_factor=d.get("shift_factor") or 0.0,
            force_upcast=d.get("force_upcast", True),
            sample_size=d.get("sample_size", 1024),
        )


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

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


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


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def from_diffusers(config_dict: dict) -> UNetConfig | VAEConfig:
    """A UNetConfig or VAEConfig from a diffusers config.json, chosen by its class name."""
    cls = config_dict.get("_class_name")
    if cls == "AutoencoderKL" or (cls is None and "latent_channels" in config_dict):
        return VAEConfig.from_diffusers(config_dict)
    if cls in ("UNet2DConditionModel", None):
        return UNetConfig.from_diffusers(config_dict)
    raise ValueError(f"unsupported diffusers class {cls!r}")

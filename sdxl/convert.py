"""Every key mapping between weight layouts, in one place: the original single file <-> diffusers names.

The original layout is the one of `sd_xl_base_1.0.safetensors` / `sd_xl_refiner_1.0.safetensors` (Stability's
generative-models "SGM", ldm names): one file, components under fixed prefixes:

    model.diffusion_model.                  UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.                      VAE (encoder.down.i.block.j, decoder.up.(n-1-i), mid.attn_1 ...)
    conditioner.embedders.0.transformer.    CLIP-L, transformers' names (base only)
    conditioner.embedders.1.model.          OpenCLIP bigG (base); conditioner.embedders.0.model. in the refiner

Each mapping is a table of (original prefix, diffusers prefix) pairs generated from the structure (UNetConfig,
or layer counts read from the keys) and applied by longest-prefix replacement; the inverse direction uses the
same table flipped. Besides renames there are three tensor transforms, all views but the first:
- bigG attention: OpenCLIP packs q, k, v into `attn.in_proj_weight/bias` (3C, C) / (3C,): cat to write,
  chunk to read;
- bigG `text_projection` is stored transposed, (C, P), as `x @ P` in OpenCLIP, vs Linear's (P, C);
- VAE mid attention q/k/v/proj_out are 1x1 convs (C, C, 1, 1) in the original layout, Linear (C, C) here.

Every function returns a new dict of the same tensors (or views of them); a key no table maps raises ValueError
naming it. Dropped on read, documented:
- `...text_model.embeddings.position_ids` (a derivable buffer) and bigG's `logit_scale` (CLIP's contrastive
  temperature, unused for text conditioning);
- `model_ema.*` (EMA copies in training checkpoints; like diffusers' default we take the non-EMA weights),
  `denoiser.*` (SGM's derived sigma buffers) and ldm's derivable noise-schedule buffers (`alphas_cumprod` ...).
Written back so that files look like the published ones (2515 tensors for sdxl-base): CLIP-L's `position_ids`
(int64 (1, 77), as published) and bigG's `logit_scale` = ln(100) as a 0-dim tensor (the published value, 4.6055
in fp16). diffusers' single-file converter ignores both; tools that check for them (e.g. SDXL "fix clip"
scripts, ComfyUI's savers) find them.
"""
from __future__ import annotations

import functools
import math
import re
from typing import NoReturn

import torch

from .config import SDXL_BASE, SDXL_REFINER, UNetConfig

StateDict = dict[str, torch.Tensor]
Table = list[tuple[str, str]]  # (original prefix, diffusers prefix); a prefix ends with "." or is a whole key

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."  # sdxl-base
BIGG_REFINER_PREFIX = "conditioner.embedders.0.model."  # sdxl-refiner (bigG is its only text encoder)
LOGIT_SCALE = math.log(100.0)  # OpenCLIP's trained temperature as published: exp(4.6052) = 100

# Keys that carry nothing the diffusers layout keeps (see the module docstring).
_DROPPED_PREFIXES = ("model_ema.", "denoiser.")
_DROPPED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"})


# --------------------------------------------------------------------------------------------------- the engine

def _lookup(table: Table, to_original: bool) -> dict[str, str]:
    pairs = {d: o for o, d in table} if to_original else dict(table)
    if len(pairs) != len(table):
        raise AssertionError("a conversion table must be one-to-one")  # a bug here, not bad input
    return pairs


def _rename(key: str, lookup: dict[str, str], what: str) -> str:
    """Replace the longest prefix of `key` (cut at a dot) that the table knows."""
    if key in lookup:
        return lookup[key]
    i = len(key)
    while (i := key.rfind(".", 0, i)) > 0:
        dst = lookup.get(key[:i + 1])
        if dst is not None:
            return dst + key[i + 1:]
    raise ValueError(f"{what}: no mapping for key {key!r}")


def _strip(key: str, prefix: str, what: str, optional: bool = False) -> str:
    if key.startswith(prefix):
        return key[len(prefix):]
    if optional:
        return key
    raise ValueError(f"{what}: key {key!r} is not under {prefix!r}")


def _count(keys, prefix: str) -> int:
    """1 + the largest index N among keys `prefix + "N." ...` (0 if none): layers, blocks, levels."""
    n = 0
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                n = max(n, int(head) + 1)
    return n


# ----------------------------------------------------------------------------------------------------- UNet

_UNET_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]


def _unet_resnet(orig: str, diff: str) -> Table:
    return [(orig + o, diff + d) for o, d in _UNET_RESNET]


def _unet_attention(orig: str, diff: str, depth: int) -> Table:
    # Transformer internals keep their names; listing them (not just the prefix) rejects extra blocks.
    inner = ["norm.", "proj_in.", "proj_out."] + [f"transformer_blocks.{t}." for t in range(depth)]
    return [(orig + s, diff + s) for s in inner]


@functools.lru_cache(maxsize=8)
def unet_table(cfg: UNetConfig) -> Table:
    """(original, diffusers) prefixes of every UNet module, without `model.diffusion_model.`.

    Original numbering: input_blocks.0 is conv_in, then per level `layers_per_block` blocks [resnet (, attention)]
    and, except at the last level, one downsampler block; middle_block.0/1/2 = resnet, attention, resnet;
    output_blocks: per level (deepest first) `layers_per_block + 1` blocks [resnet (, attention)], the level's
    last block also holding the upsampler, at index 2 after an attention and 1 without one.
    """
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    table: Table = [("input_blocks.0.0.", "conv_in."),
                    ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                    ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
                    ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    idx = 1
    for b, depth in enumerate(cfg.transformer_depth):
        for j in range(L):
            table += _unet_resnet(f"input_blocks.{idx}.0.", f"down_blocks.{b}.resnets.{j}.")
            if depth:
                table += _unet_attention(f"input_blocks.{idx}.1.", f"down_blocks.{b}.attentions.{j}.", depth)
            idx += 1
        if b < n - 1:
            table.append((f"input_blocks.{idx}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
            idx += 1
    table += _unet_resnet("middle_block.0.", "mid_block.resnets.0.")
    table += _unet_attention("middle_block.1.", "mid_block.attentions.0.", cfg.mid_transformer_depth)
    table += _unet_resnet("middle_block.2.", "mid_block.resnets.1.")
    idx = 0
    for b, depth in enumerate(reversed(cfg.transformer_depth)):
        for j in range(L + 1):
            table += _unet_resnet(f"output_blocks.{idx}.0.", f"up_blocks.{b}.resnets.{j}.")
            if depth:
                table += _unet_attention(f"output_blocks.{idx}.1.", f"up_blocks.{b}.attentions.{j}.", depth)
            if j == L and b < n - 1:
                table.append((f"output_blocks.{idx}.{2 if depth else 1}.conv.", f"up_blocks.{b}.upsamplers.0.conv."))
            idx += 1
    return table


@functools.lru_cache(maxsize=16)
def _unet_lookup(cfg: UNetConfig, to_original: bool) -> dict[str, str]:
    return _lookup(unet_table(cfg), to_original)


def unet_key_to_original(key: str, cfg: UNetConfig) -> str:
    """One diffusers parameter or module path ("down_blocks.1.attentions.0.proj_in.weight") -> the original path
    without `model.diffusion_model.` (what kohya LoRA names are built from)."""
    return _rename(key, _unet_lookup(cfg, True), "UNet")


def unet_key_from_original(key: str, cfg: UNetConfig) -> str:
    return _rename(key, _unet_lookup(cfg, False), "UNet (original layout)")


def unet_to_original(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """diffusers-named UNet state dict -> `model.diffusion_model.*` original keys (same tensors)."""
    return {UNET_PREFIX + unet_key_to_original(k, cfg): v for k, v in sd.items()}


def unet_from_original(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """Original UNet keys, with or without `model.diffusion_model.` -> diffusers names (same tensors)."""
    return {unet_key_from_original(_strip(k, UNET_PREFIX, "UNet", optional=True), cfg): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------------ VAE

_VAE_RESNET = [(s, s) for s in ("norm1.", "conv1.", "norm2.", "conv2.")] + [("nin_shortcut.", "conv_shortcut.")]
_VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0.")]
# Linear weights in diffusers, (C, C, 1, 1) convs in the original layout.
_VAE_CONV1X1 = frozenset(f"{side}.mid_block.attentions.0.{name}.weight" for side in ("encoder", "decoder")
                         for name in ("to_q", "to_k", "to_v", "to_out.0"))


@functools.lru_cache(maxsize=8)
def vae_table(levels: int, layers_per_block: int) -> Table:
    """(original, diffusers) prefixes of the VAE, without `first_stage_model.`. The decoder's levels are
    numbered from the lowest resolution in diffusers and from the highest in the original layout."""
    table: Table = [(s, s) for s in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                                     "quant_conv.", "post_quant_conv.")]
    table += [("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out.")]

    def resnet(orig: str, diff: str) -> Table:
        return [(orig + o, diff + d) for o, d in _VAE_RESNET]

    for side in ("encoder", "decoder"):
        table += resnet(f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0.")
        table += resnet(f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1.")
        table += [(f"{side}.mid.attn_1.{o}", f"{side}.mid_block.attentions.0.{d}") for o, d in _VAE_ATTENTION]
    for i in range(levels):
        for j in range(layers_per_block):
            table += resnet(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.")
        for j in range(layers_per_block + 1):
            table += resnet(f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
        if i < levels - 1:
            table.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
            table.append((f"decoder.up.{levels - 1 - i}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    return table


def _vae_structure(keys, down: str, block: str, what: str) -> tuple[int, int]:
    levels, layers = _count(keys, down), _count(keys, down + "0." + block)
    if not levels or not layers:
        raise ValueError(f"{what}: no encoder blocks ({down}N.{block}M.*) among the keys")
    return levels, layers


def vae_to_original(sd: StateDict) -> StateDict:
    """diffusers-named AutoencoderKL state dict -> `first_stage_model.*` original keys."""
    lookup = _lookup(vae_table(*_vae_structure(sd, "encoder.down_blocks.", "resnets.", "VAE")), True)
    out = {}
    for k, v in sd.items():
        if k in _VAE_CONV1X1 and v.ndim == 2:
            v = v[:, :, None, None]  # (C, C) -> (C, C, 1, 1), a view
        out[VAE_PREFIX + _rename(k, lookup, "VAE")] = v
    return out


def vae_from_original(sd: StateDict) -> StateDict:
    """Original VAE keys, with or without `first_stage_model.` (standalone VAE files have none) -> diffusers."""
    sd = {_strip(k, VAE_PREFIX, "VAE", optional=True): v for k, v in sd.items()}
    lookup = _lookup(vae_table(*_vae_structure(sd, "encoder.down.", "block.", "VAE (original layout)")), False)
    out = {}
    for k, v in sd.items():
        name = _rename(k, lookup, "VAE (original layout)")
        if name in _VAE_CONV1X1 and v.ndim == 4:
            v = v[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C), a view
        out[name] = v
    return out


# ------------------------------------------------------------------------------------------- text encoders

# CLIP-L keeps transformers' names under the prefix; the table lists the top-level modules to reject strays.
_CLIP_L_TABLE: Table = [(s, s) for s in ("text_model.embeddings.token_embedding.",
                                         "text_model.embeddings.position_embedding.",
                                         "text_model.encoder.layers.", "text_model.final_layer_norm.")]
_POSITION_IDS = "text_model.embeddings.position_ids"


def clip_l_to_original(sd: StateDict, prefix: str = CLIP_L_PREFIX) -> StateDict:
    """CLIP-L (`text_model.*`; transformers 5's CLIPTextModel keys without `text_model.` are accepted) ->
    `conditioner.embedders.0.transformer.text_model.*`, with the published int64 `position_ids` (1, 77)."""
    if not any(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}
    lookup = _lookup(_CLIP_L_TABLE, True)
    out = {prefix + _rename(k, lookup, "CLIP-L"): v for k, v in sd.items() if k != _POSITION_IDS}
    pos = sd.get("text_model.embeddings.position_embedding.weight")
    if pos is None:
        raise ValueError("CLIP-L: missing key 'text_model.embeddings.position_embedding.weight'")
    out[prefix + _POSITION_IDS] = torch.arange(pos.shape[0], device=pos.device).unsqueeze(0)  # (1, P)
    return out


def clip_l_from_original(sd: StateDict, prefix: str = CLIP_L_PREFIX) -> StateDict:
    """`conditioner.embedders.0.transformer.text_model.*` -> `text_model.*` (position_ids dropped)."""
    lookup = _lookup(_CLIP_L_TABLE, False)
    out = {}
    for k, v in sd.items():
        name = _strip(k, prefix, "CLIP-L")
        if name != _POSITION_IDS:
            out[_rename(name, lookup, "CLIP-L (original layout)")] = v
    return out


_BIGG_LAYER = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
               ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]
_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


@functools.lru_cache(maxsize=8)
def bigg_table(layers: int) -> Table:
    """(OpenCLIP, transformers) names of the bigG text tower, without the `conditioner.embedders.*.model.`
    prefix. q/k/v (packed in OpenCLIP) and the transposed `text_projection` are handled beside the table."""
    table: Table = [("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                    ("ln_final.", "text_model.final_layer_norm.")]
    for i in range(layers):
        table += [(f"transformer.resblocks.{i}.{o}", f"text_model.encoder.layers.{i}.{d}") for o, d in _BIGG_LAYER]
    return table


def bigg_to_original(sd: StateDict, prefix: str = BIGG_PREFIX, logit_scale: float | None = LOGIT_SCALE) -> StateDict:
    """CLIPTextModelWithProjection state dict -> OpenCLIP names under `prefix` (BIGG_PREFIX for sdxl-base,
    BIGG_REFINER_PREFIX for the refiner). q/k/v are concatenated (the one copy), `text_projection` transposed
    (a view), and `logit_scale` written as a 0-dim tensor unless None."""
    lookup = _lookup(bigg_table(_count(sd, "text_model.encoder.layers.")), True)
    out, qkv = {}, {}
    for k, v in sd.items():
        if (m := _QKV.fullmatch(k)) is not None:
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T  # (P, C) -> (C, P)
        elif k != _POSITION_IDS:  # transformers 4 files carry the buffer; OpenCLIP has none
            out[prefix + _rename(k, lookup, "bigG")] = v
    for (i, kind), parts in sorted(qkv.items()):
        missing = [f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(f"bigG: missing key {missing[0]!r} (q, k and v are packed together)")
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    if logit_scale is not None:
        ref = sd.get("text_model.embeddings.token_embedding.weight")
        if ref is None:
            raise ValueError("bigG: missing key 'text_model.embeddings.token_embedding.weight'")
        out[prefix + "logit_scale"] = torch.tensor(logit_scale, dtype=ref.dtype, device=ref.device)
    return out


def bigg_from_original(sd: StateDict, prefix: str = BIGG_PREFIX) -> StateDict:
    """OpenCLIP bigG keys under `prefix` -> CLIPTextModelWithProjection names; in_proj split into views."""
    sd = {_strip(k, prefix, "bigG"): v for k, v in sd.items()}
    lookup = _lookup(bigg_table(_count(sd, "transformer.resblocks.")), False)
    out = {}
    for k, v in sd.items():
        if (m := _IN_PROJ.fullmatch(k)) is not None:
            if v.shape[0] % 3:
                raise ValueError(f"bigG: {prefix + k!r} has {v.shape[0]} rows, not q, k, v stacked")
            for p, part in zip("qkv", v.chunk(3)):  # (3C, ...) -> 3 x (C, ...) views
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{m[2]}"] = part
        elif k == "text_projection":
            out["text_projection.weight"] = v.T  # (C, P) -> (P, C)
        elif k != "logit_scale":
            out[_rename(k, lookup, "bigG (original layout)")] = v
    return out


# ------------------------------------------------------------------------------------------ the whole file

def _reject(what: str, key: str) -> NoReturn:
    raise ValueError(f"not an SDXL original-layout file: {what} (key {key!r})")


def detect_original(sd: StateDict) -> str:
    """Which SDXL model an original-layout file holds: "sdxl-base" or "sdxl-refiner"; ValueError naming the
    family (SD1.x, SD2.x, FLUX, SD3, a LoRA, a UNet-only or diffusers-named file ...) otherwise.

    Base carries CLIP-L at conditioner.embedders.0.transformer. and bigG at conditioner.embedders.1.model.; the
    refiner only bigG, at conditioner.embedders.0.model. (diffusers tells them apart by
    `conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`, which implies the same prefixes).
    """
    if not sd:
        raise ValueError("not an SDXL original-layout file: no tensors")
    keys = list(sd)
    for k in keys:
        if "double_blocks." in k or "single_blocks." in k:
            _reject("a FLUX transformer", k)
        if "joint_blocks." in k:
            _reject("an SD3 (MMDiT) transformer", k)
    for k in keys:
        if k.startswith("cond_stage_model.model."):
            _reject("an SD2.x checkpoint (OpenCLIP ViT-H text encoder at cond_stage_model.model.)", k)
        if k.startswith("cond_stage_model.transformer."):
            attn2 = sd.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
            width = f", cross-attention {attn2.shape[-1]}" if attn2 is not None else ""
            _reject(f"an SD1.x checkpoint (CLIP-L text encoder at cond_stage_model.transformer.{width})", k)
    for k in keys:
        if k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k:
            _reject("a LoRA file", k)
    has = {p: any(k.startswith(p) for k in keys)
           for p in (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, BIGG_PREFIX, BIGG_REFINER_PREFIX)}
    if not has[UNET_PREFIX]:
        k = keys[0]
        if k.startswith(("encoder.down.", "decoder.up.")) or has[VAE_PREFIX]:
            _reject("a standalone VAE (load it with sdxl.vae.load_vae)", k)
        if re.match(r"(unet\.|text_encoder(_2)?\.|vae\.|)(down_blocks|up_blocks|mid_block|text_model|encoder|"
                    r"decoder|conv_in|time_embedding)\.", k):
            _reject("diffusers-named weights (load the diffusers folder instead)", k)
        if k.startswith(("input_blocks.", "middle_block.", "output_blocks.")):
            _reject("a UNet-only file without the model.diffusion_model. prefix", k)
        _reject("no model.diffusion_model. (UNet) keys", k)
    if UNET_PREFIX + "label_emb.0.0.weight" not in sd:
        _reject("a UNet without SDXL's text_time embedding (label_emb), an SD1.x/2.x UNet?", UNET_PREFIX)
    if has[BIGG_PREFIX]:
        kind, need = "sdxl-base", (VAE_PREFIX, CLIP_L_PREFIX)
    elif has[BIGG_REFINER_PREFIX]:
        kind, need = "sdxl-refiner", (VAE_PREFIX,)
    else:
        _reject("a UNet-only SDXL file: no bigG text encoder (conditioner.embedders.*.model.)", keys[0])
    for p in need:
        if not has[p]:
            _reject(f"an incomplete {kind} file: no {p} keys", keys[0])
    return kind


def _dropped(key: str) -> bool:
    return key.startswith(_DROPPED_PREFIXES) or key in _DROPPED_KEYS


def split_original(sd: StateDict, unet_cfg: UNetConfig | None = None) -> dict[str, StateDict | None]:
    """An original-layout SDXL file -> dict(unet=, vae=, text_encoder=, text_encoder_2=) in diffusers names
    (text_encoder None for the refiner). `unet_cfg` defaults to the detected preset's UNet."""
    kind = detect_original(sd)
    refiner = kind == "sdxl-refiner"
    cfg = unet_cfg or (SDXL_REFINER if refiner else SDXL_BASE).unet
    bigg = BIGG_REFINER_PREFIX if refiner else BIGG_PREFIX
    parts: dict[str, StateDict] = {UNET_PREFIX: {}, VAE_PREFIX: {}, bigg: {}}
    if not refiner:
        parts[CLIP_L_PREFIX] = {}
    for k, v in sd.items():
        prefix = next((p for p in parts if k.startswith(p)), None)
        if prefix is not None:
            parts[prefix][k] = v
        elif not _dropped(k):
            raise ValueError(f"{kind} file: unexpected key {k!r}")
    return {"unet": unet_from_original(parts[UNET_PREFIX], cfg),
            "vae": vae_from_original(parts[VAE_PREFIX]),
            "text_encoder": None if refiner else clip_l_from_original(parts[CLIP_L_PREFIX]),
            "text_encoder_2": bigg_from_original(parts[bigg], bigg)}


def join_original(components: dict[str, StateDict | None], refiner: bool,
                  unet_cfg: UNetConfig | None = None) -> StateDict:
    """The inverse of split_original: diffusers-named components -> one original-layout state dict."""
    if not isinstance(refiner, bool):
        raise TypeError(f"join_original(components, refiner: bool, unet_cfg=None): refiner is {type(refiner).__name__}")
    cfg = unet_cfg or (SDXL_REFINER if refiner else SDXL_BASE).unet
    for name in ("unet", "vae", "text_encoder_2"):
        if components.get(name) is None:
            raise ValueError(f"join_original: no {name} state dict given")
    if refiner and components.get("text_encoder") is not None:
        raise ValueError("the refiner layout has no CLIP-L: text_encoder must be None")
    if not refiner and components.get("text_encoder") is None:
        raise ValueError("the sdxl-base layout needs text_encoder (CLIP-L)")
    out = unet_to_original(components["unet"], cfg)
    out.update(vae_to_original(components["vae"]))
    if not refiner:
        out.update(clip_l_to_original(components["text_encoder"]))
    out.update(bigg_to_original(components["text_encoder_2"], BIGG_REFINER_PREFIX if refiner else BIGG_PREFIX))
    return out

"""Every key mapping between weight layouts, in one place: the original single file <-> diffusers names.

The original layout (`sd_xl_base_1.0` / `sd_xl_refiner_1.0.safetensors`, Stability's ldm names) is one file:
`model.diffusion_model.` UNet, `first_stage_model.` VAE, `conditioner.embedders.0.transformer.` CLIP-L (transformers'
names; base only), `conditioner.embedders.1.model.` OpenCLIP bigG (`.0.model.` in the refiner). Each mapping is a
table of (original prefix, diffusers prefix) pairs built from the structure, applied by longest-prefix replacement
either way; an unmapped key raises ValueError naming it. Beyond renames (views all but the first): bigG packs q, k, v
in `attn.in_proj_weight/bias` and stores `text_projection` transposed (C, P); the VAE's mid attention q/k/v/proj_out
are 1x1 convs. Dropped on read: `model_ema.*` (as diffusers), `denoiser.*`, ldm's schedule buffers, `position_ids`
and `logit_scale`; tools look for the last two (SDXL "fix clip" scripts, ComfyUI's savers), so they are written back
as published: int64 (1, 77) and ln(100) (2515 tensors for sdxl-base)."""
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


@functools.lru_cache(maxsize=32)  # one dict per table and direction
def _lookup(table_fn, *args, to_original: bool) -> dict[str, str]:
    table = table_fn(*args)
    pairs = {d: o for o, d in table} if to_original else dict(table)
    assert len(pairs) == len(table), "a conversion table must be one-to-one"  # a bug here, not bad input
    return pairs


def _rename(key: str, lookup: dict[str, str], what: str) -> str:
    """Replace the longest prefix of `key` that the table knows: the whole key, or cut after a dot."""
    i = len(key)
    while i > 0:
        if (dst := lookup.get(key[:i])) is not None:
            return dst + key[i:]
        i = key.rfind(".", 0, i - 1) + 1
    raise ValueError(f"{what}: no mapping for key {key!r}")


def _strip(key: str, prefix: str, what: str) -> str:
    if not key.startswith(prefix):
        raise ValueError(f"{what}: key {key!r} is not under {prefix!r}")
    return key[len(prefix):]


def _under(orig: str, diff: str, pairs) -> Table:
    """The (original, diffusers) `pairs` of a module's children under its two prefixes."""
    return [(orig + o, diff + d) for o, d in pairs]


def _count(keys, prefix: str) -> int:
    """1 + the largest index N among keys `prefix + "N." ...` (0 if none): layers, blocks, levels."""
    heads = (k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix))
    return max((int(h) + 1 for h in heads if h.isdigit()), default=0)


_UNET_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]


def _unet_attention(orig: str, diff: str, depth: int) -> Table:
    # Transformer internals keep their names; listing them (not just the prefix) rejects extra blocks.
    inner = ["norm.", "proj_in.", "proj_out."] + [f"transformer_blocks.{t}." for t in range(depth)]
    return _under(orig, diff, zip(inner, inner))


def unet_table(cfg: UNetConfig) -> Table:
    """(original, diffusers) prefixes of every UNet module, without `model.diffusion_model.`. Original numbering:
    input_blocks.0 is conv_in, then per level `layers_per_block` blocks [resnet (, attention)] and, but at the last
    level, a downsampler block; middle_block.0/1/2 = resnet, attention, resnet; output_blocks: per level (deepest
    first) `layers_per_block + 1` such blocks, the last also holding the upsampler (index 2, or 1 without attention)."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    table: Table = [("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
                    ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                    ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    idx = 1
    for b, depth in enumerate(cfg.transformer_depth):
        for j in range(L):
            table += _under(f"input_blocks.{idx}.0.", f"down_blocks.{b}.resnets.{j}.", _UNET_RESNET)
            if depth:
                table += _unet_attention(f"input_blocks.{idx}.1.", f"down_blocks.{b}.attentions.{j}.", depth)
            idx += 1
        if b < n - 1:
            table.append((f"input_blocks.{idx}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
            idx += 1
    table += _under("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET)
    table += _unet_attention("middle_block.1.", "mid_block.attentions.0.", cfg.mid_transformer_depth)
    table += _under("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET)
    idx = 0
    for b, depth in enumerate(reversed(cfg.transformer_depth)):
        for j in range(L + 1):
            table += _under(f"output_blocks.{idx}.0.", f"up_blocks.{b}.resnets.{j}.", _UNET_RESNET)
            if depth:
                table += _unet_attention(f"output_blocks.{idx}.1.", f"up_blocks.{b}.attentions.{j}.", depth)
            if j == L and b < n - 1:
                table.append((f"output_blocks.{idx}.{2 if depth else 1}.conv.", f"up_blocks.{b}.upsamplers.0.conv."))
            idx += 1
    return table


def unet_key_to_original(key: str, cfg: UNetConfig) -> str:
    """A diffusers parameter name -> the original one without `model.diffusion_model.` (kohya LoRA names' base)."""
    return _rename(key, _lookup(unet_table, cfg, to_original=True), "UNet")


def unet_to_original(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """diffusers-named UNet state dict -> `model.diffusion_model.*` original keys (same tensors)."""
    return {UNET_PREFIX + unet_key_to_original(k, cfg): v for k, v in sd.items()}


def unet_from_original(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """Original UNet keys, with or without `model.diffusion_model.` -> diffusers names (same tensors)."""
    lookup = _lookup(unet_table, cfg, to_original=False)
    return {_rename(k.removeprefix(UNET_PREFIX), lookup, "UNet (original layout)"): v for k, v in sd.items()}


CONTROLNET_PREFIX = "control_model."  # the original ControlNet (cldm) files; some are saved without it


def controlnet_table(cfg: UNetConfig, hint_blocks: int) -> Table:
    """(original, diffusers) prefixes of a ControlNet in the original ControlNet layout, without `control_model.`:
    the UNet's encoder names (unet_table), zero_convs.i.0 -> controlnet_down_blocks.i, middle_block_out.0 ->
    controlnet_mid_block, and input_hint_block, a Sequential with SiLUs at the odd indices: 0 -> conv_in,
    2 (j + 1) -> blocks.j, 2 (hint_blocks + 1) -> conv_out (14 for the usual 6 blocks)."""
    table = [(o, d) for o, d in unet_table(cfg) if not d.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))]
    skips = 1 + sum(cfg.layers_per_block + (b < len(cfg.block_out_channels) - 1)
                    for b in range(len(cfg.block_out_channels)))
    table += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.") for i in range(skips)]
    table += [("middle_block_out.0.", "controlnet_mid_block."),
              ("input_hint_block.0.", "controlnet_cond_embedding.conv_in.")]
    table += [(f"input_hint_block.{2 * j + 2}.", f"controlnet_cond_embedding.blocks.{j}.") for j in range(hint_blocks)]
    return table + [(f"input_hint_block.{2 * hint_blocks + 2}.", "controlnet_cond_embedding.conv_out.")]


def controlnet_from_original(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """Original ControlNet keys, with or without `control_model.` -> diffusers ControlNetModel names (same tensors)
    for a ControlNet of the UNet `cfg`; ValueError naming a key the table does not know."""
    sd = {k.removeprefix(CONTROLNET_PREFIX): v for k, v in sd.items()}
    lookup = _lookup(controlnet_table, cfg, max(0, _count(sd, "input_hint_block.") // 2 - 1), to_original=False)
    return {_rename(k, lookup, "ControlNet (original layout)"): v for k, v in sd.items()}


_VAE_RESNET = [(s, s) for s in ("norm1.", "conv1.", "norm2.", "conv2.")] + [("nin_shortcut.", "conv_shortcut.")]
_VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0.")]
_VAE_SIDE = [("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("norm_out.", "conv_norm_out."),
             *_under("mid.block_1.", "mid_block.resnets.0.", _VAE_RESNET),
             *_under("mid.block_2.", "mid_block.resnets.1.", _VAE_RESNET),
             *_under("mid.attn_1.", "mid_block.attentions.0.", _VAE_ATTENTION)]  # of the encoder and the decoder
# Linear weights in diffusers, (C, C, 1, 1) convs in the original layout.
_VAE_CONV1X1 = frozenset(f"{side}.mid_block.attentions.0.{name}.weight" for side in ("encoder", "decoder")
                         for name in ("to_q", "to_k", "to_v", "to_out.0"))


def vae_table(levels: int, layers_per_block: int) -> Table:
    """(original, diffusers) prefixes of the VAE, without `first_stage_model.`. The decoder's levels are
    numbered from the lowest resolution in diffusers and from the highest in the original layout."""
    table: Table = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv."),
                    *_under("encoder.", "encoder.", _VAE_SIDE), *_under("decoder.", "decoder.", _VAE_SIDE)]
    for i in range(levels):
        for j in range(layers_per_block):
            table += _under(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", _VAE_RESNET)
        for j in range(layers_per_block + 1):
            table += _under(f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.",
                            _VAE_RESNET)
        if i < levels - 1:
            table.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
            table.append((f"decoder.up.{levels - 1 - i}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    return table


def _vae_lookup(keys, down: str, block: str, what: str, to_original: bool) -> dict[str, str]:
    levels, layers = _count(keys, down), _count(keys, down + "0." + block)
    if not levels or not layers:
        raise ValueError(f"{what}: no encoder blocks ({down}N.{block}M.*) among the keys")
    return _lookup(vae_table, levels, layers, to_original=to_original)


def vae_to_original(sd: StateDict) -> StateDict:
    """diffusers-named AutoencoderKL state dict -> `first_stage_model.*` original keys."""
    lookup = _vae_lookup(sd, "encoder.down_blocks.", "resnets.", "VAE", to_original=True)
    return {VAE_PREFIX + _rename(k, lookup, "VAE"): v[:, :, None, None] if k in _VAE_CONV1X1 and v.ndim == 2 else v
            for k, v in sd.items()}  # (C, C) -> (C, C, 1, 1), a view


def vae_from_original(sd: StateDict) -> StateDict:
    """Original VAE keys, with or without `first_stage_model.` (standalone VAE files have none) -> diffusers."""
    sd = {k.removeprefix(VAE_PREFIX): v for k, v in sd.items()}
    lookup = _vae_lookup(sd, "encoder.down.", "block.", "VAE (original layout)", to_original=False)
    out = {_rename(k, lookup, "VAE (original layout)"): v for k, v in sd.items()}
    return {k: v[:, :, 0, 0] if k in _VAE_CONV1X1 and v.ndim == 4 else v for k, v in out.items()}  # a view


_POSITION_IDS = "text_model.embeddings.position_ids"


def _clip_l_table() -> Table:
    """CLIP-L keeps transformers' names under the prefix; listing the top-level modules rejects strays."""
    return [(s, s) for s in ("text_model.embeddings.token_embedding.", "text_model.embeddings.position_embedding.",
                             "text_model.encoder.layers.", "text_model.final_layer_norm.")]


def clip_l_to_original(sd: StateDict, prefix: str = CLIP_L_PREFIX) -> StateDict:
    """CLIP-L `text_model.*` (or transformers 5's keys without it) -> `prefix` + them, with position_ids (1, 77)."""
    if not any(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}
    lookup = _lookup(_clip_l_table, to_original=True)
    out = {prefix + _rename(k, lookup, "CLIP-L"): v for k, v in sd.items() if k != _POSITION_IDS}
    pos = sd.get("text_model.embeddings.position_embedding.weight")
    if pos is None:
        raise ValueError("CLIP-L: missing key 'text_model.embeddings.position_embedding.weight'")
    out[prefix + _POSITION_IDS] = torch.arange(pos.shape[0], device=pos.device).unsqueeze(0)  # (1, P)
    return out


def clip_l_from_original(sd: StateDict, prefix: str = CLIP_L_PREFIX) -> StateDict:
    """`conditioner.embedders.0.transformer.text_model.*` -> `text_model.*` (position_ids dropped)."""
    lookup = _lookup(_clip_l_table, to_original=False)
    sd = {_strip(k, prefix, "CLIP-L"): v for k, v in sd.items()}
    return {_rename(k, lookup, "CLIP-L (original layout)"): v for k, v in sd.items() if k != _POSITION_IDS}


_BIGG_LAYER = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
               ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]
_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def bigg_table(layers: int) -> Table:
    """(OpenCLIP, transformers) names of the bigG text tower, without the prefix; q/k/v and text_projection aside."""
    table: Table = [("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                    ("ln_final.", "text_model.final_layer_norm.")]
    for i in range(layers):
        table += _under(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", _BIGG_LAYER)
    return table


def bigg_to_original(sd: StateDict, prefix: str = BIGG_PREFIX, logit_scale: float | None = LOGIT_SCALE) -> StateDict:
    """CLIPTextModelWithProjection state dict -> OpenCLIP names under `prefix` (BIGG_REFINER_PREFIX for the refiner);
    q/k/v concatenated (the one copy), `text_projection` transposed, `logit_scale` a 0-dim tensor unless None."""
    lookup = _lookup(bigg_table, _count(sd, "text_model.encoder.layers."), to_original=True)
    out, qkv = {}, {}
    for k, v in sd.items():
        if (m := _QKV.fullmatch(k)) is not None:
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T  # (P, C) -> (C, P)
        elif k != _POSITION_IDS:  # transformers 4 files carry the buffer; OpenCLIP has none
            out[prefix + _rename(k, lookup, "bigG")] = v
    for (i, kind), parts in sorted(qkv.items()):
        if missing := [f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv" if p not in parts]:
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
    lookup = _lookup(bigg_table, _count(sd, "transformer.resblocks."), to_original=False)
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


def _reject(what: str, key: str) -> NoReturn:
    raise ValueError(f"not an SDXL original-layout file: {what} (key {key!r})")


def detect_original(sd: StateDict) -> str:
    """"sdxl-base" (bigG at conditioner.embedders.1.model., with CLIP-L) or "sdxl-refiner" (bigG at .0.model.), as
    diffusers tells them apart; otherwise ValueError naming what the file is (SD1.x, SD2.x, FLUX, a LoRA ...)."""
    if not sd:
        raise ValueError("not an SDXL original-layout file: no tensors")
    keys = list(sd)
    attn2 = sd.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    width = f", cross-attention {attn2.shape[-1]}" if attn2 is not None else ""
    for what, pattern in [  # other families, each by a key only it has
            ("a FLUX transformer", r"(double|single)_blocks\."), ("an SD3 (MMDiT) transformer", r"joint_blocks\."),
            ("an SD2.x checkpoint (OpenCLIP ViT-H text encoder at cond_stage_model.model.)",
             r"^cond_stage_model\.model\."),
            (f"an SD1.x checkpoint (CLIP-L text encoder at cond_stage_model.transformer.{width})",
             r"^cond_stage_model\.transformer\."), ("a LoRA file", r"^lora_(unet_|te)|\.lora_(down|A)\.")]:
        if (k := next((k for k in keys if re.search(pattern, k)), None)) is not None:
            _reject(what, k)
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
    if not (has[BIGG_PREFIX] or has[BIGG_REFINER_PREFIX]):
        _reject("a UNet-only SDXL file: no bigG text encoder (conditioner.embedders.*.model.)", keys[0])
    kind, need = ("sdxl-base", (VAE_PREFIX, CLIP_L_PREFIX)) if has[BIGG_PREFIX] else ("sdxl-refiner", (VAE_PREFIX,))
    if missing := [p for p in need if not has[p]]:
        _reject(f"an incomplete {kind} file: no {missing[0]} keys", keys[0])
    return kind


def split_original(sd: StateDict, unet_cfg: UNetConfig | None = None) -> dict[str, StateDict | None]:
    """An original-layout SDXL file -> dict(unet=, vae=, text_encoder=, text_encoder_2=) in diffusers names
    (text_encoder None for the refiner). `unet_cfg` defaults to the detected preset's UNet."""
    kind = detect_original(sd)
    refiner = kind == "sdxl-refiner"
    cfg = unet_cfg or (SDXL_REFINER if refiner else SDXL_BASE).unet
    bigg = BIGG_REFINER_PREFIX if refiner else BIGG_PREFIX
    parts = {p: {} for p in (UNET_PREFIX, VAE_PREFIX, bigg, None if refiner else CLIP_L_PREFIX) if p}
    for k, v in sd.items():
        if (prefix := next((p for p in parts if k.startswith(p)), None)) is not None:
            parts[prefix][k] = v
        elif not (k.startswith(_DROPPED_PREFIXES) or k in _DROPPED_KEYS):
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
    if (missing := next((n for n in ("unet", "vae", "text_encoder_2") if components.get(n) is None), None)):
        raise ValueError(f"join_original: no {missing} state dict given")
    if refiner != (components.get("text_encoder") is None):
        raise ValueError("the refiner layout has no CLIP-L: text_encoder must be None" if refiner
                         else "the sdxl-base layout needs text_encoder (CLIP-L)")
    clip_l = {} if refiner else clip_l_to_original(components["text_encoder"])
    return {**unet_to_original(components["unet"], cfg), **vae_to_original(components["vae"]), **clip_l,
            **bigg_to_original(components["text_encoder_2"], BIGG_REFINER_PREFIX if refiner else BIGG_PREFIX)}

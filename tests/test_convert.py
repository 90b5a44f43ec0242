"""Key mappings against diffusers' own single-file converter (diffusers/loaders/single_file_utils.py).

Our `*_to_original` output, read back by the reference converter, must give the reference modules' tensors
exactly; `*_from_original` must invert `*_to_original` bit for bit. Reference modules (diffusers' UNet and VAE,
transformers' CLIP towers) get random weights, every tensor perturbed so that no two are equal by accident.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import diffusers_kwargs
from diffusers import AutoencoderKL as RefVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                 infer_diffusers_model_type)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl.config import SDXL_BASE, SDXL_REFINER, TINY, TextEncoderConfig, UNetConfig, VAEConfig
from sdxl.convert import (BIGG_PREFIX, BIGG_REFINER_PREFIX, bigg_from_original, bigg_to_original,
                          clip_l_from_original, clip_l_to_original, detect_original, join_original, split_original,
                          unet_from_original, unet_key_to_original, unet_to_original, vae_from_original,
                          vae_to_original)
from sdxl.unet import UNet
from sdxl.vae import AutoencoderKL
from sdxl.weights import atomic_path, save_safetensors

# As tests/test_unet.py: four levels, attention only at levels 1-2, 5 time ids, bigG only.
REFINER_LIKE = UNetConfig(block_out_channels=(32, 64, 64, 64), transformer_depth=(0, 2, 2, 0),
                          mid_transformer_depth=2, num_attention_heads=(2, 2, 4, 4), cross_attention_dim=32,
                          pooled_dim=32, num_time_ids=5, addition_time_embed_dim=8)


def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # LayerNorm ones / zero biases would let a swap of two of them pass unnoticed
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    return module


def unet_sd(cfg: UNetConfig) -> dict[str, torch.Tensor]:
    sd = _perturb(UNet2DConditionModel(**diffusers_kwargs(cfg.to_diffusers()))).state_dict()
    UNet(cfg).load_state_dict(sd, strict=True)  # the reference names are ours
    return sd


def vae_sd(cfg: VAEConfig = TINY.vae) -> dict[str, torch.Tensor]:
    sd = _perturb(RefVAE(**diffusers_kwargs(cfg.to_diffusers()))).state_dict()
    AutoencoderKL(cfg).load_state_dict(sd, strict=True)
    return sd


def clip_config(te: TextEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=te.hidden_size, num_hidden_layers=te.num_hidden_layers,
                          num_attention_heads=te.num_attention_heads, intermediate_size=te.intermediate_size,
                          hidden_act=te.hidden_act, projection_dim=te.projection_dim or te.hidden_size,
                          vocab_size=49408, max_position_embeddings=77)


def clip_l_sd(te: TextEncoderConfig = TINY.text_encoder) -> dict[str, torch.Tensor]:
    sd = _perturb(CLIPTextModel(clip_config(te))).state_dict()
    # diffusers' text_encoder/ files name CLIP-L `text_model.*`; transformers 5 dropped that level.
    return sd if any(k.startswith("text_model.") for k in sd) else {"text_model." + k: v for k, v in sd.items()}


def bigg_model(te: TextEncoderConfig = TINY.text_encoder_2) -> CLIPTextModelWithProjection:
    return _perturb(CLIPTextModelWithProjection(clip_config(te)))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------------------- components

@pytest.mark.parametrize("cfg", [TINY.unet, REFINER_LIKE], ids=["base-like", "refiner-like"])
def test_unet_against_reference_converter(cfg):
    sd = unet_sd(cfg)
    orig = unet_to_original(sd, cfg)
    assert len(orig) == len(sd) and all(k.startswith("model.diffusion_model.") for k in orig)
    assert_same(convert_ldm_unet_checkpoint(orig, cfg.to_diffusers()), sd)
    back = unet_from_original(orig, cfg)
    assert_same(back, sd)
    assert all(back[k] is sd[k] for k in sd)  # renames only: the very same tensors
    # The prefix is optional on read (UNet-only files in the original layout).
    assert_same(unet_from_original({k.removeprefix("model.diffusion_model."): v for k, v in orig.items()}, cfg), sd)


def test_unet_upsampler_index_follows_attention():
    # Refiner-like: output level 0 (deepest) has no attention -> upsampler at .1; levels with attention -> .2.
    assert unet_key_to_original("up_blocks.0.upsamplers.0.conv.weight", REFINER_LIKE) == "output_blocks.2.1.conv.weight"
    assert unet_key_to_original("up_blocks.1.upsamplers.0.conv.weight", REFINER_LIKE) == "output_blocks.5.2.conv.weight"
    assert unet_key_to_original("up_blocks.2.upsamplers.0.conv.weight", REFINER_LIKE) == "output_blocks.8.2.conv.weight"
    assert unet_key_to_original("down_blocks.2.downsamplers.0.conv.bias", REFINER_LIKE) == "input_blocks.9.0.op.bias"
    # Module paths map too (kohya LoRA names are built from them).
    assert (unet_key_to_original("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", TINY.unet)
            == "input_blocks.4.1.transformer_blocks.0.attn1.to_q")


def test_vae_against_reference_converter():
    sd = vae_sd()
    orig = vae_to_original(sd)
    q = orig["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (64, 64, 1, 1) and shares_storage(q, sd["encoder.mid_block.attentions.0.to_q.weight"])
    assert_same(convert_ldm_vae_checkpoint(orig, TINY.vae.to_diffusers()), sd)
    assert_same(vae_from_original(orig), sd)
    # Standalone VAE files in the original layout carry no prefix.
    assert_same(vae_from_original({k.removeprefix("first_stage_model."): v for k, v in orig.items()}), sd)


def test_clip_l_against_reference_converter():
    sd = clip_l_sd()
    orig = clip_l_to_original(sd)
    assert all(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in orig)
    back = convert_ldm_clip_checkpoint(orig)
    # The published files carry position_ids (int64, (1, 77)); diffusers passes it through.
    pos = back.pop("text_model.embeddings.position_ids")
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77)[None])
    assert_same(back, sd)
    assert_same(clip_l_from_original(orig), sd)
    # transformers 5's own CLIPTextModel keys (no text_model. level) are accepted.
    assert_same(clip_l_to_original({k.removeprefix("text_model."): v for k, v in sd.items()}), orig)


@pytest.mark.parametrize("prefix,te", [
    (BIGG_PREFIX, TINY.text_encoder_2),
    (BIGG_REFINER_PREFIX, TINY.text_encoder_2),
    # A projection narrower than the width: the transpose decides the shape diffusers splits q/k/v by.
    (BIGG_PREFIX, TextEncoderConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=96, hidden_act="gelu", projection_dim=16)),
], ids=["base", "refiner", "narrow-projection"])
def test_bigg_against_reference_converter(prefix, te):
    model = bigg_model(te)
    sd = model.state_dict()
    orig = bigg_to_original(sd, prefix)
    assert all(k.startswith(prefix) for k in orig)
    w = orig[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert w.shape == (3 * te.hidden_size, te.hidden_size)
    assert orig[prefix + "text_projection"].shape == (te.hidden_size, te.projection_dim)
    scale = orig[prefix + "logit_scale"]
    assert scale.ndim == 0 and math.isclose(scale.exp().item(), 100.0, rel_tol=1e-5)
    assert_same(convert_open_clip_checkpoint(model, orig, prefix=prefix), sd)
    back = bigg_from_original(orig, prefix)
    assert_same(back, sd)
    assert shares_storage(back["text_model.encoder.layers.1.self_attn.v_proj.weight"], w)  # split = views
    assert shares_storage(back["text_projection.weight"], sd["text_projection.weight"])
    # logit_scale is optional in files (diffusers' own converter never writes it).
    assert prefix + "logit_scale" not in bigg_to_original(sd, prefix, logit_scale=None)


# ------------------------------------------------------------------------------------------ whole files

# Published sd_xl_base_1.0 names that exist at the tiny sizes too (3 UNet levels with attention at 1 and 2,
# 4 VAE levels, 2 text layers).
PUBLISHED_BASE_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.6.0.op.bias",
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.0.emb_layers.1.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.2.out_layers.3.bias",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.bias",
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.label_emb.0.2.bias",
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.out.2.bias",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.encoder.mid.block_2.norm2.bias",
    "first_stage_model.encoder.norm_out.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.up.0.block.1.conv2.weight",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "first_stage_model.quant_conv.weight",
    "first_stage_model.post_quant_conv.bias",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.bias",
    "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
    "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.token_embedding.weight",
    "conditioner.embedders.1.model.ln_final.bias",
    "conditioner.embedders.1.model.logit_scale",
]


def test_joined_base_file(tmp_path):
    bigg = bigg_model()
    parts = {"unet": unet_sd(TINY.unet), "vae": vae_sd(), "text_encoder": clip_l_sd(),
             "text_encoder_2": bigg.state_dict()}
    joined = join_original(parts, refiner=False, unet_cfg=TINY.unet)
    missing = [k for k in PUBLISHED_BASE_KEYS if k not in joined]
    assert not missing
    assert joined["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    layers = TINY.text_encoder_2.num_hidden_layers
    # +1 position_ids, +1 logit_scale, and q/k/v weights+biases (6) packed into in_proj (2) per bigG layer.
    assert len(joined) == sum(len(p) for p in parts.values()) + 2 - 4 * layers
    assert detect_original(joined) == "sdxl-base"
    # diffusers' converters read every component out of the whole file.
    assert_same(convert_ldm_unet_checkpoint(joined, TINY.unet.to_diffusers()), parts["unet"])
    assert_same(convert_ldm_vae_checkpoint(joined, TINY.vae.to_diffusers()), parts["vae"])
    clip_l = convert_ldm_clip_checkpoint(joined)
    clip_l.pop("text_model.embeddings.position_ids")
    assert_same(clip_l, parts["text_encoder"])
    assert_same(convert_open_clip_checkpoint(bigg, joined, prefix=BIGG_PREFIX), parts["text_encoder_2"])
    # Through a file and back, then written out again in diffusers names (split views are savable).
    save_safetensors(joined, tmp_path / "model.safetensors")
    split = split_original(load_file(tmp_path / "model.safetensors"), TINY.unet)
    for name, part in parts.items():
        assert_same(split[name], part)
        save_safetensors(split[name], tmp_path / f"{name}.safetensors")
        assert_same(load_file(tmp_path / f"{name}.safetensors"), part)
    assert_same(join_original(split_original(joined, TINY.unet), refiner=False, unet_cfg=TINY.unet), joined)


def test_joined_refiner_file():
    bigg = bigg_model()
    parts = {"unet": unet_sd(REFINER_LIKE), "vae": vae_sd(), "text_encoder": None,
             "text_encoder_2": bigg.state_dict()}
    joined = join_original(parts, refiner=True, unet_cfg=REFINER_LIKE)
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in joined)
    for key in ["model.diffusion_model.output_blocks.2.1.conv.weight",  # no attention at the deepest level
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.input_blocks.9.0.op.weight",
                "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
                "conditioner.embedders.0.model.transformer.resblocks.1.attn.in_proj_bias",
                "conditioner.embedders.0.model.text_projection",
                "conditioner.embedders.0.model.logit_scale"]:
        assert key in joined, key
    assert detect_original(joined) == "sdxl-refiner"
    assert_same(convert_ldm_unet_checkpoint(joined, REFINER_LIKE.to_diffusers()), parts["unet"])
    assert_same(convert_open_clip_checkpoint(bigg, joined, prefix=BIGG_REFINER_PREFIX), parts["text_encoder_2"])
    split = split_original(joined, REFINER_LIKE)
    assert split["text_encoder"] is None
    for name in ("unet", "vae", "text_encoder_2"):
        assert_same(split[name], parts[name])
    with pytest.raises(ValueError, match="no CLIP-L"):
        join_original(dict(parts, text_encoder=clip_l_sd()), refiner=True, unet_cfg=REFINER_LIKE)


@pytest.mark.parametrize("name", ["sdxl-base", "sdxl-refiner"])
def test_full_size_key_sets(name):
    """The full configs on the meta device: every key we write is one diffusers' converter reads back to the
    reference module's key with the reference shape, and the per-component counts are the published ones."""
    cfg = {"sdxl-base": SDXL_BASE, "sdxl-refiner": SDXL_REFINER}[name]
    refiner = cfg.text_encoder is None
    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(**diffusers_kwargs(cfg.unet.to_diffusers())).state_dict()
        ref_vae = RefVAE(**diffusers_kwargs(cfg.vae.to_diffusers())).state_dict()
        bigg = CLIPTextModelWithProjection(clip_config(cfg.text_encoder_2))
        parts = {"unet": UNet(cfg.unet).state_dict(), "vae": AutoencoderKL(cfg.vae).state_dict(),
                 "text_encoder": None if refiner else clip_l_sd(cfg.text_encoder),
                 "text_encoder_2": bigg.state_dict()}
    joined = join_original(parts, refiner=refiner, unet_cfg=cfg.unet)
    # diffusers' own detection looks for conditioner.embedders.{1|0}.model.transformer.resblocks.9.mlp.c_proj.bias.
    assert infer_diffusers_model_type(joined) == ("xl_refiner" if refiner else "xl_base")
    assert detect_original(joined) == name

    def shapes(sd):
        return {k: tuple(v.shape) for k, v in sd.items()}

    assert shapes(convert_ldm_unet_checkpoint(joined, cfg.unet.to_diffusers())) == shapes(ref_unet)
    assert shapes(convert_ldm_vae_checkpoint(joined, cfg.vae.to_diffusers())) == shapes(ref_vae)
    bigg_prefix = BIGG_REFINER_PREFIX if refiner else BIGG_PREFIX
    assert shapes(convert_open_clip_checkpoint(bigg, joined, prefix=bigg_prefix)) == shapes(parts["text_encoder_2"])
    count = {p: sum(k.startswith(p) for k in joined) for p in
             ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.", bigg_prefix)}
    # UNet and VAE: one original key per diffusers key. CLIP-L: transformers' 196 + position_ids. bigG: 32 layers
    # x 12 (in_proj packs q/k/v) + token/positional embedding, ln_final (2), text_projection, logit_scale = 390.
    # sd_xl_base_1.0.safetensors holds 1680 + 248 + 197 + 390 = 2515 tensors.
    assert count == {"model.diffusion_model.": 1220 if refiner else 1680, "first_stage_model.": 248,
                     "conditioner.embedders.0.transformer.": 0 if refiner else 197, bigg_prefix: 390}
    assert len(joined) == (1220 + 248 + 390 if refiner else 2515)
    if not refiner:
        clip_l = convert_ldm_clip_checkpoint(joined)
        assert shapes(clip_l) == shapes(parts["text_encoder"]) | {"text_model.embeddings.position_ids": (1, 77)}
        assert joined["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
        assert joined["first_stage_model.decoder.mid.attn_1.v.weight"].shape == (512, 512, 1, 1)


# ------------------------------------------------------------------------------------------ bad input

def _fake(keys: list[str], shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    shapes = shapes or {}
    return {k: torch.empty(shapes.get(k, (1,)), device="meta") for k in keys}


def test_detect_original_other_families():
    base = ["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight",
            "first_stage_model.encoder.conv_in.weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"]
    assert detect_original(_fake(base)) == "sdxl-base"
    refiner = base[:3] + ["conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"]
    assert detect_original(_fake(refiner)) == "sdxl-refiner"
    sd15_attn = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    cases = {
        "SD1.x.*cross-attention 768": _fake(
            ["cond_stage_model.transformer.text_model.final_layer_norm.weight", sd15_attn,
             "first_stage_model.encoder.conv_in.weight"], {sd15_attn: (320, 768)}),
        "SD2.x": _fake(["model.diffusion_model.input_blocks.0.0.weight",
                        "cond_stage_model.model.token_embedding.weight"]),
        "FLUX": _fake(["double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight"]),
        "FLUX ": _fake(["model.diffusion_model.single_blocks.3.linear1.weight"]),
        "SD3": _fake(["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"]),
        "UNet-only SDXL": _fake(base[:2]),
        "without the model.diffusion_model. prefix": _fake(["input_blocks.0.0.weight", "label_emb.0.0.weight"]),
        "diffusers-named": _fake(["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"]),
        "standalone VAE": _fake(["encoder.down.0.block.0.conv1.weight"]),
        "LoRA": _fake(["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"]),
        "incomplete sdxl-base.*first_stage_model": _fake([k for k in base if not k.startswith("first_stage")]),
        "SD1.x/2.x UNet": _fake(["model.diffusion_model.input_blocks.0.0.weight"]),
        "no tensors": {},
    }
    for message, sd in cases.items():
        with pytest.raises(ValueError, match=message.strip()):
            detect_original(sd)


def test_unknown_keys_raise_and_documented_extras_are_dropped():
    sd = unet_sd(TINY.unet)
    orig = unet_to_original(sd, TINY.unet)
    stray = sd["conv_in.bias"]
    with pytest.raises(ValueError, match=r"'input_blocks\.9\.0\.in_layers\.0\.weight'"):  # 3 levels: 0-8
        unet_from_original(dict(orig, **{"model.diffusion_model.input_blocks.9.0.in_layers.0.weight": stray}),
                           TINY.unet)
    with pytest.raises(ValueError, match="'down_blocks.1.attentions.0.transformer_blocks.1.norm1.weight'"):
        unet_to_original(dict(sd, **{"down_blocks.1.attentions.0.transformer_blocks.1.norm1.weight": stray}),
                         TINY.unet)  # depth 1 at that level: a second block is not in the table
    vae = vae_to_original(vae_sd())
    with pytest.raises(ValueError, match="'encoder.mid.attn_2.q.weight'"):
        vae_from_original(dict(vae, **{"first_stage_model.encoder.mid.attn_2.q.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="'text_model.pooler.weight'"):
        clip_l_to_original(dict(clip_l_sd(), **{"text_model.pooler.weight": torch.zeros(1)}))
    bigg = bigg_model().state_dict()
    with pytest.raises(ValueError, match="v_proj.weight"):
        bigg_to_original({k: v for k, v in bigg.items() if k != "text_model.encoder.layers.0.self_attn.v_proj.weight"})
    with pytest.raises(ValueError, match="'transformer.resblocks.0.attn.bias_k'"):
        bigg_from_original(dict(bigg_to_original(bigg), **{BIGG_PREFIX + "transformer.resblocks.0.attn.bias_k":
                                                              torch.zeros(1)}))
    parts = {"unet": sd, "vae": vae_sd(), "text_encoder": clip_l_sd(), "text_encoder_2": bigg}
    joined = join_original(parts, refiner=False, unet_cfg=TINY.unet)
    with pytest.raises(TypeError, match="refiner is UNetConfig"):
        join_original(parts, TINY.unet)  # the UNet config goes in unet_cfg
    with pytest.raises(ValueError, match="no vae state dict"):
        join_original(dict(parts, vae=None), refiner=False, unet_cfg=TINY.unet)
    with pytest.raises(ValueError, match="unexpected key 'conditioner.embedders.2.foo'"):
        split_original(dict(joined, **{"conditioner.embedders.2.foo": torch.zeros(1)}), TINY.unet)
    extras = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5),
              "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1), "alphas_cumprod": torch.ones(1000),
              "denoiser.sigmas": torch.ones(1000)}
    split = split_original(dict(joined, **extras), TINY.unet)
    for name, part in parts.items():
        assert_same(split[name], part)


# ------------------------------------------------------------------------ atomic writes (sdxl/weights.py)

def test_atomic_path_replaces_whole_or_leaves_the_old_state(tmp_path):
    path = tmp_path / "sub" / "w.safetensors"
    save_safetensors({"a": torch.ones(2)}, path)  # parents created
    old = path.read_bytes()
    with pytest.raises(AttributeError):  # a failed save leaves the old file
        save_safetensors({"a": torch.zeros(2), "b": "not a tensor"}, path)
    assert path.read_bytes() == old and sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == old and sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]
    save_safetensors({"a": torch.full((3,), 2.0)}, path, metadata={"k": "v"})
    assert torch.equal(load_file(path)["a"], torch.full((3,), 2.0))

    folder = tmp_path / "step_000001"  # a folder written whole replaces the one there (checkpoints)
    (tmp_path / f"step_000001.{os.getpid()}.tmp").mkdir()  # a stale temp of this process: cleared first
    (tmp_path / f"step_000001.{os.getpid()}.tmp" / "stale").write_text("x")
    for n in (1, 2):
        with atomic_path(folder) as tmp:
            assert tmp.parent == folder.parent and not tmp.exists()
            tmp.mkdir()
            (tmp / f"file{n}").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["file2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "sub"]

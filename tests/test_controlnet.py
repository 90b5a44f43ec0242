"""The ControlNet against diffusers' ControlNetModel (same names, same residuals, from_unet, files both ways) and the
UNet's residual inputs against UNet2DConditionModel's."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import diffusers_kwargs, rel_err
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

import sdxl
from sdxl.config import TINY, UNetConfig
from sdxl.controlnet import ControlNet, ControlNetConfig
from sdxl.convert import CONTROLNET_PREFIX, controlnet_table
from sdxl.unet import UNet
from sdxl.weights import CheckpointError

CFG = ControlNetConfig(TINY.unet)


def jitter(module: torch.nn.Module) -> torch.nn.Module:
    """Random non-zero everything, zero convs included (they start at zero and would hide any mistake)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def make_pair(cfg: ControlNetConfig = CFG):
    ref = jitter(ControlNetModel(**diffusers_kwargs(cfg.to_diffusers())))
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(B=2, H=8, W=16, cfg: UNetConfig = TINY.unet):
    return (torch.randn(B, cfg.in_channels, H, W), torch.tensor([3.0, 700.0][:B]),
            torch.randn(B, 77, cfg.cross_attention_dim), torch.randn(B, cfg.pooled_dim),
            torch.tensor([[64.0, 128.0, 0.0, 8.0, 64.0, 128.0]] * B))


def ref_residuals(ref, x, t, ctx, pooled, ids, cond, **kw):
    return ref(x, t, ctx, cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False, **kw)


def assert_residuals_match(a, b):
    (down_a, mid_a), (down_b, mid_b) = a, b
    assert len(down_a) == len(down_b) == 9  # conv_in, 2 resnets x 3 levels, 2 downsamplers
    for ra, rb in zip([*down_a, mid_a], [*down_b, mid_b]):
        assert ra.shape == rb.shape and ra.abs().max() > 1e-3  # not trivially zero
        assert rel_err(ra, rb) <= 1e-5


@pytest.mark.parametrize("scale,guess_mode,extra", [
    (1.0, False, {}), (0.6, True, {}),
    (0.8, False, {"global_pool_conditions": True, "controlnet_conditioning_channel_order": "bgr"})],
    ids=["plain", "guess-mode", "pooled-bgr"])
def test_residuals_match_reference(scale, guess_mode, extra):
    cfg = ControlNetConfig(TINY.unet, **extra)
    ref, ours = make_pair(cfg)
    args = inputs()
    cond = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        want = ref_residuals(ref, *args, cond, conditioning_scale=scale, guess_mode=guess_mode)
        got = ours(*args, cond, conditioning_scale=scale, guess_mode=guess_mode)
    assert_residuals_match(want, got)
    if extra:
        assert got[1].shape[-2:] == (1, 1)


def test_unet_with_residuals_matches_reference():
    """Our UNet fed a ControlNet's residuals = diffusers' UNet fed the same ones (and they change the output)."""
    ref = jitter(UNet2DConditionModel(**diffusers_kwargs(TINY.unet.to_diffusers())))
    ours = UNet(TINY.unet).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, pooled, ids = inputs(H=10, W=14)  # odd sizes at the lower levels
    _, net = make_pair()
    with torch.no_grad():
        down, mid = net(x, t, ctx, pooled, ids, torch.rand(2, 3, 80, 112))
        want = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                   down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid).sample
        got = ours(x, t, ctx, pooled, ids, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        plain = ours(x, t, ctx, pooled, ids)
    assert rel_err(want, got) <= 1e-5
    assert rel_err(want, plain) > 1e-2
    with pytest.raises(ValueError, match="8 down residuals for 9 skips"):
        ours(x, t, ctx, pooled, ids, down_block_additional_residuals=down[1:], mid_block_additional_residual=mid)


def test_from_unet_matches_reference():
    ref_unet = jitter(UNet2DConditionModel(**diffusers_kwargs(TINY.unet.to_diffusers())))
    unet = UNet(TINY.unet)
    unet.load_state_dict(ref_unet.state_dict())
    ref, ours = ControlNetModel.from_unet(ref_unet), ControlNet.from_unet(unet)
    a, b = ref.state_dict(), ours.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")):
            assert not a[k].any() and not b[k].any(), k  # zero convolutions
        elif not k.startswith("controlnet_cond_embedding."):  # the rest of the cond embedding is random in both
            assert torch.equal(a[k], b[k]), k
    config = ours.controlnet_config.to_diffusers()
    for k in ("block_out_channels", "down_block_types", "transformer_layers_per_block", "attention_head_dim",
              "projection_class_embeddings_input_dim", "addition_time_embed_dim", "cross_attention_dim",
              "conditioning_embedding_out_channels", "conditioning_channels", "use_linear_projection"):
        assert list(config[k]) == list(ref.config[k]) if isinstance(config[k], list) else config[k] == ref.config[k], k


def test_saved_folder_loads_in_diffusers_and_back(tmp_path):
    ref, ours = make_pair()
    ours.save_pretrained(tmp_path / "cn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cn"]  # no temporary left behind
    loaded = ControlNetModel.from_pretrained(tmp_path / "cn", low_cpu_mem_usage=False)
    a, b = loaded.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref.save_pretrained(tmp_path / "theirs")  # and diffusers' own folder through sdxl.load_controlnet
    back = sdxl.load_controlnet(tmp_path / "theirs")
    args, cond = inputs(), torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        assert_residuals_match(ref_residuals(ref, *args, cond), back(*args, cond))


def test_single_files_diffusers_names_and_original_layout(tmp_path):
    """Oracle for the original layout: diffusers' own converter (convert_controlnet_checkpoint) must turn the file
    back into the diffusers names (all it maps: it skips SDXL's label_emb, which is the UNet's mapping)."""
    _, ours = make_pair()
    sd = ours.state_dict()
    save_file(sd, str(tmp_path / "diffusers_names.safetensors"))
    to_original = {d: o for o, d in controlnet_table(TINY.unet, 6)}
    original = {}
    for k, v in sd.items():
        prefix = max((d for d in to_original if k.startswith(d)), key=len)
        original[CONTROLNET_PREFIX + to_original[prefix] + k[len(prefix):]] = v
    assert len(original) == len(sd)
    save_file(original, str(tmp_path / "original.safetensors"))
    theirs = convert_controlnet_checkpoint(dict(original), {"layers_per_block": TINY.unet.layers_per_block})
    assert set(sd) - set(theirs) == {k for k in sd if k.startswith("add_embedding.")}
    assert all(torch.equal(theirs[k], sd[k]) for k in theirs)
    for name in ("diffusers_names", "original"):
        net = sdxl.load_controlnet(tmp_path / f"{name}.safetensors", unet_config=TINY.unet)
        got = net.state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name


def test_another_unets_controlnet_is_one_line(tmp_path):
    _, ours = make_pair()
    other = UNetConfig(block_out_channels=(32, 64, 64), transformer_depth=(0, 1, 2), mid_transformer_depth=2,
                       num_attention_heads=(1, 2, 4), cross_attention_dim=64, pooled_dim=32, addition_time_embed_dim=8)
    with pytest.raises(CheckpointError, match=r"cn: made for another UNet \(block_out_channels "):
        ours.check_unet(UNet(other), "cn")
    ours.check_unet(UNet(TINY.unet))  # its own UNet passes
    original = {CONTROLNET_PREFIX + "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
                CONTROLNET_PREFIX + "output_blocks.0.0.in_layers.0.weight": torch.zeros(4)}
    save_file(original, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="bad.safetensors: .*no mapping for key 'output_blocks.0.0") as e:
        sdxl.load_controlnet(tmp_path / "bad.safetensors", unet_config=TINY.unet)
    assert "\n" not in str(e.value)
    ours.save_pretrained(tmp_path / "cn")
    config = json.loads((tmp_path / "cn" / "config.json").read_text())
    (tmp_path / "cn" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="config.json: not a usable config"):
        sdxl.load_controlnet(tmp_path / "cn")
    with pytest.raises(CheckpointError, match="missing key|shape"):  # a tiny ControlNet read as one for sdxl-base
        sdxl.load_controlnet(tmp_path / "cn" / "diffusion_pytorch_model.safetensors")

"""The UNet against diffusers' UNet2DConditionModel: same names, same numbers, same loading behaviour."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import diffusers_kwargs, rel_err
from diffusers import UNet2DConditionModel

from sdxl.config import SDXL_BASE, SDXL_REFINER, TINY, UNetConfig, from_diffusers
from sdxl.unet import UNet, load_unet
from sdxl.weights import CheckpointError

BASE_LIKE = TINY.unet
REFINER_LIKE = UNetConfig(block_out_channels=(32, 64, 64, 64), transformer_depth=(0, 2, 2, 0),
                          mid_transformer_depth=2, num_attention_heads=(2, 2, 4, 4), cross_attention_dim=32,
                          pooled_dim=32, num_time_ids=5, addition_time_embed_dim=8)


def make_pair(cfg: UNetConfig):
    ref = UNet2DConditionModel(**diffusers_kwargs(cfg.to_diffusers())).eval()
    with torch.no_grad():  # random, non-zero everything (diffusers zero-inits nothing, but be explicit)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: UNetConfig, B=2, H=24, W=16, L=77):
    x = torch.randn(B, cfg.in_channels, H, W)
    t = torch.tensor([3.0, 999.0, 500.5, 10.0][:B])
    ctx = torch.randn(B, L, cfg.cross_attention_dim)
    pooled = torch.randn(B, cfg.pooled_dim)
    ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0, 6.0][:cfg.num_time_ids]] * B)
    return x, t, ctx, pooled, ids


def ref_forward(ref, x, t, ctx, pooled, ids):
    return ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


@pytest.mark.parametrize("cfg", [BASE_LIKE, REFINER_LIKE], ids=["base-like", "refiner-like"])
@pytest.mark.parametrize("hw", [(24, 16), (16, 40), (20, 12), (10, 14)],
                         ids=["tall", "wide", "odd-levels", "odd-before-downsampling"])
def test_forward_matches_reference(cfg, hw):
    if cfg is REFINER_LIKE and hw == (20, 12):  # (10, 14): 5 -> 3 -> 2, upsampled to each skip's size
        hw = (24, 40)  # three downsamples: multiples of 8
    ref, ours = make_pair(cfg)
    args = inputs(cfg, B=3, H=hw[0], W=hw[1])
    with torch.no_grad():
        a, b = ref_forward(ref, *args), ours(*args)
    assert a.shape == b.shape == args[0].shape
    assert rel_err(a, b) <= 1e-5


def test_scalar_timestep_and_batch_independence():
    ref, ours = make_pair(BASE_LIKE)
    x, _, ctx, pooled, ids = inputs(BASE_LIKE, B=2)
    with torch.no_grad():
        both = ours(x, 250, ctx, pooled, ids)
        one = ours(x[1:], torch.tensor(250), ctx[1:], pooled[1:], ids[1:])
        a = ref_forward(ref, x, torch.tensor(250), ctx, pooled, ids)
    assert rel_err(a, both) <= 1e-5
    assert torch.allclose(both[1:], one, atol=1e-5)


@pytest.mark.parametrize("name", ["sdxl-base", "sdxl-refiner"])
def test_full_config_names_and_shapes(name):
    cfg = {"sdxl-base": SDXL_BASE, "sdxl-refiner": SDXL_REFINER}[name].unet
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_kwargs(cfg.to_diffusers()))
        ours = UNet(cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    if name == "sdxl-base":
        assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684


def test_published_config_json_reads_back():
    # The published sdxl-base unet/config.json fields that matter (as in stabilityai/stable-diffusion-xl-base-1.0).
    published = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
                 "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
                 "block_out_channels": [320, 640, 1280], "center_input_sample": False,
                 "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                    "CrossAttnDownBlock2D"],
                 "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
                 "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
                 "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
                 "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D",
                                                                                "CrossAttnUpBlock2D", "UpBlock2D"],
                 "use_linear_projection": True}
    assert from_diffusers(published) == SDXL_BASE.unet
    refiner = dict(published, attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536],
                   cross_attention_dim=1280, projection_class_embeddings_input_dim=2560,
                   transformer_layers_per_block=4,
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
    assert from_diffusers(refiner) == SDXL_REFINER.unet
    with pytest.raises(ValueError, match="not an SDXL UNet"):
        from_diffusers(dict(published, addition_embed_type=None))


def test_gradient_checkpointing_same_gradients():
    _, ours = make_pair(BASE_LIKE)
    ours.train()
    args = inputs(BASE_LIKE, B=2)

    def grads():
        ours.zero_grad()
        out = ours(*args)
        (out.square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    out_a, g_a = grads()
    ours.set_gradient_checkpointing(True)
    out_b, g_b = grads()
    assert torch.equal(out_a, out_b)
    for n in g_a:
        assert torch.allclose(g_a[n], g_b[n], rtol=1e-5, atol=1e-7), n


def test_gradients_match_reference():
    ref, ours = make_pair(BASE_LIKE)
    args = inputs(BASE_LIKE, B=2)
    ref_forward(ref, *args).square().mean().backward()
    ours(*args).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert rel_err(ref_grads[n].grad, p.grad) <= 1e-4, n


def test_channels_last_and_bf16():
    """Oracles: the contiguous fp32 run for channels_last; diffusers' UNet in bf16 (same weights, same inputs,
    same memory format) for our bf16 maths; our fp32 output for the size of bf16's rounding error."""
    ref, ours = make_pair(BASE_LIKE)
    x, t, ctx, pooled, ids = inputs(BASE_LIKE, B=2)
    x_cl = x.to(memory_format=torch.channels_last)
    assert not x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a = ours(x, t, ctx, pooled, ids)
        assert a.is_contiguous()
        b = ours.to(memory_format=torch.channels_last)(x_cl, t, ctx, pooled, ids)
        assert b.is_contiguous(memory_format=torch.channels_last)  # no hidden .contiguous() copy on the way out
        assert rel_err(a, b) <= 1e-5  # same fp32 maths, other conv kernels: measured 1.4e-6..1.9e-6 (4 seeds)

        ref16, ours16 = ref.to(torch.bfloat16), ours.to(torch.bfloat16, memory_format=torch.contiguous_format)
        # A layer that silently computes or returns fp32 shows up here (its output would not be bf16).
        not_bf16 = []

        def check(name, out):
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.dtype != torch.bfloat16:
                    not_bf16.append(name)
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: check(n, o)) for n, m in ours16.named_modules() if n]
        c = ours16(x, t, ctx, pooled, ids)
        for h in hooks:
            h.remove()
        assert not not_bf16, f"modules whose output is not bf16: {not_bf16[:5]}"
        rc = ref_forward(ref16, x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16(), ids.bfloat16())
        d = ours16.to(memory_format=torch.channels_last)(x_cl, t, ctx, pooled, ids)
    assert c.dtype == d.dtype == torch.bfloat16
    assert d.is_contiguous(memory_format=torch.channels_last)
    # Ours and diffusers run the same bf16 operations: measured bit-identical (0.0, 4 seeds). Allow one bf16 ulp
    # of the output's largest value (2^-8) for a reordered sum; a layer computing in another precision, or
    # wrongly, moves the output by ~1e-2 (the bf16 rounding error below), far beyond it.
    assert rel_err(rc, c) <= 2**-8
    # bf16 rounding alone: measured 1.4%..2.1% max error against fp32 over 6 seeds, contiguous or channels_last;
    # 2x margin. (In bf16, channels_last is not compared with diffusers bit for bit: diffusers makes each
    # transformer's output contiguous, and GroupNorm rounds differently per layout, 1.1%..1.8% measured.)
    assert rel_err(a, c) <= 0.04 and rel_err(a, d) <= 0.04 and rel_err(c, d) <= 0.04


def save_reference(tmp_path, cfg, **kw):
    ref, _ = make_pair(cfg)
    ref.save_pretrained(tmp_path / "unet", **kw)
    return ref


@pytest.mark.parametrize("kw", [{}, {"variant": "fp16"}, {"max_shard_size": "200KB"}],
                         ids=["plain", "fp16-variant", "sharded"])
def test_load_unet_folder(tmp_path, kw):
    ref = save_reference(tmp_path, BASE_LIKE, **kw)
    if kw.get("max_shard_size"):
        assert list((tmp_path / "unet").glob("*.index.json"))
    unet = load_unet(tmp_path / "unet")
    assert unet.config == BASE_LIKE
    assert not any(p.is_meta for p in unet.parameters())
    args = inputs(BASE_LIKE, B=1)
    with torch.no_grad():
        assert rel_err(ref_forward(ref.eval(), *args), unet(*args)) <= 1e-5


def test_load_unet_dtype(tmp_path):
    save_reference(tmp_path, BASE_LIKE)
    unet = load_unet(tmp_path / "unet", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())


def test_load_unet_bad_input(tmp_path):
    save_reference(tmp_path, BASE_LIKE)
    folder = tmp_path / "unet"
    (folder / "config.json").rename(folder / "moved.json")
    with pytest.raises(CheckpointError, match="config.json: missing file"):
        load_unet(folder)
    # A config that does not fit the weights: a wider cross-attention.
    cfg = json.loads((folder / "moved.json").read_text())
    cfg["cross_attention_dim"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"attn2\.to_k\.weight' has shape \(64, 64\) in the file, "
                                              r"the model expects \(64, 96\)"):
        load_unet(folder)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_unet(tmp_path / "nowhere")

"""DoRA and LoKr adapters (sdxl/lora.py), per-block ranks, and their files.

Oracles: peft's DoRA (LoraConfig(use_dora=True)) on single layers and, through diffusers' load_lora_weights, on the
tiny SDXL; LyCORIS' formulas written out here for LoKr (kron of w1 with w2 = w2_a @ w2_b, its factorisation) and for
the older column-norm DoRA files; diffusers' PEFT file for DoRA loaded into ours.
"""
from __future__ import annotations

import copy
import json

import diffusers
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model  # test-only oracle
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import train_args
from torch import nn

import sdxl
import train_sdxl
from sdxl import lora
from sdxl.weights import CheckpointError

from test_lora import tiny  # noqa: E402,F401 (a fixture: the saved tiny model and its folder)


def _pipe(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 4, 16, 16, generator=g), t=torch.tensor([10.0, 500.0]),
                ctx=torch.randn(2, 77, 64, generator=g), pooled=torch.randn(2, 32, generator=g),
                ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), tokens=torch.randint(0, 49408, (2, 77), generator=g))


@torch.no_grad()
def _ours(model, i):
    te2 = model.text.text_encoder_2(i["tokens"], output_hidden_states=True)
    return model.unet(i["x"], i["t"], i["ctx"], i["pooled"], i["ids"]), te2.hidden_states[-2]


@torch.no_grad()
def _reference(pipe, i):
    te2 = pipe.text_encoder_2(i["tokens"], output_hidden_states=True)
    return pipe.unet(i["x"], i["t"], encoder_hidden_states=i["ctx"],
                     added_cond_kwargs={"text_embeds": i["pooled"], "time_ids": i["ids"]}).sample, te2.hidden_states[-2]


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@torch.no_grad()
def _randomise(net, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in net.named_parameters():  # magnitudes stay near the weight norms they start at
        p.copy_(p * (1 + 0.3 * torch.rand(p.shape, generator=g)) if n.endswith("dora_scale") else
                torch.randn(p.shape, generator=g) * std)


# ------------------------------------------------------------------------------------------------------- DoRA

def test_dora_matches_peft_on_linear_and_conv():
    """Outputs, gradients (the norm detached, as the paper and peft) and merged weights equal peft's DoRA."""
    torch.manual_seed(0)
    base = nn.ModuleDict({"lin": nn.Linear(7, 9), "conv": nn.Conv2d(6, 5, 3, stride=2, padding=1),
                          "conv1x1": nn.Conv2d(6, 4, 1)})
    ref = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=5, use_dora=True, init_lora_weights=False,
                                             target_modules=list(base)), copy.deepcopy(base))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.5 * torch.rand(p.shape))  # a learnt magnitude, not the initial |W + s BA|
    inputs = {"lin": torch.randn(4, 7), "conv": torch.randn(2, 6, 9, 9), "conv1x1": torch.randn(2, 6, 5, 5)}
    for name, x in inputs.items():
        layer, theirs = base[name], ref[name]
        ours = lora.DoRA(layer, rank=3, alpha=5)
        with torch.no_grad():
            ours.lora_down.weight.copy_(theirs.lora_A["default"].weight)
            ours.lora_up.weight.copy_(theirs.lora_B["default"].weight)
            ours.dora_scale.copy_(theirs.lora_magnitude_vector["default"].weight.reshape(ours.dora_scale.shape))
        net = lora.LoRANetwork({f"lora_unet_{name}": lora.Target("unet", name, layer)},
                               {f"lora_unet_{name}": ours}).attach()
        got, want = layer(x), theirs(x)
        with torch.no_grad():
            assert (want - theirs.get_base_layer()(x)).abs().max() > 0.1  # the adapter matters
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got.square().sum().backward()
        want.square().sum().backward()
        for mine, their in ((ours.lora_down.weight, theirs.lora_A["default"].weight),
                            (ours.lora_up.weight, theirs.lora_B["default"].weight),
                            (ours.dora_scale, theirs.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(mine.grad.reshape(their.grad.shape), their.grad, rtol=1e-4, atol=1e-5)
        w0 = layer.weight.detach().clone()
        with torch.no_grad():
            net.merge()
            theirs.merge()
            torch.testing.assert_close(layer.weight, theirs.get_base_layer().weight, rtol=1e-5, atol=1e-6)
            net.unmerge()
            torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
            ours.multiplier = 0.5  # our multiplier interpolates: W + m (W' - W)
            full = theirs.get_base_layer().weight
            torch.testing.assert_close(layer.weight + ours.delta_weight(), w0 + 0.5 * (full - w0), rtol=1e-5,
                                       atol=1e-6)
            net.merge()
            torch.testing.assert_close(layer.weight, w0 + 0.5 * (full - w0), rtol=1e-5, atol=1e-6)
            net.unmerge()
            torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
        net.detach()


def test_dora_peft_file_from_diffusers_loads_into_ours(tiny, tmp_path):
    model, folder = tiny
    pipe, i = _pipe(folder), _inputs(3)
    torch.manual_seed(5)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                          target_modules=["to_q", "to_out.0", "conv1"])
    te_cfg = LoraConfig(r=2, lora_alpha=3, use_dora=True, init_lora_weights=False,
                        target_modules=["q_proj", "fc1"])
    pipe.unet.add_adapter(unet_cfg)
    pipe.text_encoder_2.add_adapter(te_cfg)
    reference = _reference(pipe, i)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_2_lora_adapter_metadata=te_cfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(path))
    base = _ours(model, i)
    assert _max_diff(reference, base) > 0.05
    for merge in (False, True):
        net = lora.load_lora(model, path, merge=merge)
        try:
            assert net.config["kind"] == "dora"
            assert _max_diff(_ours(model, i), reference) <= 1e-4
        finally:
            net.remove()
    assert _max_diff(_ours(model, i), base) <= 1e-5


def test_dora_files_we_write_load_in_diffusers_and_back(tiny, tmp_path):
    """PEFT layout (lora_magnitude_vector) into diffusers; kohya / LyCORIS layout (dora_scale per output row, LyCORIS'
    wd_on_output) back into ours, attached and merged."""
    model, folder = tiny
    i = _inputs(4)
    base = _ours(model, i)
    net = lora.inject(model, "attention_out+conv", rank=4, alpha=2.0, kind="dora", conv_rank=3, conv_alpha=6.0,
                      text_encoders=True, text_rank=2)
    _randomise(net)
    try:
        want = _ours(model, i)
    finally:
        net.remove()
    assert _max_diff(want, base) > 0.05
    lora.save_lora(tmp_path / "peft.safetensors", net, format="peft")
    lora.save_lora(tmp_path / "kohya.safetensors", net)
    pipe = _pipe(folder)
    pipe.load_lora_weights(str(tmp_path / "peft.safetensors"))
    # The UNet only: diffusers 0.42 with transformers 5 drops the DoRA magnitudes of text encoders, its own files'
    # too (transformers' loader expects `lora_magnitude_vector.weight`); ours load there in the test above.
    assert (_reference(pipe, i)[0] - want[0]).abs().max() <= 1e-4

    keys = load_file(tmp_path / "kohya.safetensors")
    assert keys["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale"].shape == (64, 1)
    assert keys["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].shape == (32, 1, 1, 1)
    with safe_open(str(tmp_path / "kohya.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    for merge in (False, True):
        back = lora.load_lora(model, tmp_path / "kohya.safetensors", merge=merge)
        try:
            assert _max_diff(_ours(model, i), want) <= 1e-5
        finally:
            back.remove()
    assert _max_diff(_ours(model, i), base) <= 1e-5


def test_column_norm_dora_file_of_older_lycoris(tiny, tmp_path):
    """LyCORIS before its wd_on_output option (and A1111's reader) keep dora_scale per input column, (1, in[, 1, 1]):
    W' = V * dora_scale / |V|_columns, V = W + (alpha / r) up @ down, and a multiplier m gives W + m (W' - W)
    (ComfyUI's strength)."""
    model, _ = tiny
    layers = lora._layers(model)
    g = torch.Generator().manual_seed(7)
    sd = {}  # a square Linear (64 -> 64: (1, 64) and (64, 1) differ only in layout) and a 3x3 conv
    names = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_unet_input_blocks_1_0_in_layers_2"]
    for name in names:
        w, r = layers[name].module.weight, 2
        sd[f"{name}.lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], r, *([1, 1] if w.dim() == 4 else []), generator=g)
        sd[f"{name}.alpha"] = torch.tensor(1.0)
        sd[f"{name}.dora_scale"] = torch.rand(1, w.shape[1], *([1, 1] if w.dim() == 4 else []), generator=g) + 0.5
    save_file(sd, str(tmp_path / "old.safetensors"))
    before = {n: layers[n].module.weight.detach().clone() for n in names}
    for m in (1.0, 0.5):
        net = lora.load_lora(model, tmp_path / "old.safetensors", scale=m)
        try:
            for name in names:
                w = before[name].double()
                up, down = sd[f"{name}.lora_up.weight"].double(), sd[f"{name}.lora_down.weight"].double()
                v = w + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
                col = v.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
                full = v * sd[f"{name}.dora_scale"].double() / col
                torch.testing.assert_close(layers[name].module.weight.double(), w + m * (full - w), rtol=1e-5,
                                           atol=1e-6)
        finally:
            net.remove()
    x = torch.randn(3, 64)
    attached = lora.load_lora(model, tmp_path / "old.safetensors", merge=False)
    with torch.no_grad():
        y = layers[names[0]].module(x)
        attached.merge()
        torch.testing.assert_close(layers[names[0]].module(x), y, rtol=1e-5, atol=1e-5)
    attached.remove()
    with pytest.raises(ValueError, match="column-norm DoRA"):
        lora.save_lora(tmp_path / "x.safetensors", attached, format="peft")


# ------------------------------------------------------------------------------------------------------- LoKr

def test_lokr_factorisation_and_shapes_follow_lycoris():
    # LyCORIS' factorization(dim, factor) (lycoris/functional/general.py), its values for these dims.
    table = {(128, -1): (8, 16), (250, -1): (10, 25), (360, -1): (18, 20), (127, -1): (1, 127), (1024, -1): (32, 32),
             (1280, -1): (32, 40), (128, 4): (4, 32), (360, 8): (8, 45), (64, 16): (4, 16), (32, 16): (2, 16)}
    assert {k: lora.factorization(*k) for k in table} == table
    with pytest.raises(ValueError, match="LoKr factor 16 does not divide the layer dimension 360"):
        lora.factorization(360, 16)
    # out 128 = 8 * 16, in 64 = 8 * 8: w1 (8, 8); w2 (16, 8) low-rank while r < max(16, 8) / 2.
    lin = nn.Linear(64, 128)
    shapes = lambda a: {n: tuple(p.shape) for n, p in a.named_parameters()}  # noqa: E731
    assert shapes(lora.LoKr(lin, 2)) == {"lokr_w1": (8, 8), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 8)}
    full = lora.LoKr(lin, 8, alpha=3.0)
    assert shapes(full) == {"lokr_w1": (8, 8), "lokr_w2": (16, 8)} and full.scale == 1.0  # LyCORIS: alpha unused
    conv = nn.Conv2d(32, 64, 3, padding=1)  # out 64 = 8 * 8, in 32 = 4 * 8
    assert shapes(lora.LoKr(conv, 2, factor=4)) == {"lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 72)}
    for a in (lora.LoKr(lin, 2), full, lora.LoKr(conv, 2)):
        assert a.delta_weight().abs().max() == 0  # LyCORIS' init: w2 (or w2_b) zero


def _lycoris_lokr_delta(sd: dict, name: str, shape) -> torch.Tensor:
    """LyCORIS' LoKr, in float64: w1 = lokr_w1 or w1_a @ w1_b; w2 = lokr_w2 or w2_a @ w2_b (viewed as (b, d, kh, kw)
    for a conv); Delta W = kron(w1, w2) (w1 unsqueezed to (a, c, 1, 1) for a conv) * alpha / r, r the low-rank
    factors' rank (w2's if both are; scale 1 when both are full matrices)."""
    d = lambda k: sd[f"{name}.{k}"].double()  # noqa: E731
    w1 = d("lokr_w1") if f"{name}.lokr_w1" in sd else d("lokr_w1_a") @ d("lokr_w1_b")
    w2 = d("lokr_w2") if f"{name}.lokr_w2" in sd else d("lokr_w2_a") @ d("lokr_w2_b").flatten(1)
    if len(shape) == 4:
        w2, w1 = w2.reshape(w2.shape[0], -1, *shape[2:]), w1[:, :, None, None]
    r = next((sd[f"{name}.{k}"].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if f"{name}.{k}" in sd), None)
    scale = sd[f"{name}.alpha"].item() / r if r else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def test_lokr_network_matches_lycoris_formula_and_round_trips(tiny, tmp_path):
    model, _ = tiny
    i = _inputs(6)
    base = _ours(model, i)
    net = lora.inject(model, "attention_out+conv", rank=2, alpha=3.0, kind="lokr", text_encoders=True)
    _randomise(net, std=0.4)
    try:
        want = _ours(model, i)
        sd = net.state_dict()
        for name, a in net.named_children():  # every adapter's Delta W is LyCORIS'; then the hook's output
            delta = _lycoris_lokr_delta(sd, name, a.shape)
            torch.testing.assert_close(a.delta_weight().double(), delta, rtol=1e-5, atol=1e-7)
        layer = net.targets["lora_unet_input_blocks_1_0_in_layers_2"].module
        x = torch.randn(1, 32, 8, 8)
        with torch.no_grad():
            got = layer(x)
            delta = _lycoris_lokr_delta(sd, "lora_unet_input_blocks_1_0_in_layers_2", layer.weight.shape)
            torch.testing.assert_close(got, F.conv2d(x, layer.weight + delta.float(), layer.bias, padding=1),
                                       rtol=1e-5, atol=1e-5)
            assert delta.abs().max() > 0.01
    finally:
        net.remove()
    assert _max_diff(want, base) > 0.05
    path = tmp_path / "lokr.safetensors"
    lora.save_lora(path, net)
    keys = load_file(path)
    k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 64 -> 64: w1 (8, 8), w2 = (8, 2) @ (2, 8)
    assert {kk.split(".", 1)[1]: tuple(v.shape) for kk, v in keys.items() if kk.startswith(k + ".")} == {
        "lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8), "alpha": ()}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "-1"}
    for merge in (False, True):
        back = lora.load_lora(model, path, merge=merge)
        try:
            assert back.config["kind"] == "lokr" and _max_diff(_ours(model, i), want) <= 1e-5
        finally:
            back.remove()
    with pytest.raises(ValueError, match=r"unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q: "
                                         r"LoKr factor 5 does not divide the layer dimension 64"):
        lora.inject(model, "attention", kind="lokr", factor=5)


def test_lokr_file_variants_and_bad_factors(tiny, tmp_path):
    """w1 split into lokr_w1_a @ lokr_w1_b and a full 4-d lokr_w2 (other LyCORIS options) load with LyCORIS'
    delta; factors that do not make the layer's weight are refused naming the file, and nothing is applied."""
    model, _ = tiny
    layers = lora._layers(model)
    g = torch.Generator().manual_seed(3)
    lin, conv = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_unet_input_blocks_1_0_in_layers_2"
    sd = {f"{lin}.lokr_w1_a": torch.randn(8, 2, generator=g), f"{lin}.lokr_w1_b": torch.randn(2, 8, generator=g),
          f"{lin}.lokr_w2": torch.randn(8, 8, generator=g) * 0.1, f"{lin}.alpha": torch.tensor(1.0),
          f"{conv}.lokr_w1": torch.randn(4, 4, generator=g), f"{conv}.lokr_w2": torch.randn(8, 8, 3, 3, generator=g),
          f"{conv}.alpha": torch.tensor(4.0)}
    save_file(sd, str(tmp_path / "v.safetensors"))
    before = {n: layers[n].module.weight.detach().clone() for n in (lin, conv)}
    net = lora.load_lora(model, tmp_path / "v.safetensors", scale=0.5)
    try:
        for n in (lin, conv):
            want = before[n].double() + 0.5 * _lycoris_lokr_delta(sd, n, before[n].shape)
            torch.testing.assert_close(layers[n].module.weight.double(), want, rtol=1e-5, atol=1e-6)
    finally:
        net.remove()
    sd[f"{conv}.lokr_w1"] = torch.randn(8, 4)  # 8 * 8 rows: 64, not the layer's 32
    save_file(sd, str(tmp_path / "bad.safetensors"))
    before = {n: layers[n].module.weight.detach().clone() for n in (lin, conv)}
    with pytest.raises(CheckpointError, match=rf"bad.safetensors: {conv}: LoKr factors .* make a \(64, 288\) weight"):
        lora.load_lora(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(layers[n].module.weight, before[n]) for n in (lin, conv))


# -------------------------------------------------------------------------------------------- per-block ranks

def test_per_block_rank_and_alpha(tiny, train_data, tmp_path):
    model, _ = tiny
    net = lora.inject(model, "all", rank={"": 2, "down_blocks.1": 4, "up_blocks.0.attentions.1": 6, "mid_block": 0},
                      alpha={"down_blocks.1": 8.0}, text_encoders=True, text_rank=3, attach=False)
    got = {t.path: (a.rank, float(a.alpha)) for a, t in zip(net.children(), net.targets.values())
           if t.component == "unet"}
    assert got and not any(p.startswith("mid_block.") for p in got)
    for path, ra in got.items():
        want = (4, 8.0) if path.startswith("down_blocks.1.") else (6, 6.0) if path.startswith(
            "up_blocks.0.attentions.1.") else (2, 2.0)
        assert ra == want, path
    assert {a.rank for a, t in zip(net.children(), net.targets.values()) if t.component != "unet"} == {3}
    with pytest.raises(ValueError, match="no block 'down_blocks.7' in this model"):
        lora.inject(model, rank={"down_blocks.7": 4})
    assert lora.block_values("down_blocks.1=8, mid_block = 16:4", 4, 16.0) == (
        {"": 4, "down_blocks.1": 8, "mid_block": 16}, {"": 16.0, "down_blocks.1": None, "mid_block": 4.0})

    # The trainer: --lora_kind dora with --lora_block_ranks; a malformed spec is one line and exit 2.
    out = tmp_path / "run"
    assert train_sdxl.main(train_args(train_data, out, "--use_lora", "--lora_kind", "dora", "--lora_block_ranks",
                            "down_blocks.1=2,mid_block=0", "--max_steps", 1, "--batch_size", 2)) == 0
    keys = load_file(out / "lora_final.safetensors")
    ranks = {k.split(".")[0]: v.shape[0] for k, v in keys.items() if k.endswith("lora_down.weight")}
    for k, r in ranks.items():  # down_blocks.1 is input_blocks 4 and 5; the rest has --lora_rank's 4
        assert r == (2 if k.startswith(("lora_unet_input_blocks_4_", "lora_unet_input_blocks_5_")) else 4), k
    assert {"lora_unet_input_blocks_4", "lora_unet_input_blocks_7"} <= {k[:24] for k in ranks}
    assert not any(k.startswith("lora_unet_middle_block") for k in ranks)
    assert all(f"{k}.dora_scale" in keys for k in ranks)


def test_bad_block_spec_exits_2(capsys):
    assert train_sdxl.main(["--use_lora", "--lora_block_ranks", "down_blocks.1=x", "--data_dir", "."]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "train_sdxl.py: error: --lora_block_ranks: 'down_blocks.1=x' is not prefix=rank[:alpha]"

"""LoRA / LoCon / LoHa (sdxl/lora.py) against the reference library and hand-computed deltas.

The oracle for the file formats is diffusers' StableDiffusionXLPipeline.load_lora_weights (with peft, which it
needs): a kohya file we write must load there and give our outputs, and a PEFT file diffusers writes must load
here and give its outputs. The tiny SDXL's networks are copied through save_pretrained, so both sides hold the
same base weights.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import diffusers
import pytest
import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoraConfig, inject_adapter_in_model  # test-only oracle; diffusers needs it too
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sdxl
from sdxl import lora
from sdxl.config import SDXL_BASE, UNetConfig
from sdxl.model import build_model
from sdxl.unet import UNet
from sdxl.weights import CheckpointError

TOL = 1e-4  # max |ours - reference| on outputs of order 1
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = sdxl.load_model("tiny")
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def pipe(tiny):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny[1])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    B = 2
    return dict(x=torch.randn(B, 4, 16, 16, generator=g), t=torch.tensor([10.0, 500.0]),
                ctx=torch.randn(B, 77, 64, generator=g), pooled=torch.randn(B, 32, generator=g),
                ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * B),
                tokens=torch.randint(0, 49408, (B, 77), generator=g))


@torch.no_grad()
def _ours(model, i):
    """UNet output, CLIP-L penultimate hidden state, bigG penultimate hidden state and pooled projection."""
    te1 = model.text.text_encoder(i["tokens"], output_hidden_states=True)
    te2 = model.text.text_encoder_2(i["tokens"], output_hidden_states=True)
    return (model.unet(i["x"], i["t"], i["ctx"], i["pooled"], i["ids"]), te1.hidden_states[-2],
            te2.hidden_states[-2], te2.text_embeds)


@torch.no_grad()
def _reference(pipe, i):
    te1 = pipe.text_encoder(i["tokens"], output_hidden_states=True)
    te2 = pipe.text_encoder_2(i["tokens"], output_hidden_states=True)
    unet = pipe.unet(i["x"], i["t"], encoder_hidden_states=i["ctx"],
                     added_cond_kwargs={"text_embeds": i["pooled"], "time_ids": i["ids"]}).sample
    return unet, te1.hidden_states[-2], te2.hidden_states[-2], te2.text_embeds


def _lora_hooks(model) -> int:
    """Forward hooks of ours on the model (transformers registers hooks of its own)."""
    return sum("_branch_hook" in h.__qualname__ for m in model.modules() for h in m._forward_hooks.values())


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@torch.no_grad()
def _randomise(net: lora.LoRANetwork, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)


def _trained_lora(model, mode="all+conv", **kw) -> lora.LoRANetwork:
    kw = {"rank": 4, "alpha": 2.0, "conv_rank": 3, "conv_alpha": 6.0, "text_encoders": True, "text_rank": 2,
          "text_alpha": 1.0, **kw}
    net = lora.inject(model, mode, **kw)
    _randomise(net)
    return net


# ------------------------------------------------------------------------------------- against the reference

def test_kohya_file_loads_in_diffusers_with_our_outputs(tiny, pipe, tmp_path):
    model, _ = tiny
    i = _inputs()
    base = _ours(model, i)
    net = _trained_lora(model)  # LoRA on every Transformer2D Linear, LoCon 3x3 and 1x1, both text encoders
    try:
        ours = _ours(model, i)
        path = tmp_path / "lora.safetensors"
        lora.save_lora(path, net, metadata={"resolution": 1024, "training_config": {"lr": 1e-4}})
    finally:
        net.remove()
    assert _max_diff(ours, base) > 0.05  # the LoRA does change every output we compare
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours, base))

    keys = load_file(path)
    # The original-layout names ComfyUI and A1111 look up.
    for k in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
              "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj.lora_up.weight",
              "lora_unet_output_blocks_2_2_conv.alpha", "lora_unet_input_blocks_1_0_out_layers_3.lora_down.weight",
              "lora_unet_input_blocks_4_0_skip_connection.lora_up.weight",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
              "lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha"):
        assert k in keys, k
    assert keys["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (3, 32, 3, 3)
    assert keys["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"].shape == (32, 3, 1, 1)
    assert keys["lora_unet_output_blocks_2_2_conv.alpha"].item() == 6.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_resolution"] == "(1024, 1024)" and json.loads(meta["ss_training_config"]) == {"lr": 1e-4}
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "6.0"}

    pipe.load_lora_weights(str(path))
    n_unet = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A"))
    assert n_unet == sum(t.component == "unet" for t in net.targets.values())  # nothing dropped
    assert _max_diff(_reference(pipe, i), ours) <= TOL


def test_peft_file_from_diffusers_loads_into_ours(tiny, pipe, tmp_path):
    model, _ = tiny
    i = _inputs(3)
    torch.manual_seed(5)
    # init_lora_weights=False: random lora_B too, so the adapter is not a no-op; alpha != r.
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"])
    te_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    pipe.unet.add_adapter(unet_cfg)
    pipe.text_encoder.add_adapter(te_cfg)
    pipe.text_encoder_2.add_adapter(te_cfg)
    reference = _reference(pipe, i)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
        text_encoder_2_lora_adapter_metadata=te_cfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in load_file(path))

    base = _ours(model, i)
    net = lora.load_lora(model, path, merge=False)
    try:
        assert _lora_hooks(model) == len(net.targets)
        assert _max_diff(_ours(model, i), base) > 0.05
        assert _max_diff(_ours(model, i), reference) <= TOL
        assert {float(a.alpha) for a in net.children()} == {8.0, 3.0}
    finally:
        net.remove()
    # merged (the default) gives the same outputs, and remove() restores the base exactly enough.
    net = lora.load_lora(model, path)
    try:
        assert _max_diff(_ours(model, i), reference) <= TOL
    finally:
        net.remove()
    assert _max_diff(_ours(model, i), base) <= 1e-5


def test_peft_file_we_write_loads_in_diffusers(tiny, pipe, tmp_path):
    model, _ = tiny
    i = _inputs(4)
    net = _trained_lora(model, "attention_out+conv")  # conv: rank 3 / alpha 6 beside rank 4 / alpha 2
    try:
        ours = _ours(model, i)
        path = tmp_path / "peft.safetensors"
        lora.save_lora(path, net, format="peft")
    finally:
        net.remove()
    keys = load_file(path)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight" in keys
    pipe.load_lora_weights(str(path))
    assert _max_diff(_reference(pipe, i), ours) <= TOL
    back = lora.load_lora(model, path)  # and back into ours: the alphas come from the metadata's patterns
    try:
        assert _max_diff(_ours(model, i), ours) <= 1e-5
    finally:
        back.remove()


# ------------------------------------------------------------------------------------------- our own formats

def test_kohya_variants_load_back_with_the_same_outputs(tiny, tmp_path):
    model, _ = tiny
    i = _inputs(5)
    net = _trained_lora(model)
    try:
        want = _ours(model, i)
    finally:
        net.remove()
    sd = net.state_dict()
    path = tmp_path / "kohya.safetensors"
    lora.save_lora(path, net, dtype=torch.float32)
    # diffusers-named kohya keys (some SDXL trainers) and SD1-style `lora_te_` for CLIP-L.
    renamed = {}
    for name, t in net.targets.items():
        new = "lora_te_" + t.path.replace(".", "_") if t.component == "text_encoder" else (
            lora.KOHYA_PREFIX[t.component] + t.path.replace(".", "_"))
        for k, v in sd.items():
            if k.startswith(name + "."):
                renamed[new + k[len(name):]] = v
    assert len(renamed) == len(sd) and "lora_unet_down_blocks_1_attentions_0_proj_in.alpha" in renamed
    variant = tmp_path / "diffusers_named.safetensors"
    save_file(renamed, str(variant))
    # diffusers' older `.lora.down / .lora.up` names with per-module `.alpha` tensors (no adapter metadata).
    peft = tmp_path / "peft.safetensors"
    lora.save_lora(peft, net, format="peft")
    old = {k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight"): v
           for k, v in load_file(peft).items()}
    old.update({f"{t.component}.{t.path}.alpha": net.get_submodule(n).alpha for n, t in net.targets.items()})
    old_path = tmp_path / "old_diffusers.safetensors"
    save_file(old, str(old_path))
    for p in (path, variant, old_path):
        loaded = lora.load_lora(model, p)
        try:
            assert _max_diff(_ours(model, i), want) <= 1e-5
        finally:
            loaded.remove()


def test_merge_unmerge_round_trip_and_several_loras(tiny, tmp_path):
    model, _ = tiny
    i = _inputs(6)
    before = copy.deepcopy(model.unet.state_dict())
    base = _ours(model, i)
    a = _trained_lora(model)
    _randomise(a, seed=7)
    attached = _ours(model, i)
    assert set(model.unet.state_dict()) == set(before)  # base parameter names untouched while attached
    a.merge()
    assert _max_diff(_ours(model, i), attached) <= 1e-5
    a.unmerge()
    for k, v in model.unet.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
    assert _max_diff(_ours(model, i), base) <= 1e-5
    a.detach()
    assert _lora_hooks(model) == 0

    # Two files with their own scales: merged weights are W + 0.5 dA - 1.5 dB, by hand for one layer.
    b = _trained_lora(model, "attention")
    _randomise(b, seed=8)
    b.detach()
    lora.save_lora(tmp_path / "a.safetensors", a)
    lora.save_lora(tmp_path / "b.safetensors", b)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    w0 = a.targets[name].module.weight.clone()
    da = a.get_submodule(name)
    db = b.get_submodule(name)
    by_hand = (w0 + 0.5 * (da.alpha / da.rank) * da.lora_up.weight @ da.lora_down.weight
               - 1.5 * (db.alpha / db.rank) * db.lora_up.weight @ db.lora_down.weight)
    la = model.load_lora(tmp_path / "a.safetensors", 0.5)
    lb = model.load_lora(tmp_path / "b.safetensors", scale=-1.5)
    torch.testing.assert_close(a.targets[name].module.weight, by_hand, rtol=0, atol=1e-6)
    merged = _ours(model, i)
    la.remove(), lb.remove()
    la, lb = lora.load_lora(model, tmp_path / "a.safetensors", 0.5, merge=False), \
        lora.load_lora(model, tmp_path / "b.safetensors", -1.5, merge=False)
    assert _max_diff(_ours(model, i), merged) <= 1e-5
    la.multiplier = 0.0
    lb.multiplier = 0.0
    assert _max_diff(_ours(model, i), base) <= 1e-5  # the merge / unmerge cycles above leave float error
    la.remove(), lb.remove()
    assert _max_diff(_ours(model, i), base) <= 1e-5


class _Ops(TorchDispatchMode):
    """The aten compute ops run inside it (views, which move no data, left out)."""

    def __enter__(self):
        self.ops = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten._unsafe_view.default:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops(layer, x) -> list[str]:
    with _Ops() as counted:
        layer(x)
    return counted.ops


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_unmerged_lora_costs_three_ops_in_the_activation_dtype(kind):
    """Per unmerged adapter: the down and up matmuls (convolutions for LoCon) and one add carrying the scale, a
    Python float refreshed with the multiplier; a bf16 forward on fp32 masters casts each master once per change of
    it (not per call), gradients still reach the fp32 masters, and a merged LoRA adds no op at all.

    Oracle: the same branch written with fresh casts on every call, `torch.add(y, up(down(x)), alpha=scale)`."""
    torch.manual_seed(0)
    base, x = (nn.Linear(8, 6), torch.randn(2, 5, 8)) if kind == "linear" else \
        (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 8, 8))
    compute = ["mm", "mm", "add"] if kind == "linear" else ["convolution", "convolution", "add"]
    adapter = lora.LoRA(base, rank=3, alpha=1.5)
    nn.init.normal_(adapter.lora_up.weight)
    net = lora.LoRANetwork({"lora_unet_x": lora.Target("unet", "x", base)}, {"lora_unet_x": adapter})
    bare = _ops(base, x)
    net.attach()
    assert _ops(base, x)[len(bare):] == compute and _ops(base, x)[:len(bare)] == bare

    def by_hand(layer, x, a):  # the branch of adapter a, with fresh casts of its masters to x's dtype
        down, up = a.lora_down.weight.to(x.dtype), a.lora_up.weight.to(x.dtype)
        h = F.linear(x, down) if kind == "linear" else F.conv2d(x, down, stride=2, padding=1)
        return torch.add(layer(x), F.linear(h, up) if kind == "linear" else F.conv2d(h, up), alpha=a.scale)

    for m in (1.0, -0.4):
        net.multiplier = m
        assert isinstance(adapter.scale, float) and adapter.scale == m * 0.5
        with torch.no_grad():
            got = base(x)
            net.detach()
            want = by_hand(base, x, adapter)
            net.attach()
        assert torch.equal(got, want)

    # bf16 activations on a bf16 base, fp32 masters: one cast per master, then 3 ops per call.
    base.to(torch.bfloat16)
    xb = x.bfloat16()
    casts = lambda ops: (ops.count("_to_copy"), [o for o in ops[len(bare):] if o != "_to_copy"])  # noqa: E731
    assert casts(_ops(base, xb)) == (2, compute) and casts(_ops(base, xb)) == (0, compute)
    # Training, two micro-steps per optimizer step: the fp32 masters get the gradients of the bf16 maths.
    ref = copy.deepcopy(adapter)
    for step in range(2):
        for micro in range(2):
            base(xb).float().square().sum().backward()
        net.detach()
        for micro in range(2):
            by_hand(base, xb, ref).float().square().sum().backward()
        net.attach()
        assert base(xb).dtype == torch.bfloat16
        for p, q in zip(adapter.parameters(), ref.parameters()):
            assert p.dtype == p.grad.dtype == torch.float32 and p.grad.abs().max() > 0
            assert torch.equal(p.grad, q.grad)
        with torch.no_grad():  # the optimizer's in-place step
            for p in [*adapter.parameters(), *ref.parameters()]:
                p.sub_(1e-3 * p.grad)
                p.grad = None
        assert casts(_ops(base, xb)) == (2, compute)  # new masters: cast once again
    # Merged: the base layer's ops only.
    net.merge()
    assert _ops(base, xb) == bare


def test_unet_with_lora_compiles_as_one_graph():
    """torch.compile(fullgraph=True) of a whole UNet (two levels, to keep tracing short) with LoRA and LoCon
    attached: no graph break, and the compiled output is the eager one."""
    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, transformer_depth=(0, 1), mid_transformer_depth=1,
                     num_attention_heads=(1, 2), cross_attention_dim=64, pooled_dim=32, addition_time_embed_dim=8)
    unet = UNet(cfg).eval()
    i = _inputs(11)
    args = (i["x"], i["t"], i["ctx"], i["pooled"], i["ids"])
    net = lora.inject(unet, "attention+conv", rank=2)
    _randomise(net)
    assert {type(t.module) for t in net.targets.values()} == {nn.Linear, nn.Conv2d}
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(unet, fullgraph=True, backend="eager")(*args)
            torch.testing.assert_close(out, unet(*args), rtol=1e-5, atol=1e-5)
            net.detach()
            assert (out - unet(*args)).abs().max() > 1e-2  # the adapters were in the compiled graph
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------- LoCon and LoHa by hand

def test_locon_and_loha_match_hand_computed_deltas(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    lin = nn.Linear(7, 9)
    x_conv, x_lin = torch.randn(2, 6, 8, 8), torch.randn(4, 7)

    locon = lora.LoRA(conv, rank=3, alpha=1.5)
    nn.init.normal_(locon.lora_up.weight)
    locon.multiplier = 0.7
    up, down = locon.lora_up.weight[:, :, 0, 0], locon.lora_down.weight  # (5, 3), (3, 6, 3, 3)
    delta = 0.7 * (1.5 / 3) * torch.einsum("or,rikl->oikl", up, down)
    torch.testing.assert_close(locon.delta_weight(), delta)
    torch.testing.assert_close(conv(x_conv) + locon(x_conv), F.conv2d(x_conv, conv.weight + delta, conv.bias,
                                                                      stride=2, padding=1), rtol=1e-5, atol=1e-5)

    for base, x in ((lin, x_lin), (conv, x_conv)):
        loha = lora.LoHa(base, rank=2, alpha=3.0)
        assert loha.delta_weight().abs().max() == 0  # w2_a starts at zero
        nn.init.normal_(loha.hada_w2_a)
        w1 = loha.hada_w1_a @ loha.hada_w1_b
        w2 = loha.hada_w2_a @ loha.hada_w2_b
        delta = ((w1 * w2) * (3.0 / 2)).reshape(base.weight.shape)
        torch.testing.assert_close(loha.delta_weight(), delta)
        want = F.linear(x, base.weight + delta, base.bias) if base is lin else \
            F.conv2d(x, base.weight + delta, base.bias, stride=2, padding=1)
        torch.testing.assert_close(base(x) + loha(x), want, rtol=1e-5, atol=1e-5)


def test_loha_matches_peft_loha_on_linear_and_conv():
    """Oracle: peft's LoHa (LoHaConfig; its maths is LyCORIS' HadaWeight) with the same factors and alpha.

    peft's default Conv2d form (use_effective_conv2d=False) is the one ours and LyCORIS' default write: w*_a
    (out, r), w*_b (r, in * kh * kw), Delta W reshaped to the kernel. peft's use_effective_conv2d=True is
    LyCORIS' Tucker form (use_tucker): hada_t1 / hada_t2 (r, r, kh, kw), w*_a (r, out), w*_b (r, in), Delta W =
    einsum(t1, w1_b, w1_a) * einsum(t2, w2_b, w2_a) * alpha / r; ours does not implement it and refuses such
    files (test_loha_file_written_by_lycoris_loads_with_its_deltas).
    """
    torch.manual_seed(0)
    base = nn.ModuleDict({"lin": nn.Linear(7, 9), "conv": nn.Conv2d(6, 5, 3, stride=2, padding=1),
                          "conv1x1": nn.Conv2d(6, 4, 1)})
    ref = inject_adapter_in_model(LoHaConfig(r=3, alpha=5.0, init_weights=False,
                                             target_modules=["lin", "conv", "conv1x1"]), copy.deepcopy(base))
    with torch.no_grad():  # set factors of order 1 (peft's kaiming init gives Delta W ~ 0.05)
        for n, p in ref.named_parameters():
            if ".hada_" in n:
                p.copy_(torch.randn(p.shape) * (0.5 if n.endswith("_a.default") else 1.0))
    inputs = {"lin": torch.randn(4, 7), "conv": torch.randn(2, 6, 9, 9), "conv1x1": torch.randn(2, 6, 5, 5)}
    for name, x in inputs.items():
        layer, theirs = base[name], ref[name]
        assert "hada_t1" not in dict(theirs.named_parameters())  # the flattened form, not Tucker
        ours = lora.LoHa(layer, rank=3, alpha=5.0)
        ours.load_state_dict({**{k: getattr(theirs, k)["default"].detach() for k in
                                 ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}, "alpha": ours.alpha})
        for m in (0.7, 1.0):  # ours' multiplier is peft's set_scale
            ours.multiplier = m
            theirs.set_scale("default", m)
            with torch.no_grad():
                want_delta = theirs.get_delta_weight("default")
                assert want_delta.abs().max() > 0.5
                torch.testing.assert_close(ours.delta_weight(), want_delta, rtol=1e-6, atol=1e-6)
                want = theirs(x)  # base layer + peft's LoHa branch
                torch.testing.assert_close(layer(x) + ours(x), want, rtol=1e-5, atol=1e-5)
        # Merged: peft's merge() and ours give the same weight.
        net = lora.LoRANetwork({f"lora_unet_{name}": lora.Target("unet", name, layer)},
                               {f"lora_unet_{name}": ours})
        w0 = layer.weight.detach().clone()
        with torch.no_grad():
            net.merge()
            theirs.merge()
            torch.testing.assert_close(layer.weight, theirs.get_base_layer().weight, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        net.unmerge()
        torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


LYCORIS_LOHA = FIXTURES / "lycoris_loha.safetensors"  # written by LyCORIS 4.1.3: see fixtures/make_lycoris_loha.py


def _lycoris_delta(sd: dict, name: str, shape) -> torch.Tensor:
    """LyCORIS' LoHa: Delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, rank = w1_b.shape[0], in float64."""
    w1 = sd[f"{name}.hada_w1_a"].double() @ sd[f"{name}.hada_w1_b"].double()
    w2 = sd[f"{name}.hada_w2_a"].double() @ sd[f"{name}.hada_w2_b"].double()
    return (w1 * w2 * (sd[f"{name}.alpha"].item() / sd[f"{name}.hada_w1_b"].shape[0])).reshape(shape)


def test_loha_file_written_by_lycoris_loads_with_its_deltas(tiny, tmp_path):
    """A LoHa file written by LyCORIS' kohya wrapper (original-layout UNet names, lora_te1_ / lora_te2_, linear
    rank 2 / alpha 1, conv 3x3 rank 3 / alpha 6, a stride-2 conv) loads into ours with the delta of LyCORIS'
    formula, and ours gives LyCORIS' own layer outputs (the fixture holds LyCORIS' delta output on an input)."""
    model, _ = tiny
    file = load_file(LYCORIS_LOHA)
    lyco_out = load_file(FIXTURES / "lycoris_loha_outputs.safetensors")
    names = {k.rsplit(".", 1)[0] for k in file}
    assert len(names) == 7
    assert {"lora_unet_input_blocks_3_0_op", "lora_te2_text_model_encoder_layers_0_mlp_fc1"} <= names
    layers = lora._layers(model)
    before = {n: layers[n].module.weight.detach().clone() for n in names}

    net = lora.load_lora(model, LYCORIS_LOHA, merge=False)
    try:
        assert set(net.targets) == names and all(isinstance(a, lora.LoHa) for a in net.children())
        for name in names:
            layer, adapter = net.targets[name].module, net.get_submodule(name)
            want = _lycoris_delta(file, name, layer.weight.shape)
            torch.testing.assert_close(adapter.delta_weight().double(), want, rtol=1e-5, atol=1e-5)
            # Through the hook, on LyCORIS' input: our layer minus the bare layer is LyCORIS' delta output.
            x, diff = lyco_out[f"{name}.x"], lyco_out[f"{name}.diff"]
            with torch.no_grad():
                attached = layer(x)
                net.detach()
                bare = layer(x)
                net.attach()
            assert diff.abs().max() > 1.0
            torch.testing.assert_close(attached - bare, diff, rtol=1e-5, atol=5e-5)  # measured <= 4e-6, |diff| <= 44
    finally:
        net.remove()
    merged = lora.load_lora(model, LYCORIS_LOHA, scale=0.5)
    try:
        for name in names:
            w = merged.targets[name].module.weight
            torch.testing.assert_close(w.double(), before[name].double() + 0.5 * _lycoris_delta(file, name, w.shape),
                                       rtol=1e-5, atol=1e-5)
    finally:
        merged.remove()

    # LyCORIS' Tucker conv form (hada_t1 / hada_t2) is refused, not misread, and nothing is applied.
    before = {n: layers[n].module.weight.detach().clone() for n in names}
    with pytest.raises(ValueError, match=r"unsupported LoRA tensor 'lora_unet_input_blocks_\w+\.hada_t[12]'"):
        lora.load_lora(model, FIXTURES / "lycoris_loha_tucker.safetensors")
    assert all(torch.equal(layers[n].module.weight, before[n]) for n in names)


def test_our_loha_file_has_lycoris_keys_shapes_and_dtypes(tiny, tmp_path):
    """Our writer, for the modules of the LyCORIS fixture with its ranks and alphas, writes exactly LyCORIS' key
    set, shapes and dtypes, and its tensors mean what LyCORIS' formula says (a swapped or mislabelled factor
    changes the formula's result)."""
    model, _ = tiny
    theirs = load_file(LYCORIS_LOHA)
    layers = lora._layers(model)
    targets, adapters = {}, {}
    for name in {k.rsplit(".", 1)[0] for k in theirs}:
        targets[name] = layers[name]  # LyCORIS' module names are ours
        adapters[name] = lora.LoHa(layers[name].module, rank=theirs[f"{name}.hada_w1_b"].shape[0],
                                   alpha=theirs[f"{name}.alpha"].item())
    net = lora.LoRANetwork(targets, adapters, {"kind": "loha"})
    _randomise(net, seed=3, std=0.5)
    path = tmp_path / "ours.safetensors"
    lora.save_lora(path, net)
    ours = load_file(path)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert (ours[k].shape, ours[k].dtype) == (theirs[k].shape, theirs[k].dtype), k
        if k.endswith(".alpha"):
            assert ours[k].item() == theirs[k].item(), k
    for name, a in adapters.items():
        want = _lycoris_delta(ours, name, a.shape)
        assert want.abs().max() > 0.1
        torch.testing.assert_close(a.delta_weight().double(), want, rtol=1e-5, atol=1e-6)


def test_loha_network_saves_lycoris_keys_and_loads_back(tiny, tmp_path):
    model, _ = tiny
    i = _inputs(7)
    net = lora.inject(model, "attention+conv", rank=2, alpha=1.0, kind="loha", text_encoders=True)
    _randomise(net, std=0.3)
    try:
        want = _ours(model, i)
    finally:
        net.remove()
    path = tmp_path / "loha.safetensors"
    lora.save_lora(path, net)
    keys = load_file(path)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.hada_w1_a" in keys
    assert keys["lora_unet_input_blocks_1_0_in_layers_2.hada_w1_b"].shape == (2, 32 * 9)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
    with pytest.raises(ValueError, match="LoHa"):
        lora.save_lora(tmp_path / "x.safetensors", net, format="peft")
    loaded = lora.load_lora(model, path)
    try:
        assert all(isinstance(a, lora.LoHa) for a in loaded.children())
        assert _max_diff(_ours(model, i), want) <= 1e-5
    finally:
        loaded.remove()


# ------------------------------------------------------------------------------- targets, counts, training

def test_target_modes_and_training(tiny):
    model, _ = tiny
    paths = lambda net: {t.path.rsplit(".", 1)[-1] if "to_out" not in t.path else "to_out.0"  # noqa: E731
                         for t in net.targets.values() if t.component == "unet"}
    net = lora.inject(model, "attention", attach=False)
    assert paths(net) == {"to_q", "to_k", "to_v"}
    assert not any(t.component != "unet" for t in net.targets.values())
    assert paths(lora.inject(model, "attention_out", attach=False)) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert paths(lora.inject(model, "all", attach=False)) == {"to_q", "to_k", "to_v", "to_out.0", "proj", "2",
                                                             "proj_in", "proj_out"}
    conv = lora.inject(model, "conv", attach=False)
    assert all(isinstance(t.module, nn.Conv2d) for t in conv.targets.values())
    assert paths(conv) == {"conv1", "conv2", "conv_shortcut", "conv"}
    with pytest.raises(ValueError, match="unknown LoRA target mode 'mlp'"):
        lora.inject(model, "attention+mlp")

    net = lora.inject(model, "attention", rank=4, text_encoders=True, dropout=0.1)
    try:
        assert {t.component for t in net.targets.values()} == {"unet", "text_encoder", "text_encoder_2"}
        te_paths = {t.path.split(".", 4)[-1] for t in net.targets.values() if t.component == "text_encoder_2"}
        assert te_paths == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                            "mlp.fc1", "mlp.fc2"}
        # Fresh adapters are a no-op (up = 0) and only they get gradients through the UNet.
        i = _inputs(8)
        net.train()
        out = model.unet(i["x"], i["t"], i["ctx"], i["pooled"], i["ids"])
        net.detach()
        torch.testing.assert_close(out, _ours(model, i)[0].detach(), rtol=0, atol=0)
        out.square().mean().backward()
        ups = [a.lora_up.weight.grad for n, a in net.named_children() if n.startswith("lora_unet_")]
        assert all(g is not None for g in ups) and any(g.abs().max() > 0 for g in ups)
        assert all(p.grad is None for p in model.unet.parameters())
    finally:
        net.remove()


def test_trainable_parameter_counts_for_sdxl_base():
    """Rank 4 on the full sdxl-base config (built on the meta device). The seed's "~4.5M for attention" is
    to_q/k/v of the 70 transformer blocks' self- and cross-attention."""
    with torch.device("meta"):
        model = build_model(SDXL_BASE)
    counts = {mode: sum(p.numel() for p in lora.inject(model.unet, mode, rank=4, attach=False).parameters())
              for mode in ("attention", "attention_out", "all", "conv", "all+conv")}
    assert counts == {"attention": 4_474_880, "attention_out": 5_806_080, "all": 10_639_360, "conv": 1_515_520,
                      "all+conv": 12_154_880}
    # By hand: per transformer block, attn1 q/k/v 3*r*2C, attn2 q r*2C, k/v r*(2048 + C); C = 640 (10 blocks),
    # 1280 (60 blocks).
    per_block = lambda C: 4 * (3 * 2 * C + 2 * C + 2 * (2048 + C))  # noqa: E731
    assert counts["attention"] == 10 * per_block(640) + 60 * per_block(1280)
    net = lora.inject(model, "attention", rank=4, text_encoders=True, attach=False)
    groups = {c: sum(p.numel() for n, a in net.named_children() if net.targets[n].component == c
                     for p in a.parameters()) for c in lora.KOHYA_PREFIX}
    # CLIP-L: 12 layers x (4 x r(768+768) + 2 x r(768+3072)); bigG: 32 x (4 x r(2*1280) + 2 x r(1280+5120)).
    assert groups == {"unet": 4_474_880, "text_encoder": 663_552, "text_encoder_2": 2_949_120}
    assert groups["text_encoder"] == 12 * 4 * (4 * 1536 + 2 * 3840)


# ------------------------------------------------------------------------------------------------ bad input

def _weights(model):
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def test_foreign_loras_are_refused_with_one_line_and_nothing_applied(tiny, tmp_path):
    model, _ = tiny
    before = _weights(model)
    r = 4
    # An SD1.5 LoRA: CLIP-L keys fit, but level 0 of its UNet has attention.
    te, unet = "lora_te_text_model_encoder_layers_0_self_attn_q_proj", \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd15 = {f"{te}.lora_down.weight": torch.zeros(r, 32), f"{te}.lora_up.weight": torch.zeros(32, r),
            f"{unet}.lora_down.weight": torch.zeros(r, 320), f"{unet}.lora_up.weight": torch.zeros(320, r)}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ValueError) as e:
        lora.load_lora(model, tmp_path / "sd15.safetensors")
    msg = str(e.value)
    assert "sd15.safetensors" in msg and "1 of 2 LoRA modules match" in msg and "\n" not in msg
    assert "'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'" in msg

    # Known names, wrong shapes (another model's width).
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    bad = {f"{name}.lora_down.weight": torch.zeros(r, 768), f"{name}.lora_up.weight": torch.zeros(64, r),
           f"{name}.alpha": torch.tensor(4.0)}
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"lora_down.weight has shape \(4, 768\).*needs \(4, 64\)"):
        lora.load_lora(model, tmp_path / "shape.safetensors")

    # Tensor kinds we do not implement (Tucker mid) are refused, not skipped; a DoRA scale of neither layout too.
    lora_sd = {f"{name}.lora_down.weight": torch.zeros(r, 64), f"{name}.lora_up.weight": torch.zeros(64, r)}
    save_file({**lora_sd, f"{name}.lora_mid.weight": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=f"unsupported LoRA tensor '{name}.lora_mid.weight'"):
        lora.load_lora(model, tmp_path / "x.safetensors")
    save_file({**lora_sd, f"{name}.dora_scale": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=rf"{name}.dora_scale has shape \(1,\), .* needs \(64, 1\)"):
        lora.load_lora(model, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="missing file"):
        lora.load_lora(model, tmp_path / "nope.safetensors")
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _lora_hooks(model) == 0
    assert math.isfinite(after["conv_in.weight"].sum().item())


# ------------------------------------------------------------------------------------------- model families

def _pixel_inputs(seed: int = 9):
    i = _inputs(seed)
    return dict(i, x=torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))  # 64 px, 16 px patches


def test_pixel_lora_round_trips_and_families_are_kept_apart(tiny, tmp_path):
    """The pixel UNet's body has the latent UNet's module names, so a LoRA of one family would load into the
    other without complaint: the family recorded in the file (none: latent) is what refuses it."""
    model, _ = tiny
    torch.manual_seed(0)
    pixel = sdxl.load_model("pixel-tiny")
    fresh = copy.deepcopy(pixel)
    i = _pixel_inputs()
    base = _ours(pixel, i)
    attn = lora.inject(pixel, "attention_out", attach=False)
    assert attn.targets and not any(t.path.startswith(("encoder.", "decoder.")) for t in attn.targets.values())
    net = _trained_lora(pixel)  # all+conv: the codec's convs too (LoCon, their own kohya names), text encoders
    assert {"lora_unet_encoder_conv_in", "lora_unet_encoder_resnets_0_conv1", "lora_unet_decoder_conv_out",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"} <= set(net.targets)
    assert sum(n.startswith(("lora_unet_encoder_", "lora_unet_decoder_")) for n in net.targets) == \
        sum(isinstance(m, nn.Conv2d) for m in [*pixel.unet.encoder.modules(), *pixel.unet.decoder.modules()])
    try:
        want = _ours(pixel, i)
    finally:
        net.remove()
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(want, base))
    path = tmp_path / "pixel.safetensors"
    lora.save_lora(path, net)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["sdxl_mini_family"] == "pixel"
    for merge in (True, False):
        loaded = lora.load_lora(fresh, path, merge=merge)
        try:
            assert _max_diff(_ours(fresh, i), want) <= 5e-5
        finally:
            loaded.remove()
    assert _max_diff(_ours(fresh, i), base) <= 1e-5

    # A latent attention LoRA: every module name exists in the pixel body (tiny has no attention at level 0).
    latent = lora.inject(model, "attention_out", attach=False)
    _randomise(latent)
    assert set(latent.targets) <= set(lora._layers(pixel))
    written = tmp_path / "latent.safetensors"
    lora.save_lora(written, latent)
    third_party = tmp_path / "third_party.safetensors"  # no metadata at all, as most files in the wild
    save_file(latent.state_dict(), str(third_party))
    before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    for file, target in ((written, fresh), (third_party, fresh), (third_party, fresh.unet)):
        with pytest.raises(CheckpointError) as e:
            lora.load_lora(target, file)
        assert str(e.value) == f"{file}: a LoRA for a latent SDXL UNet; this model is a pixel SDXL"
    assert all(torch.equal(v, before[k]) for k, v in fresh.unet.state_dict().items())
    assert _lora_hooks(fresh) == 0

    # And the pixel file on a latent model (its codec names would be refused anyway: try the body alone too).
    body = tmp_path / "pixel_body.safetensors"
    lora.save_lora(body, lora.inject(fresh, "attention_out", attach=False))
    for file in (path, body):
        with pytest.raises(CheckpointError, match=r"a LoRA for a pixel SDXL UNet; this model is a latent SDXL$"):
            lora.load_lora(model, file)
    assert _lora_hooks(model) == 0

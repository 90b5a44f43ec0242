"""torch.compile of the UNet (`sdxl.unet.compile_unet`, `--compile`): whole-network fullgraph and per-block, plain
and with LoRA, equal eager forward and backward; bucket shapes do not recompile without bound. The compiler backend is
aot_eager here (it traces forward and backward as inductor does, in seconds on a CPU; inductor runs in bench/gpu.py)."""
from __future__ import annotations

import json

import pytest
import torch

import sdxl
import sdxl.unet as unet_mod
import train_sdxl
from sdxl import lora
from sdxl.config import PRESETS
from sdxl.unet import UNet, compile_unet
from conftest import train_args

# Smaller than the tiny preset (tracing time grows with the op count): two levels, one layer each.
SMALL = PRESETS["tiny"].unet.__class__(**{**PRESETS["tiny"].unet.__dict__, "block_out_channels": (32, 64),
                                          "layers_per_block": 1, "transformer_depth": (0, 1),
                                          "mid_transformer_depth": 1, "num_attention_heads": (1, 2)})


def small_model():
    model = sdxl.load_model("tiny", seed=0)
    torch.manual_seed(0)
    model.unet = UNet(SMALL)
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.setattr(unet_mod, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(unet, h=8, w=8, b=2, seed=0):
    g, cfg = torch.Generator().manual_seed(seed), unet.config
    return (torch.randn(b, 4, h, w, generator=g), torch.tensor([10.0, 700.0][:b]),
            torch.randn(b, 77, cfg.cross_attention_dim, generator=g), torch.randn(b, cfg.pooled_dim, generator=g),
            torch.randn(b, cfg.num_time_ids, generator=g))


def forward_backward(model, args):
    params = [p for p in list(model.unet.parameters()) + list(getattr(model, "_net", torch.nn.Module()).parameters())
              if p.requires_grad]
    out = model.unet(*args)
    grads = torch.autograd.grad(out.square().mean(), params)
    return out.detach(), grads


@pytest.mark.parametrize("scope, with_lora", [("unet", True), ("blocks", False)], ids=["unet+lora", "blocks"])
def test_compiled_unet_equals_eager(scope, with_lora):
    model = small_model()
    if with_lora:
        network = lora.inject(model, "attention", rank=4)
        for p in network.parameters():  # a trained-looking LoRA (up starts at zero)
            torch.nn.init.normal_(p, std=0.05)
        model._net = network
    else:
        model.unet.requires_grad_(True)
    names = list(model.unet.state_dict())
    args = inputs(model.unet)
    want, want_grads = forward_backward(model, args)
    compile_unet(model.unet, scope)
    got, got_grads = forward_backward(model, args)  # fullgraph=True: a graph break would raise
    assert list(model.unet.state_dict()) == names  # saved names carry no _orig_mod
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.equal(got, model.unet.__class__.forward(model.unet, *inputs(model.unet, seed=1)))


def test_bucket_shapes_compile_a_bounded_number_of_times(monkeypatch):
    """Six bucket shapes: the first compiles static, a change of width marks width dynamic, a change of height marks
    height dynamic: at most three graphs, however many buckets follow."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(unet_mod, "COMPILE_BACKEND", counting)
    model = small_model()
    compile_unet(model.unet, "unet")
    with torch.no_grad():
        for h, w in [(8, 8), (8, 16), (16, 8), (12, 16), (16, 12), (20, 8)]:
            model.unet(*inputs(model.unet, h, w))
    assert 2 <= len(graphs) <= 3, len(graphs)


def test_train_compiles_after_lora_is_attached(train_data, tmp_path, monkeypatch):
    """--compile blocks: compile_unet runs once, after the LoRA is injected, and training runs through the
    compiled blocks (the parity tests above hold the numbers)."""
    order, real_inject = [], lora.inject

    def inject(*a, **k):
        order.append("inject")
        return real_inject(*a, **k)

    def spy(unet, scope):
        order.append(f"compile {scope}")
        return compile_unet(unet, scope)
    monkeypatch.setattr(lora, "inject", inject)
    monkeypatch.setattr(unet_mod, "compile_unet", spy)
    args = ["--use_lora", "--max_steps", 2, "--batch_size", 2, "--learning_rate", 1e-3, "--compile", "blocks"]
    assert train_sdxl.main(train_args(train_data, tmp_path, *args)) == 0
    assert order == ["inject", "compile blocks"]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

"""The memory plan (training/memory.py): its rows against hand counts, and its activation count (one forward on the
meta device) against what autograd really saves in a CPU forward of the same network, with and without LoRA and
checkpointing; on CUDA attention counts as the fused kernels save it (no L x L term)."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdxl import lora
from sdxl.config import PRESETS
from sdxl.model import build_model
from sdxl.unet import UNet
from training.config import TrainConfig
from training.memory import activation_bytes, plan_bytes, plan_text

# Two levels, one layer each, attention at level 1 only: few ops (the meta forward is quick) and a short hand count.
SMALL = PRESETS["tiny"].unet.__class__(**{**PRESETS["tiny"].unet.__dict__, "block_out_channels": (32, 64),
                                          "layers_per_block": 1, "transformer_depth": (0, 1),
                                          "mid_transformer_depth": 1, "num_attention_heads": (1, 2)})
SELF_ATTENTIONS_L1 = 4  # level 1 (L = HW / 4 tokens, 2 heads): down 1 x depth 1, mid 1, up 2 x depth 1
CTX = 77


def small_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(SMALL).train()


def cpu_inputs(cfg, b: int, side: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, cfg.in_channels, side, side, generator=g), torch.full((b,), 500.0),
            torch.randn(b, CTX, cfg.cross_attention_dim, generator=g), torch.randn(b, cfg.pooled_dim, generator=g),
            torch.tensor([[64.0, 64, 0, 0, 64, 64]] * b))


def saved_on_cpu(unet: nn.Module, b: int, side: int, backend: SDPBackend) -> tuple[int, int]:
    """The oracle: a real CPU forward. (Bytes of the storages autograd saves, each once, parameters left out; with
    checkpointing: those saved outside the checkpointed blocks plus the blocks' inputs, and the largest block's own
    when it runs again alone, as the backward recomputes it.) The UNet checkpoints each ResnetBlock2D and each
    BasicTransformerBlock."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    outside, calls = {}, []

    def counter(into: dict):
        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                into[s.data_ptr()] = s.nbytes()
            return t
        return pack

    blocks = [m for m in unet.modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m, args))) for m in blocks]
    with sdpa_kernel(backend), torch.autograd.graph.saved_tensors_hooks(counter(outside), lambda t: t):
        out = unet(*cpu_inputs(unet.config, b, side))  # noqa: F841  (keeps the saved storages alive)
    for h in hooks:
        h.remove()
    if not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules()):
        return sum(outside.values()), 0
    kept = {**outside, **{a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for _, args in calls
                          for a in args if isinstance(a, torch.Tensor)}}
    recompute = 0
    for m, args in calls:
        inner = {}
        with sdpa_kernel(backend), torch.autograd.graph.saved_tensors_hooks(counter(inner), lambda t: t):
            y = m(*args)  # noqa: F841
        recompute = max(recompute, sum(v for k, v in inner.items() if k not in kept))
    return sum(kept.values()), recompute


@pytest.mark.parametrize("ckpt", [False, True])
def test_meta_count_equals_a_real_cpu_forward(ckpt):
    """Full fine-tune, math attention (the CPU and meta kernel): the same bytes as a real forward saves, exactly;
    with checkpointing, the same kept bytes and the same largest recomputed block."""
    unet = small_unet()
    unet.set_gradient_checkpointing(ckpt)
    expected = saved_on_cpu(unet, 2, 16, SDPBackend.MATH)
    assert activation_bytes(unet, (2, 4, 16, 16), CTX, torch.float32, ckpt) == expected
    assert (expected[1] > 0) == ckpt


def test_meta_count_with_lora_on_a_frozen_base():
    """A frozen base with LoRA on every linear layer saves what the adapters and the frozen layers' input gradients
    need, less than a full fine-tune: the meta count (adapters rebuilt from the network's config) equals it."""
    unet = small_unet().requires_grad_(False)
    net = lora.inject(unet, "all", rank=4)
    full, _ = activation_bytes(small_unet(), (2, 4, 16, 16), CTX, torch.float32, False)
    got, _ = activation_bytes(unet, (2, 4, 16, 16), CTX, torch.float32, False, network=net)
    assert got == saved_on_cpu(unet, 2, 16, SDPBackend.MATH)[0]
    assert got < full


def test_fused_attention_drops_the_quadratic_term():
    """Activations over image area X: the math kernel keeps one fp32 (B, heads, L, L) softmax per self-attention,
    a X^2 term; with the fused kernels every term is linear in X (or constant), so the second difference over
    X = n, 4n, 16n vanishes. The fused count is what CPU flash attention saves plus the philox seed and offset
    (16 + 8 bytes) the CUDA kernels keep per attention call."""
    unet, b = small_unet(), 2
    f = {fused: [activation_bytes(unet, (b, 4, s, s), CTX, torch.float32, False, fused)[0] for s in (4, 8, 16)]
         for fused in (False, True)}
    n = 4 * 4
    second = {k: v[2] - 5 * v[1] + 4 * v[0] for k, v in f.items()}  # a X^2 + c X + d -> 180 a n^2
    quadratic_per_x2 = 4 * b * 2 * SELF_ATTENTIONS_L1 / 16  # fp32 bytes * B * heads * count * (L / X)^2
    assert second[False] == 180 * n * n * quadratic_per_x2
    assert second[True] == 0
    attention_calls = 2 * SELF_ATTENTIONS_L1  # self and cross in each block
    assert f[True][1] == saved_on_cpu(unet, b, 8, SDPBackend.FLASH_ATTENTION)[0] + 24 * attention_calls


def test_plan_rows_against_a_hand_count():
    """LoRA rank 4 on every linear layer of the tiny preset, bf16 base: frozen weights 2 bytes each, the adapters
    (rank * (in + out) per layer) fp32 with fp32 gradients, AdamW's two fp32 moments, an fp32 EMA and their bf16
    autocast copies; the peak is the resident state plus the larger of the forward's and the gradients."""
    with torch.device("meta"):  # shapes are all a plan needs
        model = build_model(PRESETS["tiny"]).to(torch.bfloat16).requires_grad_(False)
        net = lora.inject(model, "all", rank=4)
    linear = r"attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out"
    n_lora = sum(4 * (m.in_features + m.out_features) for n, m in model.unet.named_modules()
                 if isinstance(m, nn.Linear) and re.search(rf"\.({linear})$", n))
    n_base = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(use_lora=True, lora_rank=4, lora_target_mode="all", batch_size=2, precision="bf16",
                      ema_decay=0.99, gradient_checkpointing=True)
    trainable = list(net.parameters())
    f = plan_bytes(cfg, model, trainable, net, (32, 32))
    assert {k: f[k] for k in ("weights", "gradients", "optimizer", "ema", "autocast_copies")} == {
        "weights": 2 * n_base + 4 * n_lora, "gradients": 4 * n_lora, "optimizer": 8 * n_lora, "ema": 4 * n_lora,
        "autocast_copies": 2 * n_lora}
    assert f["activations"] > 0 and f["recompute"] > 0 and not f["fused_attention"]  # CPU: the math kernel
    assert f["peak"] == 2 * n_base + 4 * n_lora + 8 * n_lora + 4 * n_lora + max(
        f["activations"] + max(f["recompute"], 2 * n_lora), 4 * n_lora)
    text = plan_text(cfg, {**f, "fused_attention": True}, sum(p.numel() for p in trainable), (32, 32))
    assert "fused attention" in text and "recompute (largest checkpointed block)" in text
    assert re.search(r"^  autocast bf16 copies of trained weights\s+\d+\.\d\d GiB$", text, re.MULTILINE)

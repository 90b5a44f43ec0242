"""What only a CUDA device can show: bf16 kernels against the reference library there, and the trainer on a GPU.

Selected with `python -m pytest -m gpu` (the default run hides GPUs and skips these with the reason).
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import train_args
from diffusers import UNet2DConditionModel

import sdxl
import train_sdxl

pytestmark = pytest.mark.gpu


def test_unet_bf16_on_cuda_matches_reference():
    """Our UNet and diffusers' with the same weights, inputs and dtype on the GPU: within one bf16 step of the
    output's largest value (the two run the same ops, so only kernel choice differs)."""
    model = sdxl.load_model("tiny", seed=3)
    ref = UNet2DConditionModel(**{k: v for k, v in model.unet.config.to_diffusers().items()
                                  if not k.startswith("_")})
    ref.load_state_dict(model.unet.state_dict())
    ours, ref = model.unet.to("cuda", torch.bfloat16).eval(), ref.to("cuda", torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(0)
    cfg = model.unet.config
    x = torch.randn(2, cfg.in_channels, 16, 12, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    pooled = torch.randn(2, cfg.pooled_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    ids = torch.tensor([[128.0, 96, 0, 0, 128, 96]] * 2, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([10, 700], device="cuda")
    with torch.no_grad():
        a = ours(x, t, ctx, pooled, ids).float()
        b = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.float()
    assert (a - b).abs().max() <= 2 ** -8 * b.abs().max()


def test_lora_training_runs_on_cuda_in_bf16(train_data, tmp_path):
    """Two LoRA steps in bf16 on the GPU: finite losses, the device's peak memory logged, a loadable file."""
    args = train_args(train_data, tmp_path, "--use_lora", "--max_steps", 2, "--batch_size", 2)
    args[args.index("--precision") + 1] = "bf16"
    assert train_sdxl.main(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    assert lines[-1]["peak_mem_gb"] > 0
    model = sdxl.load_model("tiny")
    model.load_lora(tmp_path / "lora_final.safetensors")

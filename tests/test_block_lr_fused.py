"""--block_lr (learning rates by named UNet block and text encoder) and --fused_backward_pass (the optimizer step in
each parameter's post-accumulate-grad hook), on the tiny preset on the CPU.

Oracles: the groups are listed here by hand from the diffusers parameter names; SGD's first step (momentum buffer
= the gradient) moves each weight by exactly -lr * grad with its group's lr; the fused pass must give the loss curve
and weights of the ordinary AdamW step, and a resumed fused run the same checkpoint bits as an unbroken one; the
memory plan's gradients are the largest parameter's bytes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

import sdxl
import train_sdxl
from sdxl.config import PRESETS
from sdxl.model import build_model
from training import loop
from training.config import TrainConfig
from training.fused_backward import FusedBackward
from training.memory import plan_bytes, plan_text

BLOCK_LR = """[block_lr]
down_blocks.1 = 5e-5
mid_block = 1e-4
up_blocks.0 = 2e-5
"up_blocks.0.attentions.1" = 3e-5
other = 4e-4
text_encoder = 1e-6
"""
DEFAULT = 7e-5


def hand_lr(name: str) -> tuple[str, float]:
    """The group and lr of a UNet parameter (diffusers name) under BLOCK_LR, written out: the longest listed
    block that is a dotted prefix of the name; 'other' outside down / mid / up blocks; else the default."""
    for prefix, lr in (("up_blocks.0.attentions.1.", 3e-5), ("down_blocks.1.", 5e-5), ("mid_block.", 1e-4),
                       ("up_blocks.0.", 2e-5)):
        if name.startswith(prefix):
            return prefix[:-1], lr
    if not name.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
        return "other", 4e-4
    return "unet", DEFAULT


@pytest.fixture()
def block_file(tmp_path):
    (tmp_path / "blocks.toml").write_text(BLOCK_LR)
    return tmp_path / "blocks.toml"


def test_block_lr_groups_and_sgd_step(train_data, tmp_path, block_file, monkeypatch, capsys):
    seen = {}
    real_build = loop.build_optimizer

    def build(cfg, groups, device):
        opt = seen["opt"] = real_build(cfg, groups, device)
        params = [p for g in groups for p in g["params"]]
        opt.register_step_pre_hook(lambda *_: seen.update(
            before=[p.detach().clone() for p in params], grad=[p.grad.detach().clone() for p in params],
            lr=[g["lr"] for g in groups for _ in g["params"]]))
        return opt

    def load(*a, **kw):
        seen["model"] = real_load(*a, **kw)
        return seen["model"]

    real_load = sdxl.load_model
    monkeypatch.setattr(sdxl, "load_model", load)
    monkeypatch.setattr(loop, "build_optimizer", build)
    monkeypatch.setattr(loop, "memory_plan", lambda *a, **kw: "memory plan: not computed in this test")
    monkeypatch.setattr(loop, "save_final", lambda *a, **kw: None)
    assert train_sdxl.main(train_args(train_data, tmp_path / "out", "--block_lr", block_file, "--optimizer", "sgd",
                                      "--learning_rate", DEFAULT, "--weight_decay", 0, "--max_grad_norm", 0,
                                      "--max_steps", 1)) == 0
    names = {id(p): n for n, p in seen["model"].unet.named_parameters()}
    groups = seen["opt"].param_groups
    got = {names[id(p)]: (g["name"], g["lr"]) for g in groups for p in g["params"]}
    assert got == {n: hand_lr(n) for n in names.values()}  # every UNet parameter, in its hand-listed group
    printed = capsys.readouterr().out
    for name in ("down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.0.attentions.1", "other", "unet"):
        count = sum(p.numel() for n, p in seen["model"].unet.named_parameters() if hand_lr(n)[0] == name)
        assert f"  {name}: lr {dict(hand_lr_table())[name]:g}, {count:,} parameters" in printed
    after = [p.detach() for g in groups for p in g["params"]]
    for b, g, lr, a in zip(seen["before"], seen["grad"], seen["lr"], after):  # SGD's first step: p - lr * grad
        torch.testing.assert_close(a, b - lr * g, rtol=0, atol=1e-7)


def hand_lr_table():
    return [("down_blocks.1", 5e-5), ("mid_block", 1e-4), ("up_blocks.0", 2e-5), ("up_blocks.0.attentions.1", 3e-5),
            ("other", 4e-4), ("unet", DEFAULT)]


def test_block_lr_lora_adapters_follow_their_layer(block_file):
    """A LoRA adapter's parameters take the lr of the layer it adapts; the text encoders' adapters take
    text_encoder's (CLIP-L) or keep the default (bigG, unlisted)."""
    cfg = TrainConfig(use_lora=True, lora_target_mode="all", lora_text_encoder=True, block_lr=str(block_file),
                      learning_rate=DEFAULT)
    model = sdxl.load_model("tiny", device="cpu", dtype=torch.float32).requires_grad_(False)
    _, network, groups = loop.what_trains(cfg, model, None, torch.device("cpu"), torch.float32)
    got = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, adapter in network.named_children():
        t = network.targets[name]
        want = hand_lr(t.path + ".weight")[1] if t.component == "unet" else \
            1e-6 if t.component == "text_encoder" else DEFAULT
        assert all(got[id(p)] == want for p in adapter.parameters() if p.requires_grad), (t.component, t.path)
    assert len(got) == sum(p.requires_grad for p in network.parameters())


def checkpoint_files(out, step):
    folder = out / "checkpoints" / f"step_{step:06d}"
    return {n: load_file(str(folder / f"{n}.safetensors")) for n in ("trainable", "optimizer")}


def test_fused_backward_matches_adamw_and_resumes(train_data, tmp_path):
    common = ["--learning_rate", 1e-3, "--max_grad_norm", 0, "--max_steps", 6, "--save_interval_steps", 3,
              "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--unet_train_blocks", "up"]
    assert train_sdxl.main(train_args(train_data, tmp_path / "plain", *common)) == 0
    assert train_sdxl.main(train_args(train_data, tmp_path / "fused", *common, "--fused_backward_pass")) == 0
    curves = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(x)] for r in ("plain", "fused")]
    assert len(curves[0]) == 6
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=0, atol=1e-6)
    plain, fused = (checkpoint_files(tmp_path / r, 6)["trainable"] for r in ("plain", "fused"))
    assert plain.keys() == fused.keys()
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=0, atol=1e-6)
    # Resume the fused run from step 3: the step-6 checkpoint (weights and AdamW moments) bit for bit.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "fused" / "checkpoints" / "step_000003",
                    tmp_path / "resumed" / "checkpoints" / "step_000003")
    assert train_sdxl.main(train_args(train_data, tmp_path / "resumed", *common, "--fused_backward_pass",
                                      "--resume", "latest")) == 0
    a, b = checkpoint_files(tmp_path / "fused", 6), checkpoint_files(tmp_path / "resumed", 6)
    for part in a:
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_fused_clips_each_gradient_on_its_own():
    """--max_grad_norm under the fused pass: each gradient scaled by min(1, c / (|g| + 1e-6)) alone, stepped (SGD,
    lr 1: p - clipped g) and freed in the backward; the logged norm is that of all the gradients."""
    a, b = torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.tensor([0.1, 0.2]))
    opt = FusedBackward(lambda gs: torch.optim.SGD(gs, lr=1.0), [{"params": [a, b], "lr": 1.0}], max_grad_norm=1.0)
    (a * torch.tensor([3.0, 4.0])).sum().add((b * torch.tensor([0.1, 0.2])).sum()).backward()  # grads = values
    assert a.grad is None and b.grad is None
    torch.testing.assert_close(a.detach(), torch.tensor([3.0, 4.0]) * (1 - 1 / (5 + 1e-6)))  # |g| = 5: clipped
    torch.testing.assert_close(b.detach(), torch.tensor([0.0, 0.0]))  # |g| < 1: as it is
    torch.testing.assert_close(opt.take_norm(), torch.tensor(25.05).sqrt())
    opt.remove()


def test_memory_plan_counts_the_largest_gradient():
    with torch.device("meta"):
        model = build_model(PRESETS["tiny"]).requires_grad_(False)
    trainable = list(model.unet.parameters())
    cfg = TrainConfig(fused_backward_pass=True, precision="fp32")
    f = plan_bytes(cfg, model, trainable, None, (32, 32))
    assert f["gradients"] == 4 * max(p.numel() for p in trainable)
    assert "gradients (fused backward: the largest parameter's)" in plan_text(cfg, f, 1, (32, 32))


@pytest.mark.parametrize("flags, message", [
    (["--block_lr", "{blocks}"], "--block_lr: no block 'down_blocks.9' in this model (diffusers names, e.g. "
                                 "down_blocks.1, mid_block, up_blocks.0, other, text_encoder_2)"),
    (["--block_lr", "missing.toml"], "missing.toml: no such --block_lr file"),
    (["--block_lr", "{blocks}", "--model_type", "pixel"], "--block_lr applies to latent SDXL"),
    (["--fused_backward_pass", "--gradient_accumulation_steps", 2], "--fused_backward_pass steps as each gradient "
                                                                    "is made: it cannot accumulate"),
    (["--fused_backward_pass", "--optimizer", "sgd"], "--fused_backward_pass works with --optimizer adamw or "
                                                      "adafactor, not sgd"),
    (["--fused_backward_pass", "--precision", "fp16"], "--fused_backward_pass cannot unscale fp16 gradients"),
])
def test_bad_inputs_are_one_line_exit_2(train_data, tmp_path, capsys, flags, message):
    (tmp_path / "bad.toml").write_text("[block_lr]\ndown_blocks.9 = 1e-5\n")
    flags = [str(tmp_path / "bad.toml") if f == "{blocks}" else f for f in flags]
    assert train_sdxl.main(train_args(train_data, tmp_path / "out", "--max_steps", 1, *flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"train_sdxl.py: error: {message}"), err

"""train_sdxl.py --controlnet: the UNet stays frozen, new zero convolutions leave the UNet's output as it is, the
written controlnet/ folders load in sdxl and in diffusers' ControlNetModel (same residuals), resume is
bit-identical, two gloo processes make the updates of one, and the flags that cannot work exit 2."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import rel_err, torchrun, train_args
from PIL import Image, ImageOps
from safetensors.torch import load_file

import sdxl
import train_sdxl
from sdxl.config import TINY, UNetConfig
from sdxl.controlnet import ControlNet
from sdxl.unet import UNet
from training.config import TrainConfig
from training.loop import Trainee, what_trains

WEIGHTS = "diffusion_pytorch_model.safetensors"


def conditioning(data, folder):
    """An inverted grey copy of each image at half size (resized as its image), under the same stem."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in data.glob("*.png"):
        im = ImageOps.invert(Image.open(p).convert("L")).convert("RGB")
        im.resize((im.width // 2, im.height // 2)).save(folder / f"{p.stem}.jpg")
    return folder


def inputs(b: int = 2):
    g = torch.Generator().manual_seed(1)
    return dict(x0=torch.randn(b, 4, 8, 8, generator=g), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * b),
                keep=torch.ones(b), context=torch.randn(b, 77, TINY.unet.cross_attention_dim, generator=g),
                pooled=torch.randn(b, TINY.unet.pooled_dim, generator=g))


def gens(b: int = 2) -> list[torch.Generator]:
    """Each call the same noise and timesteps."""
    return [torch.Generator().manual_seed(i) for i in range(b)]


def test_new_controlnet_keeps_the_unet_output_and_only_it_trains():
    model = sdxl.load_model("tiny").requires_grad_(False)
    cfg = TrainConfig(controlnet=True, conditioning_dir="c")
    trainee, cn, groups = what_trains(cfg, model, None, torch.device("cpu"), torch.float32)
    assert [p for g in groups for p in g["params"]] == list(cn.parameters()) and trainee.controlnet is cn
    assert all(not p.any() for n, p in cn.named_parameters() if n.startswith("controlnet_down_blocks"))
    objective, kw = model.objective(), inputs()
    control = torch.rand(2, 3, 64, 64)
    plain = Trainee(model.unet, None, None)(objective, generators=gens(), **kw)
    steered = trainee(objective, generators=gens(), **kw, control=control)
    assert torch.equal(plain, steered)  # zero convolutions: residuals of exactly 0
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cn_before = {k: v.clone() for k, v in cn.state_dict().items()}
    optimizer, grads = torch.optim.SGD(groups, lr=0.1), []
    for _ in range(2):  # the zero convs learn first; then the gradient reaches the encoder through them
        trainee(objective, generators=gens(), **kw, control=control).mean().backward()
        assert all(p.grad is None for p in model.unet.parameters())
        grads.append({n: p.grad.clone() for n, p in cn.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, unet_before[k]) for k, v in model.unet.state_dict().items())
    zero_convs = [k for k in cn_before if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert all(not torch.equal(cn.state_dict()[k], cn_before[k]) for k in zero_convs if k.endswith("weight"))
    encoder = [k for k in cn_before if k not in zero_convs]
    assert not any(grads[0][k].any() for k in encoder) and all(grads[1][k].any() for k in encoder
                                                               if k.startswith("down_blocks.0.resnets.0.conv"))
    assert not torch.equal(trainee(objective, generators=gens(), **kw, control=control), plain)


def reference_residuals(folder, x, t, ctx, pooled, ids, cond):
    from diffusers import ControlNetModel
    ref = ControlNetModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    return ref(x, t, ctx, cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)


COMMON = ["--controlnet", "--max_steps", 3, "--learning_rate", 0.05, "--optimizer", "sgd", "--seed", 5,
          "--gradient_accumulation_steps", 2, "--cache_latents", "--flip_aug"]


@pytest.fixture(scope="module")
def runs(train_data, tmp_path_factory):
    """One process (batch 2, EMA, a checkpoint at step 2) from a saved ControlNet whose zero convs are not zero."""
    root = tmp_path_factory.mktemp("controlnet")
    cond = conditioning(train_data, root / "cond")
    torch.manual_seed(0)  # a module fixture runs before the per-test seed
    init = ControlNet.from_unet(sdxl.load_model("tiny").unet)
    with torch.no_grad():
        for n, p in init.named_parameters():
            if "controlnet_down_blocks" in n or "controlnet_mid_block" in n or "conv_out" in n:
                p.normal_(0, 0.05)
    init.save_pretrained(root / "init")
    flags = [*COMMON, "--controlnet_model", root / "init", "--conditioning_dir", cond]
    assert train_sdxl.main(train_args(train_data, root / "single", "--batch_size", 2, *flags, "--ema_decay", 0.9,
                                      "--save_interval_steps", 2)) == 0
    return root, flags


def test_controlnet_folders_load_in_sdxl_and_diffusers(runs):
    root, _ = runs
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 600.0])
    ctx, pooled = torch.randn(2, 77, TINY.unet.cross_attention_dim), torch.randn(2, TINY.unet.pooled_dim)
    ids, cond = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), torch.rand(2, 3, 64, 64)
    for name in ("controlnet", "controlnet_ema"):
        ours = sdxl.load_controlnet(root / "single" / name).eval()
        with torch.no_grad():
            got = ours(x, t, ctx, pooled, ids, cond)
            want = reference_residuals(root / "single" / name, x, t, ctx, pooled, ids, cond)
        for a, b in zip([*got[0], got[1]], [*want[0], want[1]]):
            assert rel_err(b, a) <= 1e-5
    trained, ema, init = (load_file(str(root / n / WEIGHTS)) for n in ("single/controlnet", "single/controlnet_ema",
                                                                       "init"))
    assert all(not torch.equal(trained[k], init[k]) for k in init if k.endswith("weight"))
    assert any(not torch.equal(trained[k], ema[k]) for k in init)
    ck = load_file(str(root / "single" / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert {k.removeprefix("controlnet.") for k in ck} == init.keys()  # only the ControlNet trains


def test_controlnet_resumes_bit_identically(runs, train_data):
    root, flags = runs
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "single" / "checkpoints" / "step_000002", root / "resumed" / "checkpoints" / "step_000002")
    assert train_sdxl.main(train_args(train_data, root / "resumed", "--batch_size", 2, *flags, "--ema_decay", 0.9,
                                      "--resume", "latest")) == 0
    for name in ("controlnet", "controlnet_ema"):
        a, b = (load_file(str(root / run / name / WEIGHTS)) for run in ("single", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_gloo_processes_make_the_updates_of_one(runs, train_data):
    """Same global batch: 2 images x 2 micro-batches in one process, 1 image x 2 ranks under DDP (see
    test_train.assert_same_updates for the 1e-3 tolerance)."""
    root, flags = runs
    torchrun(train_args(train_data, root / "ddp", "--batch_size", 1, *flags))
    init, single, ddp = (load_file(str(root / n / WEIGHTS)) for n in ("init", "single/controlnet", "ddp/controlnet"))
    assert single.keys() == ddp.keys() == init.keys()
    for k in init:
        want, got = single[k].double() - init[k].double(), ddp[k].double() - init[k].double()
        assert (got - want).abs().max() <= 1e-3 * want.abs().max() + 1e-9, k
    assert all(single[k].ne(init[k]).any() for k in init if k.endswith("weight"))


@pytest.mark.parametrize("extra,message", [
    (["--controlnet"], "--controlnet needs --conditioning_dir"),
    (["--conditioning_dir", "c"], "--conditioning_dir given without --controlnet"),
    (["--controlnet", "--conditioning_dir", "c", "--use_lora"], "drop --use_lora"),
    (["--controlnet", "--conditioning_dir", "c", "--train_text_encoder"], "drop --train_text_encoder"),
    (["--controlnet", "--conditioning_dir", "c", "--train_shards", "x.tar", "--max_steps", 1],
     "not --train_shards"),
    (["--controlnet", "--conditioning_dir", "c", "--model_type", "pixel"],
     "--controlnet does not apply to a pixel model (a ControlNet steers a latent UNet)"),
], ids=["no-conditioning", "no-controlnet", "lora", "text-encoder", "shards", "pixel"])
def test_bad_controlnet_flags_exit_2(train_data, tmp_path, capsys, extra, message):
    assert train_sdxl.main(train_args(train_data, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_controlnet_for_another_unet_and_missing_conditioning_exit_2(train_data, tmp_path, capsys):
    other = UNetConfig(**{**TINY.unet.__dict__, "block_out_channels": (32, 64, 64)})
    ControlNet.from_unet(UNet(other)).save_pretrained(tmp_path / "other")
    cond = conditioning(train_data, tmp_path / "cond")
    args = train_args(train_data, tmp_path / "out", "--controlnet", "--conditioning_dir", cond)
    assert train_sdxl.main([*args, "--controlnet_model", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert "other: made for another UNet (block_out_channels" in err and "\n" not in err
    for p in sorted(cond.glob("*.jpg"))[:5]:  # 3 of 8 left: most are missing
        p.unlink()
    assert train_sdxl.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "cond: conditioning images for only 3 of 8 images" in err and "\n" not in err

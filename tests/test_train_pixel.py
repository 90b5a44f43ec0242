"""Pixel models through the one training loop (training/loop.py): DDP equals one process, exact resume with both
EMAs, a pixel LoRA from training to generate(), and the flags and inputs that do not apply (exit 2, one line).
The model, sampling and recipe-stage tests are in test_pixel.py."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import torchrun, train_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdxl
import train_sdxl
from sampling.pipeline import generate
from training import loop

# pixel-tiny: the tiny latent UNet's body in 16 px patches; sides must be multiples of 32 (patch x 2 levels).
PIXEL = ["--model_type", "pixel", "--bucket_step", 32]
TINY = ["--pretrained_model", "pixel-tiny"]


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("wrapper", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_ddp_pixel_equals_one_process(train_data, tmp_path, wrapper):
    """2 gloo processes x 1 image x 2 micro-batches == 1 process x 2 images x 2 micro-batches (the same global
    batch, the same per-sample noise), every codec and body tensor, under DDP and under FSDP2 (whose placeholder
    levels hold no parameters, and whose sharded body is gathered into a plain PixelUNet for final/). SGD: Adam turns rounding noise in near-zero
    gradients into full-size updates. The two differ by float rounding of averaged gradients only: measured at
    most 6e-8 in weight (updates up to 2.6e-3); 2e-5 fails for a rank that skips its all-reduce (7.7e-4), syncs
    the wrong micro-batch (4.6e-4) or draws another sample's noise (8.1e-4)."""
    flags = [*TINY, *PIXEL, "--max_steps", 2, "--learning_rate", 0.05, "--seed", 5, "--optimizer", "sgd",
             "--gradient_accumulation_steps", 2]
    assert train_sdxl.main(train_args(train_data, tmp_path / "single", *flags, "--batch_size", 2)) == 0
    torchrun(train_args(train_data, tmp_path / "ddp", *flags, *wrapper, "--batch_size", 1))
    init = sdxl.load_model("pixel-tiny", seed=5).unet.state_dict()
    single, ddp = unet_weights(tmp_path / "single" / "final"), unet_weights(tmp_path / "ddp" / "final")
    assert single.keys() == ddp.keys() == init.keys()
    moved = {k for k in single if not torch.equal(single[k], init[k])}
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)
    assert any(k.startswith("mid_block.") for k in moved)
    err = max((single[k] - ddp[k]).abs().max().item() for k in single)
    step = max((single[k] - init[k]).abs().max().item() for k in single)
    print(f"ddp vs single: max weight difference {err:.2e}, largest update {step:.2e}")
    assert err <= 2e-5 and step > 1e-3, (err, step)
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone writes


def test_resume_with_ema_and_snapshots_is_bit_identical(train_data, tmp_path):
    """4 steps in one go == its step-2 checkpoint resumed to step 4: the weights (final/), the --ema_decay EMA
    (final_ema/), and both power-function EMAs of --ema_snapshots (the step-4 snapshots); the cosine schedule,
    accumulation and caption dropout make every restored piece matter."""
    flags = [*TINY, *PIXEL, "--max_steps", 4, "--batch_size", 2, "--gradient_accumulation_steps", 2,
             "--learning_rate", 1e-3, "--lr_scheduler", "cosine", "--ema_decay", 0.9, "--ema_snapshots",
             "--save_interval_steps", 2, "--caption_dropout", 0.3]
    assert train_sdxl.main(train_args(train_data, tmp_path / "a", *flags)) == 0
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000002", tmp_path / "b" / "checkpoints" / "step_000002")
    assert train_sdxl.main(train_args(train_data, tmp_path / "b", *flags, "--resume", "latest")) == 0
    init = sdxl.load_model("pixel-tiny").unet.state_dict()
    for part in ("final", "final_ema"):
        a, b = unet_weights(tmp_path / "a" / part), unet_weights(tmp_path / "b" / part)
        assert a.keys() == b.keys() == init.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
        assert not torch.equal(a["decoder.conv_out.weight"], init["decoder.conv_out.weight"]), part
    for std in ("0.050", "0.100"):
        name = f"step_000004_std{std}.safetensors"
        a = load_file(str(tmp_path / "a" / "ema_snapshots" / name))
        b = load_file(str(tmp_path / "b" / "ema_snapshots" / name))
        assert a.keys() == b.keys() and len(a) > 50, name
        assert all(torch.equal(a[k], b[k]) for k in a), (name, [k for k in a if not torch.equal(a[k], b[k])][:3])


def test_pixel_lora_trains_saves_and_loads_into_generate(train_data, tmp_path, monkeypatch):
    """A LoRA on a pixel model (the codec's convs among its targets) trains and writes lora_final.safetensors;
    loaded into a fresh copy of the base, merged or as hooks, generate() gives what the trained model in memory
    gave, which differs from the base's."""
    base = tmp_path / "base"
    sdxl.load_model("pixel-tiny", seed=1).save_pretrained(base)
    trained = {}
    save_final = loop.save_final

    def keep(cfg, model, *rest):
        trained["model"] = model
        return save_final(cfg, model, *rest)
    monkeypatch.setattr(loop, "save_final", keep)
    args = train_args(train_data, tmp_path / "run", *PIXEL, "--use_lora", "--lora_target_mode", "all+conv",
                      "--max_steps", 2, "--batch_size", 2, "--learning_rate", 1e-2)
    args[1] = str(base)
    assert train_sdxl.main(args) == 0
    path = tmp_path / "run" / "lora_final.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, family = list(f.keys()), f.metadata()["sdxl_mini_family"]
    assert family == "pixel"
    assert any(k.startswith("lora_unet_encoder_") for k in keys) and any(k.startswith("lora_unet_decoder_")
                                                                         for k in keys)
    kw = {"height": 64, "width": 64, "steps": 3, "guidance_scale": 3.0, "sampler": "heun", "seed": 4,
          "output_type": "pt"}
    want = generate(trained["model"], ["a red circle", "a blue circle"], **kw)
    fresh = sdxl.load_model(base)
    plain = generate(fresh, ["a red circle", "a blue circle"], **kw)
    assert (want - plain).abs().max() > 0.3  # measured ~3
    for merge in (True, False):
        net = fresh.load_lora(path, merge=merge)
        try:
            got = generate(fresh, ["a red circle", "a blue circle"], **kw)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        finally:
            net.remove()
    # Removed again: the base's output, up to the fp32 rounding unmerging leaves in the weights, which three guided
    # steps amplify (measured up to 2e-4; the LoRA's own effect is ~3).
    torch.testing.assert_close(generate(fresh, ["a red circle", "a blue circle"], **kw), plain, atol=2e-3, rtol=0)


@pytest.mark.parametrize("extra,message", [
    (["--model_type", "pixel", "--cache_latents"], "--cache_latents does not apply to a pixel model (it has no latents"),
    (["--model_type", "pixel", "--noise_offset", "0.1"], "--noise_offset does not apply"),
    (["--pretrained_model", "pixel-tiny", "--prediction_type", "epsilon"], "--prediction_type does not apply"),
    (["--teacher_checkpoint", "tiny"], "--teacher_checkpoint does not apply to a latent model (a pixel-model option"),
    (["--lr_sdxl_unet_body", "0"], "--lr_sdxl_unet_body does not apply"),
])
def test_inapplicable_flags_exit_2(train_data, tmp_path, capsys, extra, message):
    """Each of these runs (buckets the pixel grid tiles) when the check is taken out: it is the check that stops
    it, before any output is written."""
    assert train_sdxl.main(train_args(train_data, tmp_path / "out", "--max_steps", 1, "--bucket_step", 32,
                                      *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # rejected before any work


def test_bad_pixel_inputs_exit_2(train_data, tmp_path, capsys):
    """A bucket the patch grid cannot tile, and a teacher that is not a latent SDXL or whose UNet is not the
    body: one line each."""
    sdxl.load_model("pixel-tiny").save_pretrained(tmp_path / "px")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    for extra, message in (
            (["--bucket_step", 16], "must be positive multiples of 32"),
            (["--teacher_checkpoint", tmp_path / "px"], "px: a pixel-space model, not a latent SDXL"),
            (["--teacher_checkpoint", tmp_path / "junk.safetensors"], "junk.safetensors: not an SDXL"),
            (["--pretrained_model", "pixel-demo", "--bucket_step", 32, "--teacher_checkpoint", "tiny"],
             "--teacher_checkpoint must be a latent SDXL whose UNet is the pixel model's body")):
        args = train_args(train_data, tmp_path / "o", "--model_type", "pixel", "--max_steps", 1, *extra)
        assert train_sdxl.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err

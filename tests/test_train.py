"""train_sdxl.py on the tiny preset: learning, exact resume, DDP equivalence, interop, objectives, bad flags."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import sdxl
import train_sdxl
from sdxl import diffusion
from training import loop
from training.config import TrainConfig
from training.ema import EMA

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for i in range(8):
        name = list(COLOURS)[i % 4]
        w, h = (64, 64) if i % 2 else (80, 48)
        im = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(im).ellipse([10, 8, w - 10, h - 8], fill=COLOURS[name])
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} circle, white background")
    return folder


def base_args(data, out, *extra):
    return ["--pretrained_model", "tiny", "--data_dir", str(data), "--output_dir", str(out), "--image_size", "64",
            "--bucket_step", "16", "--num_workers", "0", "--precision", "fp32", *map(str, extra)]


def train(args) -> int:
    return train_sdxl.main(args)


def fixed_loss(unet, text, data) -> float:
    """Epsilon loss at fixed timesteps and noise over the dataset: a deterministic measure of fit."""
    g = torch.Generator().manual_seed(123)
    abar_all = diffusion.get_alphas_cumprod()
    vae = sdxl.load_model("tiny").vae
    total = 0.0
    with torch.no_grad():
        for p in sorted(data.glob("*.png")):
            im = Image.open(p).convert("RGB").resize((64, 64))
            px = torch.tensor(list(im.getdata()), dtype=torch.float32).view(1, 64, 64, 3).permute(0, 3, 1, 2)
            x0 = vae.encode(px / 127.5 - 1).mean * vae.config.scaling_factor
            ctx, pooled = text.encode([p.with_suffix(".txt").read_text()])
            for t in (100, 400, 700):
                noise = torch.randn(x0.shape, generator=g)
                abar = abar_all[t]
                x_t = diffusion.add_noise(x0, noise, abar)
                ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
                total += torch.nn.functional.mse_loss(unet(x_t, t, ctx, pooled, ids), noise).item()
    return total


def test_loss_falls(data, tmp_path):
    initial = sdxl.load_model("tiny", seed=0)
    before = fixed_loss(initial.unet, initial.text, data)
    assert train(base_args(data, tmp_path, "--max_steps", 30, "--batch_size", 4, "--learning_rate", 1e-3)) == 0
    trained = sdxl.load_model(str(tmp_path / "final"))
    after = fixed_loss(trained.unet, trained.text, data)
    assert after < 0.7 * before, (before, after)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 30


def test_resume_is_bit_identical(data, tmp_path):
    args = ["--use_lora", "--lora_rank", 4, "--lora_target_mode", "all", "--lora_text_encoder",
            "--max_steps", 6, "--batch_size", 2, "--gradient_accumulation_steps", 2, "--lr_scheduler", "cosine",
            "--lr_warmup_steps", 2, "--ema_decay", 0.9, "--save_interval_steps", 3, "--learning_rate", 1e-3,
            "--shuffle_tags", "--caption_dropout", 0.2]
    assert train(base_args(data, tmp_path / "a", *args)) == 0
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000003", tmp_path / "b" / "checkpoints" / "step_000003")
    assert train(base_args(data, tmp_path / "b", *args, "--resume", "latest")) == 0
    for name in ("lora_final.safetensors", "lora_final_ema.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step_000003", "step_000006"]
    # An epoch is 4 micro-batches = 2 steps: the resumed run crossed epoch boundaries like the first one.
    a_metrics = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[3:]
    b_metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in a_metrics] == [json.loads(x)["loss"] for x in b_metrics]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "train_sdxl.py"), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


def unet_file(run: Path) -> dict:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_ddp_and_fsdp_two_processes_equal_one(data, tmp_path):
    # SGD: Adam's m / sqrt(v) turns float-rounding noise in near-zero gradients into full-size updates.
    common = ["--max_steps", 3, "--learning_rate", 0.05, "--seed", 5, "--optimizer", "sgd"]
    assert train(base_args(data, tmp_path / "single", "--batch_size", 2, *common)) == 0
    torchrun(base_args(data, tmp_path / "ddp", "--batch_size", 1, *common))
    torchrun(base_args(data, tmp_path / "fsdp", "--batch_size", 1, "--fsdp", "--save_interval_steps", 2, *common))
    single, init = unet_file(tmp_path / "single"), sdxl.load_model("tiny", seed=5).unet.state_dict()
    assert max((single[k] - init[k]).abs().max().item() for k in single) > 1e-4  # training moved the weights
    for name in ("ddp", "fsdp"):  # ...and each distributed run moved them the same way (summation order aside)
        other = unet_file(tmp_path / name)
        for k in single:
            assert torch.allclose(other[k], single[k], atol=2e-6, rtol=1e-5), (name, k)
        # Only rank 0 wrote: one metrics line per step.
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 3
    # FSDP checkpoints hold whole tensors, and resuming from one (sharded again) ends bit-identically.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step_000002",
                    tmp_path / "resumed" / "checkpoints" / "step_000002")
    torchrun(base_args(data, tmp_path / "resumed", "--batch_size", 1, "--fsdp", "--resume", "latest", *common))
    a, b = unet_file(tmp_path / "fsdp"), unet_file(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_lora_loads_in_reference_pipeline(data, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    folder = tmp_path / "base"
    sdxl.load_model("tiny", seed=0).save_pretrained(folder)
    args = base_args(data, tmp_path / "run", "--use_lora", "--lora_target_mode", "all", "--lora_text_encoder",
                     "--max_steps", 3, "--batch_size", 2, "--learning_rate", 5e-3)
    args[1] = str(folder)
    assert train(args) == 0
    lora_file = tmp_path / "run" / "lora_final.safetensors"
    ours = sdxl.load_model(str(folder))
    ours.load_lora(lora_file)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora_file))
    x, ctx, pooled = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64), torch.randn(1, 32)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with torch.no_grad():
        ref = pipe.unet(x, 500, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours.unet(x, 500, ctx, pooled, ids)
        base = sdxl.load_model(str(folder)).unet(x, 500, ctx, pooled, ids)
        assert (got - base).abs().max() > 1e-4  # the LoRA does something
        assert (ref - got).abs().max() <= 1e-4
        tokens = pipe.tokenizer_2(["a red circle"], padding="max_length", max_length=77, return_tensors="pt")
        ref_pooled = pipe.text_encoder_2(tokens.input_ids).text_embeds
        assert (ref_pooled - ours.text.encode(["a red circle"])[1]).abs().max() <= 1e-4


class FakeTrainee(torch.nn.Module):
    """Predicts 0.3 * x_t + 0.1: enough to check every objective's arithmetic."""

    def forward(self, x_t, t, time_ids, context=None, pooled=None, tokens=None):
        return 0.3 * x_t + 0.1


@pytest.mark.parametrize("prediction_type,loss_type,gamma", [
    ("epsilon", "native", None), ("v_prediction", "native", 5.0), ("sample", "native", None),
    ("epsilon", "velocity", 5.0)])
def test_objectives_against_hand_computation(prediction_type, loss_type, gamma):
    cfg = TrainConfig(prediction_type=prediction_type, loss_type=loss_type, min_snr_gamma=gamma,
                      noise_offset=0.05, timestep_range="100,900")
    x0 = torch.randn(2, 4, 4, 4)
    batch = {"latents": x0, "time_ids": torch.zeros(2, 6), "context": torch.zeros(2, 77, 8),
             "pooled": torch.zeros(2, 4), "caption": ["a", "b"]}
    abar_all = diffusion.get_alphas_cumprod()
    seeds = [11, 12]
    got = loop.latent_loss(cfg, FakeTrainee(), batch, None, abar_all, seeds, torch.device("cpu"),
                           prediction_type, False, lambda: torch.autocast("cpu", enabled=False))
    losses = []
    for i, s in enumerate(seeds):  # the same draws, in the same order, by hand
        g = torch.Generator().manual_seed(s)
        noise = torch.randn(4, 4, 4, generator=g) + 0.05 * torch.randn(4, 1, 1, generator=g)
        t = 100 + int(torch.rand(1, generator=g).item() * 800)
        a = abar_all[t]
        x_t = a.sqrt() * x0[i] + (1 - a).sqrt() * noise
        pred = 0.3 * x_t + 0.1
        eps_target, v_target = noise, a.sqrt() * noise - (1 - a).sqrt() * x0[i]
        snr = a / (1 - a)
        if loss_type == "velocity":  # convert the prediction (epsilon) to v, compare with the true v
            x0_hat = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
            p, target, w = a.sqrt() * pred - (1 - a).sqrt() * x0_hat, v_target, min(snr, gamma) / (snr + 1)
        else:
            p = pred
            target = {"epsilon": eps_target, "v_prediction": v_target, "sample": x0[i]}[prediction_type]
            w = 1.0 if gamma is None else min(snr, gamma) / (snr + 1)
        losses.append(w * ((p - target) ** 2).mean())
    assert torch.allclose(got, torch.stack(losses).mean(), rtol=1e-5)


def test_ema_against_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([("p", p)], decay=0.9, warmup=True)
    expected = p.detach().clone()
    for t, value in enumerate([3.0, 5.0, -1.0]):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
    assert torch.allclose(ema.shadow["p"], expected)
    ema.swap()
    assert torch.allclose(p, expected)
    ema.swap()
    assert torch.equal(p.detach(), torch.tensor([-1.0, -1.0]))


def test_cached_latents_and_text_train_like_uncached(data, tmp_path):
    common = ["--max_steps", 3, "--batch_size", 2, "--learning_rate", 0.05, "--optimizer", "sgd"]
    assert train(base_args(data, tmp_path / "plain", *common)) == 0
    cached = [*common, "--cache_latents", "--cache_text_embeddings", "--cache_dir", tmp_path / "cache"]
    assert train(base_args(data, tmp_path / "cached", *cached)) == 0
    # Entries are keyed by file contents: images 0 and 4 (1 and 5, ...) are the same drawing, cached once.
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 4
    assert len(list((tmp_path / "cache" / "text").rglob("*.safetensors"))) == 4  # four distinct captions
    a, b = unet_file(tmp_path / "plain"), unet_file(tmp_path / "cached")
    for k in a:  # the same latents (posterior mean of the same crop) and embeddings, read back from disk
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("plain", "cached")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_validation_samples_match_generate(data, tmp_path):
    from sampling import generate
    args = ["--max_steps", 2, "--batch_size", 2, "--sample_every", 2, "--sample_prompts", "a red circle",
            "--sample_steps", 3, "--learning_rate", 1e-3]
    assert train(base_args(data, tmp_path, *args)) == 0
    sample = Image.open(tmp_path / "samples" / "step_000002_0.png")
    final = sdxl.load_model(str(tmp_path / "final"))
    again = generate(final, ["a red circle"], height=64, width=64, steps=3, guidance_scale=5.0, seed=0)[0]
    assert list(sample.getdata()) == list(again.getdata())


def test_toml_config_and_flag_override(data, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 50\nlearning_rate = 0.5\nbatch_size = 2\n')
    assert train(base_args(data, tmp_path / "out", "--config", toml, "--max_steps", 1)) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["max_steps"] == 1 and saved["learning_rate"] == 0.5 and saved["batch_size"] == 2


@pytest.mark.parametrize("extra,message", [
    (["--lora_rank", "8"], "--lora_rank given without --use_lora"),
    (["--full_bf16"], "--full_bf16 needs --precision bf16"),
    (["--use_lora", "--train_text_encoder"], "with --use_lora use --lora_text_encoder"),
    (["--timestep_range", "5"], "--timestep_range must be 'a,b'"),
    (["--sample_every", "5"], "--sample_every needs --sample_prompts"),
])
def test_contradictory_flags_exit_2(data, tmp_path, capsys, extra, message):
    assert train(base_args(data, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "config.json").exists()  # rejected before any work


def test_bad_data_and_existing_run_exit_2(data, tmp_path, capsys):
    assert train(base_args(tmp_path / "nope", tmp_path / "o1", "--max_steps", 1)) == 2
    assert "data_dir does not exist" in capsys.readouterr().err
    (tmp_path / "o2" / "checkpoints" / "step_000001").mkdir(parents=True)
    assert train(base_args(data, tmp_path / "o2", "--max_steps", 1)) == 2
    assert "holds another run's checkpoints" in capsys.readouterr().err
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "lora_final.safetensors").write_bytes(b"x")
    assert train(base_args(data, tmp_path / "o3", "--max_steps", 1)) == 2
    assert "lora_final.safetensors" in capsys.readouterr().err
    assert (tmp_path / "o3" / "lora_final.safetensors").read_bytes() == b"x"
    assert train(["--pretrained_model", "tiny"]) == 2
    assert "no training data" in capsys.readouterr().err


def test_sigterm_saves_and_exits_zero(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sdxl.py"),
                             *base_args(data, tmp_path, "--max_steps", 10000, "--batch_size", 2)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    steps = len(metrics.read_text().splitlines())
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert saved == [f"step_{steps:06d}"]
    assert not (tmp_path / "final").exists()


def test_nonfinite_steps_skip_then_stop(data, tmp_path, monkeypatch, capsys):
    real = loop.latent_loss

    def nan_loss(*args, **kw):
        return real(*args, **kw) * float("nan")
    monkeypatch.setattr(loop, "latent_loss", nan_loss)
    init = sdxl.load_model("tiny", seed=0).unet.state_dict()
    assert train(base_args(data, tmp_path, "--max_steps", 50, "--batch_size", 2)) == 1
    assert "10 non-finite steps in a row" in capsys.readouterr().err
    ck = load_file(str(tmp_path / "checkpoints" / "step_000010" / "trainable.safetensors"))
    assert all(torch.equal(ck["unet." + k], v) for k, v in init.items())  # no step was taken

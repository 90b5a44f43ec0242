"""train_sdxl.py on the tiny preset: learning, exact resume, DDP equivalence, interop, objectives, bad flags."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, torchrun, train_args
from PIL import Image
from safetensors.torch import load_file

import sdxl
import train_sdxl
from sdxl import diffusion
from sdxl.model import DDPMObjective
from training import distributed
from training.ema import EMA


@pytest.fixture
def data(train_data):
    """The shared dataset under this file's short name."""
    return train_data


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
    assert train(train_args(data, tmp_path, "--max_steps", 30, "--batch_size", 4, "--learning_rate", 1e-3)) == 0
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
    assert train(train_args(data, tmp_path / "a", *args)) == 0
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000003", tmp_path / "b" / "checkpoints" / "step_000003")
    assert train(train_args(data, tmp_path / "b", *args, "--resume", "latest")) == 0
    for name in ("lora_final.safetensors", "lora_final_ema.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step_000003", "step_000006"]
    # An epoch is 4 micro-batches = 2 steps: the resumed run crossed epoch boundaries like the first one.
    a_metrics = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[3:]
    b_metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in a_metrics] == [json.loads(x)["loss"] for x in b_metrics]


def unet_file(run: Path) -> dict:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def probe(args, out: Path) -> list[dict]:
    """torchrun train_sdxl.py through tests/dist_probe.py: what `distributed.wrap` made on each rank."""
    torchrun(args, script=ROOT / "tests" / "dist_probe.py")
    return [json.loads((out / f"wrap_rank{r}.json").read_text()) for r in range(2)]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run wrote at the end: lora_final.safetensors, or final/ (UNet and both text encoders)."""
    if (run / "lora_final.safetensors").exists():
        return load_file(str(run / "lora_final.safetensors"))
    return {f"{f.parent.name}/{k}": v for f in sorted((run / "final").glob("*/*.safetensors"))
            for k, v in load_file(str(f)).items()}


def initial_weights(data, out: Path, flags: list) -> dict[str, torch.Tensor]:
    """What a run with `flags` starts from (LoRA down weights are random): the same run at learning rate 0."""
    zero = ["--learning_rate", 0, "--lr_text_encoder1", 0, "--lr_text_encoder2", 0, "--max_steps", 1]
    assert train(train_args(data, out, "--batch_size", 2, *flags, *zero)) == 0
    return final_weights(out)


def assert_same_updates(run: Path, single: Path, init: dict[str, torch.Tensor], trained: tuple[str, ...]) -> None:
    """The updates w - w0 of `run` equal those of `single`, tensor by tensor, up to float rounding.

    A rank averages 1-image gradients where the single process averages a 2-image batch, and each weight is
    rounded to fp32 after every step, so updates differ by rounding only: measured at most 6.3e-5 of a tensor's
    largest update (SGD, fp32, 3 steps; 1-2 ulp of weights ~0.3 against updates ~3e-4). 1e-3 keeps a 15x margin
    and still fails for a rank that skips its gradient all-reduce (~50% off), drops an accumulation micro-batch
    (~25%) or draws another sample's noise (~100%). The 1e-9 floor is for tensors whose true gradient is zero, whose
    update is rounding noise (attention key biases: ~1e-12). Each prefix in `trained` must have moved."""
    got, want = final_weights(run), final_weights(single)
    assert got.keys() == want.keys() == init.keys()
    moved = set()
    for k in want:
        d_want, d_got = want[k].double() - init[k].double(), got[k].double() - init[k].double()
        scale = d_want.abs().max().item()
        err = (d_got - d_want).abs().max().item()
        assert err <= 1e-3 * scale + 1e-9, (run.name, k, err, scale)
        if scale > 1e-6:
            moved.add(k)
    for prefix in trained:
        assert any(k.startswith(prefix) for k in moved), f"nothing under {prefix} trained"


DIST_COMMON = ["--max_steps", 3, "--learning_rate", 0.05, "--seed", 5, "--optimizer", "sgd",
               "--gradient_accumulation_steps", 2]


def test_ddp_with_accumulation_and_text_encoders_equals_one_process(data, tmp_path):
    # SGD: Adam's m / sqrt(v) turns float-rounding noise in near-zero gradients into full-size updates.
    # Same global batch: 2 images x 2 micro-batches in one process, 1 image x 2 ranks x 2 micro-batches under DDP
    # (the first micro-batch runs under no_sync). Both text encoders train too, at their own learning rates.
    flags = [*DIST_COMMON, "--train_text_encoder", "--lr_text_encoder1", 0.02, "--lr_text_encoder2", 0.03]
    assert train(train_args(data, tmp_path / "single", "--batch_size", 2, *flags)) == 0
    ranks = probe(train_args(data, tmp_path / "ddp", "--batch_size", 1, *flags), tmp_path / "ddp")
    for r in ranks:  # plain DDP: whole parameters on every rank, the text encoders' among them
        assert r["wrapper"] == "DistributedDataParallel"
        assert r["ddp"] == {"gradient_as_bucket_view": True, "bucket_bytes_cap": 100 * 2**20, "static_graph": False,
                            "sync_buffers": False}
        assert all(p["placements"] is None for p in r["params"].values())
        assert any(n.startswith("text.text_encoder_2.") for n in r["params"])
    init = initial_weights(data, tmp_path / "init", flags)
    assert_same_updates(tmp_path / "ddp", tmp_path / "single", init, ("unet/", "text_encoder/", "text_encoder_2/"))
    # Only rank 0 wrote: one metrics line per step.
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 3


def test_ddp_lora_with_text_encoders_equals_one_process(data, tmp_path):
    flags = [*DIST_COMMON, "--use_lora", "--lora_target_mode", "all", "--lora_text_encoder"]
    assert train(train_args(data, tmp_path / "single", "--batch_size", 2, *flags)) == 0
    torchrun(train_args(data, tmp_path / "ddp", "--batch_size", 1, *flags))
    init = initial_weights(data, tmp_path / "init", flags)
    assert_same_updates(tmp_path / "ddp", tmp_path / "single", init, ("lora_unet_", "lora_te1_", "lora_te2_"))


def test_fsdp_shards_and_equals_one_process_and_resumes(data, tmp_path):
    assert train(train_args(data, tmp_path / "single", "--batch_size", 2, *DIST_COMMON)) == 0
    flags = ["--batch_size", 1, "--fsdp", *DIST_COMMON]
    ranks = probe(train_args(data, tmp_path / "fsdp", *flags, "--save_interval_steps", 2), tmp_path / "fsdp")
    sizes = {f"unet.{n}": p.numel() for n, p in sdxl.load_model("tiny").unet.named_parameters()}
    assert ranks[0]["params"].keys() == sizes.keys()
    for r in ranks:  # every UNet parameter is a DTensor sharded on dim 0 across the two ranks
        assert r["wrapper"] == "FSDPTrainee"  # fully_shard swaps the class in place: no wrapper module
        assert all(p["placements"] == ["Shard(0)"] for p in r["params"].values())
        assert all(p["global"] == sizes[n] for n, p in r["params"].items())
    unet = sdxl.load_model("tiny").unet  # a unit per resnet and transformer block, the levels, and the root
    units = {n for n, m in unet.named_modules() if any(m is u for u in distributed.fsdp_units(unet))}
    blocks = {n for n, m in unet.named_modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")}
    assert blocks and blocks <= units and set(ranks[0]["units"]) == {""} | {f"unet.{n}" for n in units}
    for n, size in sizes.items():  # ...and the two local shards hold it between them, once
        assert sum(r["params"][n]["local"] for r in ranks) == size, n
    assert sum(r["params"][n]["local"] for n in sizes for r in ranks[1:]) < 0.55 * sum(sizes.values())
    init = {k: v for k, v in initial_weights(data, tmp_path / "init", DIST_COMMON).items()}
    assert_same_updates(tmp_path / "fsdp", tmp_path / "single", init, ("unet/",))
    # FSDP checkpoints hold whole tensors, and resuming from one (sharded again) ends bit-identically.
    ck = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert {k: v.numel() for k, v in ck.items()} == sizes
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step_000002",
                    tmp_path / "resumed" / "checkpoints" / "step_000002")
    torchrun(train_args(data, tmp_path / "resumed", *flags, "--resume", "latest"))
    a, b = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trained_lora_loads_in_reference_pipeline(data, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    folder = tmp_path / "base"
    sdxl.load_model("tiny", seed=0).save_pretrained(folder)
    args = train_args(data, tmp_path / "run", "--use_lora", "--lora_target_mode", "all", "--lora_text_encoder",
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
        # Both text encoders' LoRA: the reference pipeline's prompt embeddings (CLIP-L and bigG penultimate states,
        # bigG pooled) with the file loaded equal ours, and differ from the base model's in each part.
        ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(["a red circle"], device="cpu", do_classifier_free_guidance=False)
        got_ctx, got_pooled = ours.text.encode(["a red circle"])
        base_ctx, base_pooled = sdxl.load_model(str(folder)).text.encode(["a red circle"])
        width_l = pipe.text_encoder.config.hidden_size
        for part in (slice(0, width_l), slice(width_l, None)):  # CLIP-L's columns, then bigG's
            assert (got_ctx[..., part] - ref_ctx[..., part]).abs().max() <= 1e-4
            assert (got_ctx[..., part] - base_ctx[..., part]).abs().max() > 1e-3, part
        assert (got_pooled - ref_pooled).abs().max() <= 1e-4
        assert (got_pooled - base_pooled).abs().max() > 1e-3


def fake_net(x_t, t, context, pooled, time_ids):
    """Predicts 0.3 * x_t + 0.1: enough to check every objective's arithmetic."""
    return 0.3 * x_t + 0.1


@pytest.mark.parametrize("prediction_type,loss_type,gamma", [
    ("epsilon", "native", None), ("v_prediction", "native", 5.0), ("sample", "native", None),
    ("epsilon", "velocity", 5.0)])
def test_objectives_against_hand_computation(prediction_type, loss_type, gamma):
    model = sdxl.load_model("tiny")
    objective = model.objective(prediction_type=prediction_type, loss_type=loss_type, min_snr_gamma=gamma,
                                noise_offset=0.05, timestep_range=(100, 900))
    x0 = torch.randn(2, 4, 4, 4)
    abar_all = diffusion.get_alphas_cumprod()
    seeds = [11, 12]
    got = objective.loss(fake_net, x0, (None, None, None), [torch.Generator().manual_seed(s) for s in seeds])
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
    assert torch.allclose(got, torch.stack(losses), rtol=1e-5)


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
    with ema.applied():
        assert torch.allclose(p, expected)
    assert torch.equal(p.detach(), torch.tensor([-1.0, -1.0]))


def test_ema_every_n_steps_against_hand_computation():
    """--ema_every 2: an update at steps 2 and 4 only, each with d_t^2 (t in steps), from the live value then."""
    p = torch.nn.Parameter(torch.tensor([1.0]))
    ema, expected = EMA([("p", p)], decay=0.9, warmup=True, every=2), 1.0
    for step, value in enumerate([3.0, 5.0, -1.0, 7.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        if step % 2 == 0:
            ema.update()
            t = step - 2
            d = min(0.9, (1 + t) / (10 + t)) ** 2
            expected = d * expected + (1 - d) * value
    assert ema.num_updates == 2 and torch.allclose(ema.shadow["p"], torch.tensor([expected]))


def test_cached_latents_and_text_train_like_uncached(data, tmp_path):
    common = ["--max_steps", 3, "--batch_size", 2, "--learning_rate", 0.05, "--optimizer", "sgd"]
    assert train(train_args(data, tmp_path / "plain", *common)) == 0
    cached = [*common, "--cache_latents", "--cache_text_embeddings", "--cache_dir", tmp_path / "cache"]
    assert train(train_args(data, tmp_path / "cached", *cached)) == 0
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
    assert train(train_args(data, tmp_path, *args)) == 0
    sample = Image.open(tmp_path / "samples" / "step_000002_0.png")
    final = sdxl.load_model(str(tmp_path / "final"))
    again = generate(final, ["a red circle"], height=64, width=64, steps=3, guidance_scale=5.0, seed=0)[0]
    assert list(sample.getdata()) == list(again.getdata())


def test_toml_config_and_flag_override(data, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 50\nlearning_rate = 0.5\nbatch_size = 2\n')
    assert train(train_args(data, tmp_path / "out", "--config", toml, "--max_steps", 1)) == 0
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
    assert train(train_args(data, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "config.json").exists()  # rejected before any work


def test_bad_data_and_existing_run_exit_2(data, tmp_path, capsys):
    assert train(train_args(tmp_path / "nope", tmp_path / "o1", "--max_steps", 1)) == 2
    assert "data_dir does not exist" in capsys.readouterr().err
    (tmp_path / "o2" / "checkpoints" / "step_000001").mkdir(parents=True)
    assert train(train_args(data, tmp_path / "o2", "--max_steps", 1)) == 2
    assert "holds another run's checkpoints" in capsys.readouterr().err
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "lora_final.safetensors").write_bytes(b"x")
    assert train(train_args(data, tmp_path / "o3", "--max_steps", 1)) == 2
    assert "lora_final.safetensors" in capsys.readouterr().err
    assert (tmp_path / "o3" / "lora_final.safetensors").read_bytes() == b"x"
    assert train(["--pretrained_model", "tiny"]) == 2
    assert "no training data" in capsys.readouterr().err


def test_sigterm_saves_and_exits_zero(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sdxl.py"),
                             *train_args(data, tmp_path, "--max_steps", 10000, "--batch_size", 2)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:  # signal only once two steps are logged, so the stop lands mid-training, not during setup
        deadline = time.time() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline, "training logged no step in 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:  # never leave a 10,000-step run behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    steps = len(metrics.read_text().splitlines())
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert saved == [f"step_{steps:06d}"]
    assert not (tmp_path / "final").exists()


def test_nonfinite_steps_skip_then_stop(data, tmp_path, monkeypatch, capsys):
    real = DDPMObjective.loss

    def nan_loss(*args, **kw):
        return real(*args, **kw) * float("nan")
    monkeypatch.setattr(DDPMObjective, "loss", nan_loss)
    init = sdxl.load_model("tiny", seed=0).unet.state_dict()
    assert train(train_args(data, tmp_path, "--max_steps", 50, "--batch_size", 2)) == 1
    assert "10 non-finite steps in a row" in capsys.readouterr().err
    # The device counts the streak; the host reads it one step later (no sync inside a step): saved at step 11.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000011"]
    ck = load_file(str(tmp_path / "checkpoints" / "step_000011" / "trainable.safetensors"))
    assert all(torch.equal(ck["unet." + k], v) for k, v in init.items())  # no step was taken


def per_parameter_lerp(shadows: list[torch.Tensor], params: list[torch.Tensor], weight: float) -> None:
    """The EMA step as it was written before the foreach version: one lerp per parameter."""
    for s, p in zip(shadows, params):
        s.lerp_(p.detach().to(s.device, torch.float32), weight)


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
@pytest.mark.parametrize("ema_cpu", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1 << 28, 100])  # one foreach call; several (a chunk's copies are bounded)
def test_ema_foreach_equals_per_parameter_loop(device, ema_cpu, chunk_bytes, monkeypatch):
    from training import ema as ema_module
    from training.post_hoc_ema import PowerEMA
    monkeypatch.setattr(ema_module, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    shapes_dtypes = [((7,), torch.bfloat16), ((3, 5), torch.float32), ((4, 2, 3), torch.bfloat16), ((1,), torch.float32),
                     ((16, 9), torch.bfloat16)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dt)) for s, dt in shapes_dtypes]
    named, where = [(f"p{i}", p) for i, p in enumerate(params)], "cpu" if ema_cpu else None
    ema, power = EMA(named, 0.99, True, where), PowerEMA(named, (0.05, 0.10), where)
    want = [p.detach().to(where or p.device, torch.float32, copy=True) for p in params]
    want_power = [[w.clone() for w in want] for _ in power.gammas]
    for step in range(1, 6):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g).to(device, p.dtype))
        ema.update()
        power.update(step)
        per_parameter_lerp(want, params, 1.0 - min(0.99, step / (9 + step)))  # t = step - 1 updates before
        for gamma, w in zip(power.gammas, want_power):
            per_parameter_lerp(w, params, 1 - (1 - 1 / step) ** (gamma + 1))
    assert all(s.device.type == (where or device) for s in ema.shadow.values())
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow.values(), want))
    for shadow, w in zip(power.shadows, want_power):
        assert all(torch.equal(a, b) for a, b in zip(shadow.values(), w))
    live = [p.detach().clone() for p in params]
    with ema.applied():  # the params hold the EMA rounded to their dtype...
        assert all(torch.equal(p, w.to(device, p.dtype)) for p, w in zip(params, want))
    assert all(torch.equal(p, x) for p, x in zip(params, live))  # ...and their own weights afterwards
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow.values(), want))  # the EMA was not rounded to bf16

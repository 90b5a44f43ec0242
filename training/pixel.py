"""Pixel-space SDXL training (the seed pixel-sdxl recipe) and the built-in demo: `train_sdxl.py --model_type pixel`
and `train_sdxl.py --demo` call `main(cfg)`.

Objective (JiT, arXiv 2511.13720): z = t x + (1 - t) e with e ~ N(0, noise_scale^2), t = 1 clean, t drawn
logit-normal (sigmoid(N(-0.8, 0.8))) or uniform; the net predicts x; the loss is the MSE between velocities
v = (x - z) / max(1 - t, t_eps) and v_pred = (x_pred - z) / max(1 - t, t_eps). The net's timestep input is
1000 (1 - t) (see sdxl/patch_codec.py for the one mapping to the samplers' s = 1 - t).

Stages, chosen by the flags:
  1. --teacher_checkpoint T: distil the codec from a latent SDXL teacher, body frozen. The encoder learns the
     teacher UNet's hidden state at the body's entry (its level k-1 downsampler output) for the VAE latent noised
     to the same signal-to-noise ratio; the decoder learns to turn the teacher's level-k up-path output into the
     clean pixels. --train_encoder encoder | decoder | both chooses the side(s).
  2. --lr_sdxl_unet_body 0: encoder / decoder train on the pixel objective, body frozen.
  3. otherwise everything trains; the body at --lr_sdxl_unet_body (default --learning_rate), the codec at
     --learning_rate.
The model starts from --pretrained_model: a pixel folder, or a latent SDXL (folder, file or preset) whose UNet
body and text encoders it takes (--base_resolution 64|32 picks patch 16|32). Text encoders stay frozen.
Power-function EMA snapshots go to <out>/ema_snapshots/ for `python -m training.post_hoc_ema`.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import sdxl
from sdxl import diffusion
from sdxl.patch_codec import (DEMO, PIXEL_PRESETS, PixelConfig, PixelSDXL, build_pixel_model, is_pixel_folder,
                              load_pixel_model, pixel_from_latent)
from sdxl.weights import CheckpointError
from training import checkpoint
from training.config import ConfigError, TrainConfig
from training.logging import Logger
from training.loop import DTYPES, MAX_NONFINITE, build_optimizer, lr_lambda, open_data, sample_seed
from training.post_hoc_ema import PowerEMA

POSTHOC_STDS = (0.05, 0.10)  # the snapshot profiles (EDM2 keeps two)


# ---- the objective --------------------------------------------------------------------------------------------

def jit_noise(x: torch.Tensor, e: torch.Tensor, t: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    """z = t x + (1 - t) noise_scale e, t (B,) with 1 = clean."""
    t = t.reshape(-1, *[1] * (x.ndim - 1))
    return t * x + (1 - t) * noise_scale * e


def velocity_loss(x_pred: torch.Tensor, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                  t_eps: float = 0.05) -> torch.Tensor:
    """Per-sample mean of (v - v_pred)^2, v = (x - z) / max(1 - t, t_eps), v_pred the same from x_pred. (B,)"""
    denom = (1 - t).clamp(min=t_eps).reshape(-1, *[1] * (x.ndim - 1))
    v, v_pred = (x - z) / denom, (x_pred.float() - z) / denom
    return (v - v_pred).pow(2).mean(dim=tuple(range(1, x.ndim)))


def pixel_loss(unet, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor,
               t: torch.Tensor, e: torch.Tensor, pcfg: PixelConfig) -> torch.Tensor:
    """The JiT loss of a batch: noise x to z at t, predict x from z at timestep 1000 (1 - t), mean velocity MSE."""
    z = jit_noise(x, e, t, pcfg.noise_scale)
    x_pred = unet(z, 1000 * (1 - t), context, pooled, time_ids)
    return velocity_loss(x_pred, x, z, t, pcfg.t_eps).mean()


def draw_noise_and_t(x: torch.Tensor, generator: torch.Generator, mode: str, mean: float, std: float):
    """(e like x, t (B,)) on the CPU generator, then moved to x's device."""
    e = torch.randn(x.shape, generator=generator)
    t = diffusion.sample_timesteps(x.shape[0], mode, mean=mean, std=std, num_train_timesteps=None,
                                   generator=generator)
    return e.to(x.device), t.to(x.device)


# ---- distillation from a latent teacher -----------------------------------------------------------------------

def load_teacher(path: str, pcfg: PixelConfig, device, dtype):
    """A latent SDXL whose UNet has the pixel model's body; anything else is a one-line CheckpointError."""
    if is_pixel_folder(path):
        raise CheckpointError(f"{path}: --teacher_checkpoint is a pixel model; the teacher must be a latent SDXL")
    try:
        teacher = sdxl.load_model(path, device=device, dtype=dtype)
    except CheckpointError as e:
        raise CheckpointError(f"--teacher_checkpoint: not a latent SDXL: {e}") from None
    if getattr(teacher, "is_pixel", False):
        raise CheckpointError(f"{path}: --teacher_checkpoint is a pixel model; the teacher must be a latent SDXL")
    if teacher.config.unet != pcfg.unet:
        raise CheckpointError(f"{path}: the teacher's UNet ({teacher.config.unet.block_out_channels}) is not the "
                              f"pixel model's body ({pcfg.unet.block_out_channels})")
    return teacher


def teacher_features(teacher, pixels, context, pooled, time_ids, t_pix, generator, level: int):
    """The teacher UNet's (entry, exit) hidden states at the body's level for the VAE latent of `pixels`, noised to
    the signal-to-noise ratio of the pixel noise level t (t^2 / (1-t)^2 = abar / (1 - abar))."""
    unet, vae = teacher.unet, teacher.vae
    n = len(unet.down_blocks)
    got = {}
    hooks = [unet.down_blocks[level - 1].downsamplers[0].register_forward_hook(
                 lambda m, a, out: got.__setitem__("entry", out)),
             unet.up_blocks[n - 1 - level].upsamplers[0].register_forward_pre_hook(
                 lambda m, a: got.__setitem__("exit", a[0]))]
    try:
        with torch.no_grad():
            lat = (vae.encode(pixels.to(vae.dtype)).mean.float() - vae.config.shift_factor) * vae.config.scaling_factor
            abar = (t_pix**2 / (t_pix**2 + (1 - t_pix) ** 2)).clamp(1e-4, 1 - 1e-6)
            ddpm_t = _abar_to_timestep(abar)
            noise = torch.randn(lat.shape, generator=generator).to(lat.device)
            lat_t = diffusion.add_noise(lat, noise, abar)
            unet(lat_t, ddpm_t, context, pooled, time_ids)
    finally:
        for h in hooks:
            h.remove()
    return got["entry"].float(), got["exit"].float()


def _abar_to_timestep(abar: torch.Tensor) -> torch.Tensor:
    """The SDXL training timestep whose abar is closest to each given abar."""
    table = diffusion.get_alphas_cumprod().to(abar.device)
    return (table[None] - abar[:, None]).abs().argmin(dim=1).float()


def distil_loss(model: PixelSDXL, teacher, pixels, context, pooled, time_ids, t, e, generator,
                side: str) -> torch.Tensor:
    """Encoder: MSE to the teacher's entry state from the pixels noised at t; decoder: MSE of the decoded teacher
    exit state to the clean pixels. `side`: encoder | decoder | both."""
    unet, pcfg = model.unet, model.config
    entry, exit_ = teacher_features(teacher, pixels, context, pooled, time_ids, t, generator, pcfg.entry_level)
    loss = pixels.new_zeros(())
    if side in ("encoder", "both"):
        z = jit_noise(pixels, e, t, pcfg.noise_scale)
        loss = loss + F.mse_loss(unet.encoder(z.to(unet.dtype)).float(), entry)
    if side in ("decoder", "both"):
        loss = loss + F.mse_loss(unet.decoder(exit_.to(unet.dtype)).float(), pixels)
    return loss


# ---- setup ----------------------------------------------------------------------------------------------------

def _is_set(cfg: TrainConfig, given: set[str] | None, name: str) -> bool:
    """Whether the user chose a field: named in `given`, or (without it) different from the default."""
    if given is not None:
        return name in given
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return getattr(cfg, name) != f.default


DEMO_DEFAULTS = dict(output_dir="out/demo", image_size=64, bucket_step=64, batch_size=16, max_steps=4000,
                     learning_rate=2e-3, lr_warmup_steps=50, lr_scheduler="cosine", weight_decay=0.0,
                     caption_dropout=0.1, precision="fp32", sample_steps=50, sample_sampler="heun", sample_cfg=3.0,
                     num_workers=0, log_every=25)


def demo_config(cfg: TrainConfig, given: set[str] | None = None) -> TrainConfig:
    """The demo's settings for every field the user left at its default."""
    return dataclasses.replace(cfg, **{k: v for k, v in DEMO_DEFAULTS.items() if not _is_set(cfg, given, k)})


def load_pixel(cfg: TrainConfig, device, dtype) -> PixelSDXL:
    if cfg.demo:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_pixel_model(DEMO)
            # A random CLIP's token embeddings (std 0.02) make every prompt's context nearly the same, and the
            # UNet then needs hundreds of steps to start reading it; at std 1 colour words stand apart at once.
            for enc in (model.text.text_encoder, model.text.text_encoder_2):
                enc.text_model.embeddings.token_embedding.weight.data.normal_(0, 1)
        return model.to(device, dtype)
    path = cfg.pretrained_model
    if is_pixel_folder(path) or (path in PIXEL_PRESETS and not Path(path).exists()):
        return load_pixel_model(path, device, dtype)
    latent = sdxl.load_model(path, device=device, dtype=dtype, seed=cfg.seed)
    model = pixel_from_latent(latent, cfg.base_resolution)
    del latent
    return model


def encode_captions(text, captions: list[str], cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) with all-zero rows for empty captions: the unconditional input `generate` uses."""
    if cache is not None and all(c in cache for c in captions):
        ctx, pooled = zip(*(cache[c] for c in captions))
        return torch.stack(ctx), torch.stack(pooled)
    with torch.no_grad():
        ctx, pooled = text.encode([c or " " for c in captions])
    keep = torch.tensor([bool(c) for c in captions], device=ctx.device)
    ctx, pooled = ctx.float() * keep[:, None, None], pooled.float() * keep[:, None]
    if cache is not None:
        cache.update({c: (ctx[i], pooled[i]) for i, c in enumerate(captions)})
    return ctx, pooled


def demo_batches(cfg: TrainConfig, device):
    """Endless (pixels, captions, time_ids) from the built-in procedural data set (training combinations)."""
    from training.demo_data import DemoData, train_combos
    data = DemoData(train_combos(), cfg.image_size, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    s = cfg.image_size
    ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32, device=device)
    while True:
        pixels, caps = data.batch(cfg.batch_size)
        caps = ["" if rng.random() < cfg.caption_dropout else c for c in caps]
        yield pixels.to(device), caps, ids.expand(len(caps), -1)


def folder_batches(cfg: TrainConfig, multiple: int, device):
    """(endless (pixels, captions, time_ids) from --data_dir / --metadata_files epoch after epoch, batches per
    epoch)."""
    from training.buckets import BucketBatchSampler
    from training.data import BucketDataset, collate
    if cfg.bucket_step % multiple:
        raise ConfigError(f"--bucket_step {cfg.bucket_step} must be a multiple of {multiple} (the pixel model's "
                          "patch size times its body's downsampling) so every bucket side is")
    ds = open_data(cfg)
    if not isinstance(ds, BucketDataset):
        raise ConfigError("pixel training needs a folder or metadata source (tar shards are not supported)")
    sampler = BucketBatchSampler(ds.bucket_ids, cfg.batch_size, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch, 0)
            ds.set_epoch(epoch)
            for batch in loader:
                yield batch["pixels"].to(device), batch["caption"], batch["time_ids"].to(device)
            epoch += 1
    return batches(), sampler.batches_per_epoch()


# ---- main -----------------------------------------------------------------------------------------------------

def main(cfg: TrainConfig, given: set[str] | None = None) -> int:
    if cfg.demo:
        cfg = demo_config(cfg, given)
    if cfg.model_type == "latent" and not cfg.demo:
        raise ConfigError("training.pixel trains pixel models: pass --model_type pixel or --demo")
    if cfg.demo and (cfg.teacher_checkpoint or cfg.data_dir):
        raise ConfigError("--demo trains from scratch on its own data: drop --teacher_checkpoint / --data_dir")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wdtype = DTYPES[cfg.precision] if device.type == "cuda" else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=wdtype)) if wdtype != torch.float32 else \
        (lambda: torch.autocast(device.type, enabled=False))

    # -- model, teacher, what trains
    model = load_pixel(cfg, device, wdtype)
    pcfg = model.config
    unet = model.unet
    model.requires_grad_(False)
    if cfg.image_size % pcfg.size_multiple:
        raise ConfigError(f"--image_size {cfg.image_size} is not a multiple of {pcfg.size_multiple} (patch "
                          f"{pcfg.patch_size} times the body's downsampling)")
    teacher = load_teacher(cfg.teacher_checkpoint, pcfg, device, wdtype) if cfg.teacher_checkpoint else None
    if teacher is not None:
        stage = "distil"
        parts = {"encoder": [unet.encoder], "decoder": [unet.decoder],
                 "both": [unet.encoder, unet.decoder]}[cfg.train_encoder]
        groups = [{"name": "codec", "params": [p for m in parts for p in m.parameters()], "lr": cfg.learning_rate}]
    else:
        body_lr = cfg.lr_sdxl_unet_body if cfg.lr_sdxl_unet_body is not None else cfg.learning_rate
        stage = "codec" if body_lr == 0 else "full"
        groups = [{"name": "codec", "params": unet.codec_parameters(), "lr": cfg.learning_rate}]
        if body_lr > 0:
            groups.append({"name": "body", "params": unet.body_parameters(), "lr": body_lr})
    master = wdtype if cfg.full_bf16 else torch.float32
    for g in groups:
        for p in g["params"]:
            p.data = p.data.to(master)
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.set_gradient_checkpointing(True)
    unet.train()
    named_trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    optimizer = build_optimizer(cfg, groups, device)

    # -- data (the demo's stream is endless: it always runs --max_steps)
    if cfg.demo:
        batches, steps_per_epoch = demo_batches(cfg, device), 0
    else:
        batches, per_epoch = folder_batches(cfg, pcfg.size_multiple, device)
        steps_per_epoch = max(1, per_epoch // cfg.gradient_accumulation_steps)
    cache: dict | None = {} if cfg.demo else None  # the demo's few captions are encoded once
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    ema = None
    if cfg.ema_decay:
        from training.ema import EMA
        ema = EMA(named_trainable, cfg.ema_decay, cfg.ema_warmup, "cpu" if cfg.ema_cpu else device)
    power = PowerEMA(named_trainable, POSTHOC_STDS, "cpu" if cfg.ema_cpu else device)
    snapshot_every = cfg.save_interval_steps or max(1, total_steps // 10)

    # -- objective settings: the model's JiT defaults unless the flags say otherwise
    mode = cfg.timestep_sampling if _is_set(cfg, given, "timestep_sampling") else "logit_normal"
    mean = cfg.logit_mean if _is_set(cfg, given, "logit_mean") else pcfg.logit_mean
    std = cfg.logit_std if _is_set(cfg, given, "logit_std") else pcfg.logit_std

    # -- resume
    step = 0
    if cfg.resume:
        ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(out, cfg.resume))
        params = dict(named_trainable)
        missing = set(params) - set(ck["trainable"])
        if missing:
            raise ConfigError(f"checkpoint does not match this run: no {sorted(missing)[0]!r}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ck["trainable"][n])
            for i, shadow in enumerate(power.shadows):
                for n in shadow:
                    shadow[n].copy_(ck["ema"][f"posthoc{i}/{n}"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["state"]["scheduler"])
        if ema is not None:
            ema.load_state_dict({n: ck["ema"][n] for n in ema.shadow}, ck["state"]["ema_updates"])
        step = ck["state"]["step"]
        for _ in range(step * cfg.gradient_accumulation_steps):  # the demo stream / data order continue
            next(batches)

    n_train = sum(p.numel() for p in trainable)
    print(f"pixel SDXL, stage {stage}: patch {pcfg.patch_size}, body from level {pcfg.entry_level}, "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
          f"{total_steps} steps of {cfg.batch_size} x {cfg.gradient_accumulation_steps} on {device}")
    logger = Logger(str(out), total_steps, step, True, vars(cfg), cfg.wandb, cfg.wandb_project, cfg.wandb_run_name)
    stop = {"signal": False}
    handlers = {s: signal.signal(s, lambda *_: stop.__setitem__("signal", True)) for s in
                (signal.SIGINT, signal.SIGTERM)}

    def save(step_now: int) -> None:
        ema_state = dict(ema.state_dict()) if ema is not None else {}
        for i, shadow in enumerate(power.shadows):
            ema_state.update({f"posthoc{i}/{n}": v for n, v in shadow.items()})
        checkpoint.save_checkpoint(out, step_now, trainable=dict(named_trainable), optimizer=optimizer.state_dict(),
                                   ema=ema_state, keep=cfg.keep_checkpoints,
                                   state={"step": step_now, "stage": stage, "scheduler": scheduler.state_dict(),
                                          "ema_updates": ema.num_updates if ema else 0})

    # -- loop
    t_last, images, exit_code, nonfinite = time.perf_counter(), 0, 0, 0
    while step < total_steps:
        loss_sum = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            pixels, caps, ids = next(batches)
            g = torch.Generator().manual_seed(sample_seed(cfg.seed, step, micro, 0))
            e, t = draw_noise_and_t(pixels, g, mode, mean, std)
            with autocast():
                ctx, pooled = encode_captions(model.text, caps, cache)
                if teacher is not None:
                    loss = distil_loss(model, teacher, pixels, ctx, pooled, ids, t, e, g, cfg.train_encoder)
                else:
                    loss = pixel_loss(unet, pixels, ctx, pooled, ids, t, e, pcfg)
            (loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.item() / cfg.gradient_accumulation_steps
            images += len(caps)
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
        if math.isfinite(loss_sum) and torch.isfinite(norm):
            optimizer.step()
            nonfinite = 0
        else:
            nonfinite += 1
            logger.write(f"step {step}: non-finite loss or gradient, step skipped ({nonfinite} in a row)")
        optimizer.zero_grad(set_to_none=True)
        lr_used = scheduler.get_last_lr()[0]  # what this step used (logged), before the update
        scheduler.step()
        step += 1
        if ema is not None:
            ema.update()
        power.update(step)
        if step % cfg.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            metrics = {"loss": loss_sum, "lr": lr_used, "grad_norm": norm.item(),
                       "images_per_sec": images / max(now - t_last, 1e-9)}
            logger.log(step, metrics)
            logger.progress(step, loss=loss_sum, lr=metrics["lr"], img_s=metrics["images_per_sec"])
            t_last, images = now, 0
        if step % snapshot_every == 0 or step == total_steps:
            power.save_snapshots(out / "ema_snapshots", step)
        if nonfinite >= MAX_NONFINITE:
            logger.write(f"{MAX_NONFINITE} non-finite steps in a row: saving and stopping")
            save(step)
            exit_code = 1
            break
        if stop["signal"]:
            logger.write(f"stop requested: saving step {step} and exiting")
            save(step)
            exit_code = -1
            break
        if cfg.save_interval_steps and step % cfg.save_interval_steps == 0:
            save(step)
    for s, h in handlers.items():
        signal.signal(s, h)
    logger.close()
    if exit_code:
        return max(exit_code, 0)
    unet.eval()
    model.save_pretrained(out / "final")
    if ema is not None:
        ema.swap()
        model.save_pretrained(out / "final_ema")
    if cfg.demo:
        score = demo_evaluation(model, cfg, out)
        print(f"prompt adherence (held-out captions, shape colour on pixels): {score:.3f}")
    if ema is not None:
        ema.swap()
    print(f"wrote {out / 'final'}")
    return 0


# ---- the demo's evaluation ------------------------------------------------------------------------------------

def demo_evaluation(model: PixelSDXL, cfg: TrainConfig, out: Path, seeds_per_combo: int = 8) -> float:
    """Generate every held-out caption `seeds_per_combo` times, write <out>/samples.png (a row per caption) and
    return the colour adherence."""
    from sampling.pixel import generate_pixel
    from training.demo_data import colour_adherence, held_out_combos
    combos = [c for c in held_out_combos() for _ in range(seeds_per_combo)]
    images = generate_pixel(model, [c.caption for c in combos], None, cfg.image_size, cfg.image_size,
                            steps=cfg.sample_steps, guidance_scale=cfg.sample_cfg, sampler=cfg.sample_sampler,
                            seed=cfg.seed)
    s = cfg.image_size
    grid = Image.new("RGB", (s * seeds_per_combo, s * len(combos) // seeds_per_combo), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % seeds_per_combo) * s, (i // seeds_per_combo) * s))
    grid.save(out / "samples.png")
    return colour_adherence(images, combos)

"""The training loop, top to bottom: setup -> models -> what trains -> wrap -> data -> loop -> final outputs.

Exact resume: data order is a function of (seed, epoch, position) and every sample's noise and timestep come
from a generator seeded by (seed, step, micro-batch, global position in the batch), so a resumed run, a run
on N processes and a run on one process with the same global batch all see the same samples and noise.
"""
from __future__ import annotations

import hashlib
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sdxl
from sdxl import diffusion, lora
from training import checkpoint, distributed
from training.config import ConfigError, TrainConfig
from training.logging import Logger, peak_memory_gb

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_NONFINITE = 10  # non-finite steps in a row before the run saves and stops


class Trainee(nn.Module):
    """What DDP wraps: the UNet, the text encoders when they train, and the LoRA network (whose adapters live
    outside the UNet's module tree), so every trained parameter belongs to the module whose forward runs."""

    def __init__(self, unet: nn.Module, text: nn.Module | None, network: nn.Module | None):
        super().__init__()
        self.unet, self.text, self.network = unet, text, network

    def forward(self, x_t, t, time_ids, context=None, pooled=None, tokens=None):
        if tokens is not None:  # text encoders train: encode inside the wrapped forward
            context, pooled = self.text(*tokens)
        return self.unet(x_t, t, context, pooled, time_ids)


# ---- setup helpers (each used once, kept here so main reads top to bottom) ------------------------------------

def sample_seed(seed: int, step: int, micro: int, position: int) -> int:
    """A stable 63-bit seed for one sample's noise and timestep."""
    h = hashlib.blake2b(f"{seed}:{step}:{micro}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def unused_text_layers(text, clip_skip: int = 0) -> list[str]:
    """Parameter-name prefixes of CLIP-L that SDXL never uses (its last layers after the penultimate state and
    its final norm): frozen, so DDP sees no parameter without a gradient."""
    if text.text_encoder is None:
        return []
    n = text.text_encoder.config.num_hidden_layers
    layers = [f"text_encoder.text_model.encoder.layers.{i}." for i in range(n - 1 - clip_skip, n)]
    return layers + ["text_encoder.text_model.final_layer_norm."]


def build_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device):
    name = cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay, fused=device.type == "cuda",
                                 foreach=device.type != "cuda")
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, weight_decay=cfg.weight_decay)
    modules = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "lion": ("lion_pytorch", "lion-pytorch"),
               "prodigy": ("prodigyopt", "prodigyopt")}
    module, package = modules[name]
    try:
        lib = __import__(module)
    except ImportError:
        raise ConfigError(f"--optimizer {name} needs the {package} package: pip install {package}") from None
    if name == "adamw8bit":
        return lib.optim.AdamW8bit(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay)
    if name == "lion":
        return lib.Lion(groups, weight_decay=cfg.weight_decay)
    return lib.Prodigy(groups, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup, then constant / cosine / linear decay to 0 at total_steps."""
    def f(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        progress = (step - cfg.lr_warmup_steps) / max(1, total_steps - cfg.lr_warmup_steps)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return f


OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 1, "lion": 4, "prodigy": 16, "sgd": 4}


def activation_bytes(unet_cfg, batch: int, hw: tuple[int, int], ctx_len: int, dtype: torch.dtype,
                     checkpointing: bool) -> int:
    """Bytes autograd saves for the backward pass in one UNet forward: counted exactly on the meta device
    (no memory, no compute), as the sum of the tensors saved by every op."""
    from sdxl.unet import UNet
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        key = (id(t.untyped_storage()) if not t.is_meta else id(t), t.data_ptr() if not t.is_meta else 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.device("meta"):
        unet = UNet(unet_cfg).to(dtype)
        unet.set_gradient_checkpointing(checkpointing)
        unet.train()
        x = torch.zeros(batch, unet_cfg.in_channels, *hw, dtype=dtype, requires_grad=True)
        args = (torch.zeros(batch), torch.zeros(batch, ctx_len, unet_cfg.cross_attention_dim, dtype=dtype),
                torch.zeros(batch, unet_cfg.pooled_dim, dtype=dtype), torch.zeros(batch, unet_cfg.num_time_ids))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, *args)
    return total


def memory_plan(cfg, model, trainable: list[nn.Parameter], network, largest_bucket, latent_factor: int,
                ema_on_device: bool) -> str:
    gib = 2**30
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if network is not None:
        weights += sum(p.numel() * p.element_size() for p in network.parameters())
    n_train = sum(p.numel() for p in trainable)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    opt = n_train * OPTIMIZER_STATE_BYTES[cfg.optimizer] // (2 if cfg.full_bf16 and cfg.optimizer == "adamw" else 1)
    ema = n_train * 4 if cfg.ema_decay and ema_on_device else 0
    h, w = largest_bucket[0] // latent_factor, largest_bucket[1] // latent_factor
    act = activation_bytes(model.unet.config, cfg.batch_size, (h, w), 77, DTYPES[cfg.precision],
                           cfg.gradient_checkpointing)
    rows = [("weights", weights), ("gradients", grads), (f"optimizer ({cfg.optimizer})", opt), ("EMA", ema),
            (f"activations ({largest_bucket[1]}x{largest_bucket[0]} px, batch {cfg.batch_size})", act)]
    lines = [f"memory plan: {n_train / 1e6:.2f}M trainable parameters"]
    lines += [f"  {name:<44s} {b / gib:8.2f} GiB" for name, b in rows]
    lines.append(f"  {'total (before allocator overhead)':<44s} {sum(b for _, b in rows) / gib:8.2f} GiB")
    return "\n".join(lines)


def open_data(cfg: TrainConfig, **kw):
    """The dataset the data flags point at, with the caption rules of the caption flags."""
    from training.captions import CaptionConfig
    from training.data import open_dataset
    caption_cfg = CaptionConfig(shuffle_tags=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                                tag_dropout=cfg.tag_dropout, caption_dropout=cfg.caption_dropout,
                                prefix=cfg.caption_prefix)
    return open_dataset(cfg.data_dir, cfg.metadata_files, cfg.train_shards, image_size=cfg.image_size,
                        step=cfg.bucket_step, min_side=cfg.min_side, max_side=cfg.max_side,
                        min_image_size=cfg.min_image_size, random_crop=cfg.random_crop, flip_aug=cfg.flip_aug,
                        caption_config=caption_cfg, seed=cfg.seed, **kw)


def fingerprint(module: nn.Module) -> str:
    """A cheap identity of a network's weights for cache keys: shapes plus the bytes of a few tensors."""
    h = hashlib.blake2b(digest_size=12)
    sd = module.state_dict()
    for k in sorted(sd):
        h.update(f"{k}{tuple(sd[k].shape)}".encode())
    for k in sorted(sd)[:: max(1, len(sd) // 8)]:
        h.update(sd[k].detach().float().cpu().numpy().tobytes()[:1 << 16])
    return h.hexdigest()


# ---- the training step --------------------------------------------------------------------------------------

def latent_loss(cfg: TrainConfig, trainee, batch: dict, model, alphas_cumprod: torch.Tensor, seeds: list[int],
                device: torch.device, prediction_type: str, text_trains: bool, autocast) -> torch.Tensor:
    """Noise the latents at sampled timesteps, predict, and return the mean (weighted) MSE of the batch."""
    if "latents" in batch:
        x0 = batch["latents"].to(device, torch.float32)
    else:
        with torch.no_grad(), autocast():
            vae = model.vae
            x0 = (vae.encode(batch["pixels"].to(device)).mean.float() - vae.config.shift_factor) \
                * vae.config.scaling_factor
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.stack([torch.randn(x0.shape[1], 1, 1, generator=g) for g in gens])
    t = torch.cat([diffusion.sample_timesteps(1, cfg.timestep_sampling, mean=cfg.logit_mean, std=cfg.logit_std,
                                              t_range=cfg.timestep_bounds, generator=g) for g in gens])
    noise, t = noise.to(device), t.to(device)
    abar = alphas_cumprod.to(device)[t]
    x_t = diffusion.add_noise(x0, noise, abar)
    kw = {"time_ids": batch["time_ids"].to(device)}
    if "context" in batch:
        kw.update(context=batch["context"].to(device), pooled=batch["pooled"].to(device))
    elif text_trains:
        kw["tokens"] = model.text.tokenize(batch["caption"])
    else:
        with torch.no_grad(), autocast():
            kw["context"], kw["pooled"] = model.text.encode(batch["caption"])
    with autocast():
        pred = trainee(x_t, t, **kw).float()
    if cfg.loss_type == "velocity":
        pred = diffusion.v_target(diffusion.to_x0(pred, x_t, abar, prediction_type),
                                  diffusion.to_eps(pred, x_t, abar, prediction_type), abar)
        target, weight_type = diffusion.v_target(x0, noise, abar), "v_prediction"
    else:
        target, weight_type = diffusion.training_target(x0, noise, abar, prediction_type), prediction_type
    loss = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        loss = loss * diffusion.min_snr_weight(abar / (1 - abar), cfg.min_snr_gamma, weight_type)
    return loss.mean()


# ---- main ---------------------------------------------------------------------------------------------------

def main(cfg: TrainConfig, given: set[str] | None = None) -> int:
    """Train; `given` (the fields set by flag or file) is unused here: latent defaults need no overriding."""
    # -- setup
    d = distributed.init()
    out = Path(cfg.output_dir)
    previous = checkpoint.list_checkpoints(out) + [p for p in (out / "final", out / "lora_final.safetensors")
                                                    if p.exists()]
    if cfg.resume is None and previous:  # never overwrite another run's results
        raise ConfigError(f"{out}: holds another run's checkpoints or final weights ({previous[0].name}); "
                          "pass --resume latest or another --output_dir")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
    torch.manual_seed(cfg.seed)
    device, wdtype = d.device, DTYPES[cfg.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=wdtype)) if cfg.precision != "fp32" else \
        (lambda: torch.autocast(device.type, enabled=False))

    # -- models: frozen parts in the training dtype; trained weights get fp32 masters unless --full_bf16
    model = sdxl.load_model(cfg.pretrained_model, device=device, dtype=wdtype, vae=cfg.vae, seed=cfg.seed)
    vae_dtype = DTYPES[cfg.vae_precision] if cfg.vae_precision else (
        torch.float32 if wdtype == torch.float16 and model.vae.config.force_upcast else wdtype)
    if wdtype == torch.float16 and vae_dtype == torch.float16 and model.vae.config.force_upcast:
        raise ConfigError("--vae_precision fp16 with a VAE that overflows in fp16 (force_upcast); use the fp16-fix "
                          "VAE (--vae) or --vae_precision fp32/bf16")
    model.vae.to(vae_dtype)
    prediction_type = cfg.prediction_type or model.config.prediction_type
    alphas_cumprod = diffusion.get_alphas_cumprod(zero_terminal_snr=cfg.zero_terminal_snr)
    master = wdtype if cfg.full_bf16 else torch.float32
    network, text_trains = None, cfg.train_text_encoder or cfg.lora_text_encoder
    model.requires_grad_(False)
    frozen = unused_text_layers(model.text)
    if cfg.use_lora:
        network = lora.inject(model, cfg.lora_target_mode, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                              kind=cfg.lora_kind, text_encoders=cfg.lora_text_encoder).to(device)
        for name, adapter in network.named_children():
            path = f"{network.targets[name].component}.{network.targets[name].path}."
            if any(path.startswith(f) for f in frozen):
                adapter.requires_grad_(False)
    else:
        (model.unet.up_blocks if cfg.unet_train_blocks == "up" else model.unet).to(master).requires_grad_(True)
        if cfg.train_text_encoder:
            model.text.to(master).requires_grad_(True)
            for n, p in model.text.named_parameters():
                if any(n.startswith(f) for f in frozen):
                    p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.unet.set_gradient_checkpointing(True)
        if text_trains:
            for enc in (model.text.text_encoder, model.text.text_encoder_2):
                if enc is not None:
                    getattr(enc, "text_model", enc).gradient_checkpointing_enable()
    trainee = Trainee(model.unet, model.text if text_trains else None, network).train()

    # -- wrap (DDP, or FSDP2 which replaces parameters: the optimizer is built after it)
    fsdp = cfg.fsdp and d.enabled
    trainee_wrapped = distributed.wrap(trainee, d, fsdp, model.unet)
    named_trainable = [(n, p) for n, p in trainee.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    lr1 = cfg.lr_text_encoder1 or cfg.learning_rate
    lrs = {"network.lora_te1_": lr1, "network.lora_te2_": cfg.lr_text_encoder2 or lr1,
           "text.text_encoder.": lr1, "text.text_encoder_2.": cfg.lr_text_encoder2 or lr1}
    groups: dict[float, list] = {}
    for n, p in named_trainable:  # one group per learning rate: UNet (or its LoRA), CLIP-L, bigG
        lr = next((v for k, v in lrs.items() if n.startswith(k)), cfg.learning_rate)
        groups.setdefault(lr, []).append(p)
    optimizer = build_optimizer(cfg, [{"params": ps, "lr": lr} for lr, ps in groups.items()], device)

    # -- data (and caches, after which the VAE / text encoders can leave the GPU)
    from training import cache as cache_mod
    from training.buckets import BucketBatchSampler
    from training.data import BucketDataset, DataStats, collate
    stats = DataStats()
    cache_dir = Path(cfg.cache_dir or out / "cache")
    latent_cache = cache_mod.LatentCache(cache_dir, fingerprint(model.vae), cfg.flip_aug) \
        if cfg.cache_latents else None
    random_captions = cfg.shuffle_tags or cfg.tag_dropout > 0 or cfg.caption_dropout > 0
    if cfg.cache_text_embeddings and random_captions and d.is_main:
        print("--cache_text_embeddings: captions change every step (shuffling / dropout), so only their token ids "
              "are cached (per word, by the tokenizer); the text encoders stay loaded")
    text_cache = cache_mod.TextCache(cache_dir, fingerprint(model.text)) \
        if cfg.cache_text_embeddings and not random_captions else None
    ds = open_data(cfg, stats=stats, latent_cache=latent_cache, text_cache=text_cache)
    if not isinstance(ds, BucketDataset):
        raise ConfigError("tar shards stream without a fixed epoch: this trainer needs a folder or metadata "
                          "source for exact resume (pass --data_dir FOLDER or --metadata_files)")
    if latent_cache is not None:
        with torch.no_grad(), autocast():
            latent_cache.build(ds, lambda px: ((model.vae.encode(px.to(device, vae_dtype)).mean.float()
                                                - model.vae.config.shift_factor) * model.vae.config.scaling_factor),
                               rank=d.rank, world_size=d.world_size, progress=d.is_main)
    if text_cache is not None:
        with torch.no_grad(), autocast():
            text_cache.build(cache_mod.captions_of(ds), lambda caps: tuple(
                x.float() for x in model.text.encode(list(caps))), rank=d.rank, world_size=d.world_size)
    distributed.barrier(d)
    if latent_cache is not None and text_cache is not None and cache_mod.caches_complete(ds) and not cfg.sample_every:
        model.vae.to("cpu"), model.text.to("cpu")  # the loop never needs them: free the GPU
    sampler = BucketBatchSampler(ds.bucket_ids, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = sampler.batches_per_epoch() // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"{sampler.batches_per_epoch()} batches per epoch is fewer than "
                          f"--gradient_accumulation_steps {accum}: lower it or --batch_size")
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = None
    if cfg.ema_decay:
        from training.ema import EMA
        ema = EMA(named_trainable, cfg.ema_decay, cfg.ema_warmup, "cpu" if cfg.ema_cpu else device)

    # -- resume
    step, epoch, position = 0, 0, 0
    if cfg.resume:
        ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(out, cfg.resume))
        missing = {n for n, _ in named_trainable} - set(ck["trainable"])
        if missing:
            raise ConfigError(f"checkpoint does not match this run: no {sorted(missing)[0]!r}")
        distributed.load_full_state(trainee, optimizer, ck["trainable"], ck["optimizer"], fsdp)
        st = ck["state"]
        scheduler.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"]) if st.get("scaler") else None
        if ema is not None and ck["ema"] is not None:
            ema.load_state_dict(ck["ema"], st["ema_updates"])
        step, epoch, position = st["step"], st["epoch"], st["position"]

    if d.is_main:
        print(f"{stats}\n{ds.bucket_table()}")
        print(f"run plan: {len(ds)} images, {sampler.batches_per_epoch()} batches of {cfg.batch_size} x "
              f"{d.world_size} device(s) per epoch, accumulation {accum}: {steps_per_epoch} steps per epoch, "
              f"{total_steps} steps in all (starting at {step})")
        largest = max(ds.buckets[b] for b in set(ds.bucket_ids))
        print(memory_plan(cfg, model, trainable, network, largest, model.vae.config.downsample_factor,
                          not cfg.ema_cpu))
    logger = Logger(str(out), total_steps, step, d.is_main, vars(cfg), cfg.wandb, cfg.wandb_project,
                    cfg.wandb_run_name)

    stop = {"signal": False}
    handlers = {s: signal.signal(s, lambda *_: stop.__setitem__("signal", True)) for s in
                (signal.SIGINT, signal.SIGTERM)}

    names = {n for n, _ in named_trainable}

    def save(step_now: int, epoch_now: int, position_now: int) -> None:
        model_sd, optim_sd = distributed.full_state(trainee, optimizer, fsdp)  # a collective under FSDP
        if d.is_main:
            checkpoint.save_checkpoint(out, step_now, trainable={n: v for n, v in model_sd.items() if n in names},
                                       optimizer=optim_sd, ema=ema.state_dict() if ema else None,
                                       keep=cfg.keep_checkpoints,
                                       state={"step": step_now, "epoch": epoch_now, "position": position_now,
                                              "scheduler": scheduler.state_dict(),
                                              "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                              "ema_updates": ema.num_updates if ema else 0})
        distributed.barrier(d)

    # -- loop
    nonfinite, exit_code, t_last, images = 0, 0, time.perf_counter(), 0
    while step < total_steps and exit_code == 0:
        sampler.set_epoch(epoch, position)
        ds.set_epoch(epoch)
        batches = iter(loader)
        while position + accum <= steps_per_epoch * accum and step < total_steps:
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                batch = next(batches)
                n = len(batch["caption"])
                seeds = [sample_seed(cfg.seed, step, micro, d.rank * cfg.batch_size + i) for i in range(n)]
                sync = micro == accum - 1 or not d.enabled or cfg.fsdp
                ctx = trainee_wrapped.no_sync() if not sync else _null()
                with ctx:
                    loss = latent_loss(cfg, trainee_wrapped, batch, model, alphas_cumprod, seeds, device,
                                       prediction_type, text_trains, autocast) / accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
                images += n * d.world_size
            position += accum
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
            loss_mean = distributed.all_reduce_mean(loss_sum, d)
            if torch.isfinite(loss_mean) and torch.isfinite(norm):
                scaler.step(optimizer)
                scaler.update()
                nonfinite = 0
            else:
                nonfinite += 1
                scaler.update()
                logger.write(f"step {step}: non-finite loss or gradient, step skipped ({nonfinite} in a row)")
            optimizer.zero_grad(set_to_none=True)
            lr_used = scheduler.get_last_lr()[0]  # what this step used (logged), before the update
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update()
            now = time.perf_counter()
            if step % cfg.log_every == 0:
                metrics = {"epoch": epoch, "loss": loss_mean.item(), "lr": lr_used,
                           "grad_norm": norm.item(), "images_per_sec": images / max(now - t_last, 1e-9),
                           "peak_mem_gb": peak_memory_gb(device)}
                logger.log(step, metrics)
                logger.progress(step, loss=metrics["loss"], lr=metrics["lr"], img_s=metrics["images_per_sec"],
                                mem_gb=metrics["peak_mem_gb"])
                t_last, images = now, 0
            if cfg.sample_every and step % cfg.sample_every == 0:
                sample_images(cfg, model, ema, out, step, logger, d, autocast)
            end_of_epoch = position + accum > steps_per_epoch * accum
            next_pos = (epoch + 1, 0) if end_of_epoch else (epoch, position)
            if nonfinite >= MAX_NONFINITE:
                logger.write(f"{MAX_NONFINITE} non-finite steps in a row: saving and stopping")
                save(step, *next_pos)
                exit_code = 1
                break
            if distributed.any_true(stop["signal"], d, device):
                logger.write(f"stop requested: saving step {step} and exiting")
                save(step, *next_pos)
                exit_code = -1
                break
            if (cfg.save_interval_steps and step % cfg.save_interval_steps == 0) or (
                    end_of_epoch and cfg.save_interval and (epoch + 1) % cfg.save_interval == 0):
                save(step, *next_pos)
        if position + accum > steps_per_epoch * accum:  # the epoch ran out (not the step budget)
            epoch, position = epoch + 1, 0
        del batches
    for s, h in handlers.items():
        signal.signal(s, h)
    logger.close()
    if exit_code == 0:
        if fsdp:  # gather the sharded UNet into a plain one on rank 0 before writing files
            unet_sd = {k.removeprefix("unet."): v for k, v in distributed.full_state(trainee, optimizer, True)[0]
                       .items() if k.startswith("unet.")}
            if d.is_main:
                from sdxl.unet import UNet
                with torch.device("meta"):
                    model.unet = UNet(model.unet.config)
                model.unet.load_state_dict(unet_sd, assign=True)
        save_final(cfg, model, network, ema, out, d)
    distributed.cleanup(d)
    return max(exit_code, 0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sample_images(cfg: TrainConfig, model, ema, out: Path, step: int, logger: Logger, d, autocast) -> None:
    """Validation images with the generate() code users run (EMA weights when kept)."""
    if d.is_main:
        from sampling.pipeline import generate
        was = model.unet.training
        model.unet.eval()
        if ema is not None:
            ema.swap()
        try:
            with autocast():
                images = generate(model, cfg.sample_prompts, height=cfg.image_size, width=cfg.image_size,
                                  steps=cfg.sample_steps, guidance_scale=cfg.sample_cfg, sampler=cfg.sample_sampler,
                                  seed=cfg.seed)
        finally:
            if ema is not None:
                ema.swap()
            model.unet.train(was)
        folder = out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            paths.append(folder / f"step_{step:06d}_{i}.png")
            im.save(paths[-1])
        logger.images(step, paths, cfg.sample_prompts)
    distributed.barrier(d)


def save_final(cfg: TrainConfig, model, network, ema, out: Path, d) -> None:
    """lora_final.safetensors (kohya keys, or PEFT) or final/ (diffusers) + final.safetensors; EMA beside."""
    if not d.is_main:
        return
    meta = {"training_config": cfg.to_json(), "resolution": f"{cfg.image_size},{cfg.image_size}"}
    variants = [("", False)] + ([("_ema", True)] if ema is not None else [])
    for suffix, use_ema in variants:
        if use_ema:
            ema.swap()
        try:
            if network is not None:
                lora.save_lora(out / f"lora_final{suffix}.safetensors", network, format=cfg.lora_format,
                               metadata=meta)
            else:
                model.save_pretrained(out / f"final{suffix}")
                if cfg.save_single_file:
                    model.save_single_file(out / f"final{suffix}.safetensors")
        finally:
            if use_ema:
                ema.swap()

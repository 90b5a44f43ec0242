"""One training loop for every model family: setup -> model -> what trains -> wrap -> data -> loop -> outputs.

It asks the model bundle (`sdxl.model.SDXL`, `sdxl.pixel.PixelSDXL`) for its space (`encode`), objective
(`objective(...).loss(net, x0, cond, generators)`), what trains (`param_groups`) and sampling (via `generate`),
never for its family. Exact resume: checkpoints hold the data position (per rank for tar streams), and each
sample's noise and timestep come from a generator seeded by (seed, step, micro-batch, position in the global batch),
so resumed, N-process and 1-process runs with the same global batch see the same samples and noise. Empty captions
(caption dropout) train the unconditional input `generate` uses: zeros.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import sdxl
from sdxl import lora
from training import checkpoint, distributed, stochastic_rounding
from training.config import ConfigError, TrainConfig, load_block_lr
from training.logging import Logger, peak_memory_gb
from training.validation import open_validation, validation_loss
from sdxl.config import DTYPES

MAX_NONFINITE = 10  # non-finite steps in a row before the run saves and stops
POSTHOC_STDS = (0.05, 0.10)  # the power-function EMA profiles of --ema_snapshots (EDM2 keeps two)
OBJECTIVE_OPTIONS = ("prediction_type", "loss_type", "min_snr_gamma", "noise_offset", "timestep_sampling",
                     "logit_mean", "logit_std", "zero_terminal_snr", "train_encoder", "huber_c", "huber_schedule",
                     "debiased_estimation", "timestep_bias")


class Trainee(nn.Module):
    """What DDP wraps: the network, the text encoders when they train, the LoRA network (whose adapters live
    outside the network's module tree) and the ControlNet that steers the frozen network, so every trained parameter
    belongs to the module whose forward runs. forward returns the objective's per-sample loss, weighted by `mask`
    (B, 1, H, W) when given; `control`: the ControlNet's conditioning images (B, 3, H, W) in [0, 1]."""

    def __init__(self, unet: nn.Module, text: nn.Module | None, network: nn.Module | None,
                 controlnet: nn.Module | None = None):
        super().__init__()
        self.unet, self.text, self.network, self.controlnet = unet, text, network, controlnet

    def forward(self, objective, x0, generators, time_ids, keep, context=None, pooled=None, tokens=None, mask=None,
                control=None):
        if tokens is not None:  # text encoders train: encode inside the wrapped forward
            context, pooled = self.text.encode_tokens(*tokens)
        cond = (context * keep[:, None, None], pooled * keep[:, None], time_ids)
        net = self.unet if self.controlnet is None else functools.partial(self.steered, control)
        return objective.loss(net, x0, cond, generators, weight=mask)

    def steered(self, control: torch.Tensor, x: torch.Tensor, t, *cond) -> torch.Tensor:
        """The network with the ControlNet's residuals added to its skips and mid block."""
        down, mid = self.controlnet(x, t, *cond, control)
        return self.unet(x, t, *cond, down_block_additional_residuals=down, mid_block_additional_residual=mid)


@dataclass
class Run:
    """What the steps, saves and resumes of one run share."""
    cfg: TrainConfig
    d: distributed.Dist
    out: Path
    model: nn.Module
    trainee: Trainee
    wrapped: nn.Module  # the trainee under DDP / FSDP (the trainee itself in one process)
    objective: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    emas: dict
    source: object  # the batches: EpochBatches, a ShardStream or the demo's stream
    autocast: object
    fsdp: bool
    validation: object = None  # the held-out images (training/validation.py), or None

    @property
    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.trainee.named_parameters() if p.requires_grad]


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


def memory_plan(cfg: TrainConfig, model, trainable: list[nn.Parameter], network, largest_bucket) -> str:
    """The memory plan printed before the first step (counted in training/memory.py)."""
    from training.memory import memory_plan as plan
    return plan(cfg, model, trainable, network, largest_bucket)


def data_options(cfg: TrainConfig) -> dict:
    """The dataset options of the data and caption flags, for folders, metadata and tar streams alike."""
    from training.captions import CaptionConfig
    return dict(image_size=cfg.image_size, step=cfg.bucket_step, min_side=cfg.min_side, max_side=cfg.max_side,
                min_image_size=cfg.min_image_size, random_crop=cfg.random_crop, flip_aug=cfg.flip_aug,
                caption_config=CaptionConfig(shuffle_tags=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                                             tag_dropout=cfg.tag_dropout, caption_dropout=cfg.caption_dropout,
                                             prefix=cfg.caption_prefix))


# ---- setup ------------------------------------------------------------------------------------------------------

def prepare_output(cfg: TrainConfig, d) -> Path:
    """Refuse to overwrite another run, and remove what a save killed half-way left."""
    out = Path(cfg.output_dir)
    previous = checkpoint.list_checkpoints(out) + [p for p in (out / "final", out / "lora_final.safetensors")
                                                    if p.exists()]
    if cfg.resume is None and previous:  # never overwrite another run's results
        raise ConfigError(f"{out}: holds another run's checkpoints or final weights ({previous[0].name}); "
                          "pass --resume latest or another --output_dir")
    if d.is_main:
        checkpoint.remove_partial(out)
    return out


def load_for_training(cfg: TrainConfig, device, wdtype):
    """(model, teacher or None), frozen; the teacher (pixel distillation) is a latent SDXL."""
    model = sdxl.load_model(cfg.pretrained_model, device=device, dtype=wdtype, vae=cfg.vae, seed=cfg.seed,
                            model_type=cfg.model_type, base_resolution=cfg.base_resolution,
                            vae_dtype=DTYPES.get(cfg.vae_precision))
    teacher = cfg.teacher_checkpoint and sdxl.load_model(cfg.teacher_checkpoint, device=device, dtype=wdtype,
                                                         model_type="latent")
    return model.requires_grad_(False), teacher or None


def what_trains(cfg: TrainConfig, model, teacher, device, master: torch.dtype):
    """(Trainee, LoRA network or ControlNet or None, optimizer param groups): LoRA adapters, a ControlNet (the
    UNet frozen), or the bundle's own groups (the whole UNet, its up blocks, or a stage of the pixel recipe) plus
    the text encoders when they train."""
    text_trains = cfg.train_text_encoder or cfg.lora_text_encoder
    frozen, network = unused_text_layers(model.text), None
    if cfg.controlnet:
        network = controlnet_to_train(cfg, model, device, master)
        param_groups = [{"name": "controlnet", "params": list(network.parameters()), "lr": cfg.learning_rate}]
        if cfg.gradient_checkpointing:
            model.unet.set_gradient_checkpointing(True)
            network.set_gradient_checkpointing(True)
        return Trainee(model.unet, None, None, network).train(), network, param_groups
    lr1 = cfg.lr_text_encoder1 or cfg.learning_rate
    lrs = {"lora_unet_": cfg.learning_rate, "lora_te1_": lr1, "lora_te2_": cfg.lr_text_encoder2 or lr1}  # kohya names
    if cfg.use_lora:
        rank, alpha = lora.block_values(cfg.lora_block_ranks, cfg.lora_rank, cfg.lora_alpha)
        try:  # a block name the model lacks, a LoKr factor that does not divide: the flags' fault
            network = lora.inject(model, cfg.lora_target_mode, rank, alpha, cfg.lora_dropout,
                                  kind=cfg.lora_kind, text_encoders=cfg.lora_text_encoder).to(device)
        except ValueError as e:
            raise ConfigError(f"--lora_block_ranks / --lora_kind: {e}") from None
        groups = {lr: [] for lr in lrs.values()}
        for name, adapter in network.named_children():
            target = network.targets[name]
            adapter.requires_grad_(not any(f"{target.component}.{target.path}.".startswith(f) for f in frozen))
            groups[next(lr for k, lr in lrs.items() if name.startswith(k))] += [p for p in adapter.parameters()
                                                                                if p.requires_grad]
        param_groups = [{"params": ps, "lr": lr} for lr, ps in groups.items() if ps]
    else:
        param_groups = model.param_groups(cfg.learning_rate, unet_train_blocks=cfg.unet_train_blocks,
                                          teacher=teacher, train_encoder=cfg.train_encoder,
                                          lr_sdxl_unet_body=cfg.lr_sdxl_unet_body)
        towers = (model.text.text_encoder, model.text.text_encoder_2) if cfg.train_text_encoder else ()
        param_groups += [{"name": name, "params": list(enc.parameters()), "lr": lr} for enc, lr, name in
                         zip(towers, (lrs["lora_te1_"], lrs["lora_te2_"]), ("text_encoder", "text_encoder_2"))
                         if enc is not None]
        for p in (p for g in param_groups for p in g["params"]):
            p.data = p.data.to(master)
            p.requires_grad_(True)
        for n, p in model.text.named_parameters():
            p.requires_grad_(p.requires_grad and not any(n.startswith(f) for f in frozen))
        param_groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups]
    if cfg.block_lr:
        param_groups = block_lr_groups(load_block_lr(cfg.block_lr), model, network, param_groups)
    if cfg.gradient_checkpointing:
        model.unet.set_gradient_checkpointing(True)
        for enc in (model.text.text_encoder, model.text.text_encoder_2) if text_trains else ():
            if enc is not None:
                getattr(enc, "text_model", enc).gradient_checkpointing_enable()
    return Trainee(model.unet, model.text if text_trains else None, network).train(), network, param_groups


UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


def block_lr_groups(block_lr: dict[str, float], model, network, groups: list[dict]) -> list[dict]:
    """`groups` split by --block_lr's names (lora.inject's diffusers block names, "other" for the UNet's parameters
    outside its down / mid / up blocks): a listed block's parameters (a LoRA adapter's: the layer it adapts) get its
    learning rate, in a group of its name; the rest keep their group and rate. ConfigError on an unknown name."""
    parts = {c: m for c, m in lora._parts(model).items() if m is not None}
    names = {f"{c}.{p}".removeprefix("unet.").strip(".") for c, m in parts.items() for p, _ in m.named_modules()}
    if bad := sorted(set(block_lr) - names - {"other"}):
        raise ConfigError(f"--block_lr: no block {bad[0]!r} in this model (diffusers names, e.g. down_blocks.1, "
                          "mid_block, up_blocks.0, other, text_encoder_2)")
    where = {id(p): (c, n.rpartition(".")[0]) for c, m in parts.items() for n, p in m.named_parameters()}
    for name, adapter in network.named_children() if network is not None else ():
        t = network.targets[name]
        where.update({id(p): (t.component, t.path) for p in adapter.parameters()})
    keys = {k: k for k in block_lr if k != "other"}
    out: dict[tuple, dict] = {}
    for g in groups:
        for p in g["params"]:
            component, path = where[id(p)]
            key = lora._per_block(keys, path if component == "unet" else f"{component}.{path}".strip("."))
            if key is None and component == "unet" and "other" in block_lr and not path.startswith(UNET_BLOCKS):
                key = "other"
            name, lr = (g.get("name", "lora"), g["lr"]) if key is None else (key, block_lr[key])
            out.setdefault((name, lr), {**g, "name": name, "lr": lr, "params": []})["params"].append(p)
    return list(out.values())


def describe_groups(groups: list[dict]) -> str:
    """The optimizer's parameter groups as the run plan prints them: name, learning rate, parameter count."""
    rows = [f"  {g.get('name', 'group')}: lr {g['lr']:g}, {sum(p.numel() for p in g['params']):,} parameters"
            for g in groups]
    return "\n".join(["learning-rate groups:"] + rows)


def controlnet_to_train(cfg: TrainConfig, model, device, master: torch.dtype) -> nn.Module:
    """--controlnet_model, or a copy of the UNet's encoder with zero convolutions at zero; checked against the
    UNet, in the trained weights' dtype."""
    from sdxl.controlnet import ControlNet, load_controlnet
    if cfg.controlnet_model:
        net = load_controlnet(cfg.controlnet_model, device, master, unet_config=model.unet.config)
        net.check_unet(model.unet, cfg.controlnet_model)
    else:
        net = ControlNet.from_unet(model.unet).to(device, master)
    return net.requires_grad_(True)


def build_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device):
    if cfg.fused_backward_pass:  # one optimizer per parameter, stepped in the backward pass
        from training.fused_backward import FusedBackward
        plain = dataclasses.replace(cfg, fused_backward_pass=False)
        return FusedBackward(lambda gs: build_optimizer(plain, gs, device), groups, cfg.max_grad_norm)
    wd, cuda = cfg.weight_decay, device.type == "cuda"
    adam = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps, "weight_decay": wd}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **adam, fused=True)  # one kernel, and it skips non-finite steps itself
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=wd)
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, weight_decay=wd)
    module, package, make = {
        "adamw8bit": ("bitsandbytes", "bitsandbytes", lambda m: m.optim.AdamW8bit(groups, **adam)),
        "lion": ("lion_pytorch", "lion-pytorch", lambda m: m.Lion(groups, weight_decay=wd)),
        "prodigy": ("prodigyopt", "prodigyopt", lambda m: m.Prodigy(groups, weight_decay=wd))}[cfg.optimizer]
    try:
        return make(importlib.import_module(module))
    except ImportError:
        raise ConfigError(f"--optimizer {cfg.optimizer} needs the {package} package: pip install {package}") from None


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


class EpochBatches:
    """A map-style dataset's batches, epoch after epoch: whole accumulation groups only, resumable at
    (epoch, position); `epoch` moves on as the last usable batch of an epoch is handed out."""

    def __init__(self, ds, sampler, loader, accum: int):
        self.ds, self.sampler, self.loader = ds, sampler, loader
        self.usable = sampler.batches_per_epoch() // accum * accum
        self.steps_per_epoch, self.epoch, self.position = self.usable // accum, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        while True:
            self.sampler.set_epoch(self.epoch, self.position)
            self.ds.set_epoch(self.epoch)
            batches = iter(self.loader)
            for _ in range(self.usable - self.position):
                batch = next(batches)
                self.position += 1
                if self.position == self.usable:
                    self.epoch, self.position = self.epoch + 1, 0
                yield batch
            del batches


def open_source(cfg: TrainConfig, model, d, out: Path, autocast):
    """(batch source, dataset or None, stats or None, whether the text encoders can leave the GPU): the demo's
    stream, a tar-shard stream, or a folder / metadata dataset with its caches built."""
    for h, w in bucket_sizes(cfg):
        try:
            model.space(h, w)
        except ValueError as e:
            raise ConfigError(f"bucket {w}x{h} (from --image_size / --bucket_step): {e}") from None
    if cfg.demo:
        from training.demo_data import DemoStream
        return DemoStream(cfg.image_size, cfg.batch_size, cfg.seed, d.rank, cfg.caption_dropout), None, None, False
    if cfg.train_shards:
        from training.data import open_stream
        return open_stream(cfg.train_shards, batch_size=cfg.batch_size, rank=d.rank, world_size=d.world_size,
                           seed=cfg.seed, **data_options(cfg)), None, None, False
    from training import cache as cache_mod
    from training.buckets import BucketBatchSampler
    from training.data import DataStats, collate, load_dataset_config, open_dataset
    stats, cache_dir = DataStats(), Path(cfg.cache_dir or out / "cache")
    subsets = load_dataset_config(cfg.dataset_config) if cfg.dataset_config else []  # may flip or shuffle their own
    masked = cfg.masked_loss or cfg.alpha_mask
    latent_cache = cache_mod.LatentCache(cache_dir, fingerprint(model.unet if model.autoencoder is None else
                                                                model.autoencoder),
                                         cfg.flip_aug or any(s.flip_aug for s in subsets),
                                         masks=masked) if cfg.cache_latents else None
    random_captions = cfg.shuffle_tags or cfg.tag_dropout > 0 or cfg.caption_dropout > 0 or \
        any(s.shuffle_caption for s in subsets)
    if cfg.cache_text_embeddings and random_captions and d.is_main:
        print("--cache_text_embeddings: captions change every step (shuffling / dropout), so they are not "
              "cached; the text encoders stay loaded")
    text_cache = cache_mod.TextCache(cache_dir, fingerprint(model.text)) \
        if cfg.cache_text_embeddings and not random_captions else None
    ds = open_dataset(cfg.data_dir, cfg.metadata_files, dataset_config=cfg.dataset_config,
                      reg_data_dir=cfg.reg_data_dir, seed=cfg.seed, stats=stats, latent_cache=latent_cache,
                      text_cache=text_cache, mask_dir=cfg.mask_dir, conditioning_dir=cfg.conditioning_dir,
                      alpha_mask=cfg.alpha_mask, with_masks=masked, with_conditioning=cfg.controlnet,
                      holdout=cfg.validation_split, **data_options(cfg))
    with torch.no_grad(), autocast():
        if latent_cache is not None:
            latent_cache.build(ds, model.encode, rank=d.rank, world_size=d.world_size, progress=d.is_main)
        if text_cache is not None:
            text_cache.build(cache_mod.captions_of(ds), lambda caps: tuple(
                x.float() for x in model.text.encode(list(caps))), rank=d.rank, world_size=d.world_size)
    distributed.barrier(d)
    sampler = BucketBatchSampler(ds.bucket_ids, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                                         pin_memory=d.device.type == "cuda")
    source = EpochBatches(ds, sampler, loader, cfg.gradient_accumulation_steps)
    if source.steps_per_epoch < 1:
        raise ConfigError(f"{sampler.batches_per_epoch()} batches per epoch is fewer than "
                          f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}: lower it or --batch_size")
    cached = latent_cache is not None and text_cache is not None and cache_mod.caches_complete(ds)
    return source, ds, stats, cached and not cfg.sample_every


def bucket_sizes(cfg: TrainConfig) -> list[tuple[int, int]]:
    """Every (height, width) a batch can have: the buckets of the size flags (the demo's one square size)."""
    from training.buckets import make_buckets
    if cfg.demo:
        return [(cfg.image_size, cfg.image_size)]
    return make_buckets(cfg.image_size, cfg.bucket_step, cfg.min_side, cfg.max_side)


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

def batch_inputs(batch: dict, model, text_trains: bool, device, autocast) -> dict:
    """The Trainee's inputs for a batch: x0 in model space (cached latents, or encoded now), the text
    conditioning (cached, encoded now by the frozen encoders, or token ids for encoders that train), and the loss
    masks and ControlNet conditioning images when the batch has them."""
    def put(t: torch.Tensor) -> torch.Tensor:  # from pinned memory (the loader pins on CUDA): no sync
        return t.to(device, non_blocking=True)

    kw = {"time_ids": put(batch["time_ids"]), "keep": put(torch.tensor([float(bool(c)) for c in batch["caption"]]))}
    with torch.no_grad(), autocast():
        kw["x0"] = put(batch["latents"]).float() if "latents" in batch else model.encode(put(batch["pixels"])).float()
        if "context" in batch:
            kw.update(context=put(batch["context"]), pooled=put(batch["pooled"]))
        elif not text_trains:
            kw["context"], kw["pooled"] = (x.float() for x in model.text.encode(batch["caption"]))
    if text_trains and "context" not in batch:
        kw["tokens"] = model.text.tokenize(batch["caption"])
    kw.update({name: put(batch[key]) for key, name in (("mask", "mask"), ("conditioning", "control")) if key in batch})
    return kw


def train_step(run: Run, batches, step: int) -> tuple[torch.Tensor, int]:
    """Forward and backward over `gradient_accumulation_steps` micro-batches: (mean loss, images seen)."""
    cfg, d = run.cfg, run.d
    accum, text_trains = cfg.gradient_accumulation_steps, run.trainee.text is not None
    loss_sum, images = torch.zeros((), device=d.device), 0
    for micro in range(accum):
        batch = next(batches)
        n = len(batch["caption"])
        # Generators on the device: noise and timesteps are drawn there, with no host-to-device copy.
        gens = [torch.Generator(d.device).manual_seed(sample_seed(cfg.seed, step, micro, d.rank * cfg.batch_size + i))
                for i in range(n)]
        kw = batch_inputs(batch, run.model, text_trains, d.device, run.autocast)
        with distributed.gradient_sync(run.wrapped, micro == accum - 1, d, run.fsdp), run.autocast():
            loss = run.wrapped(run.objective, generators=gens, **kw).mean() / accum
        run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        images += n * d.world_size
    return loss_sum, images


# ---- main ---------------------------------------------------------------------------------------------------

def main(cfg: TrainConfig) -> int:
    """Train, writing checkpoints, metrics and the final weights into --output_dir; 0 when done or stopped on
    request (a checkpoint is saved), 1 when it stopped on non-finite losses (saved too)."""
    d = distributed.init()
    if cfg.fused_backward_pass and d.enabled:
        raise ConfigError("--fused_backward_pass steps each parameter before DDP averages its gradient: train in "
                          "one process")
    out = prepare_output(cfg, d)
    torch.manual_seed(cfg.seed)
    device, wdtype = d.device, DTYPES[cfg.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=wdtype)) if cfg.precision != "fp32" else \
        (lambda: torch.autocast(device.type, enabled=False))
    model, teacher = load_for_training(cfg, device, wdtype)
    trainee, network, groups = what_trains(cfg, model, teacher, device, wdtype if cfg.full_bf16 else torch.float32)
    if cfg.compile:  # after LoRA is attached, before DDP / FSDP wrap it
        sdxl.unet.compile_unet(model.unet, cfg.compile)
    fsdp = cfg.fsdp and d.enabled  # FSDP2 replaces parameters: the optimizer is built after it
    wrapped, groups = distributed.wrap(trainee, d, groups, fsdp, model.unet,
                                      None if cfg.precision == "fp32" else wdtype)
    optimizer = build_optimizer(cfg, groups, device)
    source, ds, stats, free_encoders = open_source(cfg, model, d, out, autocast)
    validation = open_validation(cfg, ds, data_options(cfg), cfg.masked_loss or cfg.alpha_mask)
    if free_encoders and validation is None:  # every latent and caption is cached: the loop never needs the encoders
        model.text.to("cpu"), model.autoencoder.to("cpu")
    total_steps = cfg.max_steps or cfg.num_epochs * source.steps_per_epoch
    try:  # options the family cannot combine (a pixel model's velocity loss, ...) are the flags' fault
        objective = model.objective(teacher=teacher, timestep_range=cfg.timestep_bounds,
                                    **{k: getattr(cfg, k) for k in OBJECTIVE_OPTIONS})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run = Run(cfg, d, out, model, trainee, wrapped, objective, optimizer,
              torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps)),
              torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
              make_emas(cfg, trainee, device), source, autocast, fsdp, validation)
    step = resume(run)
    if d.is_main:  # every input checked: the run's folder starts here
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
        plan = describe(run, ds, stats, network, total_steps, step)
        if cfg.block_lr:
            print(describe_groups(groups))
    logger = Logger(str(out), total_steps, step, d.is_main, vars(cfg), cfg.wandb, cfg.wandb_project,
                    cfg.wandb_run_name, cfg.tensorboard, plan if d.is_main else "")
    exit_code = loop(run, logger, step, total_steps)
    logger.close()
    if exit_code == 0:
        if fsdp:  # gather the sharded network into a plain one on rank 0 before writing files
            model.unet = distributed.gather_module(trainee, "unet", model.unet, d)
        save_final(cfg, model, network, run.emas["ema"], out, d)
        if cfg.demo and d.is_main:
            from training.demo_data import demo_evaluation
            score = demo_evaluation(model.eval(), out, cfg.image_size, cfg.sample_steps, cfg.sample_cfg,
                                    cfg.sample_sampler, cfg.seed)
            print(f"prompt adherence (held-out captions, shape colour on pixels): {score:.3f}")
    distributed.barrier(d)
    del run, wrapped  # DDP's reducer holds the process group: freed after it, gloo's teardown can deadlock
    distributed.cleanup(d)
    return max(exit_code, 0)


class Watch:
    """What the host learns of the device, without waiting for it inside a step: the loss, gradient norm and
    non-finite counts stay on the device, and every `every` steps (and at the end) they are copied out without
    blocking; the copy is read one step later, when the device has long finished it and the next step is queued.
    The stop request travels with it (one all-reduce per read), so every rank stops at the same step."""

    def __init__(self, device: torch.device, every: int):
        self.device, self.every, self.pending = device, every, None
        self.streak = torch.zeros((), device=device)  # non-finite steps in a row
        self.worst = torch.zeros((), device=device)  # the longest such run since the last read
        self.skipped = torch.zeros((), device=device)

    def count(self, finite: torch.Tensor) -> None:
        self.streak = torch.where(finite, 0.0, self.streak + 1)
        self.worst = torch.maximum(self.worst, self.streak)
        self.skipped = self.skipped + (~finite).float()

    def snapshot(self, step: int, loss: torch.Tensor, norm: torch.Tensor, stop: bool, d, **host) -> None:
        values = torch.stack([loss.float(), norm.float(), self.worst, self.skipped,
                              torch.full((), float(stop), device=self.device)])
        if d.enabled:  # a stop requested on any rank stops every rank (gloo has no MAX on the last entry alone)
            flag = values[4:].clone()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            values = torch.cat([values[:4], flag])
        copy = values.to("cpu", non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        self.worst, self.skipped = torch.zeros_like(self.worst), torch.zeros_like(self.skipped)
        self.pending = (step, copy, event, host)

    def read(self) -> tuple[int, dict, dict] | None:
        """(step, {loss, grad_norm, worst, skipped, stop}, host values) of the last snapshot, once."""
        if self.pending is None:
            return None
        step, copy, event, host = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        loss, norm, worst, skipped, stop = copy.tolist()
        return step, {"loss": loss, "grad_norm": norm, "worst": worst, "skipped": skipped, "stop": stop}, host


def optimizer_step(run: Run, trainable: list[nn.Parameter], loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Clip, then step unless the loss or the gradient is non-finite: (mean loss, grad norm, finite).
    Fused AdamW skips on the device (its found_inf input, as GradScaler uses it); other optimizers ask the host."""
    scaler, optimizer = run.scaler, run.optimizer
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(trainable, run.cfg.max_grad_norm or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
    loss = distributed.all_reduce_mean(loss, run.d)
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    step = optimizer.step
    if run.cfg.stochastic_rounding:  # bf16 weights updated in fp32; the rounding's bits seeded by (seed, step)
        bits = torch.Generator(run.d.device).manual_seed(sample_seed(run.cfg.seed, run.scheduler.last_epoch, -1, 0))
        step = functools.partial(stochastic_rounding.step, optimizer, bits)
    if getattr(optimizer, "_step_supports_amp_scaling", False) and not scaler.is_enabled():
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        step()
        del optimizer.grad_scale, optimizer.found_inf
    elif finite:  # a host read: the optimizer cannot skip by itself
        scaler.step(optimizer) if scaler.is_enabled() else step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, finite


def fused_step(run: Run, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """--fused_backward_pass: the parameters stepped in the backward (training/fused_backward.py); (mean loss,
    norm of all the gradients before clipping, finite) as optimizer_step returns them."""
    norm = run.optimizer.take_norm()
    loss = distributed.all_reduce_mean(loss, run.d)
    run.optimizer.step()  # nothing left to do: the LR scheduler sees a step
    return loss, norm, torch.isfinite(loss) & torch.isfinite(norm)


def loop(run: Run, logger: Logger, step: int, total_steps: int) -> int:
    """Steps until total_steps, a stop request (saved, -1), or MAX_NONFINITE bad steps in a row (saved, 1).
    Nothing inside a step waits for the device: see Watch."""
    cfg, d, emas = run.cfg, run.d, run.emas
    stop = {"signal": False}
    handlers = {s: signal.signal(s, lambda *_: stop.__setitem__("signal", True)) for s in
                (signal.SIGINT, signal.SIGTERM)}
    trainable = [p for _, p in run.named_trainable]
    watch, exit_code, t_last, images = Watch(d.device, min(cfg.log_every, MAX_NONFINITE)), 0, time.perf_counter(), 0
    snapshot_every = cfg.save_interval_steps or max(1, total_steps // 10)
    validate_every = cfg.validation_every or max(1, total_steps // 10)
    batches = iter(run.source)
    try:
        while step < total_steps:
            epoch = run.source.epoch
            loss, n = train_step(run, batches, step)
            images += n
            exit_code = report(watch.read(), logger, d.device)  # the last snapshot, read with this step queued
            loss, norm, finite = fused_step(run, loss) if cfg.fused_backward_pass else \
                optimizer_step(run, trainable, loss)
            watch.count(finite)
            lr_used = run.scheduler.get_last_lr()[0]  # what this step used (logged), before the update
            run.scheduler.step()
            step += 1
            if emas["ema"] is not None and step % cfg.ema_every == 0:
                emas["ema"].update()
            if emas["power"] is not None:
                emas["power"].update(step)
            if step % watch.every == 0 or step == total_steps or exit_code:
                now = time.perf_counter()
                watch.snapshot(step, loss, norm, stop["signal"], d, epoch=epoch, lr=lr_used,
                               images_per_sec=images / max(now - t_last, 1e-9), log=step % cfg.log_every == 0)
                t_last, images = now, 0
                if step == total_steps or exit_code:
                    exit_code = report(watch.read(), logger, d.device, final=True) or exit_code
            if run.validation is not None and (step % validate_every == 0 or step == total_steps):
                log_validation(run, logger, step)
            if emas["power"] is not None and d.is_main and (step % snapshot_every == 0 or step == total_steps):
                emas["power"].save_snapshots(run.out / "ema_snapshots", step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                sample_images(cfg, run.model, emas["ema"], run.out, step, logger, d, run.autocast)
            end_of_epoch = run.source.epoch != epoch
            if exit_code or (cfg.save_interval_steps and step % cfg.save_interval_steps == 0) or (
                    end_of_epoch and cfg.save_interval and run.source.epoch % cfg.save_interval == 0):
                save(run, step)
                logger.plot_curves()
            if exit_code:
                break
    finally:
        del batches
        for s, h in handlers.items():
            signal.signal(s, h)
    return exit_code


def log_validation(run: Run, logger: Logger, step: int) -> None:
    """val_loss of the held-out triples with the live weights, on every rank (FSDP's forward is a collective)."""
    text_trains = run.trainee.text is not None
    value = validation_loss(run.trainee, run.objective, run.validation,
                            lambda b: batch_inputs(b, run.model, text_trains, run.d.device, run.autocast),
                            run.d.device, run.autocast)
    logger.log(step, {"val_loss": value})
    logger.write(f"step {step}: val_loss {value:.6g}")


def report(reading, logger: Logger, device: torch.device, final: bool = False) -> int:
    """Log a Watch reading; 1 when MAX_NONFINITE steps in a row were non-finite, -1 on a stop request, else 0."""
    if reading is None:
        return 0
    step, dev, host = reading
    if dev["skipped"]:
        logger.write(f"up to step {step}: {int(dev['skipped'])} non-finite loss or gradient step(s) skipped")
    if host["log"] or final:
        metrics = {"epoch": host["epoch"], "loss": dev["loss"], "lr": host["lr"], "grad_norm": dev["grad_norm"],
                   "images_per_sec": host["images_per_sec"], "peak_mem_gb": peak_memory_gb(device)}
        logger.log(step, metrics)
        logger.progress(step, loss=metrics["loss"], lr=host["lr"], img_s=metrics["images_per_sec"],
                        mem_gb=metrics["peak_mem_gb"])
    if dev["worst"] >= MAX_NONFINITE:
        logger.write(f"{MAX_NONFINITE} non-finite steps in a row: saving and stopping")
        return 1
    if dev["stop"]:
        logger.write(f"stop requested: saving step {step} and exiting")
        return -1
    return 0


# ---- EMA, resume, saving ------------------------------------------------------------------------------------

def make_emas(cfg: TrainConfig, trainee: nn.Module, device) -> dict:
    """{"ema": EMA of --ema_decay or None, "power": the two power-function EMAs of --ema_snapshots or None}."""
    from training.ema import EMA
    from training.post_hoc_ema import PowerEMA
    named, where = [(n, p) for n, p in trainee.named_parameters() if p.requires_grad], "cpu" if cfg.ema_cpu else device
    return {"ema": EMA(named, cfg.ema_decay, cfg.ema_warmup, where, cfg.ema_every) if cfg.ema_decay else None,
            "power": PowerEMA(named, POSTHOC_STDS, where) if cfg.ema_snapshots else None}


def ema_state(emas: dict) -> dict[str, torch.Tensor] | None:
    sd = dict(emas["ema"].state_dict()) if emas["ema"] is not None else {}
    for i, shadow in enumerate(emas["power"].shadows if emas["power"] is not None else []):
        sd.update({f"posthoc{i}/{n}": v for n, v in shadow.items()})
    return sd or None


def save(run: Run, step: int) -> None:
    """A checkpoint of everything exact resume needs, with the data position of every rank (a collective)."""
    names = {n for n, _ in run.named_trainable}
    model_sd, optim_sd = distributed.full_state(run.trainee, run.optimizer, run.fsdp)  # a collective under FSDP
    data = distributed.gather_objects(run.source.state_dict(), run.d)
    if run.d.is_main:
        ema = run.emas["ema"]
        checkpoint.save_checkpoint(run.out, step, trainable={n: v for n, v in model_sd.items() if n in names},
                                   optimizer=optim_sd, ema=ema_state(run.emas), keep=run.cfg.keep_checkpoints,
                                   state={"step": step, "data": data, "scheduler": run.scheduler.state_dict(),
                                          "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                                          "ema_updates": ema.num_updates if ema else 0})
    distributed.barrier(run.d)


def resume(run: Run) -> int:
    """Load --resume's checkpoint into everything that trains and the data source; the step to continue from."""
    if not run.cfg.resume:
        return 0
    ck = checkpoint.load_checkpoint(checkpoint.find_checkpoint(run.out, run.cfg.resume))
    missing = {n for n, _ in run.named_trainable} - set(ck["trainable"])
    if missing:
        raise ConfigError(f"checkpoint does not match this run: no {sorted(missing)[0]!r}")
    distributed.load_full_state(run.trainee, run.optimizer, ck["trainable"], ck["optimizer"], run.fsdp)
    st, saved, (ema, power) = ck["state"], ck["ema"] or {}, run.emas.values()
    run.scheduler.load_state_dict(st["scheduler"])
    if st.get("scaler"):
        run.scaler.load_state_dict(st["scaler"])
    if ema is not None and saved:
        ema.load_state_dict({n: saved[n] for n in ema.shadow}, st["ema_updates"])
    if power is not None and saved:
        with torch.no_grad():
            for i, shadow in enumerate(power.shadows):
                for n in shadow:
                    shadow[n].copy_(saved[f"posthoc{i}/{n}"])
    data, world = st["data"], run.d.world_size
    if len(data) != world and any(s != data[0] for s in data):
        raise ConfigError(f"the checkpoint's data streams were read by {len(data)} processes: resume with "
                          f"{len(data)} (this run has {world})")
    run.source.load_state_dict(data[run.d.rank % len(data)])
    return st["step"]


def describe(run: Run, ds, stats, network, total_steps: int, step: int) -> str:
    """Print the data summary, the run plan and the memory plan (returned) before the first step."""
    cfg, model, trainable = run.cfg, run.model, [p for _, p in run.named_trainable]
    if ds is not None:
        print(f"{stats}\n{ds.bucket_table()}")
        largest = max(ds.buckets[b] for b in set(ds.bucket_ids))
        where = f"{len(ds)} images, {run.source.steps_per_epoch} steps per epoch"
    else:
        largest = max(bucket_sizes(cfg), key=lambda b: b[0] * b[1])
        where = "a stream (no epochs)"
    print(f"run plan: {where}; {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {sum(p.numel() for p in trainable) / 1e6:.2f}M trained); batches of {cfg.batch_size} x "
          f"{run.d.world_size} device(s), accumulation {cfg.gradient_accumulation_steps}: {total_steps} steps in all "
          f"(starting at {step})")
    if run.validation is not None:
        print(run.validation.describe(cfg.validation_every or max(1, total_steps // 10)))
    plan = memory_plan(cfg, model, trainable, network, largest)
    print(plan)
    return plan


def sample_images(cfg: TrainConfig, model, ema, out: Path, step: int, logger: Logger, d, autocast) -> None:
    """Validation images with the generate() code users run (EMA weights when kept)."""
    if d.is_main:
        from sampling.pipeline import generate
        was = model.unet.training
        model.unet.eval()
        with ema.applied() if ema is not None else contextlib.nullcontext(), autocast():
            images = generate(model, cfg.sample_prompts, height=cfg.image_size, width=cfg.image_size,
                              steps=cfg.sample_steps, guidance_scale=cfg.sample_cfg, sampler=cfg.sample_sampler,
                              seed=cfg.seed)
        model.unet.train(was)
        paths = [out / "samples" / f"step_{step:06d}_{i}.png" for i in range(len(images))]
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, im in zip(paths, images):
            im.save(path)
        logger.images(step, paths, cfg.sample_prompts)
    distributed.barrier(d)


def save_final(cfg: TrainConfig, model, network, ema, out: Path, d) -> None:
    """lora_final.safetensors (kohya keys, or PEFT), controlnet/ (diffusers' ControlNetModel layout) or final/ (the
    model's folder layout) + final.safetensors; the EMA's beside them."""
    if not d.is_main:
        return
    meta = {"training_config": cfg.to_json(), "resolution": f"{cfg.image_size},{cfg.image_size}"}
    model.eval()
    for suffix, weights in [("", contextlib.nullcontext)] + ([("_ema", ema.applied)] if ema is not None else []):
        with weights():
            if cfg.controlnet:
                network.save_pretrained(out / f"controlnet{suffix}")
            elif network is not None:
                lora.save_lora(out / f"lora_final{suffix}.safetensors", network, format=cfg.lora_format,
                               metadata=meta)
            else:
                model.save_pretrained(out / f"final{suffix}")
                if cfg.save_single_file:
                    model.save_single_file(out / f"final{suffix}.safetensors")
    name = "controlnet" if cfg.controlnet else "lora_final.safetensors" if network is not None else "final"
    print(f"wrote {out / name}")

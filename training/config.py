"""One `TrainConfig` dataclass behind the command line (every field a flag of the same name, help from the field
metadata) and `--config run.toml` (flags override the file); the resolved config is saved to <output_dir>/config.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """Flags that cannot work together; one line, exit code 2."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model and data
    pretrained_model: str = _f("tiny", "diffusers folder, original-layout .safetensors, or preset (tiny, sdxl-base)")
    vae: str | None = _f(None, "replacement VAE folder or file (e.g. the fp16-fix VAE)")
    model_type: str | None = _f(None, "pixel: train a pixel model around a latent model's UNet body (see "
                                "--base_resolution); latent: refuse a pixel model (default: the model's own)",
                         choices=["latent", "pixel"])
    data_dir: str | None = _f(None, "image folder with .txt captions, a metadata .json, or tar shards")
    metadata_files: list[str] = _f(None, "metadata JSON files (image path -> {tags, image_size})", nargs="+")
    train_shards: str | None = _f(None, "WebDataset .tar shards, brace patterns allowed")
    dataset_config: str | None = _f(None, "kohya-style dataset TOML: subsets with their own folder or metadata file, "
                                    "repeats, captions, flips, mask and conditioning folders")
    reg_data_dir: str | None = _f(None, "regularisation images (DreamBooth): N_name folders, balanced as kohya does")
    mask_dir: str | None = _f(None, "--masked_loss: a mask per image, same relative path and stem, any image format "
                              "(white learns, black is ignored, grey weights between)")
    conditioning_dir: str | None = _f(None, "--controlnet: a conditioning image per image, same relative path and stem")
    output_dir: str = _f("out/train", "where checkpoints, samples, metrics and the final weights go")
    image_size: int = _f(1024, "training resolution: buckets hold about image_size^2 pixels")
    bucket_step: int = _f(64, "bucket side granularity in pixels")
    min_side: int | None = _f(None, "smallest bucket side (default image_size / 2)")
    max_side: int | None = _f(None, "largest bucket side (default image_size * 2)")
    min_image_size: int | None = _f(None, "skip images below this side^2 in area (default 3/4 image_size)")
    random_crop: bool = _f(False, "random instead of center crops")
    flip_aug: bool = _f(False, "random horizontal flips")
    shuffle_tags: bool = _f(False, "shuffle comma-separated tags (first --keep_tokens and last two stay)")
    keep_tokens: int = _f(0, "leading tags kept in place when shuffling")
    tag_dropout: float = _f(0.0, "probability of dropping each shuffleable tag")
    caption_dropout: float = _f(0.0, "probability of an empty caption (for classifier-free guidance)")
    caption_prefix: str = _f("", "text put before every caption")
    cache_latents: bool = _f(False, "encode images once and cache the latents on disk")
    cache_text_embeddings: bool = _f(False, "encode captions once and cache the embeddings on disk")
    cache_dir: str | None = _f(None, "cache folder (default <output_dir>/cache)")
    num_workers: int = _f(2, "DataLoader worker processes")
    # what trains
    use_lora: bool = _f(False, "train a LoRA instead of the full UNet")
    lora_rank: int = _f(4, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale alpha / rank)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch input")
    lora_target_mode: str = _f("attention", "attention | attention_out | all | conv, combined with + ")
    lora_kind: str = _f("lora", "lora (LoRA/LoCon), dora (DoRA), loha or lokr (LyCORIS)",
                        choices=["lora", "dora", "loha", "lokr"])
    lora_block_ranks: str | None = _f(None, "per-block rank[:alpha] by diffusers name prefix, e.g. "
                                      "'down_blocks.1=8,mid_block=0,up_blocks.0=16:8' (longest prefix wins; 0: none)")
    lora_text_encoder: bool = _f(False, "also put LoRA adapters on both text encoders")
    lora_format: str = _f("kohya", "final LoRA file layout", choices=["kohya", "peft"])
    train_text_encoder: bool = _f(False, "full fine-tune: also train both text encoders")
    unet_train_blocks: str = _f("all", "full fine-tune: all UNet parameters, or only the up blocks",
                                choices=["all", "up"])
    controlnet: bool = _f(False, "train a ControlNet on the frozen UNet (writes <output_dir>/controlnet/)")
    controlnet_model: str | None = _f(None, "--controlnet: start from this ControlNet (folder or file) instead of a "
                                      "copy of the UNet's encoder")
    # objective
    masked_loss: bool = _f(False, "weight the loss by each image's mask (--mask_dir, or mask_dir in "
                           "--dataset_config), normalised per sample")
    alpha_mask: bool = _f(False, "weight the loss by each image's own alpha channel (a masked loss)")
    prediction_type: str | None = _f(None, "epsilon | v_prediction | sample (default: the model's)",
                                     choices=["epsilon", "v_prediction", "sample"])
    loss_type: str = _f("native", "native or l2: MSE in the model's parameterisation; velocity: MSE on v; huber / "
                        "smooth_l1: kohya's pseudo-Huber / smooth L1 with --huber_c",
                        choices=["native", "velocity", "l2", "huber", "smooth_l1"])
    huber_c: float = _f(0.1, "--loss_type huber / smooth_l1: the Huber constant c (where the loss turns linear)")
    huber_schedule: str = _f("snr", "--loss_type huber / smooth_l1: c over the noise levels as kohya's: constant; "
                             "exponential c^(t/T) (1 clean, c at pure noise); snr (1 - c) / (1 + sigma)^2 + c",
                             choices=["constant", "exponential", "snr"])
    min_snr_gamma: float | None = _f(None, "Min-SNR-gamma loss weighting (5 is usual)")
    debiased_estimation: bool = _f(False, "debiased-estimation loss weight 1 / sqrt(SNR) (kohya's; 1 / (SNR + 1) "
                                   "with v-prediction), SNR capped at 1000")
    noise_offset: float = _f(0.0, "noise offset (0.0357 in SDXL's own training)")
    timestep_sampling: str | None = _f(None, "uniform | logit_normal (default: the model's; uniform for latent "
                                       "SDXL, logit_normal for pixel models)", choices=["uniform", "logit_normal"])
    logit_mean: float | None = _f(None, "logit-normal mean (default: the model's; 0 latent, -0.8 pixel)")
    logit_std: float | None = _f(None, "logit-normal std (default: the model's; 1 latent, 0.8 pixel)")
    timestep_range: str = _f("0,1000", "a,b: train timesteps in [a, b)")
    timestep_bias_strategy: str = _f("none", "diffusers' timestep bias: weight the later (noisier) or earlier "
                                     "--timestep_bias_portion of the timesteps, or [begin, end), by the multiplier",
                                     choices=["none", "earlier", "later", "range"])
    timestep_bias_multiplier: float = _f(1.0, "timestep bias: weight of the biased timesteps (2: twice as often)")
    timestep_bias_begin: int = _f(0, "timestep bias range: first timestep")
    timestep_bias_end: int = _f(1000, "timestep bias range: end (exclusive, as diffusers' slice)")
    timestep_bias_portion: float = _f(0.25, "timestep bias earlier / later: the fraction of timesteps biased")
    zero_terminal_snr: bool = _f(False, "rescale the schedule to zero terminal SNR (use with v_prediction)")
    # optimisation
    learning_rate: float = _f(1e-4, "UNet (or LoRA) learning rate")
    lr_text_encoder1: float | None = _f(None, "CLIP-L learning rate (default --learning_rate)")
    lr_text_encoder2: float | None = _f(None, "bigG learning rate (default --lr_text_encoder1)")
    optimizer: str = _f("adamw", "optimizer", choices=["adamw", "adamw8bit", "adafactor", "lion", "prodigy", "sgd"])
    weight_decay: float = _f(1e-2, "decoupled weight decay")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    lr_scheduler: str = _f("constant", "constant | cosine | linear, after warmup",
                           choices=["constant", "cosine", "linear"])
    lr_warmup_steps: int = _f(0, "linear warmup steps")
    max_grad_norm: float | None = _f(1.0, "gradient clipping (0 or none: off); with --fused_backward_pass each "
                                     "parameter's gradient is clipped on its own")
    block_lr: str | None = _f(None, "a TOML file whose [block_lr] table sets learning rates by block: diffusers UNet "
                              "names (down_blocks.1, mid_block, up_blocks.0, conv_in, ...; other: whatever is "
                              "outside the down / mid / up blocks), text_encoder, text_encoder_2 (longest name "
                              "wins); unlisted parameters keep their usual learning rate")
    fused_backward_pass: bool = _f(False, "step the optimizer (adamw or adafactor, one per parameter) in each "
                                   "parameter's post-accumulate-grad hook, so the gradients are never all alive "
                                   "at once; --max_grad_norm then clips each parameter's gradient on its own")
    batch_size: int = _f(1, "images per device per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    num_epochs: int = _f(10, "epochs (ignored when --max_steps is set)")
    max_steps: int | None = _f(None, "optimizer steps to run")
    seed: int = _f(0, "seed for data order, noise and init")
    # precision and memory
    precision: str = _f("bf16", "bf16 | fp16 | fp32", choices=["bf16", "fp16", "fp32"])
    full_bf16: bool = _f(False, "bf16 trainable weights and optimizer state too (less memory, less precise)")
    stochastic_rounding: bool = _f(False, "--full_bf16: compute each update in fp32 and round the bf16 weights and "
                                   "optimizer state stochastically (unbiased: small updates are not lost)")
    vae_precision: str | None = _f(None, "VAE dtype (default: fp32 for a VAE that overflows in fp16)",
                                   choices=["bf16", "fp16", "fp32"])
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass")
    compile: str | None = _f(None, "torch.compile the UNet (after LoRA is attached): unet = one graph, blocks = "
                             "each transformer / ResNet block (faster to compile; DDP overlaps between blocks)",
                             choices=["unet", "blocks"])
    fsdp: bool = _f(False, "shard a full fine-tune over the GPUs with FSDP2, one shard unit per UNet block")
    # EMA
    ema_decay: float | None = _f(None, "keep an EMA of the trained weights with this decay (e.g. 0.9999)")
    ema_warmup: bool = _f(True, "EMA warmup: decay_t = min(decay, (1 + t) / (10 + t))")
    ema_cpu: bool = _f(False, "keep the EMA on the CPU")
    ema_every: int = _f(1, "update the EMA every N steps, with decay^N (the same horizon): a CPU EMA's copies "
                           "then cross the bus once every N steps")
    ema_snapshots: bool = _f(False, "also keep two power-function EMAs and write snapshots to <out>/ema_snapshots "
                                    "for `python -m training.post_hoc_ema` (any EMA length after training)")
    # checkpoints and logging
    save_interval: int | None = _f(None, "save a checkpoint every N epochs")
    save_interval_steps: int | None = _f(None, "save a checkpoint every N optimizer steps")
    keep_checkpoints: int = _f(3, "checkpoints kept (oldest removed)")
    resume: str | None = _f(None, "latest, or a checkpoint folder")
    save_single_file: bool = _f(False, "full fine-tune: also write final.safetensors (original layout)")
    sample_every: int | None = _f(None, "validation images every N steps")
    sample_prompts: list[str] = _f(None, "prompts for validation images", nargs="+")
    sample_steps: int = _f(20, "sampler steps for validation images")
    sample_sampler: str = _f("euler", "sampler for validation images")
    sample_cfg: float = _f(5.0, "guidance scale for validation images")
    validation_split: float | None = _f(None, "hold out this fraction of the training images (a fixed split, the "
                                        "same for every --seed) for a validation loss")
    validation_data_dir: str | None = _f(None, "validation loss on this image folder (captions as --data_dir)")
    validation_every: int | None = _f(None, "validation loss every N steps and at the end (default: a tenth of "
                                      "the run): fixed noise and timesteps per image, no gradients, live weights")
    log_every: int = _f(10, "write metrics every N steps (read from the device one step late, never mid-step)")
    wandb: bool = _f(False, "log to Weights & Biases (WANDB_MODE=offline works without network)")
    wandb_project: str = _f("sdxl-mini", "wandb project")
    wandb_run_name: str | None = _f(None, "wandb run name")
    tensorboard: bool = _f(False, "also log to TensorBoard event files in <output_dir>/tensorboard (no account)")
    # pixel space: the pixel family (sdxl/pixel.py) and its three-stage recipe
    base_resolution: int = _f(64, "pixel model: body entry resolution at 1024 px, 64 (patch 16) or 32 (patch 32)",
                              choices=[64, 32])
    teacher_checkpoint: str | None = _f(None, "pixel distillation: a latent SDXL teacher")
    train_encoder: str = _f("both", "pixel distillation: which side of the codec trains",
                            choices=["encoder", "decoder", "both"])
    lr_sdxl_unet_body: float | None = _f(None, "pixel model: body learning rate (0 freezes it)")
    demo: bool = _f(False, "train the built-in pixel-space demo (no downloads); sets the defaults in DEMO_DEFAULTS")
    config: str | None = _f(None, "a TOML file of these fields; flags override it")

    # ---- derived ----
    @property
    def timestep_bounds(self) -> tuple[int, int]:
        try:
            a, b = (int(x) for x in self.timestep_range.split(","))
        except ValueError:
            raise ConfigError(f"--timestep_range must be 'a,b' integers, got {self.timestep_range!r}") from None
        if not 0 <= a < b <= 1000:
            raise ConfigError(f"--timestep_range {a},{b} must satisfy 0 <= a < b <= 1000")
        return a, b

    @property
    def timestep_bias(self):
        """diffusion.TimestepBias of the --timestep_bias_* flags, or None."""
        from sdxl.diffusion import TimestepBias
        if self.timestep_bias_strategy == "none":
            return None
        return TimestepBias(self.timestep_bias_strategy, self.timestep_bias_multiplier, self.timestep_bias_begin,
                            self.timestep_bias_end, self.timestep_bias_portion)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


# The demo: the pixel-demo preset on procedural shapes, 64 px; any flag the user gives overrides these.
DEMO_DEFAULTS = dict(pretrained_model="pixel-demo", model_type="pixel", output_dir="out/demo", image_size=64,
                     bucket_step=64, batch_size=16, max_steps=4000, learning_rate=2e-3, lr_warmup_steps=50,
                     lr_scheduler="cosine", weight_decay=0.0, caption_dropout=0.1, precision="fp32", sample_steps=50,
                     sample_sampler="heun", sample_cfg=3.0, num_workers=0, log_every=25, ema_snapshots=True)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_sdxl.py", description="Fine-tune SDXL (full or LoRA).",
                                argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        kw = dict(f.metadata)  # help, and choices or nargs where the field has them
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str, "list[str]": str}[f.type.replace(" | None", "")]
        p.add_argument(f"--{f.name}", **kw)
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """(config, names of the fields the user set by flag or file). Flags override --config's file."""
    ns = vars(build_parser().parse_args(argv))
    values: dict = {}
    if ns.get("config"):
        path = Path(ns["config"])
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise ConfigError(f"{path}: unknown setting {unknown[0]!r}")
    values.update(ns)
    given = set(values)
    if values.get("demo"):
        values = {**DEMO_DEFAULTS, **values}
    return TrainConfig(**values), given


def validate(cfg: TrainConfig, given: set[str]) -> None:
    """Contradictions and impossible values, before any work."""
    set_lora = [f.name for f in fields(TrainConfig) if f.name.startswith("lora_") and f.name in given]
    if set_lora and not cfg.use_lora:
        raise ConfigError(f"--{set_lora[0]} given without --use_lora")
    if cfg.use_lora and cfg.train_text_encoder:
        raise ConfigError("--train_text_encoder is a full fine-tune flag; with --use_lora use --lora_text_encoder")
    if cfg.lora_block_ranks:  # its form here; the block names when the model is there
        from sdxl.lora import block_values
        try:
            block_values(cfg.lora_block_ranks, cfg.lora_rank, cfg.lora_alpha)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.use_lora and cfg.unet_train_blocks != "all":
        raise ConfigError("--unet_train_blocks applies to full fine-tunes, not --use_lora")
    if cfg.use_lora and cfg.fsdp:
        raise ConfigError("--fsdp shards full fine-tunes; a LoRA fits on one GPU (use DDP)")
    if cfg.fsdp and (cfg.ema_decay or cfg.sample_every or cfg.train_text_encoder):
        raise ConfigError("--fsdp shards the UNet only; it does not support --ema_decay, --sample_every or "
                          "--train_text_encoder")
    if cfg.full_bf16 and cfg.precision != "bf16":
        raise ConfigError("--full_bf16 needs --precision bf16")
    if not cfg.demo and cfg.data_dir is None and not cfg.metadata_files and not cfg.train_shards \
            and not cfg.dataset_config:
        raise ConfigError("no training data: give --data_dir (or --metadata_files, --train_shards, --dataset_config)")
    if cfg.dataset_config and (cfg.data_dir or cfg.metadata_files or cfg.train_shards):
        raise ConfigError("--dataset_config lists the data itself: drop --data_dir, --metadata_files, --train_shards")
    if cfg.reg_data_dir and cfg.train_shards:
        raise ConfigError("--reg_data_dir balances against a folder's images: it cannot be used with --train_shards")
    if cfg.demo and {"data_dir", "metadata_files", "train_shards", "dataset_config", "reg_data_dir",
                     "teacher_checkpoint", "pretrained_model", "mask_dir", "masked_loss", "alpha_mask",
                     "conditioning_dir"} & given:
        raise ConfigError("--demo trains the pixel-demo preset from scratch on its own data: drop the model and "
                          "data flags")
    if cfg.use_lora and (cfg.teacher_checkpoint or cfg.lr_sdxl_unet_body is not None):
        raise ConfigError("--teacher_checkpoint and --lr_sdxl_unet_body choose what a full pixel run trains; "
                          "they do not apply to --use_lora")
    if cfg.train_shards and (cfg.save_interval or not cfg.max_steps or cfg.cache_latents or cfg.cache_text_embeddings):
        raise ConfigError("--train_shards streams without a fixed epoch: give --max_steps (and "
                          "--save_interval_steps, not --save_interval); the caches need a folder or metadata source")
    for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "image_size", "keep_checkpoints",
                 "max_steps"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    min_side = cfg.min_side or cfg.image_size // 2
    if not cfg.demo and not 0 < cfg.bucket_step <= min_side:  # the demo sets its own buckets
        raise ConfigError(f"--bucket_step {cfg.bucket_step} must be in (0, smallest bucket side {min_side}]: "
                          "lower it for small --image_size")
    if not cfg.demo and cfg.image_size % cfg.bucket_step:
        raise ConfigError(f"--image_size {cfg.image_size} must be a multiple of --bucket_step {cfg.bucket_step}")
    if cfg.cache_text_embeddings and (cfg.train_text_encoder or cfg.lora_text_encoder):
        raise ConfigError("--cache_text_embeddings cannot be used while the text encoders train")
    if cfg.cache_latents and cfg.random_crop:
        raise ConfigError("--cache_latents fixes the crop when caching; it cannot be used with --random_crop")
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError("--ema_decay must be in (0, 1)")
    if cfg.ema_every < 1:
        raise ConfigError("--ema_every must be >= 1")
    if cfg.sample_every is not None and not cfg.sample_prompts:
        raise ConfigError("--sample_every needs --sample_prompts")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb package: pip install wandb")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard")
    validate_masks_and_controlnet(cfg, given)
    validate_objective(cfg, given)
    validate_validation(cfg, given)
    validate_block_lr_fused(cfg)
    cfg.timestep_bounds  # noqa: B018 - raises on a malformed range
    from sdxl.model import model_class
    family = model_class(cfg.pretrained_model, cfg.model_type)
    unused = {k: v for k, v in family.unused_options.items() if k in given}
    if unused:
        name, why = next(iter(unused.items()))
        raise ConfigError(f"--{name} does not apply to a {family.family} model ({why})")
    if cfg.block_lr and family.family == "pixel":
        raise ConfigError("--block_lr applies to latent SDXL (a pixel model's learning rates: --learning_rate and "
                          "--lr_sdxl_unet_body)")


def validate_masks_and_controlnet(cfg: TrainConfig, given: set[str]) -> None:
    """--masked_loss / --alpha_mask and --controlnet: where their files come from, and what they exclude."""
    if cfg.mask_dir and not cfg.masked_loss:
        raise ConfigError("--mask_dir given without --masked_loss")
    if cfg.masked_loss and not (cfg.mask_dir or cfg.dataset_config or cfg.alpha_mask):
        raise ConfigError("--masked_loss needs --mask_dir (or mask_dir in --dataset_config, or --alpha_mask)")
    if cfg.alpha_mask and cfg.mask_dir:
        raise ConfigError("--alpha_mask reads each mask from its image: drop --mask_dir")
    if cfg.dataset_config and (cfg.mask_dir or cfg.conditioning_dir):
        raise ConfigError("--dataset_config gives mask_dir and conditioning_data_dir per subset: drop --mask_dir "
                          "and --conditioning_dir")
    if cfg.train_shards and (cfg.masked_loss or cfg.alpha_mask or cfg.controlnet):
        raise ConfigError("--masked_loss, --alpha_mask and --controlnet read files beside each image: they need a "
                          "folder or metadata source, not --train_shards")
    for name in ("controlnet_model", "conditioning_dir"):
        if name in given and not cfg.controlnet:
            raise ConfigError(f"--{name} given without --controlnet")
    if not cfg.controlnet:
        return
    clash = [f for f in ("use_lora", "train_text_encoder", "fsdp", "sample_every", "reg_data_dir") if getattr(cfg, f)]
    if clash:
        raise ConfigError(f"--controlnet trains the ControlNet alone on image / conditioning pairs (the UNet frozen): "
                          f"drop --{clash[0]}")
    if cfg.dataset_config:
        from training.data import DatasetError, load_dataset_config
        try:
            bare = [s for s in load_dataset_config(cfg.dataset_config) if not s.conditioning_data_dir]
        except DatasetError as e:
            raise ConfigError(str(e)) from None
        if bare:
            raise ConfigError(f"{cfg.dataset_config}: --controlnet needs conditioning_data_dir in every subset "
                              f"({bare[0].name} has none)")
    elif not cfg.conditioning_dir:
        raise ConfigError("--controlnet needs --conditioning_dir (or conditioning_data_dir in --dataset_config)")


def validate_objective(cfg: TrainConfig, given: set[str]) -> None:
    """Huber constant and schedule, timestep bias, stochastic rounding."""
    huber = cfg.loss_type in ("huber", "smooth_l1")
    for name in ("huber_c", "huber_schedule"):
        if name in given and not huber:
            raise ConfigError(f"--{name} given without --loss_type huber or smooth_l1")
    if not cfg.huber_c > 0:
        raise ConfigError(f"--huber_c must be positive, got {cfg.huber_c}")
    bias = [n for n in ("multiplier", "begin", "end", "portion") if f"timestep_bias_{n}" in given]
    if cfg.timestep_bias_strategy == "none" and bias:
        raise ConfigError(f"--timestep_bias_{bias[0]} given without --timestep_bias_strategy")
    if cfg.timestep_bias_strategy != "none":
        if not cfg.timestep_bias_multiplier > 0:
            raise ConfigError("--timestep_bias_multiplier must be positive (to skip timesteps use --timestep_range)")
        if cfg.timestep_bias_strategy == "range" and not 0 <= cfg.timestep_bias_begin < cfg.timestep_bias_end <= 1000:
            raise ConfigError(f"--timestep_bias_begin {cfg.timestep_bias_begin} and --timestep_bias_end "
                              f"{cfg.timestep_bias_end} must satisfy 0 <= begin < end <= 1000")
        if cfg.timestep_bias_strategy != "range" and not 0.001 <= cfg.timestep_bias_portion <= 1:
            raise ConfigError(f"--timestep_bias_portion must be in [0.001, 1] (a timestep at least), got "
                              f"{cfg.timestep_bias_portion}")
        if cfg.timestep_sampling == "logit_normal":
            raise ConfigError("--timestep_bias_strategy reweights uniform timesteps: drop --timestep_sampling "
                              "logit_normal")
    if cfg.stochastic_rounding:
        if not cfg.full_bf16:
            raise ConfigError("--stochastic_rounding rounds bf16 master weights: it needs --full_bf16")
        if cfg.optimizer in ("adamw8bit", "prodigy") or cfg.fsdp:
            raise ConfigError("--stochastic_rounding works with --optimizer adamw, adafactor, lion or sgd, "
                              "without --fsdp")


def validate_validation(cfg: TrainConfig, given: set[str]) -> None:
    """--validation_split / --validation_data_dir / --validation_every."""
    held = cfg.validation_split is not None or cfg.validation_data_dir is not None
    if cfg.validation_split is not None and cfg.validation_data_dir:
        raise ConfigError("give --validation_split or --validation_data_dir, not both")
    if "validation_every" in given and not held:
        raise ConfigError("--validation_every given without --validation_split or --validation_data_dir")
    if cfg.validation_every is not None and cfg.validation_every < 1:
        raise ConfigError("--validation_every must be at least 1")
    if cfg.validation_split is not None:
        if not 0 < cfg.validation_split < 1:
            raise ConfigError(f"--validation_split must be in (0, 1), got {cfg.validation_split}")
        if cfg.train_shards:
            raise ConfigError("--validation_split splits a folder or metadata source: with --train_shards give "
                              "--validation_data_dir")
    if held and cfg.demo:
        raise ConfigError("--demo measures prompt adherence itself: drop --validation_split / "
                          "--validation_data_dir")
    if cfg.validation_data_dir and cfg.controlnet:
        raise ConfigError("--controlnet needs conditioning images beside the validation images: use "
                          "--validation_split")


def load_block_lr(path: str) -> dict[str, float]:
    """The [block_lr] table of `path`: {block name: learning rate}; dotted TOML keys (down_blocks.1 = ...) are
    joined back into names. Whether each name exists is checked against the model (training/loop.py)."""
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("block_lr")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such --block_lr file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: no [block_lr] table (e.g. [block_lr] down_blocks.1 = 5e-5)")
    out: dict[str, float] = {}

    def flatten(t: dict, prefix: str) -> None:
        for k, v in t.items():
            if isinstance(v, dict):
                flatten(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
                out[prefix + k] = float(v)
            else:
                raise ConfigError(f"{path}: [block_lr] {prefix}{k} = {v!r} is not a learning rate (a number >= 0)")
    flatten(table, "")
    return out


def validate_block_lr_fused(cfg: TrainConfig) -> None:
    """--block_lr's file and --fused_backward_pass's limits."""
    if cfg.block_lr:
        load_block_lr(cfg.block_lr)
        if cfg.controlnet:
            raise ConfigError("--block_lr sets the UNet's and text encoders' learning rates: it does not apply to "
                              "--controlnet")
    if not cfg.fused_backward_pass:
        return
    if cfg.gradient_accumulation_steps > 1:
        raise ConfigError("--fused_backward_pass steps as each gradient is made: it cannot accumulate "
                          "(--gradient_accumulation_steps 1)")
    if cfg.optimizer not in ("adamw", "adafactor"):
        raise ConfigError(f"--fused_backward_pass works with --optimizer adamw or adafactor, not {cfg.optimizer}")
    if cfg.precision == "fp16":
        raise ConfigError("--fused_backward_pass cannot unscale fp16 gradients (GradScaler): use --precision bf16")
    if cfg.fsdp or cfg.stochastic_rounding:
        raise ConfigError("--fused_backward_pass cannot be used with --fsdp or --stochastic_rounding")

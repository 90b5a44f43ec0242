"""The SDXL bundle (UNet + VAE + two text encoders) and its file formats.

    model = load_model(path)   # a diffusers folder | an original-layout single file | a preset name
    model.save_pretrained(folder)      # diffusers layout, loadable by diffusers' from_pretrained
    model.save_single_file(path)       # the original layout (A1111 / ComfyUI), configs in the metadata

Every network is built on the meta device and its tensors are assigned straight into place, so loading holds
one copy of the weights (plus one tensor in flight): files are read one tensor at a time, each cast to the
requested dtype as it is read, and the layout conversion of a single file only makes views. A single file is
checked key by key and shape by shape from its header before any tensor is read.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import convert, diffusion
from .config import PRESETS, ModelConfig, PixelConfig, UNetConfig, VAEConfig
from .diffusion import DDPMObjective  # the latent family's objective, re-exported
from .pixel import PixelSDXL, is_pixel_folder, load_pixel_folder, pixel_from_latent, pixel_preset
from .samplers import make_denoiser, resolve_sampler, schedule_for
from .text_encoders import CLIPTokenizer, DualCLIP, text_encoder_config
from .unet import UNet
from .vae import AutoencoderKL, load_vae
from .weights import (CheckpointError, check_keys, convert_, find_weights, load_into, read_config, read_header,
                      read_json, read_state_dict, read_weights, save_json, save_safetensors)

# The published sdxl-base scheduler (EulerDiscrete, leading spacing); prediction_type is the model's.
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "interpolation_type": "linear", "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": False,
    "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
}
_META_KEY = "sdxl_mini_config"  # safetensors metadata entry holding the ModelConfig of a single file


class SDXL(nn.Module):
    """The bundle: `.unet`, `.vae`, `.text` (DualCLIP) and `.config` (ModelConfig).

    Its family surface, which the training loop and `generate()` ask and nothing else does (the pixel family,
    `sdxl.pixel.PixelSDXL`, has the same one):
        space(h, w) -> model-space shape (checks the size)   encode(images) -> x0   decode(x0) -> images
        objective(**options) -> .loss(net, x0, cond, generators) per sample
        param_groups(lr, **options) -> what trains          sampling(sampler, steps) -> (fn, schedule)
        denoiser(model_fn, schedule) -> denoiser(x, sigma)  guidance_interval (default, model timesteps)
        noised(x0, noise, sigma) -> x at level sigma (img2img starts there; inpainting blends the known region)
    """
    family = "latent"
    # Training options of the pixel recipe: with a latent model each is an error.
    unused_options = {name: "a pixel-model option: add --model_type pixel, or drop it" for name in
                      ("base_resolution", "teacher_checkpoint", "train_encoder", "lr_sdxl_unet_body")}
    guidance_interval = None

    def __init__(self, config: ModelConfig, unet: UNet, vae: AutoencoderKL, text: DualCLIP):
        super().__init__()
        self.config = config
        self.unet, self.vae, self.text = unet, vae, text

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def autoencoder(self) -> AutoencoderKL:
        """The network between images and model space (None for pixel models)."""
        return self.vae

    def space(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae.config.downsample_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"image size {width}x{height} must be positive multiples of {f}")
        return (self.vae.config.latent_channels, height // f, width // f)  # an inpainting UNet takes 9 of them

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode_latents(images.to(self.vae.dtype))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_latents(x0)

    def objective(self, prediction_type=None, loss_type="native", min_snr_gamma=None, noise_offset=0.0,
                  timestep_sampling=None, logit_mean=None, logit_std=None, timestep_range=None,
                  zero_terminal_snr=False, huber_c=0.1, huber_schedule="snr", debiased_estimation=False,
                  timestep_bias=None, **unused) -> DDPMObjective:
        return DDPMObjective(diffusion.get_alphas_cumprod(zero_terminal_snr=zero_terminal_snr),
                             prediction_type or self.config.prediction_type, loss_type, min_snr_gamma,
                             noise_offset, timestep_sampling or "uniform", logit_mean or 0.0,
                             1.0 if logit_std is None else logit_std, timestep_range, huber_c, huber_schedule,
                             debiased_estimation, timestep_bias)

    def param_groups(self, lr: float, unet_train_blocks: str = "all", **unused) -> list[dict]:
        part = self.unet.up_blocks if unet_train_blocks == "up" else self.unet
        return [{"name": "unet", "params": list(part.parameters()), "lr": lr}]

    def sampling(self, sampler: str, steps: int, spacing: str = "leading", **unused):
        return resolve_sampler(sampler)[0], schedule_for(sampler, steps, diffusion.get_alphas_cumprod(),
                                                         spacing=spacing)

    def denoiser(self, model_fn, schedule):
        return make_denoiser(model_fn, diffusion.get_alphas_cumprod(), self.config.prediction_type, schedule)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0 at noise level sigma on the samplers' scale, for unit noise: x0 + sigma noise (the VP sample
        sqrt(abar) x0 + sqrt(1 - abar) noise times sqrt(1 + sigma^2))."""
        return x0 + sigma * noise

    # ---- diffusers layout -------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the diffusers folder layout (model_index.json, unet/, vae/, text_encoder*/, tokenizer*/,
        scheduler/); each file is written to a temporary name and renamed."""
        folder, refiner = Path(folder), self.text.text_encoder is None
        clip = lambda cls: [None, None] if refiner else ["transformers", cls]  # noqa: E731
        index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
                 "_diffusers_version": "0.30.0", "force_zeros_for_empty_prompt": True,
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": clip("CLIPTextModel"),
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": clip("CLIPTokenizer"),
                 "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], **({"requires_aesthetics_score": True} if refiner else {})}
        save_json({"_class_name": "UNet2DConditionModel", **self.config.unet.to_diffusers()}, folder / "unet" /
                  "config.json")
        save_safetensors(self.unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors")
        save_json(self.config.vae.to_diffusers(), folder / "vae" / "config.json")
        save_safetensors(self.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors")
        self.text.save_pretrained(folder)
        save_json({**SCHEDULER_CONFIG, "prediction_type": self.config.prediction_type},
                  folder / "scheduler" / "scheduler_config.json")
        save_json(index, folder / "model_index.json")  # last: a folder with an index is complete

    # ---- original single file ---------------------------------------------------------------------------------
    def original_state_dict(self) -> dict[str, torch.Tensor]:
        components = {"unet": self.unet.state_dict(), "vae": self.vae.state_dict(),
                      "text_encoder": None if self.text.text_encoder is None else self.text.text_encoder.state_dict(),
                      "text_encoder_2": self.text.text_encoder_2.state_dict()}
        return convert.join_original(components, refiner=self.text.text_encoder is None, unet_cfg=self.config.unet)

    def save_single_file(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write the original layout (sd_xl_base_1.0.safetensors key names); the ModelConfig goes into the
        metadata so non-standard sizes load back (files without it are read as sdxl-base / sdxl-refiner)."""
        sd = self.original_state_dict()
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        save_safetensors(sd, path, metadata={"format": "pt", _META_KEY: json.dumps(self.config.to_dict())})

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, merge: bool = True):
        """Apply a LoRA file (kohya, LyCORIS, PEFT) with multiplier `scale`: merged into the weights, or
        attached as hooks (`merge=False`); returns the LoRANetwork (`.remove()` takes it off again)."""
        from .lora import load_lora
        return load_lora(self, path, scale, merge)


def build_model(cfg: ModelConfig, tokenizer: CLIPTokenizer | None = None,
                tokenizer_2: CLIPTokenizer | None = None) -> SDXL:
    """All networks of `cfg` with their default init, on the current default device (use meta to load)."""
    return SDXL(cfg, UNet(cfg.unet), AutoencoderKL(cfg.vae),
                DualCLIP.from_config(cfg.text_encoder, cfg.text_encoder_2, tokenizer, tokenizer_2))


def _load_text(text: DualCLIP, sd1, sd2, source: str, device, dtype) -> None:
    try:
        text.load_weights(None if sd1 is None else convert_(sd1, device, dtype), convert_(sd2, device, dtype))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _from_preset(name: str, device, dtype, seed: int) -> SDXL:
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        model = build_model(PRESETS[name])
    return model.to(device=device, dtype=dtype)


def _folder_config(folder: Path) -> tuple[ModelConfig, CLIPTokenizer | None, CLIPTokenizer]:
    index = read_json(folder / "model_index.json")
    pipeline = index.get("_class_name", "an unnamed pipeline")
    if "transformer" in index and "unet" not in index:
        raise CheckpointError(f"{folder}: not an SDXL model: {pipeline} has a transformer/, not a unet/ "
                              "(FLUX, SD3, PixArt...)")
    if "unet" in index and "text_encoder_2" not in index:
        raise CheckpointError(f"{folder}: not an SDXL model: {pipeline} has no text_encoder_2 (SD1.x/2.x?)")
    for part in ("unet", "vae", "text_encoder_2", "tokenizer_2"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: missing {part}/ folder (model_index.json names {pipeline})")
    has_te1 = (folder / "text_encoder").is_dir() and index.get("text_encoder", [None])[0] is not None
    tok1 = CLIPTokenizer.from_pretrained(folder / "tokenizer") if has_te1 else None
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    te1 = read_config(folder / "text_encoder" / "config.json", lambda d: text_encoder_config(
        d, with_projection=False, pad_token=tok1.pad_token)) if has_te1 else None
    te2 = read_config(folder / "text_encoder_2" / "config.json", lambda d: text_encoder_config(
        d, with_projection=True, pad_token=tok2.pad_token))
    sched = folder / "scheduler" / "scheduler_config.json"
    cfg = ModelConfig(unet=read_config(folder / "unet" / "config.json", UNetConfig.from_diffusers),
                      vae=read_config(folder / "vae" / "config.json", VAEConfig.from_diffusers),
                      text_encoder=te1, text_encoder_2=te2,
                      prediction_type=read_json(sched).get("prediction_type", "epsilon") if sched.is_file()
                      else "epsilon")
    return cfg, tok1, tok2


def _from_folder(folder: Path, device, dtype, variant: str | None) -> SDXL:
    cfg, tok1, tok2 = _folder_config(folder)
    with torch.device("meta"):
        model = build_model(cfg, tok1, tok2)
    # One component at a time, each tensor cast as it is read: peak = the model + one tensor.
    for name, module in (("unet", model.unet), ("vae", model.vae)):
        files = find_weights(folder / name, variant=variant)
        load_into(module, read_weights(files, dtype), str(folder / name), device)
    model.text.load_folder(folder, device, dtype, variant)
    return model


# The components' prefixes in the original layout; every other key is one convert.split_original drops.
_COMPONENTS = (convert.UNET_PREFIX, convert.VAE_PREFIX, convert.CLIP_L_PREFIX, convert.BIGG_PREFIX,
               convert.BIGG_REFINER_PREFIX)


def _single_file_config(path: Path, header: dict, metadata: dict[str, str]) -> ModelConfig:
    """The ModelConfig we recorded in the metadata, else the standard preset the keys say (base / refiner)."""
    if _META_KEY in metadata:
        try:
            return ModelConfig.from_dict(json.loads(metadata[_META_KEY]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable {_META_KEY} metadata ({e})") from None
    try:
        cfg = PRESETS[convert.detect_original(header)]
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    conv_in = header.get(convert.UNET_PREFIX + "input_blocks.0.0.weight")  # 9 input channels: an inpainting UNet
    if conv_in is None or conv_in.ndim != 4:  # else the key check reports it
        return cfg
    return cfg.replace(unet=replace(cfg.unet, in_channels=conv_in.shape[1]))


def _from_single_file(path: Path, device, dtype) -> SDXL:
    header, metadata = read_header(path)  # keys and shapes only
    cfg = _single_file_config(path, header, metadata)
    with torch.device("meta"):
        model = build_model(cfg)
    # Check every key and shape on meta tensors before reading a byte of the file.
    try:
        parts = convert.split_original(header, cfg.unet)
        for part, label, module in (("unet", "UNet", model.unet), ("vae", "VAE", model.vae),
                                    ("text_encoder", "CLIP-L", model.text.text_encoder),
                                    ("text_encoder_2", "bigG", model.text.text_encoder_2)):
            if (module is None) != (parts[part] is None):
                raise CheckpointError(f"{path}: the file and its config disagree on having a {label}")
            if module is not None:
                check_keys(module, parts[part], f"{path} ({label})")
    except ValueError as e:
        msg = str(e) if isinstance(e, CheckpointError) else f"{path}: {e}"
        if _META_KEY not in metadata:  # the likely cause: a non-standard size saved by another tool
            msg += (f" (read as {convert.detect_original(header)}: a file without {_META_KEY} metadata is taken "
                    "to have the standard sizes)")
        raise CheckpointError(msg) from None
    # Each tensor is cast as it is read; the conversion only makes views (q/k/v chunks, transposes), and `sd`
    # is dropped so that the component dicts hold the only references: peak = the model + one tensor.
    sd = read_state_dict(path, dtype, keep=lambda k: k.startswith(_COMPONENTS))
    parts = convert.split_original(sd, cfg.unet)
    del sd
    load_into(model.unet, parts.pop("unet"), f"{path} (UNet)", device)
    load_into(model.vae, parts.pop("vae"), f"{path} (VAE)", device)
    _load_text(model.text, parts.pop("text_encoder"), parts.pop("text_encoder_2"), str(path), device, None)
    return model


def model_class(path: str | os.PathLike, model_type: str | None = None) -> type:
    """The bundle class `load_model(path, model_type=...)` returns, from names and index files only."""
    p = Path(path)
    pixel = is_pixel_folder(p) if p.is_dir() else isinstance(PRESETS.get(str(path)), PixelConfig) and not p.exists()
    return PixelSDXL if pixel or model_type == "pixel" else SDXL


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               vae: str | os.PathLike | None = None, variant: str | None = None, seed: int = 0,
               model_type: str | None = None, base_resolution: int = 64,
               vae_dtype: torch.dtype | None = None) -> SDXL | PixelSDXL:
    """An SDXL bundle from a diffusers folder, an original-layout single file (.safetensors, or .ckpt read with
    weights_only=True), a pixel-model folder, or a preset name (random init from `seed`). `vae` replaces the VAE
    (folder or file, e.g. the fp16-fix VAE). model_type "pixel" turns a latent model into a pixel one around its
    UNet body (`base_resolution` 64 | 32: patch 16 | 32); "latent" refuses a pixel model. vae_dtype: the VAE's
    dtype (default `dtype`, but float32 under float16 for a VAE that overflows there, as the reference decodes)."""
    p = Path(path)
    if model_class(path) is PixelSDXL:
        if vae is not None:
            raise CheckpointError(f"{path}: a pixel-space model has no VAE to replace")
        if model_type == "latent":
            raise CheckpointError(f"{path}: a pixel-space model, not a latent SDXL")
        model = pixel_preset(str(path), seed) if not p.exists() else load_pixel_folder(p, device, dtype)
        return model.to(device, dtype).eval().requires_grad_(False)
    if isinstance(path, str) and path in PRESETS and not p.exists():
        model = _from_preset(path, device, dtype, seed)
    elif p.is_dir():
        if not (p / "model_index.json").is_file():
            hint = " (a component folder? use sdxl.unet.load_unet / sdxl.vae.load_vae)" if (
                p / "config.json").is_file() else ""
            raise CheckpointError(f"{p}: not an SDXL model folder: model_index.json is missing{hint}")
        model = _from_folder(p, device, dtype, variant)
    elif p.is_file():
        if p.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            raise CheckpointError(f"{p}: unknown checkpoint type {p.suffix!r} (expected .safetensors or .ckpt)")
        model = _from_single_file(p, device, dtype)
    else:
        raise CheckpointError(f"{path}: no such file or folder, and not a preset ({', '.join(PRESETS)})")
    if vae is not None:
        model.vae = load_vae(vae, device=device, dtype=dtype, config=model.config.vae)
        model.config = model.config.replace(vae=model.vae.config)
    if vae_dtype == torch.float16 and model.vae.config.force_upcast:
        raise CheckpointError(f"{vae or path}: this VAE overflows in fp16 (force_upcast); use the fp16-fix VAE or a "
                              "float32 / bfloat16 VAE")
    if vae_dtype is not None:
        model.vae.to(vae_dtype)
    if model_type == "pixel":
        model = pixel_from_latent(model, base_resolution)
    return model.eval().requires_grad_(False)

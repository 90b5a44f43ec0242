"""The diffusion math shared by training and sampling: schedules, parameterisations, loss weights, timesteps.

DDPM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, abar_t = prod (1 - beta) over the training steps; on the
samplers' "sigma scale" x_t / sqrt(abar_t) = x0 + sigma_t eps, sigma_t = sqrt((1 - abar_t) / abar_t). Flow (SD3):
x_s = (1 - s) x0 + s noise, s in [0, 1] (1 = noise), velocity noise - x0. `abar` is a scalar or one per batch row.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ------------------------------------------------------------------------------------------------------- schedules


def get_betas(schedule: str = "scaled_linear", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
              beta_end: float = 0.012) -> Tensor:
    """The DDPM betas, float32 as diffusers builds them: linear = linspace(beta_start, beta_end, T), scaled_linear
    (SD / SDXL) = linspace(sqrt(beta_start), sqrt(beta_end), T)^2."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r}; known: linear, scaled_linear")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last abar is exactly 0 (arXiv 2305.08891, Algorithm 1): with a = sqrt(abar),
    a' = (a - a_T) * a_0 / (a_0 - a_T), abar' = a'^2, beta'_t = 1 - abar'_t / abar'_{t-1} (beta'_0 = 1 - abar'_0)."""
    a = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    abar = ((a - aT) * (a0 / (a0 - aT))) ** 2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def get_alphas_cumprod(schedule: str = "scaled_linear", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                       beta_end: float = 0.012, zero_terminal_snr: bool = False) -> Tensor:
    """abar_t = prod_{i <= t} (1 - beta_i), float32 (T,); defaults: SDXL's. With zero_terminal_snr the last is 0
    (sigma infinite): training uses it as is, the samplers clamp it to 2^-24 as diffusers' schedulers do."""
    betas = get_betas(schedule, num_train_timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), the noise level of x_t / sqrt(abar_t) = x0 + sigma_t eps."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


# ---------------------------------------------------------------------------------------- parameterisations (DDPM)


def _pick(prediction_type: str, **forms: Callable[[], Tensor]) -> Tensor:
    """The form for `prediction_type`, evaluated (only that one); one error for an unknown type."""
    if prediction_type not in forms:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")
    return forms[prediction_type]()


def _bcast(abar: Tensor | float, x: Tensor) -> Tensor:
    """abar that broadcasts against x: a Python number as it is (no host-to-device copy), (B,) -> (B, 1, ..., 1)."""
    if not isinstance(abar, Tensor):
        return abar
    abar = abar.to(x.device, x.dtype)
    return abar.reshape(-1, *[1] * (x.ndim - 1)) if abar.ndim == 1 else abar


def add_noise(x0: Tensor, noise: Tensor, abar: Tensor | float) -> Tensor:
    """q-sample: x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
    abar = _bcast(abar, x0)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def v_target(x0: Tensor, noise: Tensor, abar: Tensor | float) -> Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    abar = _bcast(abar, x0)
    return abar**0.5 * noise - (1 - abar) ** 0.5 * x0


def training_target(x0: Tensor, noise: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """What the network learns to output: eps (epsilon), v (v_prediction) or x0 (sample)."""
    return _pick(prediction_type, epsilon=lambda: noise, v_prediction=lambda: v_target(x0, noise, abar),
                 sample=lambda: x0)


def to_x0(pred: Tensor, x_t: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """The clean-sample estimate from a raw prediction at x_t.
    epsilon: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); v: x0 = sqrt(abar) x_t - sqrt(1 - abar) v; sample: pred."""
    a = _bcast(abar, x_t)
    return _pick(prediction_type, epsilon=lambda: (x_t - (1 - a) ** 0.5 * pred) / a**0.5,
                 v_prediction=lambda: a**0.5 * x_t - (1 - a) ** 0.5 * pred, sample=lambda: pred)


def to_eps(pred: Tensor, x_t: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """The noise estimate from a raw prediction at x_t.
    epsilon: pred; v: eps = sqrt(abar) v + sqrt(1 - abar) x_t; sample: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    a = _bcast(abar, x_t)
    return _pick(prediction_type, epsilon=lambda: pred, v_prediction=lambda: a**0.5 * pred + (1 - a) ** 0.5 * x_t,
                 sample=lambda: (x_t - a**0.5 * pred) / (1 - a) ** 0.5)


def min_snr_weight(snr_t: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weight (arXiv 2303.09556) on the raw prediction's loss, as diffusers'
    train_text_to_image_sdxl: epsilon min(SNR, gamma) / SNR (as min(1, gamma / SNR): 1, not 0/0, at SNR = 0),
    v min(SNR, gamma) / (SNR + 1), sample (the paper's x0 form) min(SNR, gamma)."""
    return _pick(prediction_type, epsilon=lambda: (gamma / snr_t).clamp(max=1.0),
                 v_prediction=lambda: snr_t.clamp(max=gamma) / (snr_t + 1), sample=lambda: snr_t.clamp(max=gamma))


def per_sample_mean(err: Tensor, weight: Tensor | None = None) -> Tensor:
    """err (B, C, H, W) -> (B,): the mean per sample, or with a per-element weight (B, 1, h, w) (a loss mask,
    area-resized to err's grid) the weighted mean sum(w err) / sum(w), so a sample's loss does not shrink with its
    mask's area; an all-zero weight gives 0 and zero gradients, an all-one weight the plain mean bit for bit."""
    if weight is None:
        return err.mean(dim=(1, 2, 3))
    if weight.shape[-2:] != err.shape[-2:]:  # a pixel-space mask on the latent grid: the mean of each cell
        weight = torch.nn.functional.interpolate(weight.float(), size=err.shape[-2:], mode="area")
    weight = weight.to(err.dtype)
    return (err * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3)).clamp(min=1e-8)


# ------------------------------------------------------------------------- flow matching (SD3), timestep sampling


def shift_sigma(s: Tensor | float, shift: float) -> Tensor | float:
    """Resolution shift of a flow noise level (SD3): s' = k s / (1 + (k - 1) s); k > 1 moves steps to high noise."""
    return shift * s / (1 + (shift - 1) * s)


def sample_timesteps(n: int, mode: str = "uniform", *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                     t_range: tuple[float, float] | None = None, num_train_timesteps: int | None = 1000,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Training timesteps: u ~ U[0, 1) ("uniform") or sigmoid(N(mean, std)) ("logit_normal", SD3), u' =
    shift_sigma(u, shift); DDPM (num_train_timesteps T): integers a + floor(u' (b - a)) in t_range = [a, b) (default
    [0, T)); flow (None): floats a + u' (b - a), default [0, 1). Drawn on the generator's device, moved to `device`."""
    if num_train_timesteps is not None and t_range is not None \
            and not 0 <= t_range[0] < t_range[1] <= num_train_timesteps:
        raise ValueError(f"t_range {t_range} must satisfy 0 <= a < b <= {num_train_timesteps}")
    gen_device = generator.device if generator is not None else (device or "cpu")
    if mode == "uniform":
        u = torch.rand(n, generator=generator, device=gen_device)
    elif mode == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=gen_device))
    else:
        raise ValueError(f"unknown timestep sampling mode {mode!r}; known: uniform, logit_normal")
    if shift != 1.0:
        u = shift_sigma(u, shift)
    u = u.to(device or gen_device)
    a, b = t_range or ((0.0, 1.0) if num_train_timesteps is None else (0, num_train_timesteps))
    if num_train_timesteps is None:
        return a + u * (b - a)
    # sigmoid can round to exactly 1.0 in float32; keep t < b.
    return (a + (u * (b - a)).floor().long()).clamp(max=b - 1)

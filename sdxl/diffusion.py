"""The diffusion math shared by training and sampling: noise schedules, parameterisations, loss weights,
timestep sampling. Small pure tensor functions; each docstring states its formula.

Conventions. DDPM ("variance preserving"): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with abar_t the
cumulative product of (1 - beta) over the 1000 training steps; the same point on the "sigma scale" the samplers use
is x_t / sqrt(abar_t) = x0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t). Flow matching (SD3):
x_s = (1 - s) x0 + s noise with s in [0, 1] (1 = pure noise), the network predicts the velocity noise - x0.
`abar` arguments are a scalar or one value per batch row; they broadcast over the other dimensions.
"""
from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ----------------------------------------------------------------------------------------------------------------
# Schedules


def get_betas(schedule: str = "scaled_linear", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
              beta_end: float = 0.012) -> Tensor:
    """The DDPM betas, float32 as diffusers builds them.

    linear:        beta_i = linspace(beta_start, beta_end, T)_i
    scaled_linear: beta_i = linspace(sqrt(beta_start), sqrt(beta_end), T)_i ^ 2   (SD / SDXL)
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r}; known: linear, scaled_linear")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last abar is exactly 0 (arXiv 2305.08891, Algorithm 1).

    With a = sqrt(abar): a' = (a - a_T) * a_0 / (a_0 - a_T), so a'_T = 0 and a'_0 = a_0; then
    abar' = a'^2 and beta'_t = 1 - abar'_t / abar'_{t-1} (beta'_0 = 1 - abar'_0).
    """
    a = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * (a0 / (a0 - aT))
    abar = a**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def get_alphas_cumprod(schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                       beta_start: float = 0.00085, beta_end: float = 0.012,
                       zero_terminal_snr: bool = False) -> Tensor:
    """abar_t = prod_{i <= t} (1 - beta_i), float32 (T,). The defaults are SDXL's training schedule.

    With zero_terminal_snr the last value is exactly 0 (sigma infinite): the samplers clamp it to 2^-24 as
    diffusers' inference schedulers do; training uses it as is.
    """
    betas = get_betas(schedule, num_train_timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), the noise level of x_t / sqrt(abar_t) = x0 + sigma_t eps."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio SNR_t = abar_t / (1 - abar_t) = 1 / sigma_t^2."""
    return alphas_cumprod / (1 - alphas_cumprod)


# ----------------------------------------------------------------------------------------------------------------
# Parameterisations (DDPM)


def _bcast(abar: Tensor | float, x: Tensor) -> Tensor:
    """abar as a tensor that broadcasts against x: a scalar, or (B,) -> (B, 1, ..., 1)."""
    abar = torch.as_tensor(abar, dtype=x.dtype, device=x.device)
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
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_target(x0, noise, abar)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")


def to_x0(pred: Tensor, x_t: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """The clean-sample estimate from a raw prediction at x_t.

    epsilon: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    v:       x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    sample:  x0 = pred
    """
    abar = _bcast(abar, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - abar) ** 0.5 * pred) / abar**0.5
    if prediction_type == "v_prediction":
        return abar**0.5 * x_t - (1 - abar) ** 0.5 * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")


def to_eps(pred: Tensor, x_t: Tensor, abar: Tensor | float, prediction_type: str) -> Tensor:
    """The noise estimate from a raw prediction at x_t.

    epsilon: eps = pred
    v:       eps = sqrt(abar) v + sqrt(1 - abar) x_t
    sample:  eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
    """
    abar = _bcast(abar, x_t)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return abar**0.5 * pred + (1 - abar) ** 0.5 * x_t
    if prediction_type == "sample":
        return (x_t - abar**0.5 * pred) / (1 - abar) ** 0.5
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")


def min_snr_weight(snr_t: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weight (arXiv 2303.09556) for a loss on the raw prediction, as diffusers'
    train_text_to_image_sdxl.py applies it to compute_snr:

    epsilon: min(SNR, gamma) / SNR        (the x0-loss weight min(SNR, gamma) moved to the eps loss)
    v:       min(SNR, gamma) / (SNR + 1)
    sample:  min(SNR, gamma)               (the paper's x0 form; diffusers' script leaves it unnormalised too)
    The epsilon weight is computed as min(1, gamma / SNR): the same numbers, and 1 instead of 0/0 at SNR = 0
    (the last step of a zero-terminal-SNR schedule).
    """
    if prediction_type == "epsilon":
        return (gamma / snr_t).clamp(max=1.0)
    if prediction_type == "v_prediction":
        return snr_t.clamp(max=gamma) / (snr_t + 1)
    if prediction_type == "sample":
        return snr_t.clamp(max=gamma)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")


def offset_noise(noise: Tensor, offset: float, generator: torch.Generator | None = None) -> Tensor:
    """Noise offset (Guttenberg 2023): noise + offset * randn(B, C, 1, 1), one shift per image and channel,
    so the model learns to change the mean brightness. The randn is drawn on the generator's device."""
    if offset == 0:
        return noise
    b, c = noise.shape[:2]
    device = generator.device if generator is not None else noise.device
    shift = torch.randn(b, c, *[1] * (noise.ndim - 2), generator=generator, device=device, dtype=noise.dtype)
    return noise + offset * shift.to(noise.device)


# ----------------------------------------------------------------------------------------------------------------
# Flow matching (SD3 convention)


def flow_add_noise(x0: Tensor, noise: Tensor, s: Tensor | float) -> Tensor:
    """x_s = (1 - s) x0 + s noise."""
    s = _bcast(s, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity dx_s/ds = noise - x0."""
    return noise - x0


def flow_to_x0(v: Tensor, x_s: Tensor, s: Tensor | float) -> Tensor:
    """x0 = x_s - s v."""
    return x_s - _bcast(s, x_s) * v


def shift_sigma(s: Tensor | float, shift: float) -> Tensor | float:
    """Resolution shift of a flow noise level (SD3): s' = k s / (1 + (k - 1) s); k > 1 moves steps to high noise."""
    return shift * s / (1 + (shift - 1) * s)


def sample_timesteps(n: int, mode: str = "uniform", *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                     t_range: tuple[float, float] | None = None, num_train_timesteps: int | None = 1000,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Training timesteps.

    u ~ U[0, 1) ("uniform") or u = sigmoid(N(mean, std)) ("logit_normal", SD3); then u' = k u / (1 + (k - 1) u)
    with k = shift. Discrete DDPM (num_train_timesteps = T): integers t = a + floor(u' (b - a)) in [a, b),
    t_range defaulting to (0, T). Flow (num_train_timesteps = None): floats s = a + u' (b - a), t_range
    defaulting to (0, 1). Drawn on the generator's device, then moved to `device`.
    """
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
    if num_train_timesteps is None:
        a, b = t_range if t_range is not None else (0.0, 1.0)
        return a + u * (b - a)
    a, b = t_range if t_range is not None else (0, num_train_timesteps)
    # sigmoid can round to exactly 1.0 in float32; keep t < b.
    return (a + (u * (b - a)).floor().long()).clamp(max=b - 1)

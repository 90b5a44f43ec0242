"""The diffusion math shared by training and sampling: schedules, parameterisations, loss weights, timesteps.

DDPM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, abar_t = prod (1 - beta) over the training steps; on the
samplers' "sigma scale" x_t / sqrt(abar_t) = x0 + sigma_t eps, sigma_t = sqrt((1 - abar_t) / abar_t). Flow (SD3):
x_s = (1 - s) x0 + s noise, s in [0, 1] (1 = noise), velocity noise - x0. `abar` is a scalar or one per batch row.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_TYPES = ("l2", "huber", "smooth_l1")  # element-wise distances; "native" and "velocity" are l2 (DDPMObjective)
HUBER_SCHEDULES = ("constant", "exponential", "snr")
BIAS_STRATEGIES = ("none", "earlier", "later", "range")


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


def debiased_weight(snr_t: Tensor, prediction_type: str) -> Tensor:
    """Debiased-estimation loss weight (arXiv 2310.08442) as kohya's apply_debiased_estimation, SNR capped at 1000
    (infinite at t = 0): epsilon 1 / sqrt(SNR); v_prediction 1 / (SNR + 1) (kohya's v form); sample sqrt(SNR), the
    epsilon weight carried to the x0 loss (|x0 - x0_hat|^2 = |eps - eps_hat|^2 / SNR)."""
    snr = snr_t.clamp(max=1000.0)
    return _pick(prediction_type, epsilon=lambda: snr.rsqrt(), v_prediction=lambda: 1 / (snr + 1),
                 sample=lambda: snr.sqrt())


def huber_c_schedule(schedule: str, c: float, noise_fraction: Tensor, sigma: Tensor) -> Tensor:
    """The Huber constant per sample, as kohya's get_huber_threshold_if_needed (huber_scale 1): constant c;
    exponential exp(log(c) f) = c^f over the noise fraction f = t / T (1 when clean, c at pure noise); snr
    (1 - c) / (1 + sigma)^2 + c with sigma = sqrt((1 - abar) / abar) (1 at sigma 0, c as sigma grows)."""
    if schedule == "constant":
        return torch.full_like(noise_fraction, c, dtype=torch.float32)
    if schedule == "exponential":
        return torch.exp(math.log(c) * noise_fraction.float())
    if schedule == "snr":
        return (1 - c) / (1 + sigma.float()) ** 2 + c
    raise ValueError(f"unknown huber schedule {schedule!r}; known: {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(diff: Tensor, loss_type: str = "l2", huber_c: Tensor | float | None = None) -> Tensor:
    """The per-element loss of d = pred - target, as kohya's / diffusers' conditional_loss: l2 d^2; huber (pseudo-
    Huber) 2 c (sqrt(d^2 + c^2) - c), about d^2 for |d| << c and 2 c |d| beyond; smooth_l1 2 (sqrt(d^2 + c^2) - c),
    about d^2 / c near 0 and 2 |d| beyond. c: a number or one per sample (B,). Computed as 2 c d^2 / (sqrt(d^2 + c^2)
    + c), the same value without the cancellation that loses small errors in float32."""
    d2 = diff.pow(2)
    if loss_type == "l2":
        return d2
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    c = _bcast(huber_c, d2)
    smooth = d2 / ((d2 + c * c).sqrt() + c)  # sqrt(d^2 + c^2) - c
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


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


@dataclass(frozen=True)
class TimestepBias:
    """diffusers' train_text_to_image_sdxl timestep bias: `multiplier` times the weight of the last (later) or first
    (earlier) `portion` of the timesteps, or of [begin, end) (range); none leaves them uniform."""
    strategy: str = "none"
    multiplier: float = 1.0
    begin: int = 0
    end: int = 1000
    portion: float = 0.25

    def weights(self, num_timesteps: int = 1000) -> Tensor:
        """generate_timestep_weights: ones, the biased slice times the multiplier, normalised to sum 1 (none: ones)."""
        weights = torch.ones(num_timesteps)
        k = int(self.portion * num_timesteps)
        biased = {"later": slice(num_timesteps - k, None), "earlier": slice(0, k),
                  "range": slice(self.begin, self.end)}.get(self.strategy)
        if biased is None:
            return weights
        weights[biased] *= self.multiplier
        return weights / weights.sum()


def timestep_cdf(weights: Tensor, t_range: tuple[int, int] | None = None) -> Tensor:
    """Cumulative timestep weights (T,) for sample_timesteps(cdf=), zero outside t_range = [a, b), scaled so the
    largest weight is 1 (uniform weights give integers: draws identical to the unweighted ones)."""
    a, b = t_range or (0, len(weights))
    w = torch.zeros(len(weights), dtype=torch.float64)
    w[a:b] = weights[a:b].double() / weights[a:b].max()
    return w.cumsum(0).float()


def sample_timesteps(n: int, mode: str = "uniform", *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                     t_range: tuple[float, float] | None = None, num_train_timesteps: int | None = 1000,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None,
                     cdf: Tensor | None = None) -> Tensor:
    """Training timesteps: u ~ U[0, 1) ("uniform") or sigmoid(N(mean, std)) ("logit_normal", SD3), u' =
    shift_sigma(u, shift); DDPM (num_train_timesteps T): integers a + floor(u' (b - a)) in t_range = [a, b) (default
    [0, T)); flow (None): floats a + u' (b - a), default [0, 1). Drawn on the generator's device, moved to `device`.
    cdf (uniform DDPM only, from timestep_cdf): t = the first step whose cumulative weight exceeds u times the total,
    by a search on the device (no host read)."""
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
    if cdf is not None:
        if mode != "uniform" or shift != 1.0:
            raise ValueError("weighted timesteps (a timestep bias) are drawn from uniform u, without a shift")
        cdf = cdf.to(u.device)
        return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=b - 1)
    # sigmoid can round to exactly 1.0 in float32; keep t < b.
    return (a + (u * (b - a)).floor().long()).clamp(max=b - 1)


# ------------------------------------------------------------------------------------------ the latent objective


@dataclass
class DDPMObjective:
    """Noise latents at sampled timesteps, predict, and return the per-sample (weighted) loss.

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with eps (+ noise_offset * a per-channel shift) and t drawn from each
    sample's own generator (uniform or logit-normal in t_range, or weighted by a TimestepBias); the target is the
    model's parameterisation (eps / v / x0), or v for every model with loss_type "velocity" (the prediction converted
    to v first). The element-wise distance is l2 (loss_type "native", "velocity" or "l2"), or huber / smooth_l1 with
    a Huber constant from `huber_schedule` (elementwise_loss, huber_c_schedule); then Min-SNR-gamma and debiased-
    estimation weights, in that order.
    """
    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    loss_type: str = "native"
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_range: tuple[int, int] | None = None
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    debiased_estimation: bool = False
    timestep_bias: TimestepBias | None = None

    def __post_init__(self):
        if self.loss_type not in ("native", "velocity") + LOSS_TYPES:
            raise ValueError(f"unknown loss type {self.loss_type!r}; known: native, velocity, {', '.join(LOSS_TYPES)}")
        kind = "v_prediction" if self.loss_type == "velocity" else self.prediction_type
        if self.debiased_estimation and kind == "epsilon" and float(self.alphas_cumprod[-1]) == 0.0:
            raise ValueError("debiased estimation weights the epsilon loss by 1 / sqrt(SNR), infinite at zero "
                             "terminal SNR: use it with v_prediction, or without --zero_terminal_snr")
        self.cdf = None
        if self.timestep_bias is not None and self.timestep_bias.strategy != "none":
            if self.timestep_sampling != "uniform":
                raise ValueError("a timestep bias reweights uniform timesteps (diffusers'); it does not combine "
                                 f"with {self.timestep_sampling} sampling")
            self.cdf = timestep_cdf(self.timestep_bias.weights(len(self.alphas_cumprod)), self.t_range)

    def noisy(self, x0: Tensor, generators: list[torch.Generator]):
        """(x_t, t, noise, abar), each sample's draws from its own generator in a fixed order."""
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=g.device) for g in generators])
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.stack([torch.randn(x0.shape[1], 1, 1, generator=g,
                                                                         device=g.device) for g in generators])
        if self.alphas_cumprod.device != x0.device:  # moved once, not every step
            self.alphas_cumprod = self.alphas_cumprod.to(x0.device)
            self.cdf = self.cdf.to(x0.device) if self.cdf is not None else None
        t = torch.cat([sample_timesteps(1, self.timestep_sampling, mean=self.logit_mean, std=self.logit_std,
                                        t_range=self.t_range, generator=g, cdf=self.cdf) for g in generators])
        noise, t = noise.to(x0.device), t.to(x0.device)  # no-ops when the generators live on x0's device
        abar = self.alphas_cumprod[t]
        return add_noise(x0, noise, abar), t, noise, abar

    def loss(self, net, x0: Tensor, cond: tuple, generators: list[torch.Generator],
             weight: Tensor | None = None) -> Tensor:
        """Per-sample loss (B,); `weight` (B, 1, h, w): a loss mask (per_sample_mean)."""
        x_t, t, noise, abar = self.noisy(x0, generators)
        pred, kind = net(x_t, t, *cond).float(), self.prediction_type
        if self.loss_type == "velocity":
            pred = v_target(to_x0(pred, x_t, abar, kind), to_eps(pred, x_t, abar, kind), abar)
            kind = "v_prediction"
        diff = pred - training_target(x0, noise, abar, kind)
        distance = self.loss_type if self.loss_type in LOSS_TYPES else "l2"
        c = None if distance == "l2" else huber_c_schedule(
            self.huber_schedule, self.huber_c, t / len(self.alphas_cumprod), sigmas_from_alphas_cumprod(abar))
        loss = per_sample_mean(elementwise_loss(diff, distance, c), weight)
        snr = abar / (1 - abar)
        if self.min_snr_gamma:
            loss = loss * min_snr_weight(snr, self.min_snr_gamma, kind)
        if self.debiased_estimation:
            loss = loss * debiased_weight(snr, kind)
        return loss

"""Samplers as pure functions over a denoiser (k-diffusion style), their noise schedules, and CFG.

A denoiser is `denoiser(x, sigma) -> x0 estimate`, sigma a 0-d tensor. For DDPM-family models x lives on the
"sigma scale", x = x0 + sigma eps (the VP sample times sqrt(1 + sigma^2)); for flow models x = (1 - s) x0 + s noise
and sigma is s. Every sampler is `sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, ...) -> x`
with sigmas descending to 0 (DDIM: to the training schedule's smallest sigma), and reproduces the named diffusers
scheduler on the same model and noise.

How a pipeline reproduces diffusers' StableDiffusionXLPipeline (the UNet timesteps, input scaling, initial noise
scale, guidance and final latents all as the reference's scheduler loop has them):

    abar = sdxl.diffusion.get_alphas_cumprod()                 # SDXL's scaled-linear training schedule
    fn, _ = resolve_sampler(name)                              # "euler", "ddim", "dpmpp_2m_karras", ...
    sched = schedule_for(name, steps, abar)                    # published config: leading spacing, offset 1
    # cond_fn(x_in, t) / both_fn(cat([x_in, x_in]), t) -> raw UNet output with positive / cat([neg, pos]) context
    model = cfg_denoiser(cond_fn, scale=cfg, batched_fn=both_fn, rescale=phi)
    x = fn(make_denoiser(model, abar, "epsilon", sched), noise * sched.init_noise_sigma, sched.sigmas,
           generator=generator)
    latents = x * sched.final_scale                            # then / vae scaling_factor and decode
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sdxl.diffusion import PREDICTION_TYPES, shift_sigma, sigmas_from_alphas_cumprod, to_x0

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, sigma) -> x0 estimate
ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_in, t) -> raw prediction; or any fn(x, s) CFG wraps
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]  # (step index, x after the step, denoised at the step)

# diffusers' inference schedulers replace a zero-terminal-SNR abar_T = 0 (sigma infinite) by 2^-24.
_MIN_ALPHA_CUMPROD = 2.0**-24


# ----------------------------------------------------------------------------------------------------------------
# Schedules


class Schedule(NamedTuple):
    """What a sampling run needs besides the model.

    sigmas: (N+1,) float32, descending; the last is 0 (or sigma_min for DDIM).
    timesteps: (N,) float32, the model timestep the reference scheduler feeds at sigmas[i].
    init_noise_sigma: initial x = unit noise * this (on the sigma scale).
    final_scale: the reference's output = x * this. DDIM and DPM-Solver work on the VP sample x / sqrt(1 + sigma^2);
        it differs from 1 only when they stop at a sigma above 0 (DDIM's final abar[0]).
    """
    sigmas: Tensor
    timesteps: Tensor
    init_noise_sigma: float
    final_scale: float


def sigma_to_t(sigma: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The fractional training timestep of a noise level: linear interpolation in log sigma between the two
    neighbouring training sigmas (k-diffusion's / diffusers' `_sigma_to_t`), clamped to [0, T-1]. float64."""
    # Log of float32 sigmas as the reference, the rest in float64; t agrees with it to ~1e-4 (np.log and torch.log
    # differ in the last bit), far inside the 0.5 margin of DPM-Solver's rounding.
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.float().clamp(min=_MIN_ALPHA_CUMPROD)).log().double()
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=alphas_cumprod.device)
    log_sigma = sigma.clamp(min=1e-10).log().reshape(-1)  # (n,)
    dists = log_sigma - log_sigmas[:, None]  # (T, n)
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, float64 (n,)."""
    ramp = torch.from_numpy(np.linspace(0, 1, n))  # numpy's rounding, as the reference
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _spaced_timesteps(n: int, num_train: int, spacing: str, steps_offset: int, style: str) -> Tensor:
    """The reference scheduler's descending timesteps for n steps (float64; fractional for Euler's linspace).
    Built with numpy as the reference builds them: torch's arange / linspace differ in the last bit, which flips
    some roundings."""
    dpm = style == "dpmsolver"  # DPMSolverMultistep spaces n + 1 points and drops the last (t = 0)
    if spacing == "linspace":
        if dpm:
            t = np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1]
        elif style == "ddim":
            t = np.linspace(0, num_train - 1, n).round()[::-1]
        else:
            t = np.linspace(0, num_train - 1, n, dtype=np.float32)[::-1]
    elif spacing == "leading":
        t = (np.arange(n, 0, -1) if dpm else np.arange(n - 1, -1, -1)) * (num_train // (n + dpm)) + steps_offset
    elif spacing == "trailing":
        t = np.arange(num_train, 0, -num_train / n).round() - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: linspace, leading, trailing")
    return torch.from_numpy(t.astype(np.float64))


def _interp(t: Tensor, table: Tensor) -> Tensor:
    """np.interp(t, arange(len(table)), table): linear interpolation at fractional indices, clamped at the ends."""
    t = t.clamp(0, len(table) - 1)
    low = t.floor().long().clamp(max=len(table) - 2)
    return table[low] + (t - low) * (table[low + 1] - table[low])


def get_sigmas(num_steps: int, alphas_cumprod: Tensor, spacing: str = "leading", steps_offset: int = 1,
               karras: bool = False, rho: float = 7.0, *, style: str = "euler", final: str | None = None) -> Schedule:
    """The noise levels and model timesteps of a diffusers scheduler's `set_timesteps(num_steps)`.

    style names the reference: "euler" (Euler, Euler ancestral, Heun), "ddim" or "dpmsolver" (DPMSolverMultistep);
    they space timesteps slightly differently. sigma = sqrt((1 - abar) / abar) interpolated linearly at the
    (possibly fractional) timesteps. karras: Karras sigmas between the spaced schedule's ends ("euler") or the whole
    training range ("dpmsolver"), each mapped back to a timestep by `sigma_to_t` (rounded for "dpmsolver").
    final: the appended last sigma, "zero" or "sigma_min" (the training schedule's smallest sigma); by default
    "sigma_min" for DDIM (set_alpha_to_one=False, as SDXL's config) and "zero" otherwise.
    """
    if style not in ("euler", "ddim", "dpmsolver"):
        raise ValueError(f"unknown schedule style {style!r}; known: euler, ddim, dpmsolver")
    num_train = len(alphas_cumprod)
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.float().clamp(min=_MIN_ALPHA_CUMPROD))  # (T,) float32
    t = _spaced_timesteps(num_steps, num_train, spacing, steps_offset, style)
    sigmas = _interp(t, train_sigmas.double())
    if karras:
        if style == "dpmsolver":
            lo, hi = train_sigmas[0].item(), train_sigmas[-1].item()
        else:
            lo, hi = sigmas[-1].item(), sigmas[0].item()
        sigmas = karras_sigmas(num_steps, lo, hi, rho)
        t = sigma_to_t(sigmas, alphas_cumprod)
        if style == "dpmsolver":
            t = t.round()
    final = final or ("sigma_min" if style == "ddim" else "zero")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final sigma {final!r}; known: zero, sigma_min")
    last = train_sigmas[0].item() if final == "sigma_min" else 0.0
    sigmas = torch.cat([sigmas, sigmas.new_tensor([last])]).float()
    smax = sigmas.max()
    if style == "euler":
        # Euler-family schedulers start from noise * sigma_max, except with "leading" spacing: sqrt(sigma_max^2 + 1).
        init = smax if spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5
        final_scale = 1.0
    else:
        # DDIM / DPM-Solver start from unit-variance VP noise and return the VP sample.
        init = (sigmas[0] ** 2 + 1) ** 0.5
        final_scale = float(1 / (sigmas[-1].double() ** 2 + 1) ** 0.5)
    return Schedule(sigmas, t.float(), float(init), final_scale)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Schedule:
    """FlowMatchEulerDiscreteScheduler.set_timesteps: s = shift(linspace(1, s_min, N)), 0 appended, t = 1000 s,
    where s_min = shift(1/1000) is the shifted training minimum (diffusers shifts it twice; reproduced)."""
    # The training range in float32 as the reference holds it: shift(1) and shift(1/T).
    s_max, s_min = shift_sigma(torch.tensor([1.0, 1 / num_train_timesteps]), shift).tolist()
    s = torch.from_numpy(np.linspace(s_max * num_train_timesteps, s_min * num_train_timesteps, num_steps))
    s = shift_sigma(s / num_train_timesteps, shift).float()
    return Schedule(torch.cat([s, s.new_zeros(1)]), s * num_train_timesteps, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Denoisers and guidance


def make_denoiser(model_fn: ModelFn, alphas_cumprod: Tensor | None,
                  prediction_type: str = "epsilon", schedule: Schedule | None = None,
                  num_train_timesteps: int = 1000) -> Denoiser:
    """A denoiser from a raw model function `model_fn(x_in, t) -> prediction` (an eps / v / x0 / velocity model).

    DDPM family: x_in = x / sqrt(sigma^2 + 1) (the VP sample, diffusers' scale_model_input), abar = 1 / (1 + sigma^2),
    x0 = to_x0(pred, x_in, abar, prediction_type). "flow": x_in = x, x0 = x - sigma v, t = 1000 sigma.
    t is the schedule's timestep for that sigma when `schedule` is given (the reference rounds some, e.g. DPM-Solver
    with Karras sigmas), otherwise `sigma_to_t`; model_fn gets it as a 0-d float32 tensor on x's device.
    """
    if prediction_type not in (*PREDICTION_TYPES, "flow"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}, flow")
    table = {}
    if schedule is not None:
        table = dict(zip(schedule.sigmas[:-1].tolist(), schedule.timesteps.tolist()))

    def timestep(sigma: Tensor, x: Tensor) -> Tensor:
        t = table.get(float(sigma))
        if t is None:
            t = sigma * num_train_timesteps if prediction_type == "flow" else sigma_to_t(sigma, alphas_cumprod)
        return torch.as_tensor(t, dtype=torch.float32).to(x.device)

    if prediction_type == "flow":
        def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
            return x - sigma * model_fn(x, timestep(sigma, x))
    else:
        if alphas_cumprod is None:
            raise ValueError(f"prediction_type {prediction_type!r} needs alphas_cumprod")

        def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
            x_in = x / (sigma**2 + 1) ** 0.5
            return to_x0(model_fn(x_in, timestep(sigma, x)), x_in, 1 / (sigma**2 + 1), prediction_type)
    return denoiser


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (arXiv 2305.08891, Sec. 3.4; diffusers' rescale_noise_cfg): match the per-sample std of the
    guided prediction to the conditional one, mixed by phi:
    phi * guided * std(cond) / std(guided) + (1 - phi) * guided."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def cfg_denoiser(cond_fn: ModelFn, uncond_fn: ModelFn | None = None, scale: float = 1.0, *,
                 batched_fn: ModelFn | None = None, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None) -> ModelFn:
    """Classifier-free guidance: guided = uncond + scale (cond - uncond), then `rescale_guidance` when rescale > 0.

    Wraps any fn(x, s): a raw model function (x_in, t) or a denoiser (x, sigma); guidance is linear so both give
    the same guided x0, but the rescale's std is taken on whatever the wrapped fn returns. diffusers rescales the raw
    UNet output (eps or v), so wrap the model function and pass the result to `make_denoiser` to match it.
    cond_fn / uncond_fn run one branch each; batched_fn(x2, s) runs both in one call on x2 = cat([x, x]) and returns
    cat([uncond, cond]) (diffusers' order: negative prompt first); it is used instead of uncond_fn when given.
    interval = (lo, hi) in the units of s: outside lo <= s <= hi (and when scale == 1) only cond_fn runs.
    """
    if uncond_fn is None and batched_fn is None and scale != 1.0:
        raise ValueError("cfg_denoiser needs uncond_fn or batched_fn when scale != 1")

    def guided(x: Tensor, s: Tensor) -> Tensor:
        if scale == 1.0 or (interval is not None and not interval[0] <= float(s) <= interval[1]):
            return cond_fn(x, s)
        if batched_fn is not None:
            uncond, cond = batched_fn(torch.cat([x, x]), s).chunk(2)
        else:
            uncond, cond = uncond_fn(x, s), cond_fn(x, s)
        out = uncond + scale * (cond - uncond)
        return rescale_guidance(out, cond, rescale) if rescale > 0 else out
    return guided


# ----------------------------------------------------------------------------------------------------------------
# Samplers


def default_noise_sampler(x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Fresh N(0, I) like x from `generator`, drawn on the generator's device as diffusers' randn_tensor does, so
    the same seeded generator gives the reference scheduler's noises in the same order."""
    device = generator.device if generator is not None else x.device

    def noise_sampler(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return noise_sampler


def _ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic part down to sigma_down and fresh noise of std sigma_up:
    sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)), sigma_down = sqrt(s'^2 - sigma_up^2)."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None) -> Tensor:
    """Euler method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 2)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                           generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None) -> Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion)."""
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 0.0,
                generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                callback: Callback | None = None) -> Tensor:
    """DDIM (Song et al. 2020). On the sigma scale its update x' = x0 + sqrt(s'^2 - su^2) eps + su z, with
    su = eta * DDIM's sigma_t / sqrt(abar_prev), is exactly the ancestral Euler step with that eta."""
    return sample_euler_ancestral(denoiser, x, sigmas, eta=eta, generator=generator, noise_sampler=noise_sampler,
                                  callback=callback)


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1 without churn); the step to sigma = 0 is plain Euler."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        if callback is not None:
            callback(i, x, denoised)
    return x


def _first_order_at(i: int, n: int, sigma_next: Tensor, lower_order_final: bool, euler_at_final: bool) -> bool:
    """diffusers' DPMSolverMultistep takes a first-order last step to sigma = 0, below 15 steps, or when asked."""
    return i == n - 1 and (sigma_next == 0 or euler_at_final or (lower_order_final and n < 15))


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                    callback: Callback | None = None, lower_order_final: bool = True,
                    euler_at_final: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in lambda = -log sigma (diffusers' "dpmsolver++").

    h = lambda' - lambda, r = h_prev / h, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev; x' = (s'/s) x - expm1(-h) D.
    """
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised  # the h -> infinity limit of the update
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            d = denoised
            if old_denoised is not None and not _first_order_at(i, n, sigmas[i + 1], lower_order_final, euler_at_final):
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                        generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                        callback: Callback | None = None, lower_order_final: bool = True,
                        euler_at_final: bool = False) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint form (diffusers' "sde-dpmsolver++" at eta = 1; k-diffusion's dpmpp_2m_sde).

    x' = (s'/s) e^(-eta h) x + (1 - e^(-(1+eta) h)) [x0 + (x0 - x0_prev) / (2r)] + s' sqrt(1 - e^(-2 eta h)) z.
    The default noise is randn from `generator` (diffusers' behaviour), not k-diffusion's Brownian tree.
    """
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            x = (sigmas[i + 1] / sigmas[i]) * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised
            if old_denoised is not None and not _first_order_at(i, n, sigmas[i + 1], lower_order_final, euler_at_final):
                r = h_last / h
                x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)) ** 0.5
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_flow_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                      callback: Callback | None = None) -> Tensor:
    """Euler on the rectified-flow ODE dx/ds = v = (x - x0) / s (FlowMatchEulerDiscreteScheduler), `flow_sigmas`."""
    return sample_euler(denoiser, x, sigmas, callback=callback)


def sample_flow_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                     callback: Callback | None = None) -> Tensor:
    """Heun on the rectified-flow ODE (FlowMatchHeunDiscreteScheduler), over `flow_sigmas`; last step Euler."""
    return sample_heun(denoiser, x, sigmas, callback=callback)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "flow_euler": sample_flow_euler,
    "flow_heun": sample_flow_heun,
}


def sampler_names() -> list[str]:
    """Every accepted name: each sampler, and `<name>_karras` for the DDPM-family ones."""
    return list(SAMPLERS) + [f"{k}_karras" for k in SAMPLERS if not k.startswith("flow_")]


def resolve_sampler(name: str) -> tuple[Callable[..., Tensor], bool]:
    """(sampler function, use Karras sigmas) for a name like "euler" or "dpmpp_2m_karras"."""
    if name not in sampler_names():
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(sampler_names())}")
    base = name.removesuffix("_karras")
    return SAMPLERS[base], base != name


def schedule_for(name: str, num_steps: int, alphas_cumprod: Tensor | None = None, *, spacing: str = "leading",
                 steps_offset: int = 1, shift: float = 1.0, final: str | None = None) -> Schedule:
    """The schedule the diffusers scheduler behind sampler `name` would use (defaults: SDXL's published config).

    euler / euler_ancestral / heun -> Euler-style spacing, ddim -> DDIM's, dpmpp_* -> DPMSolverMultistep's;
    flow_* -> `flow_sigmas(num_steps, shift)`.
    """
    _, karras = resolve_sampler(name)
    base = name.removesuffix("_karras")
    if base.startswith("flow_"):
        return flow_sigmas(num_steps, shift)
    if alphas_cumprod is None:
        raise ValueError(f"sampler {name!r} needs alphas_cumprod")
    style = "ddim" if base == "ddim" else "dpmsolver" if base.startswith("dpmpp") else "euler"
    return get_sigmas(num_steps, alphas_cumprod, spacing, steps_offset, karras, style=style, final=final)

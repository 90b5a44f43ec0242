"""Samplers as pure functions over a denoiser (k-diffusion style), their noise schedules, and CFG.

A denoiser is `denoiser(x, sigma) -> x0 estimate`, sigma a Python float; x = x0 + sigma eps (the VP sample times
sqrt(1 + sigma^2)) for DDPM models, x = (1 - s) x0 + s noise with sigma = s for flow models. Each `sample_<name>`
reproduces the named diffusers scheduler on the same model and noise when run as the bundles do (abar None on flow):
    sched = schedule_for(name, steps, abar)  # the published config: leading spacing, offset 1
    model = cfg_denoiser(cond_fn, scale=cfg, batched_fn=both_fn, rescale=phi)  # guidance on the raw model output
    x = resolve_sampler(name)[0](make_denoiser(model, abar, prediction_type, sched), noise * sched.init_noise_sigma,
                                 sched.sigmas) * sched.final_scale
Inside the sampling loop the schedule is Python floats (read from the tensors once, before the first step) and
model functions get the timestep as a float: no step reads a tensor back to the host, so a step never waits on the
device.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sdxl.diffusion import PREDICTION_TYPES, shift_sigma, sigmas_from_alphas_cumprod, to_x0

Denoiser = Callable[[Tensor, float], Tensor]  # (x, sigma) -> x0 estimate
ModelFn = Callable[[Tensor, float], Tensor]  # (x_in, t) -> raw prediction; or any fn(x, s) CFG wraps
NoiseSampler = Callable[[float, float], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]  # (step index, x after the step, denoised at the step)

# diffusers' inference schedulers replace a zero-terminal-SNR abar_T = 0 (sigma infinite) by 2^-24.
_MIN_ALPHA_CUMPROD = 2.0**-24


# ----------------------------------------------------------------------------------------------------------- schedules


class Schedule(NamedTuple):  # what a sampling run needs besides the model
    sigmas: Tensor  # (N+1,) float32, descending; the last is 0 (or sigma_min for DDIM)
    timesteps: Tensor  # (N,) float32, the model timestep the reference scheduler feeds at sigmas[i]
    init_noise_sigma: float  # initial x = unit noise * this
    final_scale: float  # output = x * this: DDIM / DPM-Solver return the VP sample x / sqrt(1 + sigmas[-1]^2)


def sigma_to_t(sigma: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The fractional training timestep of a noise level, float64 in [0, T-1]: linear interpolation in log sigma
    (diffusers' `_sigma_to_t`; to ~1e-4, np.log vs torch.log, far inside DPM-Solver's rounding)."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.float().clamp(min=_MIN_ALPHA_CUMPROD)).log().double()
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=alphas_cumprod.device)
    log_sigma = sigma.clamp(min=1e-10).log().reshape(-1)  # (n,)
    # low: the last training step whose log sigma is <= log_sigma ((T, n) comparisons)
    low = (log_sigma - log_sigmas[:, None]).ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, float64 (n,)."""
    ramp = torch.from_numpy(np.linspace(0, 1, n))  # numpy's rounding, as the reference
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _spaced_timesteps(n: int, num_train: int, spacing: str, steps_offset: int, style: str) -> Tensor:
    """The reference's descending timesteps, float64, with numpy: torch's arange / linspace flip some roundings."""
    dpm = style == "dpmsolver"  # DPMSolverMultistep spaces n + 1 points and drops the last (t = 0)
    if spacing == "linspace":  # Euler-family: float32, unrounded
        t = np.linspace(0, num_train - 1, n + dpm, dtype=np.float32 if style == "euler" else np.float64)
        t = (t if style == "euler" else t.round())[::-1][:n]
    elif spacing == "leading":
        t = (np.arange(n, 0, -1) if dpm else np.arange(n - 1, -1, -1)) * (num_train // (n + dpm)) + steps_offset
    elif spacing == "trailing":
        t = np.arange(num_train, 0, -num_train / n).round() - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: linspace, leading, trailing")
    return torch.from_numpy(t.astype(np.float64))


def get_sigmas(num_steps: int, alphas_cumprod: Tensor, spacing: str = "leading", steps_offset: int = 1,
               karras: bool = False, rho: float = 7.0, *, style: str = "euler", final: str | None = None) -> Schedule:
    """A diffusers scheduler's `set_timesteps(num_steps)`; style "euler" (Euler, Euler ancestral, Heun), "ddim" or
    "dpmsolver" (DPMSolverMultistep). karras: Karras sigmas between the spaced schedule's ends ("euler") or the
    training range ("dpmsolver", timesteps rounded). final: the appended sigma, "zero" or "sigma_min" (default for
    DDIM: set_alpha_to_one=False, as SDXL)."""
    if style not in ("euler", "ddim", "dpmsolver"):
        raise ValueError(f"unknown schedule style {style!r}; known: euler, ddim, dpmsolver")
    num_train = len(alphas_cumprod)
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.float().clamp(min=_MIN_ALPHA_CUMPROD))  # (T,) float32
    t = _spaced_timesteps(num_steps, num_train, spacing, steps_offset, style)
    sigmas = torch.from_numpy(np.interp(t.numpy(), np.arange(num_train), train_sigmas.double().numpy()))
    if karras:
        lo, hi = (train_sigmas[0], train_sigmas[-1]) if style == "dpmsolver" else (sigmas[-1], sigmas[0])
        sigmas = karras_sigmas(num_steps, lo.item(), hi.item(), rho)
        t = sigma_to_t(sigmas, alphas_cumprod)
        t = t.round() if style == "dpmsolver" else t
    final = final or ("sigma_min" if style == "ddim" else "zero")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final sigma {final!r}; known: zero, sigma_min")
    last = train_sigmas[0].item() if final == "sigma_min" else 0.0
    sigmas = torch.cat([sigmas, sigmas.new_tensor([last])]).float()
    smax = sigmas.max()
    if style == "euler":  # Euler-family schedulers start from noise * sigma_max; with "leading", sqrt(smax^2 + 1)
        init, final_scale = (smax if spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5), 1.0
    else:  # DDIM / DPM-Solver start from unit-variance VP noise and return the VP sample
        init, final_scale = (sigmas[0] ** 2 + 1) ** 0.5, float(1 / (sigmas[-1].double() ** 2 + 1) ** 0.5)
    return Schedule(sigmas, t.float(), float(init), final_scale)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Schedule:
    """FlowMatchEulerDiscreteScheduler.set_timesteps: s = shift(linspace(1, s_min, N)), 0 appended, t = 1000 s,
    where s_min = shift(1/1000) is the shifted training minimum (diffusers shifts it twice; reproduced), float32."""
    s_max, s_min = shift_sigma(torch.tensor([1.0, 1 / num_train_timesteps]), shift).tolist()
    s = torch.from_numpy(np.linspace(s_max * num_train_timesteps, s_min * num_train_timesteps, num_steps))
    s = shift_sigma(s / num_train_timesteps, shift).float()
    return Schedule(torch.cat([s, s.new_zeros(1)]), s * num_train_timesteps, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------- denoisers and guidance


def make_denoiser(model_fn: ModelFn, alphas_cumprod: Tensor | None, prediction_type: str = "epsilon",
                  schedule: Schedule | None = None, num_train_timesteps: int = 1000) -> Denoiser:
    """A denoiser from `model_fn(x_in, t) -> prediction`. DDPM: x_in = x / sqrt(sigma^2 + 1) (scale_model_input),
    x0 = to_x0(pred, x_in, 1 / (1 + sigma^2), prediction_type). Flow (alphas_cumprod None, or "flow"): x_in = x,
    "flow" predicts v, x0 = x - s v; "sample" predicts x0. t is `schedule`'s timestep for that sigma when given (the
    reference rounds some), else `sigma_to_t` (DDPM) or 1000 s (flow)."""
    flow = alphas_cumprod is None or prediction_type == "flow"
    if prediction_type not in (*PREDICTION_TYPES, "flow"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}, flow")
    if flow and prediction_type not in ("flow", "sample"):
        raise ValueError(f"prediction_type {prediction_type!r} needs alphas_cumprod (the flow scale: flow or sample)")
    table = {} if schedule is None else dict(zip(schedule.sigmas[:-1].tolist(), schedule.timesteps.tolist()))

    def timestep(sigma: float) -> float:  # float32 values, as the reference feeds them
        t = table.get(sigma)
        if t is None:
            t = sigma * num_train_timesteps if flow else sigma_to_t(torch.tensor(sigma), alphas_cumprod).item()
        return float(np.float32(t))

    def denoiser(x: Tensor, sigma: float) -> Tensor:
        sigma = float(sigma)
        if flow:
            pred = model_fn(x, timestep(sigma))
            return pred if prediction_type == "sample" else x - sigma * pred
        x_in = x / (sigma**2 + 1) ** 0.5
        return to_x0(model_fn(x_in, timestep(sigma)), x_in, 1 / (sigma**2 + 1), prediction_type)
    return denoiser


def cfg_denoiser(cond_fn: ModelFn, uncond_fn: ModelFn | None = None, scale: float = 1.0, *,
                 batched_fn: ModelFn | None = None, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None) -> ModelFn:
    """Classifier-free guidance: guided = uncond + scale (cond - uncond); rescale = phi > 0 (arXiv 2305.08891 Sec.
    3.4, diffusers' rescale_noise_cfg): phi * guided * std(cond) / std(guided) + (1 - phi) * guided, per sample, on
    what the wrapped fn returns (the raw eps or v, as diffusers). batched_fn(cat([x, x]), s) -> cat([uncond, cond])
    replaces uncond_fn. Outside interval = (lo, hi) of s, or at scale 1, only cond_fn."""
    if uncond_fn is None and batched_fn is None and scale != 1.0:
        raise ValueError("cfg_denoiser needs uncond_fn or batched_fn when scale != 1")

    def guided(x: Tensor, s: float) -> Tensor:
        if scale == 1.0 or (interval is not None and not interval[0] <= float(s) <= interval[1]):
            return cond_fn(x, s)
        if batched_fn is not None:
            uncond, cond = batched_fn(torch.cat([x, x]), s).chunk(2)
        else:
            uncond, cond = uncond_fn(x, s), cond_fn(x, s)
        out = uncond + scale * (cond - uncond)
        if rescale > 0:
            dims = list(range(1, cond.ndim))
            out = rescale * out * cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True) \
                + (1 - rescale) * out
        return out
    return guided


# ------------------------------------------------------------------------------------------------------------ samplers


def default_noise_sampler(x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Fresh N(0, I) like x, drawn on the generator's device as diffusers' randn_tensor: the reference's noises."""
    device = generator.device if generator is not None else x.device
    return lambda *_: torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _floats(sigmas: Tensor | list[float]) -> list[float]:
    """The schedule as Python floats (one host read, before the loop; a device tensor syncs once here)."""
    return sigmas.tolist() if isinstance(sigmas, Tensor) else [float(s) for s in sigmas]


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise of std sigma_up:
    sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)), sigma_down = sqrt(s'^2 - sigma_up^2)."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                           generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None) -> Tensor:
    """Ancestral Euler (k-diffusion): an Euler step down to sigma_down, then noise of std sigma_up; eta 0: Euler."""
    noise_sampler, sigmas = noise_sampler or default_noise_sampler(x, generator), _floats(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, **kw) -> Tensor:
    """Euler method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 2)."""
    return sample_euler_ancestral(denoiser, x, sigmas, eta=0.0, **kw)


def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 0.0,
                noise_sampler: NoiseSampler | None = None, **kw) -> Tensor:
    """DDIM (Song et al. 2020): on the sigma scale x' = x0 + sqrt(s'^2 - su^2) eps + su z, su = eta * DDIM's
    sigma_t / sqrt(abar_prev), is exactly the ancestral Euler step with that eta."""
    # noise_sampler named in the signature: generate() gives one to the samplers that accept it (the stochastic ones).
    return sample_euler_ancestral(denoiser, x, sigmas, eta=eta, noise_sampler=noise_sampler, **kw)


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1 without churn); the step to sigma = 0 is plain Euler."""
    sigmas = _floats(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        x_2 = x + d * dt
        if sigmas[i + 1] != 0:  # the trapezoid with the slope at the Euler step's end
            x_2 = x + (d + (x_2 - denoiser(x_2, sigmas[i + 1])) / sigmas[i + 1]) / 2 * dt
        x = x_2
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                        generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                        callback: Callback | None = None, lower_order_final: bool = True,
                        euler_at_final: bool = False) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint form (diffusers' "sde-dpmsolver++" at eta = 1; k-diffusion's dpmpp_2m_sde).
    h = log s - log s', r = h_prev / h, z randn from `generator` (diffusers; not a Brownian tree):
    x' = (s'/s) e^(-eta h) x + (1 - e^(-(1+eta) h)) [x0 + (x0 - x0_prev) / (2r)] + s' sqrt(1 - e^(-2 eta h)) z.
    The last step is first order to sigma = 0, below 15 steps (lower_order_final), or with euler_at_final."""
    noise_sampler, sigmas = noise_sampler or default_noise_sampler(x, generator), _floats(sigmas)
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised  # the h -> infinity limit of the update
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            eta_h = eta * h
            x = (sigmas[i + 1] / sigmas[i]) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            first_order = i == n - 1 and (euler_at_final or (lower_order_final and n < 15))
            if old_denoised is not None and not first_order:
                r = h_last / h
                x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, **kw) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022; diffusers' "dpmsolver++"): the SDE form at eta = 0, which is
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev; x' = (s'/s) x - expm1(-h) D, multistep second order in lambda = -log s."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=0.0, **kw)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler, "euler_ancestral": sample_euler_ancestral, "heun": sample_heun, "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde}


def sampler_names() -> list[str]:
    """Every accepted name: each sampler, and `<name>_karras` (Karras sigmas on the DDPM schedule)."""
    return list(SAMPLERS) + [f"{k}_karras" for k in SAMPLERS]


def resolve_sampler(name: str) -> tuple[Callable[..., Tensor], bool]:
    """(sampler function, use Karras sigmas) for a name like "euler" or "dpmpp_2m_karras"."""
    if name not in sampler_names():
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(sampler_names())}")
    base = name.removesuffix("_karras")
    return SAMPLERS[base], base != name


def schedule_for(name: str, num_steps: int, alphas_cumprod: Tensor | None = None, *, spacing: str = "leading",
                 steps_offset: int = 1, shift: float = 1.0, final: str | None = None) -> Schedule:
    """The schedule of the diffusers scheduler behind sampler `name` (defaults: SDXL's published config): Euler-
    style spacing, DDIM's or DPMSolverMultistep's; on the flow scale (alphas_cumprod None) euler / heun over
    `flow_sigmas(num_steps, shift)`, as FlowMatchEuler / FlowMatchHeunDiscreteScheduler."""
    _, karras = resolve_sampler(name)
    base = name.removesuffix("_karras")
    if alphas_cumprod is None:
        if karras or base not in ("euler", "heun"):
            raise ValueError(f"sampler {name!r} needs alphas_cumprod (the flow scale samples with euler or heun)")
        return flow_sigmas(num_steps, shift)
    style = "ddim" if base == "ddim" else "dpmsolver" if base.startswith("dpmpp") else "euler"
    return get_sigmas(num_steps, alphas_cumprod, spacing, steps_offset, karras, style=style, final=final)

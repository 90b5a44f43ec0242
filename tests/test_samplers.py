"""Samplers, schedules and CFG against diffusers' schedulers (the oracle), stepping the same toy model.

The reference runs in its own convention (latents = noise * init_noise_sigma, scale_model_input, model output,
scheduler.step); ours runs the pipeline pattern (schedule_for -> make_denoiser -> sample_<name> -> final_scale).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       HeunDiscreteScheduler)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

from conftest import rel_err

from sdxl.diffusion import get_alphas_cumprod
from sdxl.samplers import (SAMPLERS, cfg_denoiser, flow_sigmas, get_sigmas, karras_sigmas, make_denoiser,
                           resolve_sampler, sample_ddim, sample_dpmpp_2m_sde, sample_euler, schedule_for,
                           sigma_to_t)

# SDXL's published scheduler config (the EulerDiscreteScheduler of stabilityai/stable-diffusion-xl-base-1.0).
SDXL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
            steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
ABAR = get_alphas_cumprod()
SHAPE = (2, 4, 8, 8)
TOL = 1e-4


def toy_model(x_in: torch.Tensor, t) -> torch.Tensor:
    """A smooth nonlinear stand-in for a UNet: depends on the input, its neighbours and t."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.5 * x_in + t / 1000) + 0.1 * x_in.roll(1, dims=-1) - 0.05 * x_in.mean(dim=1, keepdim=True)


class Recorder:
    """Wraps a model function and records the timesteps it is called with."""

    def __init__(self, fn):
        self.fn, self.ts = fn, []

    def __call__(self, x, t):
        self.ts.append(float(t))
        return self.fn(x, t)


def run_reference(sched, steps: int, noise: torch.Tensor, model, **step_kwargs) -> torch.Tensor:
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        kw = {k: (v() if callable(v) else v) for k, v in step_kwargs.items()}
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def run_ours(name: str, steps: int, noise: torch.Tensor, model, prediction_type="epsilon", schedule=None, **kw):
    fn, _ = resolve_sampler(name)
    sched = schedule or schedule_for(name, steps, ABAR)
    den = make_denoiser(model, ABAR, prediction_type, sched)
    return fn(den, noise * sched.init_noise_sigma, sched.sigmas, **kw) * sched.final_scale


def noise_like(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def assert_match(ours, ref, rec_ours=None, rec_ref=None):
    assert torch.isfinite(ours).all()
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs diff {err:.3g}"
    if rec_ours is not None:
        # The model saw the same timesteps (the pipeline relies on the denoiser picking the reference's t).
        assert len(rec_ours.ts) == len(rec_ref.ts)
        assert max(abs(a - b) for a, b in zip(rec_ours.ts, rec_ref.ts)) < 1e-3


# ------------------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("spacing,karras", itertools.product(["leading", "trailing", "linspace"], [False, True]))
def test_euler_and_dpm_schedules_match_set_timesteps(spacing, karras):
    for n in [1, 2, 3, 7, 10, 13, 20, 25, 30, 48, 50, 100, 333]:
        ref = EulerDiscreteScheduler(**{**SDXL, "timestep_spacing": spacing}, use_karras_sigmas=karras)
        ref.set_timesteps(n)
        ours = get_sigmas(n, ABAR, spacing, 1, karras)
        assert torch.equal(ours.sigmas, ref.sigmas), (n, spacing, karras)
        # Karras timesteps come from log-sigma interpolation: equal up to float32 rounding of logs.
        assert (ours.timesteps - ref.timesteps).abs().max() <= (1e-4 if karras else 0)
        assert ours.init_noise_sigma == float(ref.init_noise_sigma) and ours.final_scale == 1.0

        ref = DPMSolverMultistepScheduler(**{**SDXL, "timestep_spacing": spacing}, use_karras_sigmas=karras)
        ref.set_timesteps(n)
        ours = get_sigmas(n, ABAR, spacing, 1, karras, style="dpmsolver")
        assert torch.equal(ours.sigmas, ref.sigmas), (n, spacing, karras)
        assert torch.equal(ours.timesteps, ref.timesteps.float())  # integers (rounded for Karras)

        if not karras:
            ref = DDIMScheduler(**{**SDXL, "timestep_spacing": spacing}, clip_sample=False, set_alpha_to_one=False)
            ref.set_timesteps(n)
            ours = get_sigmas(n, ABAR, spacing, 1, style="ddim")
            assert torch.equal(ours.timesteps, ref.timesteps.float())
            # DDIM ends at abar[0], not at sigma 0.
            assert ours.sigmas[-1] == ((1 - ABAR[0]) / ABAR[0]) ** 0.5


def test_zero_terminal_snr_schedule_matches_euler_trailing():
    """A zero-SNR schedule (abar_T = 0) gets diffusers' 2^-24 clamp: a finite sigma_max of 4096."""
    abar = get_alphas_cumprod(zero_terminal_snr=True)
    ref = EulerDiscreteScheduler(**{**SDXL, "timestep_spacing": "trailing"}, rescale_betas_zero_snr=True)
    ref.set_timesteps(20)
    ours = get_sigmas(20, abar, "trailing")
    assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-6) and torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas[0].item() == pytest.approx(4096.0) and ours.init_noise_sigma == pytest.approx(4096.0)


def test_heun_schedule_is_eulers_interleaved():
    for karras in (False, True):
        ref = HeunDiscreteScheduler(**SDXL, use_karras_sigmas=karras)
        ref.set_timesteps(12)
        ours = schedule_for("heun_karras" if karras else "heun", 12, ABAR)
        assert torch.equal(ref.sigmas[::2], ours.sigmas[:-1]) and ref.sigmas[-1] == ours.sigmas[-1] == 0
        assert (ref.timesteps[::2] - ours.timesteps).abs().max() <= 1e-4
        assert ours.init_noise_sigma == float(ref.init_noise_sigma)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_match(shift):
    for n in [1, 4, 28, 50]:
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(n)
        ours = flow_sigmas(n, shift)
        assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)


def test_sigma_to_t_matches_reference_and_inverts_the_schedule():
    ref = EulerDiscreteScheduler(**SDXL)
    train = ((1 - ABAR) / ABAR) ** 0.5
    log_sigmas = train.log().numpy()
    sig = torch.exp(torch.linspace(-5, 4, 97, dtype=torch.float64))  # beyond both ends too
    expected = torch.from_numpy(ref._sigma_to_t(sig.numpy(), log_sigmas))
    assert (sigma_to_t(sig, ABAR) - expected).abs().max() < 1e-4
    ts = torch.tensor([0.0, 1.0, 57.0, 500.0, 998.0, 999.0])
    assert (sigma_to_t(train[ts.long()], ABAR) - ts).abs().max() < 1e-3


def test_karras_formula_by_hand():
    s = karras_sigmas(3, 0.1, 10.0, rho=7.0)
    mid = ((10.0 ** (1 / 7) + 0.1 ** (1 / 7)) / 2) ** 7
    assert torch.allclose(s, torch.tensor([10.0, mid, 0.1], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------------------
# Samplers against the reference stepping loop


@pytest.mark.parametrize("spacing,steps,karras", [("leading", 30, False), ("trailing", 25, False),
                                                  ("linspace", 12, False), ("leading", 30, True),
                                                  ("trailing", 9, True)])
def test_euler(spacing, steps, karras):
    noise = noise_like()
    rec_ref, rec = Recorder(toy_model), Recorder(toy_model)
    ref = run_reference(EulerDiscreteScheduler(**{**SDXL, "timestep_spacing": spacing}, use_karras_sigmas=karras),
                        steps, noise, rec_ref)
    sched = get_sigmas(steps, ABAR, spacing, 1, karras)
    seen = []
    ours = run_ours("euler", steps, noise, rec, schedule=sched, callback=lambda i, x, den: seen.append(i))
    assert_match(ours, ref, rec, rec_ref)
    assert seen == list(range(steps))


def test_euler_v_prediction():
    noise = noise_like(1)
    ref = run_reference(EulerDiscreteScheduler(**{**SDXL, "prediction_type": "v_prediction"}), 20, noise, toy_model)
    assert_match(run_ours("euler", 20, noise, toy_model, "v_prediction"), ref)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_ancestral_same_generator(spacing):
    noise = noise_like(2)
    sched = EulerAncestralDiscreteScheduler(**{**SDXL, "timestep_spacing": spacing})
    g_ref = torch.Generator().manual_seed(7)
    ref = run_reference(sched, 20, noise, toy_model, generator=g_ref)
    ours_sched = get_sigmas(20, ABAR, spacing, 1)
    ours = run_ours("euler_ancestral", 20, noise, toy_model, schedule=ours_sched,
                    generator=torch.Generator().manual_seed(7))
    assert_match(ours, ref)
    # and the noise matters: another seed gives another result
    other = run_ours("euler_ancestral", 20, noise, toy_model, schedule=ours_sched,
                     generator=torch.Generator().manual_seed(8))
    assert (other - ref).abs().max() > 1e-2


@pytest.mark.parametrize("steps,karras", [(10, False), (7, True)])
def test_heun(steps, karras):
    noise = noise_like(3)
    rec_ref, rec = Recorder(toy_model), Recorder(toy_model)
    ref = run_reference(HeunDiscreteScheduler(**SDXL, use_karras_sigmas=karras), steps, noise, rec_ref)
    ours = run_ours("heun_karras" if karras else "heun", steps, noise, rec)
    assert_match(ours, ref, rec, rec_ref)
    assert len(rec.ts) == 2 * steps - 1


@pytest.mark.parametrize("prediction_type,steps", [("epsilon", 30), ("epsilon", 50), ("v_prediction", 20)])
def test_ddim_eta0(prediction_type, steps):
    noise = noise_like(4)
    rec_ref, rec = Recorder(toy_model), Recorder(toy_model)
    sched = DDIMScheduler(**{**SDXL, "prediction_type": prediction_type}, clip_sample=False, set_alpha_to_one=False)
    ref = run_reference(sched, steps, noise, rec_ref)
    assert_match(run_ours("ddim", steps, noise, rec, prediction_type), ref, rec, rec_ref)


def test_ddim_trailing_when_steps_divide_1000():
    noise = noise_like(5)
    sched = DDIMScheduler(**{**SDXL, "timestep_spacing": "trailing"}, clip_sample=False, set_alpha_to_one=False)
    ref = run_reference(sched, 25, noise, toy_model)
    ours_sched = schedule_for("ddim", 25, ABAR, spacing="trailing")
    assert_match(run_ours("ddim", 25, noise, toy_model, schedule=ours_sched), ref)


@pytest.mark.parametrize("feed", ["generator", "noise_sampler"])
def test_ddim_eta_positive(feed):
    noise, steps, eta = noise_like(6), 15, 0.7
    sched = DDIMScheduler(**SDXL, clip_sample=False, set_alpha_to_one=False)
    if feed == "generator":
        ref = run_reference(sched, steps, noise, toy_model, eta=eta, generator=torch.Generator().manual_seed(3))
        ours = run_ours("ddim", steps, noise, toy_model, eta=eta, generator=torch.Generator().manual_seed(3))
    else:
        noises = iter([noise_like(100 + i) for i in range(steps)])
        ref = run_reference(sched, steps, noise, toy_model, eta=eta, variance_noise=lambda: next(noises))
        noises = iter([noise_like(100 + i) for i in range(steps)])
        ours = run_ours("ddim", steps, noise, toy_model, eta=eta, noise_sampler=lambda s, sn: next(noises))
    assert_match(ours, ref)


@pytest.mark.parametrize("steps,karras,spacing", [(5, False, "leading"), (10, False, "leading"),
                                                  (20, False, "leading"), (30, False, "trailing"),
                                                  (8, True, "leading"), (25, True, "leading")])
def test_dpmpp_2m(steps, karras, spacing):
    noise = noise_like(7)
    rec_ref, rec = Recorder(toy_model), Recorder(toy_model)
    sched = DPMSolverMultistepScheduler(**{**SDXL, "timestep_spacing": spacing}, use_karras_sigmas=karras,
                                        algorithm_type="dpmsolver++", solver_order=2)
    ref = run_reference(sched, steps, noise, rec_ref)
    name = "dpmpp_2m_karras" if karras else "dpmpp_2m"
    ours = run_ours(name, steps, noise, rec, schedule=schedule_for(name, steps, ABAR, spacing=spacing))
    assert_match(ours, ref, rec, rec_ref)
    assert all(t == round(t) for t in rec.ts)  # the reference feeds integer timesteps, Karras ones rounded


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_final_sigma_min(steps):
    """final_sigmas_type="sigma_min": the last step is second order from 15 steps on (lower_order_final), and the
    result is the VP sample at sigma_min (final_scale)."""
    noise = noise_like(8)
    sched = DPMSolverMultistepScheduler(**SDXL, final_sigmas_type="sigma_min")
    ref = run_reference(sched, steps, noise, toy_model)
    ours_sched = schedule_for("dpmpp_2m", steps, ABAR, final="sigma_min")
    assert ours_sched.final_scale < 1
    assert_match(run_ours("dpmpp_2m", steps, noise, toy_model, schedule=ours_sched), ref)


def test_dpmpp_2m_v_prediction():
    noise = noise_like(9)
    sched = DPMSolverMultistepScheduler(**{**SDXL, "prediction_type": "v_prediction"}, use_karras_sigmas=True)
    ref = run_reference(sched, 12, noise, toy_model)
    assert_match(run_ours("dpmpp_2m_karras", 12, noise, toy_model, "v_prediction"), ref)


@pytest.mark.parametrize("steps,karras", [(12, False), (20, True)])
def test_dpmpp_2m_sde_same_generator(steps, karras):
    noise = noise_like(10)
    sched = DPMSolverMultistepScheduler(**SDXL, algorithm_type="sde-dpmsolver++", use_karras_sigmas=karras)
    ref = run_reference(sched, steps, noise, toy_model, generator=torch.Generator().manual_seed(11))
    name = "dpmpp_2m_sde_karras" if karras else "dpmpp_2m_sde"
    assert_match(run_ours(name, steps, noise, toy_model, generator=torch.Generator().manual_seed(11)), ref)


def test_dpmpp_2m_sde_fed_noise():
    noise, steps = noise_like(12), 16
    noises = [noise_like(200 + i) for i in range(steps)]
    it = iter(noises)
    sched = DPMSolverMultistepScheduler(**SDXL, algorithm_type="sde-dpmsolver++")
    ref = run_reference(sched, steps, noise, toy_model, variance_noise=lambda: next(it))
    it = iter(noises)
    fn, _ = resolve_sampler("dpmpp_2m_sde")
    assert fn is sample_dpmpp_2m_sde
    assert_match(run_ours("dpmpp_2m_sde", steps, noise, toy_model, noise_sampler=lambda s, sn: next(it)), ref)


# ------------------------------------------------------------------------------------------------------------
# Karras variants diffusers has no option for (ddim_karras, euler_ancestral_karras): oracle = formulas by hand


def hand_karras_schedule(n: int) -> tuple[torch.Tensor, float]:
    """float64 (n,) Karras sigmas (rho = 7) between the ends of SDXL's "leading" schedule (t_i = (n-1-i) (1000 // n)
    + 1, sigma_t = sqrt((1 - abar_t) / abar_t)), as diffusers' Euler use_karras_sigmas takes them; and sigma at t=0."""
    abar = ABAR.double()
    train = ((1 - abar) / abar) ** 0.5
    t = [(n - 1 - i) * (1000 // n) + 1 for i in range(n)]
    smax, smin = train[t[0]].item(), train[t[-1]].item()
    ramp = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7, train[0].item()


@pytest.mark.parametrize("name", ["ddim_karras", "euler_ancestral_karras"])
def test_karras_schedule_of_ddim_and_euler_ancestral_by_hand(name):
    """schedule_for(<name>_karras): Karras sigmas between the spaced schedule's ends, fractional timesteps that map
    back to those sigmas on the training schedule, DDIM ending at the training sigma_min and returning the VP sample."""
    log_train = (((1 - ABAR.double()) / ABAR.double()) ** 0.5).log()
    for n in [3, 4, 10, 30]:
        expected, sigma_min = hand_karras_schedule(n)
        sched = schedule_for(name, n, ABAR)
        # float32 sigmas vs float64 by hand: measured <= 1e-7 relative.
        assert torch.allclose(sched.sigmas[:-1].double(), expected, rtol=1e-6, atol=0), (name, n)
        plain = schedule_for(name.removesuffix("_karras"), n, ABAR)
        assert not torch.allclose(sched.sigmas[1:-2], plain.sigmas[1:-2], rtol=1e-2)  # Karras is not the default
        # t is where the log-linear interpolation of the training sigmas gives sigma back (sigma_to_t's float32
        # logs: measured <= 2e-7 relative in sigma).
        log_sigma_at_t = torch.from_numpy(np.interp(sched.timesteps.double().numpy(), np.arange(1000),
                                                    log_train.numpy()))
        assert torch.allclose(log_sigma_at_t.exp(), expected, rtol=1e-5, atol=0), (name, n)
        assert sched.init_noise_sigma == pytest.approx((expected[0].item() ** 2 + 1) ** 0.5, rel=1e-6)  # leading
        if name == "ddim_karras":
            assert sched.sigmas[-1].item() == pytest.approx(sigma_min, rel=1e-6)
            assert sched.final_scale == pytest.approx(1 / (sigma_min**2 + 1) ** 0.5, rel=1e-6)
        else:
            assert sched.sigmas[-1] == 0 and sched.final_scale == 1.0


def linear_denoiser(x: torch.Tensor, sigma) -> torch.Tensor:
    """An analytic stand-in for a trained denoiser: the x0 estimate 0.9 x / (1 + sigma^2) + 0.05."""
    return 0.9 * x / (1 + sigma**2) + 0.05


@pytest.mark.parametrize("name,eta", [("euler_ancestral_karras", 1.0), ("euler_ancestral_karras", 0.5),
                                      ("ddim_karras", 0.0), ("ddim_karras", 0.6)])
def test_karras_ancestral_and_ddim_trajectory_by_hand(name, eta):
    """Ours over schedule_for(name) vs the published update written out here in float64 over hand Karras sigmas,
    with fixed per-step noise z_i. Euler ancestral: k-diffusion's sample_euler_ancestral. DDIM: Song et al. 2020,
    eq. 12, in its own VP form (abar = 1 / (1 + sigma^2), x_vp = x / sqrt(1 + sigma^2)), not the sigma-space
    ancestral step the implementation uses."""
    n = 4
    hand, sigma_min = hand_karras_schedule(n)
    sig = torch.cat([hand, hand.new_tensor([sigma_min if name == "ddim_karras" else 0.0])])
    z = [noise_like(300 + i).double() for i in range(n)]
    unit = noise_like(30)

    sched = schedule_for(name, n, ABAR)
    fn, karras = resolve_sampler(name)
    assert karras
    step_of = {float(s): i for i, s in enumerate(sched.sigmas[:-1])}  # z_i by step, however often it is drawn
    ours = fn(linear_denoiser, unit * sched.init_noise_sigma, sched.sigmas, eta=eta,
              noise_sampler=lambda s, s_next: z[step_of[float(s)]].float()) * sched.final_scale

    if name == "euler_ancestral_karras":
        x = unit.double() * (sig[0] ** 2 + 1) ** 0.5
        for i in range(n):
            s, s_next = sig[i], sig[i + 1]
            sigma_up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
            sigma_down = (s_next**2 - sigma_up**2) ** 0.5
            d = (x - linear_denoiser(x, s)) / s
            x = x + d * (sigma_down - s)
            if s_next > 0:
                x = x + z[i] * sigma_up
        expected = x
    else:
        abar = 1 / (1 + sig**2)
        x_vp = unit.double()  # DDIM starts from unit-variance noise
        for i in range(n):
            a, a_prev = abar[i], abar[i + 1]
            x0 = linear_denoiser(x_vp / a.sqrt(), sig[i])  # the denoiser sees the sigma-scale sample
            eps = (x_vp - a.sqrt() * x0) / (1 - a).sqrt()
            std = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
            x_vp = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps + std * z[i]
        expected = x_vp
    # float32 sampler vs float64 by hand: measured <= 3e-7 relative.
    assert rel_err(expected, ours) <= 1e-5
    if eta:  # the noise is used: other z give another result
        assert rel_err(expected, fn(linear_denoiser, unit * sched.init_noise_sigma, sched.sigmas, eta=eta,
                                    noise_sampler=lambda s, s_next: -z[step_of[float(s)]].float())) > 1e-2


def flow_model(x, t):
    return toy_model(x, t) - 0.3 * x


@pytest.mark.parametrize("name,cls,shift,steps", [("euler", FlowMatchEulerDiscreteScheduler, 1.0, 20),
                                                  ("euler", FlowMatchEulerDiscreteScheduler, 3.0, 28),
                                                  ("heun", FlowMatchHeunDiscreteScheduler, 1.0, 10),
                                                  ("heun", FlowMatchHeunDiscreteScheduler, 3.0, 10)])
def test_flow(name, cls, shift, steps):
    noise = noise_like(13)
    rec_ref, rec = Recorder(flow_model), Recorder(flow_model)
    sched = cls(shift=shift)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(rec_ref(x, t), t, x).prev_sample
    ours_sched = schedule_for(name, steps, None, shift=shift)  # alphas_cumprod None: the flow scale
    den = make_denoiser(rec, None, "flow", ours_sched)
    ours = resolve_sampler(name)[0](den, noise * ours_sched.init_noise_sigma, ours_sched.sigmas)
    assert_match(ours, x, rec, rec_ref)


@pytest.mark.parametrize("with_schedule", [True, False])
def test_flow_x0_prediction_euler_matches_closed_form(with_schedule):
    """("sample", None): a flow-scale net that predicts x0, fed x as is at t = 1000 s. Oracle: flow Euler written
    out in float64, x_{i+1} = x_i + (s_{i+1} - s_i) (x_i - x0_i) / s_i, x0_i = net(x_i, 1000 s_i)."""
    net = Recorder(toy_model)  # read as an x0 prediction
    sched = flow_sigmas(8, shift=3.0)
    x = noise_like(30)
    den = make_denoiser(net, None, "sample", sched if with_schedule else None)
    trajectory = []
    ours = sample_euler(den, x, sched.sigmas, callback=lambda i, x_i, d: trajectory.append(x_i))
    s, expected = sched.sigmas.double(), x.double()
    for i in range(8):
        x0 = toy_model(expected.float(), 1000 * s[i].float()).double()
        expected = expected + (s[i + 1] - s[i]) * (expected - x0) / s[i]
        assert rel_err(expected, trajectory[i]) <= 1e-5, i  # measured 1.3e-7
    assert torch.equal(ours, trajectory[-1])
    assert max(abs(t - 1000 * float(si)) for t, si in zip(net.ts, s)) < 1e-3
    # The same net read as a velocity ("flow") is another sampler: the prediction type was honoured.
    assert rel_err(expected, sample_euler(make_denoiser(toy_model, None, "flow", sched), x, sched.sigmas)) > 0.1


def test_denoiser_without_schedule_interpolates_t():
    """Off-schedule sigmas fall back to sigma_to_t; an x0-predicting model gives its prediction back."""
    seen = []
    den = make_denoiser(lambda x, t: seen.append(float(t)) or torch.full_like(x, 0.25), ABAR, "sample")
    sigma = ((1 - ABAR[400]) / ABAR[400]) ** 0.5
    x = noise_like()
    assert torch.equal(den(x, sigma), torch.full_like(x, 0.25))
    assert abs(seen[0] - 400) < 1e-3
    with pytest.raises(ValueError, match="alphas_cumprod"):
        make_denoiser(toy_model, None, "epsilon")
    with pytest.raises(ValueError, match="unknown prediction_type 'eps'"):
        make_denoiser(toy_model, ABAR, "eps")


# ------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_cfg_matches_pipeline_arithmetic_and_rescale():
    x, t = noise_like(20), torch.tensor(500.0)
    cond_fn = lambda x, t: toy_model(x, t)  # noqa: E731
    uncond_fn = lambda x, t: 0.5 * toy_model(x, t) - 0.1  # noqa: E731
    c, u = cond_fn(x, t), uncond_fn(x, t)
    plain = cfg_denoiser(cond_fn, uncond_fn, 5.0)(x, t)
    assert torch.allclose(plain, u + 5.0 * (c - u), atol=1e-6)
    ref = rescale_noise_cfg(u + 5.0 * (c - u), c, guidance_rescale=0.7)
    ours = cfg_denoiser(cond_fn, uncond_fn, 5.0, rescale=0.7)(x, t)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_cfg_batched_equals_separate_and_calls_once():
    calls = []
    cond_fn = lambda x, t: toy_model(x, t)  # noqa: E731
    uncond_fn = lambda x, t: toy_model(-x, t)  # noqa: E731

    def batched(x2, t):  # [uncond; cond] in one call, as the pipeline's UNet call with cat([neg, pos]) contexts
        calls.append(x2.shape[0])
        x_u, x_c = x2.chunk(2)
        return torch.cat([uncond_fn(x_u, t), cond_fn(x_c, t)])
    x, t = noise_like(21), torch.tensor(300.0)
    sep = cfg_denoiser(cond_fn, uncond_fn, 7.5, rescale=0.3)(x, t)
    bat = cfg_denoiser(cond_fn, scale=7.5, batched_fn=batched, rescale=0.3)(x, t)
    assert torch.allclose(sep, bat, atol=1e-6) and calls == [2 * SHAPE[0]]


def test_cfg_interval_and_scale_one():
    cond_fn = lambda x, t: toy_model(x, t)  # noqa: E731
    uncond_fn = lambda x, t: torch.zeros_like(x)  # noqa: E731
    g = cfg_denoiser(cond_fn, uncond_fn, 3.0, interval=(100.0, 800.0))
    x = noise_like(22)
    for t, guided in [(50.0, False), (100.0, True), (500.0, True), (800.0, True), (900.0, False)]:
        c = cond_fn(x, torch.tensor(t))
        assert torch.allclose(g(x, torch.tensor(t)), 3.0 * c if guided else c, atol=1e-6), t
    assert torch.equal(cfg_denoiser(cond_fn, scale=1.0)(x, torch.tensor(1.0)), cond_fn(x, torch.tensor(1.0)))
    with pytest.raises(ValueError, match="uncond_fn or batched_fn"):
        cfg_denoiser(cond_fn, scale=2.0)


def test_cfg_guided_denoiser_in_a_full_run_matches_reference_with_rescale():
    """The pipeline pattern end to end: batched CFG + rescale on the eps output, Euler, vs diffusers' loop."""
    cond_fn = lambda x, t: toy_model(x, t)  # noqa: E731
    uncond_fn = lambda x, t: toy_model(0.8 * x, t) * 0.9  # noqa: E731

    def ref_model(x_in, t):
        c, u = cond_fn(x_in, t), uncond_fn(x_in, t)
        return rescale_noise_cfg(u + 6.0 * (c - u), c, guidance_rescale=0.5)
    noise = noise_like(23)
    ref = run_reference(EulerDiscreteScheduler(**SDXL), 15, noise, ref_model)
    ours = run_ours("euler", 15, noise, cfg_denoiser(cond_fn, uncond_fn, 6.0, rescale=0.5))
    assert_match(ours, ref)


# ------------------------------------------------------------------------------------------------------------
# Names


def test_resolve_sampler_names():
    assert resolve_sampler("dpmpp_2m_karras") == (SAMPLERS["dpmpp_2m"], True)
    assert resolve_sampler("euler") == (SAMPLERS["euler"], False)
    assert resolve_sampler("ddim")[0] is sample_ddim
    with pytest.raises(ValueError, match="unknown sampler 'eulr'.*dpmpp_2m_karras"):
        resolve_sampler("eulr")
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        get_sigmas(10, ABAR, "leadin")
    with pytest.raises(ValueError, match="num_steps"):
        get_sigmas(0, ABAR)
    for name in ("dpmpp_2m", "euler_karras"):  # no flow-scale form
        with pytest.raises(ValueError, match=f"sampler '{name}' needs alphas_cumprod"):
            schedule_for(name, 10)

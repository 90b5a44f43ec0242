"""Schedules, parameterisations, loss weights and timestep sampling against diffusers and hand computations."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as ref_rescale_zero_terminal_snr
from diffusers.training_utils import compute_snr

from sdxl import diffusion as D

SDXL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------
# Schedules


def test_scaled_linear_schedule_matches_ddpm_and_euler():
    ref = DDPMScheduler(**SDXL)
    abar = D.get_alphas_cumprod()
    assert abar.dtype == torch.float32 and abar.shape == (1000,)
    assert torch.equal(D.get_betas(), ref.betas)
    assert torch.equal(abar, ref.alphas_cumprod)
    # the formula by hand at both ends
    assert D.get_betas()[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert D.get_betas()[-1].item() == pytest.approx(0.012, rel=1e-6)
    euler = EulerDiscreteScheduler(**SDXL)
    assert torch.equal(D.sigmas_from_alphas_cumprod(abar).flip(0), euler.sigmas[:-1])
    assert D.sigmas_from_alphas_cumprod(abar)[-1].item() == pytest.approx(14.6146, abs=1e-4)  # SDXL's sigma_max


def test_linear_schedule_matches_ddpm():
    ref = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert torch.equal(D.get_alphas_cumprod("linear", beta_start=1e-4, beta_end=0.02), ref.alphas_cumprod)
    with pytest.raises(ValueError, match="unknown beta schedule 'cosine'"):
        D.get_betas("cosine")


def test_zero_terminal_snr_matches_diffusers():
    betas = D.get_betas()
    ours, ref = D.rescale_zero_terminal_snr(betas), ref_rescale_zero_terminal_snr(betas.clone())
    assert torch.allclose(ours, ref, atol=1e-7, rtol=0)
    abar = D.get_alphas_cumprod(zero_terminal_snr=True)
    assert torch.allclose(abar, DDPMScheduler(**SDXL, rescale_betas_zero_snr=True).alphas_cumprod, atol=1e-7, rtol=0)
    # the paper's two conditions: the last abar is 0, the first is unchanged
    assert abar[-1].item() == pytest.approx(0.0, abs=1e-7)
    assert abar[0].item() == pytest.approx(D.get_alphas_cumprod()[0].item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Parameterisations


def test_conversions_by_hand():
    # abar = 0.64: sqrt(abar) = 0.8, sqrt(1 - abar) = 0.6; x0 = 1, eps = 2
    x0, eps = torch.tensor(1.0), torch.tensor(2.0)
    x_t = D.add_noise(x0, eps, 0.64)
    v = D.v_target(x0, eps, 0.64)
    assert x_t.item() == pytest.approx(0.8 * 1 + 0.6 * 2)  # 2.0
    assert v.item() == pytest.approx(0.8 * 2 - 0.6 * 1)  # 1.0
    assert D.to_x0(eps, x_t, 0.64, "epsilon").item() == pytest.approx(1.0)
    assert D.to_x0(v, x_t, 0.64, "v_prediction").item() == pytest.approx(0.8 * 2.0 - 0.6 * 1.0)
    assert D.to_eps(v, x_t, 0.64, "v_prediction").item() == pytest.approx(0.8 * 1.0 + 0.6 * 2.0)
    assert D.to_eps(x0, x_t, 0.64, "sample").item() == pytest.approx((2.0 - 0.8) / 0.6)


def test_conversions_round_trip_per_sample_abar():
    x0, eps = randn(3, 4, 5, 5, seed=1), randn(3, 4, 5, 5, seed=2)
    abar = torch.tensor([0.999, 0.5, 0.01])  # one per batch row
    x_t = D.add_noise(x0, eps, abar)
    v = D.v_target(x0, eps, abar)
    for kind, pred in [("epsilon", eps), ("v_prediction", v), ("sample", x0)]:
        assert torch.allclose(D.to_x0(pred, x_t, abar, kind), x0, atol=1e-4), kind
        assert torch.allclose(D.to_eps(pred, x_t, abar, kind), eps, atol=1e-4), kind
        assert torch.equal(D.training_target(x0, eps, abar, kind), pred)
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        D.to_x0(eps, x_t, abar, "flow")


def test_add_noise_and_velocity_match_ddpm_scheduler():
    ref = DDPMScheduler(**SDXL)
    x0, eps = randn(4, 4, 6, 6, seed=3), randn(4, 4, 6, 6, seed=4)
    t = torch.tensor([0, 250, 700, 999])
    abar = D.get_alphas_cumprod()[t]
    assert torch.allclose(D.add_noise(x0, eps, abar), ref.add_noise(x0, eps, t), atol=1e-6)
    assert torch.allclose(D.v_target(x0, eps, abar), ref.get_velocity(x0, eps, t), atol=1e-6)


def test_min_snr_weights():
    # by hand: abar 0.8 -> SNR 4, abar 0.9 -> SNR 9; gamma 5
    s = torch.tensor([4.0, 9.0], dtype=torch.float64)
    assert torch.allclose(D.min_snr_weight(s, 5.0, "epsilon"), torch.tensor([1.0, 5 / 9], dtype=torch.float64))
    assert torch.allclose(D.min_snr_weight(s, 5.0, "v_prediction"), torch.tensor([4 / 5, 5 / 10], dtype=torch.float64))
    assert torch.allclose(D.min_snr_weight(s, 5.0, "sample"), torch.tensor([4.0, 5.0], dtype=torch.float64))
    # SNR = 0 (zero-terminal-SNR's last step): the eps weight's limit 1, not 0/0
    zero = torch.tensor([0.0])
    assert D.min_snr_weight(zero, 5.0, "epsilon").item() == 1.0
    assert D.min_snr_weight(zero, 5.0, "v_prediction").item() == 0.0
    # against diffusers' compute_snr + the weighting of its SDXL training script
    ref = DDPMScheduler(**SDXL)
    t = torch.tensor([0, 10, 300, 600, 999])
    ref_snr = compute_snr(ref, t)
    abar = D.get_alphas_cumprod()[t]
    ours = abar / (1 - abar)  # SNR as the loop computes it for min_snr_weight
    assert torch.allclose(ours, ref_snr, rtol=1e-5)
    base = torch.stack([ref_snr, 5.0 * torch.ones_like(ref_snr)], dim=1).min(dim=1)[0]
    assert torch.allclose(D.min_snr_weight(ours, 5.0, "epsilon"), base / ref_snr, rtol=1e-5)
    assert torch.allclose(D.min_snr_weight(ours, 5.0, "v_prediction"), base / (ref_snr + 1), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Flow matching and timestep sampling


def test_shift_formula():
    assert D.shift_sigma(0.5, 3.0) == pytest.approx(1.5 / 2.0)  # 0.75
    s = torch.linspace(0, 1, 11)
    shifted = D.shift_sigma(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted >= s).all()
    assert torch.equal(D.shift_sigma(s, 1.0), s)
    # diffusers' training sigmas are the shifted linspace
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert torch.allclose(ref.sigmas, D.shift_sigma(torch.linspace(1000, 1, 1000) / 1000, 3.0), atol=1e-6)


def test_logit_normal_statistics_and_determinism():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    s = D.sample_timesteps(20000, "logit_normal", mean=0.5, std=0.8, num_train_timesteps=None, generator=g())
    assert s.shape == (20000,) and 0 < s.min() and s.max() < 1
    z = torch.logit(s.double())
    assert z.mean().item() == pytest.approx(0.5, abs=0.03) and z.std().item() == pytest.approx(0.8, abs=0.03)
    again = D.sample_timesteps(20000, "logit_normal", mean=0.5, std=0.8, num_train_timesteps=None, generator=g())
    assert torch.equal(s, again)
    # shift moves mass toward high noise, exactly by the shift formula
    shifted = D.sample_timesteps(20000, "logit_normal", mean=0.5, std=0.8, shift=3.0, num_train_timesteps=None,
                                 generator=g())
    assert torch.allclose(shifted, D.shift_sigma(s, 3.0), atol=1e-6)
    # a t_range rescales into [a, b]
    ranged = D.sample_timesteps(1000, num_train_timesteps=None, t_range=(0.2, 0.4), generator=g())
    assert 0.2 <= ranged.min() and ranged.max() <= 0.4


def test_discrete_timesteps():
    g = torch.Generator().manual_seed(1)
    t = D.sample_timesteps(50000, generator=g)
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=5)
    t = D.sample_timesteps(5000, "logit_normal", t_range=(200, 800), generator=g)
    assert 200 <= t.min() and t.max() < 800
    assert t.float().mean().item() == pytest.approx(500, abs=10)  # logit-normal(0, 1) is symmetric about 1/2
    # tails of a wide logit-normal hit both ends without leaving [a, b)
    t = D.sample_timesteps(5000, "logit_normal", std=8.0, t_range=(10, 20), generator=g)
    assert t.min() == 10 and t.max() == 19
    with pytest.raises(ValueError, match="t_range"):
        D.sample_timesteps(4, t_range=(0, 1001))
    with pytest.raises(ValueError, match="unknown timestep sampling mode"):
        D.sample_timesteps(4, "cosmap")

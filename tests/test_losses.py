"""Losses, timestep bias and stochastic rounding (issue 17 items 4 and 6), against hand computations written out here:
kohya's conditional_loss (pseudo-Huber / smooth L1) and get_huber_threshold_if_needed (constant / exponential / snr),
kohya's apply_debiased_estimation, diffusers' generate_timestep_weights (train_text_to_image_sdxl.py, an example
script diffusers does not install: its formula is re-derived below), and bf16 neighbours found with nextafter."""
from __future__ import annotations

import hashlib
import math
from decimal import Decimal, getcontext

import pytest
import torch
from conftest import train_args
from test_sync import Guard

import sdxl
import train_sdxl
from sdxl import diffusion
from sdxl.diffusion import DDPMObjective, TimestepBias
from sdxl.pixel import JiTObjective
from training import loop, stochastic_rounding

T = 1000


def abar64() -> torch.Tensor:
    """SDXL's scaled-linear schedule in float64, by hand."""
    return torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2, 0)


def fake_net(x_t, t, *cond):
    return 0.3 * x_t + 0.1


def gens(seeds=(11, 12, 13)):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---- distances and their constant ------------------------------------------------------------------------------

def test_huber_and_smooth_l1_values_by_hand():
    # d = 0.3, c = 0.1: sqrt(0.09 + 0.01) - 0.1 = 0.2162277660; d = 4, c = 3: sqrt(16 + 9) - 3 = 2.
    d, c = torch.tensor([[0.3], [4.0], [0.0], [-4.0]]), torch.tensor([0.1, 3.0, 0.1, 3.0])
    huber = diffusion.elementwise_loss(d, "huber", c).flatten()
    smooth = diffusion.elementwise_loss(d, "smooth_l1", c).flatten()
    torch.testing.assert_close(huber, torch.tensor([2 * 0.1 * 0.2162277660, 12.0, 0.0, 12.0]))
    torch.testing.assert_close(smooth, torch.tensor([2 * 0.2162277660, 4.0, 0.0, 4.0]))
    torch.testing.assert_close(diffusion.elementwise_loss(d, "l2"), d**2)
    # kohya's form 2 c (sqrt(d^2 + c^2) - c) to 40 digits (it cancels even in float64 at |d| = 1e-6), over many
    # magnitudes: the stable form keeps float32 accuracy where the naive float32 one is off by 100%.
    getcontext().prec = 40
    d = torch.logspace(-6, 2, 120) * torch.where(torch.arange(120) % 2 == 0, 1.0, -1.0)
    for cv in (0.1, 1.0):
        c_ = Decimal(cv)
        want = torch.tensor([float(2 * c_ * ((Decimal(x) ** 2 + c_**2).sqrt() - c_)) for x in d.double().tolist()],
                            dtype=torch.float64)
        got = diffusion.elementwise_loss(d, "huber", cv).double()
        assert ((got - want).abs() / want).max() < 1e-6


def test_huber_c_schedules_match_kohya():
    """kohya: exponential exp(-alpha t), alpha = -log(c) / T; snr (1 - c) / (1 + sigma_t)^2 + c; constant c."""
    c, t = 0.1, torch.tensor([0, 1, 250, 500, 999])
    sigma = ((1 - abar64()[t]) / abar64()[t]).sqrt()
    alpha = -math.log(c) / T
    want = {"constant": torch.full((5,), c, dtype=torch.float64), "exponential": torch.exp(-alpha * t.double()),
            "snr": (1 - c) / (1 + sigma) ** 2 + c}
    for name, w in want.items():
        got = diffusion.huber_c_schedule(name, c, t / T, sigma.float())
        torch.testing.assert_close(got.double(), w, rtol=2e-6, atol=0)
    assert want["exponential"][0] == 1 and (want["snr"].diff() < 0).all() and c < want["snr"].min() < 0.11


def hand_ddpm(x0, seeds, prediction_type, loss, weight):
    """Per-sample loss by hand: the draws of DDPMObjective.noisy (noise, then t = floor(1000 u)), fake_net."""
    out, abar_all = [], abar64()
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        noise = torch.randn(x0.shape[1:], generator=g).double()
        t = int(torch.rand(1, generator=g).item() * T)
        a = abar_all[t].float().double()  # the objective reads the float32 table
        x_t = a.sqrt() * x0[i].double() + (1 - a).sqrt() * noise
        target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0[i].double()}
        d = 0.3 * x_t + 0.1 - target[prediction_type]
        snr = a / (1 - a)
        out.append(loss(d, t, snr).mean() * weight(snr))
    return torch.stack(out)


@pytest.mark.parametrize("loss_type,schedule,prediction_type", [
    ("huber", "snr", "epsilon"), ("smooth_l1", "exponential", "v_prediction"), ("huber", "constant", "epsilon")])
def test_ddpm_objective_huber_by_hand(loss_type, schedule, prediction_type):
    c, x0, seeds = 0.2, torch.randn(3, 4, 4, 4), (11, 12, 13)
    obj = DDPMObjective(diffusion.get_alphas_cumprod(), prediction_type, loss_type, huber_c=c,
                        huber_schedule=schedule)

    def kohya(d, t, snr):
        sigma = (1 / snr).sqrt()
        cc = {"constant": c, "exponential": math.exp(math.log(c) / T * t), "snr": (1 - c) / (1 + sigma) ** 2 + c}
        cc = cc[schedule]
        smooth_l1 = 2 * ((d**2 + cc**2).sqrt() - cc)
        return cc * smooth_l1 if loss_type == "huber" else smooth_l1
    got = obj.loss(fake_net, x0, (), gens(seeds))
    torch.testing.assert_close(got.double(), hand_ddpm(x0, seeds, prediction_type, kohya, lambda s: 1.0),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_by_hand(prediction_type):
    """kohya: snr = min(snr, 1000); weight 1 / sqrt(snr) (epsilon), 1 / (snr + 1) (v); after Min-SNR-gamma."""
    snr = torch.tensor([0.01, 1.0, 999.0, 5000.0])
    want = {"epsilon": [10.0, 1.0, 999**-0.5, 1000**-0.5], "v_prediction": [1 / 1.01, 0.5, 1 / 1000, 1 / 1001]}
    torch.testing.assert_close(diffusion.debiased_weight(snr, prediction_type), torch.tensor(want[prediction_type]))
    x0, seeds, gamma = torch.randn(3, 4, 4, 4), (21, 22, 23), 5.0
    obj = DDPMObjective(diffusion.get_alphas_cumprod(), prediction_type, min_snr_gamma=gamma,
                        debiased_estimation=True)

    def weight(s):
        s_cap = min(s, 1000.0)
        debias = s_cap**-0.5 if prediction_type == "epsilon" else 1 / (s_cap + 1)
        min_snr = min(s, gamma) / s if prediction_type == "epsilon" else min(s, gamma) / (s + 1)
        return min_snr * debias
    want = hand_ddpm(x0, seeds, prediction_type, lambda d, t, s: d**2, weight)
    torch.testing.assert_close(obj.loss(fake_net, x0, (), gens(seeds)).double(), want, rtol=1e-5, atol=0)
    assert abar64()[0] / (1 - abar64()[0]) > 1000  # t = 0 is where the cap acts


def test_debiased_epsilon_refuses_zero_terminal_snr():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DDPMObjective(diffusion.get_alphas_cumprod(zero_terminal_snr=True), "epsilon", debiased_estimation=True)
    DDPMObjective(diffusion.get_alphas_cumprod(zero_terminal_snr=True), "v_prediction", debiased_estimation=True)


def test_pixel_objective_huber_by_hand():
    """JiT: d = (x - x_pred) / max(1 - t, t_eps); c over s = 1 - t (exponential c^s) and sigma = (1 - t) / t."""
    x, c = torch.randn(2, 3, 8, 8), 0.3
    for schedule in ("exponential", "snr"):
        obj = JiTObjective(loss_type="smooth_l1", huber_c=c, huber_schedule=schedule)
        z, t = obj.noisy(x, gens((1, 2)))
        got = obj.loss(fake_net, x, (), gens((1, 2)))
        for i in range(2):
            ti = t[i].double()
            d = (x[i].double() - (0.3 * z[i].double() + 0.1)) / max(1 - ti, 0.05)
            cc = c ** (1 - ti) if schedule == "exponential" else (1 - c) / (1 + (1 - ti) / ti) ** 2 + c
            torch.testing.assert_close(got[i].double(), (2 * ((d**2 + cc**2).sqrt() - cc)).mean(), rtol=1e-5, atol=0)
    model = sdxl.load_model("pixel-tiny")
    assert model.objective(loss_type="huber", huber_c=c).loss_type == "huber"
    assert model.objective(loss_type="native").loss_type == "l2"
    with pytest.raises(ValueError, match="already"):
        model.objective(loss_type="velocity")


# ---- timestep bias -------------------------------------------------------------------------------------------

def diffusers_generate_timestep_weights(strategy, multiplier, begin, end, portion, num_timesteps=T):
    """diffusers' generate_timestep_weights (examples/text_to_image/train_text_to_image_sdxl.py), re-derived."""
    weights = torch.ones(num_timesteps)
    num_to_bias = int(portion * num_timesteps)
    if strategy == "later":
        bias_indices = slice(-num_to_bias, None)
    elif strategy == "earlier":
        bias_indices = slice(0, num_to_bias)
    elif strategy == "range":
        bias_indices = slice(begin, end)
    else:
        return weights
    weights[bias_indices] *= multiplier
    weights /= weights.sum()
    return weights


@pytest.mark.parametrize("args", [("later", 2.0, 0, 1000, 0.25), ("earlier", 3.5, 0, 1000, 0.1),
                                  ("range", 0.5, 200, 500, 0.25), ("none", 2.0, 0, 1000, 0.25)])
def test_timestep_bias_weights_match_diffusers(args):
    torch.testing.assert_close(TimestepBias(*args).weights(), diffusers_generate_timestep_weights(*args),
                               rtol=0, atol=0)


def test_biased_draws_follow_the_weights_inside_the_range():
    n, g = 40000, torch.Generator().manual_seed(0)
    # later 25% x 3 within t_range [100, 900): weights 1 on [100, 750), 3 on [750, 900) -> P(t >= 750) = 450 / 1100.
    cdf = diffusion.timestep_cdf(TimestepBias("later", 3.0).weights(), (100, 900))
    t = diffusion.sample_timesteps(n, t_range=(100, 900), generator=g, cdf=cdf)
    assert t.min() >= 100 and t.max() <= 899
    p = 450 / 1100
    assert abs((t >= 750).float().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5
    hist = torch.bincount(t, minlength=T).double()
    assert hist[100:750].std() / hist[100:750].mean() < 0.25 and hist[750:900].mean() / hist[100:750].mean() == \
        pytest.approx(3.0, rel=0.05)
    # a multiplier of 1 draws exactly the unweighted timesteps from the same generator states
    flat = diffusion.timestep_cdf(TimestepBias("range", 1.0, 10, 20).weights(), (37, 811))
    plain = diffusion.sample_timesteps(5000, t_range=(37, 811), generator=torch.Generator().manual_seed(1))
    same = diffusion.sample_timesteps(5000, t_range=(37, 811), generator=torch.Generator().manual_seed(1), cdf=flat)
    assert torch.equal(plain, same)


def test_biased_objective_draws_per_sample_without_host_reads(monkeypatch):
    """Each sample's t from its own generator (noise first), inverse-CDF on the device: no tensor read back."""
    bias = TimestepBias("earlier", 4.0, portion=0.5)
    obj = DDPMObjective(diffusion.get_alphas_cumprod(), loss_type="huber", debiased_estimation=True,
                        t_range=(0, 800), timestep_bias=bias)
    x0, seeds, guard = torch.randn(3, 4, 4, 4), (5, 6, 7), Guard(monkeypatch)
    with guard.active():
        _, t, _, _ = obj.noisy(x0, gens(seeds))
        obj.loss(fake_net, x0, (), gens(seeds))
    assert guard.seen == []
    w = TimestepBias("earlier", 4.0, portion=0.5).weights()[:800].double().cumsum(0)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        torch.randn(x0.shape[1:], generator=g)
        u = torch.rand(1, generator=g).double().item()
        assert int(t[i]) == int((w <= u * w[-1]).sum())  # the first step whose cumulative weight exceeds u


# ---- stochastic rounding ---------------------------------------------------------------------------------------

def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each x (equal when x is one), via round-to-nearest and nextafter."""
    near = x.to(torch.bfloat16)
    up = torch.nextafter(near, torch.full_like(near, math.inf))
    down = torch.nextafter(near, torch.full_like(near, -math.inf))
    lo = torch.where(near.float() > x, down, near)
    hi = torch.where(near.float() < x, up, near)
    return lo.float(), hi.float()


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(64) * 10.0 ** torch.randint(-6, 4, (64,)), torch.tensor([1.0, -2.5, 0.0, 3.0])])
    lo, hi = neighbours(x)
    draws = torch.stack([stochastic_rounding.stochastic_round(x, g).float() for _ in range(3000)])
    assert ((draws == lo) | (draws == hi)).all()
    assert (draws[:, -4:] == x[-4:]).all()  # exact bf16 values stay
    gap = (hi - lo).clamp(min=1e-38)
    p_up = ((x - lo) / gap).where(hi > lo, torch.zeros_like(x))
    freq = (draws == hi).float().mean(0).where(hi > lo, torch.zeros_like(x))
    assert ((freq - p_up).abs() <= 4 * (p_up * (1 - p_up) / 3000).sqrt() + 1e-3).all()
    assert ((draws.double().mean(0) - x.double()).abs() <= 4 * gap.double() * (0.25 / 3000) ** 0.5 + 1e-30).all()


def test_stochastic_rounding_step_keeps_small_updates_on_average():
    """SGD, update 1e-4 on weights near 1 (half a bf16 ulp is 2^-8 ~ 3.9e-3): a plain bf16 step loses it, the
    rounded fp32 step keeps it in expectation; each result is a neighbour of the fp32 result."""
    w0 = torch.full((4096,), 1.0 + 2**-7, dtype=torch.bfloat16)
    plain = torch.nn.Parameter(w0.clone())
    plain.grad = torch.full_like(plain, 1.0)
    torch.optim.SGD([plain], lr=1e-4).step()
    assert torch.equal(plain.detach(), w0)
    p = torch.nn.Parameter(w0.clone())
    storage = p.data.data_ptr()
    p.grad = torch.full_like(p, 1.0)
    stochastic_rounding.step(torch.optim.SGD([p], lr=1e-4), torch.Generator().manual_seed(0))
    exact = w0.float() - 1e-4
    lo, hi = neighbours(exact)
    got = p.detach().float()
    assert p.dtype == torch.bfloat16 and p.data.data_ptr() == storage and p.grad.dtype == torch.bfloat16
    assert ((got == lo) | (got == hi)).all()
    assert got.double().mean().item() == pytest.approx(exact[0].item(), abs=4e-5)  # the gap is 7.8e-3, p ~ 1.3%


def test_stochastic_rounding_adamw_state_stays_bf16_and_chunks_do_not_matter():
    torch.manual_seed(0)
    w, grads = torch.randn(3, 40, 30), torch.randn(2, 3, 40, 30)

    def run(chunk):
        ps = [torch.nn.Parameter(w[i].to(torch.bfloat16)) for i in range(3)]
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
        g = torch.Generator().manual_seed(5)
        for k in range(2):
            for i, p in enumerate(ps):
                p.grad = grads[k, i].to(torch.bfloat16)
            stochastic_rounding.step(opt, g, chunk=chunk)
        return ps, opt
    (ps, opt), (ps1, opt1) = run(stochastic_rounding.CHUNK), run(1)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps1))
    assert all(torch.equal(opt.state[a]["exp_avg_sq"], opt1.state[b]["exp_avg_sq"]) for a, b in zip(ps, ps1))
    # one step against fp32 AdamW from the same bf16 start: a neighbour of its weights and of its first moment
    p32 = torch.nn.Parameter(w[0].to(torch.bfloat16).float())
    p32.grad = grads[0, 0].to(torch.bfloat16).float()
    ref = torch.optim.AdamW([p32], lr=1e-3, fused=True)
    ref.step()
    p = torch.nn.Parameter(w[0].to(torch.bfloat16))
    p.grad = grads[0, 0].to(torch.bfloat16)
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    stochastic_rounding.step(opt, torch.Generator().manual_seed(1))
    for got, want in ((p.detach(), p32.detach()), (opt.state[p]["exp_avg"], ref.state[p32]["exp_avg"])):
        assert got.dtype == torch.bfloat16
        lo, hi = neighbours(want)
        assert ((got.float() == lo) | (got.float() == hi)).all()


# ---- the command line ------------------------------------------------------------------------------------------

def test_loss_options_reach_the_objective_and_rounding_runs_each_step(train_data, tmp_path, monkeypatch):
    seen, steps = [], []
    real_loss, real_step = DDPMObjective.loss, stochastic_rounding.step
    monkeypatch.setattr(DDPMObjective, "loss", lambda self, *a, **k: (seen.append(self), real_loss(self, *a, **k))[1])
    monkeypatch.setattr(stochastic_rounding, "step", lambda opt, g, **k: (steps.append(g.initial_seed()),
                                                                           real_step(opt, g, **k))[1])
    monkeypatch.setattr(loop, "save_final", lambda *a, **kw: None)
    monkeypatch.setattr(loop, "memory_plan", lambda *a, **kw: "memory plan: not computed in this test")
    assert train_sdxl.main(train_args(
        train_data, tmp_path, "--max_steps", 1, "--loss_type", "huber", "--huber_c", 0.2, "--huber_schedule",
        "exponential", "--debiased_estimation", "--timestep_bias_strategy", "later", "--timestep_bias_multiplier",
        2, "--timestep_range", "0,900", "--precision", "bf16", "--full_bf16", "--stochastic_rounding",
        "--optimizer", "sgd", "--unet_train_blocks", "up")) == 0
    assert seen, "the latent bundle did not build sdxl.diffusion.DDPMObjective (sdxl/model.py's objective())"
    obj = seen[0]
    assert (obj.loss_type, obj.huber_c, obj.huber_schedule, obj.debiased_estimation, obj.t_range) == \
        ("huber", 0.2, "exponential", True, (0, 900))
    assert obj.timestep_bias == TimestepBias("later", 2.0, 0, 1000, 0.25)
    # the rounding's bits come from (seed, step), so a resumed run rounds the same way
    assert steps == [int.from_bytes(hashlib.blake2b(b"0:0:-1:0", digest_size=8).digest(), "little") >> 1]


@pytest.mark.parametrize("extra,message", [
    (["--huber_c", 0.2], "--huber_c given without --loss_type huber"),
    (["--loss_type", "huber", "--huber_c", 0], "--huber_c must be positive"),
    (["--timestep_bias_multiplier", 2], "--timestep_bias_multiplier given without --timestep_bias_strategy"),
    (["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", 0], "must be positive"),
    (["--timestep_bias_strategy", "range", "--timestep_bias_begin", 600, "--timestep_bias_end", 500], "begin < end"),
    (["--timestep_bias_strategy", "later", "--timestep_sampling", "logit_normal"], "reweights uniform"),
    (["--stochastic_rounding"], "needs --full_bf16"),
    (["--stochastic_rounding", "--full_bf16", "--precision", "bf16", "--optimizer", "prodigy"], "adamw, adafactor"),
    (["--pretrained_model", "pixel-tiny", "--debiased_estimation"], "does not apply to a pixel model"),
    (["--pretrained_model", "pixel-tiny", "--timestep_bias_strategy", "later"], "does not apply to a pixel model"),
])
def test_bad_loss_flags_exit_2(train_data, tmp_path, capsys, extra, message):
    assert train_sdxl.main(train_args(train_data, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

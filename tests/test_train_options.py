"""train_sdxl.py's precision, optimisation and objective flags change training the way the README says.

Each test runs the real loop in-process (train_sdxl.main, tiny preset, CPU) under a `Spy` that records without
changing what the loop computes: the model it loaded and its initial weights, the optimizer it built, and at every
optimizer step the raw gradients backward left (before unscaling and clipping), the gradients and learning rates
the optimizer step saw, and the weights before and after. The oracles are in the tests: update formulas written
out by hand, or the optimizer package applied directly to the recorded gradients; LR schedules by hand; the
zero-terminal-SNR schedule and the logit-normal draws by hand. For speed the spy skips the memory-plan printout
and the final weight files, which no test here reads.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

import sdxl
import train_sdxl
from sdxl.model import DDPMObjective
from training import loop

# Each resnet and each BasicTransformerBlock of the UNet: what --gradient_checkpointing recomputes (diffusers'
# granularity: a depth-10 transformer is recomputed block by block). The Transformer2D around them runs once.
CHECKPOINTED = re.compile(r"\.(resnets|transformer_blocks)\.\d+$")
ONCE = re.compile(r"\.attentions\.\d+$")


class Spy:
    """Wraps sdxl.load_model, loop.build_optimizer, loop.batch_inputs and the latent objective's loss; records,
    changes nothing (unless `loss` replaces the objective's loss)."""

    def __init__(self, monkeypatch, on_load=None, loss=None, snapshots=True):
        self.snapshots = snapshots  # False: record only the learning rates
        self.model = self.init = self.optimizer = None
        self.names: dict[int, str] = {}
        self.steps: list[dict] = []       # one per optimizer step: raw, grad, before, after, lr
        self.loss_calls: list[tuple] = []  # (batch, objective, x0, generators) of each micro-batch
        self._raw: dict[str, torch.Tensor] = {}
        self._handles = []
        real_load, real_build, real_inputs = sdxl.load_model, loop.build_optimizer, loop.batch_inputs
        real_loss = DDPMObjective.loss

        def load(*a, **kw):
            self.model = real_load(*a, **kw)
            self.init = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            if on_load is not None:
                on_load(self.model)
            return self.model

        def build(cfg, groups, device):
            self.optimizer = opt = real_build(cfg, groups, device)
            self.names = {id(p): n for n, p in self.model.named_parameters()}
            self._handles += [p.register_post_accumulate_grad_hook(self._raw_hook) for g in groups
                              for p in g["params"]]
            self._handles += [opt.register_step_pre_hook(self._pre), opt.register_step_post_hook(self._post)]
            return opt

        def batch_inputs(batch, *a, **kw):
            self.loss_calls.append((batch,))
            return real_inputs(batch, *a, **kw)

        def objective_loss(objective, net, x0, cond, generators, **kw):  # kw: the masked loss's weight
            self.loss_calls[-1] += (objective, x0, generators)
            return (loss or real_loss)(objective, net, x0, cond, generators, **kw)

        monkeypatch.setattr(sdxl, "load_model", load)
        monkeypatch.setattr(loop, "build_optimizer", build)
        monkeypatch.setattr(loop, "batch_inputs", batch_inputs)
        monkeypatch.setattr(DDPMObjective, "loss", objective_loss)
        monkeypatch.setattr(loop, "memory_plan", lambda *a, **kw: "memory plan: not computed in this test")
        monkeypatch.setattr(loop, "save_final", lambda *a, **kw: None)

    def _raw_hook(self, p):
        if self.snapshots:
            self._raw[self.names[id(p)]] = p.grad.detach().clone()

    def _params(self):
        return [(self.names[id(p)], p) for g in self.optimizer.param_groups for p in g["params"]]

    def _pre(self, opt, args, kwargs):
        self.steps.append({"lr": [g["lr"] for g in opt.param_groups]})
        if self.snapshots:
            self.steps[-1].update(raw=self._raw, before={n: p.detach().clone() for n, p in self._params()},
                                  grad={n: p.grad.detach().clone() for n, p in self._params() if p.grad is not None})
        self._raw = {}

    def _post(self, opt, args, kwargs):
        if self.snapshots:
            self.steps[-1]["after"] = {n: p.detach().clone() for n, p in self._params()}

    def detach_hooks(self) -> None:
        """Hooks on parameters make reference cycles that the garbage collector cannot free (autograd holds
        the parameters): remove them once the run is over, or each test would keep its ~0.25 GB of records."""
        for h in self._handles:
            h.remove()

    def final(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}


def run(data, out, monkeypatch, *extra, **spy_kw) -> tuple[Spy, list[dict]]:
    spy = Spy(monkeypatch, **spy_kw)
    try:
        assert train_sdxl.main(train_args(data, out, *extra)) == 0
    finally:
        spy.detach_hooks()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return spy, metrics


def flat(d: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([d[n].double().flatten() for n in names])


def norm(d: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(v.double().square().sum().item() for v in d.values()))


def ulps(actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor,
         step: torch.Tensor | None = None) -> float:
    """max |actual - expected| in fp32 ulps of the largest magnitude involved: the weights before and after the
    step and, when given, the step itself. p - lr * g rounds once where the kernel fuses the multiply-add and
    twice (lr * g, then the sum) where it does not (torch 2.8 on CPU): at most 1 such ulp either way."""
    scale = torch.maximum(torch.maximum(actual.abs(), expected.abs()), before.abs())
    if step is not None:
        scale = torch.maximum(scale, step.abs())
    scale = scale.clamp_min(2.0**-100)
    return ((actual - expected).abs() / 2.0 ** (torch.floor(torch.log2(scale)) - 23)).max().item()


def cheap_loss(objective, net, *args, **kw):
    """A stand-in loss with a gradient on every trained parameter and no forward pass: for tests that need
    optimizer steps, not learning."""
    return sum(p.float().square().sum() for p in net.parameters() if p.requires_grad) * 1e-6


# ---- precision ------------------------------------------------------------------------------------------------

def test_fp16_uses_a_grad_scaler_and_fp32_masters(train_data, tmp_path, monkeypatch):
    """fp16: backward sees the loss times the scaler's 2^16; the step sees the unscaled gradient (exactly: the
    scale is a power of two), the logged norm is of that, the scaler state is checkpointed and counts the step;
    trained weights are fp32 masters (frozen ones fp16) and take the plain SGD update."""
    lr = 0.5
    spy, metrics = run(train_data, tmp_path, monkeypatch, "--precision", "fp16", "--optimizer", "sgd",
                       "--weight_decay", 0, "--max_grad_norm", 0, "--learning_rate", lr, "--max_steps", 1,
                       "--save_interval_steps", 1)
    st = spy.steps[0]
    assert st["grad"] and st["raw"].keys() == st["grad"].keys()
    for n, g in st["grad"].items():
        assert torch.equal(st["raw"][n] * 2.0**-16, g), n
    assert metrics[0]["grad_norm"] == pytest.approx(norm(st["grad"]), rel=1e-5)
    assert norm(st["raw"]) / metrics[0]["grad_norm"] == pytest.approx(2.0**16, rel=1e-5)
    ck = tmp_path / "checkpoints" / "step_000001"
    scaler = json.loads((ck / "state.json").read_text())["scaler"]
    assert scaler is not None and scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 1
    # fp32 masters, in the checkpoint and live; frozen weights stay in the training dtype.
    assert all(v.dtype == torch.float32 for v in load_file(str(ck / "trainable.safetensors")).values())
    assert all(p.dtype == torch.float32 for _, p in spy._params())
    assert all(p.dtype == torch.float16 for p in spy.model.text.parameters())
    # SGD's first step (no momentum yet, no decay): w - lr * g, finite, and it moved the weights.
    names = list(st["grad"])
    before, after, g = flat(st["before"], names), flat(st["after"], names), flat(st["grad"], names)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4
    assert ulps(after, before - lr * g, before, lr * g) <= 1  # measured 0.5


@pytest.mark.parametrize("full_bf16", [False, True])
def test_full_bf16_keeps_weights_and_optimizer_state_in_bf16(train_data, tmp_path, monkeypatch, full_bf16):
    """--precision bf16: trained weights and AdamW state are fp32 unless --full_bf16 makes them bf16; the
    frozen weights are bf16 either way."""
    want = torch.bfloat16 if full_bf16 else torch.float32
    spy, _ = run(train_data, tmp_path, monkeypatch, "--precision", "bf16", "--max_steps", 1, "--learning_rate", 1e-2,
                 "--save_interval_steps", 1, *(["--full_bf16"] if full_bf16 else []))
    ck = tmp_path / "checkpoints" / "step_000001"
    trained = load_file(str(ck / "trainable.safetensors"))
    assert len(trained) == len(list(spy.model.unet.parameters()))
    assert {v.dtype for v in trained.values()} == {want}
    moments = {k: v for k, v in load_file(str(ck / "optimizer.safetensors")).items()
               if k.endswith(("|exp_avg", "|exp_avg_sq"))}
    assert len(moments) == 2 * len(trained) and {v.dtype for v in moments.values()} == {want}
    assert {p.dtype for _, p in spy._params()} == {want}
    assert {p.dtype for p in spy.model.text.parameters()} == {torch.bfloat16}
    after = spy.steps[0]["after"]
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(not torch.equal(v, spy.init[n].to(want)) for n, v in after.items())  # lr 1e-2 > bf16 rounding


# ---- memory ----------------------------------------------------------------------------------------------------

def test_gradient_checkpointing_recomputes_and_trains_identically(train_data, tmp_path, monkeypatch):
    """With --gradient_checkpointing every resnet and transformer block of the UNet runs twice per step (forward
    and recompute in backward) instead of once, the Transformer2D wrappers still once, and the gradients and
    trained weights are the same."""
    runs = {}
    for ckpt in (False, True):
        calls: dict[str, int] = {}

        def count(model, calls=calls):
            for name, m in model.unet.named_modules():
                if CHECKPOINTED.search(name) or ONCE.search(name):
                    m.register_forward_pre_hook(lambda m, a, name=name: calls.update({name: calls.get(name, 0) + 1}))
        with monkeypatch.context() as mp:
            spy, _ = run(train_data, tmp_path / str(ckpt), mp, "--optimizer", "sgd", "--weight_decay", 0,
                         "--max_grad_norm", 0, "--learning_rate", 0.5, "--max_steps", 2,
                         *(["--gradient_checkpointing"] if ckpt else []), on_load=count)
        runs[ckpt] = spy, calls
    (plain, plain_calls), (ckpt, ckpt_calls) = runs[False], runs[True]
    assert len(plain_calls) == 45 and set(plain_calls.values()) == {2}  # 2 steps, one forward each
    assert sum(bool(ONCE.search(n)) for n in plain_calls) == 11  # tiny UNet: 17 resnets, 11 Transformer2Ds, 17 blocks
    assert ckpt_calls == {n: c if ONCE.search(n) else 2 * c for n, c in plain_calls.items()}
    # Measured bit-identical: the recompute runs the same ops on the same inputs, so no tolerance.
    for a, b in zip(plain.steps, ckpt.steps):
        assert a["raw"].keys() == b["raw"].keys()
        for n in a["raw"]:
            assert torch.equal(a["raw"][n], b["raw"][n]), n
    fa, fb = plain.final(), ckpt.final()
    assert max((fa[n] - plain.init[n]).abs().max().item() for n in fa) > 1e-3  # the weights did move
    for n in fa:
        assert torch.equal(fa[n], fb[n]), n


# ---- optimizers ------------------------------------------------------------------------------------------------

def _adamw_step1(p, g, lr, wd, eps=1e-8):
    """AdamW's first step by hand: bias-corrected m = g, sqrt(v) = |g|, decoupled decay."""
    return p * (1 - lr * wd) - lr * g / (g.abs() + eps)


def _by_hand(name, p, g, lr, wd):
    if name == "adamw":
        return _adamw_step1(p, g, lr, wd)
    if name == "sgd":  # momentum buffer = first gradient; coupled (L2) decay
        return p - lr * (g + wd * p)
    if name == "lion":  # sign of (1 - beta1) g on the first step; decoupled decay
        return p * (1 - lr * wd) - lr * torch.sign(g)
    return None


# Measured max errors of torch's fp32 update against the float64 formula: adamw 6.4 ulps (the update alone goes
# through ~8 roundings, which dominate where |w| is below the update), sgd 1.5, lion 1.7.
HAND_ULPS = {"adamw": 8, "sgd": 2, "lion": 2}


def _package(name):
    """The optimizer class the flag names, with the settings the README / config defaults promise."""
    if name == "adamw":
        return torch.optim.AdamW, {"betas": (0.9, 0.999), "eps": 1e-8, "fused": True}  # fused: skips on the device
    if name == "sgd":
        return torch.optim.SGD, {"momentum": 0.9}
    if name == "adafactor":
        return torch.optim.Adafactor, {}
    if name == "lion":  # lion-pytorch and prodigyopt are test dependencies: no skip
        import lion_pytorch
        return lion_pytorch.Lion, {}
    if name == "prodigy":
        import prodigyopt
        return prodigyopt.Prodigy, {}
    import bitsandbytes  # in the test extra (via [optimizers]); it runs AdamW8bit on the CPU too
    return bitsandbytes.optim.AdamW8bit, {"betas": (0.9, 0.999), "eps": 1e-8}


# Learning rates that give each a first update well above fp32 rounding (Prodigy scales lr by d0 = 1e-6).
OPTIMIZER_LR = {"adamw": 1e-3, "adamw8bit": 1e-3, "sgd": 0.5, "adafactor": 1e-2, "lion": 1e-3, "prodigy": 1.0}


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "lion", "prodigy", "adamw8bit"])
def test_optimizer_flag_builds_and_steps_that_optimizer(train_data, tmp_path, monkeypatch, name):
    """Two steps equal the named optimizer (its package, with the flag's lr and weight decay) applied directly
    to copies of the same weights with the same gradients (the second step exercises its state: momentum,
    moments, Prodigy's d); the first step also equals the update formula written out for adamw, sgd and lion,
    and each other optimizer's first update differs from AdamW's."""
    cls, kw = _package(name)
    lr, wd = OPTIMIZER_LR[name], 0.1
    spy, _ = run(train_data, tmp_path, monkeypatch, "--optimizer", name, "--learning_rate", lr,
                 "--weight_decay", wd, "--max_steps", 2)
    assert type(spy.optimizer) is cls
    names = [n for n, _ in spy._params()]
    assert set(names) == {"unet." + n for n, _ in spy.model.unet.named_parameters()}
    # The oracle: a fresh optimizer of that class on leaf copies of the recorded weights and gradients.
    copies = [torch.nn.Parameter(spy.steps[0]["before"][n].clone()) for n in names]
    oracle = cls([{"params": copies, "lr": lr}], weight_decay=wd, **kw)
    for st in spy.steps:
        assert st["grad"].keys() == set(names)
        for q, n in zip(copies, names):
            q.grad = st["grad"][n].clone()
        oracle.step()
        before, after = flat(st["before"], names), flat(st["after"], names)
        expected = torch.cat([q.detach().double().flatten() for q in copies])
        # Measured 0 (the same code on the same inputs); one ulp for CPU kernels that fuse differently.
        assert ulps(after, expected, before) <= 1
    st = spy.steps[0]
    before, after, g = flat(st["before"], names), flat(st["after"], names), flat(st["grad"], names)
    update = (after - before).abs().max().item()
    assert update > 1e-6  # Prodigy's first step: 3e-6, hundreds of fp32 ulps of the weights
    hand = _by_hand(name, before, g, lr, wd)
    if hand is not None:
        assert ulps(after, hand, before) <= HAND_ULPS[name]
    if name not in ("adamw", "adamw8bit"):
        assert (after - _adamw_step1(before, g, lr, wd)).abs().max().item() > 0.1 * update
    if name == "adamw8bit":  # 8-bit moments for every large tensor (bitsandbytes keeps small ones in fp32)
        big = [p for _, p in spy._params() if p.numel() >= 4096]
        assert big and all(spy.optimizer.state[p]["state1"].dtype == torch.uint8 for p in big)


# ---- clipping and schedule -------------------------------------------------------------------------------------

def test_max_grad_norm_logs_the_raw_norm_and_clips_the_update(train_data, tmp_path, monkeypatch):
    """grad_norm in metrics.jsonl is the norm of the gradient backward produced; the step sees that gradient
    times max_norm / (norm + 1e-6) (torch's clip_grad_norm_), so SGD's first update has norm lr * max_norm."""
    lr, max_norm = 10.0, 0.01
    spy, metrics = run(train_data, tmp_path, monkeypatch, "--optimizer", "sgd", "--weight_decay", 0,
                       "--max_grad_norm", max_norm, "--learning_rate", lr, "--max_steps", 1)
    st = spy.steps[0]
    raw_norm = norm(st["raw"])
    assert raw_norm > 10 * max_norm  # clipping is active
    assert metrics[0]["grad_norm"] == pytest.approx(raw_norm, rel=1e-5)
    coef = max_norm / (raw_norm + 1e-6)
    for n, g in st["grad"].items():
        assert torch.allclose(g, st["raw"][n] * coef, rtol=1e-5, atol=1e-12), n
    names = list(st["grad"])
    update = flat(st["after"], names) - flat(st["before"], names)
    assert update.norm().item() == pytest.approx(lr * max_norm, rel=1e-4)
    before = flat(st["before"], names)
    step = lr * flat(st["grad"], names)
    assert ulps(before + update, before - step, before, step) <= 1  # measured 0.5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_warmup_then_decay(train_data, tmp_path, monkeypatch, schedule):
    """Linear warmup over W steps, then linear or cosine decay to 0 at max_steps (T), by hand. The optimizer's
    k-th step (k = 1..T) uses base * f(k - 1), and metrics.jsonl logs at step k the rate that step used."""
    base, warmup, total = 0.01, 3, 8

    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / (total - warmup)
        return 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    spy, metrics = run(train_data, tmp_path, monkeypatch, "--lr_scheduler", schedule, "--lr_warmup_steps", warmup,
                       "--learning_rate", base, "--max_steps", total, "--optimizer", "sgd", loss=cheap_loss,
                       snapshots=False)
    applied = [st["lr"][0] for st in spy.steps]
    assert applied == pytest.approx([base * f(k - 1) for k in range(1, total + 1)], rel=1e-9)
    assert [m["lr"] for m in metrics] == applied


# ---- what trains -----------------------------------------------------------------------------------------------

def test_unet_train_blocks_up_trains_only_the_up_blocks(train_data, tmp_path, monkeypatch):
    """The optimizer holds exactly the up blocks' parameters; each of them moved and every other weight of the
    model is bit-identical to its initial value."""
    spy, _ = run(train_data, tmp_path, monkeypatch, "--unet_train_blocks", "up", "--max_steps", 1)
    up = {n for n in spy.init if n.startswith("unet.up_blocks.")}
    assert {n for n, _ in spy._params()} == up
    final = spy.final()
    assert all(not torch.equal(final[n], spy.init[n]) for n in up)  # AdamW moves every weight on step 1
    for n in spy.init.keys() - up:  # the rest of the UNet, the VAE and the text encoders: untouched
        assert torch.equal(final[n], spy.init[n]), n


def test_train_text_encoder_uses_each_encoders_learning_rate(train_data, tmp_path, monkeypatch):
    """SGD's first step (no momentum yet, no decay) moves each weight by -lr * gradient: the UNet by
    --learning_rate, CLIP-L by --lr_text_encoder1, bigG by --lr_text_encoder2. CLIP-L's last layer and final
    norm (SDXL reads its penultimate layer) are frozen."""
    lrs = {"unet.": 0.2, "text.text_encoder.": 0.7, "text.text_encoder_2.": 0.3}
    spy, _ = run(train_data, tmp_path, monkeypatch, "--train_text_encoder", "--optimizer", "sgd",
                 "--weight_decay", 0, "--max_grad_norm", 0, "--learning_rate", lrs["unet."],
                 "--lr_text_encoder1", lrs["text.text_encoder."], "--lr_text_encoder2",
                 lrs["text.text_encoder_2."], "--max_steps", 1)
    st = spy.steps[0]
    last = spy.model.text.text_encoder.config.num_hidden_layers - 1
    unused = (f"text.text_encoder.text_model.encoder.layers.{last}.", "text.text_encoder.text_model.final_layer_norm.")
    final = spy.final()
    for n in spy.init:
        if n.startswith(unused):
            assert n not in st["before"] and torch.equal(final[n], spy.init[n]), n
    for prefix, lr in lrs.items():  # ("text.text_encoder." is no prefix of "text.text_encoder_2.")
        names = [n for n in st["grad"] if n.startswith(prefix)]
        assert set(names) == {n for n in spy.init if n.startswith(prefix) and not n.startswith(unused)}, prefix
        before, after, g = flat(st["before"], names), flat(st["after"], names), flat(st["grad"], names)
        update = after - before
        assert update.abs().max() > 1e-6, prefix  # it trained
        # Least-squares ratio of update to gradient: the group's learning rate.
        assert (-(update @ g) / (g @ g)).item() == pytest.approx(lr, rel=1e-4), prefix
        # <= 1 for the two roundings, plus lr's own fp32 rounding (0.3 is inexact): 1.1 measured on some CPUs.
        assert ulps(after, before - lr * g, before, lr * g) <= 1.5, prefix


# ---- objective: noise schedule and timesteps -------------------------------------------------------------------

def test_zero_terminal_snr_and_logit_normal_reach_the_unet(train_data, tmp_path, monkeypatch):
    """The UNet's inputs are x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with abar the zero-terminal-SNR
    schedule (rescaled by hand from SDXL's scaled-linear betas; abar_999 = 0) and t = floor(1000 sigmoid(mean +
    std n)), eps and n drawn, in that order, from each sample's documented seed."""
    mean, std, seed = 0.7, 0.6, 3
    seen = []

    def record(model):
        model.unet.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach().clone(), a[1].clone())))
    spy, _ = run(train_data, tmp_path, monkeypatch, "--zero_terminal_snr", "--timestep_sampling", "logit_normal",
                 "--logit_mean", mean, "--logit_std", std, "--prediction_type", "v_prediction", "--batch_size", 2,
                 "--max_steps", 1, "--seed", seed, on_load=record)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0).sqrt()
    abar = ((a - a[-1]) * a[0] / (a[0] - a[-1])) ** 2
    (call,) = spy.loss_calls
    batch, used_abar, seeds = call[0], call[1].alphas_cumprod, [g.initial_seed() for g in call[3]]
    assert used_abar[999] == 0 and torch.allclose(used_abar.double(), abar, atol=1e-6)  # measured 4e-7 (fp32)
    assert seeds == [loop.sample_seed(seed, 0, 0, i) for i in range(2)]
    (x_t, t), = seen
    vae = spy.model.vae
    with torch.no_grad():
        x0 = (vae.encode(batch["pixels"]).mean - vae.config.shift_factor) * vae.config.scaling_factor
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        eps = torch.randn(x0.shape[1:], generator=g)
        want_t = int((1000 * torch.sigmoid(mean + std * torch.randn(1, generator=g))).floor().item())
        g = torch.Generator().manual_seed(s)  # what uniform sampling would have drawn instead
        torch.randn(x0.shape[1:], generator=g)
        uniform_t = int(1000 * torch.rand(1, generator=g).item())
        assert int(t[i]) == want_t != uniform_t, (i, int(t[i]), want_t)
        ab = abar[want_t].float()
        # Measured 2.4e-7 (an ulp of |x_t| ~ 2.5).
        assert torch.allclose(x_t[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps, rtol=0, atol=1e-6), i

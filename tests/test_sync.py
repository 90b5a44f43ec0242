"""No host-device sync inside a sampler step or a training step, checked on the CPU by proxy: while a step runs,
every way of reading a tensor back to the host (item, tolist, cpu, numpy, bool, float, int) fails. On a GPU,
tests/test_gpu.py runs the same steps under torch.cuda.set_sync_debug_mode("error")."""
from __future__ import annotations

import contextlib

import pytest
import torch

import sdxl
import train_sdxl
from sampling import generate
from conftest import train_args
from training import loop

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class Guard:
    """Tensor host reads raise while `on`; the patches stay installed for the whole test."""

    def __init__(self, monkeypatch):
        self.on, self.seen = False, []
        for name in READS:
            real = getattr(torch.Tensor, name)

            def patched(t, *a, _real=real, _name=name, **k):
                if self.on:
                    self.seen.append(_name)
                    raise AssertionError(f"Tensor.{_name} inside a step")
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, patched)

    @contextlib.contextmanager
    def active(self, on: bool = True):
        before, self.on = self.on, on
        try:
            yield
        finally:
            self.on = before


@pytest.fixture(scope="module")
def tiny():
    return sdxl.load_model("tiny", seed=0)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "ddim", "dpmpp_2m_karras", "dpmpp_2m_sde"])
def test_sampler_steps_read_nothing_back(tiny, sampler, monkeypatch):
    """Steps 1..N-1 of each sampler (after the first: the schedule is read once, before it), with CFG, rescale and
    the stochastic samplers' noise, run with every host read failing."""
    guard, stack, steps = Guard(monkeypatch), contextlib.ExitStack(), 4

    def callback(i, x, denoised):
        if i == 0:
            stack.enter_context(guard.active())
        elif i == steps - 1:
            stack.close()
    generate(tiny, ["a red circle"], height=64, width=64, steps=steps, sampler=sampler, guidance_scale=5.0,
             guidance_rescale=0.5, output_type="latent", callback=callback, **({"eta": 1.0} if sampler == "ddim" else {}))
    assert not guard.on and guard.seen == []


def test_pixel_sampler_steps_read_nothing_back(monkeypatch):
    """The flow schedule of a pixel model, with its guidance interval (a float comparison per step)."""
    model, guard, stack = sdxl.load_model("pixel-tiny", seed=0), Guard(monkeypatch), contextlib.ExitStack()
    generate(model, ["a"], height=64, width=64, steps=3, sampler="euler", output_type="latent",
             callback=lambda i, x, d: stack.enter_context(guard.active()) if i == 0 else stack.close() if i == 2 else 0)
    assert guard.seen == []


@pytest.mark.parametrize("extra", [("--ema_decay", 0.9), ("--use_lora", "--lora_target_mode", "all")],
                         ids=["full+ema", "lora"])
def test_training_steps_read_nothing_back(train_data, tmp_path, monkeypatch, extra):
    """From the second step on, the forward/backward micro-batches, the clip + optimizer step (fused AdamW skips
    non-finite steps on the device) and the EMA update read nothing back; the data loader's CPU work is exempt.
    The loop's one-step-late metrics read (Watch.read) is outside the step, and must be what reads them."""
    guard, calls = Guard(monkeypatch), []
    real_step, real_opt, real_ema = loop.train_step, loop.optimizer_step, None

    class Loader:  # the batches are CPU work of the data pipeline, not of the step
        def __init__(self, it):
            self.it = it

        def __next__(self):
            with guard.active(False):
                return next(self.it)

    def train_step(run, batches, step):
        calls.append(step)
        with guard.active(step >= 1):
            return real_step(run, Loader(batches), step)

    def optimizer_step(run, trainable, loss):
        with guard.active(len(calls) >= 2):
            return real_opt(run, trainable, loss)

    from training.ema import EMA
    real_ema = EMA.update

    def ema_update(self):
        with guard.active(len(calls) >= 2):
            return real_ema(self)
    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(loop, "optimizer_step", optimizer_step)
    monkeypatch.setattr(EMA, "update", ema_update)
    assert train_sdxl.main(train_args(train_data, tmp_path, "--max_steps", 4, "--batch_size", 2,
                                      "--gradient_accumulation_steps", 2, *extra)) == 0
    assert calls == [0, 1, 2, 3] and guard.seen == []
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4  # read after the fact, every step

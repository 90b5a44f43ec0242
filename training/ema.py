"""Exponential moving average of the trained parameters (a LoRA's or a UNet's) in fp32, on the training device or CPU.

    ema_t = d_t * ema_{t-1} + (1 - d_t) * theta_t,   d_t = min(decay, (1 + t) / (10 + t)) with warmup, else decay

(t counts EMA updates from 0). The warmup keeps early averages from being dominated by the initial weights.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float, warmup: bool = True,
                 device: str | torch.device | None = None):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.params = dict(named_params)
        self.shadow = {n: p.detach().to(device or p.device, torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        t = self.num_updates
        d = min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay
        for p, s in zip(self.params.values(), self.shadow.values()):
            s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - d)  # s = d s + (1 - d) p
        self.num_updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights with the EMA (call twice to restore): sample or save with the EMA."""
        for p, s in zip(self.params.values(), self.shadow.values()):
            tmp = p.detach().to(torch.float32, copy=True)
            p.copy_(s.to(p.device, p.dtype))
            s.copy_(tmp.to(s.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor], num_updates: int) -> None:
        if missing := sorted(set(self.shadow) - set(sd)):
            raise ValueError(f"EMA state lacks {missing[0]!r}")
        for n in self.shadow:
            self.shadow[n].copy_(sd[n])
        self.num_updates = num_updates

    @contextlib.contextmanager
    def applied(self):
        """with ema.applied(): the live weights are the EMA's (to sample or save with), restored afterwards."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

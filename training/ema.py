"""Exponential moving average of the trained parameters (a LoRA's or a UNet's) in fp32, on the training device or CPU.

    ema_t = d_t * ema_{t-1} + (1 - d_t) * theta_t,   d_t = min(decay, (1 + t) / (10 + t)) with warmup, else decay

(t counts EMA updates from 0). With an update every N steps (`every`), t counts steps and the decay is d_t^N: the
same horizon with N times fewer copies (for a CPU EMA, fewer trips over the bus). The warmup keeps early averages
from being dominated by the initial weights.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

CHUNK_BYTES = 1 << 28  # fp32 bytes per foreach call: bounds the temporary fp32 copies (of bf16 params, for a CPU EMA)


def chunks(params: list[torch.Tensor]):
    """Slices of `params` holding at most CHUNK_BYTES of fp32 each (or one parameter)."""
    start, size = 0, 0
    for i, p in enumerate(params):
        if i > start and size + 4 * p.numel() > CHUNK_BYTES:
            yield slice(start, i)
            start, size = i, 0
        size += 4 * p.numel()
    if start < len(params):
        yield slice(start, len(params))


def to_devices(params: list[torch.Tensor], like: list[torch.Tensor], dtype: torch.dtype | None = None,
               copy: bool = False) -> list[torch.Tensor]:
    """`params` on the devices of `like` (in `dtype` if given; no copy where they already are, unless `copy`). A GPU
    -> CPU copy goes to pinned memory without blocking, then one wait for the whole list; on CPU-only runs it is a
    plain copy."""
    out = [p.detach().to(s.device, dtype or p.dtype, non_blocking=True, copy=copy) for p, s in zip(params, like)]
    for dev in {p.device for p, s in zip(params, like) if p.device.type == "cuda" and s.device.type == "cpu"}:
        torch.cuda.current_stream(dev).synchronize()
    return out


def lerp_(shadow_sets: list[list[torch.Tensor]], params: list[torch.Tensor], weights: list[float]) -> None:
    """shadow.lerp_(param in fp32, weight) for every shadow set and its weight, in one foreach call per chunk (not a
    Python loop per tensor). Bit-identical to that loop: bf16 -> fp32 is exact and foreach lerp is lerp's formula."""
    for sl in chunks(params):
        live = to_devices(params[sl], shadow_sets[0][sl], torch.float32)
        for shadows, w in zip(shadow_sets, weights):
            torch._foreach_lerp_(shadows[sl], live, w)


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float, warmup: bool = True,
                 device: str | torch.device | None = None, every: int = 1):
        self.decay, self.warmup, self.num_updates, self.every = decay, warmup, 0, every
        self.params = dict(named_params)
        self.shadow = {n: p.detach().to(device or p.device, torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        t = self.num_updates * self.every  # in steps: an update every N steps applies N steps' decay at once
        d = (min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay) ** self.every
        lerp_([list(self.shadow.values())], list(self.params.values()), [1.0 - d])  # s = d s + (1 - d) p
        self.num_updates += 1

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
        """with ema.applied(): the live weights are the EMA's (rounded to their dtype: sample or save with them), and
        exactly what they were afterwards. They wait on the CPU (no device memory for a second copy of a full UNet),
        and the EMA is only read: swapping them through a bf16 parameter would round the EMA itself."""
        params, shadows = list(self.params.values()), list(self.shadow.values())
        with torch.no_grad():
            live = to_devices(params, [torch.empty(0)] * len(params), copy=True)  # to the CPU
            torch._foreach_copy_(params, shadows)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, live):
                    p.copy_(w)

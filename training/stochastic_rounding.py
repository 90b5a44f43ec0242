"""Stochastic rounding for bf16 master weights (--full_bf16 --stochastic_rounding).

An update smaller than half a bf16 ulp of its weight (1/256 of the weight near 1) is lost when added in bf16: with
learning rates around 1e-5 most of them are. Here each optimizer step runs on fp32 copies of the bf16 weights, their
gradients and their optimizer state, and the results are rounded back to bf16 stochastically: up with probability
equal to the distance from the lower neighbour over the gap, so the rounding is unbiased and small updates add up
on average. The rounding is the known bit trick: add 16 random bits to the low half of the fp32 bit pattern, then
drop that half. A step works through the parameters a chunk at a time (the others' gradients set aside, so the
optimizer skips them), keeping the fp32 copies to a bounded size; optimizers whose step couples parameters
(Prodigy) or keeps quantised state (8-bit AdamW) are refused by the config.
"""
from __future__ import annotations

import torch

CHUNK = 1 << 26  # elements upcast at a time: 64M parameters, about 1 GiB of fp32 copies with AdamW's two moments


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounded down or up (in magnitude) to a neighbouring bf16 value with the probabilities that make
    the expectation x; exact bf16 values stay as they are."""
    bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # The low 16 bits of the mantissa plus the noise carry into the kept half with probability (low bits) / 2^16;
    # on the sign-magnitude pattern that moves away from zero for either sign. -65536 = 0xFFFF0000.
    bits.add_(x.float().contiguous().view(torch.int32)).bitwise_and_(-65536)
    return bits.view(torch.float32).to(torch.bfloat16)


def _chunks(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    out, size = [[]], 0
    for p in params:
        if out[-1] and size + p.numel() > limit:
            out, size = out + [[]], 0
        out[-1].append(p)
        size += p.numel()
    return out


def step(optimizer: torch.optim.Optimizer, generator: torch.Generator | None = None, chunk: int = CHUNK) -> None:
    """optimizer.step() with every bf16 parameter (and its bf16 state) updated in fp32 and rounded stochastically
    back into its own storage; other parameters step as usual. Chunk by chunk, in parameter order, so the random
    bits (from `generator`) and the result do not depend on `chunk`. No host read."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = {p: p.grad for p in params}
    try:
        for part in _chunks(params, chunk):
            ids = {id(p) for p in part}
            for p in params:
                p.grad = grads[p] if id(p) in ids else None
            _step_upcast(optimizer, [p for p in part if p.dtype == torch.bfloat16], generator)
    finally:
        for p, g in grads.items():
            p.grad = g


def _step_upcast(optimizer: torch.optim.Optimizer, low: list[torch.nn.Parameter], generator) -> None:
    """One optimizer.step() over the parameters that have gradients, those in `low` (bf16) seen in fp32."""
    kept = []  # (parameter, its bf16 storage, its bf16 gradient, its bf16 state entries)
    for p in low:
        state = optimizer.state.get(p, {})
        bf16_state = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dtype == torch.bfloat16}
        kept.append((p, p.data, p.grad, bf16_state))
        p.data = p.data.float()
        p.grad = p.grad.float()
        for k, v in bf16_state.items():
            state[k] = v.float()
    optimizer.step()
    for p, data, grad, bf16_state in kept:
        data.copy_(stochastic_round(p.data, generator))
        p.data, p.grad = data, grad
        state = optimizer.state[p]
        for k, v in state.items():  # back into its own storage; state made by this first step becomes bf16
            if k in bf16_state:
                bf16_state[k].copy_(stochastic_round(v, generator))
                state[k] = bf16_state[k]
            elif torch.is_tensor(v) and v.dtype == torch.float32 and v.ndim > 0:
                state[k] = stochastic_round(v, generator)

"""--fused_backward_pass: the optimizer step inside the backward pass, so the gradients are never all alive at once.

One optimizer per parameter (as kohya's and OneTrainer's fused passes do), stepped in the parameter's
post-accumulate-grad hook as soon as its gradient is complete; the gradient is freed right after. `FusedBackward`
holds them behind the optimizer interface the loop, the LR scheduler and the checkpoints use: its param_groups are
the per-parameter optimizers' own group dicts (so the scheduler sets every optimizer's rate), its state dict has
the layout of one optimizer over all the parameters (state keyed by parameter index), and its step() does nothing
(the steps happened in the backward).

Gradient clipping cannot see the global norm before the steps: --max_grad_norm clips each parameter's gradient on
its own (kohya's choice). A parameter whose gradient is non-finite is not stepped: fused AdamW skips on the device
(its found_inf input), other optimizers ask the host. The norm of all the gradients is still summed on the device
for the logs.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from training.config import ConfigError


class FusedBackward(torch.optim.Optimizer):
    """`make([group])` -> an optimizer, for each parameter of `groups`; stepped by hooks during backward."""

    def __init__(self, make: Callable[[list[dict]], torch.optim.Optimizer], groups: list[dict],
                 max_grad_norm: float | None):
        params = [p for g in groups for p in g["params"]]
        super().__init__(params, {})
        self.optimizers = [make([{**g, "params": [p]}]) for g in groups for p in g["params"]]
        self.param_groups = [o.param_groups[0] for o in self.optimizers]
        self.max_grad_norm = max_grad_norm or None
        self.norm_sq = torch.zeros((), device=params[0].device) if params else torch.zeros(())
        self.handles = [p.register_post_accumulate_grad_hook(functools.partial(self._hook, o))
                        for p, o in zip(params, self.optimizers)]

    def _hook(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> None:
        grad = p.grad
        norm = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)
        self.norm_sq = self.norm_sq + norm.square()
        if self.max_grad_norm:  # as clip_grad_norm_ does it, over this gradient alone
            grad.mul_(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0).to(grad.dtype))
        finite = torch.isfinite(norm)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
            optimizer.step()
            del optimizer.grad_scale, optimizer.found_inf
        elif finite:
            optimizer.step()
        p.grad = None

    def take_norm(self) -> torch.Tensor:
        """The norm of every gradient of the last backward (before clipping), on the device; reset."""
        norm, self.norm_sq = self.norm_sq.sqrt(), torch.zeros_like(self.norm_sq)
        return norm

    @torch.no_grad()
    def step(self, closure=None) -> None:  # the steps happened in the backward pass
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        """One optimizer's layout: state and param groups keyed by parameter index."""
        state, groups = {}, []
        for i, o in enumerate(self.optimizers):
            sd = o.state_dict()
            if 0 in sd["state"]:
                state[i] = sd["state"][0]
            groups.append({**sd["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.optimizers):
            raise ConfigError(f"optimizer state of {len(groups)} groups, this run has {len(self.optimizers)} "
                             "parameters (was the checkpoint saved with --fused_backward_pass?)")
        for i, o in enumerate(self.optimizers):
            st = state_dict["state"]
            o.load_state_dict({"state": {0: st[i]} if i in st else {}, "param_groups": [{**groups[i], "params": [0]}]})
        self.param_groups = [o.param_groups[0] for o in self.optimizers]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

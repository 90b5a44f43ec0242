"""Shared test setup: deterministic seeds, small thread count, and helpers to build reference modules."""
from __future__ import annotations

import pytest
import torch

# One thread: the tiny test models are overhead-bound, and 2 threads thrash when processes share 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|: the parity measure the issues' tolerances are stated in."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def diffusers_kwargs(config_dict: dict) -> dict:
    """A diffusers config.json as constructor kwargs (drop the private `_class_name` etc.)."""
    return {k: v for k, v in config_dict.items() if not k.startswith("_")}

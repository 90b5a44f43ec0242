"""Shared test setup: deterministic seeds, small thread count, and helpers to build reference modules."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


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

"""Process groups and model wrapping. Models know nothing of this; the loop calls these.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (multi-node too); without them this is a single process.
nccl on GPUs, gloo on CPU. `wrap` applies DDP, or FSDP2 (`fully_shard`, one unit per UNet block, then the
root) for full fine-tunes too big for one GPU. Saved state is always the unwrapped module's (no `module.`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank, world, local, device)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.device.type == "cuda" else dist.ReduceOp.SUM)
        if x.device.type != "cuda":  # gloo has no AVG
            x /= d.world_size
    return x


def any_true(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. a stop request that reached one rank)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap(module: nn.Module, d: Dist, fsdp: bool = False, unet: nn.Module | None = None) -> nn.Module:
    """DDP (or FSDP2 when `fsdp`) around the module the loop calls; unchanged in a single process."""
    if not d.enabled:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks] if unet is not None else []
        for b in blocks:
            fully_shard(b)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def full_state(module: nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) with whole tensors. Under FSDP this is a collective that every
    rank must call; the gathered tensors land on the CPU of rank 0 (the others get empty dicts)."""
    if not fsdp:
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, optimizer, model_sd: dict, optim_sd: dict, fsdp: bool) -> None:
    """The inverse of `full_state` (every rank passes the whole dicts; FSDP shards them into place)."""
    if not fsdp:
        module.load_state_dict(model_sd, strict=False)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()

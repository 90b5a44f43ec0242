"""Process groups and model wrapping; models know nothing of this. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
(multi-node too), else this is one process; nccl on GPUs, gloo on CPU. `wrap` applies DDP, or FSDP2 (`fully_shard`,
one unit per resnet and transformer block, then per level, then the root) for full fine-tunes too big for one GPU. Saved state is the unwrapped module's.
"""
from __future__ import annotations

import contextlib
import inspect
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
    is_main = property(lambda self: self.rank == 0)
    enabled = property(lambda self: self.world_size > 1)


def init() -> Dist:
    world, rank, local = (int(os.environ.get(k, v)) for k, v in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
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
    if not d.enabled:
        return x
    x, cuda = x.clone(), x.device.type == "cuda"
    dist.all_reduce(x, op=dist.ReduceOp.AVG if cuda else dist.ReduceOp.SUM)  # gloo has no AVG
    return x if cuda else x / d.world_size


def any_true(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. a stop request that reached one rank)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def fsdp_units(unet: nn.Module | None) -> list[nn.Module]:
    """FSDP2's shard units, innermost first: every resnet and transformer block (one all-gather brings in one block's
    weights, as checkpointing recomputes one block), then each UNet level for what is left (norms, projections,
    down/upsamplers), where a level has any.  The pixel body's placeholder levels hold none."""
    if unet is None:
        return []
    from sdxl.unet import BasicTransformerBlock, ResnetBlock2D
    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    inner = {id(p) for b in blocks for p in b.parameters()}
    levels = [m for m in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
              if any(id(p) not in inner for p in m.parameters())]  # a level with parameters of its own
    return blocks + levels


def wrap(module: nn.Module, d: Dist, groups: list[dict], fsdp: bool = False, unet: nn.Module | None = None,
         param_dtype: torch.dtype | None = None) -> tuple[nn.Module, list[dict]]:
    """DDP, or FSDP2 when `fsdp`, around `module`, with the param `groups` re-pointed at FSDP2's new parameters.
    Under FSDP2 the weights are all-gathered in `param_dtype` (bf16 under bf16 autocast: half the traffic and the
    gathered copies) and gradients reduce-scattered in fp32."""
    if not d.enabled:
        return module, groups
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        names = {id(p): n for n, p in module.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for m in fsdp_units(unet):
            fully_shard(m, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        params = dict(module.named_parameters())
        return module, [{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, group_names)]
    from torch.nn.parallel import DistributedDataParallel as DDP
    # Gradients live in the all-reduce buckets (no second copy); the buffers (LoRA alphas, position ids) never
    # change: no broadcast each forward (torch 2.13 renamed the flag). 100 MiB buckets: ~100 all-reduces for a full
    # UNet's fp32 gradients, not ~400. No static_graph: little gain without unused parameters or reentrant
    # checkpointing, and its first-iteration graph recording would meet a no_sync micro-batch.
    new = "forward_sync_buffers" in inspect.signature(DDP).parameters
    return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None, gradient_as_bucket_view=True,
               bucket_cap_mb=100, **{"forward_sync_buffers" if new else "broadcast_buffers": False}), groups


def gradient_sync(wrapped: nn.Module, sync: bool, d: Dist, fsdp: bool):
    """A context for one micro-batch's backward: gradients are all-reduced (DDP) or reduce-scattered (FSDP2) only
    when `sync` (the last micro-batch of an accumulation); the others accumulate locally."""
    if not d.enabled:
        return contextlib.nullcontext()
    if fsdp:
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else wrapped.no_sync()


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


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj` (picklable, e.g. a data stream's position), in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_module(module: nn.Module, name: str, net: nn.Module, d: Dist) -> nn.Module:
    """A plain (unsharded) copy of `net`, the submodule `name` of the FSDP-wrapped `module`, on rank 0's CPU (a
    collective; other ranks get `net` back). `net.blank()` builds the same network on the meta device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return net
    plain = net.blank()
    plain.load_state_dict({k.removeprefix(f"{name}."): v for k, v in sd.items() if k.startswith(f"{name}.")},
                          assign=True)
    return plain


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()

"""The memory plan printed before training (and by bench/gpu.py next to the peak it measures).

Weights, gradients, optimizer state and EMA are counted from the parameters. Activations are counted by running the
network once on the meta device (no memory, no compute) and adding up the storages autograd saves for the backward
pass, each storage once, parameters left out:
- which tensors are saved follows what trains: a frozen base with LoRA (its adapters copied onto the meta device)
  saves less than a full fine-tune;
- on CUDA, SDPA's fused kernels (flash / memory-efficient / cuDNN) save q, k, v, the output and a (B, heads, L)
  log-sum-exp: O(L), where the math kernel (CPU, meta) keeps the (B, heads, L, L) attention weights;
- with gradient checkpointing what stays is what runs outside the checkpointed blocks plus each block's inputs, and
  the backward pass rebuilds one block's activations at a time: the largest block is the recompute peak;
- under autocast, fp32 trainable weights are also held as half-precision copies through the forward pass.
The peak estimate assumes the backward frees activations about as fast as it fills gradients (SDXL's backward
starts at the high-resolution end, where activations are largest and parameters fewest): the resident state plus
the larger of the forward's (and recompute's) activations and the gradients. With --fused_backward_pass each
parameter steps and frees its gradient as soon as it is complete: the gradients count as the largest parameter's.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from sdxl.lora import LoRANetwork
from sdxl.config import DTYPES

OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 1, "lion": 4, "prodigy": 16, "sgd": 4}
GIB = 2**30


def fused_attention(device: torch.device) -> bool:
    """Whether SDPA runs a fused kernel here (CUDA with flash, memory-efficient or cuDNN attention enabled)."""
    b = torch.backends.cuda
    return device.type == "cuda" and (b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled() or
                                      b.cudnn_sdp_enabled())


class FusedAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention as the flash kernel's op, which has a meta implementation: on the meta device
    it saves what the CUDA kernels save (q, k, v, output, log-sum-exp), not the math kernel's L x L weights."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and len(args) == 3 and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention(*args)[0]
        return func(*args, **(kwargs or {}))


def _meta_network(unet: nn.Module, network, dtype: torch.dtype) -> nn.Module:
    """`unet`'s network on the meta device in `dtype`, training what `unet` trains: its parameters' requires_grad,
    and a LoRA network's UNet adapters, copied onto the meta device (in `dtype`: no casts of their own) and hooked
    onto the copy's layers as `network` hooks them."""
    net = unet.blank().to(dtype)
    trains = dict(unet.named_parameters())
    for name, p in net.named_parameters():
        p.requires_grad_(trains[name].requires_grad if name in trains else True)
    if isinstance(network, LoRANetwork):
        layers, targets, adapters = dict(net.named_modules()), {}, {}
        for name, adapter in network.named_children():
            if (t := network.targets[name]).component == "unet":
                memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta", dtype=dtype), p.requires_grad)
                        for p in adapter.parameters()}
                memo.update({id(b): torch.empty_like(b, device="meta") for b in adapter.buffers()})
                adapters[name] = copy.deepcopy(adapter, memo)  # shapes only: no weight is copied
                targets[name] = dataclasses.replace(t, module=layers[t.path])
        if adapters:
            LoRANetwork(targets, adapters, network.config).attach()
    return net


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # one key per storage: the views of one tensor count once


def activation_bytes(unet: nn.Module, x_shape: tuple[int, ...], ctx_len: int, dtype: torch.dtype,
                     checkpointing: bool, fused: bool = False, network=None) -> tuple[int, int]:
    """(bytes autograd saves in one training forward of `unet`'s network, the recompute peak: the largest
    checkpointed block's own activations, rebuilt in the backward; 0 without checkpointing). One forward on the
    meta device; `fused`: attention as SDPA's fused CUDA kernels save it.

    A checkpointed block is found by a probe product in each module call's pre-hook: inside a checkpoint the
    checkpoint's saved-tensor hooks take its operands, so ours never see it. From there to the end of the call our
    own hooks, entered innermost, count the block's tensors apart (the checkpoint never sees them: no backward
    runs), and the block's inputs count as kept: the checkpoint holds them until the backward recomputes it."""
    net, cfg, b = _meta_network(unet, network, dtype), unet.config, x_shape[0]
    net.train().set_gradient_checkpointing(checkpointing)
    with torch.device("meta"):  # latents and text (cached) need no gradient
        inputs = (torch.zeros(x_shape, dtype=dtype), torch.zeros(b),
                  torch.zeros(b, ctx_len, cfg.cross_attention_dim, dtype=dtype),
                  torch.zeros(b, cfg.pooled_dim, dtype=dtype), torch.zeros(b, cfg.num_time_ids))
    params = {_storage(t) for t in (*net.parameters(), *net.buffers())}
    size, outside, kept, blocks, stack, probe, held = {}, set(), set(), [], [], [None, False], []

    def count(t, into: set):
        if (k := _storage(t)) not in params:
            size[k] = t.untyped_storage().nbytes()
            into.add(k)
            held.append(t)  # alive until counted: no storage key is reused for another
        return t

    def pack(t):
        if t is probe[0]:
            probe[1] = True
            return t
        return count(t, outside)

    def pre(m, args):
        hooks = None
        if checkpointing and not any(stack):
            probe[:] = torch.ones((), device="meta", requires_grad=True), False
            probe[0] * probe[0]
            if not probe[1]:  # the outermost call inside a checkpoint: a block
                blocks.append(set())
                for a in args:
                    if isinstance(a, torch.Tensor):
                        count(a, kept)
                hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: count(t, blocks[-1]), lambda t: t)
                hooks.__enter__()
        stack.append(hooks)

    def post(*_):  # returns None: the module's output stays
        if (hooks := stack.pop()) is not None:
            hooks.__exit__(None, None, None)

    handles = [h for m in net.modules() for h in (m.register_forward_pre_hook(pre),
                                                   m.register_forward_hook(post, always_call=True))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                FusedAttention() if fused else contextlib.nullcontext():
            net(*inputs)
    finally:
        for h in handles:
            h.remove()
    kept |= outside
    total = lambda keys: sum(size[k] for k in keys)  # noqa: E731
    return total(kept), max((total(s - kept) for s in blocks), default=0)


def plan_bytes(cfg, model, trainable: list[nn.Parameter], network, largest_bucket, fused: bool | None = None) -> dict:
    """The plan's figures in bytes: weights (on the UNet's device), gradients, optimizer, EMA, activations,
    recompute, autocast_copies, peak. `fused` (default: from the UNet's device) counts attention as SDPA's fused
    kernels do."""
    device = next(model.unet.parameters()).device
    fused = fused_attention(device) if fused is None else fused
    on_device = lambda m: [p for p in m.parameters() if p.device == device]  # noqa: E731  (cached runs free encoders)
    weights = sum(p.numel() * p.element_size() for m in (model, network) if m is not None for p in on_device(m))
    n_train = sum(p.numel() for p in trainable)
    compute = DTYPES[cfg.precision]
    grads = [p.numel() * p.element_size() for p in trainable]  # fused backward: one parameter's at a time
    f = {"weights": weights, "gradients": max(grads, default=0) if getattr(cfg, "fused_backward_pass", False) else sum(grads),
         "optimizer": n_train * OPTIMIZER_STATE_BYTES[cfg.optimizer] // (
             2 if cfg.full_bf16 and cfg.optimizer == "adamw" else 1),
         "ema": n_train * 4 * ((1 if cfg.ema_decay else 0) + (2 if cfg.ema_snapshots else 0)) if not cfg.ema_cpu else 0,
         "autocast_copies": sum(p.numel() * compute.itemsize for p in trainable
                                if compute != torch.float32 and p.element_size() > compute.itemsize)}
    h, w = largest_bucket
    f["activations"], f["recompute"] = activation_bytes(
        model.unet, (cfg.batch_size, *model.space(h, w)), 77, compute, cfg.gradient_checkpointing, fused, network)
    resident = f["weights"] + f["optimizer"] + f["ema"]
    f["peak"] = resident + max(f["activations"] + max(f["recompute"], f["autocast_copies"]), f["gradients"])
    f["fused_attention"] = fused
    return f


def plan_text(cfg, f: dict, n_train: int, largest_bucket) -> str:
    """The figures of `plan_bytes` as printed before the first step (a row each, GiB)."""
    h, w = largest_bucket
    attn = "fused attention" if f["fused_attention"] else "math attention"
    grads = "gradients (fused backward: the largest parameter's)" if getattr(cfg, "fused_backward_pass", False) \
        else "gradients"
    rows = [("weights", f["weights"]), (grads, f["gradients"]), (f"optimizer ({cfg.optimizer})", f["optimizer"]),
            ("EMA", f["ema"]), (f"activations ({w}x{h} px, batch {cfg.batch_size}, {attn})", f["activations"])]
    if cfg.gradient_checkpointing:
        rows.append(("recompute (largest checkpointed block)", f["recompute"]))
    if f["autocast_copies"]:
        rows.append((f"autocast {cfg.precision} copies of trained weights", f["autocast_copies"]))
    lines = [f"memory plan: {n_train / 1e6:.2f}M trainable parameters"]
    lines += [f"  {name:<52s} {b / GIB:8.2f} GiB" for name, b in rows]
    lines.append(f"  {'peak estimate (before allocator overhead)':<52s} {f['peak'] / GIB:8.2f} GiB")
    return "\n".join(lines)


def memory_plan(cfg, model, trainable: list[nn.Parameter], network, largest_bucket, fused: bool | None = None) -> str:
    """The plan printed before the first step: `plan_bytes` as text."""
    f = plan_bytes(cfg, model, trainable, network, largest_bucket, fused)
    return plan_text(cfg, f, sum(p.numel() for p in trainable), largest_bucket)

"""FSDP2 settings in-process (a one-process gloo group; the two-process runs are in test_train.py): the shard units
and the mixed-precision policy, bf16 weights gathered for the forward and fp32 gradients reduced into the shards."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import sdxl
from training import distributed


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_gathers_bf16_weights_and_reduces_fp32_gradients(group):
    unet = sdxl.load_model("tiny", seed=0).unet.requires_grad_(True)
    units = distributed.fsdp_units(unet)
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert resnets and all(any(r is u for u in units) for r in resnets)
    assert units.index(resnets[0]) < units.index(unet.down_blocks[0])  # inner units first
    d = distributed.Dist(world_size=2)  # "distributed", so wrap shards; the mesh is the one-process group
    wrapped, [group_] = distributed.wrap(unet, d, [{"params": list(unet.parameters())}], True, unet, torch.bfloat16)
    seen = []
    resnets[0].conv1.register_forward_pre_hook(lambda m, a: seen.append((m.weight.dtype, a[0].dtype)))
    cfg = unet.config
    out = wrapped(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, cfg.cross_attention_dim),
                  torch.randn(1, cfg.pooled_dim), torch.randn(1, cfg.num_time_ids))
    assert seen == [(torch.bfloat16, torch.bfloat16)] and out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    params = group_["params"]
    assert all(p.dtype == torch.float32 for p in params)  # the sharded masters stay fp32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params )


def test_gradient_sync_skips_reduce_scatter_until_the_last_micro_batch(group):
    unet = sdxl.load_model("tiny", seed=0).unet
    wrapped, _ = distributed.wrap(unet, distributed.Dist(world_size=2), [{"params": list(unet.parameters())}], True,
                                  unet)
    flags = lambda: {m._get_fsdp_state()._fsdp_param_group.reduce_grads for m in distributed.fsdp_units(unet)}
    with distributed.gradient_sync(wrapped, False, distributed.Dist(world_size=2), True):
        assert flags() == {False}
    with distributed.gradient_sync(wrapped, True, distributed.Dist(world_size=2), True):
        assert flags() == {True}

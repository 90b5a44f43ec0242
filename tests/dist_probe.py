"""train_sdxl.py with a spy on the model wrapping: each rank writes what `distributed.wrap` returned into
<output_dir>/wrap_rank<R>.json (wrapper class, DDP's flags, which parameters are DTensors, their placements and
local sizes).

Run under torchrun by tests/test_train.py; it is not a test module itself.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_sdxl  # noqa: E402
from training import distributed  # noqa: E402

_wrap = distributed.wrap


def spy(module, d, groups, fsdp=False, unet=None, param_dtype=None):
    wrapped, groups = _wrap(module, d, groups, fsdp, unet, param_dtype)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    params = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if isinstance(p, DTensor):
            params[name] = {"placements": [f"{type(x).__name__}({getattr(x, 'dim', '')})" for x in p.placements], "local": p.to_local().numel(),
                            "global": p.numel()}
        else:
            params[name] = {"placements": None, "local": p.numel(), "global": p.numel()}
    out = Path(train_sdxl_args_output_dir())
    out.mkdir(parents=True, exist_ok=True)
    ddp = {"gradient_as_bucket_view": wrapped.gradient_as_bucket_view, "bucket_bytes_cap": wrapped.bucket_bytes_cap,
           "static_graph": wrapped.static_graph,  # forward_sync_buffers was broadcast_buffers before torch 2.13
           "sync_buffers": getattr(wrapped, "forward_sync_buffers", getattr(wrapped, "broadcast_buffers", None))
           } if type(wrapped).__name__ == "DistributedDataParallel" else None
    units = [n for n, m in module.named_modules() if isinstance(m, FSDPModule)]
    (out / f"wrap_rank{d.rank}.json").write_text(json.dumps({"wrapper": type(wrapped).__name__,
                                                              "params": params, "ddp": ddp, "units": units}))
    return wrapped, groups


def train_sdxl_args_output_dir() -> str:
    argv = sys.argv[1:]
    return argv[argv.index("--output_dir") + 1]


if __name__ == "__main__":
    distributed.wrap = spy
    assert os.environ.get("WORLD_SIZE"), "run me under torchrun"
    sys.exit(train_sdxl.main(sys.argv[1:]))

"""Training checkpoints: everything needed to continue bit-identically, in safetensors + JSON (no pickles).

    <output_dir>/checkpoints/step_NNNNNN/
        trainable.safetensors   the trained parameters (fp32 masters), by name
        optimizer.safetensors   optimizer state tensors, keyed "state|<param index or name>|<name>"
        ema.safetensors         the EMA weights (when --ema_decay)
        rng.safetensors         torch CPU / CUDA generator states
        state.json              step, epoch, data position, LR scheduler, grad scaler, EMA count, python and
                                numpy RNG states, the optimizer's non-tensor state and param groups

Written through `sdxl.weights.atomic_path`, so a folder named step_NNNNNN is always complete; the oldest beyond
`keep` are removed afterwards.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdxl.weights import atomic_path

_STEP_DIR = re.compile(r"step_(\d{6,})")


def _optimizer_split(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"state": {}, "param_groups": opt_state["param_groups"]}
    for idx, st in opt_state["state"].items():
        plain["state"][str(idx)] = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
        tensors.update({f"state|{idx}|{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return tensors, plain


def _optimizer_join(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    # Plain optimizers key their state by parameter index, FSDP's full state dict by parameter name.
    key = lambda i: int(i) if i.isdigit() else i  # noqa: E731
    state: dict = {key(i): dict(st) for i, st in plain["state"].items()}
    for k, v in tensors.items():
        _, idx, name = k.split("|", 2)
        state.setdefault(key(idx), {})[name] = v
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    (version, st, gauss), (name, keys, *rest) = random.getstate(), np.random.get_state()
    return tensors, {"python": [version, list(st), gauss],
                     "numpy": [name, keys.tolist(), *(x.item() if hasattr(x, "item") else x for x in rest)]}


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    v, st, g = plain["python"]
    random.setstate((v, tuple(st), g))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(root: str | os.PathLike, step: int, *, trainable: dict[str, torch.Tensor], optimizer: dict,
                    state: dict, ema: dict[str, torch.Tensor] | None = None, keep: int = 3) -> Path:
    """Write checkpoints/step_NNNNNN atomically and prune old ones. `optimizer` is its state dict; `state` is
    JSON-able (step, epoch, ...)."""
    (opt_tensors, opt_plain), (rng_tensors, rng_plain) = _optimizer_split(optimizer), rng_state()
    final = Path(root) / "checkpoints" / f"step_{step:06d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        for name, tensors in (("trainable", trainable), ("optimizer", opt_tensors), ("ema", ema), ("rng", rng_tensors)):
            if tensors is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_plain, "rng": rng_plain}) + "\n")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(output_dir: str | os.PathLike) -> None:
    """Remove the temporary folders of saves that were killed half-way (never a complete step_NNNNNN)."""
    root = Path(output_dir) / "checkpoints"
    for p in root.glob("step_*.tmp") if root.is_dir() else []:  # atomic_path's <name>.<pid>.tmp
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def find_checkpoint(output_dir: str | os.PathLike, resume: str) -> Path:
    """`latest` -> the newest complete checkpoint of output_dir; otherwise a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"{Path(output_dir) / 'checkpoints'}: no checkpoint to resume from")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no state.json)")
    return path


def load_checkpoint(path: Path) -> dict:
    """The pieces of a checkpoint: trainable, optimizer (a state_dict), ema (or None), state, and the RNG states
    restored as a side effect."""
    state = json.loads((path / "state.json").read_text())
    opt_plain, rng_plain = state.pop("optimizer"), state.pop("rng")
    ema = path / "ema.safetensors"
    out = {"trainable": load_file(str(path / "trainable.safetensors")), "state": state,
           "optimizer": _optimizer_join(load_file(str(path / "optimizer.safetensors")), opt_plain),
           "ema": load_file(str(ema)) if ema.is_file() else None}
    set_rng_state(load_file(str(path / "rng.safetensors")), rng_plain)
    return out

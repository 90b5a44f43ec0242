"""Reading weight files and loading them into modules built on the meta device.

One place for the rules every loader follows: safetensors only (or `torch.load(weights_only=True)`), the
diffusers file names (plain, `fp16` variant, sharded index), strict key checking with one clear error, and
tensors assigned straight into place so a load never holds two copies of a model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A weight file or folder that cannot be used; the message is one line naming the file."""


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _open_safetensors(path: Path):
    """safetensors' lazy reader. The `pread` backend copies each tensor into memory of its own when asked for
    it, so a tensor dropped after conversion is freed; the default mmap backend keeps every page read mapped
    (and counted as resident) until the file is closed. safetensors before 0.7 has only mmap."""
    try:
        try:
            return safe_open(str(path), framework="pt", backend="pread")
        except TypeError:
            return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_config(path: str | os.PathLike, parse):
    """`parse(config.json contents)` (e.g. UNetConfig.from_diffusers), any problem reported naming the file."""
    try:
        return parse(read_json(path))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable config ({type(e).__name__}: {e})") from None


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """A .safetensors file as a state dict, read one tensor at a time and converted to `dtype` (floating
    tensors only) as it is read, so peak memory is the result plus one tensor. `keep(key)` selects keys.
    One-line errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    with _open_safetensors(path) as f:
        try:
            return {k: _cast(f.get_tensor(k), dtype).to(device) for k in f.keys() if keep is None or keep(k)}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Any single weight file: safetensors, or a pickle read with weights_only=True (never arbitrary objects).
    Floating tensors are converted to `dtype` one at a time; `keep(key)` selects keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, dtype=dtype, keep=keep)
    sd = _read_pickle(path)
    # mmap=True: each tensor is paged in from the file as it is converted, not all up front.
    return {k: _cast(sd.pop(k), dtype) for k in list(sd) if keep is None or keep(k)}


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or broken files
        raise CheckpointError(f"{path}: cannot be read safely with weights_only=True ({_first_line(e)})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return sd


def read_header(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The keys of a weight file as meta tensors of the stored shapes (nothing is read into memory), and its
    safetensors metadata ({} for pickles): enough to check a file before loading it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in _read_pickle(path).items()}, {}
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    with _open_safetensors(path) as f:
        # Shapes only: the meta tensors' dtype is float32 whatever the file holds.
        return ({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()},
                f.metadata() or {})


def find_weights(folder: str | os.PathLike, stem: str = "diffusion_pytorch_model",
                 variant: str | None = None) -> list[Path]:
    """The weight files of a diffusers component folder: plain, `.fp16` variant, or sharded with an index.

    Preference: the requested variant, then plain safetensors, then the fp16 variant, then .bin (weights_only).
    """
    folder = Path(folder)
    variants = [variant] if variant else []
    variants += [None, "fp16"]
    for v in variants:
        name = f"{stem}.{v}" if v else stem
        for ext in ("safetensors", "bin"):
            single = folder / f"{name}.{ext}"
            if single.is_file():
                return [single]
            index = folder / f"{name}.{ext}.index.json"
            if index.is_file():
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{index}: empty weight_map")
                return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no weights found (expected {stem}.safetensors, a .fp16 variant, "
                          "or a sharded .index.json)")


def read_weights(files: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_state_dict(f, dtype))
    return sd


def check_keys(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError naming the first missing, unexpected or mis-shaped key (with both shapes)."""
    expected = dict(module.state_dict(keep_vars=True))
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {tuple(sd[k].shape)} in the file, "
                                  f"the model expects {tuple(v.shape)}")


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str,
              device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load `sd` into `module` (typically built on the meta device), converting each tensor as it goes.

    Tensors are popped from `sd` one by one and assigned in place, so peak memory is one model plus one tensor.
    """
    check_keys(module, sd, source)
    module.load_state_dict(convert_(sd, device, dtype), strict=True, assign=True)
    sd.clear()
    return module


def convert_(sd: dict[str, torch.Tensor], device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Move and cast the tensors of `sd` in place, one at a time, each made contiguous (layout conversions hand
    over transposed views); the old tensor is released before the next is converted."""
    for name in list(sd):
        sd[name] = _cast(sd.pop(name), dtype).to(device).contiguous()
    return sd


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_json(obj: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)

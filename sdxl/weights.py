"""Weight files in and out: safetensors or weights_only pickles, diffusers file names (plain, `fp16` variant, sharded
index), strict key checks, tensors assigned in place (no two copies of a model), atomic writes (never half a file)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A weight file or folder that cannot be used; the message is one line naming the file."""


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    return path


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_json(path: str | os.PathLike) -> dict:
    path = _existing(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_config(path: str | os.PathLike, parse):
    """`parse(config.json contents)` (e.g. UNetConfig.from_diffusers), any problem reported naming the file."""
    cfg = read_json(path)
    try:
        return parse(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable config ({type(e).__name__}: {e})") from None


def _read(path: str | os.PathLike, from_safetensors: Callable, from_pickle: Callable):
    """`from_safetensors(f)` on a lazy safetensors reader, else `from_pickle(state dict)` of a weights_only pickle."""
    path = _existing(path)
    if path.suffix != ".safetensors":
        try:  # mmap=True: each tensor is paged in from the file as it is converted, not all up front
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or broken files
            raise CheckpointError(f"{path}: cannot be read safely with weights_only=True ({_first_line(e)})") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        return from_pickle(sd)
    try:
        try:
            f = safe_open(str(path), framework="pt", backend="pread")  # frees each tensor when dropped
        except TypeError:  # safetensors before 0.7 has only mmap, which holds every page read until close
            f = safe_open(str(path), framework="pt")
        with f:
            return from_safetensors(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    keep: Callable[[str], bool] | None = None) -> StateDict:
    """A safetensors or weights_only pickle file; floating tensors cast to `dtype` one by one; `keep(k)` picks keys."""
    keep = keep or (lambda k: True)
    return _read(path, lambda f: {k: _cast(f.get_tensor(k), dtype) for k in f.keys() if keep(k)},
                 lambda sd: {k: _cast(sd.pop(k), dtype) for k in list(sd) if keep(k)})


def read_header(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """The keys as meta tensors of the stored shapes (float32 for safetensors) and the metadata ({} for pickles)."""
    return _read(path, lambda f: ({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()},
                                  f.metadata() or {}),
                 lambda sd: ({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}, {}))


def find_weights(folder: str | os.PathLike, stem: str = "diffusion_pytorch_model",
                 variant: str | None = None) -> list[Path]:
    """A diffusers component's weight files: the requested variant, else plain, else fp16; safetensors before .bin."""
    folder = Path(folder)
    for v in ([f".{variant}"] if variant else []) + ["", ".fp16"]:
        for ext in ("safetensors", "bin"):
            if (single := folder / f"{stem}{v}.{ext}").is_file():
                return [single]
            if (index := folder / f"{stem}{v}.{ext}.index.json").is_file():
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{index}: empty weight_map")
                return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no weights found (expected {stem}.safetensors, a .fp16 variant or .index.json)")


def read_weights(files: list[Path], dtype: torch.dtype | None = None) -> StateDict:
    return {k: v for f in files for k, v in read_state_dict(f, dtype).items()}


def check_keys(module: torch.nn.Module, sd: StateDict, source: str) -> None:
    """Raise one CheckpointError naming the first missing, unexpected or mis-shaped key (with both shapes)."""
    expected = dict(module.state_dict(keep_vars=True))
    missing, unexpected = [k for k in expected if k not in sd], [k for k in sd if k not in expected]
    for what, bad in (("missing", missing), ("unexpected", unexpected)):
        if bad:
            raise CheckpointError(f"{source}: {what} key {bad[0]!r} ({len(bad)} {what} in all)")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {tuple(sd[k].shape)} in the file, "
                                  f"the model expects {tuple(v.shape)}")


def load_into(module: torch.nn.Module, sd: StateDict, source: str,
              device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load `sd` into `module` (e.g. built on meta) one tensor at a time: peak memory is one model plus one tensor."""
    check_keys(module, sd, source)
    module.load_state_dict(convert_(sd, device, dtype), strict=True, assign=True)
    sd.clear()
    return module


def convert_(sd: StateDict, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> StateDict:
    """Move, cast and make contiguous (conversions hand over views) each tensor of `sd`, in place, one at a time."""
    for name in list(sd):
        sd[name] = _cast(sd.pop(name), dtype).to(device).contiguous()
    return sd


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a folder; a file or a link (never followed) stays for unlink
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """with atomic_path(path) as tmp: write a file or folder at `tmp`, `<name>.<pid>.tmp` (ranks never share one). On
    success os.replace (atomic) puts it at `path` (a folder there is removed first); on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)  # a folder in the way; a file or a link is replaced atomically
        os.replace(tmp, path)
    finally:  # after os.replace there is nothing left to remove
        _remove(tmp)


def save_safetensors(tensors: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_json(obj: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

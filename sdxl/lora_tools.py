"""LoRA files offline, in kohya's layout: resize the rank by SVD, merge several into one or into a model, extract one
from the difference of two models.

    python -m sdxl.lora_tools resize in.safetensors out.safetensors --rank 8 [--conv_rank 4]
        [--dynamic sv_ratio|sv_fro|sv_cumulative --dynamic_param P]
    python -m sdxl.lora_tools merge a.safetensors:0.7 b.safetensors --out ab.safetensors       (ranks add up)
    python -m sdxl.lora_tools merge a.safetensors:0.7 --model MODEL --out merged.safetensors|merged/
    python -m sdxl.lora_tools extract BASE TUNED out.safetensors --rank 32 [--conv_rank 16]

resize and merge-into-a-file read LoRA / LoCon files (lora_down / lora_up / alpha); merging into a model reads all
that `load_lora` reads. Every output is written under a temporary name and renamed; bad input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .lora import FAMILY_KEY, LoRA, LoRANetwork, save_lora, select
from .model import load_model
from .weights import CheckpointError, atomic_path, read_header, read_state_dict, save_safetensors
from .config import DTYPES

_KEYS = ("lora_down.weight", "lora_up.weight")


class UsageError(ValueError):
    """Input the tools cannot use; one line, exit 2."""


def _read_lora(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """A kohya LoRA / LoCon file as {module: {lora_down.weight, lora_up.weight, alpha}} (fp32) and its metadata."""
    sd, meta = read_state_dict(path), read_header(path)[1] if path.suffix == ".safetensors" else {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        name, _, suffix = key.partition(".")
        if suffix not in (*_KEYS, "alpha"):
            raise UsageError(f"{path}: {key!r} is not a kohya LoRA / LoCon tensor (lora_down.weight, lora_up.weight, "
                             "alpha); LyCORIS kinds and PEFT files can be merged into a model (--model)")
        modules.setdefault(name, {})[suffix] = v.float()
    for name, m in modules.items():
        if not set(_KEYS) <= set(m):
            raise UsageError(f"{path}: module {name!r} lacks lora_down.weight or lora_up.weight")
        m.setdefault("alpha", torch.tensor(float(m["lora_down.weight"].shape[0])))
    if not modules:
        raise UsageError(f"{path}: no tensors")
    return modules, meta


def _write_lora(path: Path, modules: dict[str, dict[str, torch.Tensor]], meta: dict[str, str], dtype) -> None:
    """kohya tensors, with the ss_network_dim / alpha kohya's tools and A1111 show updated to the new ranks."""
    ranks = [m["lora_down.weight"].shape[0] for m in modules.values()]
    meta = {**meta, "ss_network_dim": str(statistics.mode(ranks)),
            "ss_network_alpha": str(statistics.mode(float(m["alpha"]) for m in modules.values()))}
    save_safetensors({f"{n}.{k}": v.to(dtype).contiguous() for n, m in modules.items() for k, v in m.items()}, path,
                     metadata=meta)


def _svd_of_product(up: torch.Tensor, down: torch.Tensor):
    """U, S, Vh of up @ down ((out, r) @ (r, in)) through QR of the factors: r x r work, not out x in."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return (qu @ u).float(), s.float(), (vh @ qd.T).float()


def _new_rank(s: torch.Tensor, cap: int, method: str | None, param: float | None, full: int) -> int:
    """kohya's resize_lora: `cap`, or with a dynamic method the index at which the singular values reach `param`
    (sv_ratio: s > s[0] / param; sv_cumulative: sum; sv_fro: sum of squares vs param^2), clamped to [1, full - 1],
    plus one, at most `cap` (full = min(out, in), the length of kohya's S); 1 for a zero matrix."""
    if s[0] <= 1e-6:
        return 1
    if method == "sv_ratio":
        index = int((s > s[0] / param).sum())
    elif method in ("sv_cumulative", "sv_fro"):
        p = 2 if method == "sv_fro" else 1
        index = int(torch.searchsorted(torch.cumsum(s ** p, 0) / (s ** p).sum(), param ** p)) + 1
    else:
        return min(cap, len(s))
    return min(max(1, min(index, full - 1)) + 1, cap, len(s))


def resize(a) -> None:
    modules, meta = _read_lora(a.input)
    out, kept = {}, {}
    for name, m in tqdm(modules.items(), desc="resize", unit="module"):
        down, up, r = m["lora_down.weight"], m["lora_up.weight"], m["lora_down.weight"].shape[0]
        cap = a.conv_rank or a.rank if down.dim() == 4 else a.rank
        if cap > r and not a.dynamic:
            raise UsageError(f"{a.input}: module {name!r} has rank {r}; a resize to rank {cap} would raise it")
        u, s, vh = _svd_of_product(up.flatten(1), down.flatten(1))
        k = _new_rank(s, cap, a.dynamic, a.dynamic_param, min(up.shape[0], down[0].numel()))
        kept[name] = float((s[:k].square().sum() / s.square().sum().clamp_min(1e-30)).sqrt()) if s[0] > 0 else 1.0
        # kohya: up = U S, down = Vh, alpha = (alpha / r) * k: Delta W keeps its scale
        out[name] = {"lora_down.weight": vh[:k].reshape(k, *down.shape[1:]),
                     "lora_up.weight": (u[:, :k] * s[:k]).reshape(up.shape[0], k, *up.shape[2:]),
                     "alpha": torch.tensor(float(m["alpha"]) / r * k)}
    _write_lora(a.output, out, {**meta, "ss_training_comment": f"resized by sdxl.lora_tools to rank {a.rank}"},
                DTYPES[a.dtype])
    worst = min(kept, key=kept.get)
    print(f"wrote {a.output}: {len(out)} modules; Frobenius norm retained: mean {statistics.mean(kept.values()):.2%}, "
          f"min {kept[worst]:.2%} ({worst})")


def _spec(text: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE."""
    path, _, scale = text.rpartition(":")
    try:
        return Path(path), float(scale)
    except ValueError:
        return Path(text), 1.0


def merge(a) -> None:
    specs = [_spec(s) for s in a.loras]
    if a.model is not None:  # into the model's weights: any kind and layout load_lora reads
        model = load_model(a.model)
        for path, scale in tqdm(specs, desc="merge", unit="file"):
            model.load_lora(path, scale)
        if a.out.suffix == ".safetensors":
            if not hasattr(model, "save_single_file"):
                raise UsageError(f"{a.model}: this model family is saved as a folder; give --out a folder")
            model.save_single_file(a.out, dtype=DTYPES[a.dtype])
        else:
            with atomic_path(a.out) as tmp:
                model.to(DTYPES[a.dtype]).save_pretrained(tmp)
        print(f"wrote {a.out}")
        return
    merged: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    families, meta = set(), {}
    for path, scale in tqdm(specs, desc="merge", unit="file"):
        modules, file_meta = _read_lora(path)
        meta = meta or file_meta
        families.add(file_meta.get(FAMILY_KEY, "latent"))
        for name, m in modules.items():
            down, up = m["lora_down.weight"], m["lora_up.weight"]
            parts = merged.setdefault(name, [])
            if parts and (parts[0][0].shape[1:], parts[0][1].shape[0]) != (down.shape[1:], up.shape[0]):
                raise UsageError(f"{path}: module {name!r} has down {tuple(down.shape)} / up {tuple(up.shape)}, "
                                 f"unlike the files before it (another model's LoRA?)")
            parts.append((down, up * (scale * float(m["alpha"]) / down.shape[0])))  # its whole scale on up
    if len(families) > 1:
        raise UsageError(f"these LoRAs are for different model families ({', '.join(sorted(families))})")
    # Ranks side by side with alpha = the total rank (scale 1): Delta W = sum_i m_i (alpha_i / r_i) up_i @ down_i.
    out = {n: {"lora_down.weight": torch.cat([d for d, _ in p]), "lora_up.weight": torch.cat([u for _, u in p], 1),
               "alpha": torch.tensor(float(sum(d.shape[0] for d, _ in p)))} for n, p in merged.items()}
    _write_lora(a.out, out, {**meta, FAMILY_KEY: families.pop(), "ss_training_comment": "merged by sdxl.lora_tools: "
                             + json.dumps([f"{p}:{s}" for p, s in specs])}, DTYPES[a.dtype])
    print(f"wrote {a.out}: {len(out)} modules from {len(specs)} files")


@torch.no_grad()
def extract(a) -> None:
    base, tuned = load_model(a.base), load_model(a.tuned)
    if base.family != tuned.family:
        raise UsageError(f"{a.tuned}: a {tuned.family} model; {a.base} is a {base.family} one")
    targets = select(base, "all+conv" if a.conv_rank else "all", text_encoders=True)
    theirs = select(tuned, "all+conv" if a.conv_rank else "all", text_encoders=True)
    adapters, kept = {}, []
    for name, t in tqdm(targets.items(), desc="extract", unit="layer"):
        w = t.module.weight
        if name not in theirs or theirs[name].module.weight.shape != w.shape:
            raise UsageError(f"{a.tuned}: no layer {name} of shape {tuple(w.shape)} (not a tuned {a.base})")
        diff = (theirs[name].module.weight.float() - w.float()).flatten(1).to(a.device)  # (out, in * kh * kw)
        if diff.abs().max() <= a.min_diff:
            continue
        r = min(a.conv_rank if w.dim() == 4 and w.shape[2:] != (1, 1) else a.rank, *diff.shape)
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        adapter = LoRA(t.module, r, alpha=r)  # scale 1: up = U S, down = Vh, as kohya (without its clamping)
        adapter.lora_up.weight.copy_((u[:, :r] * s[:r]).reshape(adapter.lora_up.weight.shape))
        adapter.lora_down.weight.copy_(vh[:r].reshape(adapter.lora_down.weight.shape))
        adapters[name] = adapter
        kept.append(math.sqrt(float(s[:r].square().sum() / s.square().sum())))
    if not adapters:
        raise UsageError(f"{a.tuned}: no layer differs from {a.base} by more than --min_diff {a.min_diff}")
    net = LoRANetwork({n: targets[n] for n in adapters}, adapters,
                      {"kind": "lora", "family": base.family, "conv_rank": a.conv_rank, "conv_alpha": a.conv_rank})
    save_lora(a.out, net, dtype=DTYPES[a.dtype], metadata={"ss_training_comment": f"extracted by sdxl.lora_tools "
                                                           f"from {a.base} and {a.tuned}"})
    print(f"wrote {a.out}: {len(adapters)} layers; Frobenius norm of the difference retained: mean "
          f"{statistics.mean(kept):.2%}, min {min(kept):.2%}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdxl.lora_tools", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("resize", help="lower a LoRA's rank by SVD (kohya's resize_lora)")
    r.add_argument("input", type=Path)
    r.add_argument("output", type=Path)
    r.add_argument("--rank", type=int, required=True, help="the new rank (with --dynamic: the largest)")
    r.add_argument("--conv_rank", type=int, help="the new rank of conv modules (default --rank)")
    r.add_argument("--dynamic", choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                   help="choose each module's rank from its singular values S: sv_ratio keeps S > S[0] / P, "
                        "sv_fro keeps that fraction P of the Frobenius norm, sv_cumulative of sum(S)")
    r.add_argument("--dynamic_param", type=float, help="P for --dynamic")
    r.set_defaults(run=resize)
    m = sub.add_parser("merge", help="several LoRAs into one (ranks concatenated) or into a model's weights")
    m.add_argument("loras", nargs="+", metavar="FILE[:SCALE]")
    m.add_argument("--out", type=Path, required=True, help="a .safetensors file, or a folder (with --model)")
    m.add_argument("--model", help="merge into this model (diffusers folder, single file, preset) and write it")
    m.set_defaults(run=merge)
    e = sub.add_parser("extract", help="a LoRA approximating TUNED - BASE, by SVD per layer")
    e.add_argument("base")
    e.add_argument("tuned")
    e.add_argument("out", type=Path)
    e.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1 conv layers")
    e.add_argument("--conv_rank", type=int, help="also extract 3x3 convs (LoCon), at this rank")
    e.add_argument("--min_diff", type=float, default=0.0, help="skip layers whose largest change is not above this")
    e.add_argument("--device", default="cpu", help="where the SVDs run (e.g. cuda)")
    e.set_defaults(run=extract)
    for sp in (r, m, e):
        sp.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written tensors")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "resize" and (a.rank < 1 or (a.conv_rank or 1) < 1 or (a.dynamic is None) != (
                a.dynamic_param is None)):
            raise UsageError("--rank and --conv_rank must be at least 1, and --dynamic needs --dynamic_param")
        a.run(a)
    except (CheckpointError, UsageError, FileNotFoundError) as err:
        print(f"lora_tools {a.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

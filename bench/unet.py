"""UNet speed and memory: ours vs diffusers' UNet2DConditionModel, same config, same weights, same inputs.

    python bench/unet.py                 # CPU: a ~50M-parameter SDXL-shaped config, fp32, 256 px
    python bench/unet.py --full          # GPU: sdxl-base at 1024 px (128x128 latents), bf16, batch 1 and 8,
                                         #      gradient checkpointing off/on, eager and torch.compile

Runs are interleaved (ref, ours, ref, ours, ...) and the median is reported, so drift in clocks or other load
hits both alike. Writes bench/results/<device>-unet.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdxl.config import SDXL_BASE, UNetConfig  # noqa: E402
from sdxl.unet import UNet  # noqa: E402

# SDXL-shaped (3 levels, attention at levels 1-2, 64-wide heads, text_time embedding) at ~50M parameters.
CPU_CONFIG = UNetConfig(block_out_channels=(96, 192, 384), transformer_depth=(0, 1, 1), mid_transformer_depth=1,
                        num_attention_heads=(2, 3, 6), cross_attention_dim=384, pooled_dim=256,
                        addition_time_embed_dim=64)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def build(cfg: UNetConfig, device, dtype):
    from diffusers import UNet2DConditionModel  # the reference; bench/ and tests/ may import it
    kw = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**kw).to(device, dtype)
    ours = UNet(cfg).to(device, dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def make_inputs(cfg: UNetConfig, batch: int, latent: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0][:cfg.num_time_ids]] * batch, device=device)
    return (r(batch, cfg.in_channels, latent, latent), torch.full((batch,), 500.0, device=device),
            r(batch, 77, cfg.cross_attention_dim), r(batch, cfg.pooled_dim), ids.to(dtype))


def step_fn(model, is_ref: bool, args, train: bool):
    x, t, ctx, pooled, ids = args

    def fwd():
        if is_ref:
            return model(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        return model(x, t, ctx, pooled, ids)

    def run():
        if train:
            out = fwd()
            out.float().square().mean().backward()
            for p in model.parameters():
                p.grad = None
        else:
            with torch.no_grad():
                fwd()
    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict, device, warmup: int, iters: int) -> dict:
    """Interleaved timing; peak memory per function measured on its own run. On the CPU the clock is this
    process's CPU time (run with one thread), so other load on a shared machine does not skew the ratio."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = {k: [] for k in fns}
    peaks = {}
    for k, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync(device)
            peaks[k] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in range(iters):
        for k, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[k].append(clock() - t0)
    return {k: {"median_s": statistics.median(v), "peak_gib": peaks.get(k)} for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the sdxl-base config at 1024 px (GPU)")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--latent", type=int, default=None, help="latent side (128 = 1024 px)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)  # CPU time of one thread: a stable measure on a shared machine
    cfg = SDXL_BASE.unet if a.full else CPU_CONFIG
    dtype = torch.bfloat16 if gpu else torch.float32
    latent = a.latent or (128 if a.full else 32)
    batches = a.batch or ([1, 8] if a.full else [2])
    iters = a.iters or (10 if gpu else 5)
    modes = ["eager"] + (["compile"] if gpu and not a.no_compile else [])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ref, ours = build(cfg, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device {device_name(device)}  params {n_params / 1e6:.1f}M  latent {latent}  dtype {dtype}")
    rows = []
    for mode in modes:
        r_m, o_m = (torch.compile(ref), torch.compile(ours)) if mode == "compile" else (ref, ours)
        for ckpt in (False, True):
            ref.train(ckpt), ours.train(ckpt)
            if ckpt:
                ref.enable_gradient_checkpointing()
            else:
                ref.disable_gradient_checkpointing()
            ours.set_gradient_checkpointing(ckpt)
            for batch in batches:
                args = make_inputs(cfg, batch, latent, device, dtype)
                for train in ((True,) if ckpt else (False, True)):  # checkpointing only matters with a backward
                    res = measure({"reference": step_fn(r_m, True, args, train),
                                   "ours": step_fn(o_m, False, args, train)}, device, 2 if gpu else 1, iters)
                    row = {"mode": mode, "grad_ckpt": ckpt, "batch": batch, "pass": "fwd+bwd" if train else "fwd",
                           **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("median_s", "peak_gib")},
                           "time_ratio": res["ours"]["median_s"] / res["reference"]["median_s"]}
                    rows.append(row)
                    mem = ("" if not gpu else f"  peak ref {row['reference_peak_gib']:.2f} GiB "
                                              f"ours {row['ours_peak_gib']:.2f} GiB")
                    print(f"{mode:8s} ckpt={str(ckpt):5s} batch={batch} {row['pass']:8s} "
                          f"ref {row['reference_median_s'] * 1e3:9.1f} ms  ours {row['ours_median_s'] * 1e3:9.1f} ms"
                          f"  ratio {row['time_ratio']:.3f}{mem}")
    import diffusers
    result = {"bench": "unet", "device": device_name(device), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "date": datetime.date.today().isoformat(), "config": "sdxl-base" if a.full else "cpu-56m",
              "params": n_params, "latent": latent, "dtype": str(dtype).replace("torch.", ""), "rows": rows}
    out = Path(a.out or Path(__file__).parent / "results" / f"{device_name(device)}-unet.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

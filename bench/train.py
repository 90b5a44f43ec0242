"""Training-step speed and memory: ours vs diffusers' UNet doing the same step (cached latents and text).

    python bench/train.py            # CPU: the ~56M-parameter SDXL-shaped config of bench/unet.py, 256 px, fp32
    python bench/train.py --full     # GPU: sdxl-base at 1024 px, bf16 autocast over fp32 masters, AdamW,
                                     #      batch 1 and 8, gradient checkpointing off/on, LoRA rank 4 and full

One step = forward, MSE loss, backward, optimizer step, zero grad. Interleaved runs, median; peak memory per
configuration on its own run. Full fine-tunes also report TFLOP/s against 20.3 TFLOP per 1024 px image.
Writes bench/results/<device>-train.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet import CPU_CONFIG, build, device_name, make_inputs, measure  # noqa: E402

from sdxl import lora  # noqa: E402
from sdxl.config import SDXL_BASE  # noqa: E402

TFLOP_PER_IMAGE = 20.3  # sdxl-base, 1024 px, forward + backward (REFERENCE.md)


def setup(ref, ours, mode: str, ckpt: bool):
    """Trainable parameters of each side for `mode` (lora: rank 4 on attention q/k/v; full: every weight)."""
    for m in (ref, ours):
        m.requires_grad_(mode == "full")
        m.train()
    if ckpt:
        ref.enable_gradient_checkpointing()
    else:
        ref.disable_gradient_checkpointing()
    ours.set_gradient_checkpointing(ckpt)
    if mode == "full":
        return list(ref.parameters()), list(ours.parameters()), None
    from peft import LoraConfig  # the reference's LoRA
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v"]))
    net = lora.inject(ours, "attention", rank=4, alpha=4).to(next(ours.parameters()).device)
    return [p for p in ref.parameters() if p.requires_grad], list(net.parameters()), net


def step_fn(model, is_ref, params, args, autocast_dtype, device):
    x, t, ctx, pooled, ids = args
    opt = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda")

    def run():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            if is_ref:
                out = model(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            else:
                out = model(x, t, ctx, pooled, ids)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--modes", nargs="+", default=["lora", "full"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--matmul_tflops", type=float, default=None, help="measured bf16 matmul peak of this GPU")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)  # measure() then uses process CPU time: stable on a shared machine
    cfg = SDXL_BASE.unet if a.full else CPU_CONFIG
    latent = 128 if a.full else 32
    autocast_dtype = torch.bfloat16 if gpu else torch.float32
    batches = a.batch or ([1, 8] if a.full else [2])
    iters = a.iters or (10 if gpu else 3)
    peak = a.matmul_tflops
    if gpu and peak is None:  # measure the bf16 matmul peak once (8192^3)
        m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            m @ m
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            m @ m
        end.record()
        torch.cuda.synchronize()
        peak = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
        del m
    rows = []
    for mode in a.modes:
        for ckpt in (False, True):
            for batch in batches:
                ref, ours = build(cfg, device, torch.float32)  # fp32 masters; autocast does the bf16 compute
                try:
                    ref_params, our_params, _ = setup(ref, ours, mode, ckpt)
                    args = make_inputs(cfg, batch, latent, device, torch.float32)
                    res = measure({"reference": step_fn(ref, True, ref_params, args, autocast_dtype, device),
                                   "ours": step_fn(ours, False, our_params, args, autocast_dtype, device)},
                                  device, 2 if gpu else 1, iters)
                except torch.OutOfMemoryError:
                    rows.append({"mode": mode, "grad_ckpt": ckpt, "batch": batch, "oom": True})
                    print(f"{mode:4s} ckpt={ckpt!s:5s} batch={batch}: out of memory")
                    continue
                finally:
                    del ref, ours
                    if gpu:
                        torch.cuda.empty_cache()
                row = {"mode": mode, "grad_ckpt": ckpt, "batch": batch,
                       "trainable_params": sum(p.numel() for p in our_params),
                       **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("median_s", "peak_gib")}}
                for k in ("reference", "ours"):
                    row[f"{k}_images_per_s"] = batch / row[f"{k}_median_s"]
                row["speedup"] = row["ours_images_per_s"] / row["reference_images_per_s"]
                if a.full and peak:
                    row["ours_tflops"] = TFLOP_PER_IMAGE * row["ours_images_per_s"]
                    row["ours_mfu_vs_matmul_peak"] = row["ours_tflops"] / peak
                rows.append(row)
                mem = f"  peak ref {row['reference_peak_gib']:.2f} ours {row['ours_peak_gib']:.2f} GiB" if gpu else ""
                print(f"{mode:4s} ckpt={ckpt!s:5s} batch={batch}  ref {row['reference_images_per_s']:8.3f} img/s  "
                      f"ours {row['ours_images_per_s']:8.3f} img/s  speedup {row['speedup']:.3f}{mem}")
    import diffusers
    result = {"bench": "train", "device": device_name(device), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "date": datetime.date.today().isoformat(), "config": "sdxl-base" if a.full else "cpu-56m",
              "latent": latent, "autocast": str(autocast_dtype).replace("torch.", ""),
              "matmul_peak_tflops": peak, "rows": rows}
    out = Path(__file__).parent / "results" / f"{device_name(device)}-train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

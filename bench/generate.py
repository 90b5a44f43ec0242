"""Text -> image latency: our generate() vs diffusers' StableDiffusionXLPipeline on the same weights and noise.

    python bench/generate.py             # CPU: a small SDXL-shaped model, fp32, 256 px, 8 steps, batch 1 and 4
    python bench/generate.py --full      # GPU: sdxl-base (random weights), bf16, 1024 px, 30 steps, CFG 5,
                                         #      batch 1 and 4, eager and torch.compile (UNet)

Both sides run the whole pipeline: text encoding, the sampler loop with CFG, VAE decode, PIL images. The
reference is loaded with from_pretrained from the folder our save_pretrained wrote, so the weights, scheduler and
tokenizers are the same. Runs are interleaved (ref, ours, ref, ours, ...) and the median is reported. Peak memory
(GPU) is torch.cuda.max_memory_allocated during one call, less the other side's weights, which stay resident.
On CPU the clock is the process's CPU time with one thread (--threads), so other load on a shared machine does not
bias the ratio; on GPU it is wall time.
Goal on an H100 at batch 1: <= 1.5 s per image (>= 20 UNet steps/s with CFG) and below the reference's time.
Writes bench/results/<device>-generate.json (ratios only on CPU, where absolute times mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sampling import generate  # noqa: E402
from sdxl.config import PRESETS, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig  # noqa: E402
from sdxl.model import build_model  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
# SDXL-shaped at CPU scale: 3 UNet levels with attention at 1-2, two small CLIP towers (64 + 128 = 192 wide
# context), a 4-level VAE.
_TE1 = TextEncoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
SMALL = ModelConfig(
    unet=UNetConfig(block_out_channels=(64, 128, 256), transformer_depth=(0, 1, 1), mid_transformer_depth=1,
                    num_attention_heads=(1, 2, 4), cross_attention_dim=192, pooled_dim=128,
                    addition_time_embed_dim=32, sample_size=32),
    vae=VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=256),
    text_encoder=_TE1,
    text_encoder_2=TextEncoderConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=512, hidden_act="gelu", projection_dim=128, pad_token="!"),
)
CONFIGS = {"small": SMALL, **PRESETS}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def build(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, folder: Path):
    """Ours (random init on the device) and the reference pipeline loaded from our save_pretrained folder."""
    from diffusers import StableDiffusionXLPipeline  # the reference; bench/ and tests/ may import it
    torch.manual_seed(0)
    with torch.device(device):
        ours = build_model(cfg)
    ours = ours.to(device=device, dtype=dtype).eval().requires_grad_(False)
    ours.save_pretrained(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return ours, pipe


def module_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="sdxl-base at 1024 px, 30 steps, bf16 (GPU)")
    p.add_argument("--config", choices=list(CONFIGS), default=None, help="default: sdxl-base with --full, else small")
    p.add_argument("--size", type=int, default=None, help="image side (default 1024 with --full, else 256)")
    p.add_argument("--steps", type=int, default=None, help="default 30 with --full, else 8")
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="default: 1 4")
    p.add_argument("--iters", type=int, default=None, help="timed runs per side (default 5 on GPU, 3 on CPU)")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                   help="also time with the UNets compiled (auto: on GPU only)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only; default 1)")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    config = a.config or ("sdxl-base" if a.full else "small")
    size, steps = a.size or (1024 if a.full else 256), a.steps or (30 if a.full else 8)
    batches = a.batch
    iters = a.iters or (5 if gpu else 3)
    dtype = torch.bfloat16 if gpu else torch.float32
    modes = ["eager"] + (["compile"] if a.compile == "yes" or (a.compile == "auto" and gpu) else [])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if gpu else time.process_time
    import diffusers
    diffusers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        ours, pipe = build(CONFIGS[config], device, dtype, Path(tmp))
    n_params = sum(t.numel() for t in ours.unet.parameters())
    print(f"device {device_name(device)}  config {config} (UNet {n_params / 1e6:.1f}M)  {size}px  {steps} steps  "
          f"CFG {a.cfg_scale:g}  {str(dtype).replace('torch.', '')}")
    other_bytes = {"reference": module_bytes(ours), "ours": module_bytes(pipe.unet, pipe.vae, pipe.text_encoder,
                                                                          pipe.text_encoder_2)}
    f = ours.vae.config.downsample_factor
    rows = []
    for mode in modes:
        if mode == "compile":
            torch._dynamo.config.cache_size_limit = 64
            ours.unet.compile(dynamic=False)  # in place: attributes (config, device, dtype) stay reachable
            pipe.unet.compile(dynamic=False)
        for batch in batches:
            g = torch.Generator().manual_seed(0)
            latents = torch.randn(batch, ours.unet.config.in_channels, size // f, size // f, generator=g)
            prompts = [PROMPT] * batch
            out = {}

            def run_ref():
                out["reference"] = pipe(prompts, height=size, width=size, num_inference_steps=steps,
                                        guidance_scale=a.cfg_scale, latents=latents.to(device, dtype)).images

            def run_ours():
                out["ours"] = generate(ours, prompts, height=size, width=size, steps=steps,
                                       guidance_scale=a.cfg_scale, sampler="euler", latents=latents)

            fns = {"reference": run_ref, "ours": run_ours}
            peaks = {}
            for name, fn in fns.items():  # warm-up (compilation included), then one run for peak memory
                for _ in range(2 if gpu else 1):
                    fn()
                if gpu:
                    sync(device)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    fn()
                    sync(device)
                    peaks[name] = (torch.cuda.max_memory_allocated(device) - other_bytes[name]) / 2**30
            times = {k: [] for k in fns}
            for _ in range(iters):
                for name, fn in fns.items():
                    sync(device)
                    t0 = clock()
                    fn()
                    sync(device)
                    times[name].append(clock() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            diff = max(np.abs(np.asarray(r, dtype=np.int16) - np.asarray(o, dtype=np.int16)).max()
                       for r, o in zip(out["reference"], out["ours"]))
            row = {"mode": mode, "batch": batch, "time_ratio": med["ours"] / med["reference"],
                   "max_pixel_diff": int(diff)}
            if gpu:  # absolute figures only where they mean something
                for k in fns:
                    row[f"{k}_median_s"] = med[k]
                    row[f"{k}_s_per_image"] = med[k] / batch
                    row[f"{k}_images_per_s"] = batch / med[k]
                    row[f"{k}_peak_gib"] = peaks[k]
                    # Lower bound on UNet steps/s (each one batched cond + uncond): the whole call's time.
                    row[f"{k}_steps_per_s"] = steps / med[k]
                row["peak_ratio"] = peaks["ours"] / peaks["reference"]
            rows.append(row)
            mem = f"  peak ref {peaks['reference']:.2f} GiB ours {peaks['ours']:.2f} GiB" if gpu else ""
            print(f"{mode:8s} batch={batch}  ref {med['reference']:8.3f} s  ours {med['ours']:8.3f} s  "
                  f"ratio {row['time_ratio']:.3f}  ({batch / med['ours']:.2f} img/s ours){mem}  "
                  f"max pixel diff {diff}")
            if gpu and batch == 1 and config == "sdxl-base" and size == 1024:
                met = med["ours"] <= 1.5 and med["ours"] < med["reference"]
                print(f"         goal (<= 1.5 s/image at batch 1, below the reference): {'met' if met else 'NOT met'}")

    result = {"bench": "generate", "device": device_name(device), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "date": datetime.date.today().isoformat(), "config": config, "unet_params": n_params,
              "size": size, "steps": steps, "cfg_scale": a.cfg_scale, "sampler": "euler",
              "dtype": str(dtype).replace("torch.", ""), "iters": iters,
              "clock": "wall" if gpu else "process CPU time", "rows": rows}
    path = Path(a.out or Path(__file__).parent / "results" / f"{device_name(device)}-generate.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

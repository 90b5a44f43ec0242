"""Generate image sets with SDXL on one or many GPUs, as COCO-style folders for evaluation (FID, CLIP score).

    python generate.py --pretrained_model tiny --prompt "a red circle" --num-images 4 --image-size 64 \
        --steps 8 --output-dir out/gen
    python generate.py --pretrained_model stable-diffusion-xl-base-1.0 --prompt-file captions.json \
        --num-images 30000 --batch-size 8 --num-gpus 8 --output-dir out/coco30k

Image i uses prompt i mod P and seed + i, so the images do not depend on the number of GPUs or on restarts:
rerunning over the same folder skips finished images and never duplicates an entry.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model", "--pretrained-model", default="tiny",
                   help="a diffusers folder, an original-layout .safetensors file, or a preset (tiny, sdxl-base)")
    p.add_argument("--checkpoint", default=None,
                   help="a training output: its final/ folder (full fine-tune) or lora_final.safetensors is used")
    p.add_argument("--lora-checkpoint", "--lora_checkpoint", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA file with an optional scale (repeatable)")
    p.add_argument("--vae", default=None, help="a replacement VAE folder or file (e.g. the fp16-fix VAE)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt-file", "--prompt_file", default=None,
                   help="a text file (one prompt a line) or a COCO captions JSON")
    p.add_argument("--negative-prompt", "--negative_prompt", default=None)
    p.add_argument("--num-images", "--num_images", type=int, default=None,
                   help="images to make (default: one per prompt)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1)
    p.add_argument("--image-size", "--image_size", type=int, default=1024)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg-scale", "--cfg_scale", type=float, default=5.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-gpus", "--num_gpus", type=int, default=None,
                   help="worker processes, one per GPU (default: all visible GPUs; 1 CPU process when none)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="UNet / text encoder dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--output-dir", "--output_dir", default="out/generated")
    p.add_argument("--output-format", "--output_format", choices=["coco", "simple"], default="coco")
    return p.parse_args(argv)


class UsageError(Exception):
    pass


def build_settings(a: argparse.Namespace):
    import torch

    from sampling.coco import read_prompts
    from sampling.workers import Settings
    from sdxl.samplers import resolve_sampler

    if a.prompt_file:
        prompts = read_prompts(a.prompt_file)
    elif a.prompt is not None:
        prompts = [a.prompt]
    else:
        raise UsageError("give --prompt or --prompt-file")
    height, width = a.height or a.image_size, a.width or a.image_size
    resolve_sampler(a.sampler)  # unknown name -> ValueError listing the known ones
    for name, v in (("--num-images", a.num_images), ("--batch-size", a.batch_size), ("--steps", a.steps)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    model, loras = a.pretrained_model, []
    if a.checkpoint:
        ckpt = Path(a.checkpoint)
        if (ckpt / "final" / "model_index.json").is_file():
            model = str(ckpt / "final")
        elif (ckpt / "lora_final.safetensors").is_file():
            loras.append((str(ckpt / "lora_final.safetensors"), 1.0))
        elif (ckpt / "model_index.json").is_file() or ckpt.is_file():
            model = str(ckpt)
        else:
            raise UsageError(f"{ckpt}: not a training output (no final/ or lora_final.safetensors)")
    for spec in a.lora_checkpoint:
        path, _, scale = spec.rpartition(":") if spec.rpartition(":")[2].replace(".", "", 1).lstrip(
            "-").isdigit() else (spec, "", "1")
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such LoRA file")
        loras.append((path, float(scale)))
    gpu = torch.cuda.is_available()
    return Settings(model=model, out_dir=a.output_dir, fmt=a.output_format, prompts=prompts,
                    negative_prompt=a.negative_prompt, seed=a.seed, height=height, width=width, steps=a.steps,
                    cfg_scale=a.cfg_scale, sampler=a.sampler, batch_size=a.batch_size,
                    precision=a.precision or ("bf16" if gpu else "fp32"), vae=a.vae, loras=loras,
                    model_name=Path(model).stem if Path(model).exists() else model)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from sampling.coco import ImageFolder
    from sampling.workers import run
    from sdxl.weights import CheckpointError

    try:
        s = build_settings(a)
        if s.height % 8 or s.width % 8 or min(s.height, s.width) <= 0:
            raise UsageError(f"image size {s.width}x{s.height} must be positive multiples of 8")
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    num = a.num_images or len(s.prompts)
    folder = ImageFolder(s.out_dir, s.fmt)
    done = folder.scan()
    pending = [i for i in range(num) if i not in done]
    n_workers = a.num_gpus if a.num_gpus is not None else max(1, torch.cuda.device_count())
    if torch.cuda.is_available() and n_workers > torch.cuda.device_count():
        print(f"generate.py: error: --num-gpus {n_workers} but only {torch.cuda.device_count()} visible",
              file=sys.stderr)
        return 2
    print(f"{num} images ({len(done)} already done) -> {folder.root} [{s.fmt}], {n_workers} worker(s)")
    if not pending:
        folder.write_index()
        return 0
    try:
        run(s, pending, folder, n_workers, num)
    except (CheckpointError, ValueError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("generate.py: interrupted; finished images are kept, rerun to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

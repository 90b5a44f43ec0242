"""Generate image sets with SDXL on one or many GPUs, as COCO-style folders for evaluation (FID, CLIP score).

    python generate.py --pretrained_model tiny --prompt "a red circle" --num-images 4 --image-size 64 \\
        --steps 8 --output-dir out/gen
    python generate.py --pretrained_model stable-diffusion-xl-base-1.0 --prompt-file captions.json \\
        --num-images 30000 --batch-size 8 --num-gpus 8 --output-dir out/coco30k

Image i uses prompt i mod P and seed + i, and batch k holds images kB .. kB+B-1, so the images do not depend on
the number of GPUs or on restarts: rerunning over the same folder skips finished images and never duplicates an
entry (a killed run loses only the images in flight). Output: --output-format coco writes
<out>/images/<12-digit id>.png and <out>/annotations/captions.json; simple writes <out>/<6-digit index>.png and
<out>/prompts.txt. Each PNG carries its settings in an A1111-style `parameters` text chunk.
Bad input (prompt file, size, sampler, model or LoRA file) exits with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model", "--pretrained-model", default="tiny",
                   help="a diffusers folder, an original-layout .safetensors file, a pixel-space model folder, or "
                        "a preset (tiny, sdxl-base, pixel-demo, ...; random weights) (default: tiny)")
    p.add_argument("--checkpoint", default=None,
                   help="a training output: its final/ folder (full fine-tune) or lora_final.safetensors is used")
    p.add_argument("--lora-checkpoint", "--lora_checkpoint", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA file with an optional scale, merged into the model (repeatable)")
    p.add_argument("--vae", default=None, help="a replacement VAE folder or file (e.g. the fp16-fix VAE)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="one prompt for every image")
    g.add_argument("--prompt-file", "--prompt_file", default=None,
                   help="a UTF-8 text file (one prompt a line, blank lines skipped) or a COCO captions .json "
                        "(its captions in annotation order); image i uses prompt i mod P")
    p.add_argument("--negative-prompt", "--negative_prompt", default=None, help="one negative prompt for all images")
    p.add_argument("--num-images", "--num_images", type=int, default=None,
                   help="images to make (default: one per prompt)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1, help="images per forward pass, per worker")
    p.add_argument("--image-size", "--image_size", type=int, default=1024,
                   help="height and width in pixels, a multiple of 8 (of the patch size times the body's "
                        "downsampling for a pixel model) (default: 1024)")
    p.add_argument("--height", type=int, default=None, help="overrides --image-size")
    p.add_argument("--width", type=int, default=None, help="overrides --image-size")
    p.add_argument("--steps", type=int, default=30, help="sampler steps (default: 30)")
    p.add_argument("--cfg-scale", "--cfg_scale", type=float, default=5.0,
                   help="classifier-free guidance scale; <= 1 disables guidance (default: 5)")
    p.add_argument("--sampler", default="euler",
                   help="a sampler of sdxl/samplers.py: euler, euler_ancestral, heun, ddim, dpmpp_2m, dpmpp_2m_sde, "
                        "..., <name>_karras for Karras sigmas; an unknown name lists them all (default: euler)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    p.add_argument("--num-gpus", "--num_gpus", type=int, default=None,
                   help="worker processes, one per GPU (default: all visible GPUs); on a machine without GPUs, "
                        "that many CPU worker processes (default: 1)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--output-dir", "--output_dir", default="out/generated",
                   help="created if needed; finished images there are kept and skipped (default: out/generated)")
    p.add_argument("--output-format", "--output_format", choices=["coco", "simple"], default="coco",
                   help="coco: images/ + annotations/captions.json; simple: numbered PNGs + prompts.txt")
    return p.parse_args(argv)


class UsageError(Exception):
    pass


def parse_lora(spec: str) -> tuple[str, float]:
    """"FILE[:SCALE]" -> (file, scale); a colon not followed by a number belongs to the path."""
    path, _, scale = spec.rpartition(":")
    try:
        return path, float(scale)
    except ValueError:
        return spec, 1.0


def build_settings(a: argparse.Namespace):
    from sampling.coco import read_prompts
    from sampling.workers import Settings
    from sdxl.config import PRESETS
    from sdxl.samplers import resolve_sampler

    if a.prompt_file:
        prompts = read_prompts(a.prompt_file)
    elif a.prompt is not None:
        prompts = [a.prompt]
    else:
        raise UsageError("give --prompt or --prompt-file")
    height, width = a.height or a.image_size, a.width or a.image_size
    # Every family's sides are multiples of 8 (checked here, before the output folder is read); a model with a
    # larger multiple (a pixel model's patch times its body's downsampling) checks its own once loaded.
    if height % 8 or width % 8 or min(height, width) <= 0:
        raise UsageError(f"image size {width}x{height} must be positive multiples of 8")
    resolve_sampler(a.sampler)  # unknown name -> ValueError listing the known ones
    for name, v in (("--num-images", a.num_images), ("--batch-size", a.batch_size), ("--steps", a.steps),
                    ("--num-gpus", a.num_gpus)):
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
    if model not in PRESETS and not Path(model).exists():
        raise UsageError(f"{model}: no such model file or folder, and not a preset ({', '.join(PRESETS)})")
    if a.vae and not Path(a.vae).exists():
        raise UsageError(f"{a.vae}: no such VAE file or folder")
    for spec in a.lora_checkpoint:
        path, scale = parse_lora(spec)
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such LoRA file")
        loras.append((path, scale))
    import torch
    gpu = torch.cuda.is_available()
    return Settings(model=model, out_dir=a.output_dir, fmt=a.output_format, prompts=prompts,
                    negative_prompt=a.negative_prompt, seed=a.seed, height=height, width=width,
                    steps=a.steps, cfg_scale=a.cfg_scale, sampler=a.sampler, batch_size=a.batch_size,
                    precision=a.precision or ("bf16" if gpu else "fp32"), vae=a.vae, loras=loras,
                    model_name=Path(model).stem if Path(model).exists() else model)


def check_existing(folder, s, num: int) -> None:
    """Finished images must have been made with these settings: a folder never mixes two runs' images."""
    for i in sorted(folder.records):
        found, want = folder.records[i].parameters, s.parameters(i)
        if i < num and found != want:
            diff = next((f"this run: {w!r}, the file: {f!r}"
                         for f, w in zip(found.split("\n"), want.split("\n")) if f != w), "another negative prompt")
            raise UsageError(f"{folder.path(i)} was made with other settings ({diff[:200]}); rerun with the same "
                             "settings or use another --output-dir")


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        s = build_settings(a)
    except (UsageError, ValueError) as e:  # ValueError: unreadable prompt file, unknown sampler
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    import torch

    from sampling.coco import ImageFolder
    from sampling.workers import LoadError, WorkerError, run

    num = a.num_images or len(s.prompts)
    n_workers = a.num_gpus or max(1, torch.cuda.device_count())
    folder = ImageFolder(s.out_dir, s.fmt)
    try:
        if torch.cuda.is_available() and n_workers > torch.cuda.device_count():
            raise UsageError(f"--num-gpus {n_workers} but only {torch.cuda.device_count()} GPU(s) visible")
        done = folder.scan()
        check_existing(folder, s, num)
    except UsageError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    folder.remove_partial()
    pending = [i for i in range(num) if i not in done]
    where = f"{n_workers} GPU worker(s)" if torch.cuda.is_available() else f"{n_workers} CPU worker(s)"
    print(f"{num} images ({num - len(pending)} already done) -> {folder.root} [{s.fmt}], {where}", flush=True)
    if not pending:
        folder.write_index()  # repairs an index a killed run left behind
        return 0
    try:
        run(s, pending, folder, n_workers, num)
    except LoadError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:  # a worker failed while generating: its traceback is in the message
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the index was rewritten after each finished batch
        print("generate.py: interrupted; finished images are kept, rerun to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
Bad input (prompt file, size, sampler, model or LoRA file, init images and masks, strength, refiner) exits with
code 2 and one line on stderr.

    python generate.py --pretrained_model sdxl-base-folder --prompt "a (red:1.3) fox" --prompt-weighting \\
        --init-image photos/ --mask-image masks/ --strength 0.8 --refiner sdxl-refiner-folder --refiner-switch 0.8
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
    p.add_argument("--grid", type=int, default=None, metavar="N",
                   help="also write <output-dir>/grid.png, a contact sheet of the first N images with their prompts")
    g = p.add_argument_group("image to image, inpainting, the refiner, prompt emphasis")
    g.add_argument("--init-image", "--init_image", default=None,
                   help="img2img: an image file for every prompt, or a folder whose images (sorted by name) go to "
                        "the prompts by index; resized to the output size")
    g.add_argument("--mask-image", "--mask_image", default=None,
                   help="inpainting: a mask file or folder as --init-image (white = repaint), each the size of its "
                        "init image")
    g.add_argument("--cycle", action="store_true",
                   help="an --init-image / --mask-image folder with fewer images than prompts reuses them in turn")
    g.add_argument("--strength", type=float, default=0.6,
                   help="img2img / inpainting: the noise level the init image starts from, in (0, 1]; about "
                        "strength x steps steps run (default: 0.6)")
    g.add_argument("--refiner", default=None,
                   help="a refiner model (folder, file or preset) that takes over at --refiner-switch")
    g.add_argument("--refiner-switch", "--refiner_switch", type=float, default=0.8,
                   help="the fraction of the denoising the base model does, in (0, 1) (default: 0.8)")
    g.add_argument("--aesthetic-score", "--aesthetic_score", type=float, default=6.0,
                   help="a refiner's aesthetic-score conditioning (default: 6)")
    g.add_argument("--negative-aesthetic-score", "--negative_aesthetic_score", type=float, default=2.5,
                   help="the same for the negative branch (default: 2.5)")
    g.add_argument("--prompt-weighting", "--prompt_weighting", action="store_true",
                   help="A1111 emphasis: (word), (word:1.3), [word], \\( for a literal bracket, BREAK for a new "
                        "75-token chunk (default: off, brackets are text)")
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def image_files(path: str, flag: str, num_prompts: int, cycle: bool) -> list[str]:
    """One file, or a folder's images sorted by name, at least one per prompt unless --cycle."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if not p.is_dir():
        raise UsageError(f"{p}: no such {flag} file or folder")
    files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files or (len(files) < num_prompts and not cycle):
        raise UsageError(f"{p}: {len(files)} images for {num_prompts} prompts (add --cycle to use them in turn)")
    return files


def image_size(path: str) -> tuple[int, int]:
    from PIL import Image
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except OSError:
        raise UsageError(f"{path}: not a readable image") from None


def check_images(a: argparse.Namespace, num_prompts: int) -> tuple[list[str], list[str]]:
    """The init images and masks of --init-image / --mask-image, each mask the size of its init image."""
    if a.mask_image and not a.init_image:
        raise UsageError("--mask-image needs --init-image")
    if not a.init_image:
        return [], []
    if not 0 < a.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {a.strength}")
    if int(a.steps * a.strength) < 1:
        raise UsageError(f"--strength {a.strength} with --steps {a.steps} runs no step")
    inits = image_files(a.init_image, "--init-image", num_prompts, a.cycle)
    masks = image_files(a.mask_image, "--mask-image", num_prompts, a.cycle) if a.mask_image else []
    for init, mask in sorted({(inits[k % len(inits)], masks[k % len(masks)] if masks else "")
                              for k in range(num_prompts)}):  # each pair once
        size = image_size(init)
        if mask and image_size(mask) != size:
            raise UsageError(f"{mask}: the mask is {'x'.join(map(str, image_size(mask)))}, its init image {init} "
                             f"is {'x'.join(map(str, size))}")
    return inits, masks


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
                    ("--num-gpus", a.num_gpus), ("--grid", a.grid)):
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
    inits, masks = check_images(a, min(len(prompts), a.num_images or len(prompts)))  # the prompts in use
    if a.refiner and a.refiner not in PRESETS and not Path(a.refiner).exists():
        raise UsageError(f"{a.refiner}: no such refiner file or folder, and not a preset")
    if a.refiner and not 0 < a.refiner_switch < 1:
        raise UsageError(f"--refiner-switch must be in (0, 1), got {a.refiner_switch}")
    import torch
    gpu = torch.cuda.is_available()
    return Settings(model=model, out_dir=a.output_dir, fmt=a.output_format, prompts=prompts,
                    negative_prompt=a.negative_prompt, seed=a.seed, height=height, width=width,
                    steps=a.steps, cfg_scale=a.cfg_scale, sampler=a.sampler, batch_size=a.batch_size,
                    precision=a.precision or ("bf16" if gpu else "fp32"), vae=a.vae, loras=loras,
                    model_name=Path(model).stem if Path(model).exists() else model, init_images=inits, masks=masks,
                    strength=a.strength, refiner=a.refiner, refiner_switch=a.refiner_switch,
                    aesthetic_score=a.aesthetic_score, negative_aesthetic_score=a.negative_aesthetic_score,
                    prompt_weighting=a.prompt_weighting)


def check_existing(folder, s, num: int) -> None:
    """Finished images must have been made with these settings: a folder never mixes two runs' images."""
    for i in sorted(folder.records):
        found, want = folder.records[i].parameters, s.parameters(i)
        if i < num and found != want:
            diff = next((f"this run: {w!r}, the file: {f!r}"
                         for f, w in zip(found.split("\n"), want.split("\n")) if f != w), "another negative prompt")
            raise UsageError(f"{folder.path(i)} was made with other settings ({diff[:200]}); rerun with the same "
                             "settings or use another --output-dir")


def write_grid(folder, n: int | None) -> None:
    """<out>/grid.png: the first n images (cells of at most 256 px) with their prompts under them."""
    if not n:
        return
    from PIL import Image

    from training.logging import image_grid, save_png
    first = sorted(folder.records)[:n]
    images = [Image.open(folder.path(i)).convert("RGB") for i in first]
    save_png(image_grid(images, [folder.records[i].caption for i in first], cell=256), folder.root / "grid.png")
    print(f"wrote {folder.root / 'grid.png'} ({len(first)} images)")


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
        write_grid(folder, a.grid)
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
    write_grid(folder, a.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate image sets with SDXL on one or many GPUs, as COCO-style folders for evaluation (FID, CLIP score).

    python generate.py --pretrained_model tiny --prompt "a red circle" --num-images 4 --image-size 64 \\
        --steps 8 --output-dir out/gen
    python generate.py --pretrained_model stable-diffusion-xl-base-1.0 --prompt-file captions.json \\
        --num-images 30000 --batch-size 8 --num-gpus 8 --output-dir out/coco30k
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 generate.py \\
        --pretrained_model sdxl-base-folder --prompt-file captions.json --num-images 30000 --batch-size 8 \\
        --compile --output-dir /shared/coco30k    # an output folder every node sees

Image i uses prompt i mod P and seed + i, and batch k holds images kB .. kB+B-1, so the images do not depend on
the number of GPUs or on restarts: rerunning over the same folder skips finished images and never duplicates an
entry (a killed run loses only the images in flight). Output: --output-format coco writes
<out>/images/<12-digit id>.png and <out>/annotations/captions.json; simple writes <out>/<6-digit index>.png and
<out>/prompts.txt. Each PNG carries its settings in an A1111-style `parameters` text chunk.
Bad input (prompt file, size, sampler, model or LoRA file, init images and masks, strength, refiner, ControlNet and
control images) exits with code 2 and one line on stderr.

    python generate.py --pretrained_model sdxl-base-folder --prompt "a (red:1.3) fox" --prompt-weighting \\
        --init-image photos/ --mask-image masks/ --strength 0.8 --refiner sdxl-refiner-folder --refiner-switch 0.8
    python generate.py --pretrained_model sdxl-base-folder --prompt-file prompts.txt --controlnet canny-folder \\
        --control-image edges/ --controlnet-scale 0.7 --control-guidance-end 0.8
"""
from __future__ import annotations

import argparse
import os
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
                        "that many CPU worker processes (default: 1). One node only: across nodes start generate.py "
                        "with torchrun, each process on its LOCAL_RANK GPU")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", nargs="?", const="unet", choices=["unet", "blocks"], default=None,
                   help="torch.compile the UNet once the LoRAs are merged: unet (the default) = one graph, the most "
                        "fusion; blocks = each transformer / ResNet block, quicker to compile. The first batch "
                        "(and a smaller last one) pays the compile time")
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
    g = p.add_argument_group("ControlNet")
    g.add_argument("--controlnet", default=None,
                   help="a ControlNet for the model's UNet: a diffusers folder or a single file (diffusers or "
                        "original names)")
    g.add_argument("--control-image", "--control_image", default=None,
                   help="its conditioning image (an edge map, depth, pose...): a file for every prompt, or a folder "
                        "as --init-image; resized to the output size")
    g.add_argument("--controlnet-scale", "--controlnet_scale", type=float, default=1.0,
                   help="the weight of its residuals (default: 1)")
    g.add_argument("--control-guidance-start", "--control_guidance_start", type=float, default=0.0,
                   help="the fraction of the steps after which it starts acting (default: 0)")
    g.add_argument("--control-guidance-end", "--control_guidance_end", type=float, default=1.0,
                   help="the fraction of the steps after which it stops (default: 1)")
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


def check_control(a: argparse.Namespace, num_prompts: int) -> list[str]:
    """The control images of --control-image, each readable, with a --controlnet file or folder."""
    if bool(a.controlnet) != bool(a.control_image):
        raise UsageError("--controlnet and --control-image go together")
    if not a.controlnet:
        return []
    if not Path(a.controlnet).exists():
        raise UsageError(f"{a.controlnet}: no such ControlNet file or folder")
    if not 0 <= a.control_guidance_start < a.control_guidance_end <= 1:
        raise UsageError(f"--control-guidance-start {a.control_guidance_start} and --control-guidance-end "
                         f"{a.control_guidance_end}: need 0 <= start < end <= 1")
    files = image_files(a.control_image, "--control-image", num_prompts, a.cycle)
    for f in sorted({files[k % len(files)] for k in range(num_prompts)}):
        image_size(f)
    return files


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
    controls = check_control(a, min(len(prompts), a.num_images or len(prompts)))
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
                    prompt_weighting=a.prompt_weighting, controlnet=a.controlnet, control_images=controls,
                    controlnet_scale=a.controlnet_scale,
                    control_guidance=(a.control_guidance_start, a.control_guidance_end), compile=a.compile)


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


def error(message, rank: int = 0) -> None:
    if rank == 0:  # under torchrun every rank meets the same error: one line
        print(f"generate.py: error: {message}", file=sys.stderr)


def pending_images(folder, s, num: int, n_workers: int, d) -> list[int] | str:
    """Rank 0 reads the folder (its finished images must have these settings) and clears a killed run's leftovers;
    every rank gets the indices to make, or the error message (the same plan everywhere, read once)."""
    import torch

    from training.distributed import gather_objects
    out = None
    if d.is_main:
        try:
            if not d.enabled and torch.cuda.is_available() and n_workers > torch.cuda.device_count():
                raise UsageError(f"--num-gpus {n_workers} but only {torch.cuda.device_count()} GPU(s) visible")
            done = folder.scan()
            check_existing(folder, s, num)
            folder.remove_partial()
            out = [i for i in range(num) if i not in done]
        except UsageError as e:
            out = str(e)
    return gather_objects(out, d)[0]  # rank 0's, before any rank writes


def main(argv=None) -> int:
    a = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    try:
        s = build_settings(a)
        if world > 1 and a.num_gpus not in (None, 1):
            raise UsageError("--num-gpus is for one node; under torchrun each process uses one device (LOCAL_RANK)")
    except (UsageError, ValueError) as e:  # ValueError: unreadable prompt file, unknown sampler
        error(e, rank)
        return 2
    import torch

    from sampling.coco import ImageFolder
    from sampling.workers import LoadError, WorkerError, run, run_distributed
    from training import distributed

    num = a.num_images or len(s.prompts)
    n_workers = world if world > 1 else a.num_gpus or max(1, torch.cuda.device_count())
    folder = ImageFolder(s.out_dir, s.fmt)
    d = distributed.init() if world > 1 else distributed.Dist()  # gloo on CPU, nccl on GPUs
    try:
        pending = pending_images(folder, s, num, n_workers, d)
        if isinstance(pending, str):
            error(pending, d.rank)
            return 2
        kind = "GPU" if torch.cuda.is_available() else "CPU"
        where = f"{world} {kind} processes (torchrun)" if d.enabled else f"{n_workers} {kind} worker(s)"
        if d.is_main:
            print(f"{num} images ({num - len(pending)} already done) -> {folder.root} [{s.fmt}], {where}", flush=True)
        if not pending:
            if d.is_main:
                folder.write_index()  # repairs an index a killed run left behind
                write_grid(folder, a.grid)
            return 0
        if d.enabled:
            run_distributed(s, pending, folder, num, d)
        else:
            run(s, pending, folder, n_workers, num)
    except LoadError as e:
        error(e, d.rank)
        return 2
    except WorkerError as e:  # a worker failed while generating: its traceback is in the message
        error(e)
        return 1
    except KeyboardInterrupt:  # the index was rewritten after each finished batch
        print("generate.py: interrupted; finished images are kept, rerun to continue", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup(d)
    if d.is_main:
        write_grid(folder, a.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

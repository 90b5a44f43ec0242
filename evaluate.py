"""Score an image set: FID and KID against a reference set, and CLIP score against the images' prompts.

    python evaluate.py --images out/coco30k --reference coco/val2014 --metrics fid,kid,clip \\
        --inception weights-inception-2015-12-05-6726825d.pth --clip-model clip-vit-large-patch14 --out results.json
    python evaluate.py --images out/a --reference coco/val2014 --save-ref-stats coco.npz --metrics fid
    python evaluate.py --images out/b --ref-stats coco.npz --metrics fid,kid --num-gpus 8

--images and --reference take the folders generate.py writes (coco: images/ + annotations/captions.json; simple:
numbered PNGs + prompts.txt) or any folder of images (png, jpg, webp, bmp; converted to RGB).
FID and KID are torchmetrics' FrechetInceptionDistance and KernelInceptionDistance over the features of
torch-fidelity's Inception (the 2048-d pool features, torchmetrics' resize to 299), so they match what torchmetrics
reports for the same images; the standard weights are downloaded once unless --inception gives the file.
CLIP score is torchmetrics' definition, 100 * max(cos(image, caption), 0) averaged over the images, computed with
transformers directly (torchmetrics 1.9's CLIPScore fails on transformers 5, whose get_image_features returns an
output object) from a local CLIP folder; the per-image scores go to <out>.clip.csv.
Features are extracted by one worker per GPU (--num-gpus), each on a fixed slice of the images.
Bad input exits with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import queue as queue_mod
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

METRICS = ("fid", "kid", "clip")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_INCEPTION = "torch-fidelity pt_inception-2015-12-05 (downloaded)"


class UsageError(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="the folder to score (generate.py's coco or simple output, or "
                                                   "any folder of images)")
    p.add_argument("--reference", default=None, help="the reference images for FID/KID (e.g. COCO val2014)")
    p.add_argument("--ref-stats", "--ref_stats", default=None, metavar="FILE.npz",
                   help="reference features saved by --save-ref-stats, instead of --reference")
    p.add_argument("--save-ref-stats", "--save_ref_stats", default=None, metavar="FILE.npz",
                   help="write the reference's Inception features here for later --ref-stats runs")
    p.add_argument("--metrics", default="fid,kid,clip", help="comma-separated: fid, kid, clip (default: all)")
    p.add_argument("--inception", default=None, metavar="FILE",
                   help="torch-fidelity's Inception weights (.pth) for offline machines (default: downloaded once)")
    p.add_argument("--feature", type=int, choices=[64, 192, 768, 2048], default=2048,
                   help="the Inception layer FID and KID compare (torchmetrics' `feature`): 2048 is the published "
                        "FID; a smaller one suits sets of fewer images than dimensions (default: 2048)")
    p.add_argument("--clip-model", "--clip_model", default=None, metavar="FOLDER",
                   help="a local transformers CLIP folder (model + tokenizer + image processor), for clip")
    p.add_argument("--batch-size", "--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--num-gpus", "--num_gpus", type=int, default=None,
                   help="worker processes, one per GPU (default: all visible GPUs; 1 CPU process without GPUs)")
    p.add_argument("--kid-subsets", "--kid_subsets", type=int, default=100, help="KID subsets (default: 100)")
    p.add_argument("--kid-subset-size", "--kid_subset_size", type=int, default=1000,
                   help="images per KID subset, capped at the smaller set (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of KID's subset draws (default: 0)")
    p.add_argument("--out", default="results.json", help="the JSON results; per-image CLIP scores go to "
                                                         "<out without .json>.clip.csv (default: results.json)")
    return p.parse_args(argv)


# ---- reading image folders --------------------------------------------------------------------------------------

def read_captions(root: Path) -> dict[str, str]:
    """file name -> caption, from generate.py's captions.json (coco) or prompts.txt (simple); {} when neither."""
    coco, simple = root / "annotations" / "captions.json", root / "prompts.txt"
    try:
        if coco.is_file():
            data = json.loads(coco.read_text(encoding="utf-8"))
            names = {im["id"]: im["file_name"] for im in data["images"]}
            captions: dict[str, str] = {}
            for a in data["annotations"]:  # the first caption of each image
                captions.setdefault(names[a["image_id"]], a["caption"])
            return captions
        if simple.is_file():
            return dict(line.split("\t", 1) for line in simple.read_text(encoding="utf-8").splitlines() if line)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{coco if coco.is_file() else simple}: unreadable caption index ({e})") from None
    return {}


def list_images(folder: str, need_captions: bool = False) -> tuple[list[Path], list[str] | None]:
    """The folder's images in name order (coco layout: those in images/) and, when asked, the caption of each."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder")
    image_dir = root / "images" if (root / "annotations" / "captions.json").is_file() else root
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) \
        if image_dir.is_dir() else []
    if not files:
        raise UsageError(f"{image_dir}: no images (png, jpg, webp, bmp) in the folder")
    if not need_captions:
        return files, None
    index, captions = read_captions(root), []
    for p in files:
        caption = index.get(p.name)
        if caption is None and p.suffix.lower() == ".png":
            with Image.open(p) as im:  # generate.py's PNGs carry their prompt; only the chunks are read
                caption = im.text.get("caption")
        if caption is None:
            raise UsageError(f"{p}: no caption for this image (CLIP score needs generate.py's captions.json, "
                             "prompts.txt or PNG caption chunks)")
        captions.append(caption)
    return files, captions


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # palette, grey, RGBA, CMYK: all scored as RGB
    except OSError as e:
        raise UsageError(f"{path}: unreadable image ({e})") from None


# ---- models ------------------------------------------------------------------------------------------------------

def check_inception(path: str | None) -> str:
    """A fingerprint of the Inception weights (a saved reference must come from the same network)."""
    if path is None:
        return DEFAULT_INCEPTION
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such Inception weights file")
    try:  # torch-fidelity unpickles the file itself; it gets it only once it is known to hold plain tensors
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a weights file"
        raise UsageError(f"{path}: not a PyTorch weights file ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise UsageError(f"{path}: not torch-fidelity's Inception weights (no Mixed_7c)")
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()[:16]


def load_inception(path: str | None, feature: int, device):
    """torchmetrics' NoTrainInceptionV3: torch-fidelity's network behind the resize FrechetInceptionDistance uses."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                              feature_extractor_weights_path=path).to(device)


def check_clip(folder: str) -> None:
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "clip":
        raise UsageError(f"{folder}: not a transformers CLIP folder (config.json model_type is {model_type!r}, "
                         "not 'clip')")


def load_clip(folder: str, device):
    """(model, processor) of a local CLIP folder; a UsageError naming the folder when it does not load."""
    from transformers import CLIPModel, CLIPProcessor
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{folder}: cannot load the CLIP model ({str(e).splitlines()[0][:200]})") from None
    return model, processor


# ---- feature extraction (one worker per device) -----------------------------------------------------------------

@dataclass
class Job:
    """What one worker computes over its slice: Inception features of every file, CLIP scores of captioned ones."""
    files: list[Path]
    captions: list[str | None]  # None: no CLIP score for this file (a reference image)
    inception: str | None
    use_inception: bool
    feature: int
    clip_model: str | None
    batch_size: int


def clip_scores(model, processor, images: list[Image.Image], captions: list[str], device) -> torch.Tensor:
    """100 * max(cos(image, caption), 0) per image (torchmetrics' CLIPScore, before its average)."""
    max_len = model.config.text_config.max_position_embeddings  # longer captions are truncated, as torchmetrics does
    inputs = processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True,
                       max_length=max_len).to(device)
    img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
    txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"]).pooler_output)
    return 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).clamp_min(0)


@torch.no_grad()
def extract(job: Job, device, progress=lambda n: None) -> tuple[np.ndarray | None, np.ndarray]:
    """(Inception features (N, feature) float32 or None, CLIP scores (N,), NaN where there is no caption)."""
    inception = load_inception(job.inception, job.feature, device) if job.use_inception else None
    clip = load_clip(job.clip_model, device) if job.clip_model else None
    features, scores = [], np.full(len(job.files), np.nan, dtype=np.float64)
    for start in range(0, len(job.files), job.batch_size):
        images = [load_rgb(p) for p in job.files[start:start + job.batch_size]]
        if inception is not None:  # the network's input is one size per batch: group by size, keep the order
            out = [None] * len(images)
            for size in dict.fromkeys(im.size for im in images):
                idx = [i for i, im in enumerate(images) if im.size == size]
                x = torch.from_numpy(np.stack([np.asarray(images[i]) for i in idx])).permute(0, 3, 1, 2)  # HWC->CHW
                for i, f in zip(idx, inception(x.to(device)).float().cpu()):
                    out[i] = f
            features.append(torch.stack(out))
        caps = job.captions[start:start + job.batch_size]
        idx = [i for i, c in enumerate(caps) if c is not None]
        if clip is not None and idx:
            s = clip_scores(*clip, [images[i] for i in idx], [caps[i] for i in idx], device)
            scores[[start + i for i in idx]] = s.double().cpu().numpy()
        progress(len(images))
    return (torch.cat(features).numpy() if features else None), scores


def _worker(rank: int, device: str, threads: int, job: Job, results) -> None:
    try:
        torch.set_num_threads(threads)  # workers share the cores
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        results.put(("done", rank, extract(job, device, lambda n: results.put(("progress", rank, n)))))
    except UsageError as e:
        results.put(("usage", rank, str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails with it
        results.put(("error", rank, f"worker {rank} on {device}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def extract_sharded(job: Job, num_workers: int) -> tuple[np.ndarray | None, np.ndarray]:
    """extract() over `num_workers` processes (worker r takes files r, r + W, ...), results in file order."""
    n = len(job.files)
    num_workers = max(1, min(num_workers, n))
    bar = tqdm(total=n, unit="img", desc="features", dynamic_ncols=True)
    if num_workers == 1:
        with bar:
            return extract(job, "cuda:0" if torch.cuda.is_available() else "cpu", bar.update)
    import multiprocessing as mp
    gpu = torch.cuda.is_available()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ctx, parts = mp.get_context("spawn"), {}  # CUDA cannot be forked
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, daemon=True, args=(
        r, f"cuda:{r}" if gpu else "cpu", max(1, cpus // num_workers),
        Job(job.files[r::num_workers], job.captions[r::num_workers], job.inception, job.use_inception,
            job.feature, job.clip_model, job.batch_size), results)) for r in range(num_workers)]
    for p in procs:
        p.start()
    try:
        while len(parts) < num_workers:
            try:
                kind, rank, payload = results.get(timeout=1)
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) or not any(p.is_alive() for p in procs):
                    raise RuntimeError("a feature worker died without reporting") from None
                continue
            if kind == "progress":
                bar.update(payload)
            elif kind == "done":
                parts[rank] = payload
            else:
                raise (UsageError if kind == "usage" else RuntimeError)(payload)
    finally:
        bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    feats = np.zeros((n, job.feature), np.float32) if job.use_inception else None
    scores = np.zeros(n)
    for r, (f, s) in parts.items():
        if feats is not None:
            feats[r::num_workers] = f
        scores[r::num_workers] = s
    return feats, scores


# ---- the metrics ------------------------------------------------------------------------------------------------

def fid_kid(real: np.ndarray, fake: np.ndarray, metrics: list[str], subsets: int, subset_size: int,
            seed: int) -> dict:
    """torchmetrics' FID and KID over features already extracted (its `feature` module is then the identity)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    identity = torch.nn.Identity()
    identity.num_features = real.shape[1]  # torchmetrics sizes its state from this instead of a dummy forward
    out = {}
    if "fid" in metrics:
        fid = FrechetInceptionDistance(feature=identity)
        for feats, is_real in ((real, True), (fake, False)):
            for chunk in np.array_split(feats, max(1, len(feats) // 4096)):  # bounds the float64 outer products
                fid.update(torch.from_numpy(chunk), real=is_real)
        out["fid"] = fid.compute().item()
    if "kid" in metrics:
        with warnings.catch_warnings():  # its note that it keeps every feature: so does this script, by design
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=identity, subsets=subsets, subset_size=subset_size)
        kid.update(torch.from_numpy(real), real=True)
        kid.update(torch.from_numpy(fake), real=False)
        torch.manual_seed(seed)  # KID draws its subsets with torch's global generator
        mean, std = kid.compute()
        out.update(kid_mean=mean.item(), kid_std=std.item(), kid_subsets=subsets, kid_subset_size=subset_size)
    return out


def read_ref_stats(path: str, inception: str, feature: int) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, made_with = z["features"], str(z["inception"])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: not a reference statistics file from --save-ref-stats ({e})") from None
    if made_with != inception:
        raise UsageError(f"{path}: made with other Inception weights ({made_with}; this run: {inception})")
    if feats.ndim != 2 or feats.shape[1] != feature:
        raise UsageError(f"{path}: holds features of shape {feats.shape}; this run compares --feature {feature}")
    if len(feats) < 2:
        raise UsageError(f"{path}: holds {len(feats)} reference image(s); FID and KID need at least 2")
    return feats


def write_ref_stats(path: str, feats: np.ndarray, inception: str) -> None:
    from sdxl.weights import atomic_path
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the name
        np.savez(f, features=feats, inception=np.array(inception))


def plan(a: argparse.Namespace) -> tuple[list[str], list[Path], list[str] | None, list[Path]]:
    """Check the arguments before any model loads: (metrics, images, captions, reference images)."""
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    if not metrics or any(m not in METRICS for m in metrics):
        raise UsageError(f"--metrics {a.metrics!r}: choose from {', '.join(METRICS)}")
    for name, v in (("--batch-size", a.batch_size), ("--num-gpus", a.num_gpus), ("--kid-subsets", a.kid_subsets),
                    ("--kid-subset-size", a.kid_subset_size)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    if "clip" in metrics and not a.clip_model:
        raise UsageError("--metrics clip needs --clip-model FOLDER (a local transformers CLIP folder)")
    files, captions = list_images(a.images, need_captions="clip" in metrics)
    if "clip" in metrics:
        check_clip(a.clip_model)
    inception_metrics = [m for m in metrics if m in ("fid", "kid")]
    reference: list[Path] = []
    if inception_metrics or a.save_ref_stats:
        if (a.reference is None) == (a.ref_stats is None):
            raise UsageError(f"--metrics {','.join(inception_metrics) or 'fid'} needs --reference DIR or "
                             "--ref-stats FILE.npz (one of them)")
        if a.ref_stats and not Path(a.ref_stats).is_file():
            raise UsageError(f"{a.ref_stats}: no such reference statistics file")
        if a.reference:
            reference, _ = list_images(a.reference)
            if len(reference) < 2:
                raise UsageError(f"{a.reference}: {len(reference)} reference image; FID and KID need at least 2")
        if inception_metrics and len(files) < 2:
            raise UsageError(f"{a.images}: {len(files)} image; FID and KID need at least 2")
    return metrics, files, captions, reference


def report(results: dict, a: argparse.Namespace, files: list[Path], captions, scores: np.ndarray) -> None:
    """The JSON, the per-image CLIP CSV, and the table on stdout."""
    from sdxl.weights import atomic_path, save_json
    out = Path(a.out)
    if "clip_score" in results:
        results["clip_csv"] = str(out.with_suffix(".clip.csv"))
        with atomic_path(results["clip_csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "caption", "clip_score"])
            w.writerows((p.name, c, f"{s:.4f}") for p, c, s in zip(files, captions, scores))
    save_json(results, out)
    rows = [("images", f"{results['num_images']}  {a.images}")]
    if "num_reference" in results:
        rows.append(("reference", f"{results['num_reference']}  {results['reference']}"))
    if "fid" in results:
        rows.append(("FID", f"{results['fid']:.4f}"))
    if "kid_mean" in results:
        rows.append(("KID", f"{results['kid_mean']:.6f} +- {results['kid_std']:.6f} "
                            f"({results['kid_subsets']} subsets of {results['kid_subset_size']})"))
    if "clip_score" in results:
        rows.append(("CLIP score", f"{results['clip_score']:.4f}  (per image: {results['clip_csv']})"))
    print("\n".join(f"{k:<12} {v}" for k, v in rows) + f"\nwrote {out}")


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        metrics, files, captions, reference = plan(a)
        inception = check_inception(a.inception) if reference or a.ref_stats else None
        ref_feats = read_ref_stats(a.ref_stats, inception, a.feature) if a.ref_stats else None
        n_workers = a.num_gpus or max(1, torch.cuda.device_count())
        if torch.cuda.is_available() and n_workers > torch.cuda.device_count():
            raise UsageError(f"--num-gpus {n_workers} but only {torch.cuda.device_count()} GPU(s) visible")
        use_inception = inception is not None and any(m in metrics for m in ("fid", "kid"))
        job = Job(files + reference, (captions or [None] * len(files)) + [None] * len(reference), a.inception,
                  use_inception or bool(reference), a.feature, a.clip_model if "clip" in metrics else None,
                  a.batch_size)
        feats, scores = extract_sharded(job, n_workers)
    except UsageError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    results = {"images": str(a.images), "num_images": len(files), "metrics": metrics}
    if reference:
        ref_feats = feats[len(files):]
        if a.save_ref_stats:
            write_ref_stats(a.save_ref_stats, ref_feats, inception)
    if ref_feats is not None:
        results.update(reference=a.reference or a.ref_stats, num_reference=len(ref_feats), inception=inception,
                       feature=a.feature)
    if use_inception:
        size = min(a.kid_subset_size, len(ref_feats), len(files))
        results.update(fid_kid(ref_feats, feats[:len(files)], metrics, a.kid_subsets, size, a.seed))
    if "clip" in metrics:
        results.update(clip_model=a.clip_model, clip_score=float(scores[:len(files)].mean()))
    report(results, a, files, captions, scores[:len(files)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-pipeline throughput: decode + bucket + resize + crop images/s, and latent-cache lookups/s.

    python bench/data.py [--images 64] [--size 1500x1100] [--image_size 1024] [--workers 0 2]

Generates JPEGs (smooth noise, quality 90) in a temp folder, then times a full pass through a DataLoader with a
BucketBatchSampler for each worker count, and item loading from a latent cache built with a fake encoder.
CPU only; prints a table (and the cpu count, since the figures scale with cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.buckets import BucketBatchSampler  # noqa: E402
from training.cache import LatentCache  # noqa: E402
from training.data import collate, open_dataset  # noqa: E402


def make_images(folder: str, n: int, w: int, h: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        # low-frequency noise upsampled: compresses like a photo, not like white noise
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(f"{folder}/{i:04d}.jpg", quality=90)
        with open(f"{folder}/{i:04d}.txt", "w") as f:
            f.write(f"image {i}, tag, masterpiece, safe")


def images_per_s(ds, batch_size: int, workers: int) -> float:
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    t = time.perf_counter()
    n = sum(batch["pixels"].shape[0] for batch in loader)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", default="1500x1100")
    p.add_argument("--image_size", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    w, h = map(int, args.size.split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        make_images(data, args.images, w, h)
        ds = open_dataset(data, image_size=args.image_size, random_crop=True, flip_aug=True)
        print(f"{args.images} JPEGs {w}x{h} -> {args.image_size} px buckets, {os.cpu_count()} CPUs, "
              f"torch threads 1, batch {args.batch_size}")
        print(ds.bucket_table())
        images_per_s(ds, args.batch_size, 0)  # warm the page cache
        for workers in args.workers:
            print(f"decode+bucket+crop, {workers} workers: {images_per_s(ds, args.batch_size, workers):7.1f} images/s")

        lat = LatentCache(os.path.join(tmp, "cache"), "bench", flip_aug=True)
        cached = open_dataset(data, image_size=args.image_size, flip_aug=True, latent_cache=lat)
        t = time.perf_counter()
        lat.build(cached, lambda x: F.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4], progress=False)
        print(f"cache build (fake 8x pool encoder): {len(cached) / (time.perf_counter() - t):7.1f} images/s")
        for label, fn in [("is_complete scan (stat + digest memo)", lambda: lat.is_complete(cached)),
                          ("dataset[i] from the latent cache", lambda: [cached[i] for i in range(len(cached))])]:
            fn()
            reps, t = 5, time.perf_counter()
            for _ in range(reps):
                fn()
            print(f"{label}: {reps * len(cached) / (time.perf_counter() - t):9.0f} lookups/s")
        fresh = LatentCache(os.path.join(tmp, "cache"), "bench", flip_aug=True)
        t = time.perf_counter()
        fresh.is_complete(cached)
        print(f"first lookup in a new run (hashes every file's bytes): "
              f"{len(cached) / (time.perf_counter() - t):9.0f} lookups/s")


if __name__ == "__main__":
    main()

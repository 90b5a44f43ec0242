"""Aspect-ratio bucketing: bucket resolutions, assignment, resize + crop, and the batch plan.

Buckets (kohya / NovelAI style): for every width w in [min_side, max_side] in steps of `step`, the tallest height h
(a multiple of `step`, <= max_side) with w * h <= image_size^2, plus the transposed (h, w) and the square. Sizes are
(height, width) in pixels; `step` is 64 px for latent SDXL (its published buckets), 32 for the pixel codec. At 1024
this gives 33 of the SDXL paper's 40 sizes: the rule keeps one size per side length (960 x 1024 is not one).

An image (w, h) goes to the bucket minimising |log(w / h) - log(bw / bh)|, is resized (antialiased LANCZOS) by
s = max(bw / w, bh / h) to cover it, then cropped to (bh, bw); `crop_top_left` = (top, left) of the crop in the
*resized* image, as SDXL and kohya feed it to the UNet.

`BucketBatchSampler` plans each epoch as global batches of batch_size * world_size images of one bucket; rank r takes
the slice [r * batch_size, (r + 1) * batch_size) of each. The plan is a pure function of (bucket ids, seed, epoch), so
resuming is `sampler.set_epoch(epoch, position)`, position = the batches the loop took this epoch (micro-batches when
accumulating: a DataLoader prefetches, so only the loop can count them). A bucket's short last batch repeats its
first images in this epoch's order (every image at least once an epoch), or is dropped with drop_last.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence

from PIL import Image

Bucket = tuple[int, int]  # (height, width) in pixels


def make_buckets(image_size: int = 1024, step: int = 64, min_side: int | None = None,
                 max_side: int | None = None) -> list[Bucket]:
    """Bucket resolutions of about image_size^2 pixels, sides multiples of `step`, sorted by aspect (w / h);
    min_side / max_side default to image_size / 2 and image_size * 2 (the span of the SDXL paper's list)."""
    min_side = image_size // 2 if min_side is None else min_side
    max_side = image_size * 2 if max_side is None else max_side
    if step <= 0 or not (step <= min_side <= image_size <= max_side):
        raise ValueError(f"need 0 < step <= min_side <= image_size <= max_side, got step={step}, "
                         f"min_side={min_side}, image_size={image_size}, max_side={max_side}")
    max_area = image_size * image_size
    square = image_size // step * step
    buckets = {(square, square)}
    for w in range(min_side // step * step or step, max_side + 1, step):
        h = min(max_side, max_area // w // step * step)
        if h >= min_side:
            buckets |= {(h, w), (w, h)}
    return sorted(buckets, key=lambda b: (b[1] / b[0], b[1]))


def nearest_bucket(buckets: Sequence[Bucket], width: int, height: int) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) to width / height."""
    r = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - r))


def crop_coords(size: tuple[int, int], bucket: Bucket,
                rng: random.Random | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized_w, resized_h), (top, left)) for an image of size (w, h): cover the bucket, crop center or random."""
    w, h = size
    bh, bw = bucket
    s = max(bw / w, bh / h)
    # max() guards the rounding: the resized image must never be smaller than the bucket.
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    if rng is None:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    return (rw, rh), (top, left)


def resize_and_crop(img: Image.Image, bucket: Bucket, rng: random.Random | None = None, *,
                    original_size: tuple[int, int] | None = None, flip: bool = False,
                    resample: int = Image.Resampling.LANCZOS, reducing_gap: float = 3.0,
                    ) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `img` to cover `bucket` and crop it (center when rng is None); returns (crop, (top, left)).

    The geometry is computed on `original_size` (w, h), default img.size, so `img` may be a reduced decode (JPEG
    draft). Only the crop's box is resampled (resize(box=...): resize-then-crop without resizing the margins);
    reducing_gap makes large reductions antialiased and fast. `flip` mirrors the crop; (top, left) is then its
    position in the mirrored resized image: left' = resized_w - left - bucket_w.
    """
    (rw, rh), (top, left) = crop_coords(original_size or img.size, bucket, rng)
    bh, bw = bucket
    sx, sy = img.width / rw, img.height / rh  # resized px -> px of `img`
    box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
    out = img.resize((bw, bh), resample, box=box, reducing_gap=reducing_gap if max(sx, sy) > 1 else None)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - left - bw
    return out, (top, left)


def bucket_table(buckets: Sequence[Bucket], bucket_ids: Sequence[int]) -> str:
    """A printable table of the used buckets: resolution, aspect (w / h) and number of images."""
    counts = Counter(bucket_ids)
    lines = [f"{'bucket (h x w)':>16} {'aspect':>7} {'images':>7}"]
    for i in sorted(counts):
        h, w = buckets[i]
        lines.append(f"{f'{h} x {w}':>16} {w / h:7.3f} {counts[i]:7d}")
    lines.append(f"{len(counts)} buckets used of {len(buckets)}, {len(bucket_ids)} images")
    return "\n".join(lines)


class BucketBatchSampler:
    """Single-bucket batches, shuffled across buckets, deterministic per (seed, epoch), split across ranks: lists of
    dataset indices (this rank's share of each global batch) from `position` of the epoch set with `set_epoch`."""

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, shuffle: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch split: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if len(bucket_ids) == 0:
            raise ValueError("BucketBatchSampler needs at least one image")
        self.bucket_ids = list(bucket_ids)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch, self.position = 0, 0

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch (batch_size * world_size indices, one bucket each) of `epoch`, in order."""
        rng = random.Random(f"buckets:{self.seed}:{epoch}")  # str seeds hash stably across processes
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for i, b in enumerate(self.bucket_ids):
            by_bucket[b].append(i)
        size = self.batch_size * self.world_size
        batches = []
        for b in sorted(by_bucket):
            idx = by_bucket[b]
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), size):
                chunk = idx[start:start + size]
                if len(chunk) < size:
                    if self.drop_last:
                        continue
                    chunk += [idx[k % len(idx)] for k in range(size - len(chunk))]
                batches.append(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Select the epoch's plan and skip its first `position` batches (resume mid-epoch)."""
        n = self.batches_per_epoch()
        if not 0 <= position <= n:
            raise ValueError(f"resume position {position} outside epoch {epoch}'s {n} batches")
        self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches(self.epoch)[self.position:]:
            yield batch[lo:hi]

    def __len__(self) -> int:
        """Batches left in the current epoch from `position`."""
        return self.batches_per_epoch() - self.position

    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the same every epoch: only their order and contents change)."""
        size = self.batch_size * self.world_size
        counts = Counter(self.bucket_ids).values()
        return sum(n // size if self.drop_last else -(-n // size) for n in counts)

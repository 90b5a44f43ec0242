"""Aspect buckets, resize + crop, and the bucket batch plan (determinism, resume, DDP split)."""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from training.buckets import (BucketBatchSampler, bucket_table, crop_coords, make_buckets, nearest_bucket,
                              resize_and_crop)

# The SDXL paper's (appendix I) multi-aspect training resolutions around 1024^2, as (height, width).
SDXL_PAPER_BUCKETS = [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344),
                      (1344, 768), (640, 1536), (1536, 640), (512, 2048), (2048, 512)]


def test_buckets_1024_match_the_sdxl_paper_and_rules():
    buckets = make_buckets(1024)  # step 64, sides 512..2048
    assert set(SDXL_PAPER_BUCKETS) <= set(buckets)
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 512 <= h <= 2048 and 512 <= w <= 2048
        assert h * w <= 1024 * 1024
        assert (w, h) in buckets  # every bucket has its transpose
        # for its width (or, as a transpose, its height), the longest side under the area budget / max_side
        tallest = lambda h, w: h == 2048 or (h + 64) * w > 1024 * 1024  # noqa: E731
        assert tallest(h, w) or tallest(w, h)
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects)
    assert len(buckets) == len(set(buckets))


def test_buckets_pixel_step_and_limits():
    buckets = make_buckets(512, step=32, min_side=256, max_side=768)
    assert all(h % 32 == 0 and w % 32 == 0 and 256 <= min(h, w) and max(h, w) <= 768 for h, w in buckets)
    assert (512, 512) in buckets and (352, 736) in buckets  # 512^2 // 736 = 356 -> 352
    with pytest.raises(ValueError):
        make_buckets(1024, min_side=2048)


def test_nearest_bucket_uses_log_ratio():
    buckets = make_buckets(1024)
    # 1500 x 1100: aspect 1.364; candidates 1152/896 = 1.286 (log dist 0.059) and 1216/832 = 1.462 (0.069)
    assert buckets[nearest_bucket(buckets, 1500, 1100)] == (896, 1152)
    assert buckets[nearest_bucket(buckets, 1100, 1500)] == (1152, 896)
    assert buckets[nearest_bucket(buckets, 777, 777)] == (1024, 1024)
    # Between aspects 1 and 2 the log midpoint is sqrt(2) = 1.414 (a linear one would be 1.5): 1.45 goes to 2.
    two = [(64, 64), (64, 128)]
    assert nearest_bucket(two, 145, 100) == 1
    assert nearest_bucket(two, 140, 100) == 0


def _pattern(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_resize_and_crop_center_random_and_flip():
    img = _pattern(150, 100)
    # cover (64, 64): scale max(64/150, 64/100) = 0.64 -> 96 x 64, center crop left (96 - 64) // 2 = 16
    out, (top, left) = resize_and_crop(img, (64, 64))
    assert out.size == (64, 64) and (top, left) == (0, 16)
    resized = img.resize((96, 64), Image.Resampling.LANCZOS)
    # resampling only the crop's box gives what resizing the whole image and cropping by hand gives
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(resized.crop((16, 0, 80, 64)), np.int16))
    assert diff.max() <= 1
    # the mirrored crop is the mirror image of the crop; its left is measured in the mirrored image
    out_f, (top_f, left_f) = resize_and_crop(img, (64, 64), flip=True)
    assert (top_f, left_f) == (0, 96 - 16 - 64)
    np.testing.assert_array_equal(np.asarray(out_f), np.asarray(out)[:, ::-1])
    # random crops stay inside the resized image and vary with the rng
    lefts = set()
    for seed in range(20):
        o, (t, l) = resize_and_crop(img, (64, 64), random.Random(seed))
        assert o.size == (64, 64) and t == 0 and 0 <= l <= 32
        lefts.add(l)
    assert len(lefts) > 3


def test_resize_from_a_reduced_decode_keeps_the_geometry():
    img = _pattern(400, 200)
    full, crop = resize_and_crop(img, (64, 96), random.Random(3))
    half, crop_half = resize_and_crop(img.resize((200, 100), Image.Resampling.LANCZOS), (64, 96), random.Random(3),
                                      original_size=(400, 200))
    assert crop_half == crop  # same crop, measured in the image resized from the original size
    diff = np.abs(np.asarray(full, np.int16) - np.asarray(half, np.int16))
    assert diff.mean() < 4  # the same picture, through two resampling paths


def test_crop_never_smaller_than_bucket():
    for w, h in [(1023, 1025), (1500, 1100), (333, 1999), (64, 64)]:
        for bucket in make_buckets(1024):
            (rw, rh), (top, left) = crop_coords((w, h), bucket)
            assert rw >= bucket[1] and rh >= bucket[0]
            assert 0 <= top <= rh - bucket[0] and 0 <= left <= rw - bucket[1]
            assert min(rw - bucket[1], rh - bucket[0]) <= 1  # covers tightly: one side fits exactly


def _ids() -> list[int]:
    # 4 buckets holding 12, 8, 6, 3 images, interleaved
    ids = [0] * 12 + [1] * 8 + [2] * 6 + [3] * 3
    random.Random(1).shuffle(ids)
    return ids


def test_batches_single_bucket_each_image_once_deterministic():
    ids = [0] * 12 + [1] * 8 + [2] * 6  # all divisible by 2: nothing to fill or drop
    s = BucketBatchSampler(ids, 2, seed=7)
    s.set_epoch(0)
    epoch0 = list(s)
    assert all(len(b) == 2 and len({ids[i] for i in b}) == 1 for b in epoch0)
    assert sorted(i for b in epoch0 for i in b) == list(range(len(ids)))
    s2 = BucketBatchSampler(ids, 2, seed=7)
    s2.set_epoch(0)
    assert list(s2) == epoch0  # same seed and epoch -> same plan
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(len(ids)))
    # batches from different buckets are interleaved, not grouped
    order = [ids[b[0]] for b in epoch0]
    assert sum(a != b for a, b in zip(order, order[1:])) > 3
    s3 = BucketBatchSampler(ids, 2, seed=8)
    assert list(s3) != epoch0


def test_fill_and_drop_last():
    ids = _ids()
    fill = BucketBatchSampler(ids, 4, seed=0)
    batches = list(fill)
    assert len(batches) == fill.batches_per_epoch() == 3 + 2 + 2 + 1
    assert all(len(b) == 4 and len({ids[i] for i in b}) == 1 for b in batches)
    seen = Counter(i for b in batches for i in b)
    assert set(seen) == set(range(len(ids)))  # everyone at least once
    assert sum(seen.values()) - len(ids) == (4 - 2) + (4 - 3)  # repeats only to fill the 6- and 3-image tails
    drop = BucketBatchSampler(ids, 4, seed=0, drop_last=True)
    batches = list(drop)
    assert len(batches) == drop.batches_per_epoch() == 3 + 2 + 1
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 24 and all(ids[i] != 3 for i in flat)


def test_resume_from_position_yields_the_rest():
    ids = _ids()
    s = BucketBatchSampler(ids, 2, seed=3)
    s.set_epoch(5)
    full = list(s)
    for k in (0, 1, 7, len(full)):
        r = BucketBatchSampler(ids, 2, seed=3)  # a fresh process after a restart
        r.set_epoch(5, position=k)
        assert len(r) == len(full) - k
        assert list(r) == full[k:]
    with pytest.raises(ValueError):
        s.set_epoch(5, position=len(full) + 1)


def test_ddp_ranks_take_disjoint_slices_of_each_global_batch():
    ids = [0] * 16 + [1] * 8 + [2] * 12  # each a multiple of 2 ranks * 2
    ranks = [BucketBatchSampler(ids, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    b0, b1 = list(ranks[0]), list(ranks[1])
    assert len(b0) == len(b1) == 9
    for x, y in zip(b0, b1):
        assert not set(x) & set(y)
        assert len({ids[i] for i in x + y}) == 1  # the step's global batch is one bucket on both ranks
    assert sorted(i for b in b0 + b1 for i in b) == list(range(len(ids)))
    # the global plan is the single-process plan with batch 4: ranks concatenated give it back
    plan = ranks[0].global_batches(3)
    assert [x + y for x, y in zip(b0, b1)] == plan


def test_bucket_table_lists_used_buckets():
    buckets = make_buckets(1024)
    ids = [buckets.index((1024, 1024))] * 3 + [buckets.index((896, 1152))] * 2
    table = bucket_table(buckets, ids)
    lines = table.splitlines()
    assert any("1024 x 1024" in ln and ln.split()[-1] == "3" and "1.000" in ln for ln in lines)
    assert any("896 x 1152" in ln and ln.split()[-1] == "2" and f"{1152 / 896:.3f}" in ln for ln in lines)
    assert "2 buckets used" in lines[-1] and "5 images" in lines[-1]
    assert math.isclose(1152 / 896, 1.2857, rel_tol=1e-3)

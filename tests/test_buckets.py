"""Aspect buckets, resize + crop, and the bucket batch plan (determinism, resume, DDP split)."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from training.buckets import (BucketBatchSampler, bucket_table, crop_coords, make_buckets, nearest_bucket,
                              resize_and_crop)

# The SDXL paper's (arXiv 2307.01952, appendix I) multi-aspect training resolutions, as (height, width), copied
# row by row from its table (which lists (704, 1344) without its transpose).
SDXL_PAPER_BUCKETS = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512)]
# The paper's rows that are not the longest side for their short side: at short side 960 it lists 1088 and 1024,
# at 896 1152 and 1088, at 832 1216 and 1152, and (704, 1344) next to (704, 1408). The documented rule (kohya /
# NovelAI: for each side, only the longest other side under the area budget) keeps one bucket per side.
PAPER_SECOND_CHOICES = {(960, 1024), (1024, 960), (896, 1088), (1088, 896), (832, 1152), (1152, 832), (704, 1344)}


def test_buckets_1024_match_the_sdxl_paper_and_rules():
    buckets = make_buckets(1024)  # step 64, sides 512..2048
    # exactly the paper's list less its second choices, in order of aspect w / h (portrait first)
    want = sorted(set(SDXL_PAPER_BUCKETS) - PAPER_SECOND_CHOICES, key=lambda b: b[1] / b[0])
    assert len(want) == 33
    assert buckets == want
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


def test_ddp_ranks_split_the_single_process_plan():
    """Oracle: one process (world size 1) with batch W * B and the same seed. On W ranks with batch B each, the
    ranks' batches at every step, concatenated in rank order, must be that process's batch of the step: the
    same images in the same order, every epoch, and from any resume position (fresh samplers, as after a
    restart). Includes bucket tails filled by repeats and dropped tails."""
    ids = _ids()  # buckets of 12, 8, 6 and 3 images
    for world, batch, drop_last in [(2, 2, False), (3, 2, False), (2, 3, True)]:
        single = BucketBatchSampler(ids, world * batch, seed=11, drop_last=drop_last)
        plans = []
        for epoch in (0, 1, 4):
            for position in (0, 1, 3):
                single.set_epoch(epoch, position)
                want = list(single)
                ranks = [BucketBatchSampler(ids, batch, seed=11, rank=r, world_size=world, drop_last=drop_last)
                         for r in range(world)]
                for s in ranks:
                    s.set_epoch(epoch, position)
                got = [list(s) for s in ranks]
                assert [len(s) for s in ranks] == [len(g) for g in got] == [len(want)] * world
                assert all(len(b) == batch for g in got for b in g)
                assert [[i for b in step for i in b] for step in zip(*got)] == want, (world, batch, epoch, position)
                if position == 0:
                    plans.append(want)
        assert plans[0] != plans[1] != plans[2]  # the epoch changes the plan, so the epochs above differ


def test_bucket_table_lists_used_buckets():
    buckets = make_buckets(1024)
    ids = [buckets.index((1024, 1024))] * 3 + [buckets.index((896, 1152))] * 2
    table = bucket_table(buckets, ids)
    lines = table.splitlines()
    assert any(ln.split() == ["1024", "x", "1024", "1.000", "3"] for ln in lines)
    # 1152 / 896 = 9 / 7 = 1.2857...
    assert any(ln.split() == ["896", "x", "1152", "1.286", "2"] for ln in lines)
    assert "2 buckets used" in lines[-1] and "5 images" in lines[-1]

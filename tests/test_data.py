"""Dataset sources, items, bad files and bad input, DataLoader use (tar shard streams: test_shards.py)."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.buckets import BucketBatchSampler, resize_and_crop
from training.captions import CaptionConfig
from training.data import (BucketDataset, DatasetError, DataStats, DataWarning, ImageRecord, collate,
                           expand_braces, find_shards, load_image, load_metadata, open_dataset, to_tensor)

SMALL = dict(image_size=64, step=16, min_image_size=32)  # buckets of ~64^2 px, sides 32..128


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def add(folder, name: str, img: Image.Image | None, caption: str | bytes | None = None, **save) -> str:
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if img is not None:
        img.save(path, **save)
    if caption is not None:
        data = caption.encode() if isinstance(caption, str) else caption
        with open(os.path.splitext(path)[0] + ".txt", "wb") as f:
            f.write(data)
    return path


def quiet_open(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return open_dataset(*args, **kwargs)


def test_folder_scan_recursive_with_captions(tmp_path):
    add(tmp_path, "a.jpg", noise(64, 64), "tag a")
    add(tmp_path, "sub/deep/b.png", noise(96, 64), "tag b")
    add(tmp_path, "c.webp", noise(64, 96))
    (tmp_path / "c.caption").write_text("from .caption")
    add(tmp_path, "d.png", noise(64, 64), "from .txt")
    (tmp_path / "d.caption").write_text("ignored: .txt wins")
    add(tmp_path, ".hidden/e.png", noise(64, 64), "hidden")
    stats = DataStats()
    ds = open_dataset(tmp_path, stats=stats, **SMALL)
    got = {os.path.relpath(r.path, tmp_path): (r.caption, r.width, r.height) for r in ds.records}
    assert got == {"a.jpg": ("tag a", 64, 64), os.path.join("sub", "deep", "b.png"): ("tag b", 96, 64),
                   "c.webp": ("from .caption", 64, 96), "d.png": ("from .txt", 64, 64)}
    assert stats.images == 4 and str(stats).startswith("data: 4 images, 0 unreadable")
    assert "\n" not in str(stats)
    table = ds.bucket_table()
    assert "64 x 64" in table and "4 images" in table.splitlines()[-1]


def test_item_fields_values_and_collate(tmp_path):
    add(tmp_path, "solid.png", Image.new("RGB", (96, 64), (10, 200, 30)), "a,  b ,c")
    add(tmp_path, "tall.png", noise(64, 96), "x")
    ds = open_dataset(tmp_path, caption_config=CaptionConfig(prefix="sks"), **SMALL)
    i = [os.path.basename(r.path) for r in ds.records].index("solid.png")
    item = ds[i]
    assert item["pixels"].shape == (3, 48, 80) and item["pixels"].dtype == torch.float32
    want = torch.tensor([10, 200, 30]).float().div(127.5).sub(1).view(3, 1, 1).expand(3, 48, 80)
    torch.testing.assert_close(item["pixels"], want, atol=1 / 127.5, rtol=0)
    assert item["caption"] == "sks, a, b, c"
    assert item["original_size"] == (64, 96) and item["target_size"] == (48, 80)
    # cover (48, 80): scale max(80/96, 48/64) = 0.833 -> 80 x 53, center crop top (53 - 48) // 2 = 2
    assert item["crop_top_left"] == (2, 0)
    batch = collate([item, item])
    assert batch["pixels"].shape == (2, 3, 48, 80) and batch["caption"] == ["sks, a, b, c"] * 2
    assert batch["time_ids"].tolist() == [[64, 96, 2, 0, 48, 80]] * 2
    assert batch["original_size"].dtype == torch.long and batch["index"].tolist() == [i, i]
    assert -1 <= ds[1 - i]["pixels"].min() and ds[1 - i]["pixels"].max() <= 1


def test_random_crop_and_flip_are_seeded_per_epoch(tmp_path):
    add(tmp_path, "wide.png", noise(101, 48), "w")  # bucket (48, 80), no resize: 21 px of horizontal slack
    ds = open_dataset(tmp_path, random_crop=True, flip_aug=True, seed=1, **SMALL)
    plain = open_dataset(tmp_path, **SMALL)
    seen_crops, flips = set(), set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        a, b = ds[0], ds[0]
        assert torch.equal(a["pixels"], b["pixels"]) and a["crop_top_left"] == b["crop_top_left"]
        seen_crops.add(a["crop_top_left"])
    assert len(seen_crops) > 3
    # center crop + flip: the item is the plain item or exactly its mirror, with the mirrored left
    ds_flip = open_dataset(tmp_path, flip_aug=True, seed=1, **SMALL)
    for epoch in range(12):
        ds_flip.set_epoch(epoch)
        it, ref = ds_flip[0], plain[0]
        flipped = not torch.equal(it["pixels"], ref["pixels"])
        assert ref["crop_top_left"] == (0, 10)
        if flipped:  # the crop of the mirrored image starts at 101 - 10 - 80 = 11
            assert torch.equal(it["pixels"], ref["pixels"].flip(-1)) and it["crop_top_left"] == (0, 11)
        flips.add(flipped)
    assert flips == {True, False}


def test_bad_files_warn_count_and_never_crash(tmp_path):
    ok = add(tmp_path, "ok.png", noise(64, 64), "fine")
    add(tmp_path, "zero.png", None, "zero")
    open(tmp_path / "zero.png", "wb").close()
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    noise(64, 64, 1).save(buf, "JPEG", quality=95)
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "truncated.txt").write_text("cut")
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 128))
    add(tmp_path, "rgba.png", rgba, "rgba")
    add(tmp_path, "la.png", Image.new("LA", (64, 64), (0, 0)), "la")
    add(tmp_path, "cmyk.tif", Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "cmyk")
    i16 = np.full((64, 64), 32896, np.uint16)
    i16[0, 0] = 65535
    add(tmp_path, "sixteen.png", Image.fromarray(i16), "16 bit")
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    add(tmp_path, "palette.png", pal, "palette", transparency=0)
    add(tmp_path, "gray.png", Image.new("L", (64, 64), 100), "gray")
    stored = Image.new("RGB", (80, 48), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 40, 48))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    add(tmp_path, "rotated.jpg", stored, "rotated", exif=exif, quality=95)
    add(tmp_path, "nocaption.png", noise(64, 64))
    add(tmp_path, "empty.png", noise(64, 64), "  ,  ")
    add(tmp_path, "latin1.png", noise(64, 64), "caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "orphan.txt").write_text("no image here")

    stats = DataStats()
    with pytest.warns(DataWarning) as caught:
        ds = open_dataset(tmp_path, stats=stats, **SMALL)
    messages = [str(w.message) for w in caught]
    # one line per bad file, starting with its name: unreadable images, then captions (the folder scan's order);
    # mode conversions and EXIF rotations are repairs, counted for the summary but not warned file by file
    names = ["garbage.jpg", "zero.png", "nocaption.png", "empty.txt", "latin1.txt", "orphan.txt"]
    assert sorted(m.split(": ")[0] for m in messages) == sorted(str(tmp_path / n) for n in names)
    assert (stats.unreadable, stats.converted, stats.rotated, stats.missing_caption, stats.empty_caption,
            stats.bad_encoding, stats.orphan_caption) == (2, 6, 1, 1, 1, 1, 1)
    assert stats.images == 12  # 14 files, all but zero.png and garbage.jpg (truncated.jpg's header reads fine)

    by_name = {os.path.basename(r.path): i for i, r in enumerate(ds.records)}
    rec = ds.records[by_name["rotated.jpg"]]
    assert (rec.width, rec.height) == (48, 80)  # header size, rotated
    assert ds.records[by_name["latin1.png"]].caption == "caf\ufffd au lait"
    assert ds.records[by_name["empty.png"]].caption == ""

    px = lambda name: np.asarray(load_image(os.path.join(tmp_path, name))[0])  # noqa: E731
    assert px("rgba.png")[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert np.abs(px("rgba.png")[1, 1].astype(int) - [255, 127, 127]).max() <= 1  # half red over white
    assert px("la.png")[5, 5].tolist() == [255, 255, 255]
    assert px("cmyk.tif")[5, 5].tolist() == [255, 0, 0]
    assert px("sixteen.png")[0, 0].tolist() == [255] * 3 and px("sixteen.png")[5, 5].tolist() == [128] * 3
    assert px("palette.png")[0, 0].tolist() == [255, 255, 255] and px("palette.png")[5, 5].tolist() == [0, 255, 0]
    assert px("gray.png")[5, 5].tolist() == [100] * 3
    rot = px("rotated.jpg")
    assert rot.shape == (80, 48, 3)  # displayed: 48 wide, 80 tall
    assert rot[10, 24, 0] > 200 and rot[10, 24, 2] < 60  # stored left half -> displayed top half
    assert rot[70, 24, 2] > 200 and rot[70, 24, 0] < 60

    # truncated.jpg fails only when decoded: it is replaced by another image of its bucket, with a warning
    t = by_name["truncated.jpg"]
    with pytest.warns(DataWarning, match="truncated.jpg"):
        item = ds[t]
    assert item["index"] != t and ds.bucket_ids[item["index"]] == ds.bucket_ids[t]
    assert item["caption"] == ds.records[item["index"]].caption and stats.unreadable == 3
    assert item["pixels"].shape == (3, 64, 64)
    for i in range(len(ds)):  # every other file loads
        if i != t:
            assert ds[i]["index"] == i
    assert ok in [r.path for r in ds.records]


def test_jpeg_draft_decode_keeps_original_size(tmp_path):
    smooth = noise(64, 48).resize((512, 384), Image.Resampling.BICUBIC)  # survives downscaling
    path = add(tmp_path, "big.jpg", smooth, "big", quality=95)
    full, size_full = load_image(path)
    reduced, size_reduced = load_image(path, cover=(48, 64))
    assert size_full == size_reduced == (384, 512) and full.size == (512, 384)
    assert reduced.size == (64, 48)  # libjpeg's 1/8 scale still covers the 64 x 48 bucket
    assert load_image(path, cover=(96, 128))[0].size == (128, 96)  # 1/4 for twice the bucket
    ds = open_dataset(tmp_path, **SMALL)
    item = ds[0]
    # 4:3 -> bucket (48, 80) (log distance 0.22 vs 0.29 to the square); covering size 80 x 60 -> 1/4 decode
    assert item["original_size"] == (384, 512) and item["target_size"] == (48, 80)
    assert load_image(path, cover=(48, 80))[0].size == (128, 96)
    ref, crop = resize_and_crop(full, (48, 80))
    assert item["crop_top_left"] == crop
    assert (item["pixels"] - to_tensor(ref)).abs().mean() < 0.03  # same picture through DCT scaling


def test_too_small_images_skipped_and_default_threshold(tmp_path):
    add(tmp_path, "big.png", noise(64, 64), "big")
    add(tmp_path, "small.png", noise(40, 40), "small")
    add(tmp_path, "thin.png", noise(100, 20), "thin")  # 2000 px < 48^2 = 2304
    stats = DataStats()
    with pytest.warns(DataWarning) as caught:
        ds = open_dataset(tmp_path, image_size=64, step=16, stats=stats)  # default: 0.75 * 64 = 48 px side
    assert ["small.png" in str(w.message) or "thin.png" in str(w.message) for w in caught] == [True, True]
    assert ds.min_image_size == 48 and [os.path.basename(r.path) for r in ds.records] == ["big.png"]
    assert stats.too_small == 2
    recs = [ImageRecord("x", "", 767, 768), ImageRecord("y", "", 768, 768)]
    with pytest.warns(DataWarning, match="767x768"):
        assert [r.path for r in BucketDataset(recs, image_size=1024).records] == ["y"]  # 768 at 1024
    with pytest.raises(DatasetError, match="no usable images"):
        quiet_open(tmp_path, image_size=64, step=16, min_image_size=100)


def test_bad_input_raises_dataset_error(tmp_path):
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match="does not exist") as e:
        open_dataset(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    f = add(tmp_path, "x.png", noise(64, 64))
    with pytest.raises(DatasetError, match="not a folder of images"):
        open_dataset(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("hello")
    with pytest.raises(DatasetError, match="no usable images") as e:
        open_dataset(empty)
    assert str(empty) in str(e.value)
    with pytest.raises(DatasetError, match="no data"):
        open_dataset()


def test_metadata_merge_and_relative_paths(tmp_path):
    add(tmp_path, "img/a.png", noise(64, 64))
    add(tmp_path, "img/b.png", noise(96, 64))
    c = add(tmp_path, "elsewhere/c.png", noise(64, 96))
    add(tmp_path, "img/d.jpg", noise(64, 64))
    (tmp_path / "m1.json").write_text(json.dumps({
        "img/a.png": {"tags": "a1", "image_size": [64, 64]},
        "img/b.png": {"tags": "b1", "image_size": [96, 64]},
        "img/d": {"tags": "no extension in the key"},  # kohya style: the extension is found
    }))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m2.json").write_text(json.dumps({
        "../img/a.png": {"tags": "a2 , overrides"},  # relative to sub/, same image as img/a.png
        c: {"tags": "absolute", "image_size": [64, 96]},
        "missing.png": {"tags": "gone"},
    }))
    stats = DataStats()
    with pytest.warns(DataWarning, match="missing.png"):
        ds = open_dataset(metadata_files=[tmp_path / "m1.json", tmp_path / "sub" / "m2.json"], stats=stats, **SMALL)
    assert len(ds) == 4  # img/a.png from both files is one image
    got = {os.path.relpath(r.path, tmp_path): (r.caption, r.width, r.height) for r in ds.records}
    assert got == {os.path.join("img", "a.png"): ("a2, overrides", 64, 64),
                   os.path.join("img", "b.png"): ("b1", 96, 64),
                   os.path.join("elsewhere", "c.png"): ("absolute", 64, 96),
                   os.path.join("img", "d.jpg"): ("no extension in the key", 64, 64)}
    assert stats.missing_image == 1
    # a .json given as data_dir is not read as metadata: a one-line error saying where it goes
    with pytest.raises(DatasetError, match=r"m1\.json: not a folder of images \(pass a metadata \.json as "
                       r"--metadata_files") as e:
        open_dataset(tmp_path / "m1.json", **SMALL)
    assert "\n" not in str(e.value)


def test_metadata_json_error_names_line_and_column(tmp_path):
    bad = tmp_path / "meta.json"
    bad.write_text('{\n  "a.png": {"tags": "x"},\n  "b.png": {"tags": "y",}\n}\n')
    with pytest.raises(DatasetError) as e:
        load_metadata([bad], DataStats())
    # after the trailing comma a property name was expected: the "}" at line 3, column 25
    assert "line 3, column 25" in str(e.value) and str(bad) in str(e.value)
    assert "\n" not in str(e.value)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="expected a JSON object"):
        load_metadata([tmp_path / "list.json"], DataStats())
    with pytest.raises(DatasetError, match="not found"):
        load_metadata([tmp_path / "absent.json"], DataStats())


def test_brace_expansion_and_shard_lookup(tmp_path):
    assert expand_braces("train-{00000..00002}.tar") == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    seventeen = expand_braces("s-{000000..000016}.tar")
    assert len(seventeen) == 17 and seventeen[-1] == "s-000016.tar"
    with pytest.raises(DatasetError):
        expand_braces("{5..1}")
    for i in range(3):
        (tmp_path / f"t-{i:03d}.tar").write_bytes(b"")
    assert find_shards(str(tmp_path / "t-{000..002}.tar")) == [str(tmp_path / f"t-{i:03d}.tar") for i in range(3)]
    assert find_shards(str(tmp_path / "t-*.tar")) == [str(tmp_path / f"t-{i:03d}.tar") for i in range(3)]
    with pytest.raises(DatasetError, match="t-003.tar"):
        find_shards(str(tmp_path / "t-{000..003}.tar"))


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_dataloader_with_workers_and_bucket_sampler(tmp_path, context):
    """Two DataLoader workers must yield what the main process yields, batch by batch, every field.

    The loader is driven as training/loop.py drives it: one DataLoader, and for each epoch
    `sampler.set_epoch(epoch, position)`, `ds.set_epoch(epoch)`, then a fresh iterator. Oracles: the same
    loader with num_workers=0; the batch indices of a fresh sampler's plan for that (seed, epoch) from
    `position`; and each batch collated from a fresh dataset's `ds[i]` at that epoch. Random crops, flips,
    tag shuffling / dropout and caption dropout are on and change with the epoch (checked), so a worker that
    does not receive the epoch, or reseeds per worker, yields different items. Workers are forked (Linux's
    default: they inherit the dataset) or started by a fork server (the dataset is pickled, as under spawn on
    macOS / Windows and the fork server Python 3.14 defaults to); its preload imports torch only once.
    """
    for i in range(12):  # 6 wide -> bucket (48, 80), 6 tall -> (80, 48); 21 px of crop slack, no resize
        add(tmp_path, f"{i:02d}.png", noise(*((101, 48) if i % 2 else (48, 101)), seed=i),
            f"img {i}, red, green, blue, round, square, best quality, safe")
    kw = dict(seed=5, random_crop=True, flip_aug=True, caption_config=CaptionConfig(
        shuffle_tags=True, keep_tokens=1, tag_dropout=0.2, caption_dropout=0.1), **SMALL)
    ds = open_dataset(tmp_path, **kw)
    sampler = BucketBatchSampler(ds.bucket_ids, 2, seed=5)
    mp = multiprocessing.get_context(context)
    if context == "forkserver":
        mp.set_forkserver_preload(["training.data"])
    workers = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2, multiprocessing_context=mp)
    main = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    oracle = open_dataset(tmp_path, **kw)
    fields = {"pixels", "caption", "original_size", "crop_top_left", "target_size", "index", "time_ids"}
    items = {}  # epoch -> {index: (crop_top_left, caption, pixels)}
    for epoch, position in [(0, 0), (1, 0), (2, 3)]:  # epoch 2 resumes at its 4th batch
        sampler.set_epoch(epoch, position)
        ds.set_epoch(epoch)
        got, ref = list(workers), list(main)
        plan = BucketBatchSampler(ds.bucket_ids, 2, seed=5)
        plan.set_epoch(epoch, position)
        want_idx = list(plan)
        assert len(got) == len(ref) == len(want_idx) == 6 - position
        oracle.set_epoch(epoch)
        items[epoch] = {}
        for k, (g, r, idx) in enumerate(zip(got, ref, want_idx)):
            want = collate([oracle[i] for i in idx])
            assert set(g) == set(r) == set(want) == fields
            assert g["index"].tolist() == r["index"].tolist() == idx, (epoch, k)
            for name in sorted(fields):
                for batch, who in ((g, "workers"), (r, "main")):
                    if isinstance(want[name], torch.Tensor):
                        assert torch.equal(batch[name], want[name]), (who, epoch, k, name)
                    else:
                        assert batch[name] == want[name], (who, epoch, k, name)
            assert len(set(map(tuple, g["target_size"].tolist()))) == 1
            for j, i in enumerate(idx):
                items[epoch][i] = (tuple(g["crop_top_left"][j].tolist()), g["caption"][j], g["pixels"][j])
        if position == 0:  # 12 images, two buckets of 6, batches of 2: each image exactly once
            assert sorted(items[epoch]) == list(range(12))
    # the epoch reaches the items: crops, captions and pixels (crop + flip) of epochs 1 and 2 differ from epoch 0's
    for epoch in (1, 2):
        same = [i for i in items[epoch] if i in items[0]]
        assert any(items[epoch][i][0] != items[0][i][0] for i in same)
        assert any(items[epoch][i][1] != items[0][i][1] for i in same)
        assert any(not torch.equal(items[epoch][i][2], items[0][i][2]) for i in same)
    assert "" in {c for e in items for _, c, _ in items[e].values()}  # caption dropout happened

"""Datasets: image folders, metadata JSON and tar shards -> bucketed, cropped, captioned training items.

Sources, chosen by `open_dataset` from what the flags point at:
  * a folder (searched recursively) of images with same-stem captions: `a/b.jpg` + `a/b.txt` (or `a/b.caption`);
  * metadata JSON files `{"img/1.png": {"tags": "...", "image_size": [w, h]}, ...}`, several merged (a later
    file updates an earlier one's fields), relative paths resolved against the JSON's folder (then data_dir),
    a key without extension finds the image by trying IMAGE_EXTENSIONS; a "caption" field is joined before
    the tags; without a valid "image_size" the header is read;
  * WebDataset-style tar shards (`train-{00000..00016}.tar`): members `<key>.jpg|png|webp` + `<key>.txt` and an
    optional `<key>.json` ({"tags"} / {"caption"} when there is no .txt), streamed with `tarfile`.

Map-style sources give a `BucketDataset`; use it with the batch sampler from training/buckets.py:

    stats = DataStats()
    ds = open_dataset(data_dir="imgs", image_size=1024, flip_aug=True, caption_config=CaptionConfig(...), stats=stats)
    print(stats); print(ds.bucket_table())
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size, seed=seed, rank=rank, world_size=world_size)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=4)
    for epoch ...: sampler.set_epoch(epoch, position); ds.set_epoch(epoch); for batch in loader: ...

`ds[i]` is a dict: `pixels` (3, H, W) float in [-1, 1] (or `latents` (C, h, w) when a LatentCache is attached,
see training/cache.py), `caption` str (after caption processing), `original_size` (h, w) of the decoded image,
`crop_top_left` (top, left) in the resized image, `target_size` (h, w) = the bucket, `index`. `collate` stacks
them: tensors stacked, tuples -> LongTensor (B, 2), strings -> lists, plus `time_ids` (B, 6) float =
(orig_h, orig_w, crop_top, crop_left, target_h, target_w), SDXL's micro-conditioning order.

Random choices of an item (crop, flip, caption shuffle) come from `random.Random` seeded by (seed, epoch, index),
so they do not depend on worker count or resume point. `set_epoch` must be called before the DataLoader's
iterator is created (each `iter(loader)` sends the dataset to fresh workers; do not use persistent_workers).

Tar shards give a `TarShardDataset` (an IterableDataset): shards shuffled per epoch, assigned round-robin to the
(rank, worker) pairs (slot = rank * num_workers + worker_id), samples shuffled through a buffer. With
`batch_size` set it yields collated single-bucket batches (use DataLoader(batch_size=None)); leftover partial
batches at the end of a worker's stream are dropped.

Bad data never crashes a run: each bad file gives one `DataWarning` naming it and is counted in `DataStats`
(counters are per process: DataLoader workers count their own). Bad configuration (missing folder, not a
dataset, malformed JSON, nothing usable) raises `DatasetError`, one line, which the CLI turns into exit code 2.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import os
import posixpath
import random
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from training.buckets import Bucket, bucket_table, crop_coords, make_buckets, nearest_bucket, resize_and_crop
from training.captions import CaptionConfig, clean_caption, process_caption

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")  # in order of preference when both exist
MIN_IMAGE_FRACTION = 0.75  # default min_image_size = 0.75 * image_size (768 px at 1024)
EXIF_ORIENTATION = 0x0112
_EXIF_FORMATS = ("JPEG", "MPO", "WEBP", "TIFF")  # formats whose header holds EXIF (PNG would need a full decode)
# What PIL raises on a broken or hostile image file.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A dataset that cannot be used at all (bad path, malformed metadata, no usable images)."""


class DataWarning(UserWarning):
    """One bad file, skipped or repaired."""


def warn_bad_file(message: str) -> None:
    """One DataWarning line; the message starts with the file's name."""
    warnings.warn(message, DataWarning, stacklevel=3)


@dataclass
class DataStats:
    """What indexing and loading found; `str()` is a one-line summary for the log."""
    images: int = 0  # usable images
    unreadable: int = 0  # zero-byte, not an image, truncated (skipped / replaced)
    too_small: int = 0  # below min_image_size^2 pixels (skipped)
    missing_caption: int = 0  # no caption file (trained with "")
    empty_caption: int = 0
    bad_encoding: int = 0  # non-UTF-8 caption (decoded with replacement characters)
    orphan_caption: int = 0  # a caption file without an image
    missing_image: int = 0  # a metadata / tar entry without an image
    converted: int = 0  # non-RGB mode converted (alpha composited on white, 16-bit scaled, CMYK, palette)
    rotated: int = 0  # EXIF orientation applied

    def __str__(self) -> str:
        return "data: " + ", ".join(f"{getattr(self, f.name)} {f.name.replace('_', ' ')}" for f in fields(self))


@dataclass(frozen=True)
class ImageRecord:
    path: str
    caption: str  # cleaned raw caption, "" when missing
    width: int  # as displayed, i.e. after EXIF rotation
    height: int


# ---- images and captions -------------------------------------------------------------------------------------

def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on `background`, 16-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32)
        if img.mode.startswith("I;16") or a.max() > 255:  # 16-bit range -> 8-bit: 65535 / 257 = 255
            a = a / 257.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        canvas = Image.new("RGBA", img.size, (*background, 255))
        canvas.alpha_composite(img.convert("RGBA"))
        return canvas.convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr


def displayed_size(img: Image.Image) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of an opened image as displayed, from its header alone."""
    # PNG keeps EXIF after the pixel data: reading it would decode the whole file, so only header formats count.
    orientation = img.getexif().get(EXIF_ORIENTATION, 1) if img.format in _EXIF_FORMATS else 1
    w, h = img.size
    return (h, w, orientation) if orientation in (5, 6, 7, 8) else (w, h, orientation)  # 90-degree turns


def load_image(source: str | os.PathLike | io.BytesIO,
               cover: Bucket | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode fully, apply the EXIF orientation, convert to RGB; returns (image, original (h, w) as displayed).

    With `cover` (the bucket the image is headed for) a JPEG is decoded at the smallest 1/2^k scale that still
    covers the bucket (libjpeg's DCT scaling, several times faster for large photos); the returned original
    size is the full one either way. Raises one of IMAGE_ERRORS for a broken file.
    """
    with Image.open(source) as img:
        w, h, orientation = displayed_size(img)
        drafted = cover is not None and img.format == "JPEG"
        if drafted:
            (rw, rh), _ = crop_coords((w, h), cover)
            img.draft(None, (rh, rw) if orientation in (5, 6, 7, 8) else (rw, rh))  # in stored orientation
        img.load()  # decode now: a truncated file raises here, not later in a worker
        img = ImageOps.exif_transpose(img)  # also finds EXIF that displayed_size skipped (PNG)
    return to_rgb(img), (h, w) if drafted else (img.height, img.width)


def probe_image(path: str, stats: DataStats) -> tuple[int, int] | None:
    """(width, height) as displayed from the header only (fast); None (warned, counted) if unreadable."""
    try:
        with Image.open(path) as img:
            w, h, orientation = displayed_size(img)
            mode = img.mode
    except IMAGE_ERRORS as e:
        stats.unreadable += 1
        warn_bad_file(f"{path}: unreadable image skipped ({type(e).__name__}: {e})")
        return None
    if mode != "RGB":
        stats.converted += 1
        warn_bad_file(f"{path}: mode {mode} converted to RGB")
    if orientation != 1:
        stats.rotated += 1
        warn_bad_file(f"{path}: EXIF orientation {orientation} applied")
    return w, h


def decode_caption(data: bytes, name: str, stats: DataStats) -> str:
    """UTF-8 (BOM tolerated) caption bytes -> cleaned text; undecodable bytes replaced with a warning."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.bad_encoding += 1
        warn_bad_file(f"{name}: caption is not UTF-8, undecodable bytes replaced")
        text = data.decode("utf-8", errors="replace")
    text = clean_caption(text)
    if not text:
        stats.empty_caption += 1
        warn_bad_file(f"{name}: empty caption")
    return text


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (x * 2 / 255 - 1)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3), a writable copy
    return x.permute(2, 0, 1).float().mul_(2 / 255).sub_(1.0)


# ---- indexing ------------------------------------------------------------------------------------------------

def scan_folder(root: str | os.PathLike, stats: DataStats) -> list[ImageRecord]:
    """Images under `root` (recursive, sorted, hidden folders skipped) with their same-stem captions."""
    images: list[tuple[str, str]] = []  # (stem, path)
    captions: dict[str, str] = {}  # stem -> caption path
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            stem, ext = os.path.splitext(path)
            if ext.lower() in IMAGE_EXTENSIONS:
                images.append((stem, path))
            elif ext.lower() in CAPTION_EXTENSIONS:
                prev = captions.get(stem)
                rank = CAPTION_EXTENSIONS.index  # prefer .txt over .caption
                if prev is None or rank(ext.lower()) < rank(os.path.splitext(prev)[1].lower()):
                    captions[stem] = path
    image_stems = {s for s, _ in images}
    for stem, cap in sorted(captions.items()):
        if stem not in image_stems:
            stats.orphan_caption += 1
            warn_bad_file(f"{cap}: caption without an image, ignored")
    records = []
    for stem, path in images:
        size = probe_image(path, stats)
        if size is None:
            continue
        cap = captions.get(stem)
        if cap is None:
            stats.missing_caption += 1
            warn_bad_file(f"{path}: no caption file ({stem}.txt), training with an empty caption")
            caption = ""
        else:
            try:
                caption = decode_caption(Path(cap).read_bytes(), cap, stats)
            except OSError as e:
                stats.missing_caption += 1
                warn_bad_file(f"{cap}: caption unreadable ({e}), training with an empty caption")
                caption = ""
        records.append(ImageRecord(path, caption, *size))
    return records


def _resolve(key: str, json_dir: Path, data_dir: Path | None) -> str:
    """A metadata key -> an existing image path if possible (JSON folder first, then data_dir, then + extension)."""
    p = Path(key)
    if p.is_absolute():
        bases = [p]
    else:
        bases = [json_dir / p] + ([data_dir / p] if data_dir is not None else [])
    # normpath: "img/a.png" and "sub/../img/a.png" are one image, whose entries merge
    bases = [Path(os.path.normpath(os.path.abspath(b))) for b in bases]
    for base in bases:
        if base.is_file():
            return str(base)
        if base.suffix.lower() not in IMAGE_EXTENSIONS:  # kohya's metadata keys often omit the extension
            for ext in IMAGE_EXTENSIONS:
                if base.with_name(base.name + ext).is_file():
                    return str(base.with_name(base.name + ext))
    return str(bases[0])


def load_metadata(files: Sequence[str | os.PathLike], stats: DataStats,
                  data_dir: str | os.PathLike | None = None) -> list[ImageRecord]:
    """Merge metadata JSON files (image path -> {"tags", "image_size": [w, h]}) into records."""
    merged: dict[str, dict] = {}
    for f in map(Path, files):
        if not f.is_file():
            raise DatasetError(f"{f}: metadata file not found")
        try:
            meta = json.loads(f.read_bytes().decode("utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{f}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise DatasetError(f"{f}: metadata is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"{f}: expected a JSON object mapping image path -> {{\"tags\": ..., "
                               f"\"image_size\": [w, h]}}, got {type(meta).__name__}")
        for key, entry in meta.items():
            if not isinstance(entry, dict):
                raise DatasetError(f"{f}: entry {key!r} is {type(entry).__name__}, expected an object")
            path = _resolve(key, f.parent, Path(data_dir) if data_dir is not None else None)
            merged.setdefault(path, {}).update(entry)
    records = []
    for path, entry in merged.items():
        if not os.path.isfile(path):
            stats.missing_image += 1
            warn_bad_file(f"{path}: listed in metadata but not found, skipped")
            continue
        text = ", ".join(str(entry[k]) for k in ("caption", "tags") if entry.get(k))
        caption = decode_caption(text.encode("utf-8"), path, stats)
        size = entry.get("image_size")
        if (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, int) and v > 0 for v in size)):
            w, h = size
        else:  # absent or malformed: read the header instead
            probed = probe_image(path, stats)
            if probed is None:
                continue
            w, h = probed
        records.append(ImageRecord(path, caption, w, h))
    return records


def expand_braces(pattern: str) -> list[str]:
    """Shell / WebDataset brace expansion: "a-{000..002}.tar" -> a-000, a-001, a-002; "{x,y}" -> x, y."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        if int(a) > int(b):
            raise DatasetError(f"{pattern}: empty range {{{body}}}")
        options = [f"{i:0{len(a)}d}" for i in range(int(a), int(b) + 1)]  # zero-padded to the first bound
    else:
        options = body.split(",")
    return [head + opt + rest for opt in options for rest in expand_braces(tail)]


def find_shards(patterns: str | Sequence[str]) -> list[str]:
    """Shard paths from brace / glob patterns (one string may hold several, separated by spaces)."""
    if isinstance(patterns, str):
        patterns = patterns.split()
    shards = []
    for p in (p for pattern in patterns for p in expand_braces(pattern)):
        if any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise DatasetError(f"{p}: no tar shards match")
            shards += found
        elif os.path.isfile(p):
            shards.append(p)
        else:
            raise DatasetError(f"{p}: tar shard not found")
    return shards


# ---- items ---------------------------------------------------------------------------------------------------

def make_item(img: Image.Image, original_size: tuple[int, int], bucket: Bucket, rng: random.Random, *,
              random_crop: bool, flip: bool) -> dict:
    """A training item (caption still "") from load_image's output: resize to cover, crop, flip, to [-1, 1]."""
    h, w = original_size
    img, crop = resize_and_crop(img, bucket, rng if random_crop else None, flip=flip, original_size=(w, h))
    return {"pixels": to_tensor(img), "caption": "", "original_size": original_size, "crop_top_left": crop,
            "target_size": tuple(bucket)}


def collate(items: list[dict]) -> dict:
    """Stack a list of items into a batch; adds `time_ids` (B, 6) = SDXL micro-conditioning."""
    batch: dict = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            batch[k] = torch.stack(vals)
        elif isinstance(vals[0], (tuple, int)):
            batch[k] = torch.tensor(vals, dtype=torch.long)
        else:
            batch[k] = vals
    batch["time_ids"] = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1).float()
    return batch


class BucketDataset(Dataset):
    """Map-style dataset over ImageRecords, each assigned to an aspect bucket (see module docstring)."""

    def __init__(self, records: Sequence[ImageRecord], *, image_size: int = 1024, step: int = 64,
                 min_side: int | None = None, max_side: int | None = None, min_image_size: int | None = None,
                 random_crop: bool = False, flip_aug: bool = False, caption_config: CaptionConfig | None = None,
                 seed: int = 0, latent_cache=None, text_cache=None, stats: DataStats | None = None,
                 source: str = "dataset"):
        self.stats = stats if stats is not None else DataStats()
        self.image_size = image_size
        self.min_image_size = round(MIN_IMAGE_FRACTION * image_size) if min_image_size is None else min_image_size
        self.buckets = make_buckets(image_size, step, min_side, max_side)
        self.records = []
        for r in records:
            if r.width * r.height < self.min_image_size ** 2:
                self.stats.too_small += 1
                warn_bad_file(f"{r.path}: {r.width}x{r.height} is below min_image_size "
                              f"{self.min_image_size}^2 px, skipped")
            else:
                self.records.append(r)
        if not self.records:
            raise DatasetError(f"{source}: no usable images ({self.stats})")
        self.stats.images = len(self.records)
        self.bucket_ids = [nearest_bucket(self.buckets, r.width, r.height) for r in self.records]
        self.random_crop, self.flip_aug, self.seed, self.epoch = random_crop, flip_aug, seed, 0
        self.caption_config = caption_config or CaptionConfig()
        if latent_cache is not None and random_crop:
            raise DatasetError("random_crop cannot be used with cached latents (the crop is fixed when caching)")
        if latent_cache is not None and flip_aug and not latent_cache.flip_aug:
            raise DatasetError("flip_aug needs a LatentCache built with flip_aug=True (it caches the mirror too)")
        if text_cache is not None and self.caption_config.is_random:
            raise DatasetError("caption shuffling / dropout makes captions differ every step: "
                               "their embeddings cannot be cached, encode them in the loop")
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self._by_bucket: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_ids):
            self._by_bucket.setdefault(b, []).append(i)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def bucket_table(self) -> str:
        return bucket_table(self.buckets, self.bucket_ids)

    def bucket(self, i: int) -> Bucket:
        return self.buckets[self.bucket_ids[i]]

    def caption(self, i: int, rng: random.Random) -> str:
        return process_caption(self.records[i].caption, self.caption_config, rng)

    def _load(self, i: int, flip: bool, rng: random.Random) -> dict:
        rec, bucket = self.records[i], self.bucket(i)
        if self.latent_cache is None:
            img, original = load_image(rec.path, cover=bucket)
            return make_item(img, original, bucket, rng, random_crop=self.random_crop, flip=flip)
        entry = self.latent_cache.load(rec, bucket)  # FileNotFoundError (an OSError) when not cached
        suffix = "_flipped" if flip else ""
        return {"latents": entry["latents" + suffix], "caption": "",
                "original_size": tuple(entry["original_size"].tolist()),
                "crop_top_left": tuple(entry["crop_top_left" + suffix].tolist()), "target_size": tuple(bucket)}

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(f"item:{self.seed}:{self.epoch}:{i}")
        flip = self.flip_aug and rng.random() < 0.5
        # A file that fails to decode is replaced by another image of its bucket, so batches keep their shape.
        same = self._by_bucket[self.bucket_ids[i]]
        for j in itertools.chain((i,), (j for j in same if j != i)):
            try:
                item = self._load(j, flip, rng)
            except IMAGE_ERRORS as e:
                self.stats.unreadable += 1
                warn_bad_file(f"{self.records[j].path}: unreadable ({type(e).__name__}: {e}), "
                              "replaced by another image")
                continue
            item["caption"] = self.caption(j, rng)
            item["index"] = j
            if self.text_cache is not None:
                try:
                    item.update(self.text_cache.load(item["caption"]))
                except FileNotFoundError:
                    raise DatasetError(f"caption {item['caption']!r} is not in the text cache "
                                       "(run TextCache.build first)") from None
            return item
        hint = " (latent cache not built?)" if self.latent_cache is not None else ""
        raise DatasetError(f"no readable image in bucket {self.bucket(i)} ({len(same)} images){hint}")


# ---- tar shards ----------------------------------------------------------------------------------------------

def _shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle through a buffer of `size` items (size <= 1: no shuffle)."""
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def read_shard(path: str, stats: DataStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar; consecutive members sharing a key form a sample."""
    key, sample = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streaming: no seeking, no member index
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                k = posixpath.join(dirname, stem)
                if k != key:
                    if sample:
                        yield key, sample
                    key, sample = k, {}
                sample[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        stats.unreadable += 1
        warn_bad_file(f"{path}: broken tar shard, rest skipped ({type(e).__name__}: {e})")
    if sample:
        yield key, sample


class TarShardDataset(IterableDataset):
    """Streams WebDataset tar shards; split over (rank, worker) round-robin; see the module docstring."""

    def __init__(self, shards: Sequence[str], *, image_size: int = 1024, step: int = 64,
                 min_side: int | None = None, max_side: int | None = None, min_image_size: int | None = None,
                 random_crop: bool = False, flip_aug: bool = False, caption_config: CaptionConfig | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 batch_size: int | None = None, stats: DataStats | None = None):
        if not shards:
            raise DatasetError("no tar shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards = list(shards)
        self.buckets = make_buckets(image_size, step, min_side, max_side)
        self.min_image_size = round(MIN_IMAGE_FRACTION * image_size) if min_image_size is None else min_image_size
        self.random_crop, self.flip_aug = random_crop, flip_aug
        self.caption_config = caption_config or CaptionConfig()
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.shuffle_buffer, self.batch_size = shuffle_buffer, batch_size
        self.stats = stats if stats is not None else DataStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for(self, worker_id: int = 0, num_workers: int = 1) -> list[str]:
        """This (rank, worker)'s shards: the epoch's shuffled shard list, round-robin over all slots."""
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)  # same order on every rank
        return order[self.rank * num_workers + worker_id::self.world_size * num_workers]

    def _item(self, shard: str, key: str, sample: dict[str, bytes], rng: random.Random) -> dict | None:
        name = f"{shard}:{key}"
        ext = next((e for e in sample if "." + e in IMAGE_EXTENSIONS), None)
        if ext is None:
            self.stats.missing_image += 1
            warn_bad_file(f"{name}: sample without an image, skipped")
            return None
        try:
            with Image.open(io.BytesIO(sample[ext])) as header:
                w, h, _ = displayed_size(header)
            if w * h < self.min_image_size ** 2:
                self.stats.too_small += 1
                warn_bad_file(f"{name}.{ext}: {w}x{h} is below min_image_size {self.min_image_size}^2 px, "
                              "skipped")
                return None
            bucket = self.buckets[nearest_bucket(self.buckets, w, h)]
            img, original = load_image(io.BytesIO(sample[ext]), cover=bucket)
        except IMAGE_ERRORS as e:
            self.stats.unreadable += 1
            warn_bad_file(f"{name}.{ext}: unreadable image skipped ({type(e).__name__}: {e})")
            return None
        if "txt" in sample:
            caption = decode_caption(sample["txt"], f"{name}.txt", self.stats)
        else:
            meta = {}
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except (json.JSONDecodeError, UnicodeDecodeError):
                    warn_bad_file(f"{name}.json: invalid JSON ignored")
            text = meta.get("tags") or meta.get("caption") if isinstance(meta, dict) else None
            if text is None:
                self.stats.missing_caption += 1
                warn_bad_file(f"{name}: no caption, training with an empty caption")
            caption = clean_caption(str(text or ""))
        self.stats.images += 1
        flip = self.flip_aug and rng.random() < 0.5
        item = make_item(img, original, bucket, rng, random_crop=self.random_crop, flip=flip)
        item["caption"] = process_caption(caption, self.caption_config, rng)
        item["key"] = name
        return item

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"tar:{self.seed}:{self.epoch}:{self.rank}:{worker_id}")
        shards = self.shards_for(worker_id, num_workers)
        if not shards:  # this slot idles; under DDP its rank would run out of batches first
            warnings.warn(f"rank {self.rank} worker {worker_id}: no shard left ({len(self.shards)} shards for "
                          f"{self.world_size * num_workers} rank x worker slots)", DataWarning)
        samples = ((s, k, smp) for s in shards for k, smp in read_shard(s, self.stats))
        pending: dict[Bucket, list[dict]] = {}
        for shard, key, sample in _shuffled(samples, self.shuffle_buffer, rng):
            item = self._item(shard, key, sample, rng)
            if item is None:
                continue
            if self.batch_size is None:
                yield item
                continue
            group = pending.setdefault(item["target_size"], [])
            group.append(item)
            if len(group) == self.batch_size:
                yield collate(group)
                pending[item["target_size"]] = []


# ---- source selection ----------------------------------------------------------------------------------------

_TAR_ONLY = ("rank", "world_size", "shuffle_buffer", "batch_size")
_MAP_ONLY = ("latent_cache", "text_cache")


def open_dataset(data_dir: str | os.PathLike | None = None,
                 metadata_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 train_shards: str | Sequence[str] | None = None, **kwargs) -> BucketDataset | TarShardDataset:
    """The dataset the flags point at: tar shards, metadata JSON, or an image folder (or a folder of .tar files).

    kwargs go to BucketDataset / TarShardDataset (image_size, step, min_side, max_side, min_image_size,
    random_crop, flip_aug, caption_config, seed, stats, ...; rank / world_size / shuffle_buffer / batch_size
    only concern tar shards and are ignored for map-style sources, whose split is the batch sampler's).
    """
    stats = kwargs.setdefault("stats", DataStats())
    if isinstance(metadata_files, (str, os.PathLike)):
        metadata_files = [metadata_files]
    if data_dir is not None and train_shards is None and not metadata_files:
        s = str(data_dir)
        if "{" in s or s.endswith(".tar"):
            train_shards = s
        elif s.endswith(".json") and os.path.isfile(s):
            metadata_files, data_dir = [s], None
    if train_shards is not None:
        return _tar_dataset(find_shards(train_shards), kwargs)
    map_kwargs = {k: v for k, v in kwargs.items() if k not in _TAR_ONLY}
    if metadata_files:
        records = load_metadata(metadata_files, stats, data_dir)
        return BucketDataset(records, source=", ".join(map(str, metadata_files)), **map_kwargs)
    if data_dir is None:
        raise DatasetError("no data given: pass data_dir, metadata_files or train_shards")
    root = Path(data_dir)
    if not root.exists():
        raise DatasetError(f"{root}: data_dir does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a dataset (expected a folder of images + .txt captions, "
                           f"a metadata .json or .tar shards)")
    records = scan_folder(root, stats)
    if not records:
        tars = sorted(str(p) for p in root.rglob("*.tar"))
        if tars:
            return _tar_dataset(tars, kwargs)
    return BucketDataset(records, source=str(root), **map_kwargs)


def _tar_dataset(shards: list[str], kwargs: dict) -> TarShardDataset:
    if any(kwargs.get(k) is not None for k in _MAP_ONLY):
        raise DatasetError("latent / text caches need a folder or metadata source, not streamed tar shards")
    return TarShardDataset(shards, **{k: v for k, v in kwargs.items() if k not in _MAP_ONLY})

"""Training data: image folders, metadata JSON and tar shards -> bucketed, cropped, captioned batches.

Sources and their captions (tar shards only through `open_stream`, the others through `open_dataset`):
  * a folder, searched recursively: `a/b.jpg` with `a/b.txt` (or `a/b.caption`);
  * metadata JSON `{"img/1.png": {"caption": "...", "tags": "...", "image_size": [w, h]}}` (see load_metadata);
  * WebDataset tar shards (`train-{00000..00016}.tar`, uncompressed): `<key>.jpg|png|webp` with `<key>.txt`, or a
    `<key>.json` read as a metadata entry.
Folders and metadata give a map-style `BucketDataset` (for BucketBatchSampler and `collate`; `set_epoch` each
epoch), tar shards a `ShardStream`. Items are dicts: `pixels` (3, H, W) in [-1, 1] (or cached `latents`), `caption`,
`original_size` (h, w), `crop_top_left` (top, left) in the resized image, `target_size` (h, w) = the bucket
(training/buckets.py), `index`, and when asked a loss `mask` and a ControlNet `conditioning` image, cropped and
flipped as their image (BucketDataset); `collate` adds `time_ids` (B, 6), SDXL's micro-conditioning. Crops, flips and
caption shuffles are seeded per (seed, epoch, sample): the same with any number of workers and after a resume.

Bad data never stops a run: each bad file (an unreadable image, a sample without one, a bad caption) gives one
`DataWarning` naming it ("<shard>:<member>" in a tar), is counted in `DataStats` (the summary line) and skipped.
Bad configuration (missing folder, malformed JSON, nothing usable, fewer shards than processes, a truncated or
corrupt tar) raises `DatasetError`: one line naming the file, which the CLI turns into exit code 2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import io
import itertools
import json
import os
import posixpath
import random
import re
import tarfile
import tomllib
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from training.buckets import Bucket, bucket_table, crop_coords, make_buckets, nearest_bucket, resize_and_crop
from training.captions import CaptionConfig, clean_caption, process_caption

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_IMAGE_FRACTION = 0.75  # default min_image_size = 0.75 * image_size (768 px at 1024)
_EXIF_FORMATS = ("JPEG", "MPO", "WEBP", "TIFF")  # formats whose header holds EXIF (PNG would need a full decode)
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # PIL on a broken / hostile file


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
    missing_caption: int = 0  # trained with ""
    empty_caption: int = 0
    bad_encoding: int = 0  # non-UTF-8 caption (decoded with replacement characters)
    orphan_caption: int = 0  # a caption file without an image
    missing_image: int = 0  # a metadata / tar entry without an image
    converted: int = 0  # non-RGB mode converted (alpha composited on white, 16-bit scaled, CMYK, palette)
    rotated: int = 0  # EXIF orientation applied
    missing_mask: int = 0  # no mask in the subset's mask folder (weight 1)
    missing_conditioning: int = 0  # no conditioning image in the subset's conditioning folder

    def __str__(self) -> str:
        return "data: " + ", ".join(f"{getattr(self, f.name)} {f.name.replace('_', ' ')}" for f in fields(self))

    def bad(self, counter: str, message: str) -> None:
        """Count one bad file and warn once, naming it."""
        setattr(self, counter, getattr(self, counter) + 1)
        warn_bad_file(message)


@dataclass(frozen=True)
class ImageRecord:
    path: str
    caption: str  # cleaned raw caption, "" when missing
    width: int  # as displayed, i.e. after EXIF rotation
    height: int
    subset: int = 0  # index into the dataset's subsets (repeats, caption and flip rules)
    mask: str | None = None  # its loss mask (white learns, black is ignored), from the subset's mask folder
    conditioning: str | None = None  # its ControlNet conditioning image, from the subset's conditioning folder


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit scaled to 8-bit."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32)
        scale = 257.0 if img.mode.startswith("I;16") or a.max() > 255 else 1.0  # 16-bit -> 8-bit: 65535 / 257 = 255
        img = Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8), "L")
    if has_alpha(img):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img if img.mode == "RGB" else img.convert("RGB")  # also L, 1, P, CMYK, YCbCr


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def displayed_size(img: Image.Image) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of an opened image as displayed, from its header alone."""
    # PNG keeps EXIF after the pixel data: reading it would decode the whole file, so only header formats count.
    orientation = img.getexif().get(0x0112, 1) if img.format in _EXIF_FORMATS else 1
    w, h = img.size
    return (h, w, orientation) if orientation in (5, 6, 7, 8) else (w, h, orientation)  # 90-degree turns


def load_image(source: str | os.PathLike | io.BytesIO,
               cover: Bucket | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode, apply the EXIF orientation, convert to RGB: (image, original (h, w) as displayed); IMAGE_ERRORS if
    broken. With `cover` (its bucket) a JPEG decodes at the smallest 1/2^k scale still covering it (libjpeg's DCT
    scaling, several times faster for large photos); the original size returned is the full one either way."""
    with Image.open(source) as img:
        w, h, orientation = displayed_size(img)
        drafted = cover is not None and img.format == "JPEG"
        if drafted:
            (rw, rh), _ = crop_coords((w, h), cover)
            img.draft(None, (rh, rw) if orientation in (5, 6, 7, 8) else (rw, rh))  # in stored orientation
        img.load()  # decode now: a truncated file raises here, not later in a worker
        img = ImageOps.exif_transpose(img)  # also finds EXIF that displayed_size skipped (PNG)
    return to_rgb(img), (h, w) if drafted else (img.height, img.width)


def load_companion(path: str, kind: str, bucket: Bucket, original_size: tuple[int, int],
                   rng: random.Random | None, flip: bool) -> torch.Tensor:
    """An image's mask (1, H, W) or conditioning image (3, H, W) in [0, 1], resized, cropped and flipped as the image
    of `original_size` (w, h) was: the same geometry and crop draws (`rng` in the state the image's crop began
    from). kind: "mask" (a mask file's luminance), "alpha" (`path` is the image: its alpha channel), "conditioning"."""
    if kind == "alpha":
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")
    else:
        img = load_image(path, cover=bucket)[0]
        img = img.convert("L") if kind == "mask" else img
    out, _ = resize_and_crop(img, bucket, rng, flip=flip, original_size=original_size)
    x = torch.from_numpy(np.array(out, dtype=np.uint8)).float().div_(255)  # (H, W) or (H, W, 3)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def probe_image(source: str | io.BytesIO, stats: DataStats, name: str | None = None) -> tuple[int, int] | None:
    """(width, height) as displayed from the header only (fast); None (warned, counted) if unreadable."""
    try:
        with Image.open(source) as img:
            (w, h, orientation), mode = displayed_size(img), img.mode
    except IMAGE_ERRORS as e:
        return stats.bad("unreadable", f"{name or source}: unreadable image skipped ({type(e).__name__}: {e})")
    stats.converted += mode != "RGB"  # repairs, not faults: counted for the summary, not warned file by file
    stats.rotated += orientation != 1
    return w, h


def decode_caption(data: bytes | None, name: str, stats: DataStats, missing: str = "no caption") -> str:
    """UTF-8 (BOM tolerated) caption bytes -> cleaned text, undecodable bytes replaced; None -> ""; warned."""
    if data is None:
        stats.bad("missing_caption", f"{name}: {missing}, training with an empty caption")
        return ""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.bad("bad_encoding", f"{name}: caption is not UTF-8, undecodable bytes replaced")
        text = data.decode("utf-8", errors="replace")
    if not (text := clean_caption(text)):
        stats.bad("empty_caption", f"{name}: empty caption")
    return text


def meta_caption(entry: object) -> str:
    """The caption of a metadata / tar .json entry: its "caption" then its "tags", comma-joined."""
    return ", ".join(str(entry[k]) for k in ("caption", "tags") if isinstance(entry, dict) and entry.get(k))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (x * 2 / 255 - 1)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3), a writable copy
    return x.permute(2, 0, 1).float().mul_(2 / 255).sub_(1.0)


def _walk(root: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(stem, lower-case extension) of every file under `root`: recursive, sorted, hidden folders skipped."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(os.path.join(dirpath, name))
            yield stem, ext


def scan_folder(root: str | os.PathLike, stats: DataStats, caption_extension: str | None = None,
                class_tokens: str | None = None) -> list[ImageRecord]:
    """Images under `root` (recursive, sorted, hidden folders skipped) with their same-stem captions: `.txt`, else
    `.caption`, or only `caption_extension`; an image without one is captioned `class_tokens` when given."""
    exts = ["." + caption_extension.lower().lstrip(".")] if caption_extension else [".txt", ".caption"]
    images: list[tuple[str, str]] = []  # (stem, path)
    found: dict[str, dict[str, str]] = {}  # stem -> {caption extension: path}
    for stem, ext in _walk(root):
        if ext.lower() in IMAGE_EXTENSIONS:
            images.append((stem, stem + ext))
        elif ext.lower() in exts:
            found.setdefault(stem, {})[ext.lower()] = stem + ext
    captions = {stem: next(c[e] for e in exts if e in c) for stem, c in found.items()}  # .txt before .caption
    for stem in sorted(captions.keys() - {s for s, _ in images}):
        stats.bad("orphan_caption", f"{captions[stem]}: caption without an image, ignored")
    records = []
    for stem, path in images:
        if (size := probe_image(path, stats)) is None:
            continue
        cap, data = captions.get(stem), None
        with contextlib.suppress(OSError):  # an unreadable caption file trains as a missing one
            data = Path(cap).read_bytes() if cap else None
        if data is None and class_tokens is not None:  # kohya: a DreamBooth folder's name is the caption
            records.append(ImageRecord(path, clean_caption(class_tokens), *size))
            continue
        caption = decode_caption(data, path if data is None else cap, stats,
                                 f"no readable caption file ({stem}{exts[0]})")
        records.append(ImageRecord(path, caption, *size))
    return records


def _resolve(key: str, json_dir: Path, data_dir: Path | None) -> str:
    """A metadata key -> an existing image path if possible (JSON folder first, then data_dir, then + extension)."""
    bases = [Path(key)] if Path(key).is_absolute() else [json_dir / key] + ([data_dir / key] if data_dir else [])
    # abspath normalises: "img/a.png" and "sub/../img/a.png" are one image, whose entries merge
    bases = [os.path.abspath(b) for b in bases]
    for base in bases:  # kohya's metadata keys often omit the extension
        for ext in ("",) + (() if base.lower().endswith(IMAGE_EXTENSIONS) else IMAGE_EXTENSIONS):
            if os.path.isfile(base + ext):
                return base + ext
    return bases[0]


def load_metadata(files: Sequence[str | os.PathLike], stats: DataStats,
                  data_dir: str | os.PathLike | None = None) -> list[ImageRecord]:
    """Merge metadata JSON files (image path -> {"caption", "tags", "image_size": [w, h]}) into records: a later
    file updates an entry's fields; caption = "caption" then "tags", comma-joined; a path is relative to its JSON's
    folder, then data_dir, its extension optional; without a valid "image_size" the image header is read."""
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
            raise DatasetError(f"{f}: expected a JSON object {{image path: entry}}, got {type(meta).__name__}")
        for key, entry in meta.items():
            if not isinstance(entry, dict):
                raise DatasetError(f"{f}: entry {key!r} is {type(entry).__name__}, expected an object")
            merged.setdefault(_resolve(key, f.parent, data_dir and Path(data_dir)), {}).update(entry)
    records = []
    for path, entry in merged.items():
        if not os.path.isfile(path):
            stats.bad("missing_image", f"{path}: listed in metadata but not found, skipped")
            continue
        caption = decode_caption(meta_caption(entry).encode(), path, stats)
        size = entry.get("image_size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            size = probe_image(path, stats)  # absent or malformed: read the header instead
        if size is not None:
            records.append(ImageRecord(path, caption, *size))
    return records


@dataclass(frozen=True)
class Subset:
    """A kohya subset: a folder (or metadata file) of images with its own repeats and caption, flip, mask and
    conditioning settings; an option left None follows the run's flags. Regularisation subsets (is_reg) are
    balanced as kohya's sd-scripts does (see balance_repeats)."""
    image_dir: str | None = None
    metadata_file: str | tuple[str, ...] | None = None  # image paths relative to it, then to image_dir
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None  # the caption of an image without a caption file
    caption_extension: str | None = None  # default .txt, else .caption
    keep_tokens: int | None = None
    shuffle_caption: bool | None = None
    flip_aug: bool | None = None
    mask_dir: str | None = None  # a mask per image: same path relative to image_dir, same stem, any image format
    conditioning_data_dir: str | None = None  # a ControlNet conditioning image per image, found the same way

    @property
    def name(self) -> str:
        files = [self.metadata_file] if isinstance(self.metadata_file, str) else self.metadata_file
        return f"{'reg ' if self.is_reg else ''}{', '.join(files) if files else self.image_dir}"

    def caption_config(self, base: CaptionConfig) -> CaptionConfig:
        kw = {"shuffle_tags": self.shuffle_caption, "keep_tokens": self.keep_tokens}
        return dataclasses.replace(base, **{k: v for k, v in kw.items() if v is not None})


_KOHYA_FOLDER = re.compile(r"(\d+)_(.*)")  # "10_sks dog": 10 repeats, captioned "sks dog" where it has no caption


def folder_subsets(root: str | os.PathLike, is_reg: bool = False, mask_dir: str | None = None,
                   conditioning_dir: str | None = None) -> list[Subset]:
    """kohya's layout: each `N_name` folder under `root` is a subset of N repeats (N = 0: skipped); without such
    folders `root` is one subset, once per epoch. Mask and conditioning folders mirror `root`."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: {'reg_data_dir' if is_reg else 'data_dir'} "
                           f"{'is not a folder' if os.path.exists(root) else 'does not exist'}")
    named = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and _KOHYA_FOLDER.fullmatch(d.name))
    if not named:
        return [Subset(str(root), is_reg=is_reg, mask_dir=mask_dir, conditioning_data_dir=conditioning_dir)]
    others = sorted(d.name for d in Path(root).iterdir() if d.name not in named and not d.name.startswith("."))
    if others:
        warn_bad_file(f"{root}: {len(others)} entries outside its N_name folders ignored, e.g. {others[0]!r}")
    sub = lambda d, name: d and os.path.join(d, name)  # noqa: E731
    return [Subset(os.path.join(root, n), num_repeats=int(m[1]), is_reg=is_reg, class_tokens=m[2],
                   mask_dir=sub(mask_dir, n), conditioning_data_dir=sub(conditioning_dir, n))
            for n in named if int((m := _KOHYA_FOLDER.fullmatch(n))[1]) > 0]


_SUBSET_KEYS = {f.name: f.type for f in fields(Subset)}


def _subset(path: Path, entry: dict, where: str) -> Subset:
    for key, value in entry.items():
        kind = {"int | None": int, "int": int, "bool": bool, "bool | None": bool}.get(_SUBSET_KEYS.get(key), str)
        if key not in _SUBSET_KEYS:
            raise DatasetError(f"{path}: unknown key {key!r} in {where} (known: {', '.join(_SUBSET_KEYS)})")
        if type(value) is not kind:
            raise DatasetError(f"{path}: {where}: {key} must be {kind.__name__}, got {value!r}")
    if not (entry.get("image_dir") or entry.get("metadata_file")):
        raise DatasetError(f"{path}: {where} has neither image_dir nor metadata_file")
    if entry.get("num_repeats", 1) < 1 or entry.get("keep_tokens", 0) < 0:
        raise DatasetError(f"{path}: {where}: num_repeats must be at least 1 and keep_tokens at least 0")
    rel = ("image_dir", "metadata_file", "mask_dir", "conditioning_data_dir")  # relative to the TOML's folder
    return Subset(**{k: str(path.parent / v) if k in rel else v for k, v in entry.items()})


def load_dataset_config(path: str | os.PathLike) -> list[Subset]:
    """kohya's dataset TOML: `[general]` subset defaults, `[[datasets]]` (more defaults) each holding
    `[[datasets.subsets]]`; a top-level `[[subsets]]` list also works. Relative paths are from the TOML's folder."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the dataset config ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: invalid TOML: {e}") from None
    if unknown := sorted(set(doc) - {"general", "datasets", "subsets"}):
        raise DatasetError(f"{path}: unknown key {unknown[0]!r} (expected [general], [[datasets]], [[subsets]])")
    datasets = doc.get("datasets", []) + ([{"subsets": doc["subsets"]}] if "subsets" in doc else [])
    subsets = [_subset(path, {**doc.get("general", {}), **{k: v for k, v in d.items() if k != "subsets"}, **sub},
                       f"subset {j + 1} of dataset {i + 1}")
               for i, d in enumerate(datasets) for j, sub in enumerate(d.get("subsets", []))]
    if not subsets:
        raise DatasetError(f"{path}: no subsets (give [[datasets]] with [[datasets.subsets]])")
    return subsets


def _companions(records: list[ImageRecord], folder: str, root: str, what: str, stats: DataStats) -> list[str | None]:
    """Each record's file in `folder` at its path relative to `root`, same stem, any image format (None: missing)."""
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: {what} folder does not exist")
    found = {os.path.relpath(stem, folder): stem + ext for stem, ext in _walk(folder)
             if ext.lower() in IMAGE_EXTENSIONS}
    out = [found.get(os.path.relpath(os.path.splitext(r.path)[0], root)) for r in records]
    missing = [r.path for r, c in zip(records, out) if c is None]
    if what == "conditioning" and len(missing) * 2 > len(records):
        raise DatasetError(f"{folder}: conditioning images for only {len(records) - len(missing)} of {len(records)} "
                           f"images under {root} (same relative path and stem, any image format)")
    for r, c in zip(records, out):
        if c is not None:
            _check_aspect(c, r, what)
    for m in missing:
        stats.bad(f"missing_{what}", f"{m}: no {what} image in {folder}" + (", trained with weight 1" if
                                                                              what == "mask" else ", skipped"))
    return out


def _check_aspect(path: str, record: ImageRecord, what: str) -> None:
    """DatasetError unless the file at `path` can be resized to its image's size and cropped like it: the same
    aspect ratio, up to one pixel at the lower of the two resolutions."""
    try:
        with Image.open(path) as img:
            mw, mh, _ = displayed_size(img)
    except IMAGE_ERRORS as e:
        raise DatasetError(f"{path}: unreadable {what} image ({type(e).__name__}: {e})") from None
    w, h = record.width, record.height
    if abs(mh * w - h * mw) > max(w, mw):  # |mh * w / mw - h| > max(w / mw, 1): a pixel of the lower resolution
        raise DatasetError(f"{path}: {what} image of {mw}x{mh} cannot be cropped like its image {record.path} "
                           f"({w}x{h}): another aspect ratio")


def _alpha_mask(record: ImageRecord, stats: DataStats) -> ImageRecord:
    """The record with its own file as its mask (the alpha channel), or as it is (weight 1, warned) without one."""
    with Image.open(record.path) as img:
        if has_alpha(img):
            return dataclasses.replace(record, mask=record.path)
    stats.bad("missing_mask", f"{record.path}: no alpha channel (--alpha_mask), trained with weight 1")
    return record


def subset_records(subset: Subset, index: int, stats: DataStats) -> list[ImageRecord]:
    """The subset's images (with their mask and conditioning paths), each tagged with the subset's index."""
    if subset.metadata_file:
        files = [subset.metadata_file] if isinstance(subset.metadata_file, str) else subset.metadata_file
        records = load_metadata(files, stats, subset.image_dir)
    elif not os.path.isdir(subset.image_dir):
        raise DatasetError(f"{subset.image_dir}: image_dir does not exist")
    else:
        records = scan_folder(subset.image_dir, stats, subset.caption_extension, subset.class_tokens)
    root = subset.image_dir or os.path.dirname(files[0])
    masks = _companions(records, subset.mask_dir, root, "mask", stats) if subset.mask_dir else [None] * len(records)
    conds = _companions(records, subset.conditioning_data_dir, root, "conditioning", stats) \
        if subset.conditioning_data_dir else [None] * len(records)
    records = [dataclasses.replace(r, subset=index, mask=m, conditioning=c) for r, m, c in zip(records, masks, conds)]
    return [r for r in records if not subset.conditioning_data_dir or r.conditioning]  # ControlNet needs one


def balance_repeats(records: Sequence[ImageRecord], subsets: Sequence[Subset]) -> list[int]:
    """Each record's repeats per epoch. Training images: their subset's num_repeats. Regularisation images, as
    kohya's sd-scripts (DreamBoothDataset): as many per epoch as training images with repeats, n. In order, each
    takes its subset's repeats until the count reaches n (later ones unused); if all fit, one more each in turn
    until it does."""
    repeats = [0 if subsets[r.subset].is_reg else subsets[r.subset].num_repeats for r in records]
    reg, target, n = [i for i, r in enumerate(records) if subsets[r.subset].is_reg], sum(repeats), 0
    for k, i in enumerate(itertools.cycle(reg) if reg and target else ()):
        add = subsets[records[i].subset].num_repeats if k < len(reg) else 1
        repeats[i], n = repeats[i] + add, n + add
        if n >= target:
            break
    return repeats


HOLDOUT_SEED = 0  # the validation split's: the same held-out images for every --seed, so runs compare


def split_holdout(records: Sequence[ImageRecord], subsets: Sequence[Subset],
                  fraction: float) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training records, held-out records): round(fraction n) (at least 1) of the n distinct training images,
    drawn from their sorted paths by a fixed seed (HOLDOUT_SEED); regularisation images always train, and every
    record of a held-out image leaves training (repeats too). The held-out records come one per image, sorted."""
    paths = sorted({r.path for r in records if not subsets[r.subset].is_reg})
    k = max(1, round(fraction * len(paths)))
    if k >= len(paths):
        raise DatasetError(f"--validation_split {fraction} holds out {k} of the {len(paths)} training images: "
                           "none would be left to train on")
    held = set(random.Random(f"holdout:{HOLDOUT_SEED}").sample(paths, k))
    first = {}
    for r in records:
        if r.path in held:
            first.setdefault(r.path, r)
    return [r for r in records if r.path not in held], [first[p] for p in sorted(first)]


def expand_braces(pattern: str) -> list[str]:
    """Shell / WebDataset brace expansion: "a-{000..002}.tar" -> a-000, a-001, a-002; "{x,y}" -> x, y."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m[1])
    if r and int(r[1]) > int(r[2]):
        raise DatasetError(f"{pattern}: empty range {m[0]}")
    # a range is zero-padded to its first bound's width
    options = [f"{i:0{len(r[1])}d}" for i in range(int(r[1]), int(r[2]) + 1)] if r else m[1].split(",")
    return [pattern[:m.start()] + o + rest for o in options for rest in expand_braces(pattern[m.end():])]


def find_shards(patterns: str | Sequence[str]) -> list[str]:
    """Shard paths from brace / glob patterns (one string may hold several, separated by spaces)."""
    shards = []
    for pattern in patterns.split() if isinstance(patterns, str) else patterns:
        for p in expand_braces(pattern):
            if not (found := sorted(f for f in glob.glob(p) if os.path.isfile(f))):  # a plain path globs to itself
                raise DatasetError(f"{p}: no tar shard found")
            shards += found
    return shards


def collate(items: list[dict]) -> dict:
    """Stack a list of items into a batch; adds `time_ids` (B, 6) = SDXL micro-conditioning."""
    batch = {k: [it[k] for it in items] for k in items[0]}
    for k, v in batch.items():
        if isinstance(v[0], torch.Tensor):
            batch[k] = torch.stack(v)
        elif isinstance(v[0], (tuple, int)):
            batch[k] = torch.tensor(v, dtype=torch.long)
    batch["time_ids"] = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1).float()
    return batch


class _Source:
    """What BucketDataset and ShardStream share: the buckets, the size floor, augmentation and caption rules."""

    def __init__(self, *, image_size: int = 1024, step: int = 64, min_side: int | None = None,
                 max_side: int | None = None, min_image_size: int | None = None, random_crop: bool = False,
                 flip_aug: bool = False, caption_config: CaptionConfig | None = None, seed: int = 0,
                 stats: DataStats | None = None):
        self.buckets = make_buckets(image_size, step, min_side, max_side)
        self.min_image_size = round(MIN_IMAGE_FRACTION * image_size) if min_image_size is None else min_image_size
        self.random_crop, self.flip_aug, self.seed, self.epoch = random_crop, flip_aug, seed, 0
        self.caption_config = caption_config or CaptionConfig()
        self.stats = stats if stats is not None else DataStats()

    def large_enough(self, name: str, w: int, h: int) -> bool:
        if w * h < self.min_image_size ** 2:
            self.stats.bad("too_small", f"{name}: {w}x{h} is below min_image_size {self.min_image_size}^2 px, skipped")
        return w * h >= self.min_image_size ** 2

    def make_item(self, source: str | io.BytesIO, bucket: Bucket, caption: str, index: int, rng: random.Random,
                  flip: bool, caption_config: CaptionConfig | None = None) -> dict:
        """A training item: decode (IMAGE_ERRORS if broken), resize to cover, crop, flip, to [-1, 1], caption."""
        img, (h, w) = load_image(source, cover=bucket)
        img, crop = resize_and_crop(img, bucket, rng if self.random_crop else None, flip=flip, original_size=(w, h))
        caption = process_caption(caption, caption_config or self.caption_config, rng)
        return {"pixels": to_tensor(img), "caption": caption,
                "original_size": (h, w), "crop_top_left": crop, "target_size": tuple(bucket), "index": index}


def _replay(state: tuple | None) -> random.Random | None:
    """A generator in a saved state (None: none, a center crop)."""
    if state is None:
        return None
    rng = random.Random()
    rng.setstate(state)
    return rng


class BucketDataset(_Source, Dataset):
    """Map-style dataset over ImageRecords, each in its aspect bucket; options as _Source's. `subsets` (default one
    plain subset) give each record's repeats and caption / flip rules: an image repeated N times is N items, each
    with its own crop, flip and caption draws, so samplers, DDP slicing and resume see items and need nothing else.
    with_masks: items carry `mask` (1, H, W) in [0, 1], cropped and flipped as the image (ones for an image without
    one; from a latent cache, on the latent grid); with_conditioning: items carry the ControlNet `conditioning`
    image (3, H, W) in [0, 1], cropped and flipped as the image, never cached."""

    def __init__(self, records: Sequence[ImageRecord], *, subsets: Sequence[Subset] | None = None,
                 latent_cache=None, text_cache=None, source: str = "dataset", with_masks: bool = False,
                 with_conditioning: bool = False, **options):
        super().__init__(**options)
        self.with_masks, self.with_conditioning = with_masks, with_conditioning
        if with_conditioning and (bare := next((r for r in records if not r.conditioning), None)):
            raise DatasetError(f"{bare.path}: no conditioning image (its subset has no conditioning folder)")
        self.subsets = list(subsets or [Subset()])
        records = [r for r in records if self.large_enough(r.path, r.width, r.height)]
        self.stats.images = len(records)
        self.records = [r for r, n in zip(records, balance_repeats(records, self.subsets)) for _ in range(n)]
        if not self.records:
            raise DatasetError(f"{source}: no usable images ({self.stats})")
        self.bucket_ids = [nearest_bucket(self.buckets, r.width, r.height) for r in self.records]
        self.plan = self._plan(records)
        self.captions = [s.caption_config(self.caption_config) for s in self.subsets]
        self.flips = [self.flip_aug if s.flip_aug is None else s.flip_aug for s in self.subsets]
        if latent_cache is not None and self.random_crop:
            raise DatasetError("random_crop cannot be used with cached latents (the crop is fixed when caching)")
        if latent_cache is not None and any(self.flips) and not latent_cache.flip_aug:
            raise DatasetError("flip_aug needs a LatentCache built with flip_aug=True (it caches the mirror too)")
        if latent_cache is not None and with_masks and not latent_cache.masks:
            raise DatasetError("masks need a LatentCache built with masks=True (they enter its keys and entries)")
        if text_cache is not None and any(c.is_random for c in self.captions):
            raise DatasetError("caption shuffling / dropout makes captions differ every step: "
                               "their embeddings cannot be cached, encode them in the loop")
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.held_out: list[ImageRecord] = []  # images kept out of training for a validation loss (open_dataset)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _plan(self, records: list[ImageRecord]) -> list[str]:
        """One line per subset, images x repeats (regularisation: as balanced), when not one plain folder."""
        if len(self.subsets) == 1 and self.subsets[0].num_repeats == 1:
            return []
        images, items = Counter(r.subset for r in records), Counter(r.subset for r in self.records)
        train = sum(items[i] for i, s in enumerate(self.subsets) if not s.is_reg)
        return [f"subset {s.name}: {images[i]} images, " + (f"{items[i]} per epoch (balanced to the {train} "
                "training items)" if s.is_reg else f"x {s.num_repeats} repeats = {items[i]}")
                for i, s in enumerate(self.subsets)] + [f"{len(self.records)} items per epoch"]

    def bucket_table(self) -> str:
        """The run plan's data part: the subsets (images x repeats) and the buckets used."""
        return "\n".join(self.plan + [bucket_table(self.buckets, self.bucket_ids)])

    def bucket(self, i: int) -> Bucket:
        return self.buckets[self.bucket_ids[i]]

    def caption(self, i: int, rng: random.Random) -> str:
        return process_caption(self.records[i].caption, self.captions[self.records[i].subset], rng)

    def mask(self, i: int, rng: random.Random | None, flip: bool, original_size: tuple[int, int]) -> torch.Tensor:
        """Item i's mask (1, H, W) in [0, 1] for an image of `original_size` (h, w): see load_companion."""
        rec, bucket = self.records[i], self.bucket(i)
        if rec.mask is None:  # weight 1 (warned once, when the dataset was read)
            return torch.ones(1, *bucket)
        return load_companion(rec.mask, "alpha" if rec.mask == rec.path else "mask", bucket, original_size[::-1],
                              rng, flip)

    def _load(self, i: int, flip: bool, rng: random.Random) -> dict:
        rec, bucket = self.records[i], self.bucket(i)
        # A center crop, or the image's random crop draws replayed (from this state) for its mask and conditioning.
        crops = rng.getstate() if self.random_crop and self.latent_cache is None else None
        if self.latent_cache is None:
            item = self.make_item(rec.path, bucket, rec.caption, i, rng, flip, self.captions[rec.subset])
            if self.with_masks:
                item["mask"] = self.mask(i, _replay(crops), flip, item["original_size"])
        else:
            entry = self.latent_cache.load(rec, bucket)  # FileNotFoundError (an OSError) when not cached
            suffix = "_flipped" if flip else ""
            item = {"latents": entry["latents" + suffix], "caption": self.caption(i, rng),
                    "original_size": tuple(entry["original_size"].tolist()),
                    "crop_top_left": tuple(entry["crop_top_left" + suffix].tolist()), "target_size": tuple(bucket),
                    "index": i}
            if self.with_masks:  # cached on the latent grid (an image without a mask has none: weight 1)
                item["mask"] = entry.get("mask" + suffix, torch.ones(1, *item["latents"].shape[-2:]))
        if self.with_conditioning:
            item["conditioning"] = load_companion(rec.conditioning, "conditioning", bucket,
                                                  item["original_size"][::-1], _replay(crops), flip)
        return item

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(f"item:{self.seed}:{self.epoch}:{i}")
        flip = self.flips[self.records[i].subset] and rng.random() < 0.5
        # A file that fails to decode is replaced by another image of its bucket, so batches keep their shape.
        b = self.bucket_ids[i]
        for j in itertools.chain((i,), (j for j, bj in enumerate(self.bucket_ids) if bj == b and j != i)):
            try:
                item = self._load(j, flip, rng)
            except IMAGE_ERRORS as e:
                self.stats.bad("unreadable", f"{self.records[j].path}: unreadable ({type(e).__name__}: {e}), "
                                             "replaced by another image")
                continue
            if self.text_cache is not None:
                try:
                    item.update(self.text_cache.load(item["caption"]))
                except FileNotFoundError:
                    raise DatasetError(f"caption {item['caption']!r} is not in the text cache "
                                       "(run TextCache.build first)") from None
            return item
        hint = " (latent cache not built?)" if self.latent_cache is not None else ""
        raise DatasetError(f"no readable image in bucket {self.bucket(i)} ({self.bucket_ids.count(b)} images){hint}")


_FIX = "re-create the shard or drop it from --train_shards"


def check_shard(path: str) -> None:
    """DatasetError unless `path` is a whole, uncompressed tar: 512-byte blocks ending in zero blocks."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(6), f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as e:
        raise DatasetError(f"{path}: tar shard unreadable ({e.strerror})") from None
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):  # gzip, bzip2, xz, zstd
        raise DatasetError(f"{path}: compressed tar shard; the stream seeks inside shards, so repack it as a "
                           "plain .tar (its images are compressed already)")
    if size < 1024 or size % 512 or any(tail):
        index_shard(path)  # names the member a cut falls in
        raise DatasetError(f"{path}: truncated tar shard (no end-of-archive blocks): {_FIX}")


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {extension: (data offset, size)})] in tar order, from the headers; members sharing a key (the
    name up to its first dot) form a sample. A truncated or garbled archive is a DatasetError naming the member."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    last = None
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                dirname, base = posixpath.split(m.name)
                if m.isfile() and not base.startswith("."):
                    stem, _, ext = base.partition(".")
                    samples.setdefault(posixpath.join(dirname, stem), {})[ext.lower()] = (m.offset_data, m.size)
                last = m.name
            end = tar.offset
        with open(path, "rb") as f:  # tarfile stops quietly at a garbled header: what follows must be zeros
            f.seek(end)
            garbled = any(f.read(512))
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{path}: broken tar shard after member {last!r} ({e}): {_FIX}") from None
    if garbled:
        raise DatasetError(f"{path}: corrupt tar header after member {last!r} (byte {end}): {_FIX}")
    return list(samples.items())


def _read(path: str, where: tuple[int, int]) -> bytes:
    with open(path, "rb") as f:  # a handle per read, so the decode threads share nothing
        f.seek(where[0])
        return f.read(where[1])


@dataclass(eq=False)
class _Pending:
    """A buffered sample: where its image is, its bucket (from the header) and its caption; not decoded."""
    shard: int  # index into ShardStream.shards
    no: int  # sample number in the shard, tar order
    name: str  # "<shard>:<image member>", for warnings
    image: tuple[int, int]  # (offset, size) of the image member
    caption: str
    bucket: Bucket


class ShardStream(_Source):
    """Endless batches of `batch_size` samples of one bucket from tar shards, without a DataLoader.

    Epoch e shuffles the shards by (seed, e); rank r of world_size reads shards r, r + world_size, ... of them, each
    in a seeded sample order, and starts its next epoch alone when it runs dry. Samples wait undecoded in a buffer
    (their headers give their buckets) until a bucket fills a batch, or the buffer is full or the epoch read: then
    the fullest bucket goes, padded with repeats. After `load_state_dict(state_dict())` (per rank: the position, the
    buffer as references) the batches are bit for bit an uninterrupted run's, given the same seed, world size and
    shards (else the epoch restarts, warned). Batches decode when taken, `threads` images at once, while the step
    waits: a data-bound run is better served by a folder and DataLoader workers."""

    def __init__(self, shards: Sequence[str], *, batch_size: int, rank: int = 0, world_size: int = 1,
                 buffer: int = 256, threads: int = 4, **options):
        super().__init__(**options)
        if len(shards) < world_size:
            raise DatasetError(f"{len(shards)} shards for {world_size} processes: each process reads its own "
                               f"shards, so split the data into at least {world_size} shards or run fewer processes")
        for s in shards:
            check_shard(s)
        self.shards, self.batch_size, self.buffer = list(shards), batch_size, buffer
        self.rank, self.world_size = rank, world_size
        self._map = ThreadPoolExecutor(threads, thread_name_prefix="decode").map if threads > 1 else map
        self._samples = functools.lru_cache(1)(lambda shard: index_shard(self.shards[shard]))  # the one being read
        self._start(0)

    def _start(self, epoch: int) -> None:
        order = list(range(len(self.shards)))
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)  # the same on every rank
        self.epoch, self._mine = epoch, order[self.rank::self.world_size]
        self._shard = self._sample = self._batches = 0  # position: this rank's shard, sample in its order
        self._order: list[int] | None = None  # the current shard's sample order
        self._pending: list[_Pending] = []  # the buffer, oldest first

    def _probe(self, shard: int, no: int) -> _Pending | None:
        """Header and caption of one sample; None (counted, warned) when it has no usable image."""
        (key, members), path = self._samples(shard)[no], self.shards[shard]
        ext = next((e for e in members if "." + e in IMAGE_EXTENSIONS), None)
        if ext is None:
            return self.stats.bad("missing_image", f"{path}:{key}: sample without an image, skipped")
        name = f"{path}:{key}.{ext}"
        size = probe_image(io.BytesIO(_read(path, members[ext])), self.stats, name)
        if size is None or not self.large_enough(name, *size):
            return None
        text = _read(path, members["txt"]) if "txt" in members else None
        if text is None and "json" in members:
            with contextlib.suppress(ValueError):  # invalid JSON / UTF-8: no caption
                text = meta_caption(json.loads(_read(path, members["json"]))).encode() or None
        caption = decode_caption(text, f"{path}:{key}", self.stats, "no caption (.txt, or .json with caption / tags)")
        return _Pending(shard, no, name, members[ext], caption, self.buckets[nearest_bucket(self.buckets, *size)])

    def _decode(self, p: _Pending) -> dict | Exception:
        """The training item of a buffered sample (in a decode thread: no stats, no warnings here)."""
        rng = random.Random(f"sample:{self.seed}:{self.epoch}:{p.shard}:{p.no}")  # not the position: resumable
        try:
            return self.make_item(io.BytesIO(_read(self.shards[p.shard], p.image)), p.bucket, p.caption,
                                  p.shard << 32 | p.no, rng, flip=self.flip_aug and rng.random() < 0.5)
        except IMAGE_ERRORS as e:
            return e

    def _take(self, bucket: Bucket) -> dict | None:
        """The bucket's oldest batch_size samples, taken out of the buffer and decoded into a batch, padded with
        repeats when short (the epoch's end, a full buffer, broken images); None when every image was broken."""
        group = [p for p in self._pending if p.bucket == bucket][:self.batch_size]
        good = []
        for p, item in zip(group, self._map(self._decode, group)):
            self._pending.remove(p)
            if isinstance(item, Exception):
                self.stats.bad("unreadable", f"{p.name}: unreadable image skipped ({type(item).__name__}: {item})")
            else:
                good.append(item)
        if not good:
            return None
        self.stats.images += len(good)
        self._batches += 1
        return collate([good[i % len(good)] for i in range(self.batch_size)])

    def _read_next(self) -> None:
        """Buffer the next sample of this rank's epoch (unless unusable) and step the position past it."""
        shard = self._mine[self._shard]
        if self._order is None:
            self._order = list(range(len(self._samples(shard))))
            random.Random(f"samples:{self.seed}:{self.epoch}:{shard}").shuffle(self._order)
        if self._sample < len(self._order):
            self._pending += filter(None, [self._probe(shard, self._order[self._sample])])
            self._sample += 1
        if self._sample == len(self._order):
            self._shard, self._sample, self._order = self._shard + 1, 0, None

    def __iter__(self) -> Iterator[dict]:
        while True:
            counts = Counter(p.bucket for p in self._pending)  # in order of each bucket's oldest sample
            full = [b for b, n in counts.items() if n >= self.batch_size]
            dry = self._shard == len(self._mine)
            if full or (counts and (dry or len(self._pending) >= self.buffer)):
                if (batch := self._take(full[0] if full else counts.most_common(1)[0][0])) is not None:
                    yield batch
            elif dry:
                if self._batches == 0:
                    raise DatasetError(f"rank {self.rank}: no usable sample in its shards of epoch {self.epoch} "
                                       f"({', '.join(self.shards[s] for s in self._mine)}); see the warnings")
                self._start(self.epoch + 1)
            else:
                self._read_next()

    def state_dict(self) -> dict:
        """The position after the last batch yielded; JSON-able, per rank."""
        return {"epoch": self.epoch, "shard": self._shard, "sample": self._sample, "batches": self._batches,
                "pending": [[p.shard, p.no] for p in self._pending], "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "shards": len(self.shards)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (the buffered samples' headers are read again; nothing is decoded)."""
        ours = {"seed": self.seed, "world_size": self.world_size, "shards": len(self.shards)}
        theirs = {k: state[k] for k in ours}
        self._start(state["epoch"])
        if theirs != ours:
            warnings.warn(f"stream state for {theirs}, this run has {ours}: restarting epoch {self.epoch} "
                          "(exact resume needs the same seed, world size and shards)", DataWarning)
            return
        if state["rank"] != self.rank:
            raise ValueError(f"stream state of rank {state['rank']} given to rank {self.rank}")
        self._shard, self._sample, self._batches = state["shard"], state["sample"], state["batches"]
        self._pending = list(filter(None, (self._probe(s, no) for s, no in state["pending"])))


def open_dataset(data_dir: str | os.PathLike | None = None,
                 metadata_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                 dataset_config: str | os.PathLike | None = None, reg_data_dir: str | os.PathLike | None = None,
                 mask_dir: str | None = None, conditioning_dir: str | None = None, alpha_mask: bool = False,
                 holdout: float | None = None, **options) -> BucketDataset:
    """A BucketDataset of a kohya dataset TOML, else of the metadata files (image paths relative to them, then to
    data_dir), else of the folder data_dir (`N_name` folders in it: N repeats each), plus the regularisation
    folder's; mask and conditioning folders mirror data_dir; alpha_mask: an image of a subset without a mask folder
    is its own mask (its alpha channel); holdout: a fraction of the images kept out of training, in the dataset's
    `held_out` records (split_holdout); options as BucketDataset's. Tar shards: open_stream."""
    stats = options.setdefault("stats", DataStats())
    if dataset_config:
        subsets = load_dataset_config(dataset_config)
    elif metadata_files:
        files = [metadata_files] if isinstance(metadata_files, (str, os.PathLike)) else metadata_files
        subsets = [Subset(str(data_dir) if data_dir else None, tuple(map(str, files)), mask_dir=mask_dir,
                          conditioning_data_dir=conditioning_dir)]
    elif data_dir is None:
        raise DatasetError("no data given: pass data_dir, metadata_files, dataset_config or train_shards")
    elif os.path.isfile(data_dir):
        raise DatasetError(f"{data_dir}: not a folder of images (pass a metadata .json as --metadata_files, "
                           "tar shards as --train_shards)")
    else:
        subsets = folder_subsets(data_dir, False, mask_dir, conditioning_dir)
    subsets += folder_subsets(reg_data_dir, True) if reg_data_dir else []
    records = [r for k, subset in enumerate(subsets) for r in subset_records(subset, k, stats)]
    if alpha_mask:
        records = [r if subsets[r.subset].mask_dir else _alpha_mask(r, stats) for r in records]
    if not records and data_dir and os.path.isdir(data_dir) and any(Path(data_dir).rglob("*.tar")):
        raise DatasetError(f"{data_dir}: no images but .tar files: pass tar shards as --train_shards")
    records, held = split_holdout(records, subsets, holdout) if holdout else (records, [])
    ds = BucketDataset(records, subsets=subsets, source=", ".join(s.name for s in subsets), **options)
    ds.held_out = held
    return ds


def open_stream(train_shards: str | Sequence[str], **options) -> ShardStream:
    """A ShardStream over brace / glob patterns or paths (see find_shards); options as ShardStream's (no caches:
    TrainConfig refuses them with --train_shards)."""
    return ShardStream(find_shards(train_shards), **options)

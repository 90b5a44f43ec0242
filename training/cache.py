"""On-disk caches of VAE latents and text embeddings, so the VAE and text encoders can leave the GPU.

Each entry is one safetensors file named by a hash of everything that determines it:
  latents: blake2b(CACHE_VERSION, model_id, bytes of the image file, bucket (h, w), crop (top, left), flip_aug)
  text:    blake2b(CACHE_VERSION, model_id, kind, caption text)
so a changed image, caption, bucket, crop or model (the caller's `model_id`, e.g. "sdxl-vae-fp16-fix@sha")
gives a new name and is encoded again, and an unchanged one is never encoded twice. Stale files are simply
never read. Writes go to a temporary name and are renamed into place: a killed run leaves no corrupt entry,
and `build` resumes by skipping the entries already present.

Encoders are plain callables, so this module needs no model code:
    encode_images(pixels (B, 3, H, W) float in [-1, 1]) -> latents (B, C, H/8, W/8), exactly as the UNet
        should see them (scaled by the VAE's scaling factor; use the posterior mean for reproducibility);
    encode_text(list[str]) -> (context (B, L, D), pooled (B, P))    for kind="embeddings";
    tokenize(list[str]) -> token ids (B, L)                          for kind="tokens".

Usage from the loop:

    lat = LatentCache(cache_dir, model_id=vae_id, flip_aug=flip_aug)
    txt = TextCache(cache_dir, model_id=text_id) if not caption_config.is_random else None
    ds = open_dataset(..., random_crop=False, latent_cache=lat, text_cache=txt)
    lat.build(ds, encode_images, batch_size=8, rank=rank, world_size=world_size)
    txt.build(captions_of(ds), encode_text, rank=rank, world_size=world_size)
    (barrier)
    if caches_complete(ds): free the VAE and text encoders

Latent entries hold `latents` (C, h, w), `original_size` (h, w), `crop_top_left` (top, left), `target_size`
(h, w), and with flip_aug also `latents_flipped` / `crop_top_left_flipped` (the same crop of the mirrored
image, left measured in the mirrored image). Cached latents use the center crop (random crops would need a new
encoding every epoch). Text entries hold `context` (L, D) and `pooled` (P), or `tokens` (L,).

With caption shuffling / dropout every step sees a different caption, so embeddings cannot be cached; then the
dataset refuses a text cache and the loop encodes `batch["caption"]` itself. kind="tokens" caches token ids of
fixed captions (for runs that train the text encoders, whose embeddings change).
"""
from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.buckets import Bucket, crop_coords, resize_and_crop
from training.data import IMAGE_ERRORS, BucketDataset, ImageRecord, load_image, to_tensor, warn_bad_file

CACHE_VERSION = 1  # bump when preprocessing changes (resize filter, crop rule): every entry is then re-made


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """blake2b-128 of a file's bytes, hex."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _name_hash(*parts: object) -> str:
    return hashlib.blake2b("\0".join(map(str, (CACHE_VERSION, *parts))).encode(), digest_size=16).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # pid: ranks caching at once never share a temp
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)  # atomic on POSIX: readers see the old state or the whole new file


class LatentCache:
    def __init__(self, folder: str | os.PathLike, model_id: str, flip_aug: bool = False):
        self.folder = Path(folder) / "latents"
        self.model_id, self.flip_aug = model_id, flip_aug
        self._digests: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, digest)

    def digest(self, path: str) -> str:
        """The file's content hash, remembered while its size and mtime are unchanged (one stat per lookup)."""
        st = os.stat(path)
        memo = self._digests.get(path)
        if memo is None or memo[:2] != (st.st_size, st.st_mtime_ns):
            memo = (st.st_size, st.st_mtime_ns, file_digest(path))
            self._digests[path] = memo
        return memo[2]

    def entry_path(self, record: ImageRecord, bucket: Bucket) -> Path:
        _, crop = crop_coords((record.width, record.height), bucket)  # the center crop caching uses
        key = _name_hash("latents", self.model_id, self.digest(record.path), tuple(bucket), crop, self.flip_aug)
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, record: ImageRecord, bucket: Bucket) -> dict[str, torch.Tensor]:
        """The entry's tensors; FileNotFoundError when it is not cached."""
        return load_file(str(self.entry_path(record, bucket)))

    def missing(self, dataset: BucketDataset) -> list[int]:
        """Dataset indices without an entry (an unreadable image stays missing and is replaced when loading)."""
        return [i for i, r in enumerate(dataset.records) if not self.entry_path(r, dataset.bucket(i)).exists()]

    def is_complete(self, dataset: BucketDataset) -> bool:
        return not self.missing(dataset)

    def build(self, dataset: BucketDataset, encode_images: Callable[[torch.Tensor], torch.Tensor], *,
              batch_size: int = 8, num_workers: int = 0, rank: int = 0, world_size: int = 1,
              progress: bool = True) -> int:
        """Encode every missing entry (this rank's share), batching images of one bucket; returns how many."""
        todo = self.missing(dataset)[rank::world_size]
        by_bucket: dict[int, list[int]] = {}
        for i in todo:
            by_bucket.setdefault(dataset.bucket_ids[i], []).append(i)
        batches = [idx[s:s + batch_size] for _, idx in sorted(by_bucket.items())
                   for s in range(0, len(idx), batch_size)]
        loader = DataLoader(_Pixels(dataset, self.flip_aug), batch_sampler=batches, num_workers=num_workers,
                            collate_fn=list)  # decoding in workers; the encoder stays in this process
        done = 0
        with tqdm(total=len(todo), desc="caching latents", disable=not progress) as bar:
            for items in loader:
                good = [it for it in items if it is not None]
                dataset.stats.unreadable += len(items) - len(good)
                bar.update(len(items))
                if not good:
                    continue
                pixels = torch.stack([it["pixels"] for it in good])  # (B, 3, H, W)
                if self.flip_aug:
                    pixels = torch.cat([pixels, torch.stack([it["pixels_flipped"] for it in good])])
                with torch.no_grad():
                    latents = encode_images(pixels).detach().cpu()  # stored in the encoder's dtype
                for j, it in enumerate(good):
                    entry = {"latents": latents[j], "original_size": torch.tensor(it["original_size"]),
                             "crop_top_left": torch.tensor(it["crop_top_left"]),
                             "target_size": torch.tensor(it["target_size"])}
                    if self.flip_aug:
                        entry["latents_flipped"] = latents[len(good) + j]
                        entry["crop_top_left_flipped"] = torch.tensor(it["crop_top_left_flipped"])
                    rec = dataset.records[it["index"]]
                    _atomic_save(entry, self.entry_path(rec, dataset.bucket(it["index"])))
                    done += 1
        return done


class _Pixels(torch.utils.data.Dataset):
    """Center-cropped pixels (and their mirror) of a BucketDataset's images, or None when unreadable."""

    def __init__(self, dataset: BucketDataset, flip: bool):
        self.dataset, self.flip = dataset, flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict | None:
        path, bucket = self.dataset.records[i].path, self.dataset.bucket(i)
        try:
            img, original = load_image(path, cover=bucket)
        except IMAGE_ERRORS as e:
            warn_bad_file(f"{path}: unreadable image not cached ({type(e).__name__}: {e})")
            return None
        wh = original[::-1]
        x, crop = resize_and_crop(img, bucket, original_size=wh)
        item = {"index": i, "pixels": to_tensor(x), "original_size": original,
                "crop_top_left": crop, "target_size": tuple(bucket)}
        if self.flip:
            xf, crop_f = resize_and_crop(img, bucket, original_size=wh, flip=True)
            item.update(pixels_flipped=to_tensor(xf), crop_top_left_flipped=crop_f)
        return item


class TextCache:
    def __init__(self, folder: str | os.PathLike, model_id: str, kind: str = "embeddings"):
        if kind not in ("embeddings", "tokens"):
            raise ValueError(f"TextCache kind must be 'embeddings' or 'tokens', got {kind!r}")
        self.folder = Path(folder) / ("text" if kind == "embeddings" else "tokens")
        self.model_id, self.kind = model_id, kind

    def entry_path(self, caption: str) -> Path:
        key = _name_hash("text", self.model_id, self.kind, caption)
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, caption: str) -> dict[str, torch.Tensor]:
        """{"context", "pooled"} or {"tokens"}; FileNotFoundError when the caption is not cached."""
        return load_file(str(self.entry_path(caption)))

    def missing(self, captions: Iterable[str]) -> list[str]:
        """Distinct captions without an entry, sorted."""
        return sorted(c for c in set(captions) if not self.entry_path(c).exists())

    def is_complete(self, captions: Iterable[str]) -> bool:
        return not self.missing(captions)

    def build(self, captions: Iterable[str], encode: Callable, *, batch_size: int = 16, rank: int = 0,
              world_size: int = 1, progress: bool = True) -> int:
        """Encode every missing caption with encode_text (kind "embeddings") or tokenize ("tokens")."""
        todo = self.missing(captions)[rank::world_size]
        done = 0
        with tqdm(total=len(todo), desc=f"caching text {self.kind}", disable=not progress) as bar:
            for s in range(0, len(todo), batch_size):
                chunk = todo[s:s + batch_size]
                with torch.no_grad():
                    out = encode(chunk)
                if self.kind == "embeddings":
                    context, pooled = (t.detach().cpu() for t in out)
                    entries = [{"context": context[j], "pooled": pooled[j]} for j in range(len(chunk))]
                else:
                    tokens = torch.as_tensor(out).cpu()
                    entries = [{"tokens": tokens[j]} for j in range(len(chunk))]
                for caption, entry in zip(chunk, entries):
                    _atomic_save(entry, self.entry_path(caption))
                done += len(chunk)
                bar.update(len(chunk))
        return done


def captions_of(dataset: BucketDataset) -> list[str]:
    """The captions the dataset will produce (fixed captions only: the rng is not consulted for them)."""
    if dataset.caption_config.is_random:
        raise ValueError("captions are shuffled / dropped per step: there is no fixed caption list to cache")
    return [dataset.caption(i, random.Random(0)) for i in range(len(dataset))]


def caches_complete(dataset: BucketDataset) -> bool:
    """True when the dataset reads latents and text embeddings from complete caches: VAE and text encoders can go."""
    lat, txt = dataset.latent_cache, dataset.text_cache
    return (lat is not None and txt is not None and txt.kind == "embeddings"
            and lat.is_complete(dataset) and txt.is_complete(captions_of(dataset)))

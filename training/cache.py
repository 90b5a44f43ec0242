"""On-disk caches of VAE latents and text embeddings, so the VAE and text encoders can leave the GPU.

An entry is one safetensors file named by a hash of all that determines it, so a changed input or model (`model_id`,
e.g. "sdxl-vae-fp16-fix@sha") is encoded again and an unchanged one never twice; atomic writes let `build` resume.
  latents: blake2b(CACHE_VERSION, model_id, image file bytes, bucket, crop, flip_aug[, mask]): `latents` (scaled
           posterior mean), `original_size`, `crop_top_left`, `target_size`, with flip_aug `latents_flipped` and
           `crop_top_left_flipped` (in the mirrored image); the center crop (a random one changes every epoch). A
           masked cache (masks=True) adds an image's mask file bytes (or "alpha") to its key, and `mask` (+
           `mask_flipped`) cropped as the image and area-averaged onto the latent grid; an image without a mask
           shares the unmasked entry (weight 1). An image repeated N times is one entry, encoded once.
  text:    blake2b(CACHE_VERSION, model_id, caption): `context` and `pooled` (fixed captions only)
"""
from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from sdxl.weights import save_safetensors
from training.buckets import Bucket, crop_coords, resize_and_crop
from training.data import IMAGE_ERRORS, BucketDataset, ImageRecord, load_image, to_tensor, warn_bad_file

CACHE_VERSION = 1  # bump when preprocessing changes (resize filter, crop rule): every entry is then re-made


class _Cache:
    def _entry(self, *parts: object) -> Path:
        key = hashlib.blake2b("\0".join(map(str, (CACHE_VERSION, *parts))).encode(), digest_size=16).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, *key) -> dict[str, torch.Tensor]:
        """The entry's tensors; FileNotFoundError when it is not cached."""
        return load_file(str(self.entry_path(*key)))

    def is_complete(self, items) -> bool:
        return not self.missing(items)


class LatentCache(_Cache):
    def __init__(self, folder: str | os.PathLike, model_id: str, flip_aug: bool = False, masks: bool = False):
        self.folder, self.model_id, self.flip_aug, self.masks = Path(folder) / "latents", model_id, flip_aug, masks
        self._digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> digest

    def digest(self, path: str) -> str:
        """blake2b-128 of the file's bytes, remembered while its size and mtime are unchanged (one stat a lookup)."""
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            with open(path, "rb") as f:
                self._digests[key] = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        return self._digests[key]

    def entry_path(self, record: ImageRecord, bucket: Bucket) -> Path:
        _, crop = crop_coords((record.width, record.height), bucket)  # the center crop caching uses
        mask = [] if not (self.masks and record.mask) else \
            ["alpha" if record.mask == record.path else self.digest(record.mask)]
        return self._entry("latents", self.model_id, self.digest(record.path), tuple(bucket), crop, self.flip_aug,
                           *mask)

    def entries(self, dataset: BucketDataset) -> list[tuple[int, Path]]:
        """(dataset index, entry path), one per distinct entry: an image's repeats share theirs."""
        paths = {}
        for i, r in enumerate(dataset.records):
            paths.setdefault(self.entry_path(r, dataset.bucket(i)), i)
        return [(i, path) for path, i in paths.items()]

    def missing(self, dataset: BucketDataset) -> list[int]:
        """Dataset indices without an entry, one per entry (an unreadable image stays missing and is replaced when
        loading)."""
        return [i for i, path in self.entries(dataset) if not path.exists()]

    def build(self, dataset: BucketDataset, encode_images: Callable[[torch.Tensor], torch.Tensor], *,
              batch_size: int = 8, num_workers: int = 0, rank: int = 0, world_size: int = 1,
              progress: bool = True) -> int:
        """Encode every missing entry (this rank's share), batching images of one bucket; returns how many."""
        # Shares of all entries, not of the missing ones: what another rank has written meanwhile changes no share.
        todo = [i for i, path in self.entries(dataset)[rank::world_size] if not path.exists()]
        by_bucket: dict[int, list[int]] = {}
        for i in todo:
            by_bucket.setdefault(dataset.bucket_ids[i], []).append(i)
        batches = [idx[s:s + batch_size] for _, idx in sorted(by_bucket.items())
                   for s in range(0, len(idx), batch_size)]
        loader = DataLoader(_Pixels(dataset, self.flip_aug, self.masks), batch_sampler=batches, num_workers=num_workers,
                            collate_fn=list)  # decoding in workers; the encoder stays in this process
        done = 0
        with tqdm(total=len(todo), desc="caching latents", disable=not progress) as bar:
            for items in loader:
                good = [it for it in items if it is not None]  # (index, [pixels, mirrored pixels], entry)
                dataset.stats.unreadable += len(items) - len(good)
                bar.update(len(items))
                if not good:
                    continue
                pixels = torch.stack([px[f] for f in range(1 + self.flip_aug) for _, px, _ in good])  # all, mirrors
                with torch.no_grad():
                    latents = encode_images(pixels).detach().cpu()  # stored in the encoder's dtype
                for j, (i, _, entry) in enumerate(good):  # image j's latents at j, its mirror's at len(good) + j
                    entry.update(zip(("latents", "latents_flipped"), latents[j::len(good)]))
                    for k in {"mask", "mask_flipped"} & entry.keys():  # on the latent grid
                        entry[k] = F.interpolate(entry[k][None], size=latents.shape[-2:], mode="area")[0]
                    save_safetensors(entry, self.entry_path(dataset.records[i], dataset.bucket(i)))
                    done += 1
        return done


@dataclass
class _Pixels(torch.utils.data.Dataset):
    """(index, [center-cropped pixels, mirrored], entry metadata and mask) of an image, or None when unreadable."""
    dataset: BucketDataset
    flip: bool
    masks: bool = False

    def __getitem__(self, i: int) -> tuple | None:
        path, bucket = self.dataset.records[i].path, self.dataset.bucket(i)
        try:
            img, original = load_image(path, cover=bucket)
        except IMAGE_ERRORS as e:
            warn_bad_file(f"{path}: unreadable image not cached ({type(e).__name__}: {e})")
            return None
        x, crop = resize_and_crop(img, bucket, original_size=original[::-1])
        entry = {"original_size": original, "crop_top_left": crop, "target_size": tuple(bucket)}
        pixels = [to_tensor(x)]
        if self.flip:
            xf, entry["crop_top_left_flipped"] = resize_and_crop(img, bucket, original_size=original[::-1], flip=True)
            pixels.append(to_tensor(xf))
        entry = {k: torch.tensor(v) for k, v in entry.items()}
        if self.masks and self.dataset.records[i].mask:
            try:
                entry.update({k: self.dataset.mask(i, None, f, original) for k, f in
                              [("mask", False), ("mask_flipped", True)][:1 + self.flip]})
            except IMAGE_ERRORS as e:
                warn_bad_file(f"{self.dataset.records[i].mask}: unreadable mask, image not cached "
                              f"({type(e).__name__}: {e})")
                return None
        return i, pixels, entry


class TextCache(_Cache):
    def __init__(self, folder: str | os.PathLike, model_id: str):
        self.folder, self.model_id = Path(folder) / "text", model_id

    def entry_path(self, caption: str) -> Path:
        return self._entry("text", self.model_id, "embeddings", caption)

    def missing(self, captions: Iterable[str]) -> list[str]:
        """Distinct captions without an entry, sorted."""
        return sorted(c for c in set(captions) if not self.entry_path(c).exists())

    def build(self, captions: Iterable[str], encode_text: Callable, *, batch_size: int = 16, rank: int = 0,
              world_size: int = 1, progress: bool = True) -> int:
        """Encode every missing caption (this rank's share) with encode_text; returns how many."""
        todo = [c for c in sorted(set(captions))[rank::world_size] if not self.entry_path(c).exists()]  # see LatentCache
        with tqdm(total=len(todo), desc="caching text embeddings", disable=not progress) as bar:
            for s in range(0, len(todo), batch_size):
                chunk = todo[s:s + batch_size]
                with torch.no_grad():
                    context, pooled = (t.detach().cpu() for t in encode_text(chunk))
                for j, caption in enumerate(chunk):
                    save_safetensors({"context": context[j], "pooled": pooled[j]}, self.entry_path(caption))
                bar.update(len(chunk))
        return len(todo)


def captions_of(dataset: BucketDataset) -> list[str]:
    """The captions the dataset will produce (fixed captions only: the rng is not consulted for them)."""
    if dataset.caption_config.is_random:
        raise ValueError("captions are shuffled / dropped per step: there is no fixed caption list to cache")
    return [dataset.caption(i, random.Random(0)) for i in range(len(dataset))]


def caches_complete(dataset: BucketDataset) -> bool:
    """True when the dataset reads latents and text embeddings from complete caches: VAE and text encoders can go."""
    lat, txt = dataset.latent_cache, dataset.text_cache
    return lat is not None and txt is not None and lat.is_complete(dataset) and txt.is_complete(captions_of(dataset))

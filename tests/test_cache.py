"""Latent and text caches: hits, invalidation (image bytes, caption, model id, crop / bucket), resume, flips."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdxl.weights as weights_mod
from training.cache import LatentCache, TextCache, caches_complete, captions_of
from training.captions import CaptionConfig
from training.data import DatasetError, DataWarning, ImageRecord, open_dataset

SMALL = dict(image_size=64, step=16, min_image_size=32)


class FakeVAE:
    """8x average pooling plus a channel mean: (B, 3, H, W) -> (B, 4, H/8, W/8); counts calls and images."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls = self.images = 0
        self.fail_on_call = fail_on_call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        self.images += x.shape[0]
        p = F.avg_pool2d(x, 8)
        return torch.cat([p, p.mean(1, keepdim=True)], 1)


class FakeText:
    """Deterministic per-caption embeddings: context (B, 3, 4) and pooled (B, 4) from the characters."""

    def __init__(self):
        self.calls = self.captions = 0

    def __call__(self, captions: list[str]):
        self.calls += 1
        self.captions += len(captions)
        codes = torch.tensor([[float(sum(map(ord, c))), float(len(c)), float(c.count(",")), 1.0] for c in captions])
        return codes[:, None, :] * torch.arange(1, 4).view(1, 3, 1), codes * 2


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_folder(root, sizes=((64, 64), (64, 64), (96, 64), (101, 48))) -> None:
    os.makedirs(root, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        noise(w, h, i).save(os.path.join(root, f"{i}.png"))
        with open(os.path.join(root, f"{i}.txt"), "w") as f:
            f.write(f"caption {i}, tag")


def test_latent_cache_hits_and_invalidation(tmp_path):
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_folder(data)
    vae = FakeVAE()
    lat = LatentCache(cache_dir, model_id="vae-a")
    ds = open_dataset(data, latent_cache=lat, **SMALL)
    assert not lat.is_complete(ds)
    assert lat.build(ds, vae, batch_size=8, progress=False) == 4
    assert (vae.calls, vae.images) == (2, 4)  # one batch per bucket: {64x64 x2} and {48x80 x2}
    assert lat.is_complete(ds)
    # cached latents are the encoder's output for the center-cropped item, with the same micro-conditioning
    plain = open_dataset(data, **SMALL)
    for i in range(len(ds)):
        got, ref = ds[i], plain[i]
        torch.testing.assert_close(got["latents"], vae(ref["pixels"][None])[0], atol=0, rtol=0)
        for k in ("original_size", "crop_top_left", "target_size", "caption"):
            assert got[k] == ref[k]
    vae.calls = vae.images = 0
    # unchanged: never encoded again, also from a fresh cache object (a new run)
    assert lat.build(ds, vae, progress=False) == 0
    fresh = LatentCache(cache_dir, model_id="vae-a")
    assert fresh.build(open_dataset(data, latent_cache=fresh, **SMALL), vae, progress=False) == 0
    assert vae.calls == 0
    # changed image bytes (same name, same size): only that image again
    noise(64, 64, 99).save(data / "1.png")
    ds = open_dataset(data, latent_cache=fresh, **SMALL)
    assert not fresh.is_complete(ds)
    assert fresh.build(ds, vae, progress=False) == 1 and vae.images == 1
    # changed model identity: everything again
    other = LatentCache(cache_dir, model_id="vae-b")
    assert other.build(open_dataset(data, latent_cache=other, **SMALL), vae, progress=False) == 4
    # changed bucket / crop (another training size): everything again
    vae.images = 0
    big = dict(SMALL, image_size=80)
    assert fresh.build(open_dataset(data, latent_cache=fresh, **big), vae, progress=False) == 4
    assert vae.images == 4
    # the crop is part of the name: same file and bucket, another planned crop -> another entry
    p = str(data / "3.png")
    entry = lambda w, caption="": fresh.entry_path(ImageRecord(p, caption, w, 48), (48, 80))  # noqa: E731
    assert entry(101) != entry(121)  # center crop left 10 vs 20
    assert entry(101) == entry(101, caption="x")  # the caption is the text cache's business


def test_flip_latents_and_dataset_checks(tmp_path):
    data = tmp_path / "data"
    make_folder(data, sizes=((101, 48),))
    vae = FakeVAE()
    lat = LatentCache(tmp_path / "cache", "vae", flip_aug=True)
    ds = open_dataset(data, latent_cache=lat, flip_aug=True, seed=0, **SMALL)
    assert lat.build(ds, vae, progress=False) == 1 and vae.calls == 1 and vae.images == 2  # one batch, both ways
    entry = lat.load(ds.records[0], ds.bucket(0))
    plain = open_dataset(data, **SMALL)[0]
    torch.testing.assert_close(entry["latents_flipped"], vae(plain["pixels"].flip(-1)[None])[0], atol=1e-6, rtol=0)
    assert entry["crop_top_left"].tolist() == [0, 10] and entry["crop_top_left_flipped"].tolist() == [0, 11]
    seen = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        flipped = item["crop_top_left"] == (0, 11)
        torch.testing.assert_close(item["latents"], entry["latents_flipped" if flipped else "latents"])
        seen.add(flipped)
    assert seen == {True, False}
    # several images in one batch: every entry holds its own image's latents and mirror
    make_folder(tmp_path / "two", sizes=((64, 64), (64, 64)))
    two = open_dataset(tmp_path / "two", latent_cache=lat, flip_aug=True, **SMALL)
    assert lat.build(two, vae, progress=False) == 2
    plain = open_dataset(tmp_path / "two", **SMALL)
    for i in range(2):
        entry, ref = lat.load(two.records[i], two.bucket(i)), plain[i]
        torch.testing.assert_close(entry["latents"], vae(ref["pixels"][None])[0], atol=0, rtol=0)
        torch.testing.assert_close(entry["latents_flipped"], vae(ref["pixels"].flip(-1)[None])[0], atol=0, rtol=0)
    with pytest.raises(DatasetError, match="flip_aug"):
        open_dataset(data, latent_cache=LatentCache(tmp_path / "cache", "vae"), flip_aug=True, **SMALL)
    with pytest.raises(DatasetError, match="random_crop"):
        open_dataset(data, latent_cache=lat, random_crop=True, **SMALL)


def test_interrupted_build_leaves_no_corrupt_entry_and_resumes(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_folder(data)
    lat = LatentCache(tmp_path / "cache", "vae")
    ds = open_dataset(data, latent_cache=lat, **SMALL)
    with pytest.raises(RuntimeError, match="killed"):
        lat.build(ds, FakeVAE(fail_on_call=2), batch_size=1, progress=False)  # dies on the 2nd image
    assert len(lat.missing(ds)) == 3
    # a kill in the middle of a write: the partial file never takes the entry's name
    real_save = weights_mod.save_file

    def dying_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        lat.build(ds, FakeVAE(), progress=False)
    assert len(lat.missing(ds)) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))  # and no litter
    monkeypatch.setattr(weights_mod, "save_file", real_save)
    vae = FakeVAE()
    assert lat.build(ds, vae, progress=False) == 3 and vae.images == 3  # resumes: the finished one is skipped
    assert lat.is_complete(ds)
    for i in range(len(ds)):
        assert ds[i]["latents"].shape == (4, ds.bucket(i)[0] // 8, ds.bucket(i)[1] // 8)


def test_unreadable_image_is_not_cached_and_replaced(tmp_path):
    data = tmp_path / "data"
    make_folder(data, sizes=((64, 64), (64, 64)))
    buf = io.BytesIO()
    noise(64, 64, 5).save(buf, "JPEG", quality=95)
    (data / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (data / "cut.txt").write_text("cut")
    lat = LatentCache(tmp_path / "cache", "vae")
    ds = open_dataset(data, latent_cache=lat, **SMALL)
    vae = FakeVAE()
    with pytest.warns(DataWarning, match="cut.jpg"):
        assert lat.build(ds, vae, progress=False) == 2
    assert ds.stats.unreadable == 1 and [ds.records[i].path for i in lat.missing(ds)] == [str(data / "cut.jpg")]
    cut = lat.missing(ds)[0]
    with pytest.warns(DataWarning, match="cut.jpg"):
        item = ds[cut]
    assert item["index"] != cut and item["latents"].shape == (4, 8, 8)


def test_text_cache_hits_invalidation_and_completion(tmp_path):
    data = tmp_path / "data"
    make_folder(data)
    (data / "3.txt").write_text("caption 2, tag")  # a duplicate caption is encoded once
    lat = LatentCache(tmp_path / "cache", "vae")
    txt = TextCache(tmp_path / "cache", "te-a")
    ds = open_dataset(data, latent_cache=lat, text_cache=txt, caption_config=CaptionConfig(prefix="sks"), **SMALL)
    enc = FakeText()
    assert not caches_complete(ds)
    caps = captions_of(ds)
    assert caps[0] == "sks, caption 0, tag"
    assert txt.build(caps, enc, batch_size=2, progress=False) == 3 and (enc.calls, enc.captions) == (2, 3)
    assert txt.is_complete(caps) and not caches_complete(ds)  # latents still missing
    lat.build(ds, FakeVAE(), progress=False)
    assert caches_complete(ds)
    item = ds[0]
    context, pooled = FakeText()([item["caption"]])
    torch.testing.assert_close(item["context"], context[0])
    torch.testing.assert_close(item["pooled"], pooled[0])
    # unchanged: no call; changed caption: that caption only; changed model id: all
    assert txt.build(captions_of(ds), enc, progress=False) == 0 and enc.calls == 2
    (data / "0.txt").write_text("a new caption")
    ds = open_dataset(data, latent_cache=lat, text_cache=txt, caption_config=CaptionConfig(prefix="sks"), **SMALL)
    assert not caches_complete(ds)
    assert txt.build(captions_of(ds), enc, progress=False) == 1 and enc.captions == 4
    assert caches_complete(ds)
    assert TextCache(tmp_path / "cache", "te-b").build(captions_of(ds), enc, progress=False) == 3


def test_random_captions_refuse_a_text_cache(tmp_path):
    data = tmp_path / "data"
    make_folder(data)
    txt = TextCache(tmp_path / "cache", "te")
    with pytest.raises(DatasetError, match="cannot be cached"):
        open_dataset(data, text_cache=txt, caption_config=CaptionConfig(shuffle_tags=True), **SMALL)
    with pytest.raises(ValueError, match="no fixed caption"):
        captions_of(open_dataset(data, caption_config=CaptionConfig(caption_dropout=0.1), **SMALL))

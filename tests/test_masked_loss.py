"""Masked loss (--masked_loss --mask_dir, --alpha_mask): the objectives' per-element weight against the weighted
mean written out, masks cropped and flipped as their images (against the crop computed by hand), masks in the
latent cache's keys and entries, an all-white mask training bit-identically and an all-black one giving no
gradient, and the bad inputs."""
from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_args
from PIL import Image
from safetensors.torch import load_file
from test_data import SMALL, add

import sdxl
import train_sdxl
from sdxl import diffusion
from sdxl.model import DDPMObjective
from sdxl.pixel import JiTObjective
from training.cache import LatentCache, TextCache
from training.data import DatasetError, DataWarning, open_dataset


class TinyNet(torch.nn.Module):
    """A stand-in network: the objectives only call net(x, t, *cond)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t, *cond):
        return self.conv(x) * (1 + t.reshape(-1, 1, 1, 1) / 1000)


def gens(n: int = 2) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


def hand_error(family: str, objective, net, x0):
    """Per-element squared error (B, C, h, w), from the objectives' formulas and their public noisy()."""
    if family == "latent":
        x_t, t, noise, abar = objective.noisy(x0, gens())
        return (net(x_t, t).float() - diffusion.training_target(x0, noise, abar, objective.prediction_type)).pow(2)
    z, t = objective.noisy(x0, gens())
    denom = (1 - t).clamp(min=objective.t_eps).reshape(-1, 1, 1, 1)
    return ((x0 - net(z, 1000 * (1 - t)).float()) / denom).pow(2)


@pytest.mark.parametrize("family", ["latent", "pixel"])
def test_objective_weight_white_black_and_grey(family):
    """Latent: a 64 px mask on the 8 x 8 latent grid (the mean of each 8 x 8 cell); pixel: on the pixel grid."""
    objective = DDPMObjective(diffusion.get_alphas_cumprod(), "v_prediction", min_snr_gamma=5.0) \
        if family == "latent" else JiTObjective()
    c, h = (4, 8) if family == "latent" else (3, 64)
    net, x0 = TinyNet(c), torch.randn(2, c, h, h)

    def run(weight):
        net.zero_grad()
        loss = objective.loss(net, x0, (), gens(), weight=weight)
        loss.sum().backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    plain, g_plain = run(None)
    white, g_white = run(torch.ones(2, 1, 64, 64))
    assert torch.equal(plain, white) and all(torch.equal(a, b) for a, b in zip(g_plain, g_white))
    black, g_black = run(torch.zeros(2, 1, 64, 64))
    assert torch.equal(black, torch.zeros(2)) and all(not g.any() for g in g_black)
    mask = torch.rand(2, 1, 64, 64)
    mask[1, :, :32] = 0  # half the second image ignored: its loss is the mean over the other half
    grey, _ = run(mask)
    w = F.avg_pool2d(mask, 64 // h) if h != 64 else mask
    err = hand_error(family, objective, net, x0).detach()
    want = (err * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * c)
    if family == "latent":
        abar = objective.noisy(x0, gens())[3]
        want = want * diffusion.min_snr_weight(abar / (1 - abar), 5.0, objective.prediction_type)
    torch.testing.assert_close(grey, want, rtol=1e-5, atol=0)
    assert not torch.allclose(grey, plain, rtol=1e-3)


def pattern(w: int, h: int) -> np.ndarray:
    """Distinct values along both axes, so any shift or mirror of a crop shows."""
    y, x = np.mgrid[:h, :w]
    return ((y * 7 + x * 3) % 256).astype(np.uint8)


def test_mask_and_conditioning_follow_random_crop_and_flip(tmp_path):
    """A 64 x 72 image in the 64 x 64 bucket is not resized (scale 1), so the crop is a plain slice: rows
    top..top+64, with (flip, top) drawn as the dataset documents it (item seed, a flip draw, then the crop's)."""
    img = pattern(64, 72)
    add(tmp_path, "data/a.png", Image.fromarray(np.stack([img, 255 - img, img // 2], -1)), "a")
    add(tmp_path, "masks/a.png", Image.fromarray(img))  # the mask is the image's first channel
    add(tmp_path, "cond/a.png", Image.fromarray(np.stack([255 - img] * 3, -1)))
    ds = open_dataset(tmp_path / "data", mask_dir=str(tmp_path / "masks"), conditioning_dir=str(tmp_path / "cond"),
                      with_masks=True, with_conditioning=True, random_crop=True, flip_aug=True, seed=3, **SMALL)
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        rng = random.Random(f"item:3:{epoch}:0")
        flip = rng.random() < 0.5
        top = rng.randint(0, 72 - 64)
        assert rng.randint(0, 0) == 0
        want = img[top:top + 64, ::-1] if flip else img[top:top + 64]
        seen.add((flip, top))
        assert item["crop_top_left"] == (top, 0) and item["mask"].shape == (1, 64, 64)
        assert torch.equal(item["mask"][0], torch.from_numpy(want.copy()).float() / 255)
        assert torch.equal(item["conditioning"], (255 - torch.from_numpy(want.copy()).float()).expand(3, -1, -1) / 255)
        assert torch.equal(((item["pixels"][0] + 1) * 127.5).round(), (item["mask"][0] * 255).round())
    assert len({f for f, _ in seen}) == 2 and len({t for _, t in seen}) > 2
    # From a latent cache: the center crop (rows 4..68), the mask averaged over each 8 x 8 cell of the latent grid.
    cache = LatentCache(tmp_path / "cache", "fake", flip_aug=True, masks=True)
    ds = open_dataset(tmp_path / "data", mask_dir=str(tmp_path / "masks"), conditioning_dir=str(tmp_path / "cond"),
                      with_masks=True, with_conditioning=True, flip_aug=True, latent_cache=cache, seed=3, **SMALL)
    assert cache.build(ds, lambda px: F.avg_pool2d(px, 8).repeat(1, 2, 1, 1)[:, :4]) == 1
    for epoch in range(4):
        ds.set_epoch(epoch)
        item = ds[0]
        flip = random.Random(f"item:3:{epoch}:0").random() < 0.5
        want = torch.from_numpy(img[4:68, ::-1].copy() if flip else img[4:68].copy()).float()
        assert item["crop_top_left"] == (4, 0) and item["latents"].shape == (4, 8, 8)
        torch.testing.assert_close(item["mask"], F.avg_pool2d(want[None] / 255, 8), rtol=0, atol=1e-6)
        assert torch.equal(item["conditioning"], (255 - want).expand(3, -1, -1) / 255)
        seen.add(flip)
    assert {True, False} <= seen


def test_alpha_masks_missing_masks_and_a_mask_of_another_aspect(tmp_path, capsys):
    alpha = pattern(64, 64)
    add(tmp_path, "data/a.png", Image.fromarray(np.stack([alpha] * 3 + [alpha], -1), "RGBA"), "a")
    add(tmp_path, "data/b.png", Image.new("RGB", (64, 64), "red"), "b")
    with pytest.warns(DataWarning, match="b.png: no alpha channel") as record:
        ds = open_dataset(tmp_path / "data", alpha_mask=True, with_masks=True, **SMALL)
    assert len(record) == 1 and ds.stats.missing_mask == 1
    assert torch.equal(ds[0]["mask"][0], torch.from_numpy(alpha).float() / 255)
    assert torch.equal(ds[1]["mask"], torch.ones(1, 64, 64))  # weight 1
    add(tmp_path, "masks/a.png", Image.new("L", (32, 32), 255))  # half size, same aspect: fine
    with pytest.warns(DataWarning, match="b.png: no mask image in .*masks, trained with weight 1") as record:
        open_dataset(tmp_path / "data", mask_dir=str(tmp_path / "masks"), with_masks=True, **SMALL)
    assert len(record) == 1
    add(tmp_path, "masks/b.png", Image.new("L", (64, 48), 255))
    with pytest.raises(DatasetError, match=r"masks/b.png: mask image of 64x48 cannot be cropped like its image"):
        open_dataset(tmp_path / "data", mask_dir=str(tmp_path / "masks"), with_masks=True, **SMALL)
    args = train_args(tmp_path / "data", tmp_path / "out", "--masked_loss", "--mask_dir", tmp_path / "masks")
    assert train_sdxl.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "masks/b.png: mask image of 64x48" in err and "\n" not in err


def test_cache_keys_hold_the_mask_and_a_repeated_image_is_encoded_once(tmp_path):
    for i in range(2):
        add(tmp_path, f"data/3_x/{i}.png", Image.fromarray(np.stack([pattern(64, 64)] * 3, -1)), "x")
    add(tmp_path, "masks/3_x/0.png", Image.fromarray(pattern(64, 64)))
    vae = sdxl.load_model("tiny").vae
    encoded = []

    def encode(px):
        encoded.append(len(px))
        return vae.encode_latents(px)

    def dataset(cache):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # 1.png has no mask: weight 1
            return open_dataset(tmp_path / "data", mask_dir=str(tmp_path / "masks"), with_masks=cache.masks,
                                latent_cache=cache, **SMALL)

    masked = LatentCache(tmp_path / "cache", "vae", masks=True)
    ds = dataset(masked)
    # 6 items, 2 images; rank 1 starts after rank 0 has written its share, and still finds its own
    assert len(ds) == 6 and [masked.build(ds, encode, rank=r, world_size=2) for r in (0, 1)] == [1, 1]
    assert sum(encoded) == 2 and masked.is_complete(ds)
    text, caps = TextCache(tmp_path / "cache", "clip"), ["a", "b", "c"]  # the text cache splits its work alike
    fake = lambda chunk: (torch.zeros(len(chunk), 2, 4), torch.zeros(len(chunk), 4))  # noqa: E731
    assert [text.build(caps, fake, rank=r, world_size=2) for r in (0, 1)] == [2, 1] and text.is_complete(caps)
    plain = LatentCache(tmp_path / "cache", "vae")
    rec, bucket = ds.records[0], ds.bucket(0)
    assert masked.entry_path(rec, bucket) != plain.entry_path(rec, bucket)  # a masked image: its own entry
    assert masked.entry_path(ds.records[3], bucket) == plain.entry_path(ds.records[3], bucket)  # no mask: shared
    # the cached mask is the pixel mask averaged over each 8 x 8 latent cell; an image without one gets ones
    want = F.avg_pool2d(torch.from_numpy(pattern(64, 64)).float()[None] / 255, 8)
    torch.testing.assert_close(ds[0]["mask"], want, rtol=0, atol=1e-6)
    assert torch.equal(ds[3]["mask"], torch.ones(1, 8, 8))
    old = masked.entry_path(rec, bucket)  # a changed mask is a new entry, encoded again
    add(tmp_path, "masks/3_x/0.png", Image.new("L", (64, 64), 128))
    assert masked.entry_path(rec, bucket) != old and masked.build(dataset(masked), encode) == 1


def test_white_mask_trains_bit_identically_black_mask_learns_nothing(train_data, tmp_path):
    """White masks at half size (resized as their images) against no mask, with flips and random crops; black
    masks: every logged loss and gradient norm is 0."""
    for colour in ("white", "black"):
        for p in train_data.glob("*.png"):
            w, h = Image.open(p).size
            add(tmp_path, f"{colour}/{p.name}", Image.new("L", (w // 2, h // 2), colour))
    flags = ["--use_lora", "--lora_target_mode", "all", "--max_steps", 2, "--batch_size", 2, "--flip_aug",
             "--random_crop", "--learning_rate", 1e-2]
    assert train_sdxl.main(train_args(train_data, tmp_path / "plain", *flags)) == 0
    for colour in ("white", "black"):
        args = train_args(train_data, tmp_path / colour / "run", *flags, "--masked_loss", "--mask_dir",
                          tmp_path / colour)
        assert train_sdxl.main(args) == 0
    a, b = (load_file(str(tmp_path / run / "lora_final.safetensors")) for run in ("plain", "white/run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in (tmp_path / "black" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] == 0 and m["grad_norm"] == 0 for m in metrics)


@pytest.mark.parametrize("extra,message", [
    (["--mask_dir", "m"], "--mask_dir given without --masked_loss"),
    (["--masked_loss"], "--masked_loss needs --mask_dir"),
    (["--alpha_mask", "--masked_loss", "--mask_dir", "m"], "--alpha_mask reads each mask from its image"),
    (["--alpha_mask", "--train_shards", "x.tar", "--max_steps", 1], "need a folder or metadata source"),
], ids=["no-switch", "no-source", "alpha-and-dir", "shards"])
def test_bad_mask_flags_exit_2(train_data, tmp_path, capsys, extra, message):
    assert train_sdxl.main(train_args(train_data, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err

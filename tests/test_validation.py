"""Held-out validation loss (issue 17 item 2): a fixed split, val_loss in metrics.jsonl and curves.png equal to a
re-evaluation by hand of the same (image, noise, timestep) triples with the saved weights, and the same after a
resume. The hand evaluation re-derives the split (a fixed-seed sample of the sorted image paths), the center crop
into the nearest bucket, SDXL's time ids, each image's seed (blake2b of "validation:<position>") and the objective's
loss on the loaded final model, one image at a time."""
from __future__ import annotations

import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import train_args
from PIL import Image, ImageDraw

import sdxl
import train_sdxl
from training.buckets import make_buckets, nearest_bucket, resize_and_crop
from training import loop
from training.data import open_dataset, to_tensor
from training.config import TrainConfig
from training.validation import ValidationSet, open_validation, validation_loss


def held_out_by_hand(paths: list[str], fraction: float) -> list[str]:
    paths = sorted(paths)
    return sorted(random.Random("holdout:0").sample(paths, max(1, round(fraction * len(paths)))))


def test_split_is_fixed_disjoint_and_drops_every_repeat(train_data, tmp_path):
    paths = [str(p) for p in train_data.glob("*.png")]
    want = held_out_by_hand(paths, 0.25)
    for seed in (0, 7):  # the split does not follow --seed
        ds = open_dataset(train_data, holdout=0.25, seed=seed, image_size=64, step=16)
        assert [r.path for r in ds.held_out] == want
        assert sorted(r.path for r in ds.records) == sorted(set(paths) - set(want))
    folder = tmp_path / "data" / "3_sks"  # kohya repeats: a held-out image leaves all three copies
    shutil.copytree(train_data, folder)
    ds = open_dataset(tmp_path / "data", holdout=0.25, image_size=64, step=16)
    held = {r.path for r in ds.held_out}
    assert len(held) == 2 and len(ds.records) == 3 * 6 and not held & {r.path for r in ds.records}
    # --validation_data_dir: each image of the folder once, whatever its repeats, in batches of one bucket
    cfg = TrainConfig(data_dir=str(train_data), validation_data_dir=str(tmp_path / "data"), image_size=64,
                      bucket_step=16, batch_size=3)
    vset = open_validation(cfg, None, loop.data_options(cfg), masked=False)
    assert sorted(vset.ds.records[i].path for i in range(len(vset))) == sorted(str(p) for p in folder.glob("*.png"))
    batches = list(vset.batches())
    assert [len(b["caption"]) for b in batches] == [3, 1, 3, 1] and all(len(set(map(tuple, b["target_size"].tolist())))
                                                                       == 1 for b in batches)


def seed_of(position: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"validation:{position}".encode(), digest_size=8).digest(), "little") >> 1


def test_validation_loss_runs_in_eval_mode_over_fixed_triples(train_data):
    """A stand-in trainee with dropout: the same value twice (eval mode, no gradients), train mode restored, and
    equal to the mean over images of each image's own seeded draw, whatever the batching by bucket."""
    class Trainee(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, objective, x0, generators):
            assert not torch.is_grad_enabled()
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])
            return self.drop(x0 - noise).pow(2).mean(dim=(1, 2, 3))
    ds = open_dataset(train_data, image_size=64, step=16)
    net, vset = Trainee().train(), ValidationSet(ds, 3, "test")
    got = [validation_loss(net, None, vset, lambda b: {"x0": b["pixels"]}, torch.device("cpu"), None)
           for _ in range(2)]
    assert got[0] == got[1] and net.training
    want = [(ds[i]["pixels"] - torch.randn(ds[i]["pixels"].shape, generator=torch.Generator().manual_seed(
        seed_of(i)))).pow(2).mean() for i in range(len(ds))]
    assert got[0] == pytest.approx(torch.stack(want).double().mean().item(), rel=1e-6)


def hand_validation_loss(folder, data) -> float:
    model = sdxl.load_model(str(folder)).eval()
    buckets, objective, losses = make_buckets(64, 16), model.objective(), []
    held = held_out_by_hand([str(p) for p in data.glob("*.png")], 0.25)
    with torch.no_grad():
        for position, path in enumerate(held):
            img = Image.open(path).convert("RGB")
            w, h = img.size
            bucket = buckets[nearest_bucket(buckets, w, h)]
            crop, (top, left) = resize_and_crop(img, bucket)
            x0 = model.encode(to_tensor(crop)[None]).float()
            ctx, pooled = model.text.encode([open(path[:-4] + ".txt").read()])
            ids = torch.tensor([[h, w, top, left, *bucket]], dtype=torch.float32)
            gen = torch.Generator().manual_seed(seed_of(position))
            losses.append(objective.loss(model.unet, x0, (ctx, pooled, ids), [gen]))
    return torch.cat(losses).double().mean().item()


def val_rows(run) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def test_validation_loss_is_the_hand_evaluation_and_survives_a_resume(train_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "memory_plan", lambda *a, **kw: "memory plan: not computed in this test")
    train_data = shutil.copytree(train_data, tmp_path / "data")
    for path in train_data.glob("*.png"):  # a mark at the left: a flip or an off-centre crop would show
        im = Image.open(path)
        ImageDraw.Draw(im).rectangle([0, 0, 12, im.height // 2], fill=(0, 0, 0))
        im.save(path)
    args = ["--max_steps", 3, "--batch_size", 2, "--validation_split", 0.25, "--validation_every", 2,
            "--save_interval_steps", 2, "--learning_rate", 1e-3]
    assert train_sdxl.main(train_args(train_data, tmp_path / "a", *args)) == 0
    out = capsys.readouterr().out
    assert "run plan: 6 images" in out and "validation: 2 held-out images (--validation_split 0.25)" in out
    a = val_rows(tmp_path / "a")
    assert list(a) == [2, 3] and a[2] != a[3]  # every 2 steps and at the end
    assert a[3] == pytest.approx(hand_validation_loss(tmp_path / "a" / "final", train_data), rel=1e-5)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000002", tmp_path / "b" / "checkpoints" / "step_000002")
    monkeypatch.setattr(loop, "save_final", lambda *a, **kw: None)
    assert train_sdxl.main(train_args(train_data, tmp_path / "b", *args, "--resume", "latest")) == 0
    assert val_rows(tmp_path / "b") == {3: a[3]}  # bit for bit
    # curves.png: the held-out loss beside the training loss, in orange in the loss panel only
    img = np.asarray(Image.open(tmp_path / "a" / "curves.png").convert("RGB")).astype(int)
    orange = (abs(img - [255, 127, 14]).sum(-1) < 30).reshape(3, -1, img.shape[1]).any(axis=(1, 2))
    assert orange.tolist() == [True, False, False]


@pytest.mark.parametrize("extra,message", [
    (["--validation_split", 1.5], "--validation_split must be in (0, 1)"),
    (["--validation_split", 0.1, "--validation_data_dir", "x"], "not both"),
    (["--validation_every", 5], "--validation_every given without"),
    (["--validation_split", 0.1, "--validation_every", 0], "at least 1"),
    (["--validation_split", 0.95], "none would be left to train on"),
])
def test_bad_validation_flags_exit_2(train_data, tmp_path, capsys, extra, message):
    assert train_sdxl.main(train_args(train_data, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

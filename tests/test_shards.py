"""ShardStream: WebDataset tar shards -> endless single-bucket batches, split by rank, resumable exactly."""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import data
from training.captions import CaptionConfig
from training.data import DatasetError, DataStats, DataWarning, ShardStream, collate, open_dataset, open_stream

SMALL = dict(image_size=64, step=16, min_image_size=32)  # buckets of ~64^2 px, sides 32..128
SIZES = [(64, 64), (96, 64), (64, 96), (128, 48), (48, 128)]  # (w, h): five aspect buckets
AUG = dict(random_crop=True, flip_aug=True, caption_config=CaptionConfig(shuffle_tags=True, keep_last=0), **SMALL)


def png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return str(path)


def write_shards(folder, n_shards: int, per_shard: int) -> tuple[list[str], dict[int, str]]:
    """Shards of PNGs in five aspect ratios; captions as .txt, or as .json on every third sample. Returns the
    shard paths and {ShardStream index (shard << 32 | sample number in tar order): key}."""
    paths, keys = [], {}
    for s in range(n_shards):
        members = []
        for k in range(per_shard):
            key = f"s{s}_{k:03d}"
            members.append((f"{key}.png", png(*SIZES[(s + k) % len(SIZES)], seed=s * 100 + k)))
            if k % 3 == 0:
                members.append((f"{key}.json", json.dumps({"tags": f"json {key}, x, y"}).encode()))
            else:
                members.append((f"{key}.txt", f"caption {key}, x, y".encode()))
            keys[s << 32 | k] = key
        paths.append(write_tar(os.path.join(folder, f"train-{s:05d}.tar"), members))
    return paths, keys


def take(stream: ShardStream, n: int) -> list[tuple[int, dict]]:
    it, out = iter(stream), []
    for _ in range(n):
        batch = next(it)
        out.append((stream.epoch, batch))  # the epoch the batch came from
    return out


def assert_same(got: list[tuple[int, dict]], want: list[tuple[int, dict]]):
    assert len(got) == len(want)
    for k, ((ge, g), (we, w)) in enumerate(zip(got, want)):
        assert ge == we and set(g) == set(w), k
        for name in w:
            if isinstance(w[name], torch.Tensor):
                assert g[name].dtype == w[name].dtype and torch.equal(g[name], w[name]), (k, name)
            else:
                assert g[name] == w[name], (k, name)


def test_batches_match_the_folder_dataset_item_for_item(tmp_path):
    """Oracle: the same images as a folder through BucketDataset (center crop, no flip): every stream item has
    the folder item's pixels, sizes, crop, caption and time_ids, and batches have collate's keys and dtypes."""
    shards, keys = write_shards(tmp_path, 2, 6)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in shards:
        with tarfile.open(path) as tar:
            tar.extractall(folder, filter="data")
    for p in folder.glob("*.json"):
        p.with_suffix(".txt").write_text(json.loads(p.read_text())["tags"])
        p.unlink()
    ref = open_dataset(folder, **SMALL)
    by_key = {os.path.basename(r.path)[:-4]: i for i, r in enumerate(ref.records)}
    stream = open_stream(str(tmp_path / "train-*.tar"), batch_size=2, buffer=4, **SMALL)
    seen = set()
    for epoch, batch in take(stream, 8):
        want = collate([ref[by_key[keys[i]]] for i in batch["index"].tolist()])
        assert set(batch) == set(want) and len(set(map(tuple, batch["target_size"].tolist()))) == 1
        for name in want:
            if name == "index":  # the stream's own sample ids
                continue
            if isinstance(want[name], torch.Tensor):
                assert batch[name].dtype == want[name].dtype and torch.equal(batch[name], want[name]), name
            else:
                assert batch[name] == want[name], name
        seen |= set(batch["index"].tolist())
    assert seen == set(keys)


@pytest.mark.parametrize("threads, rank, world_size", [(1, 0, 1), (3, 1, 2)])
def test_resume_is_bit_identical_also_across_epochs(tmp_path, threads, rank, world_size):
    shards, _ = write_shards(tmp_path, 3, 5)
    kw = dict(batch_size=2, buffer=5, seed=7, threads=threads, rank=rank, world_size=world_size, **AUG)
    ref = take(ShardStream(shards, **kw), 30)
    epochs = [e for e, _ in ref]
    assert epochs[-1] >= 2  # the run crosses two epoch boundaries
    boundary = epochs.index(1)
    for k in (0, 3, boundary - 1, boundary, boundary + 2):
        first = ShardStream(shards, **kw)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        second = ShardStream(shards, **kw)
        second.load_state_dict(state)
        assert_same(take(second, 30 - k), ref[k:])
    # per-sample seeds: crops, flips and tag order change with the epoch
    pixels = {}
    for e, b in ref:
        for j, i in enumerate(b["index"].tolist()):
            pixels.setdefault(i, {})[e] = (b["pixels"][j], b["caption"][j])
    twice = [list(per.values())[:2] for per in pixels.values() if len(per) > 1]
    assert twice and any(not torch.equal(a[0], b[0]) and a[1] != b[1] for a, b in twice)


def test_ranks_read_disjoint_shards_and_cover_every_sample(tmp_path):
    shards, keys = write_shards(tmp_path, 5, 4)
    per_rank = {}
    for rank in range(2):
        stream = ShardStream(shards, batch_size=2, rank=rank, world_size=2, seed=1, buffer=6, **SMALL)
        per_rank[rank] = {}  # epoch -> [batch of indices]
        for epoch, batch in take(stream, 40):
            per_rank[rank].setdefault(epoch, []).append(batch["index"].tolist())
        assert max(per_rank[rank]) >= 2
    for epoch in (0, 1):
        rank_shards = [{i >> 32 for b in per_rank[r][epoch] for i in b} for r in range(2)]
        assert not rank_shards[0] & rank_shards[1]  # each rank reads its own shards
        assert sorted(map(len, rank_shards)) == [2, 3]
        got = [i for r in range(2) for b in per_rank[r][epoch] for i in b]
        assert set(got) == set(keys)  # together every sample, each epoch
        for r in range(2):  # a sample comes twice only to pad a short batch
            for b in per_rank[r][epoch]:
                others = [i for b2 in per_rank[r][epoch] if b2 is not b for i in b2]
                assert not set(b) & set(others)
    with pytest.raises(DatasetError, match=r"^5 shards for 6 processes: ") as e:
        ShardStream(shards, batch_size=2, rank=0, world_size=6, **SMALL)
    assert "\n" not in str(e.value)


def test_broken_images_are_skipped_and_broken_tars_are_errors(tmp_path):
    """Rule: a bad image member (or a caption-only sample) is counted and skipped with one warning naming the
    shard and member; a truncated or garbled tar archive is a one-line DatasetError naming shard and member."""
    good = [m for k in range(5) for m in [(f"g{k}.png", png(64, 64, k)), (f"g{k}.txt", b"good")]]
    cut_png = png(64, 64, 9)[:300]  # header fine, pixel data cut: fails only when decoded
    shard = write_tar(tmp_path / "bad.tar", good[:4] + [("b.jpg", b"garbage"), ("b.txt", b"x"), ("c.png", cut_png),
                                                           ("c.txt", b"c"), ("d.txt", b"caption only")] + good[4:])
    stream = ShardStream([shard], batch_size=2, buffer=8, **SMALL)
    batches, warned = [], []  # warned: the messages of the bad files found while making each batch
    with pytest.warns(DataWarning) as caught:
        it = iter(stream)
        for _ in range(3):
            n = len(caught)
            batches.append(next(it))
            warned.append([str(w.message) for w in caught[n:]])
    names = {data.index_shard(shard)[i & 0xFFFFFFFF][0] for b in batches for i in b["index"].tolist()}
    assert names == {"g0", "g1", "g2", "g3", "g4"}  # bad samples never reach a batch
    # c.png fails only when decoded: the batch it left short is padded with a repeat at once, the others are full
    short = [any(f"{shard}:c.png" in m for m in w) for w in warned]
    assert short.count(True) == 1
    assert [len(set(b["index"].tolist())) for b in batches] == [1 if s else 2 for s in short]
    # one batch of 7 > the 6 samples with an image reads the whole epoch first, then pads the 5 good ones
    stats = DataStats()
    with pytest.warns(DataWarning) as caught:
        batch = next(iter(ShardStream([shard], batch_size=7, buffer=8, stats=stats, **SMALL)))
    assert len(batch["index"]) == 7 and len(set(batch["index"].tolist())) == 5
    assert (stats.images, stats.unreadable, stats.missing_image) == (5, 2, 1)
    msgs = sorted({str(w.message) for w in caught})
    assert [m.split(": ")[0] for m in msgs] == [f"{shard}:b.jpg", f"{shard}:c.png", f"{shard}:d"]
    assert all("\n" not in m for m in msgs)
    # a tar cut inside a member: refused when the stream is built, naming the member
    with tarfile.open(shard) as tar:
        cut = tar.getmember("g3.png").offset_data + 100
    (tmp_path / "cut.tar").write_bytes(Path(shard).read_bytes()[:cut])
    with pytest.raises(DatasetError, match=r"cut\.tar: broken tar shard after member 'g3\.png'.*--train_shards"):
        ShardStream([str(tmp_path / "cut.tar")], batch_size=2, **SMALL)
    # a garbled header inside a whole-looking archive: an error when the stream reaches it
    blob = bytearray(Path(shard).read_bytes())
    with tarfile.open(shard) as tar:
        at = tar.getmember("b.jpg").offset
    blob[at:at + 100] = b"x" * 100
    (tmp_path / "garbled.tar").write_bytes(bytes(blob))
    stream = ShardStream([str(tmp_path / "garbled.tar")], batch_size=2, **SMALL)
    with pytest.raises(DatasetError, match=r"garbled\.tar: corrupt tar header after member 'g1\.txt'") as e:
        next(iter(stream))
    assert "\n" not in str(e.value)


def test_resume_decodes_nothing_already_emitted(tmp_path, monkeypatch):
    shards, _ = write_shards(tmp_path, 2, 8)
    decoded = []
    real = data.load_image
    monkeypatch.setattr(data, "load_image", lambda *a, **kw: decoded.append(1) or real(*a, **kw))
    kw = dict(batch_size=2, buffer=6, seed=2, threads=1, **AUG)
    ref = ShardStream(shards, **kw)
    counts = []  # decodes per batch of an uninterrupted run
    for _ in range(12):
        n = len(decoded)
        batch = next(iter(ref))
        counts.append(len(decoded) - n)
        assert counts[-1] == len(set(batch["index"].tolist()))  # each sample decoded once, when emitted
    for k in (4, 7):
        first = ShardStream(shards, **kw)
        take(first, k)
        resumed = ShardStream(shards, **kw)
        decoded.clear()
        resumed.load_state_dict(first.state_dict())
        assert decoded == []  # the buffer is restored from (shard, sample) references, headers only
        take(resumed, 12 - k)
        assert len(decoded) == sum(counts[k:])


def test_open_dataset_and_state_checks(tmp_path):
    shards, _ = write_shards(tmp_path, 2, 4)
    with pytest.raises(DatasetError, match=r"no images but \.tar files: pass tar shards as --train_shards") as e:
        open_dataset(tmp_path, **SMALL)  # shards come only through open_stream (--train_shards)
    assert str(e.value).startswith(f"{tmp_path}: ") and "\n" not in str(e.value)
    stream = open_stream(str(tmp_path / "*.tar"), batch_size=2, **SMALL)
    assert isinstance(stream, ShardStream) and stream.shards == shards
    take(stream, 3)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="state of rank 0 given to rank 1"):
        ShardStream(shards, batch_size=2, rank=1, world_size=2, **SMALL).load_state_dict(
            {**state, "world_size": 2})
    other = ShardStream(shards, batch_size=2, seed=5, **SMALL)
    with pytest.warns(DataWarning, match="restarting epoch 0"):
        other.load_state_dict(state)
    assert other.state_dict()["pending"] == [] and other.state_dict()["batches"] == 0
    (tmp_path / "z.tar.gz").write_bytes(b"\x1f\x8b" + bytes(2000))
    with pytest.raises(DatasetError, match="compressed tar shard"):
        open_stream(str(tmp_path / "z.tar.gz"), batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        empty = write_tar(tmp_path / "only_captions.tar", [("a.txt", b"no image")])
        with pytest.raises(DatasetError, match="no usable sample"):
            next(iter(ShardStream([empty], batch_size=1, **SMALL)))

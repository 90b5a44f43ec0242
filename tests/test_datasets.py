"""kohya-style datasets: `N_name` folders with repeats, regularisation balancing (against sd-scripts' loop written
out), the dataset TOML's per-subset options, and exact resume / DDP slicing with repeats."""
from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file
from test_data import SMALL, add, noise
from torch.utils.data import DataLoader

import train_sdxl
from training.buckets import BucketBatchSampler
from training.captions import CaptionConfig
from training.data import DatasetError, DataStats, DataWarning, collate, open_dataset


def kohya_reg_repeats(num_train_images: int, reg: list[tuple[str, int]]) -> dict[str, int]:
    """sd-scripts' library/train_util.py, DreamBoothDataset.__init__, transcribed: reg images (in subset then
    file order, each starting at its subset's num_repeats) until they match the training images with repeats."""
    registered: dict[str, int] = {}
    n, first_loop = 0, True
    while n < num_train_images:
        for key, num_repeats in reg:
            if first_loop:
                registered[key] = num_repeats
                n += num_repeats
            else:
                registered[key] += 1
                n += 1
            if n >= num_train_images:
                break
        first_loop = False
    return registered


def tree(root, layout: dict[str, int], caption: bool = True):
    """`layout` folder -> number of images (alternately tall and wide, 21 px of crop slack), captioned if asked."""
    for folder, n in layout.items():
        for i in range(n):
            add(root, f"{folder}/{i}.png", noise(*((101, 48) if i % 2 else (48, 101)), seed=i),
                f"{folder} {i}, red, round, square, best, safe" if caption else None)
    return root


def test_kohya_folders_repeat_their_images(tmp_path):
    data = tree(tmp_path / "data", {"3_sks cat": 2, "1_dog": 1, "0_off": 2}, caption=False)
    add(data, "1_dog/0.txt", None)
    (data / "1_dog" / "0.txt").write_text("a dog")
    add(data, "loose.png", noise(48, 48))
    with pytest.warns(DataWarning, match="entries outside its N_name folders ignored, e.g. 'loose.png'"):
        ds = open_dataset(data, flip_aug=True, random_crop=True, **SMALL)
    assert Counter((r.path.split("/")[-2], r.caption) for r in ds.records) == {("3_sks cat", "sks cat"): 6,
                                                                               ("1_dog", "a dog"): 1}
    assert len(ds) == len(ds.bucket_ids) == 7 and ds.stats.images == 3
    table = ds.bucket_table()
    assert f"subset {data}/3_sks cat: 2 images, x 3 repeats = 6" in table and "7 items per epoch" in table
    # each copy of an image is an item of its own: its own crop and flip draws
    copies = [i for i, r in enumerate(ds.records) if r.path.endswith("3_sks cat/0.png")]
    assert len(copies) == 3 and len({tuple(ds[i]["crop_top_left"]) for i in copies}) > 1


@pytest.mark.parametrize("train,reg", [({"2_a": 3}, {"1_r": 2, "3_s": 1}), ({"1_a": 2}, {"2_r": 3, "1_s": 2}),
                                       ({"5_a": 1}, {"2_r": 1})], ids=["cycle", "truncate", "one"])
def test_regularisation_balanced_as_kohya(tmp_path, train, reg):
    data, regs = tree(tmp_path / "data", train), tree(tmp_path / "reg", reg)
    ds = open_dataset(data, reg_data_dir=regs, **SMALL)
    n_train = sum(int(f.split("_")[0]) * n for f, n in train.items())
    order = [(f"{regs}/{f}/{i}.png", int(f.split("_")[0])) for f in sorted(reg) for i in range(reg[f])]
    want = kohya_reg_repeats(n_train, order)
    got = Counter(r.path for r in ds.records if r.path.startswith(str(regs)))
    assert got == want
    assert sum(got.values()) >= n_train and len(ds) == n_train + sum(got.values())
    assert f"subset reg {regs}/{sorted(reg)[0]}: " in ds.bucket_table()


def test_dataset_toml_subset_options(tmp_path):
    tree(tmp_path / "a", {"x": 4})
    for i in range(4):  # .caption files only for subset b, masks in another format and a nested path
        add(tmp_path, f"b/sub/{i}.png", noise(48, 80, seed=10 + i))
        (tmp_path / "b" / "sub" / f"{i}.caption").write_text(f"b {i}, one, two, three, four, five")
        if i:
            add(tmp_path, f"masks/sub/{i}.jpg", noise(48, 80, seed=i))
        add(tmp_path, f"cond/sub/{i}.webp", noise(48, 80, seed=i))
    (tmp_path / "run.toml").write_text("""
[general]
shuffle_caption = true
keep_tokens = 1
[[datasets]]
flip_aug = true
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "b"
  caption_extension = ".caption"
  shuffle_caption = false
  flip_aug = false
  mask_dir = "masks"
  conditioning_data_dir = "cond"
""")
    stats = DataStats()
    with pytest.warns(DataWarning, match="b/sub/0.png: no mask image in .*masks, trained with weight 1"):
        ds = open_dataset(dataset_config=tmp_path / "run.toml", stats=stats, seed=3, **SMALL)
    assert len(ds) == 12 and stats.missing_mask == 1 and stats.missing_conditioning == 0
    b = [i for i, r in enumerate(ds.records) if "/b/" in r.path]
    assert [ds.records[i].mask for i in b] == [None] + [str(tmp_path / f"masks/sub/{i}.jpg") for i in (1, 2, 3)]
    assert [ds.records[i].conditioning for i in b] == [str(tmp_path / f"cond/sub/{i}.webp") for i in range(4)]
    draws = {i: [] for i in range(len(ds))}
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in draws:
            item = ds[i]
            draws[i].append((item["caption"], hash(item["pixels"].numpy().tobytes())))
    for i, d in draws.items():
        caps, pixels = {c for c, _ in d}, {x for _, x in d}
        if i in b:  # b: its own captions, never shuffled, never flipped
            assert caps == {f"b {b.index(i)}, one, two, three, four, five"} and len(pixels) == 1
        else:  # a: shuffled after its first tag (keep_tokens 1; the last two stay), flipped
            assert len(caps) > 1 and all(c.startswith(f"x {ds.records[i].path[-5]}, ") for c in caps)
            assert len(pixels) == 2
    # the caption the latent-cache path and the text cache read follows the subset too
    assert {ds.caption(b[1], random.Random(k)) for k in range(5)} == {"b 1, one, two, three, four, five"}
    assert len({ds.caption(0, random.Random(k)) for k in range(5)}) > 1


@pytest.mark.parametrize("toml,message", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeat = 2\n", "unknown key 'num_repeat' in subset 1"),
    ("[[subsets]]\nimage_dir = 'a'\nnum_repeats = '2'\n", "num_repeats must be int, got '2'"),
    ("[[subsets]]\nimage_dir = 'a'\nconditioning_data_dir = 'cond'\n", "conditioning images for only 1 of 4"),
    ("resolution = 512\n", "unknown key 'resolution'"),
    ("[[subsets]]\nnum_repeats = 2\n", "neither image_dir nor metadata_file"),
], ids=["typo", "type", "conditioning", "top-level", "no-folder"])
def test_bad_dataset_config_is_one_line(tmp_path, toml, message):
    tree(tmp_path / "a", {"x": 4})
    add(tmp_path, "cond/x/0.png", noise(48, 80))
    (tmp_path / "run.toml").write_text(toml)
    with pytest.raises(DatasetError, match=message) as e:
        open_dataset(dataset_config=tmp_path / "run.toml", **SMALL)
    assert str(e.value).startswith(str(tmp_path)) and "\n" not in str(e.value)


def test_ddp_ranks_slice_the_repeated_items_of_one_process(tmp_path):
    """Oracle: one process with batch 2 * 2; two ranks with batch 2 each, concatenated in rank order, must give
    the same items (indices, pixels, captions) at every step, from any resume position."""
    data = tree(tmp_path / "data", {"3_a": 3, "2_b": 2})
    kw = dict(seed=7, random_crop=True, flip_aug=True, caption_config=CaptionConfig(shuffle_tags=True), **SMALL)
    ds = open_dataset(data, **kw)
    assert len(ds) == 13
    for epoch, position in [(0, 0), (1, 1)]:
        single = BucketBatchSampler(ds.bucket_ids, 4, seed=7)
        ranks = [BucketBatchSampler(ds.bucket_ids, 2, seed=7, rank=r, world_size=2) for r in range(2)]
        for s in [single, *ranks]:
            s.set_epoch(epoch, position)
        ds.set_epoch(epoch)
        want = list(DataLoader(ds, batch_sampler=single, collate_fn=collate))
        got = [list(DataLoader(ds, batch_sampler=s, collate_fn=collate)) for s in ranks]
        assert len(want) == len(got[0]) == len(got[1]) > 0
        for w, a, b in zip(want, *got):
            assert w["index"].tolist() == a["index"].tolist() + b["index"].tolist()
            assert torch.equal(w["pixels"], torch.cat([a["pixels"], b["pixels"]]))
            assert w["caption"] == a["caption"] + b["caption"]


def test_training_resumes_bit_identically_with_repeats(tmp_path, capsys):
    data = tree(tmp_path / "data", {"3_red": 2, "1_blue": 2})
    args = ["--use_lora", "--max_steps", 4, "--batch_size", 2, "--save_interval_steps", 2, "--learning_rate", 1e-3,
            "--flip_aug", "--shuffle_tags"]
    assert train_sdxl.main(train_args(data, tmp_path / "a", *args)) == 0
    assert f"subset {data}/3_red: 2 images, x 3 repeats = 6" in capsys.readouterr().out
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000002", tmp_path / "b" / "checkpoints" / "step_000002")
    assert train_sdxl.main(train_args(data, tmp_path / "b", *args, "--resume", "latest")) == 0
    a, b = (load_file(str(tmp_path / run / "lora_final.safetensors")) for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in "ab"]
    assert losses[0][2:] == losses[1]


def test_train_sdxl_reads_dataset_config_and_reg_data_dir(tmp_path, capsys):
    """The flags reach the loop: a TOML subset with its repeats plus a regularisation folder, in the run plan."""
    tree(tmp_path / "a", {"x": 2})
    tree(tmp_path / "reg", {"1_person": 3})
    (tmp_path / "run.toml").write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n  num_repeats = 2\n')
    args = train_args(None, tmp_path / "out", "--max_steps", 1, "--batch_size", 2, "--dataset_config",
                      tmp_path / "run.toml", "--reg_data_dir", tmp_path / "reg")
    i = args.index("--data_dir")
    assert train_sdxl.main(args[:i] + args[i + 2:]) == 0
    out = capsys.readouterr().out
    assert "x 2 repeats = 4" in out and "reg" in out

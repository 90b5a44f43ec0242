"""train_sdxl.py on WebDataset tar shards (--train_shards): exact resume, one process and two, and a broken shard."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, torchrun, train_args
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import sdxl
import train_sdxl

CAPTION = "a {} circle, white background, flat, round, simple, centered"  # tags for --shuffle_tags to move
SIZES = [(64, 64), (96, 32)]  # (w, h): buckets 64 x 64 and 32 x 96 at --image_size 64, --bucket_step 16 or 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """shard-{0..3}.tar, three samples each (<key>.png + <key>.txt), the two aspect ratios mixed within shards."""
    folder = tmp_path_factory.mktemp("shards")
    for s in range(4):
        with tarfile.open(folder / f"shard-{s}.tar", "w") as tar:
            for k in range(3):
                i = 3 * s + k
                name = list(COLOURS)[i % 4]
                w, h = SIZES[i % 2]
                im = Image.new("RGB", (w, h), "white")
                ImageDraw.Draw(im).ellipse([4, 4, w - 4, h - 4], fill=COLOURS[name])
                png = io.BytesIO()
                im.save(png, "PNG")
                for member, blob in [(f"{i:06d}.png", png.getvalue()), (f"{i:06d}.txt", CAPTION.format(name).encode())]:
                    info = tarfile.TarInfo(member)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return folder


def shard_args(shards: Path, out: Path, *extra) -> list[str]:
    args = train_args(shards, out, "--train_shards", shards / "shard-{0..3}.tar", "--batch_size", 2, *extra)
    i = args.index("--data_dir")
    return args[:i] + args[i + 2:]  # the shards are the only data


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def data_state(run: Path, step: int) -> list[dict]:
    return json.loads((run / "checkpoints" / f"step_{step:06d}" / "state.json").read_text())["data"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[0]}"


@pytest.mark.parametrize("model", ["latent", "pixel"])
def test_resume_is_bit_identical(shards, tmp_path, model):
    """4 steps straight = 2 steps, then --resume latest to 4: the same weights and losses, bit for bit. The step-2
    checkpoint holds samples buffered but not yet trained on, which the resumed stream must restore."""
    flags = {"latent": ["--optimizer", "sgd", "--learning_rate", 0.05],
             "pixel": ["--model_type", "pixel", "--bucket_step", 32, "--optimizer", "adamw", "--learning_rate", 1e-3]
             }[model] + ["--seed", 5, "--save_interval_steps", 2, "--random_crop", "--flip_aug", "--shuffle_tags"]
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    assert train_sdxl.main(shard_args(shards, straight, *flags, "--max_steps", 4)) == 0
    [state] = data_state(straight, 2)
    assert state["pending"] and state["epoch"] == 0  # mid-epoch, one sample waiting in the buffer
    if model == "latent":  # the user's way: a run that ends at step 2, continued in its folder
        assert train_sdxl.main(shard_args(shards, parted, *flags, "--max_steps", 2)) == 0
    else:  # the same from a copy of the straight run's step-2 checkpoint
        shutil.copytree(straight / "checkpoints" / "step_000002", parted / "checkpoints" / "step_000002")
    assert train_sdxl.main(shard_args(shards, parted, *flags, "--max_steps", 4, "--resume", "latest")) == 0
    assert_same(unet_weights(parted), unet_weights(straight))
    assert {s: v for s, v in losses(parted).items() if s > 2} == {3: losses(straight)[3], 4: losses(straight)[4]}
    start = sdxl.load_model("tiny", seed=5, model_type=model).unet.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in unet_weights(straight).items())  # it trained


def test_two_processes_train_and_resume_bit_identically(shards, tmp_path):
    """torchrun, 2 gloo processes, each reading its own 2 shards (6 samples an epoch): 4 steps straight vs. resumed
    from the step-2 checkpoint (one stream state per rank) on 2 processes, crossing an epoch boundary."""
    flags = ["--optimizer", "sgd", "--learning_rate", 0.05, "--seed", 5, "--random_crop", "--flip_aug"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(shard_args(shards, straight, *flags, "--max_steps", 4, "--save_interval_steps", 2))
    states = data_state(straight, 2)
    assert [(s["rank"], s["world_size"]) for s in states] == [(0, 2), (1, 2)] and any(s["pending"] for s in states)
    assert [s["epoch"] for s in data_state(straight, 4)] == [1, 1]
    shutil.copytree(straight / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    torchrun(shard_args(shards, resumed, *flags, "--max_steps", 4, "--save_interval_steps", 2, "--resume", "latest"))
    assert_same(unet_weights(resumed), unet_weights(straight))
    at2 = load_file(str(straight / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert any(not torch.equal(at2[f"unet.{k}"], v) for k, v in unet_weights(straight).items())  # it trains
    assert sorted(losses(straight)) == [1, 2, 3, 4] and losses(resumed) == {3: losses(straight)[3],
                                                                            4: losses(straight)[4]}
    assert data_state(resumed, 4) == data_state(straight, 4)


def test_truncated_shard_exits_2_naming_it(shards, tmp_path, capsys):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    blob = (broken / "shard-2.tar").read_bytes()
    (broken / "shard-2.tar").write_bytes(blob[:len(blob) // 2])  # cut inside a member
    assert train_sdxl.main(shard_args(broken, tmp_path / "out", "--max_steps", 1)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"train_sdxl.py: error: {broken / 'shard-2.tar'}: "), err
    assert "truncated" in err or "broken" in err

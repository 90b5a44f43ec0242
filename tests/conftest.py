"""Shared test setup: deterministic seeds, small thread count, and helpers to build reference modules."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}

# One thread: the tiny test models are overhead-bound, and 2 threads thrash when processes share 2 cores.
torch.set_num_threads(1)


def pytest_configure(config):
    """The suite is a CPU suite: its oracles, tolerances and bit-identical checks assume CPU kernels. On a machine
    with a GPU it hides the GPU (from this process and the workers and torchrun children it starts), so the trainer
    and generate() pick the CPU as they do in CI. `-m gpu` keeps the GPU visible and selects the tests that need it."""
    if (config.option.markexpr or "").strip() != "gpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    why = pytest.mark.skip(reason="needs a CUDA device (run `python -m pytest -m gpu` on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(why)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|: the parity measure the issues' tolerances are stated in."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def diffusers_kwargs(config_dict: dict) -> dict:
    """A diffusers config.json as constructor kwargs (drop the private `_class_name` etc.)."""
    return {k: v for k, v in config_dict.items() if not k.startswith("_")}


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """Eight captioned circles in two aspect ratios (two buckets at --image_size 64 --bucket_step 16)."""
    folder = tmp_path_factory.mktemp("train_data")
    for i in range(8):
        name = list(COLOURS)[i % 4]
        w, h = (64, 64) if i % 2 else (80, 48)
        im = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(im).ellipse([10, 8, w - 10, h - 8], fill=COLOURS[name])
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} circle, white background")
    return folder


def train_args(data, out, *extra) -> list[str]:
    """train_sdxl.py flags for the tiny preset at 64 px in fp32 on the CPU, plus `extra`."""
    return ["--pretrained_model", "tiny", "--data_dir", str(data), "--output_dir", str(out), "--image_size", "64",
            "--bucket_step", "16", "--num_workers", "0", "--precision", "fp32", "--log_every", "1", *map(str, extra)]


def torchrun(args, nproc: int = 2, timeout: int = 300, script: Path = ROOT / "train_sdxl.py"):
    """Run `script` on `nproc` gloo processes. --standalone lets the rendezvous bind a free port itself and hand
    its store to the workers: choosing a port here and passing it on would race with other processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:  # torchrun starts each rank in a session of its own: a hung run is killed rank by rank
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

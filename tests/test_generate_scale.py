"""Generation at scale: generate.py under torchrun equals one process, the PNG writer thread, --compile.

Oracles: one-process generate.py (itself checked against generate() in test_generate.py), pycocotools for the COCO
file, eager generation for the compiled one, and a hand-made slow or failing folder for the writer thread.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import torchrun
from sampling.coco import ImageFolder, PngWriter
from test_generate import ROOT, command, main_in_process, pixels

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
# 5 images in batches [0, 1], [2, 3], [4]; image 3 is already there (made by "another run"), so the plan is
# those three batches again (made whole), rank 0 taking [0, 1] and [4], rank 1 [2, 3] (saving only 2).
ARGS = ["--num-images", "5", "--batch-size", "2", "--seed", "7", "--cfg-scale", "4.5", "--sampler", "euler_ancestral",
        "--negative-prompt", "blurry"]


def cli():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_args(d: Path, out: str) -> list[str]:
    return command(d / out, "--prompt-file", str(d / "prompts.txt"), *ARGS)[2:]


@pytest.fixture(scope="module", autouse=True)
def distributed_run(tmp_path_factory):
    """torchrun over 2 gloo processes, started before the first test so the in-process tests overlap it."""
    d = tmp_path_factory.mktemp("scale")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    generate_py = cli()
    s = generate_py.build_settings(generate_py.parse_args(run_args(d, "two")))
    done = Image.new("RGB", (64, 64), (1, 2, 3))  # a finished image: skipped, kept and indexed
    ImageFolder(d / "two").save(3, done, s.prompt(3), s.parameters(3))
    with ThreadPoolExecutor(1) as pool:
        yield d, pool.submit(torchrun, run_args(d, "two"), script=ROOT / "generate.py")


def test_writer_saves_on_its_own_thread_and_bounds_its_queue(tmp_path):
    release, threads, saved = threading.Event(), [], []

    class Slow(ImageFolder):
        def save(self, *item):
            threads.append(threading.current_thread())
            release.wait(30)
            return super().save(*item)
    im = Image.new("RGB", (8, 8))
    writer = PngWriter(Slow(tmp_path), saved.append, depth=2)
    t0 = time.perf_counter()
    writer.put([(0, im, "a", "p")])  # taken by the thread, which now blocks in save
    writer.put([(1, im, "b", "p")])
    writer.put([(2, im, "c", "p")])  # the queue (depth 2) is full now
    assert time.perf_counter() - t0 < 5  # put does not wait for the encoding
    blocked = threading.Thread(target=writer.put, args=([(3, im, "d", "p")],), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # bounded: a fourth batch waits for room
    release.set()
    blocked.join(30)
    writer.close()
    assert {t.name for t in threads} == {"png-writer"}
    assert [[r.index for r in records] for records in saved] == [[0], [1], [2], [3]]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:012d}.png" for i in range(1, 5)]


class Failing(ImageFolder):
    def save(self, *item):
        time.sleep(0.1)  # the caller queues more meanwhile, until the queue is full
        raise OSError("disk full")


def test_writer_error_is_raised_in_the_caller_not_a_hang(tmp_path):
    im, done, result = Image.new("RGB", (8, 8)), [], {}

    def feed():
        try:
            with PngWriter(Failing(tmp_path), depth=1) as writer:
                for i in range(8):
                    writer.put([(i, im, "x", "p")])
                    done.append(i)
        except Exception as e:
            result["error"] = e
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the caller hangs"
    assert isinstance(result.get("error"), OSError) and len(done) < 8, (result, done)  # at a put, not only at exit
    writer = PngWriter(Failing(tmp_path))
    writer.put([(0, im, "x", "p")])
    with pytest.raises(OSError, match="disk full"):  # the last batch's error: at close
        writer.close()


def test_generate_py_fails_when_saving_fails(tmp_path):
    (tmp_path / "images").write_text("a file where the folder goes")
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", main_in_process(
        command(tmp_path, "--prompt", "x", "--num-images", "3", "--num-gpus", "1")[2:])), daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "generate.py hangs"
    rc, _, err = out["r"]
    assert rc == 1 and ("FileExistsError" in err or "NotADirectoryError" in err), err[-2000:]


SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, transformer_depth=(0, 1), mid_transformer_depth=1,
             num_attention_heads=(1, 2))  # as test_compile.py: tracing time grows with the op count


def test_compile_equals_eager(tmp_path, monkeypatch):
    import sdxl
    import sdxl.unet as unet_mod
    from sdxl import lora
    from torch._dynamo.utils import counters
    model = sdxl.load_model("tiny")
    cfg = dataclasses.replace(model.config.unet, **SMALL)
    model.config, model.unet = dataclasses.replace(model.config, unet=cfg), unet_mod.UNet(cfg)
    model.save_pretrained(tmp_path / "small")
    net = lora.inject(model, "attention", rank=4)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    lora.save_lora(tmp_path / "lora.safetensors", net)
    monkeypatch.setattr(unet_mod, "COMPILE_BACKEND", "aot_eager")  # inductor's tracing, in seconds on a CPU
    torch._dynamo.reset()
    counters.clear()
    got = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        rc, _, err = main_in_process(command(tmp_path / name, "--pretrained_model", str(tmp_path / "small"),
                                             "--lora-checkpoint", str(tmp_path / "lora.safetensors"), "--prompt",
                                             "a red circle", "--num-gpus", "1", *extra)[2:])
        assert rc == 0, err[-3000:]
        got[name] = pixels(tmp_path / name / "images" / "000000000001.png").astype(int)
        assert (counters["stats"]["unique_graphs"] > 0) == (name == "compiled"), name
    torch._dynamo.reset()
    assert np.abs(got["compiled"] - got["eager"]).max() <= 1


def test_torchrun_makes_the_images_and_index_of_one_process(distributed_run):
    from pycocotools.coco import COCO
    d, job = distributed_run
    torch.set_num_threads(1)  # as each rank: the same kernels, byte-identical pixels
    rc, _, err = main_in_process([*run_args(d, "one"), "--num-gpus", "1"])
    assert rc == 0, err[-3000:]
    r = job.result()
    assert "5 images (1 already done)" in r.stdout and "2 CPU processes (torchrun)" in r.stdout
    assert "| 3/3 [" in r.stderr  # rank 0 made its share only: images 0, 1 and 4
    names = [f"{i:012d}.png" for i in range(1, 6)]
    assert sorted(p.name for p in (d / "two" / "images").iterdir()) == names
    for name in names:
        got, want = (d / "two" / "images" / name).read_bytes(), (d / "one" / "images" / name).read_bytes()
        assert (got == want) == (name != "000000000004.png"), name  # the finished image was not made again
    assert (pixels(d / "two" / "images" / "000000000004.png") == (1, 2, 3)).all()
    assert sorted(p.name for p in (d / "two" / "annotations").iterdir()) == ["captions.json"]  # one, no leftovers
    one, two = (json.loads((d / k / "annotations" / "captions.json").read_text()) for k in ("one", "two"))
    assert two["images"] == one["images"] and two["annotations"] == one["annotations"]
    coco = COCO(str(d / "two" / "annotations" / "captions.json"))
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4, 5]
    assert [coco.loadAnns(coco.getAnnIds(imgIds=[i]))[0]["caption"] for i in range(1, 6)] == [
        PROMPTS[i % 3] for i in range(5)]

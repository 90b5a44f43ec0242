"""generate.py end to end, as a user runs it: subprocesses on the tiny preset at 64 px with 2 steps.

Oracles: pycocotools reads the COCO file; the pixels are compared with `generate()` called in this process (itself
checked against diffusers in test_pipeline.py); the PNG chunks are parsed from the raw bytes, not through PIL.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: the machine's cores are shared, and the 1-worker run must use the same thread count as
# each of the 2 workers for byte-identical pixels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPTS = ["a red circle", "a blue square", "last: a green triangle, photo"]
NEGATIVE = "blurry, low quality"


def command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "generate.py", "--pretrained_model", "tiny", "--image-size", "64", "--steps", "2",
            "--output-dir", str(out), *args]


def gen(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def png_text_chunks(path: Path) -> dict[str, tuple[bytes, str]]:
    """{keyword: (chunk type, text)} for the tEXt / iTXt chunks, read from the raw PNG bytes."""
    data, pos, out = path.read_bytes(), 8, {}
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = (kind, value.decode("latin-1"))
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            assert rest[:2] == b"\0\0"  # uncompressed
            _lang, _, rest = rest[2:].partition(b"\0")
            _tkey, _, value = rest.partition(b"\0")
            out[key.decode("latin-1")] = (kind, value.decode("utf-8"))
        pos += 12 + length
    return out


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    # Blank and padded lines: skipped and stripped.
    (d / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n   {PROMPTS[1]}  \n\n{PROMPTS[2]}\n\n", encoding="utf-8")
    coco = {"images": [{"id": 9, "file_name": "x.jpg"}, {"id": 4, "file_name": "y.jpg"}],
            "annotations": [{"id": 1, "image_id": 9, "caption": "A cat  on a\nmat."},
                            {"id": 2, "image_id": 4, "caption": "Two dogs."}]}
    (d / "captions.json").write_text(json.dumps(coco), encoding="utf-8")
    return d


# A stochastic sampler: its noise at every step, not only the initial noise, must come from image i's own seed, so
# the 1- and 2-worker runs below also check that the per-step noise does not depend on which worker made a batch.
SAMPLER = "euler_ancestral"
SETTINGS = ["--negative-prompt", NEGATIVE, "--num-images", "5", "--batch-size", "2", "--seed", "7",
            "--cfg-scale", "4.5", "--sampler", SAMPLER]


def base_args(inputs: Path) -> list[str]:
    return ["--prompt-file", str(inputs / "prompts.txt"), *SETTINGS]


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict[str, Path]:
    """The shared outputs, made by concurrent runs: 1 worker, 2 workers, and the simple format."""
    d = tmp_path_factory.mktemp("runs")
    jobs = {"one": base_args(inputs) + ["--num-gpus", "1"], "two": base_args(inputs) + ["--num-gpus", "2"],
            "simple": ["--prompt-file", str(inputs / "captions.json"), "--num-images", "3", "--output-format",
                       "simple", "--sampler", "dpmpp_2m_karras", "--cfg-scale", "1"],
            "pixel": ["--pretrained_model", "pixel-demo", "--prompt", PROMPTS[0], "--num-images", "2"]}
    procs = {k: subprocess.Popen(command(d / k, *args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, args in jobs.items()}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{k}: {stderr[-3000:]}"
        assert {"one": "(0 already done)", "two": "2 CPU worker(s)", "simple": "1 CPU worker(s)",
                "pixel": "2 images"}[k] in stdout
    return {k: d / k for k in jobs}


@pytest.fixture(scope="module")
def one(runs) -> Path:
    return runs["one"]


@pytest.fixture(scope="module")
def two(runs) -> Path:
    return runs["two"]


def test_batches_have_fixed_boundaries():
    from sampling.workers import plan_batches
    # Whole batches, even around a single missing image, and the last one cut at the total.
    assert plan_batches([3, 4, 9, 8], 2, 10) == [[2, 3], [4, 5], [8, 9]]
    assert plan_batches([4], 2, 5) == [[4]]
    assert plan_batches([0, 1, 2, 3, 4], 3, 5) == [[0, 1, 2], [3, 4]]


def test_help_explains_cpu_workers():
    r = subprocess.run([sys.executable, "generate.py", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "without GPUs, that many CPU worker processes" in text
    for flag in ("--pretrained_model", "--lora-checkpoint", "--prompt-file", "--output-format", "--cfg-scale"):
        assert flag in text


def test_two_workers_make_the_same_files_as_one(one, two):
    files = sorted(p.name for p in (one / "images").iterdir())
    assert files == [f"{i:012d}.png" for i in range(1, 6)]
    assert sorted(p.name for p in (two / "images").iterdir()) == files
    for name in files:  # whole files: pixels and text chunks
        assert (one / "images" / name).read_bytes() == (two / "images" / name).read_bytes(), name
    a, b = (json.loads((d / "annotations" / "captions.json").read_text()) for d in (one, two))
    assert a["images"] == b["images"] and a["annotations"] == b["annotations"]
    # Different seeds give different images (the comparison above is not between blanks).
    assert np.abs(pixels(one / "images" / files[0]).astype(int) - pixels(one / "images" / files[3])).mean() > 1


def test_coco_file_loads_in_pycocotools(one):
    from pycocotools.coco import COCO
    coco = COCO(str(one / "annotations" / "captions.json"))
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4, 5]
    data = json.loads((one / "annotations" / "captions.json").read_text())
    assert set(data) >= {"info", "licenses", "images", "annotations"}
    for img in coco.loadImgs(coco.getImgIds()):
        assert img["file_name"] == f"{img['id']:012d}.png"
        assert (img["width"], img["height"]) == (64, 64)
        with Image.open(one / "images" / img["file_name"]) as im:
            assert im.size == (64, 64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert [a["caption"] for a in anns] == [PROMPTS[(img["id"] - 1) % 3]]  # prompt i mod P
    assert len({a["id"] for a in data["annotations"]}) == 5


def test_pixels_are_generate_with_seed_plus_i_and_prompt_i_mod_p(one):
    import torch

    import sdxl
    from sampling import generate
    torch.set_num_threads(1)
    model = sdxl.load_model("tiny")  # the preset's random weights (seed 0), as the CLI loads them
    kw = dict(negative_prompt=NEGATIVE, height=64, width=64, steps=2, guidance_scale=4.5, sampler=SAMPLER)
    # Batches have fixed boundaries: images 2, 3 (indices) were made together, image 4 alone.
    pair = generate(model, [PROMPTS[2], PROMPTS[0]], seed=[9, 10], **kw)
    last = generate(model, [PROMPTS[1]], seed=[11], **kw)
    for index, im in zip((2, 3, 4), pair + last):
        assert np.array_equal(pixels(one / "images" / f"{index + 1:012d}.png"), np.asarray(im)), index
    # Image 3 made alone: the batch split changes neither its initial nor its per-step noise (seed 10 only). The
    # batched UNet call rounds differently from the single one: 1 level in a few values (measured: 0.03% of them).
    alone = np.asarray(generate(model, [PROMPTS[0]], seed=[10], **kw)[0]).astype(int)
    diff = np.abs(alone - pixels(one / "images" / "000000000004.png").astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_png_parameters_chunk_in_a1111_format(one):
    chunks = png_text_chunks(one / "images" / "000000000004.png")
    kind, text = chunks["parameters"]
    assert kind == b"tEXt"  # A1111 writes a tEXt chunk named "parameters"
    assert text == (f"{PROMPTS[0]}\nNegative prompt: {NEGATIVE}\n"
                    "Steps: 2, Sampler: Euler a, CFG scale: 4.5, Seed: 10, Size: 64x64, Model: tiny")


def test_simple_format_with_a_coco_prompt_file(runs):
    out = runs["simple"]
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "prompts.txt"]
    captions = ["A cat on a mat.", "Two dogs.", "A cat on a mat."]  # annotation order, whitespace collapsed
    assert (out / "prompts.txt").read_text(encoding="utf-8").splitlines() == [
        f"{i:06d}.png\t{c}" for i, c in enumerate(captions)]
    _, text = png_text_chunks(out / "000001.png")["parameters"]
    assert text == "Two dogs.\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 1, Seed: 1, Size: 64x64, Model: tiny"


def test_pixel_space_model(runs):
    import sdxl
    from sampling import generate
    model = sdxl.load_model("pixel-demo")  # the preset's random weights (seed 0), as the CLI loads them
    for i in range(2):  # batch size 1
        im = generate(model, [PROMPTS[0]], height=64, width=64, steps=2, sampler="euler", seed=[i])[0]
        path = runs["pixel"] / "images" / f"{i + 1:012d}.png"
        assert np.array_equal(pixels(path), np.asarray(im))
        assert png_text_chunks(path)["parameters"][1] == (
            f"{PROMPTS[0]}\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: {i}, Size: 64x64, Model: pixel-demo")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Files the README's --checkpoint / --lora-checkpoint / --vae flags take, written with the library's own save
    functions (the ones training's save_final calls): a full fine-tune's output folder (final/ holding weights
    other than the tiny preset's), a LoRA run's output folder (lora_final.safetensors), and a VAE file in diffusers
    names (as the fp16-fix VAE), each unlike the tiny preset's own."""
    import torch
    from safetensors.torch import save_file

    import sdxl
    from sdxl import lora
    d = tmp_path_factory.mktemp("weights")
    sdxl.load_model("tiny", seed=5).save_pretrained(d / "full_run" / "final")
    model = sdxl.load_model("tiny")
    net = lora.inject(model, "attention", rank=4)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("lora_up.weight"):  # zero at init: give the LoRA an effect
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    (d / "lora_run").mkdir()
    lora.save_lora(d / "lora_run" / "lora_final.safetensors", net)
    save_file(sdxl.load_model("tiny", seed=6).vae.state_dict(), str(d / "vae.safetensors"))
    return {"full_run": d / "full_run", "lora_run": d / "lora_run",
            "lora": d / "lora_run" / "lora_final.safetensors", "vae": d / "vae.safetensors"}


def run_in_process(out: Path, *args: str) -> np.ndarray:
    """generate.py with 1 worker (in this process) for one image of PROMPTS[0], seed 3: its pixels."""
    rc, _, err = main_in_process(command(out, "--prompt", PROMPTS[0], "--seed", "3", "--num-gpus", "1", *args)[2:])
    assert rc == 0, err[-3000:]
    return pixels(out / "images" / "000000000001.png")


def reference(model) -> np.ndarray:
    """The oracle: generate() on a model loaded in this process, the CLI's settings (2 steps, CFG 5, seed 3)."""
    from sampling import generate
    return np.asarray(generate(model, [PROMPTS[0]], height=64, width=64, steps=2, guidance_scale=5.0, seed=3)[0])


@pytest.fixture(scope="module")
def plain() -> np.ndarray:
    """The image without any of the flags: each flag must change it (or the comparisons below prove nothing)."""
    import sdxl
    return reference(sdxl.load_model("tiny"))


def far(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a.astype(int) - b.astype(int)).mean() > 1


def test_checkpoint_flag_takes_a_training_output_folder(weights, plain, tmp_path):
    import sdxl
    # A full fine-tune: its final/ folder replaces --pretrained_model.
    got = run_in_process(tmp_path / "full", "--checkpoint", str(weights["full_run"]))
    assert np.array_equal(got, reference(sdxl.load_model(weights["full_run"] / "final")))
    assert far(got, plain)
    # A LoRA run: lora_final.safetensors applied at scale 1 to --pretrained_model.
    got = run_in_process(tmp_path / "lora", "--checkpoint", str(weights["lora_run"]))
    with_lora = sdxl.load_model("tiny")
    with_lora.load_lora(weights["lora"], 1.0)
    assert np.array_equal(got, reference(with_lora))
    assert far(got, plain)


def test_lora_checkpoint_scale_is_applied(weights, plain, tmp_path):
    import sdxl
    got = run_in_process(tmp_path / "half", "--lora-checkpoint", f"{weights['lora']}:0.5")
    models = {}
    for scale in (0.5, 1.0):
        models[scale] = sdxl.load_model("tiny")
        models[scale].load_lora(weights["lora"], scale)
    assert np.array_equal(got, reference(models[0.5]))
    assert far(got, reference(models[1.0])) and far(got, plain)


def test_vae_flag_replaces_the_vae(weights, plain, tmp_path):
    import sdxl
    got = run_in_process(tmp_path / "vae", "--vae", str(weights["vae"]))
    assert np.array_equal(got, reference(sdxl.load_model("tiny", vae=weights["vae"])))
    assert far(got, plain)


def test_resume_makes_only_the_missing_image(one, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(one, out)
    (out / "images" / "000000000004.png").unlink()  # index 3: the second image of batch [2, 3]
    ann = out / "annotations" / "captions.json"
    ann.write_bytes(ann.read_bytes()[:len(ann.read_bytes()) // 2])  # a torn index
    before = snapshot(out / "images")
    r = ok(gen(out, *base_args(inputs), "--num-gpus", "1"))
    assert "5 images (4 already done)" in r.stdout
    after = snapshot(out / "images")
    assert {k: v for k, v in after.items() if k != "000000000004.png"} == before  # mtime and bytes untouched
    # The whole batch is made again, so the image is the one a fresh run makes, byte for byte.
    assert after["000000000004.png"][1] == (one / "images" / "000000000004.png").read_bytes()
    data, ref = (json.loads((d / "annotations" / "captions.json").read_text()) for d in (out, one))
    assert data["images"] == ref["images"] and data["annotations"] == ref["annotations"]
    # Done: a third run makes nothing and still rewrites the same index.
    r = ok(gen(out, *base_args(inputs), "--num-gpus", "1"))
    assert "5 images (5 already done)" in r.stdout and snapshot(out / "images") == after


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_killed_run_resumes_without_duplicates(inputs, tmp_path):
    out = tmp_path / "out"
    args = ["--prompt-file", str(inputs / "prompts.txt"), "--num-images", "8", "--batch-size", "1", "--steps", "10"]
    # A session of its own, so the workers can be found after the parent is gone.
    proc = subprocess.Popen(command(out, *args, "--num-gpus", "2"), cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / "images").glob("*.png"))) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The orphaned workers notice their parent is gone and stop after the batch in flight.
    deadline = time.time() + 60
    while _group_alive(proc.pid):
        assert time.time() < deadline, "workers outlived their killed parent"
        time.sleep(0.1)
    made = len(list((out / "images").glob("*.png")))
    assert 2 <= made < 8
    r = ok(gen(out, *args, "--num-gpus", "1"))
    assert f"8 images ({made} already done)" in r.stdout
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:012d}.png" for i in range(1, 9)]
    for p in (out / "images").iterdir():
        with Image.open(p) as im:
            im.load()  # complete, decodable
    assert not list(out.rglob("*.tmp"))
    data = json.loads((out / "annotations" / "captions.json").read_text())
    assert [i["id"] for i in data["images"]] == list(range(1, 9))
    assert [(a["id"], a["image_id"], a["caption"]) for a in data["annotations"]] == [
        (i + 1, i + 1, PROMPTS[i % 3]) for i in range(8)]


# case -> (extra arguments, a phrase of the message, run as a subprocess). Cases that fail in argument checking run
# generate.main() in this process (the same code without another interpreter start); one of them, and every case
# that needs a model load or worker processes, runs the real command line.
BAD = {
    "empty prompt file": (["--prompt-file", "{d}/empty.txt"], "empty.txt: no prompts", True),
    "non-UTF-8 prompt file": (["--prompt-file", "{d}/latin1.txt"], "latin1.txt: not UTF-8", False),
    "invalid JSON prompt file": (["--prompt-file", "{d}/bad.json"], "bad.json: invalid JSON", False),
    "size not a multiple of 8": (["--prompt", "x", "--height", "60"], "multiples of 8", False),
    "unknown sampler": (["--prompt", "x", "--sampler", "eulr"], "unknown sampler 'eulr'", False),
    "missing model": (["--prompt", "x", "--pretrained_model", "{d}/nope"], "nope: no such model", False),
    "missing LoRA": (["--prompt", "x", "--lora-checkpoint", "{d}/style.safetensors:0.7"],
                     "style.safetensors: no such LoRA file", False),
    "other settings than the images there": (["--prompt-file", "{inputs}/prompts.txt", "--seed", "8"],
                                             "000000000001.png was made with other settings", False),
    # A pixel model's sides are multiples of its patch times the body's downsampling (32 here), checked at load.
    "size not a multiple of the pixel patch": (["--prompt", "x", "--pretrained_model", "pixel-demo", "--height", "80",
                                                "--sampler", "euler", "--output-dir", "{d}/fresh"],
                                               "multiples of 32", True),
    # Loading fails inside the 2 worker processes: the message still comes back as one line.
    "corrupt model in workers": (["--prompt", "x", "--pretrained_model", "{d}/broken.safetensors", "--num-images",
                                  "2", "--num-gpus", "2", "--output-dir", "{d}/fresh"],
                                 "broken.safetensors: not a readable safetensors file", True),
}


def main_in_process(argv: list[str]) -> tuple[int, str, str]:
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        except Exception:  # as the interpreter would report it
            rc, _ = 1, traceback.print_exc()
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bad_runs(one, inputs, tmp_path_factory):
    """Every bad-input case over a copy of a finished folder (the subprocesses concurrently)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("\n  \n\n")
    (d / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (d / "bad.json").write_text('{"annotations": [')
    (d / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    out = d / "out"
    shutil.copytree(one, out)
    before = snapshot(out)
    cmds = {case: command(out, *SETTINGS, *[a.format(d=d, inputs=inputs) for a in args])
            for case, (args, _, _) in BAD.items()}
    procs = {case: subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for case, cmd in cmds.items() if BAD[case][2]}
    results = {case: main_in_process(cmd[2:]) for case, cmd in cmds.items() if not BAD[case][2]}
    results |= {case: (p.wait(timeout=300), *p.communicate()) for case, p in procs.items()}
    return results, before, snapshot(out), d


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(bad_runs, case):
    results, before, after, d = bad_runs
    rc, _, stderr = results[case]
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("generate.py: error: ") and BAD[case][1] in lines[0], lines[0]
    assert after == before  # nothing already generated touched, index included
    assert not list((d / "fresh").rglob("*.png"))

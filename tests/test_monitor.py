"""Training that can be watched, and generate.py's contact sheet.

Oracles: the wandb run is read back from its own offline transaction log (the LevelDB-style record file every wandb
run writes, parsed here with wandb's protobuf definitions); TensorBoard's event files through TensorBoard's own
EventAccumulator; the grids are compared cell by cell with the images written beside them; metrics.jsonl is
re-plotted here and compared with curves.png.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import train_args
from PIL import Image

import generate
import train_sdxl
from training import logging
from training.logging import CURVES, plot_curves

PROMPTS = ["a red circle", "a blue circle on a white background"]
PLOTTED = []  # metrics.jsonl as it was at each refresh of curves.png


def wandb_records(path: Path) -> list:
    """Every record of a wandb transaction log: a 7-byte header (":W&B", magic, version), then LevelDB log blocks of
    32 KiB, each record a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


@pytest.fixture(scope="module")
def run(train_data, tmp_path_factory, monkeypatch_module):
    """One tiny run with everything on: 2 steps, a save and validation samples at each."""
    out = tmp_path_factory.mktemp("watched") / "run"
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CACHE_DIR": out.parent / "cache",
                 "WANDB_CONFIG_DIR": out.parent / "config"}.items():  # nothing written outside tmp
        monkeypatch_module.setenv(k, str(v))
    real = logging.plot_curves
    monkeypatch_module.setattr(logging, "plot_curves", lambda m, o: (PLOTTED.append(logged(out)), real(m, o)))
    args = train_args(train_data, out, "--max_steps", 2, "--batch_size", 2, "--sample_every", 1,
                      "--sample_prompts", *PROMPTS, "--sample_steps", 2, "--save_interval_steps", 1,
                      "--wandb", "--tensorboard")
    assert train_sdxl.main(args) == 0
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_wandb_offline_run_holds_metrics_images_and_memory_plan(run):
    [log] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(log)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    for want in logged(run):  # every metrics.jsonl line is a wandb history row at its step
        row = next(h for h in history if h["_step"] == want["step"] and "loss" in h)
        assert {k: row[k] for k in ("loss", "lr", "grad_norm")} == pytest.approx(
            {k: want[k] for k in ("loss", "lr", "grad_norm")})
    samples = [h for h in history if "samples/captions" in h]
    assert [h["_step"] for h in samples] == [1, 2] and all(h["samples/captions"] == PROMPTS for h in samples)
    for h in samples:
        for name in h["samples/filenames"]:
            assert Image.open(log.parent / "files" / name).size == (64, 64)
    [meta] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in meta.config.update}
    assert config["max_steps"] == 2 and config["sample_prompts"] == PROMPTS
    assert "memory plan" in meta.notes.lower() and "optimizer" in meta.notes.lower()


def test_tensorboard_events_hold_scalars_and_sample_grids(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    want = logged(run)
    for k in ("loss", "lr", "grad_norm"):
        events = acc.Scalars(k)
        assert [e.step for e in events] == [w["step"] for w in want]
        assert [e.value for e in events] == pytest.approx([w[k] for w in want], rel=1e-6)
    images = acc.Images("samples")
    assert [e.step for e in images] == [1, 2]
    grid = Image.open(run / "samples" / "step_000002.png")
    assert (images[-1].width, images[-1].height) == grid.size
    plan = acc.Tensors("memory_plan/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "memory plan" in plan.lower() and "optimizer" in plan.lower()


def test_sample_grid_per_step_with_prompts_under_the_images(run):
    for step in (1, 2):
        grid = np.asarray(Image.open(run / "samples" / f"step_{step:06d}.png").convert("RGB"))
        cells = [np.asarray(Image.open(run / "samples" / f"step_{step:06d}_{i}.png")) for i in range(2)]
        assert np.array_equal(grid[:64, :64], cells[0]) and np.array_equal(grid[:64, 68:132], cells[1])
        text = grid[66:]  # under the images: white with dark glyphs, more of them under the longer prompt
        assert text.shape[0] > 20 and (text == 255).mean() > 0.7
        ink = [(text[:, x0:x0 + 64] < 128).sum() for x0 in (0, 68)]
        assert 0 < ink[0] < ink[1]


def test_curves_png_is_the_plot_of_metrics_jsonl(run, tmp_path):
    curves = Image.open(run / "curves.png")
    curves.verify()  # a complete, valid PNG
    again = tmp_path / "curves.png"
    plot_curves(run / "metrics.jsonl", again)
    assert np.array_equal(np.asarray(Image.open(run / "curves.png")), np.asarray(Image.open(again)))
    img = np.asarray(Image.open(again).convert("RGB")).astype(int)
    blue = (abs(img - [31, 119, 180]).sum(-1) < 30).reshape(len(CURVES), -1, img.shape[1])
    assert all(panel.any() for panel in blue)  # each of loss, lr and grad norm has its line


def test_curves_are_refreshed_at_each_save(run):
    # at the save of step 2 and at the end; at step 1's save nothing was logged yet (a step's metrics are read
    # during the next step, the last one's at once)
    assert [[m["step"] for m in seen] for seen in PLOTTED] == [[1, 2], [1, 2]]


def test_generate_grid_is_a_contact_sheet_of_the_first_n(tmp_path, capsys):
    out = tmp_path / "gen"
    assert generate.main(["--pretrained_model", "tiny", "--image-size", "64", "--steps", "2", "--num-images", "3",
                          "--prompt-file", str(_prompts(tmp_path)), "--output-dir", str(out), "--grid", "2"]) == 0
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    for i in range(2):
        cell = np.asarray(Image.open(out / "images" / f"{i + 1:012d}.png").convert("RGB"))
        assert np.array_equal(grid[:64, i * 68:i * 68 + 64], cell)
    assert grid.shape[1] == 2 * 64 + 4 and (grid[66:] < 128).any()  # two cells in the row, captions under them
    assert generate.main(["--pretrained_model", "tiny", "--output-dir", str(out), "--prompt", "x", "--grid", "0"]) == 2
    assert "--grid must be at least 1" in capsys.readouterr().err


def _prompts(tmp_path: Path) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS + ["a third prompt"]))
    return f

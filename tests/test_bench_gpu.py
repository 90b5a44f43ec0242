"""bench/gpu.py --smoke: every case of the GPU plan runs on the CPU with the tiny preset and writes its rows (ours and
diffusers side by side, our memory plan beside the training rows). The compile case runs uncompiled here
(--compile_backend none: compilation itself is tested in test_compile.py); the rows are what is checked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from sdxl.config import PRESETS
from sdxl.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ("steps_per_s", "loop_s", "decode_s", "end_to_end_s", "s_per_image", "peak_gib")
TRAIN = ("s_per_step", "images_per_s", "peak_gib", "trainable_params")
PLAN = ("plan_peak_gib", "plan_delta_gib", "plan_activations_gib", "plan_recompute_gib", "plan_fused_attention")


def test_smoke_writes_every_case(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--compile_backend", "none",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert list(tmp_path.iterdir()) == [out]  # written through a temporary file, renamed
    assert (doc["device"], doc["config"], doc["size"], doc["steps"]) == ("cpu-smoke", "tiny", 32, 2)
    rows = {(r["case"], r.get("batch"), r.get("side")): r for r in doc["rows"]}
    assert not [r for r in doc["rows"] if "error" in r or "oom" in r or "skipped" in r]
    cases = [(f"generate-{m}", b) for m in ("eager", "compile") for b in (1, 4)] + [("lora", 1), ("full", 1),
                                                                                     ("full", 4)]
    assert set(rows) == {("setup", None, None)} | {(c, b, s) for c, b in cases for s in ("reference", "ours")}
    for case, batch in cases:
        ref, ours = rows[case, batch, "reference"], rows[case, batch, "ours"]
        fields = GENERATE if case.startswith("generate") else TRAIN
        assert all(k in ref and k in ours for k in fields), (case, batch)
        assert ours["speedup"] > 0
        if case.startswith("generate"):  # the same weights and noise: the same images, up to rounding
            assert ours["max_pixel_diff"] <= 2
            assert ("compile_s" in ours) == (case == "generate-compile")
        else:  # our plan beside the training rows (no device peak on the CPU); the same trained parameters
            assert all(k in ours for k in PLAN) and ours["peak_gib"] is None
            assert ours["trainable_params"] == ref["trainable_params"]
    n_unet = sum(p.numel() for p in UNet(PRESETS["tiny"].unet).parameters())
    assert rows["full", 1, "ours"]["trainable_params"] == n_unet
    lora = rows["lora", 1, "ours"]  # rank 16 on every linear layer: 16 * (in + out) each
    linear = [m for n, m in UNet(PRESETS["tiny"].unet).named_modules() if isinstance(m, torch.nn.Linear) and
              n.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"))]
    assert lora["trainable_params"] == sum(16 * (m.in_features + m.out_features) for m in linear)
    assert run.stdout.count("memory plan:") == 3

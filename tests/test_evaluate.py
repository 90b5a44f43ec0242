"""evaluate.py against torchmetrics, the reference it promises to match.

Oracles: torchmetrics' FrechetInceptionDistance / KernelInceptionDistance fed the images themselves, with the same
random-weight Inception file; for CLIP score, torchmetrics' own CLIPScore update (its processor calls and feature
normalisation), run on a tiny random transformers CLIP through an adapter for the transformers-5 return type, then
100 * max(cos, 0) per image, averaged. Nothing is downloaded.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from sampling.coco import ImageFolder

CAPTIONS = ["a red circle", "a blue square on grass", "a green triangle at night"]
FEATURE = 64  # torchmetrics' smallest Inception layer: the same network and resize, a 64 x 64 covariance


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's Inception with random weights (He-initialised, so the 2048-d features keep their scale)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    class Random(tf_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # the constructor's load of downloaded weights
            return None

    mp = pytest.MonkeyPatch()
    mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    net = Random("inception-v3-compat", ["2048"])
    mp.undo()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def drawn(i: int, size=(320, 320), noise: float = 40.0) -> Image.Image:
    """A colour per image plus noise: images that differ, and sets that differ by their noise."""
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(base + rng.normal(0, noise, (size[1], size[0], 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A coco folder as generate.py writes it: 3 images with captions, larger than Inception's 299 px input (the
    resize then downsamples: antialiasing matters)."""
    folder = ImageFolder(tmp_path_factory.mktemp("gen"), "coco")
    for i, c in enumerate(CAPTIONS):
        folder.save(i, drawn(i), c, f"{c}\nSteps: 2")
    folder.write_index()
    return folder.root


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """4 reference images of two sizes and mixed modes (RGBA, L, P as png; RGB as jpg), as a plain folder."""
    root = tmp_path_factory.mktemp("ref")
    for i, mode in enumerate(["RGBA", "L", "P", "RGB"]):
        im = drawn(100 + i, (64, 48) if i % 2 else (304, 320), noise=4.0).convert(mode)
        im.save(root / f"{i}.{'jpg' if mode == 'RGB' else 'png'}", quality=95)
    return root


def as_uint8(path: Path) -> torch.Tensor:
    """(1, 3, H, W) uint8, the input torchmetrics' Inception takes."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]


def run(*args) -> dict:
    assert evaluate.main([str(a) for a in args]) == 0
    return json.loads(Path(args[args.index("--out") + 1]).read_text())


def test_fid_and_kid_equal_torchmetrics_with_the_same_inception(inception_file, generated, reference, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    stats = tmp_path / "ref.npz"
    got = run("--images", generated, "--reference", reference, "--metrics", "fid,kid", "--inception", inception_file,
              "--feature", FEATURE,
              "--kid-subsets", 5, "--kid-subset-size", 3, "--batch-size", 3, "--save-ref-stats", stats,
              "--out", tmp_path / "r.json")
    fid = FrechetInceptionDistance(feature=FEATURE, feature_extractor_weights_path=str(inception_file))
    # KID's integer `feature` always downloads the weights: it takes the network FID built from the file
    kid = KernelInceptionDistance(feature=fid.inception, subsets=5, subset_size=3)
    for real, folder in ((True, reference), (False, generated / "images")):
        for p in sorted(folder.iterdir()):  # one image per update: no batching in common with evaluate.py
            fid.update(as_uint8(p), real=real)
            kid.update(as_uint8(p), real=real)
    torch.manual_seed(0)  # --seed's default: the same subsets
    kid_mean, kid_std = kid.compute()
    assert got["num_images"] == 3 and got["num_reference"] == 4
    assert got["fid"] > 0 and rel(got["fid"], fid.compute().item()) <= 1e-2
    assert abs(got["kid_mean"]) > 1e-6 and rel(got["kid_mean"], kid_mean.item()) <= 1e-2
    assert rel(got["kid_std"], kid_std.item()) <= 1e-2
    # the cached reference, read back, gives the same numbers
    again = run("--images", generated, "--ref-stats", stats, "--metrics", "fid,kid", "--inception", inception_file,
                "--feature", FEATURE,
                "--kid-subsets", 5, "--kid-subset-size", 3, "--out", tmp_path / "again.json")
    assert again["fid"] == got["fid"] and again["kid_mean"] == got["kid_mean"]


def tiny_clip(folder: Path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sdxl.text_encoders import CLIPTokenizer
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(tower, vocab_size=49408), projection_dim=16,
                     vision_config=dict(tower, image_size=32, patch_size=8))
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    CLIPTokenizer.default().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


def test_clip_score_is_torchmetrics_definition(generated, tmp_path):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from transformers import CLIPProcessor
    model = tiny_clip(tmp_path / "clip")
    # two CPU workers (spawned processes, as on two GPUs), each scoring every other image
    got = run("--images", generated, "--metrics", "clip", "--clip-model", tmp_path / "clip", "--batch-size", 2,
              "--num-gpus", 2, "--out", tmp_path / "r.json")

    class Transformers4(torch.nn.Module):  # torchmetrics 1.9 wants tensors from get_*_features, not outputs
        def __init__(self):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *a, **k):
            return model.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return model.get_text_features(*a, **k).pooler_output

    images = [as_uint8(p)[0] for p in sorted((generated / "images").iterdir())]
    with torch.no_grad():
        cos100, _ = _clip_score_update(images, CAPTIONS, Transformers4(), CLIPProcessor.from_pretrained(
            tmp_path / "clip"))
    want = cos100.clamp_min(0)
    assert (want > 0).any() and (want == 0).any()  # the random model gives both signs: the clamp is exercised
    with open(got["clip_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["caption"] for r in rows] == CAPTIONS
    assert np.allclose([float(r["clip_score"]) for r in rows], want.numpy(), atol=1e-3)
    assert rel(got["clip_score"], want.mean().item()) <= 1e-2


@pytest.mark.parametrize("case,message", [
    ("empty", "no images"),
    ("one_reference", "1 reference image; FID and KID need at least 2"),
    ("missing_weights", "no such Inception weights file"),
    ("bad_weights", "not a PyTorch weights file"),
    ("not_clip", "not a transformers CLIP folder"),
    ("no_captions", "no caption for this image"),
    ("unknown_metric", "choose from fid, kid, clip"),
])
def test_bad_input_is_one_line_and_exit_2(case, message, generated, reference, tmp_path, capsys):
    empty, one, bert = tmp_path / "empty", tmp_path / "one", tmp_path / "bert"
    for d in (empty, one, bert):
        d.mkdir()
    drawn(0).save(one / "a.png")
    (bert / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    fid = ["--metrics", "fid", "--inception"]
    args = {"empty": ["--images", empty, "--reference", reference, *fid, tmp_path / "x.pth"],
            "one_reference": ["--images", generated, "--reference", one, *fid, tmp_path / "x.pth"],
            "missing_weights": ["--images", generated, "--reference", reference, *fid, tmp_path / "x.pth"],
            "bad_weights": ["--images", generated, "--reference", reference, *fid, tmp_path / "bad.pth"],
            "not_clip": ["--images", generated, "--metrics", "clip", "--clip-model", bert],
            "no_captions": ["--images", reference, "--metrics", "clip", "--clip-model", bert],
            "unknown_metric": ["--images", generated, "--metrics", "fid,is"]}[case]
    assert evaluate.main([str(a) for a in args] + ["--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()

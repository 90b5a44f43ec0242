"""python -m training.caption: a tiny random GIT built here (nothing downloaded) against transformers' own generate(),
skipping, --overwrite, --prefix, unreadable images, bad folders; the WD14 tag rule against hand-picked tags."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoModelForImageTextToText, AutoProcessor, BertTokenizer, CLIPImageProcessor, GitConfig,
                          GitForCausalLM, GitProcessor)

from training import caption
from training.data import DataWarning

WORDS = "a red green blue circle square on white black background photo of".split()


@pytest.fixture(scope="module")
def git_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("git")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    processor = GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                             tokenizer=BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}))
    cfg = GitConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=16), vocab_size=len(vocab), hidden_size=16,
                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                    bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    GitForCausalLM(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def reference_caption(folder, path) -> str:
    processor, model = AutoProcessor.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder)
    out = model.eval().generate(**processor(images=[Image.open(path).convert("RGB")], return_tensors="pt"),
                                max_new_tokens=6, do_sample=False)
    return processor.batch_decode(out, skip_special_tokens=True)[0]


def test_image_to_text_captions_skips_and_overwrites(git_folder, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    colours = {"a.png": "red", "sub/b.jpg": "blue", "c.png": "green"}
    for name, colour in colours.items():
        Image.new("RGB", (40, 28), colour).save(data / name)
    (data / "c.txt").write_text("mine")
    (data / "broken.png").write_bytes(b"not a png")
    args = ["--data_dir", str(data), "--model", str(git_folder), "--batch_size", "2", "--max_new_tokens", "6",
            "--prefix", "sks", "--device", "cpu"]
    with pytest.warns(DataWarning, match="broken.png: unreadable image skipped"):
        assert caption.main(args) == 0
    assert "captioned 2 images, 1 already captioned (skipped), 1 unreadable" in capsys.readouterr().out
    for name in ("a.png", "sub/b.jpg"):
        want = reference_caption(git_folder, data / name)
        assert want and (data / name).with_suffix(".txt").read_text() == f"sks, {want}\n"
    assert (data / "c.txt").read_text() == "mine"
    with pytest.warns(DataWarning):
        assert caption.main(args[:-4] + ["--overwrite", "--device", "cpu"]) == 0
    assert (data / "c.txt").read_text() == reference_caption(git_folder, data / "c.png") + "\n"


def test_not_a_captioner_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "no-such-model"}')
    for folder, message in (("empty", "not a captioner"), ("bad", "not an image-to-text model")):
        assert caption.main(["--data_dir", str(tmp_path / "data"), "--model", str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / folder}: {message}") and err.count("\n") == 1


def test_wd14_tag_rule_and_input():
    tags = [("general", "9"), ("sensitive", "9"), ("1girl", "0"), ("long_hair", "0"), ("^_^", "0"),
            ("red_eyes", "0"), ("hatsune_miku", "4"), ("kirby", "4")]
    probs = np.array([0.9, 0.1, 0.98, 0.35, 0.5, 0.34, 0.86, 0.84])
    # ratings out, general >= 0.35 (0.35 kept, 0.34 not), character >= 0.85, CSV order, kaomoji keep "_"
    assert caption.select_tags(probs, tags, 0.35, 0.85) == "1girl, long hair, ^_^, hatsune miku"
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    x = caption.to_tagger_input(img, 40)
    assert x.shape == (40, 40, 3) and x.dtype == np.float32
    assert x[20, 20].tolist() == [30, 20, 10]  # BGR
    assert x[0, 20].tolist() == x[39, 20].tolist() == [255, 255, 255]  # padded white above and below


def test_wd14_tagger_runs_a_session(tmp_path):
    """The tagger with a stand-in for onnxruntime's InferenceSession (onnxruntime is not in the test extra)."""
    class Input:
        name, shape = "input_1", [None, 8, 8, 3]

    class Session:
        def get_inputs(self):
            return [Input()]

        def run(self, outputs, feeds):
            self.fed = feeds["input_1"]
            return [np.array([[0.9, 0.2], [0.1, 0.95]])[: len(self.fed)]]

    (tmp_path / "selected_tags.csv").write_text("tag_id,name,category,count\n1,blue_sky,0,10\n2,cat,0,5\n")
    tagger = caption.Tagger(Session(), caption.read_tags(tmp_path / "selected_tags.csv"), 0.35, 0.85)
    assert tagger([Image.new("RGB", (16, 16)), Image.new("RGB", (4, 8))]) == ["blue sky", "cat"]
    assert tagger.session.fed.shape == (2, 8, 8, 3)

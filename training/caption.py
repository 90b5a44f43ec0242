"""Automatic captions: `python -m training.caption --data_dir D --model FOLDER [--overwrite] [--prefix P]
[--batch_size N]` writes `<image stem>.txt` beside every image under D (recursive) that has no caption yet.

The captioner is chosen by what FOLDER holds:
  * a transformers image-to-text model (BLIP, BLIP-2, GIT, ...: config.json and its processor files), run through the
    generic AutoProcessor + AutoModelForImageTextToText and greedy generate(): one sentence per image;
  * a WD14-style tagger (SmilingWolf's wd-*-tagger: model.onnx + selected_tags.csv) through onnxruntime (optional:
    pip install -e ".[caption]"): comma-separated tags as kohya's tag_images_by_wd14_tagger writes them by default. The
    image is padded to a white square, resized to the model's input side, fed as BGR 0..255 (N, H, W, 3); a general
    tag (category 0) is kept at probability >= --general_threshold, a character tag (4) at >= --character_threshold,
    in the CSV's order, ratings (9) left out; underscores become spaces in tags longer than 3 characters (not in
    kaomoji such as ^_^).
Unreadable images are warned about, counted and skipped; a FOLDER that is neither is one line and exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sdxl.weights import atomic_path
from training.captions import clean_caption, split_tags
from training.data import IMAGE_ERRORS, IMAGE_EXTENSIONS, DataWarning, load_image

RATING, GENERAL, CHARACTER = "9", "0", "4"  # selected_tags.csv categories


class CaptionError(ValueError):
    """A captioner folder or data folder that cannot be used; one line, exit code 2."""


class ImageToText:
    """A transformers image-to-text model: images -> one cleaned sentence each."""

    def __init__(self, folder: Path, device: str, max_new_tokens: int):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        try:
            self.processor = AutoProcessor.from_pretrained(folder)
            self.model = AutoModelForImageTextToText.from_pretrained(folder).to(device).eval()
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CaptionError(f"{folder}: not an image-to-text model ({first})") from None
        self.device, self.max_new_tokens = device, max_new_tokens

    def __call__(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [clean_caption(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def read_tags(path: Path) -> list[tuple[str, str]]:
    """selected_tags.csv -> [(name, category)] in file order (the model's output order)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise CaptionError(f"{path}: expected a tag_id,name,category,... header")
    return [(r[1], r[2]) for r in rows[1:]]


def select_tags(probs: np.ndarray, tags: list[tuple[str, str]], general: float, character: float) -> str:
    """One image's tag probabilities -> "tag, tag, ..." (see the module docstring for the rule)."""
    keep = [name for (name, cat), p in zip(tags, probs)
            if (cat == GENERAL and p >= general) or (cat == CHARACTER and p >= character)]
    return ", ".join(n.replace("_", " ") if len(n) > 3 else n for n in keep)


def to_tagger_input(img: Image.Image, side: int) -> np.ndarray:
    """RGB image -> (side, side, 3) float32 BGR in 0..255, padded to a white square (centered) then resized."""
    size = max(img.size)
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    square = square.resize((side, side), Image.Resampling.BOX if size > side else Image.Resampling.LANCZOS)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


class Tagger:
    """A WD14-style ONNX tagger: images -> comma-separated tags."""

    def __init__(self, session, tags: list[tuple[str, str]], general: float, character: float):
        self.session, self.tags, self.general, self.character = session, tags, general, character
        side = session.get_inputs()[0].shape[1]
        self.side = side if isinstance(side, int) else 448  # a dynamic input: the WD14 models' 448

    @classmethod
    def load(cls, folder: Path, general: float, character: float) -> Tagger:
        try:
            import onnxruntime
        except ImportError:
            raise CaptionError(f"{folder}: a WD14 tagger needs onnxruntime (pip install -e '.[caption]')") from None
        onnx = sorted(folder.glob("*.onnx"))[0]
        try:
            session = onnxruntime.InferenceSession(str(onnx), providers=onnxruntime.get_available_providers())
        except Exception as e:  # onnxruntime raises its own exception types for a broken file
            raise CaptionError(f"{onnx}: not a loadable ONNX model ({type(e).__name__})") from None
        return cls(session, read_tags(folder / "selected_tags.csv"), general, character)

    def __call__(self, images: list[Image.Image]) -> list[str]:
        batch = np.stack([to_tagger_input(img, self.side) for img in images])  # (N, H, W, 3)
        probs = self.session.run(None, {self.session.get_inputs()[0].name: batch})[0]
        return [select_tags(p, self.tags, self.general, self.character) for p in probs]


def load_captioner(folder: str | os.PathLike, args: argparse.Namespace):
    folder = Path(folder)
    if folder.is_dir() and any(folder.glob("*.onnx")) and (folder / "selected_tags.csv").is_file():
        return Tagger.load(folder, args.general_threshold, args.character_threshold)
    if (folder / "config.json").is_file():
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return ImageToText(folder, device, args.max_new_tokens)
    raise CaptionError(f"{folder}: not a captioner (expected config.json of a transformers image-to-text model, "
                       "or model.onnx + selected_tags.csv of a WD14 tagger)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="folder of images (searched recursively)")
    p.add_argument("--model", required=True, help="image-to-text model folder, or WD14 tagger folder")
    p.add_argument("--overwrite", action="store_true", help="also caption images that have a caption")
    p.add_argument("--prefix", default="", help="text put before every caption (e.g. a trigger word)")
    p.add_argument("--batch_size", type=int, default=8, help="images per model call")
    p.add_argument("--caption_extension", default=".txt", help="caption file extension")
    p.add_argument("--max_new_tokens", type=int, default=40, help="image-to-text: longest caption in tokens")
    p.add_argument("--general_threshold", type=float, default=0.35, help="tagger: general tag threshold")
    p.add_argument("--character_threshold", type=float, default=0.85, help="tagger: character tag threshold")
    p.add_argument("--device", default=None, help="image-to-text: torch device (default cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ext = "." + args.caption_extension.lstrip(".")
    try:
        if not os.path.isdir(args.data_dir) or args.batch_size < 1:
            raise CaptionError(f"{args.data_dir}: not a folder" if args.batch_size > 0 else "--batch_size must be >= 1")
        images = sorted(str(p) for p in Path(args.data_dir).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                        and not any(part.startswith(".") for part in p.parts))
        todo = [p for p in images if args.overwrite or not os.path.exists(os.path.splitext(p)[0] + ext)]
        captioner = load_captioner(args.model, args)
    except CaptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = unreadable = 0
    with tqdm(total=len(todo), desc="captioning") as bar:
        for start in range(0, len(todo), args.batch_size):
            paths, imgs = [], []
            for path in todo[start:start + args.batch_size]:
                try:
                    imgs.append(load_image(path)[0])
                    paths.append(path)
                except IMAGE_ERRORS as e:
                    unreadable += 1
                    warnings.warn(f"{path}: unreadable image skipped ({type(e).__name__}: {e})", DataWarning)
            for path, caption in zip(paths, captioner(imgs) if imgs else []):
                with atomic_path(os.path.splitext(path)[0] + ext) as tmp:
                    tmp.write_text(", ".join(split_tags(args.prefix) + ([caption] if caption else [])) + "\n",
                                   encoding="utf-8")
                written += 1
            bar.update(len(todo[start:start + args.batch_size]))
    print(f"captioned {written} images, {len(images) - len(todo)} already captioned (skipped), {unreadable} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())

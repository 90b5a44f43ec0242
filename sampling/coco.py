"""The output folder of generate.py: PNGs with their parameters, and a COCO captions file or prompts.txt.

Every PNG is written to a temporary name and renamed, so a PNG that exists is complete. The index
(annotations/captions.json or prompts.txt) is derived from the PNGs' own text chunks and rewritten atomically,
so a killed run loses only the images in flight and a rerun over the same folder skips what is done and never
duplicates an entry. One run at a time per folder.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

COCO = "coco"
SIMPLE = "simple"


@dataclass
class Record:
    index: int  # 0-based image index; COCO image id = index + 1
    file_name: str
    width: int
    height: int
    caption: str
    parameters: str = ""  # the PNG's A1111 `parameters` text


# Our sampler names as A1111 displays them (what civitai and image browsers parse); others are written as is.
A1111_SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "ddim": "DDIM",
                  "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE"}


def a1111_sampler(name: str) -> str:
    base = name.removesuffix("_karras")
    return A1111_SAMPLERS.get(base, base) + (" Karras" if base != name else "")


def a1111_parameters(prompt: str, negative: str | None, steps: int, sampler: str, cfg: float, seed: int,
                     width: int, height: int, model: str) -> str:
    """The `parameters` text A1111 writes (and civitai / image browsers read):

        <prompt>
        Negative prompt: <negative>            (only when there is one)
        Steps: 30, Sampler: Euler, CFG scale: 5, Seed: 0, Size: 1024x1024, Model: <name>
    """
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(f"Steps: {steps}, Sampler: {a1111_sampler(sampler)}, CFG scale: {cfg:g}, Seed: {seed}, "
                 f"Size: {width}x{height}, Model: {model}")
    return "\n".join(lines)


class ImageFolder:
    """`<out>/images/<12-digit id>.png` + `<out>/annotations/captions.json` (coco), or
    `<out>/<6-digit index>.png` + `<out>/prompts.txt` (simple)."""

    def __init__(self, out_dir: str | os.PathLike, fmt: str = COCO):
        if fmt not in (COCO, SIMPLE):
            raise ValueError(f"unknown output format {fmt!r}; known: {COCO}, {SIMPLE}")
        self.root, self.fmt = Path(out_dir), fmt
        self.image_dir = self.root / "images" if fmt == COCO else self.root
        self.records: dict[int, Record] = {}

    def file_name(self, index: int) -> str:
        return f"{index + 1:012d}.png" if self.fmt == COCO else f"{index:06d}.png"

    def path(self, index: int) -> Path:
        return self.image_dir / self.file_name(index)

    def _index_of(self, name: str) -> int | None:
        m = re.fullmatch(r"(\d{12})\.png" if self.fmt == COCO else r"(\d{6})\.png", name)
        if not m:
            return None
        return int(m.group(1)) - 1 if self.fmt == COCO else int(m.group(1))

    def scan(self) -> set[int]:
        """Indices already finished (their PNG exists); their records are read back from the PNGs' text chunks
        (PIL reads the chunks before the pixel data, so this does not decode images)."""
        done = set()
        if not self.image_dir.is_dir():
            return done
        for p in self.image_dir.iterdir():
            index = self._index_of(p.name)
            if index is None:
                continue
            try:
                with Image.open(p) as im:
                    text, size = im.text, im.size
            except OSError:
                continue  # unreadable: treat as not done, it will be made again
            if "caption" not in text:
                continue  # not written by us
            self.records[index] = Record(index, p.name, size[0], size[1], text["caption"],
                                         text.get("parameters", ""))
            done.add(index)
        return done

    @property
    def index_path(self) -> Path:
        return self.root / "annotations" / "captions.json" if self.fmt == COCO else self.root / "prompts.txt"

    def remove_partial(self) -> int:
        """Delete the temporary files a killed run left behind (never counted as images); returns how many."""
        stale = list(self.image_dir.glob("*.png.*.tmp")) if self.image_dir.is_dir() else []
        if self.index_path.parent.is_dir():
            stale += self.index_path.parent.glob(f"{self.index_path.name}.*.tmp")
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def save(self, index: int, image: Image.Image, caption: str, parameters: str) -> Record:
        info = PngInfo()
        info.add_text("parameters", parameters)  # tEXt, or iTXt when not Latin-1: as A1111 writes it
        info.add_text("caption", caption)
        path = self.path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name per process: a leftover worker of a killed run never races a new run for the same file.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
        rec = Record(index, path.name, image.width, image.height, caption, parameters)
        self.records[index] = rec
        return rec

    def add(self, rec: Record) -> None:
        self.records[rec.index] = rec

    def write_index(self) -> Path:
        """Rewrite captions.json / prompts.txt from the records, atomically."""
        recs = [self.records[i] for i in sorted(self.records)]
        path = self.index_path
        if self.fmt == COCO:
            now = datetime.datetime.now(datetime.timezone.utc)
            data = {
                "info": {"description": "Images generated by sdxl-mini generate.py", "url": "", "version": "1.0",
                         "year": now.year, "contributor": "", "date_created": now.isoformat(timespec="seconds")},
                "licenses": [],
                "images": [{"id": r.index + 1, "file_name": r.file_name, "width": r.width, "height": r.height}
                           for r in recs],
                "annotations": [{"id": r.index + 1, "image_id": r.index + 1, "caption": r.caption} for r in recs],
            }
            text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
        else:
            text = "".join(f"{r.file_name}\t{' '.join(r.caption.split())}\n" for r in recs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one a line, blank lines skipped) or a COCO captions JSON (its captions, in
    annotation order). Raises ValueError with one line naming the file on empty or undecodable input."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such prompt file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list) or not all(isinstance(a, dict) and "caption" in a for a in anns):
            raise ValueError(f"{path}: not a COCO captions file (needs annotations with captions)")
        prompts = [" ".join(str(a["caption"]).split()) for a in anns]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts

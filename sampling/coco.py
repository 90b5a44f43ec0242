"""The output folder of generate.py: PNGs with their parameters, and a COCO captions file or prompts.txt.

PNGs are written atomically (one that exists is complete) and the index is rebuilt from their text chunks, so a
rerun after a kill skips what is done and never duplicates an entry. One run at a time per folder. PngWriter saves
them on a thread of their own, so PNG encoding overlaps the next batch's denoising.
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdxl.weights import atomic_path

COCO, SIMPLE = "coco", "simple"  # the two folder layouts


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


def a1111_parameters(prompt: str, negative: str | None, steps: int, sampler: str, cfg: float, seed: int,
                     width: int, height: int, model: str, extra: dict | None = None) -> str:
    """The `parameters` text A1111 writes (civitai and image browsers read it): the prompt, "Negative prompt: ..."
    when there is one, "Steps: 30, Sampler: Euler, CFG scale: 5, Seed: 0, Size: 1024x1024, Model: <name>", then
    `extra` as ", Key: value" (e.g. "Denoising strength: 0.6, Refiner: <name>, Refiner switch at: 0.8")."""
    negative = f"\nNegative prompt: {negative}" if negative else ""
    base = sampler.removesuffix("_karras")
    sampler = A1111_SAMPLERS.get(base, base) + (" Karras" if base != sampler else "")
    more = "".join(f", {k}: {v:g}" if isinstance(v, float) else f", {k}: {v}" for k, v in (extra or {}).items())
    return (f"{prompt}{negative}\nSteps: {steps}, Sampler: {sampler}, CFG scale: {cfg:g}, "
            f"Seed: {seed}, Size: {width}x{height}, Model: {model}{more}")


class ImageFolder:
    """`<out>/images/<12-digit id>.png` + `<out>/annotations/captions.json` (coco), or
    `<out>/<6-digit index>.png` + `<out>/prompts.txt` (simple)."""

    def __init__(self, out_dir: str | os.PathLike, fmt: str = COCO):
        if fmt not in (COCO, SIMPLE):
            raise ValueError(f"unknown output format {fmt!r}; known: {COCO}, {SIMPLE}")
        self.root, self.fmt = Path(out_dir), fmt
        self.image_dir = self.root / "images" if fmt == COCO else self.root
        self.index_path = self.root / "annotations" / "captions.json" if fmt == COCO else self.root / "prompts.txt"
        self.records: dict[int, Record] = {}

    def path(self, index: int) -> Path:
        return self.image_dir / (f"{index + 1:012d}.png" if self.fmt == COCO else f"{index:06d}.png")

    def scan(self) -> set[int]:
        """Indices already finished (their PNG exists); their records are read back from the PNGs' text chunks
        (PIL reads the chunks before the pixel data, so this does not decode images)."""
        name = r"(\d{12})\.png" if self.fmt == COCO else r"(\d{6})\.png"
        for p in self.image_dir.iterdir() if self.image_dir.is_dir() else ():
            if not (m := re.fullmatch(name, p.name)):
                continue
            index = int(m[1]) - (self.fmt == COCO)  # COCO ids start at 1
            try:
                with Image.open(p) as im:
                    text, size = im.text, im.size
            except OSError:
                continue  # unreadable: treat as not done, it will be made again
            if "caption" in text:  # else not written by us
                self.records[index] = Record(index, p.name, *size, text["caption"], text.get("parameters", ""))
        return set(self.records)

    def remove_partial(self) -> None:
        """Delete the temporary files a killed run left behind (never counted as images)."""
        for p in [*self.image_dir.glob("*.png.*.tmp"), *self.index_path.parent.glob(f"{self.index_path.name}.*.tmp")]:
            p.unlink(missing_ok=True)

    def save(self, index: int, image: Image.Image, caption: str, parameters: str) -> Record:
        info = PngInfo()
        info.add_text("parameters", parameters)  # tEXt, or iTXt when not Latin-1: as A1111 writes it
        info.add_text("caption", caption)
        path = self.path(index)
        with atomic_path(path) as tmp:  # <name>.<pid>.tmp: a killed run's leftover worker never races this one
            image.save(tmp, format="PNG", pnginfo=info)
        self.records[index] = Record(index, path.name, image.width, image.height, caption, parameters)
        return self.records[index]

    def write_index(self) -> Path:
        """Rewrite captions.json / prompts.txt from the records, atomically."""
        recs = [self.records[i] for i in sorted(self.records)]
        if self.fmt == COCO:
            now = datetime.datetime.now(datetime.timezone.utc)
            data = {"info": {"description": "Images generated by sdxl-mini generate.py", "url": "", "version": "1.0",
                             "year": now.year, "contributor": "", "date_created": now.isoformat(timespec="seconds")},
                    "licenses": [],
                    "images": [{"id": r.index + 1, "file_name": r.file_name, "width": r.width, "height": r.height}
                               for r in recs],
                    "annotations": [{"id": r.index + 1, "image_id": r.index + 1, "caption": r.caption} for r in recs]}
            text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
        else:
            text = "".join(f"{r.file_name}\t{' '.join(r.caption.split())}\n" for r in recs)
        with atomic_path(self.index_path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return self.index_path


class PngWriter:
    """Saves an ImageFolder's PNGs on one thread (zlib releases the GIL), so encoding overlaps the next batch's
    denoising. put([(index, image, caption, parameters), ...]) queues a batch, blocking while `depth` batches wait;
    on_saved(records) runs on the thread once a batch is on disk. An error in the thread is raised in the caller by
    the next put or by close (the thread drains the queue meanwhile, so the caller never hangs). Used as a context
    manager, exit waits for the queued batches; a killed run loses them as it loses any image in flight."""

    def __init__(self, folder: ImageFolder, on_saved=None, depth: int = 2):
        self.folder, self.on_saved = folder, on_saved
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="png-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (items := self.queue.get()) is not None:
            if self.error is None:  # after an error, only drain
                try:
                    records = [self.folder.save(*item) for item in items]
                    if self.on_saved is not None:
                        self.on_saved(records)
                except BaseException as e:
                    self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, items: list) -> None:
        self._raise()
        self.queue.put(items)

    def close(self) -> None:
        """Wait until every queued batch is saved; raise the thread's error if there was one."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self._raise()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        elif self.thread.is_alive():  # an error here: save what is queued, let the caller's error through
            self.queue.put(None)
            self.thread.join()


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one a line, blank lines skipped) or a COCO captions JSON (its captions, in
    annotation order); a one-line ValueError naming the file on empty or undecodable input."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such prompt file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    prompts = [line.strip() for line in text.splitlines()]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list) or not all(isinstance(a, dict) and "caption" in a for a in anns):
            raise ValueError(f"{path}: not a COCO captions file (needs annotations with captions)")
        prompts = [" ".join(str(a["caption"]).split()) for a in anns]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts

"""Sharding generation over devices: one worker process per GPU (or CPU processes when there is none).

Image i always uses prompt i mod P and seed + i, and batches have fixed boundaries (images kB .. kB+B-1), so
which worker makes a batch changes nothing in its pixels: the output does not depend on the device count.
Workers write their PNGs themselves and report records to the parent, which drives one progress bar and the
index file.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import traceback
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .coco import ImageFolder, Record, a1111_parameters


@dataclass
class Settings:
    """Everything a worker needs, picklable."""
    model: str
    out_dir: str
    fmt: str = "coco"
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str | None = None
    seed: int = 0
    height: int = 1024
    width: int = 1024
    steps: int = 30
    cfg_scale: float = 5.0
    sampler: str = "euler"
    batch_size: int = 1
    precision: str = "bf16"
    vae: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    model_name: str = "sdxl"

    def prompt(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_for_generation(s: Settings, device: str | torch.device):
    import sdxl
    model = sdxl.load_model(s.model, device=device, dtype=DTYPES[s.precision], vae=s.vae)
    for path, scale in s.loras:
        model.load_lora(path, scale)
    return model


def plan_batches(pending: list[int], batch_size: int) -> list[list[int]]:
    """Pending image indices grouped by fixed batch boundaries (index // batch_size)."""
    groups: dict[int, list[int]] = {}
    for i in sorted(pending):
        groups.setdefault(i // batch_size, []).append(i)
    return list(groups.values())


def make_batch(model, s: Settings, folder: ImageFolder, batch: list[int]) -> list[Record]:
    from .pipeline import generate
    prompts = [s.prompt(i) for i in batch]
    images = generate(model, prompts, s.negative_prompt, height=s.height, width=s.width, steps=s.steps,
                      guidance_scale=s.cfg_scale, sampler=s.sampler, seed=[s.seed + i for i in batch])
    return [folder.save(i, im, p, a1111_parameters(p, s.negative_prompt, s.steps, s.sampler, s.cfg_scale,
                                                     s.seed + i, s.width, s.height, s.model_name))
            for i, im, p in zip(batch, images, prompts)]


def _worker(rank: int, device: str, threads: int, s: Settings, batches: list[list[int]], results) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        model = load_for_generation(s, device)
        folder = ImageFolder(s.out_dir, s.fmt)
        for batch in batches:
            for rec in make_batch(model, s, folder, batch):
                results.put(("record", rec))
        results.put(("done", rank))
    except BaseException as e:  # report, then let the parent fail with the message
        results.put(("error", f"worker {rank} on {device}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def devices_for(num_workers: int) -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(num_workers)]
    return ["cpu"] * num_workers


def run(s: Settings, pending: list[int], folder: ImageFolder, num_workers: int, total: int) -> None:
    """Make the `pending` images with `num_workers` processes (in this process when 1)."""
    batches = plan_batches(pending, s.batch_size)
    bar = tqdm(total=total, initial=total - len(pending), unit="img", desc="generating", dynamic_ncols=True)
    try:
        if num_workers <= 1 or len(batches) <= 1:
            model = load_for_generation(s, devices_for(1)[0])
            for batch in batches:
                for rec in make_batch(model, s, folder, batch):
                    folder.add(rec)
                    bar.update(1)
                folder.write_index()
            return
        devices = devices_for(num_workers)
        threads = 0 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // num_workers)
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, devices[r], threads, s, batches[r::num_workers], results),
                             daemon=True) for r in range(num_workers)]
        for p in procs:
            p.start()
        running = len(procs)
        try:
            while running:
                try:
                    kind, payload = results.get(timeout=5)
                except queue_mod.Empty:
                    if not any(p.is_alive() for p in procs):
                        raise RuntimeError("a generation worker died without reporting") from None
                    continue
                if kind == "record":
                    folder.add(payload)
                    bar.update(1)
                    if bar.n % max(1, s.batch_size) == 0:
                        folder.write_index()
                elif kind == "done":
                    running -= 1
                else:
                    raise RuntimeError(payload)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
    finally:
        bar.close()
        folder.write_index()

"""Sharding generation over devices: one worker process per GPU (or CPU processes when there is none).

Image i always uses prompt i mod P and seed + i, and batches have fixed boundaries (images kB .. kB+B-1, always
made whole, even when only some of them are missing), so which worker makes a batch, and whether the run was
resumed, changes nothing in the pixels: the output depends on the batch size but not on the device count.
Workers write their PNGs themselves and report records to the parent, which drives one progress bar and the
index file.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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

    def parameters(self, index: int) -> str:
        """The A1111 `parameters` text of image `index`."""
        return a1111_parameters(self.prompt(index), self.negative_prompt, self.steps, self.sampler, self.cfg_scale,
                                self.seed + index, self.width, self.height, self.model_name)


class LoadError(ValueError):
    """The model, VAE or a LoRA cannot be loaded, or does not fit the settings; one line naming the file."""


class WorkerError(RuntimeError):
    """A worker process failed while generating; the message holds its traceback."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_pixel_model(name: str) -> bool:
    """A pixel-space SDXL (`sdxl.patch_codec`): a folder with a pixel_config.json, or a pixel preset name."""
    from sdxl.config import PRESETS
    p = Path(name)
    if p.is_file() or (name in PRESETS and not p.exists()) or (p.is_dir() and not (p / "pixel_config.json").is_file()):
        return False  # latent models never import the pixel code
    from sdxl.patch_codec import PIXEL_PRESETS, is_pixel_folder
    return is_pixel_folder(p) if p.is_dir() else name in PIXEL_PRESETS


def load_for_generation(s: Settings, device: str | torch.device):
    """The model with its LoRAs merged, checked against the image size and sampler; any failure is a LoadError."""
    import sdxl
    try:
        if is_pixel_model(s.model):
            from sdxl.patch_codec import load_pixel_model

            from .pixel import PIXEL_SAMPLERS
            if s.vae or s.loras:
                raise ValueError(f"{s.model}: a pixel-space model takes no --vae or LoRA")
            if s.sampler not in PIXEL_SAMPLERS:
                raise ValueError(f"sampler {s.sampler!r} does not apply to a pixel model; known: "
                                 f"{', '.join(PIXEL_SAMPLERS)}")
            torch.manual_seed(0)  # a preset's random weights, the same in every worker (as sdxl.load_model's)
            model = load_pixel_model(s.model, device=device, dtype=DTYPES[s.precision])
            m = model.config.size_multiple
            if s.height % m or s.width % m:
                raise ValueError(f"image size {s.width}x{s.height} must be multiples of {m} for {s.model} "
                                 f"(patch {model.config.patch_size} times the body's downsampling)")
            return model
        from .pipeline import check_size
        model = sdxl.load_model(s.model, device=device, dtype=DTYPES[s.precision], vae=s.vae)
        for path, scale in s.loras:
            model.load_lora(path, scale)
        check_size(model, s.height, s.width)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise LoadError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if s.precision == "fp16" and model.config.vae.force_upcast:
        model.vae.float()  # the stock SDXL VAE overflows in fp16 (as the reference pipeline, decode in fp32)
    return model


def plan_batches(pending: list[int], batch_size: int, total: int) -> list[list[int]]:
    """The whole fixed-boundary batches (k*B .. k*B+B-1, cut at `total`) that hold a pending index."""
    starts = sorted({i // batch_size * batch_size for i in pending})
    return [list(range(k, min(k + batch_size, total))) for k in starts]


def make_batch(model, s: Settings, folder: ImageFolder, batch: list[int], todo: set[int]) -> list[Record]:
    """Generate the whole `batch` (so its pixels do not depend on what was already done); save those in `todo`."""
    if getattr(model, "is_pixel", False):
        from .pixel import generate_pixel as fn
    else:
        from .pipeline import generate as fn
    images = fn(model, [s.prompt(i) for i in batch], s.negative_prompt, height=s.height, width=s.width, steps=s.steps,
                guidance_scale=s.cfg_scale, sampler=s.sampler, seed=[s.seed + i for i in batch])
    return [folder.save(i, im, s.prompt(i), s.parameters(i)) for i, im in zip(batch, images) if i in todo]


def _batches(model, s: Settings, folder: ImageFolder, batches: list[list[int]], todo: set[int],
             stop=lambda: False) -> Iterator[list[Record]]:
    for batch in batches:
        if stop():
            return
        yield make_batch(model, s, folder, batch, todo)


def _worker(rank: int, device: str, threads: int, s: Settings, batches: list[list[int]], todo: set[int],
            results) -> None:
    try:
        torch.set_num_threads(threads)  # processes share the cores: no oversubscription
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        try:
            model = load_for_generation(s, device)
        except LoadError as e:
            results.put(("load_error", str(e)))
            return
        results.put(("ready", rank))
        # A parent killed with SIGKILL cannot stop us: stop by ourselves after the batch in flight.
        parent = mp.parent_process()
        stop = (lambda: not parent.is_alive()) if parent is not None else (lambda: False)
        for records in _batches(model, s, ImageFolder(s.out_dir, s.fmt), batches, todo, stop):
            results.put(("batch", records))
        if stop():
            results.cancel_join_thread()  # nobody reads the queue any more: do not wait to flush it at exit
            return
        results.put(("done", rank))
    except BaseException as e:  # report, then let the parent fail with the message
        results.put(("error", f"worker {rank} on {device}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def devices_for(num_workers: int) -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(num_workers)]
    return ["cpu"] * num_workers


def run(s: Settings, pending: list[int], folder: ImageFolder, num_workers: int, total: int) -> None:
    """Make the `pending` images with `num_workers` processes (in this process when 1), rewriting the index
    after each batch. Raises LoadError (before any image is made) when the model cannot be loaded."""
    todo = set(pending)
    batches = plan_batches(pending, s.batch_size, total)
    num_workers = min(num_workers, len(batches))
    done = len(folder.records)
    if num_workers <= 1:
        model = load_for_generation(s, devices_for(1)[0])
        with tqdm(total=total, initial=done, unit="img", desc="generating", dynamic_ncols=True) as bar:
            for records in _batches(model, s, folder, batches, todo):
                bar.update(len(records))
                folder.write_index()
        return

    devices = devices_for(num_workers)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cpus // num_workers)
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, devices[r], threads, s, batches[r::num_workers], todo, results))
             for r in range(num_workers)]
    for p in procs:
        p.start()
    bar, ready, finished = None, 0, 0
    try:
        while finished < num_workers:
            try:
                kind, payload = results.get(timeout=1)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerError(f"worker {dead[0][0]} died (exit code {dead[0][1]})") from None
                if not any(p.is_alive() for p in procs):
                    raise WorkerError("the generation workers exited without reporting") from None
                continue
            if kind == "ready":
                ready += 1
                if ready == num_workers:  # the bar starts once every model is loaded: a load error stays one line
                    bar = tqdm(total=total, initial=done, unit="img", desc="generating", dynamic_ncols=True)
            elif kind == "batch":
                for rec in payload:
                    folder.add(rec)
                done += len(payload)
                if bar is not None:
                    bar.update(len(payload))
                folder.write_index()
            elif kind == "done":
                finished += 1
            elif kind == "load_error":
                raise LoadError(payload)
            else:
                raise WorkerError(payload)
    finally:
        if bar is not None:
            bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()

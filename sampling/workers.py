"""Sharding generation over devices: one worker process per GPU (or CPU processes when there is none).

Image i uses prompt i mod P and seed + i, and batches have fixed boundaries (images kB .. kB+B-1, always made whole),
so neither the device count nor a resume changes the pixels. Workers write their PNGs (on a writer thread, while the
next batch denoises) and report records to the parent, which drives the progress bar and the index file. Under
torchrun (any number of nodes) rank r of W makes batches r, r + W, ... of the same plan (run_distributed).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .coco import ImageFolder, PngWriter, a1111_parameters
from sdxl.config import DTYPES


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
    init_images: list[str] = field(default_factory=list)  # prompt k's init image: init_images[k mod len]
    masks: list[str] = field(default_factory=list)  # the same for masks (white = repaint)
    strength: float = 0.6
    refiner: str | None = None
    refiner_switch: float = 0.8
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    prompt_weighting: bool = False
    controlnet: str | None = None  # a ControlNet folder or file, steering the model with control_images
    control_images: list[str] = field(default_factory=list)  # prompt k's: control_images[k mod len]
    controlnet_scale: float = 1.0
    control_guidance: tuple[float, float] = (0.0, 1.0)  # the fraction of the steps it acts on
    compile: str | None = None  # torch.compile scope of the UNets (sdxl.unet.compile_unet): unet | blocks

    def prompt(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def image(self, files: list[str], index: int) -> str | None:
        """Image `index`'s file of `files` (init images or masks): its prompt's, in turn when fewer."""
        return files[index % len(self.prompts) % len(files)] if files else None

    def parameters(self, index: int) -> str:
        """The A1111 `parameters` text of image `index`, with the options beyond text-to-image that are used."""
        init, mask = self.image(self.init_images, index), self.image(self.masks, index)
        extra = {"Denoising strength": self.strength, "Init image": Path(init).name} if init else {}
        if mask:
            extra["Mask"] = Path(mask).name
        if self.refiner:
            extra |= {"Refiner": Path(self.refiner).stem, "Refiner switch at": self.refiner_switch}
        if (self.aesthetic_score, self.negative_aesthetic_score) != (6.0, 2.5):
            extra |= {"Aesthetic score": self.aesthetic_score,
                      "Negative aesthetic score": self.negative_aesthetic_score}
        if self.prompt_weighting:
            extra["Emphasis"] = "Original"
        if self.controlnet:  # A1111's sd-webui-controlnet key
            extra["ControlNet 0"] = (f'"Model: {Path(self.controlnet).stem}, Image: '
                                     f'{Path(self.image(self.control_images, index)).name}, Weight: '
                                     f'{self.controlnet_scale:g}, Guidance Start: {self.control_guidance[0]:g}, '
                                     f'Guidance End: {self.control_guidance[1]:g}"')
        return a1111_parameters(self.prompt(index), self.negative_prompt, self.steps, self.sampler, self.cfg_scale,
                                self.seed + index, self.width, self.height, self.model_name, extra)


class LoadError(ValueError):
    """The model, VAE or a LoRA cannot be loaded, or does not fit the settings; one line naming the file."""


class WorkerError(RuntimeError):
    """A worker process failed while generating; the message holds its traceback."""




def load_for_generation(s: Settings, device: str | torch.device):
    """(model with its LoRAs merged, refiner or None, ControlNet or None), checked against the image size, sampler
    and each other; any failure is a LoadError."""
    import sdxl
    from sdxl.unet import compile_unet

    from .pipeline import check_refiner
    try:
        model = sdxl.load_model(s.model, device=device, dtype=DTYPES[s.precision], vae=s.vae)
        for path, scale in s.loras:
            model.load_lora(path, scale)
        model.space(s.height, s.width)
        model.sampling(s.sampler, s.steps)
        refiner = sdxl.load_model(s.refiner, device=device, dtype=DTYPES[s.precision]) if s.refiner else None
        if refiner is not None:
            try:
                check_refiner(model, refiner, s.height, s.width, s.sampler, s.steps)
            except ValueError as e:
                raise ValueError(f"{s.refiner}: {e}") from None
        for m in (model, refiner) if s.compile else ():  # after the LoRAs are merged; traced at the first batch
            if m is not None:
                compile_unet(m.unet, s.compile)
        controlnet = sdxl.load_controlnet(s.controlnet, device, DTYPES[s.precision], model.unet.config) \
            if s.controlnet else None
        if controlnet is not None:
            controlnet.check_unet(model.unet, s.controlnet)  # a pixel model, or a ControlNet for another UNet
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise LoadError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return model, refiner, controlnet


def plan_batches(pending: list[int], batch_size: int, total: int) -> list[list[int]]:
    """The whole fixed-boundary batches (k*B .. k*B+B-1, cut at `total`) that hold a pending index."""
    starts = sorted({i // batch_size * batch_size for i in pending})
    return [list(range(k, min(k + batch_size, total))) for k in starts]


def make_batch(models, s: Settings, writer: PngWriter, batch: list[int], todo: set[int]) -> None:
    """Generate the whole `batch` (so its pixels do not depend on what was already done); queue those in `todo`
    for saving. `models`: what load_for_generation returned."""
    from PIL import Image

    from .pipeline import generate

    def read(files: list[str], mode: str):  # each image of the batch its own (the file closed once read)
        if not files:
            return None
        out = []
        for i in batch:
            with Image.open(s.image(files, i)) as im:
                out.append(im.convert(mode))
        return out
    model, refiner, controlnet = models
    images = generate(model, [s.prompt(i) for i in batch], s.negative_prompt, height=s.height, width=s.width,
                      steps=s.steps, guidance_scale=s.cfg_scale, sampler=s.sampler, seed=[s.seed + i for i in batch],
                      init_image=read(s.init_images, "RGB"), strength=s.strength, mask_image=read(s.masks, "L"),
                      refiner=refiner, refiner_switch=s.refiner_switch, aesthetic_score=s.aesthetic_score,
                      negative_aesthetic_score=s.negative_aesthetic_score, prompt_weighting=s.prompt_weighting,
                      controlnet=controlnet, control_image=read(s.control_images, "RGB"),
                      controlnet_scale=s.controlnet_scale, control_guidance_start=s.control_guidance[0],
                      control_guidance_end=s.control_guidance[1])
    writer.put([(i, im, s.prompt(i), s.parameters(i)) for i, im in zip(batch, images) if i in todo])


def generate_batches(models, s: Settings, folder: ImageFolder, batches: list[list[int]], todo: set[int],
                     on_saved, stop=lambda: False) -> None:
    """Make `batches` in order while a PngWriter saves the previous ones; on_saved(records) runs on its thread after
    each batch is on disk. `stop()` is asked before each batch."""
    with PngWriter(folder, on_saved) as writer:
        for batch in batches:
            if stop():
                break
            make_batch(models, s, writer, batch, todo)


def _progress(folder: ImageFolder, total: int) -> tqdm:
    return tqdm(total=total, initial=len(folder.records), unit="img", desc="generating", dynamic_ncols=True)


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
        folder, parent = ImageFolder(s.out_dir, s.fmt), mp.parent_process()
        generate_batches(model, s, folder, batches, todo, lambda records: results.put(("batch", records)),
                         stop=lambda: not parent.is_alive())
        if not parent.is_alive():
            results.cancel_join_thread()  # nobody reads the queue any more: do not wait to flush it at exit
            return
        results.put(("done", rank))
    except BaseException as e:  # report, then let the parent fail with the message
        results.put(("error", f"worker {rank} on {device}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run(s: Settings, pending: list[int], folder: ImageFolder, num_workers: int, total: int) -> None:
    """Make the `pending` images with `num_workers` processes (in this process when 1), rewriting the index
    after each batch. Raises LoadError (before any image is made) when the model cannot be loaded."""
    todo = set(pending)
    batches = plan_batches(pending, s.batch_size, total)
    num_workers = max(1, min(num_workers, len(batches)))
    devices = [f"cuda:{i}" for i in range(num_workers)] if torch.cuda.is_available() else ["cpu"] * num_workers
    if num_workers == 1:
        model = load_for_generation(s, devices[0])
        with _progress(folder, total) as bar:
            def saved(records):  # on the writer thread, the only one that touches the folder meanwhile
                bar.update(len(records))
                folder.write_index()
            generate_batches(model, s, folder, batches, todo, saved)
        return

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
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0):
                        raise WorkerError(f"worker {r} died (exit code {p.exitcode})") from None
                if not any(p.is_alive() for p in procs):
                    raise WorkerError("the generation workers exited without reporting") from None
                continue
            if kind == "ready":
                ready += 1
                if ready == num_workers:  # the bar starts once every model is loaded: a load error stays one line
                    bar = _progress(folder, total)
            elif kind == "batch":
                folder.records.update({rec.index: rec for rec in payload})
                if bar is not None:
                    bar.update(len(payload))
                folder.write_index()
            elif kind == "done":
                finished += 1
            else:
                raise (LoadError if kind == "load_error" else WorkerError)(payload)
    finally:
        if bar is not None:
            bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def run_distributed(s: Settings, pending: list[int], folder: ImageFolder, total: int, d) -> None:
    """torchrun: this rank (`d`, a training.distributed.Dist) makes batches rank, rank + W, ... of the one-process
    plan on its device, so every image is the one a single process makes. A model that some rank cannot load is
    a LoadError on every rank, before any image is made. After a barrier rank 0 writes the index from the PNGs on
    disk, once: the index of the whole run (a killed run's index is repaired by the next run, as on one node)."""
    from training import distributed
    todo = set(pending)
    batches = plan_batches(pending, s.batch_size, total)[d.rank::d.world_size]
    try:
        model, error = load_for_generation(s, d.device), None
    except LoadError as e:
        model, error = None, str(e)
    errors = [e for e in distributed.gather_objects(error, d) if e]
    if errors:
        raise LoadError(errors[0])
    mine = sum(i in todo for batch in batches for i in batch)
    with tqdm(total=mine, unit="img", desc=f"generating (rank 0 of {d.world_size})", dynamic_ncols=True,
              disable=not d.is_main) as bar:
        generate_batches(model, s, folder, batches, todo, lambda records: bar.update(len(records)))
    distributed.barrier(d)
    if d.is_main:
        folder.scan()
        folder.write_index()

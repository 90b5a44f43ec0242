"""Held-out validation loss (--validation_split F | --validation_data_dir DIR, every --validation_every steps).

The training loss of a step is noisy (other images, other noise, other timesteps every step); this one is not: a fixed
set of (image, noise, timestep) triples, evaluated with the live weights (not the EMA) and no gradients. Each
held-out image is center-cropped to its bucket, unflipped, with its caption as written (the prefix added, never
shuffled or dropped), and its noise and timestep come from a generator seeded by its position alone, drawn by the
training objective itself (the same timestep range, bias and loss weights). So the value depends only on the
weights: the same after a resume, on any number of processes (every rank evaluates every triple), and comparable
between runs with the same objective. The split (training/data.py split_holdout) uses a fixed seed too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Iterator

import torch

from training.captions import CaptionConfig
from training.data import BucketDataset, DataStats, collate, open_dataset


def triple_seed(position: int) -> int:
    """The seed of held-out image `position`'s noise and timestep (63 bits, fixed)."""
    return int.from_bytes(hashlib.blake2b(f"validation:{position}".encode(), digest_size=8).digest(), "little") >> 1


class ValidationSet:
    """The held-out images as batches of up to `batch_size` from one bucket each, in a fixed order."""

    def __init__(self, ds: BucketDataset, batch_size: int, source: str):
        self.ds, self.source = ds, source
        order = sorted(range(len(ds)), key=lambda i: (ds.bucket_ids[i], i))
        self.groups = [list(g) for _, g in itertools.groupby(order, key=lambda i: ds.bucket_ids[i])]
        self.batches_of = [g[i:i + batch_size] for g in self.groups for i in range(0, len(g), batch_size)]

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self) -> Iterator[dict]:
        for idx in self.batches_of:
            yield collate([self.ds[i] for i in idx])

    def describe(self, every: int) -> str:
        return (f"validation: {len(self)} held-out images ({self.source}), fixed noise and timesteps, loss every "
                f"{every} steps and at the end")


def open_validation(cfg, ds, options: dict, masked: bool) -> ValidationSet | None:
    """The validation set of --validation_split (the dataset's held-out records) or --validation_data_dir;
    `options`: the run's dataset options, of which the buckets and size floor apply (no random crop, flip or caption
    changes)."""
    if cfg.validation_split is None and cfg.validation_data_dir is None:
        return None
    options = {**options, "random_crop": False, "flip_aug": False, "seed": 0, "stats": DataStats(),
               "caption_config": CaptionConfig(prefix=options["caption_config"].prefix)}
    if cfg.validation_split is not None:
        records, source = ds.held_out, f"--validation_split {cfg.validation_split}"
    else:
        records, source = open_dataset(cfg.validation_data_dir, alpha_mask=cfg.alpha_mask, **options).records, \
            cfg.validation_data_dir
    # each image once (no repeats) in one plain subset (no flips, no caption shuffles)
    records = [dataclasses.replace(r, subset=0) for r in {r.path: r for r in records}.values()]
    held = BucketDataset(records, with_masks=masked, with_conditioning=cfg.controlnet, source=source, **options)
    return ValidationSet(held, cfg.batch_size, source)


@torch.no_grad()
def validation_loss(trainee: torch.nn.Module, objective, vset: ValidationSet, inputs: Callable[[dict], dict],
                    device: torch.device, autocast) -> float:
    """The mean per-image loss of the fixed triples: `trainee` (unwrapped: no DDP hooks) in eval mode, `inputs`
    turning a batch into its keyword arguments (the training step's batch_inputs)."""
    was = trainee.training
    trainee.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in vset.batches():
            gens = [torch.Generator(device).manual_seed(triple_seed(int(i))) for i in batch["index"]]
            with autocast() if autocast is not None else contextlib.nullcontext():
                total += trainee(objective, generators=gens, **inputs(batch)).double().sum()
    finally:
        trainee.train(was)
    return total.item() / len(vset)

"""The built-in demo data set, drawn on the fly: "a red circle on a white background", 6 colours x 3 shapes x 3
backgrounds, 12 of the 54 held out of training (each colour still seen with every shape and background), so the demo
measures whether a model composes words it never saw together (`colour_adherence`: shapes in the prompted colour).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

COLOURS = {"red": (230, 25, 25), "green": (30, 160, 40), "blue": (30, 70, 230), "yellow": (245, 220, 20),
           "purple": (150, 50, 190), "orange": (250, 140, 20)}  # name -> RGB
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


@dataclass(frozen=True)
class Combo:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def held_out_combos() -> list[Combo]:
    """Two per colour: colour i with shape (i + j) mod 3 on background (i + 2j + 1) mod 3, j = 0, 1."""
    colours, bgs = list(COLOURS), list(BACKGROUNDS)
    return [Combo(colours[i], SHAPES[(i + j) % 3], bgs[(i + 2 * j + 1) % 3]) for i in range(6) for j in (0, 1)]


def train_combos() -> list[Combo]:
    held = set(held_out_combos())
    return [c for c in itertools.starmap(Combo, itertools.product(COLOURS, SHAPES, BACKGROUNDS)) if c not in held]


def draw(combo: Combo, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: the shape at a random place and scale."""
    img = np.full((size, size, 3), BACKGROUNDS[combo.background], np.uint8)
    r = rng.uniform(0.2, 0.3) * size  # half the shape's extent: 40% to 60% of the side
    centre = rng.uniform(r + 1, size - r - 1, 2)  # (y, x)
    dy, dx = np.mgrid[:size, :size] + 0.5 - centre[:, None, None]  # pixel centres relative to the shape's
    masks = {"circle": dy**2 + dx**2 <= r**2, "square": (np.abs(dy) <= r) & (np.abs(dx) <= r),
             "triangle": (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)}  # base at dy = r, apex at -r
    img[masks[combo.shape]] = COLOURS[combo.colour]
    return img


class DemoStream:
    """The demo's endless training batches, resumable: batch k of a rank is a function of (seed, rank, k) alone. As
    the folder datasets collate: pixels (B, 3, H, W) in [-1, 1], caption ("" w.p. caption_dropout), time_ids (B, 6)."""
    epoch = 0  # endless: no epochs

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, caption_dropout: float = 0.0):
        self.combos, self.size, self.batch_size = train_combos(), size, batch_size
        self.seed, self.rank, self.caption_dropout, self.k = seed, rank, caption_dropout, 0

    def state_dict(self) -> dict:
        return {"batch": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = state["batch"]

    def __iter__(self):
        s = self.size
        while True:
            rng = np.random.default_rng([self.seed, self.rank, self.k])
            picks = [self.combos[i] for i in rng.integers(len(self.combos), size=self.batch_size)]
            arr = np.stack([draw(c, s, rng) for c in picks])  # (B, H, W, 3)
            caps = ["" if rng.random() < self.caption_dropout else c.caption for c in picks]
            self.k += 1
            yield {"pixels": torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1,  # -> (B, 3, H, W)
                   "caption": caps, "time_ids": torch.tensor([[s, s, 0, 0, s, s]] * len(caps), dtype=torch.float32)}


def demo_evaluation(model, out, size: int, steps: int, cfg_scale: float, sampler: str, seed: int,
                    seeds_per_combo: int = 8) -> float:
    """Each held-out caption `seeds_per_combo` times: write <out>/samples.png (a row per caption), return adherence."""
    from sampling.pipeline import generate
    combos = [c for c in held_out_combos() for _ in range(seeds_per_combo)]
    images = generate(model, [c.caption for c in combos], None, size, size, steps=steps, guidance_scale=cfg_scale,
                      sampler=sampler, seed=seed)
    grid = Image.new("RGB", (size * seeds_per_combo, size * len(combos) // seeds_per_combo), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % seeds_per_combo) * size, (i // seeds_per_combo) * size))
    grid.save(out / "samples.png")
    return colour_adherence(images, combos)


def shape_colour(image: np.ndarray, background: str, threshold: float = 60.0) -> str | None:
    """The nearest of COLOURS to the mean of the shape's pixels: those farther from the background than `threshold`
    and than half the farthest (a blurry sample's blended edges must not shift the mean); None under 1% (no shape)."""
    img = image.astype(np.float64).reshape(-1, 3)
    dist = np.linalg.norm(img - np.array(BACKGROUNDS[background]), axis=1)
    far = dist > max(threshold, 0.5 * dist.max())
    if far.sum() < 0.01 * len(img):
        return None
    mean = img[far].mean(axis=0)
    return min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))


def colour_adherence(images, combos: list[Combo]) -> float:
    """Share of images (PIL or (H, W, 3) uint8 arrays) whose shape has the colour their combo names."""
    hits = [shape_colour(np.asarray(im), c.background) == c.colour for im, c in zip(images, combos, strict=True)]
    return sum(hits) / len(hits)

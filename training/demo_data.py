"""The built-in demo data set: a shape in one of six colours on a plain background, drawn on the fly.

Captions read "a red circle on a white background": 6 colours x 3 shapes x 3 backgrounds = 54 combinations, 12 of
them held out of training (two per colour, each colour still seen with every shape and background elsewhere), so
the demo measures whether a model composes words it never saw together. `colour_adherence` scores generated
images on pixels: the share whose shape has the prompted colour.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25), "green": (30, 160, 40), "blue": (30, 70, 230),
    "yellow": (245, 220, 20), "purple": (150, 50, 190), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0),
                                                "gray": (128, 128, 128)}


@dataclass(frozen=True)
class Combo:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_combos() -> list[Combo]:
    return [Combo(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, BACKGROUNDS)]


def held_out_combos() -> list[Combo]:
    """Two per colour: colour i with shape (i + j) mod 3 on background (i + 2j + 1) mod 3, j = 0, 1."""
    colours, bgs = list(COLOURS), list(BACKGROUNDS)
    return [Combo(colours[i], SHAPES[(i + j) % 3], bgs[(i + 2 * j + 1) % 3]) for i in range(6) for j in (0, 1)]


def train_combos() -> list[Combo]:
    held = set(held_out_combos())
    return [c for c in all_combos() if c not in held]


def draw(combo: Combo, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: the shape at a random place and scale."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[combo.background]
    r = rng.uniform(0.2, 0.3) * size  # half the shape's extent: 40% to 60% of the side
    cy, cx = rng.uniform(r + 1, size - r - 1, 2)
    yy, xx = np.mgrid[:size, :size] + 0.5
    dy, dx = yy - cy, xx - cx
    if combo.shape == "circle":
        mask = dy**2 + dx**2 <= r**2
    elif combo.shape == "square":
        mask = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    else:  # upward triangle with its base at cy + r and apex at cy - r
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    img[mask] = COLOURS[combo.colour]
    return img


class DemoData:
    """Endless random batches: (pixels (B, 3, H, W) in [-1, 1], captions), drawn from `combos`."""

    def __init__(self, combos: list[Combo], size: int = 64, seed: int = 0):
        self.combos, self.size = combos, size
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        picks = [self.combos[i] for i in self.rng.integers(len(self.combos), size=n)]
        arr = np.stack([draw(c, self.size, self.rng) for c in picks])  # (B, H, W, 3)
        pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1  # -> (B, 3, H, W) in [-1, 1]
        return pixels, [c.caption for c in picks]


def shape_colour(image: np.ndarray, background: str, threshold: float = 60.0) -> str | None:
    """The nearest of COLOURS to the mean colour of the shape's pixels: those farther (RGB distance) from the
    background colour than `threshold` and than half the farthest pixel, so that the edges a blurry sample blends
    with the background do not shift the mean. None when fewer than 1% of the pixels qualify (no shape drawn)."""
    img = image.astype(np.float64).reshape(-1, 3)
    dist = np.linalg.norm(img - np.array(BACKGROUNDS[background]), axis=1)
    far = dist > max(threshold, 0.5 * dist.max())
    if far.sum() < 0.01 * len(img):
        return None
    mean = img[far].mean(axis=0)
    names = list(COLOURS)
    dists = [np.linalg.norm(mean - np.array(COLOURS[c])) for c in names]
    return names[int(np.argmin(dists))]


def colour_adherence(images, combos: list[Combo]) -> float:
    """Share of images (PIL or (H, W, 3) uint8 arrays) whose shape has the colour their combo names."""
    hits = [shape_colour(np.asarray(im), c.background) == c.colour for im, c in zip(images, combos, strict=True)]
    return sum(hits) / len(hits)

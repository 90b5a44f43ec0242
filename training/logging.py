"""What a run shows, on rank 0 only: a tqdm bar (loss, lr, images/s, peak memory), `<out>/metrics.jsonl` and its plot
`<out>/curves.png` (refreshed at each save), a captioned grid per validation (`samples/step_NNNNNN.png`), and
optionally wandb and TensorBoard (imported only when asked for; WANDB_MODE=offline works without a network)."""
from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from sdxl.weights import atomic_path

CURVES = ("loss", "lr", "grad_norm")  # the panels of curves.png, top to bottom
OVERLAYS = {"loss": ("val_loss", (255, 127, 14))}  # drawn in a panel beside its curve: held-out loss, in orange


def peak_memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:  # a viewer refreshing the file never sees half of it
        image.save(tmp, format="PNG")


def image_grid(images: list[Image.Image], captions: list[str] | None = None, columns: int | None = None,
               cell: int | None = None, max_lines: int = 4) -> Image.Image:
    """A contact sheet: rows of `columns` images (default: about square), each caption wrapped under its image;
    `cell` shrinks the images to fit cell x cell pixels."""
    if cell:
        images = [im.copy() for im in images]
        for im in images:
            im.thumbnail((cell, cell))
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows, gap = math.ceil(len(images) / columns), 4
    w, h = max(im.width for im in images), max(im.height for im in images)
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    width_chars = max(6, int(w / max(font.getlength("x"), 1)))
    lines = [textwrap.wrap(c, width_chars, max_lines=max_lines, placeholder="...") for c in captions or []]
    text_h = line_h * max(map(len, lines), default=0) + (gap if captions else 0)
    grid = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + text_h + gap) - gap), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = i % columns * (w + gap), i // columns * (h + text_h + gap)
        grid.paste(im.convert("RGB"), (x, y))
        if captions:
            draw.multiline_text((x, y + h + 2), "\n".join(lines[i]), fill="black", font=font, spacing=2)
    return grid


def _series(rows: list[dict], name: str) -> list[tuple[int, float]]:
    return [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]


def plot_curves(metrics: Path, out: Path, width: int = 720, panel: int = 180) -> None:
    """curves.png: loss (with the validation loss beside it), learning rate and gradient norm against the step, one
    panel each, from metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    img = Image.new("RGB", (width, panel * len(CURVES)), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right = 70, width - 12
    for k, name in enumerate(CURVES):
        top, bottom = k * panel + 20, (k + 1) * panel - 22
        lines = [(name, _series(rows, name), (31, 119, 180))]
        if name in OVERLAYS and (extra := _series(rows, OVERLAYS[name][0])):
            lines.append((OVERLAYS[name][0], extra, OVERLAYS[name][1]))
        pts = [p for _, series, _ in lines for p in series]
        draw.rectangle((left, top, right, bottom), outline=(170, 170, 170))
        title = "    ".join(f"{n}   last {s[-1][1]:.4g} (step {s[-1][0]})" for n, s, _ in lines if s)
        draw.text((left, top - 16), title or name + "   (nothing logged yet)", fill="black", font=font)
        if not pts:
            continue
        (s0, s1), (v0, v1) = [(min(c), max(c)) for c in zip(*pts)]
        s1, v1 = max(s1, s0 + 1), v1 if v1 > v0 else v0 + (abs(v0) or 1.0) * 0.1  # a flat curve sits at the bottom
        for _, series, colour in (line for line in lines if line[1]):
            xy = [(left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - v0) / (v1 - v0) * (bottom - top))
                  for s, v in series]
            draw.line(xy + xy[-1:] * (len(xy) == 1), fill=colour, width=2)
        for text, at in ((f"{v1:.3g}", (4, top)), (f"{v0:.3g}", (4, bottom - 10)),
                         (str(s0), (left, bottom + 4)), (str(s1), (right - 8 * len(str(s1)), bottom + 4))):
            draw.text(at, text, fill=(90, 90, 90), font=font)
    save_png(img, out)


class Logger:
    def __init__(self, output_dir: str, total_steps: int, initial_step: int, enabled: bool, config: dict,
                 use_wandb: bool = False, project: str = "sdxl-mini", run_name: str | None = None,
                 tensorboard: bool = False, memory_plan: str = ""):
        self.enabled, self.out = enabled, Path(output_dir)
        self.path = self.out / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="training", unit="step",
                        dynamic_ncols=True, disable=not enabled)
        self.wandb = self.tensorboard = None
        if enabled and use_wandb:
            try:
                import wandb
            except ImportError:
                raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=project, name=run_name, config=config, dir=output_dir, resume="allow",
                                    notes=memory_plan)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (checked by config)
            self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            for tag, text in (("config", json.dumps(config, indent=1, default=str)), ("memory_plan", memory_plan)):
                self.tensorboard.add_text(tag, "    " + text.replace("\n", "\n    "), initial_step)  # markdown code

    def log(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({"step": step, **metrics}, step=step)
        if self.tensorboard is not None:
            for k, v in metrics.items():
                self.tensorboard.add_scalar(k, v, step)

    def progress(self, step: int, **show) -> None:
        self.bar.n = step  # the bar is disabled off rank 0
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in show.items()})

    def images(self, step: int, paths: list[Path], captions: list[str]) -> None:
        """Validation images written at `paths`: one captioned grid beside them, and to wandb / TensorBoard."""
        if not self.enabled:
            return
        images = [Image.open(p).convert("RGB") for p in paths]
        grid = image_grid(images, captions)
        save_png(grid, paths[0].parent / f"step_{step:06d}.png")
        if self.wandb is not None:
            import wandb
            self.wandb.log({"samples": [wandb.Image(str(p), caption=c) for p, c in zip(paths, captions)]}, step=step)
        if self.tensorboard is not None:
            import numpy as np
            self.tensorboard.add_image("samples", np.asarray(grid), step, dataformats="HWC")

    def plot_curves(self) -> None:
        if self.enabled and self.path.is_file():
            plot_curves(self.path, self.out / "curves.png")

    def write(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.plot_curves()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()

"""Metrics, on rank 0 only: a tqdm bar (loss, lr, images/s, peak memory), `<out>/metrics.jsonl`, and optional wandb
(imported only when asked for; WANDB_MODE=offline works without a network)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def peak_memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


class Logger:
    def __init__(self, output_dir: str, total_steps: int, initial_step: int, enabled: bool, config: dict,
                 use_wandb: bool = False, project: str = "sdxl-mini", run_name: str | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="training", unit="step",
                        dynamic_ncols=True, disable=not enabled)
        self.wandb = None
        if enabled and use_wandb:
            try:
                import wandb
            except ImportError:
                raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=project, name=run_name, config=config, dir=output_dir, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({"step": step, **metrics}, step=step)

    def progress(self, step: int, **show) -> None:
        self.bar.n = step  # the bar is disabled off rank 0
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in show.items()})

    def images(self, step: int, paths: list[Path], captions: list[str]) -> None:
        if self.wandb is not None:
            import wandb
            self.wandb.log({"samples": [wandb.Image(str(p), caption=c) for p, c in zip(paths, captions)]}, step=step)

    def write(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()

"""Post-hoc EMA (EDM2, Karras et al. 2024, arXiv 2312.02696 Sec. 3): the EMA of any length, after training.

Power-function EMAs ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t, beta_t = (1 - 1/t)^(gamma + 1), average the
weights with profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], of relative std sigma_rel (the EMA's
length). Their snapshots' mix closest (L2) to a target profile solves Gram x = <snapshot, target>, normalised to sum 1.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

from sdxl.weights import CheckpointError, read_header, read_state_dict, save_safetensors
from training.ema import lerp_


def exp_to_std(gamma) -> np.ndarray:
    """sigma_rel of the profile tau^gamma: sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def std_to_exp(std) -> np.ndarray:
    """The gamma of a sigma_rel: the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2)."""
    return np.vectorize(lambda s: np.roots([1, 7, 16 - s**-2, 12 - s**-2]).real.max())(np.float64(std))


def power_function_correlation(a_ofs, a_std, b_ofs, b_std) -> np.ndarray:
    """<p_a, p_b> = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) (t_a / t_b)^g_b / t_b, t_a <= t_b, t = ofs (broadcasting)."""
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    ratio = np.float64(a_ofs) / np.float64(b_ofs)
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)  # (t_a / t_b)^gamma_b, or (t_b / t_a)^gamma_a
    return (a_exp + 1) * (b_exp + 1) * ratio**t_exp / ((a_exp + b_exp + 1) * np.maximum(a_ofs, b_ofs))


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs: float, out_std: float) -> np.ndarray:
    """(n_in,) weights mixing the stored profiles into the closest fit of the target profile."""
    in_ofs, in_std = (x.reshape(-1, 1) for x in np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std)))
    A = power_function_correlation(in_ofs, in_std, in_ofs.T, in_std.T)  # (n_in, n_in)
    B = power_function_correlation(in_ofs, in_std, np.float64(out_ofs), np.float64(out_std))  # (n_in, 1)
    X = np.linalg.lstsq(A, B, rcond=None)[0]  # A can be near-singular with many close snapshots
    return (X / X.sum(axis=0, keepdims=True))[:, 0]


class PowerEMA:
    """Power-function EMAs of named parameters for several sigma_rel values, in fp32 on `device`."""

    def __init__(self, named_params: list, stds=(0.05, 0.10), device: str | torch.device | None = None):
        self.params = dict(named_params)
        self.stds = tuple(float(s) for s in stds)
        self.gammas = [float(std_to_exp(s)) for s in self.stds]
        self.shadows = [{n: p.detach().to(device or p.device, torch.float32, copy=True) for n, p in
                         self.params.items()} for _ in self.stds]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based): lerp by 1 - beta_t."""
        lerp_([list(s.values()) for s in self.shadows], list(self.params.values()),
              [1 - (1 - 1 / step) ** (gamma + 1) for gamma in self.gammas])

    def save_snapshots(self, folder: str | Path, step: int) -> None:
        for std, shadow in zip(self.stds, self.shadows):
            save_safetensors(shadow, Path(folder) / f"step_{step:06d}_std{std:.3f}.safetensors",
                             metadata={"step": str(step), "std": repr(std)})


def list_snapshots(folder: str | Path) -> list[tuple[Path, int, float]]:
    """(path, step, std) of every snapshot in `folder`, read from each file's metadata."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such snapshot folder")
    found = []
    for path in sorted(p for p in folder.iterdir() if re.fullmatch(r"step_\d+_std[0-9.]+\.safetensors", p.name)):
        meta = read_header(path)[1]  # CheckpointError when unreadable
        try:
            found.append((path, int(meta["step"]), float(meta["std"])))
        except (KeyError, ValueError):
            raise CheckpointError(f"{path}: snapshot without step/std metadata") from None
    if not found:
        raise FileNotFoundError(f"{folder}: no EMA snapshots (step_NNNNNN_stdS.safetensors)")
    return found


def reconstruct(folder: str | Path, target_std: float, target_step: int | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[Path, float]]:
    """The EMA of length `target_std` at `target_step` (default: the last snapshot's step), and the mix used."""
    paths, steps, stds = zip(*list_snapshots(folder))
    target_step = target_step or max(steps)
    if not 0 < target_step <= max(steps):
        raise ValueError(f"target step {target_step} is outside the snapshots' range (1..{max(steps)})")
    if not 0 < target_std < exp_to_std(0.0):  # gamma >= 0 <=> std <= sqrt(1/12)
        raise ValueError(f"target_std must be in (0, {exp_to_std(0.0):.4f}), got {target_std}")
    coeffs = solve_posthoc_coefficients(steps, stds, target_step, target_std)
    out: dict[str, torch.Tensor] = {}
    for path, c in zip(paths, coeffs):
        for k, v in read_state_dict(path, dtype=torch.float64).items():
            out[k] = out[k] + c * v if k in out else c * v
    return {k: v.float() for k, v in out.items()}, dict(zip(paths, map(float, coeffs)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.post_hoc_ema", description=__doc__.split("\n\n")[0])
    p.add_argument("--snapshots", required=True, help="folder of step_NNNNNN_stdS.safetensors snapshots")
    p.add_argument("--target_std", type=float, required=True, help="EMA length sigma_rel (EDM2: 0.05..0.2)")
    p.add_argument("--target_step", type=int, default=None, help="step the EMA ends at (default: the last)")
    p.add_argument("--out", required=True, help="output .safetensors")
    a = p.parse_args(argv)
    try:
        weights, mix = reconstruct(a.snapshots, a.target_std, a.target_step)
    except (ValueError, FileNotFoundError) as e:
        print(f"post_hoc_ema: error: {e}", file=sys.stderr)
        return 2
    save_safetensors(weights, a.out, metadata={"std": repr(a.target_std)})
    print(f"wrote {a.out} from {len(mix)} snapshots (largest weight {max(mix.values(), key=abs):+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a training run leaves behind, checked against independent oracles: diffusers' single-file and LoRA
loaders, the EMA formula of training/ema.py folded by hand over per-step checkpoints, parameter counts made
here from the model, the VAE's own encoding, and the processes a stop request must end (Ctrl-C with DataLoader
workers, SIGTERM on one DDP rank)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import ROOT, rel_err, train_args
from PIL import Image
from safetensors.torch import load_file

import sdxl
import train_sdxl
from sdxl import lora
from training import loop

EMA_DECAY = 0.9  # with the default warmup the per-update decays are min(0.9, (1 + t) / (10 + t)): 0.1, 0.18


def run_main(args) -> tuple[int, str]:
    """train_sdxl.main in-process, with what it printed (module-scoped fixtures cannot use capsys)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = train_sdxl.main(list(map(str, args)))
    return code, buf.getvalue()


def ckpt_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").iterdir())


def trainable_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "trainable.safetensors"))


def ema_by_hand(initial: dict[str, torch.Tensor], per_step: list[dict[str, torch.Tensor]]) -> dict:
    """training/ema.py's formula written out: ema_t = d_t ema_{t-1} + (1 - d_t) theta_t, d_t = min(decay,
    (1 + t) / (10 + t)), t counting updates from 0, ema_0 = the weights before the first step."""
    ema = {k: v.double() for k, v in initial.items()}
    for t, theta in enumerate(per_step):
        d = min(EMA_DECAY, (1 + t) / (10 + t))
        ema = {k: d * ema[k] + (1 - d) * theta[k].double() for k in ema}
    return ema


def memory_rows(stdout: str) -> dict[str, str]:
    """The memory plan's rows as printed: {'weights': '0.05', ..., 'trainable': '7.99'}."""
    rows = dict(re.findall(r"^  (weights|gradients|optimizer \(adamw\)|EMA)\s+(\S+) GiB$", stdout, re.MULTILINE))
    rows["trainable"] = re.search(r"^memory plan: (\S+)M trainable parameters$", stdout, re.MULTILINE).group(1)
    return rows


def tiny_on_meta() -> torch.nn.Module:
    """The tiny preset's networks, shapes only (counting needs no weights)."""
    from sdxl.config import PRESETS
    from sdxl.model import build_model
    with torch.device("meta"):
        return build_model(PRESETS["tiny"])


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f}"


def same_weights(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---- full fine-tune: --save_single_file, final_ema/, memory plan ---------------------------------------------

@pytest.fixture(scope="module")
def full_run(train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    code, stdout = run_main(train_args(
        train_data, out, "--max_steps", 2, "--batch_size", 2, "--learning_rate", 1e-3, "--save_single_file",
        "--ema_decay", EMA_DECAY, "--save_interval_steps", 1, "--keep_checkpoints", 100))
    assert code == 0
    return out, stdout


def test_save_single_file_holds_the_original_layout(full_run):
    """diffusers' single-file loader (with final/ as the config) reads final.safetensors into the same UNet and
    VAE as final/, and so does sdxl.load_model; final_ema.safetensors holds final_ema/."""
    from diffusers import StableDiffusionXLPipeline
    out, _ = full_run
    init = sdxl.load_model("tiny", seed=0).unet.state_dict()
    for suffix in ("", "_ema"):
        folder, single = out / f"final{suffix}", out / f"final{suffix}.safetensors"
        assert single.is_file(), single
        unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
        assert max_diff(unet, init) > 1e-4  # trained weights, not the initial ones
        ours = sdxl.load_model(single)
        assert same_weights(ours.unet.state_dict(), unet) and same_weights(ours.vae.state_dict(), vae), suffix
        if not suffix:  # the original layout, as diffusers reads it
            assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner."))
                       for k in load_file(str(single)))
            ref = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
            assert same_weights(ref.unet.state_dict(), unet) and same_weights(ref.vae.state_dict(), vae)


def test_final_ema_is_the_ema_of_the_per_step_weights(full_run):
    out, _ = full_run
    assert ckpt_steps(out) == [1, 2]
    steps = [{k.removeprefix("unet."): v for k, v in trainable_at(out, s).items()} for s in (1, 2)]
    final = load_file(str(out / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(out / "final_ema" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert same_weights(final, steps[-1])  # final/ is the last step's weights
    expected = ema_by_hand(sdxl.load_model("tiny", seed=0).unet.state_dict(), steps)
    # fp32 lerp vs the float64 fold: measured max |diff| ~1e-8 on weights of size ~1
    err, moved = max_diff(expected, ema), max_diff(final, ema)
    assert err < 1e-6 and moved > 1e-4, (err, moved)  # the EMA, and not the final weights


def test_memory_plan_full_finetune(full_run):
    """fp32 run: every weight 4 bytes; the UNet trains: fp32 gradients, AdamW's two fp32 moments, an fp32 EMA."""
    _, stdout = full_run
    model = tiny_on_meta()
    n_all, n_unet = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.unet.parameters())
    assert memory_rows(stdout) == {"weights": gib(4 * n_all), "gradients": gib(4 * n_unet),
                                   "optimizer (adamw)": gib(8 * n_unet), "EMA": gib(4 * n_unet),
                                   "trainable": f"{n_unet / 1e6:.2f}"}


# ---- LoRA: --lora_format peft, lora_final_ema, memory plan ---------------------------------------------------

LORA_RANK = 4


@pytest.fixture(scope="module")
def lora_run(train_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    sdxl.load_model("tiny", seed=0).save_pretrained(root / "base")
    args = train_args(train_data, root / "run", "--use_lora", "--lora_rank", LORA_RANK, "--lora_format", "peft",
                      "--max_steps", 2, "--batch_size", 2, "--learning_rate", 5e-3, "--ema_decay", EMA_DECAY,
                      "--save_interval_steps", 1, "--keep_checkpoints", 100, "--precision", "bf16")
    args[1] = str(root / "base")
    code, stdout = run_main(args)
    assert code == 0
    return root, stdout


def attention_qkv(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The default target mode ("attention"): to_q / to_k / to_v of every self- and cross-attention."""
    return {n: m for n, m in unet.named_modules() if re.search(r"\.attn[12]\.to_[qkv]$", n)}


def test_lora_format_peft_loads_in_reference_pipeline(lora_run):
    from diffusers import StableDiffusionXLPipeline
    root, _ = lora_run
    path = root / "run" / "lora_final.safetensors"
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "base")
    modules = attention_qkv(pipe.unet)
    assert set(load_file(str(path))) == {f"unet.{n}.lora_{ab}.weight" for n in modules for ab in "AB"}
    pipe.load_lora_weights(str(path))
    ours = sdxl.load_model(root / "base")
    ours.load_lora(path)
    x, ctx, pooled = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64), torch.randn(1, 32)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with torch.no_grad():
        ref = pipe.unet(x, 500, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours.unet(x, 500, ctx, pooled, ids)
        base = sdxl.load_model(root / "base").unet(x, 500, ctx, pooled, ids)
    assert (got - base).abs().max() > 1e-4  # the LoRA does something
    assert (ref - got).abs().max() <= 1e-4  # the same tolerance as test_trained_lora_loads_in_reference_pipeline


def test_lora_final_ema_is_the_ema_of_the_per_step_weights(lora_run):
    root, _ = lora_run
    run = root / "run"
    # The adapters before step 1: the trainer seeds the global RNG with --seed and injects into the loaded model.
    torch.manual_seed(0)
    net = lora.inject(sdxl.load_model(root / "base"), "attention", LORA_RANK)
    peft = {}  # checkpoint name (the trainee's "network." parameters) -> PEFT key of the final file
    for name, t in net.targets.items():
        for ours, theirs in (("lora_down", "lora_A"), ("lora_up", "lora_B")):
            peft[f"network.{name}.{ours}.weight"] = f"unet.{t.path}.{theirs}.weight"
    initial = {k: v for k, v in net.state_dict().items() if not k.endswith(".alpha")}
    initial = {f"network.{k}": v for k, v in initial.items()}
    steps = [trainable_at(run, s) for s in (1, 2)]
    assert steps[0].keys() == peft.keys()
    final, ema = load_file(str(run / "lora_final.safetensors")), load_file(str(run / "lora_final_ema.safetensors"))
    final, ema = ({k: f[v] for k, v in peft.items()} for f in (final, ema))
    assert same_weights(final, steps[-1])
    expected = ema_by_hand(initial, steps)
    err, moved = max_diff(expected, ema), max_diff(final, ema)  # measured err ~1e-9: fp32 lerp vs float64
    assert err < 1e-6 and moved > 1e-4, (err, moved)


def test_memory_plan_lora(lora_run):
    """bf16 run: frozen weights 2 bytes each; the adapters (rank * (in + out) per targeted Linear) fp32, with
    fp32 gradients, AdamW's two fp32 moments and an fp32 EMA."""
    _, stdout = lora_run
    model = tiny_on_meta()
    n_base = sum(p.numel() for p in model.parameters())
    n_lora = sum(LORA_RANK * (m.in_features + m.out_features) for m in attention_qkv(model.unet).values())
    assert memory_rows(stdout) == {"weights": gib(2 * n_base + 4 * n_lora), "gradients": gib(4 * n_lora),
                                   "optimizer (adamw)": gib(8 * n_lora), "EMA": gib(4 * n_lora),
                                   "trainable": f"{n_lora / 1e6:.2f}"}


# ---- --metadata_files and --keep_checkpoints -------------------------------------------------------------------

def run_plan(stdout: str) -> str:
    return re.search(r"^run plan: .*$", stdout, re.MULTILINE).group(0)


def test_metadata_subset_and_checkpoint_rotation(train_data, tmp_path, monkeypatch, capsys):
    """A metadata file listing 4 of the 8 images with its own captions: only those train, with those captions.
    The same run keeps only its last two per-step checkpoints, and the newest resumes."""
    listed = {f"{i}.png": {"tags": f"listed {i}"} for i in range(4)}  # keys resolved against --data_dir
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(listed))
    seen: list[str] = []
    real = loop.batch_inputs

    def spy(batch, *args, **kw):
        seen.extend(batch["caption"])
        return real(batch, *args, **kw)
    monkeypatch.setattr(loop, "batch_inputs", spy)
    args = ["--use_lora", "--metadata_files", meta, "--batch_size", 2, "--save_interval_steps", 1,
            "--keep_checkpoints", 2, "--learning_rate", 1e-3]
    out = tmp_path / "run"
    assert train_sdxl.main(train_args(train_data, out, *args, "--max_steps", 5)) == 0
    assert run_plan(capsys.readouterr().out).startswith("run plan: 4 images,")
    assert len(seen) == 10 and set(seen) == {e["tags"] for e in listed.values()}
    assert ckpt_steps(out) == [4, 5]
    assert train_sdxl.main(train_args(train_data, out, *args, "--max_steps", 6, "--resume", "latest")) == 0
    assert run_plan(capsys.readouterr().out).endswith("6 steps in all (starting at 5)")
    assert ckpt_steps(out) == [5, 6]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_save_killed_half_way_is_ignored_and_removed(train_data, tmp_path):
    """A checkpoint is written into a temporary folder and renamed: a killed save leaves only that folder. The
    next run resumes from the newest complete checkpoint, removes the leftover, and ends where an unbroken run
    ends."""
    args = ["--max_steps", 2, "--save_interval_steps", 1, "--optimizer", "sgd", "--learning_rate", 0.05]
    assert train_sdxl.main(train_args(train_data, tmp_path / "straight", *args)) == 0
    out = tmp_path / "run"
    assert train_sdxl.main(train_args(train_data, out, *args[2:], "--max_steps", 1)) == 0
    partial = out / "checkpoints" / "step_000002.4242.tmp"  # what save_checkpoint writes into first
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half a file")
    assert train_sdxl.main(train_args(train_data, out, *args[2:], "--max_steps", 2, "--resume", "latest")) == 0
    assert not partial.exists() and ckpt_steps(out) == [1, 2]
    a = load_file(str(tmp_path / "straight" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- --vae -------------------------------------------------------------------------------------------------------

def test_vae_flag_is_the_vae_that_encodes(train_data, tmp_path):
    """--vae FOLDER with other weights than the model's own: the cached latents are that VAE's posterior mean
    (times its scaling factor) of the image, not the model VAE's. The 64x64 images fill their bucket exactly, so
    the encoder input is the image itself."""
    sdxl.load_model("tiny", seed=1).save_pretrained(tmp_path / "other")
    vae_dir = tmp_path / "other" / "vae"
    out = tmp_path / "run"
    assert train_sdxl.main(train_args(train_data, out, "--vae", vae_dir, "--cache_latents", "--max_steps", 1,
                                      "--batch_size", 2)) == 0
    from sdxl.vae import load_vae
    vaes = {"given": load_vae(vae_dir), "model's own": sdxl.load_model("tiny", seed=0).vae}
    images = [Image.open(train_data / f"{i}.png").convert("RGB") for i in (1, 3, 5, 7)]  # the square ones
    px = torch.stack([torch.from_numpy(np.asarray(im)) for im in images]).float()  # (4, 64, 64, 3)
    px = px.permute(0, 3, 1, 2) * (2 / 255) - 1
    with torch.no_grad():
        expected = {name: vae.encode(px).mean * vae.config.scaling_factor for name, vae in vaes.items()}
    entries = [load_file(str(p)) for p in (out / "cache" / "latents").rglob("*.safetensors")]
    square = [e["latents"] for e in entries if e["original_size"].tolist() == [64, 64]]
    assert len(square) == 2

    for latents in square:  # 1 and 5 (3 and 7) are the same drawing, cached once
        err = {name: min(rel_err(e, latents) for e in expected[name]) for name in vaes}
        # fp32 convs differ by up to 1e-4 (relative, measured) with the batch size and memory layout
        assert err["given"] < 1e-3 and err["model's own"] > 0.1, err


def test_fp16_vae_that_overflows_is_refused(train_data, tmp_path, capsys):
    """--precision fp16 --vae_precision fp16 with a force_upcast VAE (the tiny preset's, like SDXL's): exit 2,
    one line, and nothing written: the run's folder is made only once every input has been checked."""
    out = tmp_path / "run"
    code = train_sdxl.main(train_args(train_data, out, "--max_steps", 1, "--precision", "fp16", "--vae_precision",
                                      "fp16"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "overflows in fp16" in err[0], err
    assert not out.exists()


# ---- stop requests in other processes -----------------------------------------------------------------------

class Run:
    """train_sdxl.py (or torchrun) in its own session, every process it starts remembered: the test ends them all
    whatever happens. torchrun puts each rank in a session of its own, so the process group alone misses them."""

    def __init__(self, cmd: list[str], out: Path):
        self.out, self.seen = out, []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        out.mkdir(parents=True, exist_ok=True)
        # stderr to a file: a pipe nobody reads while waiting could fill up and stall the run
        with open(out / "stderr.txt", "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def stderr(self) -> str:
        return (self.out / "stderr.txt").read_text()[-3000:]

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            found = psutil.Process(self.proc.pid).children(recursive=True)
            self.seen += [p for p in found if p not in self.seen]
            return found
        return []

    def wait_for(self, condition, what: str, timeout: float = 180) -> None:
        """Poll until `condition()`; fail at once if the run ended first (never signal at a blind deadline)."""
        deadline = time.time() + timeout
        while not condition():
            self.descendants()
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended before {what}: {self.stderr()}")
            if time.time() > deadline:
                pytest.fail(f"no {what} within {timeout} s")
            time.sleep(0.1)
        self.descendants()

    def survivors(self, grace: float = 10) -> list[psutil.Process]:
        """Processes of the run (seen, or still in its process group) alive `grace` seconds after it exited."""
        deadline = time.time() + grace
        while True:
            alive = [p for p in {*self.seen, *group_members(self.proc.pid)} if is_alive(p)]
            if not alive or time.time() > deadline:
                return alive
            time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.descendants()
        for p in self.seen:
            with contextlib.suppress(psutil.Error):
                p.kill()  # psutil checks the pid was not reused
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(p.pid) == pgid:
                found.append(p)
    return found


def is_alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    return False


def metrics_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_ctrl_c_with_dataloader_workers(train_data, tmp_path):
    """Ctrl-C reaches the whole foreground process group (the trainer and its 2 DataLoader workers): the run
    finishes the step, saves it, exits 0, writes no final weights and leaves no worker behind."""
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"),
           *train_args(train_data, tmp_path, "--use_lora", "--max_steps", 10000, "--batch_size", 2,
                       "--num_workers", 2)]
    with Run(cmd, tmp_path) as run:
        run.wait_for(lambda: metrics_lines(tmp_path) >= 1, "first metrics line")
        run.wait_for(lambda: len(run.descendants()) >= 2, "DataLoader workers")
        os.killpg(run.proc.pid, signal.SIGINT)
        assert run.proc.wait(timeout=120) == 0, run.stderr()
        steps = metrics_lines(tmp_path)
        assert ckpt_steps(tmp_path) == [steps]
        assert not (tmp_path / "lora_final.safetensors").exists() and not (tmp_path / "final").exists()
        assert run.survivors() == []


def test_sigterm_on_one_ddp_rank_stops_both(train_data, tmp_path):
    """SIGTERM to rank 1 alone: the stop request is shared, so both ranks finish the same step (a rank that
    stopped alone would leave the other waiting in a collective), rank 0 saves that step once, and torchrun
    (hence every rank) exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_sdxl.py"),
           *train_args(train_data, tmp_path, "--use_lora", "--max_steps", 10000, "--batch_size", 1)]
    with Run(cmd, tmp_path) as run:
        run.wait_for(lambda: metrics_lines(tmp_path) >= 1, "first metrics line")
        ranks = {rank_of(p): p for p in run.descendants()}
        assert {"0", "1"} <= ranks.keys(), ranks
        ranks["1"].send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=120) == 0, run.stderr()
        steps = metrics_lines(tmp_path)
        assert ckpt_steps(tmp_path) == [steps]
        assert not (tmp_path / "lora_final.safetensors").exists()
        assert run.survivors() == []


def rank_of(p: psutil.Process) -> str | None:
    with contextlib.suppress(psutil.Error):
        return p.environ().get("RANK")
    return None

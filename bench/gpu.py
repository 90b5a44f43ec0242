"""The whole GPU plan in one run: generation, the LoRA step and the full fine-tune step, ours beside diffusers.

    python bench/gpu.py                  # one H100 / H200: sdxl-base (random weights), bf16, 1024 px, <= 8 minutes
    python bench/gpu.py --smoke          # every case on the CPU with the tiny preset (32 px, 2 steps), <= 2 minutes
    python bench/gpu.py --cases lora full --out $OUT/nvidia-h200-gpu.json   # a subset; where the rows go

Cases, in this order (the slowest to prepare, compilation, last):
  generate-eager b1, b4   30 steps, CFG 5, Euler, 1024 px. The denoising loop is timed with CUDA events between the
                          first and the last step callbacks (steps/s over the steps between them), the VAE decode on
                          its own, and end to end (text encoding, loop, decode, PIL images).
  lora b1                 rank 16 on every linear layer (target mode "all"), gradient checkpointing, cached latents
                          and text (the step starts from latents and embeddings), frozen bf16 base, fp32 adapters
                          under bf16 autocast, fused AdamW: forward, loss, backward, optimizer step.
  full b1, b4             every UNet weight trains (fp32 masters, bf16 autocast, fused AdamW), checkpointing; MFU
                          against 20.3 TFLOP per 1024 px image-step (x 4/3 for the recompute) and --peak_tflops.
  generate-compile b1, b4 the UNets torch.compile'd in place (--compile_scope unet | blocks: sdxl.unet.compile_unet
                          for ours, the same regions of diffusers' UNet); compile_s is the first call's time.
The models are built once, directly on the device: ours, then diffusers' UNet and VAE holding copies of the same
weights (StableDiffusionXLPipeline shares our text encoders and tokenizers); peft's LoRA goes on diffusers' UNet.
Each side of a case starts from gc.collect + torch.cuda.empty_cache + reset_peak_memory_stats (generation: the
reference, then ours, interleaved); its peak is max_memory_allocated less the memory_allocated before it (the
resident models). Training rows carry our memory plan (training/memory.py) next to the measured peak:
plan_delta_gib is the plan's peak less the resident weights it counts, plan_error how far off it is. Every row is
written to bench/results/<device>-gpu.json (temp file, then rename) as soon as it is measured; an out-of-memory or
another failure is a row (oom: true / error) and the run goes on; a case that would start after --budget_s is a row
(skipped). diffusers and peft, when missing, are a row each too: install them from a carried wheel.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import PROMPT, module_bytes  # noqa: E402
from train import TFLOP_PER_IMAGE, step_fn  # noqa: E402
from unet import device_name, make_inputs  # noqa: E402

import sdxl.unet  # noqa: E402
from sampling import generate  # noqa: E402
from sdxl import lora  # noqa: E402
from sdxl.config import PRESETS  # noqa: E402
from sdxl.model import SCHEDULER_CONFIG, build_model  # noqa: E402
from sdxl.weights import atomic_path  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.memory import GIB, plan_bytes, plan_text  # noqa: E402

CASES = ("generate-eager", "lora", "full", "generate-compile")
PEAK_TFLOPS = 989.0  # H100 / H200 SXM bf16 dense
LORA_RANK = 16
PRECISION = {torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class Bench:
    """What every case shares: the options, the device, the models and the results file."""
    a: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    size: int
    steps: int
    out: Path
    ours: object = None
    pipe: object = None  # diffusers' StableDiffusionXLPipeline, or None without diffusers
    doc: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def add(self, row: dict) -> dict:
        """Append `row` and rewrite the file at once (temp file, then rename)."""
        self.doc["rows"].append(row)
        with atomic_path(self.out) as tmp:
            tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "case"}
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {row['case']}: {shown}", flush=True)
        return row

    def fresh(self, empty: bool = True) -> int:
        """Start the peak count, first freeing what the last case left (`empty`; not between the timed calls of a
        case, which then reuse the allocator's blocks); the bytes allocated now (the baseline)."""
        if not self.gpu:
            return 0
        if empty:
            gc.collect()  # reference cycles (a caught out-of-memory's frames) holding device memory
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_gib(self, baseline: int) -> float | None:
        return (torch.cuda.max_memory_allocated(self.device) - baseline) / GIB if self.gpu else None

    def mark(self):
        """A point in time on the device's stream (a CUDA event), or the host clock on the CPU."""
        if not self.gpu:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:
        if not self.gpu:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1e3


# ---- models ------------------------------------------------------------------------------------------------------

def build(b: Bench, config: str) -> None:
    """Ours on the device (random init there, then cast), and diffusers' UNet and VAE built on the meta device and
    given device copies of our weights: one fp32 init, no CPU copy of a network."""
    with torch.random.fork_rng(devices=[]), torch.device(b.device):
        torch.manual_seed(0)
        b.ours = build_model(PRESETS[config]).to(b.dtype).eval().requires_grad_(False)
    if missing(b, "diffusers", {"case": "reference"}):  # ours only
        return
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    cfg = b.ours.config

    def copy(cls, kw: dict, ours):
        with torch.device("meta"):
            ref = cls(**{k: v for k, v in kw.items() if not k.startswith("_")})
        ref.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, assign=True)
        return ref.eval().requires_grad_(False)

    text = b.ours.text
    b.pipe = StableDiffusionXLPipeline(
        vae=copy(AutoencoderKL, cfg.vae.to_diffusers(), b.ours.vae),
        text_encoder=text.text_encoder.text_model, text_encoder_2=text.text_encoder_2,
        tokenizer=text.tokenizer, tokenizer_2=text.tokenizer_2,
        unet=copy(UNet2DConditionModel, cfg.unet.to_diffusers(), b.ours.unet),
        scheduler=EulerDiscreteScheduler.from_config({**SCHEDULER_CONFIG, "prediction_type": cfg.prediction_type}),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    b.pipe.set_progress_bar_config(disable=True)


# ---- generation ----------------------------------------------------------------------------------------------------

def timed_call(b: Bench, side: str, batch: int, steps: int, latents: torch.Tensor):
    """One generation call: (images, loop_s over steps - 1 steps, decode_s, end_to_end_s). The step callbacks and
    a wrapper on the VAE decode record events; nothing waits for the device until the call has returned."""
    marks, ours = {"steps": []}, side == "ours"
    owner = b.ours if ours else b.pipe.vae
    decode = owner.decode

    def timed_decode(*args, **kw):
        marks["decode"] = b.mark()
        out = decode(*args, **kw)
        marks["decoded"] = b.mark()
        return out

    owner.decode = timed_decode
    prompts = [PROMPT] * batch
    try:
        start = b.mark()
        if ours:
            images = generate(b.ours, prompts, height=b.size, width=b.size, steps=steps, guidance_scale=5.0,
                              sampler="euler", latents=latents, callback=lambda *_: marks["steps"].append(b.mark()))
        else:
            def on_step(pipe, i, t, kw):
                marks["steps"].append(b.mark())
                return kw
            images = b.pipe(prompts, height=b.size, width=b.size, num_inference_steps=steps, guidance_scale=5.0,
                            latents=latents.to(b.device, b.dtype), callback_on_step_end=on_step).images
        end = b.mark()
    finally:
        del owner.decode  # the method again
    s = marks["steps"]
    return (images, b.seconds(s[0], s[-1]), b.seconds(marks["decode"], marks["decoded"]), b.seconds(start, end))


def generate_case(b: Bench, mode: str, batch: int) -> None:
    """Our generate() and diffusers' pipeline on the same noise: a row per side (an out-of-memory is one)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, *b.ours.space(b.size, b.size), generator=g)
    case = {"case": f"generate-{mode}", "batch": batch, "size": b.size, "steps": b.steps}
    sides = (["reference"] if b.pipe is not None else []) + ["ours"]
    runs, images, first_s, failed = {s: [] for s in sides}, {}, {}, set()
    warm = b.gpu or (mode == "compile" and b.a.compile_backend != "none")  # the CPU smoke has nothing to warm
    for _ in range(1 + b.a.iters):  # the warm-up (2 steps: compiles), then --iters interleaved timed calls
        for side in [s for s in sides if s not in failed]:
            try:
                base, t = b.fresh(empty=side not in first_s), time.perf_counter()
                if side not in first_s:
                    if warm:
                        timed_call(b, side, batch, 2, latents)
                    first_s[side] = time.perf_counter() - t
                    continue
                images[side], *times = timed_call(b, side, batch, b.steps, latents)
                runs[side].append((*times, b.peak_gib(base)))
            except Exception as e:  # noqa: BLE001  (one side failing, e.g. in compilation, leaves the other)
                failed.add(side)
                b.add({**case, "side": side, **failure(e)})
    rows = {}
    for side in (s for s in sides if s not in failed):
        loop_s, decode_s, e2e_s = (statistics.median(r[i] for r in runs[side]) for i in range(3))
        rows[side] = row = {**case, "side": side, "steps_per_s": (b.steps - 1) / loop_s,
                            "loop_s": loop_s * b.steps / (b.steps - 1), "decode_s": decode_s,
                            "end_to_end_s": e2e_s, "s_per_image": e2e_s / batch,
                            "peak_gib": max(r[3] for r in runs[side]) if b.gpu else None,
                            **({"compile_s": first_s[side]} if mode == "compile" else {})}
        if side == "ours" and "reference" in rows:
            row["speedup"] = row["steps_per_s"] / rows["reference"]["steps_per_s"]
            row["max_pixel_diff"] = int(max(np.abs(np.asarray(r, np.int16) - np.asarray(o, np.int16)).max()
                                            for r, o in zip(images["reference"], images["ours"])))
        b.add(row)


def compile_unets(b: Bench) -> None:
    """torch.compile both UNets in place over the same regions (the whole network, or each transformer and ResNet
    block); the last case, so training never sees a compiled network."""
    backend = b.a.compile_backend
    if backend == "none":  # the plumbing only (the smoke test); compilation itself is tested in test_compile.py
        return
    sdxl.unet.COMPILE_BACKEND = backend
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    sdxl.unet.compile_unet(b.ours.unet, b.a.compile_scope)
    if b.pipe is None:
        return
    if b.a.compile_scope == "unet":
        b.pipe.unet.compile(fullgraph=True, backend=backend)
    else:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D
        for m in b.pipe.unet.modules():
            if isinstance(m, (BasicTransformerBlock, ResnetBlock2D)):
                m.compile(fullgraph=True, backend=backend)


# ---- training --------------------------------------------------------------------------------------------------

def train_side(b: Bench, case: dict, side: str, setup, finish=None) -> dict:
    """One side of a training case: `setup(undo)` -> (model, is_ref, trainable), having put its teardown on `undo`
    first (it runs even when the setup fails half-way); warm-up steps (they allocate the optimizer state), then
    --train_iters timed steps; `finish(row, trainable)` adds to the row before it is written. An out-of-memory is a
    row too."""
    base, undo, row = b.fresh(), [], {**case, "side": side}
    try:
        model, is_ref, params = setup(undo)
        args = make_inputs(b.ours.unet.config, case["batch"], b.size // 8, b.device, b.dtype)
        step = step_fn(model, is_ref, params, args, b.dtype, b.device)
        for _ in range(2 if b.gpu else 0):  # the CPU smoke has nothing to warm
            step()
        if b.gpu:
            torch.cuda.reset_peak_memory_stats(b.device)
        start = b.mark()
        for _ in range(b.a.train_iters):
            step()
        s = b.seconds(start, b.mark()) / b.a.train_iters
        row.update(s_per_step=s, images_per_s=case["batch"] / s, peak_gib=b.peak_gib(base),
                   trainable_params=sum(p.numel() for p in params))
        if finish is not None:
            finish(row, params)
    except Exception as e:  # noqa: BLE001  (the other side and the next cases still run)
        row.update(failure(e))
    finally:
        step = params = model = None  # the optimizer state goes with the step
        for fn in undo:
            fn()
    return b.add(row)


def mfu(b: Bench, row: dict) -> None:
    """TFLOP/s and MFU of a full fine-tune row: 20.3 TFLOP per 1024 px image-step (sdxl-base), x 4/3 for the
    forward that checkpointing recomputes, against --peak_tflops. Other configs and sizes get none."""
    if b.a.config == "sdxl-base" and b.size == 1024 and "s_per_step" in row:
        row["tflops"] = TFLOP_PER_IMAGE * 4 / 3 * row["batch"] / row["s_per_step"]
        row["mfu"] = row["tflops"] / b.a.peak_tflops


def finisher(b: Bench, cfg: TrainConfig, ref_row: dict | None, network=lambda: None, full: bool = False):
    """`finish` for our side: the speedup over the reference's row, MFU (full fine-tune), and our memory plan for
    `cfg` beside the measured peak (printed, its figures in the row; the plan less the resident weights it counts
    is what compares with the measured peak over the resident models)."""
    resident = module_bytes(b.ours)  # the bf16 bundle as built: in the baseline already

    def finish(row: dict, params) -> None:
        if ref_row and "s_per_step" in ref_row:
            row["speedup"] = ref_row["s_per_step"] / row["s_per_step"]
        if full:
            mfu(b, row)
        size = (b.size, b.size)
        f = plan_bytes(cfg, b.ours, params, network(), size)
        row.update(plan_peak_gib=f["peak"] / GIB, plan_delta_gib=(f["peak"] - resident) / GIB,
                   plan_activations_gib=f["activations"] / GIB, plan_recompute_gib=f["recompute"] / GIB,
                   plan_fused_attention=f["fused_attention"])
        if row["peak_gib"]:
            row["plan_error"] = row["plan_delta_gib"] / row["peak_gib"] - 1
        measured = "n/a on the CPU" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
        print(f"{plan_text(cfg, f, row['trainable_params'], size)}\n  {'measured peak over the resident models':<52s}"
              f" {measured} (the plan less resident weights: {row['plan_delta_gib']:.2f} GiB)")
    return finish


def lora_case(b: Bench, batch: int) -> None:
    case = {"case": "lora", "batch": batch, "rank": LORA_RANK, "targets": "all", "grad_ckpt": True}
    unet, net = b.ours.unet, []
    cfg = TrainConfig(use_lora=True, lora_rank=LORA_RANK, lora_alpha=LORA_RANK, lora_target_mode="all",
                      batch_size=batch, precision=PRECISION[b.dtype], gradient_checkpointing=True)

    def ours(undo: list):
        undo.append(lambda: (net.pop().remove() if net else None, unet.eval().set_gradient_checkpointing(False)))
        net.append(lora.inject(unet, "all", rank=LORA_RANK, alpha=LORA_RANK))
        unet.train().set_gradient_checkpointing(True)
        return unet, False, list(net[0].parameters())

    def reference(undo: list):
        from peft import LoraConfig
        ref, targets = b.pipe.unet, [t.path for t in lora.select(unet, "all").values()]  # the same layers
        undo.append(lambda: (ref.unload_lora(), ref.eval().disable_gradient_checkpointing()))  # plain layers back
        ref.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                   target_modules=targets), adapter_name="bench")
        ref.train().enable_gradient_checkpointing()
        return ref, True, [p for p in ref.parameters() if p.requires_grad]

    ref_row = None
    if b.pipe is not None and not missing(b, "peft", {**case, "side": "reference"}):
        ref_row = train_side(b, case, "reference", reference)
    train_side(b, case, "ours", ours, finisher(b, cfg, ref_row, lambda: net[0] if net else None))


def full_case(b: Bench, batch: int) -> None:
    case = {"case": "full", "batch": batch, "grad_ckpt": True}
    cfg = TrainConfig(batch_size=batch, precision=PRECISION[b.dtype], gradient_checkpointing=True)

    def trainable(model, is_ref: bool):
        def teardown():
            for p in model.parameters():
                p.data, p.grad = p.data.to(b.dtype), None
            model.requires_grad_(False).eval()
            model.disable_gradient_checkpointing() if is_ref else model.set_gradient_checkpointing(False)

        def setup(undo: list):  # fp32 masters replace the bf16 weights (freed: the peak counts the growth)
            undo.append(teardown)
            for p in model.parameters():
                p.data = p.data.float()
            model.requires_grad_(True).train()
            model.enable_gradient_checkpointing() if is_ref else model.set_gradient_checkpointing(True)
            return model, is_ref, list(model.parameters())
        return setup

    ref_row = None
    if b.pipe is not None:
        ref_row = train_side(b, case, "reference", trainable(b.pipe.unet, True), lambda row, _: mfu(b, row))
    train_side(b, case, "ours", trainable(b.ours.unet, False), finisher(b, cfg, ref_row, full=True))


def failure(e: Exception) -> dict:
    """What a row says of a failed measurement: an out-of-memory, or the error (its traceback printed)."""
    if isinstance(e, torch.OutOfMemoryError):
        return {"oom": True}
    traceback.print_exc()
    return {"error": f"{type(e).__name__}: {e}"}


def missing(b: Bench, package: str, row: dict) -> bool:
    """Whether `package` cannot be imported (then a row says so)."""
    try:
        __import__(package)
        return False
    except ImportError as e:
        b.add({**row, "error": f"{package} missing ({e}): install it from a carried wheel"})
        return True


# ---- main --------------------------------------------------------------------------------------------------------

def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every case on the CPU, tiny preset, 32 px, 2 steps")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--config", choices=list(PRESETS), default=None, help="default sdxl-base (tiny with --smoke)")
    p.add_argument("--size", type=int, default=None, help="image side (default 1024; 32 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 30; 2 with --smoke)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="generation and full fine-tune batches")
    p.add_argument("--iters", type=int, default=None, help="timed generation calls per side (default 2; 1 smoke)")
    p.add_argument("--train_iters", type=int, default=None, help="timed training steps (default 5; 1 smoke)")
    p.add_argument("--compile_scope", choices=["unet", "blocks"], default="unet")
    p.add_argument("--compile_backend", default=None,
                   help="inductor (default; eager with --smoke); none: the compile case runs uncompiled")
    p.add_argument("--peak_tflops", type=float, default=PEAK_TFLOPS, help="the GPU's bf16 dense peak (MFU)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="start no case after this many seconds (default 450; 110 with --smoke)")
    p.add_argument("--out", default=None, help="default bench/results/<device>-gpu.json")
    a = p.parse_args(argv)
    s = a.smoke
    for k, gpu, smoke in (("config", "sdxl-base", "tiny"), ("size", 1024, 32), ("steps", 30, 2), ("iters", 2, 1),
                          ("train_iters", 5, 1), ("compile_backend", "inductor", "eager"), ("budget_s", 450, 110)):
        if getattr(a, k) is None:
            setattr(a, k, smoke if s else gpu)
    if a.steps < 2 or a.size % 8:
        p.error("--steps must be at least 2 and --size a multiple of 8")
    return a


def main(argv=None) -> None:
    a = parse(argv)
    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # tiny ops: more threads only contend on a shared machine
    name = "cpu-smoke" if a.smoke else device_name(device)
    b = Bench(a, device, torch.bfloat16 if device.type == "cuda" else torch.float32, a.size, a.steps,
              Path(a.out or Path(__file__).parent / "results" / f"{name}-gpu.json"))
    versions = {}
    for lib in ("diffusers", "peft", "transformers"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            versions[lib] = None
    b.doc = {"bench": "gpu", "device": name, "torch": torch.__version__, **versions,
             "date": datetime.date.today().isoformat(), "config": a.config, "size": a.size, "steps": a.steps,
             "dtype": str(b.dtype).removeprefix("torch."), "compile_scope": a.compile_scope,
             "compile_backend": a.compile_backend, "peak_tflops": a.peak_tflops, "rows": []}
    build(b, a.config)
    b.add({"case": "setup", "build_s": time.perf_counter() - b.t0, "resident_gib": b.fresh() / GIB if b.gpu else None})
    plan = [("generate-eager", lambda n: generate_case(b, "eager", n), a.batches),
            ("lora", lambda n: lora_case(b, n), [1]), ("full", lambda n: full_case(b, n), a.batches),
            ("generate-compile", lambda n: generate_case(b, "compile", n), a.batches)]
    compiled = False
    for case, run, batches in plan:
        for n in batches if case in a.cases else []:
            if time.perf_counter() - b.t0 > a.budget_s:
                b.add({"case": case, "batch": n, "skipped": f"past --budget_s {a.budget_s:g}"})
                continue
            try:  # a failure is a row: the cases after it still run
                if case == "generate-compile" and not compiled:
                    compiled = True
                    compile_unets(b)
                run(n)
            except Exception as e:  # noqa: BLE001
                b.add({"case": case, "batch": n, **failure(e)})
    print(f"wrote {b.out} ({time.perf_counter() - b.t0:.1f} s)")


if __name__ == "__main__":
    main()

"""Peak resident memory of loading the full sdxl-base: ours vs diffusers, each in a fresh process.

    nice -n 19 python bench/load_rss.py [--keep DIR] [--no-reference]

Writes (once, in a temporary folder; ~7 GB each, ~15 GB free disk needed) an sdxl-base single file in fp16 with
the published key names and no config metadata (read as sdxl-base from its keys, as sd_xl_base_1.0.safetensors
is), and the same weights as a diffusers folder. The weights are uninitialised memory: loading does not look at
the values. Then each load runs in a fresh subprocess that reports its own peak RSS (getrusage ru_maxrss) and
its RSS before loading (Python + torch + transformers), and the temporary files are deleted. After loading, the
child reads one element per page of every tensor, so that weights a loader left as views of a memory-mapped
file (file-backed pages, resident only once touched) count as they will at the first forward pass. The load
times include reading the file from disk or page cache, whichever it is in: not a speed comparison.

"Loading holds one copy" means peak - baseline close to the loaded model's size: fp16 6.94 GB, fp32 13.9 GB.
Writes bench/results/cpu-load_rss.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

AS_LIMIT = 20 * 2**30
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Run in the child: load, then report peak RSS and the model's tensor bytes as one JSON line.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
import sdxl.model, transformers
def rss():  # current resident set, bytes
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
base = rss()
t0 = time.perf_counter()
{load}
seconds = time.perf_counter() - t0
tensors = [*model.parameters(), *model.buffers()]
# Read one element per page of every tensor, as a first forward pass would: a loader that hands out views of a
# memory-mapped file has not read the weights yet, and its pages only count as resident once touched.
touched = [t.flatten()[::1024].float().sum() for t in tensors]  # 1024 elements >= one 4 KiB page
storages = {{t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}}
print(json.dumps({{"baseline_rss": base, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "model_bytes": sum(storages.values()), "seconds": seconds}}))
"""

LOADS = {
    "ours": "model = sdxl.model.load_model({path!r}, dtype=torch.{dtype})",
    # The reference library: the single file with our folder as its config (no network), and from_pretrained.
    "diffusers": ("from diffusers import StableDiffusionXLPipeline as P\n"
                  "kw = dict(torch_dtype=torch.{dtype}, local_files_only=True)\n"
                  "model = (P.from_single_file({path!r}, config={folder!r}, **kw) if {path!r}.endswith('.safetensors')"
                  " else P.from_pretrained({path!r}, **kw))\n"
                  "model = torch.nn.ModuleList([model.unet, model.vae, model.text_encoder, model.text_encoder_2])"),
}


def write_files(tmp: Path) -> tuple[Path, Path]:
    """sdxl-base as a single file and a diffusers folder, fp16, built on meta and given uninitialised storage."""
    from sdxl.config import SDXL_BASE
    from sdxl.model import build_model
    from sdxl.weights import save_safetensors
    with torch.device("meta"):
        model = build_model(SDXL_BASE).to(torch.float16)
    model.to_empty(device="cpu")  # torch.empty: pages are only touched when written out
    single, folder = tmp / "sd_xl_base.safetensors", tmp / "sdxl-base"
    save_safetensors(model.original_state_dict(), single, metadata={"format": "pt"})  # no config: as published
    model.save_pretrained(folder)
    return single, folder


def measure(kind: str, path: Path, folder: Path, dtype: str) -> dict:
    code = CHILD.format(root=str(ROOT), load=LOADS[kind].format(path=str(path), folder=str(folder), dtype=dtype))
    # An address-space cap, so that a loader that needs more than the machine has fails alone (MemoryError)
    # instead of calling the OOM killer onto a shared machine.
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))  # noqa: E731
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=cap)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, help="write the files here and keep them (default: a deleted temp dir)")
    ap.add_argument("--no-reference", action="store_true", help="skip the diffusers rows")
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="sdxl-load-rss-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(tmp).free < 15e9:
        sys.exit(f"{tmp}: needs ~15 GB free disk for two fp16 copies of sdxl-base")
    try:
        single, folder = (tmp / "sd_xl_base.safetensors", tmp / "sdxl-base")
        if not (folder / "model_index.json").is_file():
            # A child process, so the writer's memory is gone before the measurements.
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                            f"from pathlib import Path; from bench.load_rss import write_files; "
                            f"write_files(Path({str(tmp)!r}))"], check=True)
        file_bytes = single.stat().st_size
        cases = [("single file", single, "float16"), ("single file", single, "float32"),
                 ("diffusers folder", folder, "float16"), ("diffusers folder", folder, "float32")]
        rows = []
        for source, path, dtype in cases:
            # diffusers only in fp16: its fp32 single-file load would need more than this 24 GB machine has.
            reference = not args.no_reference and dtype == "float16"
            for kind in ["ours"] + (["diffusers"] if reference else []):
                r = {"source": source, "dtype": dtype, "loader": kind, **measure(kind, path, folder, dtype)}
                rows.append(r)
                if "error" in r:
                    print(f"{source:16s} {dtype:8s} {kind:9s} error: {r['error']}", flush=True)
                    continue
                r["load_gb"] = (r["peak_rss"] - r["baseline_rss"]) / 1e9
                r["copies"] = (r["peak_rss"] - r["baseline_rss"]) / r["model_bytes"]
                print(f"{source:16s} {dtype:8s} {kind:9s} model {r['model_bytes'] / 1e9:6.2f} GB  peak RSS "
                      f"{r['peak_rss'] / 1e9:6.2f} GB  (baseline {r['baseline_rss'] / 1e9:4.2f})  peak - baseline = "
                      f"{r['copies']:.2f} x model  {r['seconds']:6.1f} s", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    import diffusers
    result = {"bench": "load_rss", "device": "cpu", "cpu": platform.machine(), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "date": datetime.date.today().isoformat(),
              "file_bytes": file_bytes, "rows": rows}
    out = ROOT / "bench" / "results" / "cpu-load_rss.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

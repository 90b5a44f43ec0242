"""Fine-tune SDXL, full or LoRA, on one GPU, many (torchrun), or the CPU.

    python train_sdxl.py --pretrained_model sdxl-base-folder --data_dir imgs --use_lora --lora_rank 16 \
        --batch_size 4 --max_steps 2000 --output_dir out/lora
    torchrun --nproc_per_node 8 train_sdxl.py ... (DDP)
    python train_sdxl.py --config run.toml --learning_rate 5e-5    (flags override the file)

Writes <out>/config.json, metrics.jsonl, checkpoints/step_NNNNNN/, samples/, and lora_final.safetensors
(kohya keys) or final/ (diffusers layout). `--resume latest` continues bit-identically.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from training.config import ConfigError, parse_config, validate
    try:
        cfg, given = parse_config(argv)
        validate(cfg, given)
    except ConfigError as e:
        print(f"train_sdxl.py: error: {e}", file=sys.stderr)
        return 2
    from sdxl.weights import CheckpointError
    from training.data import DatasetError
    from training.loop import main as train
    try:
        return train(cfg)
    except (ConfigError, CheckpointError, DatasetError, FileNotFoundError) as e:
        print(f"train_sdxl.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Trainer benchmark on one GPU (an H200: a few minutes of device time): Kubetune vs HF Trainer + PEFT vs TRL
# SFTTrainer (packing, padding-free), Llama-3-8B shape with random bf16 weights, max length 2048.
# Assumes .venv exists (no `make venv`). STEPS / BATCH override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
nvidia-smi
$PY - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "trl", "accelerate", "flash_attn", "liger_kernel"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        print(f"{name} not installed")
import torch
print(f"cuda {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
timeout 540 $PY bench/bench_trainer.py --device cuda --model llama3-8b-shape --seq-len 2048 \
  --steps "${STEPS:-14}" --warmup 4 --batch-size "${BATCH:-4}" --samples 2000 --sides kubetune,hf,trl

"""Shared test data for the trainer's data stage: a tiny locally trained tokenizer and record writers."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes; a Job runs pods to completion.",
    "Translate to French: good morning -> bonjour. Thank you -> merci.",
    "What is the capital of France? Paris is the capital of France.",
    "You are a helpful assistant. Answer briefly and politely.",
    "def add(a, b):\n    return a + b\n",
    "Summarize: fine-tuning adapts a pretrained model to a task with a small dataset.",
]

CHAT = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]}
INSTRUCTION = {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"}
COMPLETION = {"prompt": "The capital of France is", "completion": " Paris."}
TEXT = {"text": "Kubernetes schedules pods onto nodes."}


@cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in well under a second on CORPUS (no hub download)."""
    from kubetune_dev.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 4, vocab_size=512)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path

"""Tiny Llama base models built from scratch, for the demo, the tests and CPU benchmarks (no download).

`make_tiny_base` trains a byte-level BPE tokenizer on some texts, builds a small `LlamaForCausalLM` with
random weights and, optionally, pre-trains it for a few hundred CPU steps so it writes plausible words.
The folder it saves is an ordinary Hugging Face model folder: the `Auto*` classes, `kubetune run` and
`PeftModel.from_pretrained` load it like any other base model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch


def tiny_config(tokenizer, *, hidden_size: int = 128, layers: int = 2, heads: int = 4,
                max_positions: int = 2048):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=32 * math.ceil(hidden_size * 8 / 3 / 32),  # Llama's 8/3 ratio, rounded up to 32
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def llama3_8b_config(**overrides):
    """A LlamaConfig shaped like Meta-Llama-3-8B (8.03B parameters), for benchmarks with random weights."""
    from transformers import LlamaConfig

    shape = dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )
    return LlamaConfig(**{**shape, **overrides})


def pretrain(model, tokenizer, texts: list[str], steps: int, *, seq_len: int = 128, batch_size: int = 8,
             lr: float = 3e-3, seed: int = 0, log=print) -> float:
    """Causal-LM training on `texts` joined by EOS, cut into `seq_len` blocks; returns the last loss."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    if len(blocks) == 0:
        raise ValueError(f"pretrain: the texts hold fewer than seq_len={seq_len} tokens")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    loss = torch.tensor(float("nan"))
    start = time.monotonic()
    for step in range(1, steps + 1):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log and (step % 50 == 0 or step == steps):
            log(f"pretrain step {step}/{steps} loss {loss.item():.3f} ({time.monotonic() - start:.0f}s)")
    model.eval()
    return loss.item()


def make_tiny_base(out_dir: Path, texts: list[str], *, vocab_size: int = 2048, hidden_size: int = 128,
                   layers: int = 2, heads: int = 4, pretrain_steps: int = 0, seed: int = 0, log=None) -> Path:
    """Save a tiny Llama (tokenizer trained on `texts`) to `out_dir` and return it.

    With pretrain_steps > 0 the random model is first trained on the texts as a plain language model.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    from .tokenizer import train_tokenizer

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, hidden_size=hidden_size, layers=layers, heads=heads))
    if pretrain_steps:
        pretrain(model, tokenizer, texts, pretrain_steps, seed=seed, log=log)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

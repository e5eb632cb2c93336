"""Training throughput of the Kubetune trainer against a stock Hugging Face `Trainer` + PEFT script.

Both sides train the same LoRA (same r, alpha, target modules) on the same base model and the same
variable-length text data (log-uniform, about 16..512 tokens), with the same batch size (sequences),
learning rate, scheduler, number of optimizer steps and maximum sequence length:

* kubetune: `kubetune_trainer.pipeline.run` on a local-path TrainerConfig (packing on, as by default);
* hf: `transformers.Trainer` on the pre-tokenized samples, padded by the collator either to the longest
  sample of each batch (`--hf-padding longest`, dynamic padding) or to the maximum length (`max_length`).

Throughput counts only real tokens (no padding) and only the optimizer steps after the first `--warmup`
ones; loading the model and tokenizing the data are not timed on either side. With packing, a batch of
the same number of sequences holds more real tokens, which is the point of packing. Each side runs in
its own process, one after the other (`--repeats`: alternating, best run kept, for noisy shared machines).
The result is a markdown snippet on stdout.

MFU (`--device cuda`) = tokens/s x FLOPs per token / the device's peak dense bf16 FLOP/s, with
FLOPs per token = 6 N + 12 L d <n>: N the base model's parameters that take part in matrix multiplies
(all but the input embedding; the LM head counts once even when tied), L layers, d hidden size and
<n> = sum(n^2) / sum(n) over the samples' lengths n (the attention term of the PaLM paper's appendix B,
per sample, since packed samples do not attend to each other). This is the usual "6N" convention; with
LoRA the frozen weights get no weight gradients, so the work actually done is closer to 4 N per token.

    python bench/bench_trainer.py --device cpu --model tiny --steps 30
    python bench/bench_trainer.py --device cuda --model llama3-8b-shape --steps 40   # random bf16 weights
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Peak dense (no sparsity) bf16 tensor-core FLOP/s by device name, from the vendors' data sheets.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
             ("A10G", 70e12), ("A10", 125e12)]


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


# -- preparation: data and base model -----------------------------------------------------------------

def prepare(args, work: Path) -> tuple[Path, Path]:
    from kubetune_trainer.data import train_tokenizer
    from kubetune_trainer.demo_data import benchmark_texts, generic_texts, write_benchmark_dataset
    from kubetune_trainer.tiny import llama3_8b_config, make_tiny_base

    data = write_benchmark_dataset(work / "data", n=args.samples, seed=args.seed)
    texts = generic_texts(1500) + benchmark_texts(200, seed=args.seed + 1)
    if args.model == "tiny":
        return make_tiny_base(work / "model", texts, seed=args.seed), data
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size=2048)
    config = llama3_8b_config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)  # random weights, bf16
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    del model
    torch.cuda.empty_cache()  # the two sides run in child processes and need the GPU memory
    return work / "model", data


def sample_lengths(model_dir: Path, data: Path, max_len: int) -> list[list[int]]:
    """The samples as token ids, as the kubetune trainer makes them from text records: bos text eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    return [(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])[:max_len] for t in texts]


# -- the two sides, each in its own process ---------------------------------------------------------

def rate(times: list[float], tokens: list[int], warmup: int) -> dict:
    """Real tokens per second over the steps after `warmup`; times[i] is when step i+1 ended,
    times[0] the start of step 1 (len(times) == len(tokens) + 1)."""
    seconds = times[-1] - times[warmup]
    counted = sum(tokens[warmup:])
    return {"tokens_per_second": counted / seconds, "seconds": seconds, "tokens": counted,
            "steps": len(tokens) - warmup}


def run_kubetune(args, model_dir: Path, data: Path, work: Path) -> dict:
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.pipeline import run

    config = TrainerConfig.model_validate({
        "jobName": "bench",
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"train": str(data), "format": "text"},
        "method": {"type": "lora", "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0,
                                            "targetModules": args.targets}},
        "hyperparameters": {"maxSteps": args.steps, "learningRate": args.lr, "batchSize": args.batch_size,
                            "maxSeqLength": args.seq_len, "packing": True, "scheduler": "linear",
                            "warmupRatio": 0.0, "loggingSteps": 1, "seed": args.seed,
                            "precision": "bf16" if args.device == "cuda" else "fp32"},
        "output": {"uri": str(work / "out")},
        "metrics": {"enabled": False},
        "workDir": str(work / "trainer"),
    })
    times: list[float] = []
    tokens: list[int] = []
    last_time = 0.0

    def report(event: dict) -> None:
        nonlocal last_time
        now = time.perf_counter()
        if event["event"] == "plan":
            times.append(now)
        elif event["event"] == "train":  # loggingSteps 1: one event per step, after its .item() sync
            tokens.append(round(event["tokens_per_second"] * (now - times[-1])))
            times.append(now)

    run(config, report=report)
    return rate(times, tokens, args.warmup)


def run_hf(args, model_dir: Path, samples: list[list[int]], work: Path) -> dict:
    """What a typical `transformers.Trainer` + PEFT fine-tuning script does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    cuda = args.device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    targets = "all-linear" if args.targets == ["all-linear"] else args.targets
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    batch_tokens: list[int] = []  # real tokens per collated batch, in order (the loader may run ahead)

    def collate(features: list[dict]) -> dict:
        batch = tokenizer.pad(features, padding=args.hf_padding, max_length=args.seq_len, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            if not times:
                times.append(time.perf_counter())

        def on_step_end(self, _args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        max_steps=args.steps, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to="none", seed=args.seed,
        bf16=cuda, use_cpu=not cuda, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, optim="adamw_torch_fused" if cuda else "adamw_torch",
    )
    dataset = [{"input_ids": ids} for ids in samples]
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                      callbacks=[Clock()])
    trainer.train()
    return rate(times, batch_tokens[: args.steps], args.warmup)


def side(args) -> None:
    """One side, in this process; the result as JSON to --result."""
    work = Path(args.work_dir)
    model_dir, data = work / "model", work / "data" / "bench.jsonl"
    if args.threads:
        torch.set_num_threads(args.threads)
    shutil.rmtree(work / args.side, ignore_errors=True)  # else a published output is reused, not trained
    if args.side == "kubetune":
        result = run_kubetune(args, model_dir, data, work / "kubetune")
    else:
        result = run_hf(args, model_dir, sample_lengths(model_dir, data, args.seq_len), work / "hf")
    if args.device == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.result).write_text(json.dumps(result))


# -- orchestration and report -----------------------------------------------------------------------

def model_facts(model_dir: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    matmul = total - (0 if c.tie_word_embeddings else embedding)
    return {"params": total, "matmul_params": matmul, "layers": c.num_hidden_layers, "hidden": c.hidden_size}


def flops_per_token(facts: dict, samples: list[list[int]]) -> float:
    lengths = [len(s) for s in samples]
    mean_attended = sum(n * n for n in lengths) / sum(lengths)
    return 6 * facts["matmul_params"] + 12 * facts["layers"] * facts["hidden"] * mean_attended


def markdown(args, facts: dict, samples: list[list[int]], results: dict, peak: float | None) -> str:
    threads = args.threads or torch.get_num_threads()
    device = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"CPU ({platform.machine()}, {threads} torch threads)")
    lengths = sorted(len(s) for s in samples)
    real = sum(lengths)
    padded = len(lengths) * args.seq_len
    lines = [
        f"### Trainer throughput: {args.model} on {device}",
        "",
        f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {', '.join(args.targets)}; "
        f"{facts['params'] / 1e6:,.1f}M-parameter base ({'bf16' if args.device == 'cuda' else 'fp32'}); "
        f"batch {args.batch_size} sequences, max length {args.seq_len}, lr {args.lr}, {args.steps} steps "
        f"(first {args.warmup} not timed, best of {args.repeats} runs); "
        f"{len(lengths)} samples of {lengths[0]}..{lengths[-1]} tokens "
        f"(median {lengths[len(lengths) // 2]}, {real / padded:.0%} of a max-length padded batch is real).",
        "",
        "| trainer | real tokens/s | relative |" + (" MFU (6N) | peak memory |" if peak else ""),
        "|---|---:|---:|" + ("---:|---:|" if peak else ""),
    ]
    baseline = results["hf"]["tokens_per_second"]
    names = {"kubetune": "Kubetune (packing)", "hf": f"HF Trainer + PEFT (padding={args.hf_padding})"}
    for key in ("kubetune", "hf"):
        r = results[key]
        row = f"| {names[key]} | {r['tokens_per_second']:,.0f} | {r['tokens_per_second'] / baseline:.2f}x |"
        if peak:
            mfu = r["tokens_per_second"] * flops_per_token(facts, samples) / peak
            row += f" {mfu:.1%} | {r.get('max_memory_gib', float('nan')):.1f} GiB |"
        lines.append(row)
    ratio = results["kubetune"]["tokens_per_second"] / baseline
    lines += ["", f"Kubetune / HF Trainer: **{ratio:.2f}x** real tokens per second."]
    if peak:
        lines.append(f"MFU: peak {peak / 1e12:,.0f} TFLOP/s bf16 dense; "
                     f"{flops_per_token(facts, samples) / 1e9:,.2f} GFLOP per token (6N + attention).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["tiny", "llama3-8b-shape"], default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--targets", nargs="+", default=["all-linear"])
    parser.add_argument("--hf-padding", choices=["longest", "max_length"], default="longest")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run both sides this many times, alternating, and keep each one's best")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in both sides (0: default)")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s, for MFU on an unlisted device")
    parser.add_argument("--work-dir", help="keep files here (default: a temporary folder)")
    parser.add_argument("--side", choices=["kubetune", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.steps <= args.warmup:
        parser.error("--steps must be more than --warmup")
    if args.side:
        return side(args)

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        print(f"preparing {args.model} model and data in {work}", file=sys.stderr, flush=True)
        model_dir, data = prepare(args, work)
        results: dict[str, dict] = {}
        for attempt in range(args.repeats):
            for name in ("hf", "kubetune"):
                print(f"running {name} ({attempt + 1}/{args.repeats})", file=sys.stderr, flush=True)
                result_file = work / f"{name}.json"
                command = [sys.executable, __file__, *sys.argv[1:], "--work-dir", str(work), "--side", name,
                           "--result", str(result_file)]
                subprocess.run(command, check=True, stdout=sys.stderr)
                result = json.loads(result_file.read_text())
                print(f"{name}: {result}", file=sys.stderr, flush=True)
                if result["tokens_per_second"] > results.get(name, {}).get("tokens_per_second", 0):
                    results[name] = result
        samples = sample_lengths(model_dir, data, args.seq_len)
        print(markdown(args, model_facts(model_dir), samples, results,
                       peak_flops(args.device, args.peak_tflops)))


if __name__ == "__main__":
    main()

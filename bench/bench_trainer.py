"""Training throughput and peak memory of the Kubetune trainer against stock Hugging Face training scripts.

Every side trains the same LoRA (same r, alpha, target modules) on the same base model and the same
variable-length text data (log-uniform, about 16..512 tokens), with the same batch size (sequences),
learning rate, scheduler, number of optimizer steps and maximum sequence length (`--sides`, comma-separated;
default kubetune,hf on cpu and kubetune,hf,trl on cuda):

* kubetune: `kubetune_trainer.pipeline.run` on a local-path TrainerConfig (packing on, as by default);
* hf: `transformers.Trainer` on the pre-tokenized samples, padded by the collator either to the longest
  sample of each batch (`--hf-padding longest`, dynamic padding) or to the maximum length (`max_length`);
* trl: TRL's `SFTTrainer` on the same pre-tokenized samples (a `datasets.Dataset` of input_ids), with
  `packing=True, packing_strategy="bfd", padding_free=True` (a batch = that many packed rows, flattened).

hf and trl load the model with `attn_implementation` flash_attention_2 where flash_attn is installed on CUDA,
else sdpa; gradient checkpointing is off on every side (TRL's default would turn it on); bf16 on CUDA,
fp32 on CPU. The output names the choices.

Throughput counts only real tokens (no padding) and only the optimizer steps after the first `--warmup`
ones; loading the model and tokenizing the data are not timed on either side. With packing, a batch of
the same number of sequences holds more real tokens, which is the point of packing. Each side runs in
its own process, one after the other (`--repeats`: alternating, best run kept, for noisy shared machines).
The result is a markdown snippet on stdout.

Peak memory, per side and relative to the baseline (the stock HF script): on CUDA
`torch.cuda.max_memory_allocated()`, reset once the model is loaded; on CPU the child process's peak RSS
(VmHWM, the counter behind `getrusage(RUSAGE_SELF).ru_maxrss`), reset once the model is loaded by writing 5 to
/proc/self/clear_refs (Linux; where that fails, the lifetime ru_maxrss).

`--loss-kernels chunked,full` compares Kubetune's cross-entropy implementations instead: only the Kubetune
side, once per value of `hyperparameters.performance.loss`, reporting tokens/s and peak memory relative to
`full`. For the logits to weigh on CPU use `--model tiny-32k`: a tiny Llama (hidden 128, 2 layers, random
weights) with 32,000-wide logits; its BPE tokenizer, trained on the bench texts, has fewer ids than that,
which does not matter since only the width of the logits does.

MFU (`--device cuda`) = tokens/s x FLOPs per token / the device's peak dense bf16 FLOP/s, with
FLOPs per token = 6 N + 12 L d <n>: N the base model's parameters that take part in matrix multiplies
(all but the input embedding; the LM head counts once even when tied), L layers, d hidden size and
<n> = sum(n^2) / sum(n) over the samples' lengths n (the attention term of the PaLM paper's appendix B,
per sample, since packed samples do not attend to each other). This is the usual "6N" convention; with
LoRA the frozen weights get no weight gradients, so the work actually done is closer to 4 N per token.

    python bench/bench_trainer.py --device cpu --model tiny --steps 30 --sides kubetune,hf,trl
    python bench/bench_trainer.py --device cpu --model tiny-32k --seq-len 2048 --batch-size 2 \\
        --loss-kernels chunked,full --steps 6 --warmup 2
    python bench/bench_trainer.py --device cuda --model llama3-8b-shape --steps 40   # random bf16 weights
    bench/gpu.sh   # the same at --seq-len 2048 with all three sides, sized for a few minutes on one H200
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
TINY_32K_VOCAB = 32000


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


# -- preparation: data and base model -----------------------------------------------------------------

def prepare(args, work: Path) -> tuple[Path, Path]:
    from kubetune_dev.demo_data import benchmark_texts, generic_texts, write_benchmark_dataset
    from kubetune_dev.tiny import llama3_8b_config, make_tiny_base, tiny_config
    from kubetune_dev.tokenizer import train_tokenizer

    data = write_benchmark_dataset(work / "data", n=args.samples, seed=args.seed)
    texts = generic_texts(1500) + benchmark_texts(200, seed=args.seed + 1)
    if args.model == "tiny":
        return make_tiny_base(work / "model", texts, seed=args.seed), data
    from transformers import LlamaForCausalLM

    if args.model == "tiny-32k":
        # A BPE tokenizer trained on these few texts stops short of 32,000 merges; the model's vocabulary (the
        # width of the logits, which is what the loss kernels are about) is 32,000 regardless: random weights,
        # the rows past the tokenizer's ids are never a label but are in every softmax.
        tokenizer = train_tokenizer(texts, vocab_size=TINY_32K_VOCAB)
        config = tiny_config(tokenizer)
        config.vocab_size = max(TINY_32K_VOCAB, len(tokenizer))
        torch.manual_seed(args.seed)
        LlamaForCausalLM(config).save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        return work / "model", data

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


# -- the sides, each in its own process ---------------------------------------------------------------

def reset_peak_memory(cuda: bool) -> None:
    """Start the peak-memory count here (after loading): CUDA's allocator peak, or on CPU the process's
    peak RSS (VmHWM, the counter behind ru_maxrss), which Linux resets on writing 5 to clear_refs."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the lifetime peak (loading included) is what ru_maxrss gives


def peak_memory(cuda: bool) -> dict:
    """The training peak in bytes (see reset_peak_memory), and how it was measured."""
    if cuda:
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_kind": "CUDA allocated"}
    import resource

    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    try:
        status = Path("/proc/self/status").read_text()
        hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return {"peak_memory_bytes": lifetime, "peak_memory_kind": "peak RSS (ru_maxrss, incl. loading)"}
    return {"peak_memory_bytes": hwm, "peak_memory_kind": "peak RSS during training",
            "peak_rss_lifetime_bytes": lifetime}


def attn_implementation(args) -> str:
    """For the HF and TRL sides: FlashAttention 2 where installed on CUDA (varlen: padding-free packed rows
    attend only within their samples), else SDPA (transformers turns the packed position_ids into a
    block-diagonal mask)."""
    if args.device == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def rate(times: list[float], tokens: list[int], warmup: int) -> dict:
    """Real tokens per second over the steps after `warmup`; times[i] is when step i+1 ended,
    times[0] the start of step 1 (len(times) == len(tokens) + 1)."""
    seconds = times[-1] - times[warmup]
    counted = sum(tokens[warmup:])
    return {"tokens_per_second": counted / seconds, "seconds": seconds, "tokens": counted,
            "steps": len(tokens) - warmup}


def run_kubetune(args, model_dir: Path, data: Path, work: Path) -> dict:
    from kubetune_api import TrainerConfig
    from kubetune_trainer.pipeline import run

    cuda = args.device == "cuda"
    hyperparameters = {"maxSteps": args.steps, "learningRate": args.lr, "batchSize": args.batch_size,
                       "maxSeqLength": args.seq_len, "packing": True, "scheduler": "linear",
                       "warmupRatio": 0.0, "loggingSteps": 1, "seed": args.seed,
                       "precision": "bf16" if cuda else "fp32"}
    if args.loss:
        hyperparameters["performance"] = {"loss": args.loss}
    config = TrainerConfig.model_validate({
        "jobName": "bench",
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"train": str(data), "format": "text"},
        "method": {"type": "lora", "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0,
                                            "targetModules": args.targets}},
        "hyperparameters": hyperparameters,
        "output": {"uri": str(work / "out")},
        "metrics": {"enabled": False},
        "workDir": str(work / "trainer"),
    })
    times: list[float] = []
    tokens: list[int] = []
    kernels: dict = {}

    def report(event: dict) -> None:
        now = time.perf_counter()
        if event["event"] == "kernels":
            kernels.update({k: v for k, v in event.items() if k != "event"})
        elif event["event"] == "plan":  # the model is loaded: training starts
            reset_peak_memory(cuda)
            times.append(time.perf_counter())
        elif event["event"] == "train":  # loggingSteps 1: one event per step, after its .item() sync
            tokens.append(round(event["tokens_per_second"] * (now - times[-1])))
            times.append(now)

    run(config, report=report)
    return {**rate(times, tokens, args.warmup), **peak_memory(cuda), "kernels": kernels}


def hf_clock(cuda: bool, times: list[float]):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, _args, state, control, **kwargs):
            reset_peak_memory(cuda)

        def on_step_begin(self, _args, state, control, **kwargs):
            if not times:
                times.append(time.perf_counter())

        def on_step_end(self, _args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    return Clock()


def common_training_args(args, work: Path) -> dict:
    cuda = args.device == "cuda"
    return dict(
        output_dir=str(work), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        max_steps=args.steps, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to="none", seed=args.seed,
        bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, gradient_checkpointing=False,
        disable_tqdm=True, optim="adamw_torch_fused" if cuda else "adamw_torch",
    )


def load_base(args, model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
        attn_implementation=attn_implementation(args))


def lora_config(args):
    from peft import LoraConfig

    targets = "all-linear" if args.targets == ["all-linear"] else args.targets
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")


def run_hf(args, model_dir: Path, samples: list[list[int]], work: Path) -> dict:
    """What a typical `transformers.Trainer` + PEFT fine-tuning script does."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    cuda = args.device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(load_base(args, model_dir), lora_config(args))
    batch_tokens: list[int] = []  # real tokens per collated batch, in order (the loader may run ahead)

    def collate(features: list[dict]) -> dict:
        batch = tokenizer.pad(features, padding=args.hf_padding, max_length=args.seq_len, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    times: list[float] = []
    training_args = TrainingArguments(**common_training_args(args, work), remove_unused_columns=False)
    dataset = [{"input_ids": ids} for ids in samples]
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                      callbacks=[hf_clock(cuda, times)])
    trainer.train()
    return {**rate(times, batch_tokens[: args.steps], args.warmup), **peak_memory(cuda),
            "attn_implementation": attn_implementation(args)}


def run_trl(args, model_dir: Path, samples: list[list[int]], work: Path) -> dict:
    """TRL's SFTTrainer as its docs recommend for throughput: BFD packing into rows of max_length, padding-free
    (the packed rows of a batch are flattened into one sequence with position_ids, no padding)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = args.device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = SFTConfig(**common_training_args(args, work), max_length=args.seq_len, packing=True,
                       packing_strategy="bfd", padding_free=True, completion_only_loss=False)
    times: list[float] = []
    trainer = SFTTrainer(model=load_base(args, model_dir), args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"input_ids": samples}), peft_config=lora_config(args),
                         callbacks=[hf_clock(cuda, times)])
    batch_tokens: list[int] = []
    collate = trainer.data_collator  # TRL's own (a custom one is refused with padding-free); count around it

    def counting(features: list[dict]) -> dict:
        batch = collate(features)
        mask = batch.get("attention_mask")
        batch_tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    return {**rate(times, batch_tokens[: args.steps], args.warmup), **peak_memory(cuda),
            "attn_implementation": attn_implementation(args)}


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
        run = run_hf if args.side == "hf" else run_trl
        result = run(args, model_dir, sample_lengths(model_dir, data, args.seq_len), work / args.side)
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
    return {"params": total, "matmul_params": matmul, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "vocab": c.vocab_size}


def flops_per_token(facts: dict, samples: list[list[int]]) -> float:
    lengths = [len(s) for s in samples]
    mean_attended = sum(n * n for n in lengths) / sum(lengths)
    return 6 * facts["matmul_params"] + 12 * facts["layers"] * facts["hidden"] * mean_attended


def runs(args) -> list[tuple[str, str, list[str]]]:
    """(result key, row label, extra child arguments) for each run."""
    if args.loss_kernels:
        return [(f"kubetune:{loss}", f"Kubetune (packing), loss={loss}", ["--side", "kubetune", "--loss", loss])
                for loss in args.loss_kernels]
    names = {"kubetune": "Kubetune (packing)", "hf": f"HF Trainer + PEFT (padding={args.hf_padding})",
             "trl": "TRL SFTTrainer (packing=bfd, padding_free)"}
    return [(name, names[name], ["--side", name]) for name in args.sides]


def markdown(args, facts: dict, samples: list[list[int]], results: dict, peak: float | None) -> str:
    threads = args.threads or torch.get_num_threads()
    device = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"CPU ({platform.machine()}, {threads} torch threads)")
    lengths = sorted(len(s) for s in samples)
    real = sum(lengths)
    padded = len(lengths) * args.seq_len
    planned = runs(args)
    keys = [key for key, _, _ in planned]
    # the baseline of the ratios: the stock HF script, or in the loss comparison the plain (full) loss
    base_key = next((k for k in ("hf", "kubetune:full") if k in keys), keys[0])
    base_label = dict((k, label) for k, label, _ in planned)[base_key]
    title = "Loss kernel memory" if args.loss_kernels else "Trainer throughput"
    lines = [
        f"### {title}: {args.model} on {device}",
        "",
        f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {', '.join(args.targets)}; "
        f"{facts['params'] / 1e6:,.1f}M-parameter base, vocabulary {facts['vocab']:,} "
        f"({'bf16' if args.device == 'cuda' else 'fp32'}); "
        f"batch {args.batch_size} sequences, max length {args.seq_len}, lr {args.lr}, {args.steps} steps "
        f"(first {args.warmup} not timed, best of {args.repeats} runs); "
        f"{len(lengths)} samples of {lengths[0]}..{lengths[-1]} tokens "
        f"(median {lengths[len(lengths) // 2]}, {real / padded:.0%} of a max-length padded batch is real).",
        "",
        "| trainer | real tokens/s | relative | peak memory | memory relative |" + (" MFU (6N) |" if peak else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if peak else ""),
    ]
    base = results[base_key]
    for key, label, _ in planned:
        r = results[key]
        memory = r["peak_memory_bytes"]
        row = (f"| {label} | {r['tokens_per_second']:,.0f} | {r['tokens_per_second'] / base['tokens_per_second']:.2f}x"
               f" | {memory / 2**30:,.2f} GiB | {memory / base['peak_memory_bytes']:.2f}x |")
        if peak:
            row += f" {r['tokens_per_second'] * flops_per_token(facts, samples) / peak:.1%} |"
        lines.append(row)
    lines.append("")
    for key, label, _ in planned:
        if key != base_key:
            r = results[key]
            lines.append(f"{label} / {base_label}: **{r['tokens_per_second'] / base['tokens_per_second']:.2f}x** "
                         f"real tokens per second, **{r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x** "
                         "peak memory.")
    kind = base["peak_memory_kind"]
    lines.append("")
    lines.append(f"Peak memory: {kind} (" + ("`torch.cuda.max_memory_allocated`, reset after loading the model)."
                 if args.device == "cuda" else "the child process's VmHWM / ru_maxrss, reset after loading the "
                 "model where Linux allows; it includes the resident model weights and libraries)."))
    attn = {results[k].get("attn_implementation") for k in keys} - {None}
    if attn:
        lines.append(f"HF/TRL attention: `attn_implementation={'/'.join(sorted(attn))}`; TRL: "
                     "`SFTConfig(packing=True, packing_strategy='bfd', padding_free=True)`, "
                     "gradient checkpointing off on every side (TRL's default is on).")
    choices = {k: results[k].get("kernels") for k in keys if results[k].get("kernels")}
    if choices:
        lines.append("Kubetune's kernel choices: " + "; ".join(
            f"{k}: " + ", ".join(f"{n}={v}" for n, v in c.items()) for k, c in choices.items()) + ".")
    if args.model == "tiny-32k":
        lines.append(f"tiny-32k: random weights, hidden {facts['hidden']}, {facts['layers']} layers, "
                     f"{facts['vocab']:,}-wide logits (its BPE tokenizer, trained on the bench texts, uses fewer ids).")
    if peak:
        lines.append(f"MFU: peak {peak / 1e12:,.0f} TFLOP/s bf16 dense; "
                     f"{flops_per_token(facts, samples) / 1e9:,.2f} GFLOP per token (6N + attention).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["tiny", "tiny-32k", "llama3-8b-shape"], default="tiny")
    parser.add_argument("--sides", type=lambda v: v.split(","),
                        help="comma-separated, of kubetune, hf, trl (default: kubetune,hf on cpu, "
                        "kubetune,hf,trl on cuda)")
    parser.add_argument("--loss-kernels", type=lambda v: v.split(","),
                        help="e.g. chunked,full: only the Kubetune side, once per performance.loss value")
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
                        help="run every side this many times, alternating, and keep each one's best")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in every side (0: default)")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s, for MFU on an unlisted device")
    parser.add_argument("--work-dir", help="keep files here (default: a temporary folder)")
    parser.add_argument("--side", choices=["kubetune", "hf", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.steps <= args.warmup:
        parser.error("--steps must be more than --warmup")
    if args.sides is None:
        args.sides = ["kubetune", "hf", "trl"] if args.device == "cuda" else ["kubetune", "hf"]
    if unknown := set(args.sides) - {"kubetune", "hf", "trl"}:
        parser.error(f"--sides: unknown {', '.join(sorted(unknown))}")
    if args.loss_kernels and (unknown := set(args.loss_kernels) - {"auto", "chunked", "fused", "full"}):
        parser.error(f"--loss-kernels: unknown {', '.join(sorted(unknown))}")
    if args.side:
        return side(args)

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        print(f"preparing {args.model} model and data in {work}", file=sys.stderr, flush=True)
        model_dir, data = prepare(args, work)
        results: dict[str, dict] = {}
        for attempt in range(args.repeats):
            for key, _, extra in runs(args):
                print(f"running {key} ({attempt + 1}/{args.repeats})", file=sys.stderr, flush=True)
                result_file = work / f"{key.replace(':', '-')}.json"
                command = [sys.executable, __file__, *sys.argv[1:], "--work-dir", str(work), *extra,
                           "--result", str(result_file)]
                subprocess.run(command, check=True, stdout=sys.stderr)
                result = json.loads(result_file.read_text())
                print(f"{key}: {result}", file=sys.stderr, flush=True)
                if result["tokens_per_second"] > results.get(key, {}).get("tokens_per_second", 0):
                    results[key] = result
        samples = sample_lengths(model_dir, data, args.seq_len)
        print(markdown(args, model_facts(model_dir), samples, results,
                       peak_flops(args.device, args.peak_tflops)))


if __name__ == "__main__":
    main()

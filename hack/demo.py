"""`make demo`: a whole fine-tuning job on this machine, in a couple of minutes on a laptop CPU.

1. writes a toy "support bot" chat dataset (train/validation/test JSONL, data made up locally);
2. builds a tiny Llama base model from scratch (tokenizer trained here, a short pre-training on generic text);
3. starts an embedded S3 server (or uses KUBETUNE_S3_ENDPOINT) and uploads the model and the data;
4. writes the FineTuneJob manifest examples/demo-finetunejob.yaml and trains it with the Kubetune trainer;
5. answers one held-out question with the base model and with base + the published LoRA adapter.

Nothing is downloaded. Usage: python hack/demo.py [--work-dir .demo] [--threads N] [--pretrain-steps N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import yaml
from kubetune_dev.demo_data import DEMO_PRETRAIN_STEPS
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "examples" / "demo-finetunejob.yaml"
JOB = "support-bot-demo"
BUCKETS = {"model": "s3://models/tiny-llama/", "data": "s3://datasets/support-bot/",
           "output": f"s3://adapters/{JOB}/"}
console = Console()


def job_manifest() -> dict:
    """The FineTuneJob the demo runs. Its storage is the dev cluster's (`make dev-cluster`: an S3 server as
    the Service minio.minio:9000, Secret s3-credentials); the demo points it at its own server instead."""
    data = BUCKETS["data"]
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB},
        "spec": {
            "baseModel": {"uri": BUCKETS["model"]},
            "dataset": {"train": f"{data}train.jsonl", "validation": f"{data}validation.jsonl",
                        "test": f"{data}test.jsonl", "format": "chat"},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                                "targetModules": ["all-linear"]}},
            "hyperparameters": {"epochs": 3, "learningRate": 0.004, "batchSize": 8, "maxSeqLength": 256,
                                "packing": True, "scheduler": "cosine", "warmupRatio": 0.05,
                                "loggingSteps": 5, "precision": "auto"},
            "evaluation": {"everySteps": 20},
            "checkpoint": {"everySteps": 40, "keep": 1},
            "output": {"uri": BUCKETS["output"]},
            "storage": {"endpoint": "http://minio.minio:9000", "region": "us-east-1",
                        "secretRef": {"name": "s3-credentials"}},
            "resources": {"workers": 1, "gpusPerWorker": 0, "cpu": "2", "memory": "4Gi"},
        },
    }


def write_manifest() -> Path:
    header = ("# The FineTuneJob that `make demo` runs (hack/demo.py writes this file) and `make dev-cluster`\n"
              "# seeds and prints: on the dev cluster `kubectl apply -f` it as it is. On another cluster, upload\n"
              "# the model and data to these URIs and set spec.storage for your S3-compatible store.\n")
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(header + yaml.safe_dump(job_manifest(), sort_keys=False))
    return MANIFEST


def build_inputs(work: Path, pretrain_steps: int) -> tuple[Path, dict[str, Path]]:
    from kubetune_dev.demo_data import demo_base_texts, write_support_dataset
    from kubetune_dev.tiny import make_tiny_base

    splits = write_support_dataset(work / "data")
    started = time.monotonic()
    with console.status("pre-training the tiny base model") as status:
        base = make_tiny_base(work / "base", demo_base_texts(), pretrain_steps=pretrain_steps,
                              log=lambda line: status.update(line))
    took = time.monotonic() - started
    console.print(f"[green]base model[/] {base} (2-layer Llama, {pretrain_steps} pre-training steps, "
                  f"{took:.0f}s)")
    return base, splits


def make_buckets(storage) -> None:
    """The demo's buckets (kept if they exist), and no output of an earlier run (it would be reused)."""
    client = storage.client
    for uri in BUCKETS.values():
        try:
            client.create_bucket(Bucket=uri.removeprefix("s3://").split("/")[0])
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass
    storage.delete_prefix(BUCKETS["output"])


def upload(storage, base: Path, splits: dict[str, Path]) -> None:
    storage.upload_dir(base, BUCKETS["model"])
    for split, path in splits.items():
        storage.upload_file(path, f"{BUCKETS['data']}{split}.jsonl")
    console.print(f"[green]uploaded[/] {BUCKETS['model']}, {BUCKETS['data']}{{train,validation,test}}.jsonl")


def train(endpoint: str, work: Path) -> dict:
    from kubetune_api import MetricsSpec, StorageEndpoint, TrainerConfig
    from kubetune_trainer.cli import ProgressReporter
    from kubetune_trainer.configfile import load_job
    from kubetune_trainer.pipeline import run

    job = load_job(MANIFEST)
    config = TrainerConfig(**dict(job.spec), job_name=job.metadata.name, work_dir=str(work / "trainer"),
                           metrics=MetricsSpec(port=0))
    config = config.model_copy(update={"storage": StorageEndpoint(endpoint=endpoint)})
    columns = (TextColumn("{task.description:>11}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        return run(config, report=ProgressReporter(progress, verbose=False))


def test_results(manifest: dict) -> str:
    """`test loss 1.234 (base 2.345), token accuracy 41.0% (base 12.0%)`: the adapter against the base model."""
    metrics = manifest.get("metrics") or {}
    test, base = metrics.get("test") or {}, (metrics.get("baseline") or {}).get("test") or {}
    parts = []
    for name, label, fmt in (("loss", "test loss", ".3f"), ("token_accuracy", "token accuracy", ".1%")):
        if isinstance(test.get(name), float):
            text = f"{label} {test[name]:{fmt}}"
            parts.append(text + (f" (base {base[name]:{fmt}})" if isinstance(base.get(name), float) else ""))
    return ", ".join(parts) or "no test results"


def answer(model, tokenizer, messages: list[dict]) -> str:
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(**inputs, min_new_tokens=12, max_new_tokens=48, do_sample=False,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def compare(storage, base: Path, work: Path) -> tuple[str, str]:
    from kubetune_dev.demo_data import held_out_messages
    from kubetune_trainer.modeling import load_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = work / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    storage.download(BUCKETS["output"], adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    messages = held_out_messages()
    before = answer(model, tokenizer, messages)
    tuned = load_adapter(model, adapter).eval()
    after = answer(tuned, tokenizer, messages)
    return before, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--pretrain-steps", type=int, default=DEMO_PRETRAIN_STEPS)
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    from kubetune_api import StorageEndpoint
    from kubetune_dev.demo_data import HELD_OUT, HELD_OUT_PROMPT, support_answer
    from kubetune_dev.s3server import S3Server, endpoint_from_env
    from kubetune_trainer.storage import Storage

    started = time.monotonic()
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)  # a fresh run each time (the embedded server starts empty)

    console.rule("[bold]1. data and base model")
    base, splits = build_inputs(work, args.pretrain_steps)

    endpoint = endpoint_from_env()
    server = None if endpoint else S3Server().start()  # placeholder credentials, for this server only
    try:
        endpoint = endpoint or server.endpoint
        console.rule(f"[bold]2. object storage at {endpoint}" + (" (embedded)" if server else ""))
        storage = Storage(StorageEndpoint(endpoint=endpoint))
        make_buckets(storage)
        upload(storage, base, splits)

        console.rule("[bold]3. fine-tune")
        console.print(f"[green]manifest[/] {write_manifest().relative_to(ROOT)} "
                      f"(storage.endpoint set to {endpoint} for this run)")
        manifest = train(endpoint, work)

        console.rule("[bold]4. result")
        names = [uri.removeprefix(BUCKETS["output"]) for uri in storage.list(BUCKETS["output"])]
        names = [n for n in names if "/" not in n]  # leave out checkpoints/
        console.print(f"[green]adapter[/]  {BUCKETS['output']}: {', '.join(names)}")
        console.print(f"[green]manifest[/] {BUCKETS['output']}manifest.json: {manifest.get('steps')} steps, "
                      f"{manifest.get('tokensTrained')} tokens trained, {test_results(manifest)}", highlight=False)
        before, after = compare(storage, base, work)
    finally:
        if server:
            server.stop()

    table = Table(show_header=True, header_style="bold", expand=True)
    table.add_column("model", no_wrap=True)
    table.add_column("answer")
    table.add_row("base", escape(before) or "(nothing)")
    table.add_row("base + adapter", escape(after) or "(nothing)")
    table.add_row("[dim]expected", f"[dim]{escape(support_answer(HELD_OUT[0]))}")
    console.print(Panel(table, title=f"held-out question: {HELD_OUT_PROMPT!r}",
                        subtitle="greedy decoding, at least 12 new tokens"))
    console.print(f"demo done in {time.monotonic() - started:.0f}s; files under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

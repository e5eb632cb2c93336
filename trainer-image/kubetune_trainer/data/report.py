"""What the data costs, known before any GPU starts: samples, tokens, packing, the planned steps and an estimate of
the training time and GPU-hours (docs/data-formats.md, "What the data costs").

The estimate counts the model's FLOPs: k * N * T, where N is the base model's parameters (from its config, built
on the meta device: no weights are read), T the tokens the planned steps process (steps * sequences per step *
mean sequence length) and k = 6 for full fine-tuning (forward 2N, backward 4N per token), 4 for LoRA and QLoRA
(the frozen base needs no weight gradients), 2 more for DPO's reference model (a forward pass). Time = FLOPs /
(GPUs * sustained TFLOPS per GPU); the chart's estimate.gpuTflops sets the TFLOPS (config.hardware). Once training
runs, the ETA from the measured throughput replaces it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api import PREFERENCE_FORMATS, Objective

from ..plan import Plan
from ..quality import report as quality

if TYPE_CHECKING:
    from kubetune_api import TrainerConfig

    from ..tasks import Task
    from .validate import DatasetReport


def data_report(config: TrainerConfig, task: Task, reports: dict[str, DatasetReport], model_dir: Path,
                cache: dict | None = None, processes: int | None = None) -> dict[str, Any]:
    """The data report (the validation's termination message, less "valid"): see the module docstring.
    processes: the training processes, by default config.hardware's."""
    hp = config.hyperparameters
    train = reports["train"]
    # what training reads: the train split, with dataset.trainOnValidation the validation split too
    splits = ("train", "validation") if config.dataset.train_on_validation else ("train",)
    trained = [reports[s] for s in splits if s in reports]
    sequences = sum(r.sequences or r.samples for r in trained)
    tokens = sum(r.tokens for r in trained)
    plan = Plan.make(sequences, config, processes or config.hardware.processes)
    doc: dict[str, Any] = {
        "splits": {s: {"samples": r.samples, "tokens": r.tokens, "trainedTokens": r.trained_tokens,
                       "truncated": r.truncated} for s, r in reports.items()},
        "sequences": sequences,
        "plannedSteps": plan.total_steps,
        "epochs": round(plan.epoch(plan.total_steps), 4),
    }
    if task.unit == "token" and sequences:
        doc["packingEfficiency"] = round(tokens / (sequences * hp.max_seq_length), 4)
    elif train.format in PREFERENCE_FORMATS and sequences:  # a pair, or a packed row of pairs: 2 x maxSeqLength
        doc["packingEfficiency"] = round(tokens / (sequences * 2 * hp.max_seq_length), 4)
    estimate = _estimate(config, model_dir, plan.total_steps * plan.step_samples * tokens / max(sequences, 1))
    if estimate:
        doc["estimate"] = estimate
    if cache:
        doc["cache"] = cache
    if config.dataset.fields:  # the records' columns read as the format's fields
        doc["fields"] = dict(config.dataset.fields)
    found = quality.section(config.dataset.quality, {s: r.quality for s, r in reports.items()})
    if found:
        doc["quality"] = found
    doc["summary"] = summary(doc)
    return doc


def _estimate(config: TrainerConfig, model_dir: Path, tokens: float) -> dict[str, Any] | None:
    hardware = config.hardware
    if not hardware.gpus or not tokens:
        return None
    parameters = count_parameters(model_dir, config.task)
    if not parameters:
        return None
    k = 6 if config.method.type.value == "full" else 4
    if config.objective == Objective.dpo and not config.objective_params.reference_free:
        k += 2  # the reference model's forward pass
    flops = k * parameters * tokens
    seconds = flops / (hardware.gpus * hardware.gpu_tflops * 1e12)
    return {"parameters": parameters, "tokens": int(tokens), "flops": _significant(flops),
            "seconds": _significant(seconds), "gpuHours": _significant(seconds * hardware.gpus / 3600),
            "gpus": hardware.gpus, "gpuTflops": hardware.gpu_tflops}


def _significant(x: float) -> float:
    return float(f"{x:.4g}")


def count_parameters(model_dir: Path, task) -> int | None:
    """The base model's parameters, from config.json alone (the model is built on the meta device)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        model_config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModel.from_config(model_config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - an estimate is optional: a model transformers cannot build has none
        return None


def summary(doc: dict[str, Any]) -> str:
    """One line for people: `train 200,000 samples, 12.0M tokens (4.0M trained); 1,875 steps; about 6.7 GPU-hours`."""
    train = doc["splits"]["train"]
    text = (f"train {train['samples']:,} samples, {_short(train['tokens'])} tokens "
            f"({_short(train['trainedTokens'])} trained)")
    if train["truncated"]:
        text += f", {train['truncated']:,} truncated"
    if "packingEfficiency" in doc and doc["sequences"] != train["samples"]:
        text += f"; packed into {doc['sequences']:,} sequences ({doc['packingEfficiency']:.0%} full)"
    text += f"; {doc['plannedSteps']:,} steps"
    estimate = doc.get("estimate")
    if estimate:
        text += f"; about {_hours(estimate['gpuHours'])} GPU-hours on {estimate['gpus']} GPUs"
    if doc.get("fields"):
        text += "; fields " + ", ".join(f"{field} <- {column}" for field, column in doc["fields"].items())
    if doc.get("quality", {}).get("findings"):
        text += f"; data quality: {doc['quality']['summary']}"
    return text


def _short(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _hours(h: float) -> str:
    return f"{h:.2g}" if h < 10 else f"{math.ceil(h):,}"

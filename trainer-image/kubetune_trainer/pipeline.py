"""The trainer as a pipeline: fetch -> validate -> tokenize -> train -> evaluate -> publish.

`run(config)` is what `accelerate launch -m kubetune_trainer train` and `kubetune run` execute in every
process. Rank 0 (per machine for local files) downloads, serves metrics, checkpoints and publishes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from .config import TrainerConfig, join_uri
from .data import DatasetReport, pack_examples, tokenize_dataset, validate_dataset
from .errors import DatasetError
from .evaluate import evaluate
from .fetch import Fetched, fetch, tokenizer_sha256, tree_sha256
from .identity import RunIdentity, check_claim, claim
from .metrics import TrainerMetrics
from .publish import publish_output, save_output
from .sharding import full_trainable_state
from .spec import Strategy
from .storage import Storage
from .train import Reporter, StopSignal, collective_failures_are_peer_lost, eval_batches, is_sharded, train


def json_reporter(event: dict) -> None:
    print(json.dumps(event, default=str), flush=True)


def validate_splits(config: TrainerConfig, fetched: Fetched, tokenizer,
                    beat: Callable[[], None] | None = None) -> dict[str, DatasetReport]:
    """Check every record of every split; the first bad one raises DatasetError (exit 65). Beats per split."""
    reports: dict[str, DatasetReport] = {}
    for split, path in fetched.splits.items():
        fmt = reports["train"].format if reports else config.dataset.format
        reports[split] = validate_dataset(
            path, fetched.uris[split], fmt=fmt, tokenizer=tokenizer,
            max_seq_length=config.hyperparameters.max_seq_length,
            min_samples=config.dataset.min_samples if split == "train" else 1, split=split,
        )
        if reports[split].format != reports["train"].format:
            raise DatasetError(fetched.uris[split], 0, f"{split} split is {reports[split].format.value} but "
                               f"train is {reports['train'].format.value}", "use one format for all splits")
        if beat:
            beat()
    return reports


def sequences(path: Path, uri: str, config: TrainerConfig, tokenizer, fmt) -> list:
    hp = config.hyperparameters
    examples = tokenize_dataset(path, uri, fmt=fmt, tokenizer=tokenizer, max_seq_length=hp.max_seq_length)
    return pack_examples(examples, hp.max_seq_length, seed=hp.seed) if hp.packing else examples


def run(config: TrainerConfig, report: Reporter = json_reporter, storage: Storage | None = None) -> dict:
    """Train as configured and return the published manifest (or the existing one if already done)."""
    import torch
    from accelerate import Accelerator

    from .modeling import load_model, load_tokenizer, resolve_precision

    started = time.time()
    storage = storage or Storage(config.storage)
    # Without a GPU, cpu=True makes a multi-process launch (torchrun's LOCAL_RANK/WORLD_SIZE) use gloo.
    hp = config.hyperparameters
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=resolve_precision(hp.precision, fsdp=hp.strategy == Strategy.fsdp))
    main = accelerator.is_main_process
    report = report if main else (lambda event: None)
    manifest_uri = join_uri(config.output.uri, "manifest.json")

    identity = RunIdentity.of(config)
    storage = storage.with_run(identity.uid)  # every object it uploads says which run made it
    existing = claim(storage, config, identity, write=main, report=report)  # refuses another run's prefix
    if existing is not None:
        report({"event": "already_published", "manifest": manifest_uri})
        return existing
    accelerator.wait_for_everyone()  # rank 0 has moved another run's files aside before anyone reads the prefix

    metrics = None
    if main and config.metrics.enabled:
        metrics = TrainerMetrics(config.job_name, config.method.type.value, config.base_model.uri)
        port = metrics.serve(config.metrics.port)
        report({"event": "metrics", "port": port})
        storage = storage.with_heartbeat(metrics.beat)  # uploads and downloads beat per file and as bytes move
    beat: Callable[[], None] = metrics.beat if metrics else (lambda: None)  # a sign of life, where work completes

    def phase(name: str) -> None:
        report({"event": "phase", "phase": name})
        if metrics:
            metrics.set_phase(name)

    phase("downloading")
    with accelerator.local_main_process_first():
        fetched = fetch(config, storage)
    tokenizer = load_tokenizer(fetched.model_dir)
    # What the checkpoints' fingerprint and the manifest record: the exact bytes trained on.
    data_sha256 = {s: tree_sha256(p, beat=beat) for s, p in fetched.splits.items()}
    inputs = {"datasets": data_sha256, "tokenizer": tokenizer_sha256(fetched.model_dir)}

    phase("validating")
    reports = validate_splits(config, fetched, tokenizer, beat)
    fmt = reports["train"].format
    report({"event": "validated", **{s: {"samples": r.samples, "tokens": r.tokens, "truncated": r.truncated}
                                     for s, r in reports.items()}})

    phase("tokenizing")
    splits = {}
    for s, p in fetched.splits.items():
        splits[s] = sequences(p, fetched.uris[s], config, tokenizer, fmt)
        beat()

    phase("training")
    precision = accelerator.mixed_precision
    model = load_model(fetched.model_dir, config.method, precision, hp.gradient_checkpointing,
                       sharded=is_sharded(config, accelerator), seed=hp.seed)
    # From here SIGTERM is noted, not fatal: the loop checkpoints and stops; after the loop, publishing goes on.
    with StopSignal().installed() as stop, collective_failures_are_peer_lost(accelerator):
        model, state, plan = train(config, model, splits["train"], splits.get("validation"), accelerator, storage,
                                   metrics, report, tokenizer.pad_token_id, inputs, stop)

        phase("evaluating")
        results = {}
        recent = state.last_validation
        if recent and recent["step"] == state.step:  # the loop has just evaluated this very model
            results["validation"] = {k: v for k, v in recent.items() if k != "step"}
        for split in ("validation", "test"):
            if split in splits and split not in results:
                results[split] = evaluate(model, eval_batches(splits[split], accelerator.process_index,
                                                              accelerator.num_processes,
                                                              config.hyperparameters.batch_size,
                                                              tokenizer.pad_token_id), accelerator, metrics)
                report({"event": split, "step": state.step, **results[split]})
        if metrics and "test" in results:
            t = results["test"]
            metrics.set(test_loss=t["loss"], test_perplexity=t["perplexity"], test_token_accuracy=t["token_accuracy"])
        if metrics and "validation" in results:
            metrics.set(validation_loss=results["validation"]["loss"])

        manifest: dict = {}
        # Under FSDP every process helps gather the trained weights in full (a collective); rank 0 saves them.
        weights = full_trainable_state(model) if is_sharded(config, accelerator) else None
        if main:
            check_claim(storage, config, identity)  # the prefix is still this run's: nobody moved it meanwhile
            phase("uploading")
            work = Path(config.work_dir) / config.job_name
            out = save_output(model, tokenizer, work / "output", weights)
            beat()
            last = state.history[-1] if state.history else {}
            manifest = publish_output(storage, out, config.output.uri, {
                "job": config.job_name,
                "run": identity.dump(),
                "method": config.method.type.value,
                "baseModel": {"uri": config.base_model.uri, "sha256": tree_sha256(fetched.model_dir, beat=beat)},
                "datasets": {s: {"uri": fetched.uris[s], "sha256": data_sha256[s],
                                 "samples": reports[s].samples, "tokens": reports[s].tokens}
                             for s in fetched.splits},
                "format": fmt.value,
                "hyperparameters": config.hyperparameters.dump(),
                "lora": config.method.lora.dump() if config.method.type.value != "full" else None,
                "steps": state.step,
                "totalSteps": plan.total_steps,
                "epochs": plan.epoch(state.step),
                "earlyStopped": state.step < plan.total_steps,
                "tokensTrained": state.tokens_trained,
                "metrics": {"train": {"loss": last.get("loss")}, **results,
                            "bestValidationLoss": state.best_validation_loss},
                "history": state.history,
                "wallTimeSeconds": time.time() - started,
                "trainTimeSeconds": state.train_time_seconds,
                "processes": accelerator.num_processes,
                "precision": precision,
            })
            phase("done")
            report({"event": "published", "uri": config.output.uri, "manifest": manifest_uri})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if metrics:
        metrics.linger()
    return manifest


def validate_only(config: TrainerConfig, storage: Storage | None = None) -> dict[str, DatasetReport]:
    """`kubetune validate`: the same checks, on CPU, without downloading the model weights."""
    from .modeling import load_tokenizer

    storage = storage or Storage(config.storage)
    claim(storage, config, RunIdentity.of(config), write=False)  # another run's output: refused before a GPU pod
    fetched = fetch(config, storage, weights=False)
    return validate_splits(config, fetched, load_tokenizer(fetched.model_dir))

"""The trainer as a pipeline: fetch -> validate -> tokenize -> train -> evaluate -> publish.

`run(config)` is what `accelerate launch -m kubetune_trainer train` and `kubetune run` execute in every
process. Rank 0 (per machine for local files) downloads, serves metrics, checkpoints and publishes. What differs
between tasks (causal-lm, sequence- and image-classification) is the `Task` of tasks/: the stages call it.
The validation pod's `kubetune validate` runs the first stages only, from validation.py, without this module's
imports (torch, the model code).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from kubetune_api import Select, Strategy, TrainerConfig, join_uri

from . import checkpoint
from .data.report import data_report
from .evaluate import baseline_difference, evaluate
from .fetch import fetch, tree_sha256
from .identity import RunIdentity, check_claim, claim
from .manifest import Manifest
from .merge import merge_output
from .metrics import TrainerMetrics
from .modeling import resolve_precision
from .prepare import inputs_of, prepare
from .publish import base_model_name, publish_output, save_output
from .quality.report import compact
from .record.history import HISTORY, History, checkpoint_entry, checkpoint_table
from .redact import redact
from .sharding import full_trainable_state, is_sharded
from .storage import Storage
from .tasks import GeneratesText, task_for
from .tracking import tracked
from .train import Reporter, StopSignal, collective_failures_are_peer_lost, train


def json_reporter(event: dict) -> None:
    """One JSON line per event on stdout (the pod's log), redacted: an event can quote an error."""
    print(redact(json.dumps(event, default=str)), flush=True)


def run(config: TrainerConfig, report: Reporter = json_reporter, storage: Storage | None = None,
        stop: StopSignal | None = None) -> dict:
    """Train as configured and return the published manifest (or the existing one if already done). `stop`: the
    StopSignal the loop watches (SIGTERM sets it; its `request` too), a new one when not given."""
    with tracked(config, report) as report:  # rank 0 with spec.tracking.mlflow: every event to MLflow too
        return _run(config, report, storage, stop or StopSignal())


def _run(config: TrainerConfig, report: Reporter, storage: Storage | None, stop: StopSignal) -> dict:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import ConcatDataset

    from .record.card import CardContext  # huggingface_hub: not for kubetune validate
    from .record.files import write_record

    started = time.time()
    storage = storage or Storage(config.storage)
    # Without a GPU, cpu=True makes a multi-process launch (torchrun's LOCAL_RANK/WORLD_SIZE) use gloo.
    hp = config.hyperparameters
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=resolve_precision(hp.precision, fsdp=hp.strategy == Strategy.fsdp))
    main = accelerator.is_main_process
    report = report if main else (lambda event: None)
    manifest_uri = join_uri(config.output.uri, "manifest.json")
    work = Path(config.work_dir) / config.job_name
    # The metric history (rank 0's metrics.jsonl): the train, validation, baseline and test events, as reported.
    history = History(work / HISTORY if main else None, time.time)
    report = history.observe(report)

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
    with accelerator.local_main_process_first():  # the node's first process downloads and prepares the data
        fetched = fetch(config, storage)
        task = task_for(config, fetched.model_dir, storage)
        task.load_processor()
        inputs = inputs_of(fetched, beat)
        data_sha256 = inputs["datasets"]  # the exact bytes trained on
        phase("validating")
        data = prepare(config, task, fetched, storage, inputs, build=accelerator.is_local_main_process,
                       upload=main, report=report, beat=beat)
    reports, splits = data.reports, data.splits
    if config.dataset.train_on_validation:  # train + validation (the cached splits as they are); test held out
        splits["train"] = ConcatDataset([splits["train"], splits.pop("validation")])
    fmt = reports["train"].format
    report({"event": "validated", **{s: {"samples": r.samples, "tokens": r.tokens, "truncated": r.truncated,
                                         **({"classes": r.classes} if r.classes else {})}
                                     for s, r in reports.items()}})
    data_doc = data_report(config, task, reports, fetched.model_dir, data.cache, accelerator.num_processes)
    quality_section = data_doc.get("quality")
    if "quality" in data_doc:  # the log gets the counts; the lines are in the manifest
        data_doc["quality"] = {**compact(data_doc["quality"]), "policy": data_doc["quality"]["policy"]}
    report({"event": "data", **data_doc})

    phase("training")
    precision = accelerator.mixed_precision
    model = task.load_model(precision, is_sharded(config, accelerator))
    # How the model computes (hyperparameters.performance, kernels/): each choice and why, for the log.
    report({"event": "kernels", **getattr(model, "kubetune_choices", {})})
    # From here SIGTERM is noted, not fatal: the loop checkpoints and stops; after the loop, publishing goes on.
    with stop.installed(), collective_failures_are_peer_lost(accelerator):
        model, state, plan = train(config, task, model, splits, accelerator, storage, metrics, report, inputs, stop,
                                   history)
        best = state.best_validation if config.output.select == Select.best else None
        selected = best["step"] if best else state.step  # the step whose weights `model` has

        phase("evaluating")
        results = {}
        recent = state.last_validation
        if recent and recent["step"] == selected:  # the loop has evaluated this very model
            results["validation"] = {k: v for k, v in recent.items() if k != "step"}
        for split in ("validation", "test"):
            if split in splits and split not in results:
                results[split] = evaluate(task, model, splits[split], split, accelerator, hp.batch_size, metrics)
                if split == "test" and isinstance(task, GeneratesText):
                    results[split].update(task.generation_metrics(model, accelerator, beat))
                report({"event": split, "step": selected, **results[split]})
        if state.baseline and "test" in results:
            results["baseline"] = state.baseline
            results["difference"] = {"test": baseline_difference(results["test"], state.baseline["test"])}
        if metrics:
            for split in ("validation", "test"):
                if split in results:
                    metrics.set_evaluation(split, "finetuned", results[split])
            if "test" in results:
                t = results["test"]
                metrics.set(test_loss=t["loss"], test_perplexity=t.get("perplexity"),
                            test_token_accuracy=t.get("token_accuracy"))
            if "validation" in results:
                metrics.set(validation_loss=results["validation"]["loss"], validation_step=selected)

        manifest: dict = {}
        # Under FSDP every process helps gather the trained weights in full (a collective); rank 0 saves them.
        weights = full_trainable_state(model) if is_sharded(config, accelerator) else None
        if main:
            check_claim(storage, config, identity)  # the prefix is still this run's: nobody moved it meanwhile
            phase("uploading")
            out = save_output(model, task, work / "output", weights)
            beat()
            merged = merge_output(task, out, beat)  # output.merged: the merged model under out/merged/
            history.write(out / HISTORY)
            validation = results.get("validation")
            checkpoints = checkpoint_table(
                state.checkpoints, checkpoint.complete_steps(storage, config.checkpoint_uri), selected,
                checkpoint_entry(selected, config.output.uri, time.time(),
                                 validation and {"step": selected, **validation}))
            last = state.history[-1] if state.history else {}
            document = Manifest(
                job=config.job_name,
                run=identity.dump(),
                task_fields=task.describe(),
                headline=task.headline,
                method=config.method.type.value,
                base_model={"uri": config.base_model.uri, "sha256": tree_sha256(fetched.model_dir, beat=beat)},
                datasets={s: {"uri": fetched.uris[s], "sha256": data_sha256[s],
                              "samples": reports[s].samples, "tokens": reports[s].tokens}
                          for s in fetched.splits},
                format=fmt.value,
                hyperparameters=config.hyperparameters.dump(),
                lora=config.method.lora.dump() if config.method.type.value != "full" else None,
                steps=state.step,
                total_steps=plan.total_steps,
                epochs=plan.epoch(state.step),
                early_stopped=state.step < plan.total_steps,
                tokens_trained=state.tokens_trained,
                metrics={"train": {"loss": last.get("loss")}, **results, "bestValidation": state.best_validation},
                selected={"select": config.output.select.value, "step": selected,
                          **({"metric": best["metric"], "value": best["value"]} if best else {})},
                history=state.history,
                wall_time_seconds=time.time() - started,
                train_time_seconds=state.train_time_seconds,
                processes=accelerator.num_processes,
                precision=precision,
                merged=merged.get("merged"),
                quality=quality_section,
                checkpoints=checkpoints,
            )
            # The run record beside the model: the plots and the model card (README.md) that shows them.
            gpus = accelerator.num_processes if accelerator.device.type == "cuda" else 0
            document.record = write_record(out, document.dump(), history.records, CardContext(
                base_model=base_model_name(config.base_model), output_uri=config.output.uri,
                license=config.output.license, data_summary=data_doc.get("summary"),
                quality_summary=(data_doc.get("quality") or {}).get("summary") or None, gpus=gpus,
                gpu_name=torch.cuda.get_device_name(accelerator.device) if gpus else None))
            manifest = publish_output(storage, out, config, identity, document)
            phase("done")
            report({"event": "published", "uri": config.output.uri, "manifest": manifest_uri})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if metrics:
        metrics.linger()
    return manifest

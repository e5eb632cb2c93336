"""Stage 4, train: the training loop, top to bottom.

Data order is a pure function of (seed, epoch), and the loop consumes "global micro-batches" one after
another, so the data position is one number (`TrainState.micro_batch`). That is what makes resume
exact: a restarted run skips the micro-batches it already trained on and ends at the same step.

One optimizer step = `gradientAccumulationSteps` micro-batches per process. The loss is summed over
trained tokens and divided by the trained tokens of the whole step across all processes, so every
token weighs the same whatever the padding, packing or number of workers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, sharding
from .config import TrainerConfig
from .data import PackedExample, collate
from .evaluate import evaluate, forward_loss
from .metrics import TrainerMetrics
from .modeling import load_trainable_state_dict, trainable_state_dict
from .spec import Strategy
from .storage import Storage

Reporter = Callable[[dict], None]


@dataclass
class Plan:
    """How many micro-batches and steps the run takes; fixed by the data and hyperparameters."""

    sequences: int
    global_batch: int  # sequences per global micro-batch (batch size x processes)
    micro_per_epoch: int
    accumulation: int
    total_steps: int

    @classmethod
    def make(cls, sequences: int, config: TrainerConfig, processes: int) -> Plan:
        hp = config.hyperparameters
        global_batch = hp.batch_size * processes
        micro_per_epoch = max(1, sequences // global_batch)
        steps_per_epoch = micro_per_epoch / hp.gradient_accumulation_steps
        total = hp.max_steps or max(1, math.ceil(hp.epochs * steps_per_epoch))
        return cls(sequences, global_batch, micro_per_epoch, hp.gradient_accumulation_steps, total)

    def epoch(self, micro_batch: int) -> float:
        return micro_batch / self.micro_per_epoch


def micro_batch_indices(plan: Plan, seed: int, micro_batch: int, rank: int, batch_size: int) -> list[int]:
    """The sequences this process trains on in global micro-batch number `micro_batch`."""
    epoch, m = divmod(micro_batch, plan.micro_per_epoch)
    order = torch.randperm(plan.sequences, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    start = m * plan.global_batch + rank * batch_size
    return [order[(start + i) % plan.sequences] for i in range(batch_size)]


def samples_in(sequence) -> int:
    """Training samples in a sequence: several when packed."""
    return len(sequence.lengths) if isinstance(sequence, PackedExample) else 1


def eval_batches(sequences: list, rank: int, processes: int, batch_size: int, pad_id: int):
    """This process's share of an evaluation split, in batches. Every process yields as many batches as
    rank 0 (the largest share), topping up with a batch that counts no token: a sharded forward is a
    collective that all processes must join."""
    mine, most = sequences[rank::processes], len(sequences[0::processes])
    for i in range(0, most, batch_size):
        if i < len(mine):
            yield collate(mine[i : i + batch_size], pad_id)
        else:
            batch = collate(sequences[:1], pad_id)
            batch["labels"].fill_(-100)
            yield batch


def is_sharded(config: TrainerConfig, accelerator) -> bool:
    return config.hyperparameters.strategy == Strategy.fsdp and accelerator.num_processes > 1


def gradient_sync(model, accelerator, sharded: bool, sync: bool):
    """A context that skips the gradient reduction unless `sync` (the last micro-batch of a step)."""
    if sharded:
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else accelerator.no_sync(model)


def make_optimizer(model, config: TrainerConfig, total_steps: int):
    from transformers import get_scheduler

    hp = config.hyperparameters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=torch.cuda.is_available()
    )
    scheduler = get_scheduler(
        hp.scheduler.value, optimizer, num_warmup_steps=math.ceil(hp.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler


def train(
    config: TrainerConfig,
    model,
    train_seqs: list,
    val_seqs: list | None,
    accelerator,
    storage: Storage,
    metrics: TrainerMetrics | None,
    report: Reporter,
    pad_id: int,
) -> tuple[object, checkpoint.TrainState, Plan]:
    hp, ckpt = config.hyperparameters, config.checkpoint
    rank, processes = accelerator.process_index, accelerator.num_processes
    plan = Plan.make(len(train_seqs), config, processes)
    sharded = is_sharded(config, accelerator)
    if sharded:  # FSDP: shard first; the optimizer then works on this process's shards only
        model = sharding.shard(model, accelerator.device)
    optimizer, scheduler = make_optimizer(model, config, plan.total_steps)
    torch.manual_seed(hp.seed + rank)
    work = Path(config.work_dir) / config.job_name

    # Resume from the newest complete checkpoint of this job, if any.
    state = checkpoint.TrainState()
    restored = checkpoint.download_latest(storage, config.checkpoint_uri, work / "resume")
    if restored is not None:
        weights, optimizer_state, state = checkpoint.load(restored, scheduler)
        if sharded:
            sharding.load_full_state(model, optimizer, weights, optimizer_state)
        else:
            load_trainable_state_dict(model, weights)
            optimizer.load_state_dict(optimizer_state)
        report({"event": "resumed", "step": state.step, "checkpoint": str(restored.name)})

    if not sharded:  # DDP (or a single process): accelerate wraps the model and moves it to the device
        model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    report({"event": "plan", "total_steps": plan.total_steps, "sequences": plan.sequences,
            "processes": processes, "strategy": "fsdp" if sharded else "ddp", "start_step": state.step})
    if metrics:
        metrics.set_phase("training")
        metrics.set(total_steps=plan.total_steps, step=state.step)

    device = accelerator.device
    window_loss = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, trained tokens
    window_seen = window_samples = 0
    window_start = run_start = time.monotonic()
    steps_this_run = 0
    last_checkpoint = time.monotonic()

    while state.step < plan.total_steps:
        micro = [
            [train_seqs[i] for i in micro_batch_indices(plan, hp.seed, state.micro_batch + k, rank, hp.batch_size)]
            for k in range(plan.accumulation)
        ]
        window_seen += sum(len(s.input_ids) for seqs in micro for s in seqs)
        window_samples += sum(samples_in(s) for seqs in micro for s in seqs)
        micro = [collate(seqs, pad_id) for seqs in micro]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        step_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=device), reduction="sum")
        for k, batch in enumerate(micro):
            batch = {n: t.to(device) for n, t in batch.items()}
            sync = gradient_sync(model, accelerator, sharded, sync=k == plan.accumulation - 1)
            with sync, accelerator.autocast():
                loss_sum, tokens, _ = forward_loss(model, batch)
                # DDP and FSDP average gradients over processes; scale back so the step loss is a global token mean.
                loss = loss_sum * processes / step_tokens.clamp(min=1)
            accelerator.backward(loss)
            window_loss += torch.stack([loss_sum.detach().double(), tokens.double()])
        grad_norm = accelerator.clip_grad_norm_(trainable, hp.max_grad_norm)
        if isinstance(grad_norm, sharding.DTensor):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.micro_batch += plan.accumulation
        state.tokens_trained += int(step_tokens.item())
        steps_this_run += 1
        if metrics:
            metrics.add_tokens(int(step_tokens.item()))  # .item() waited for the step: a real sign of life
            metrics.beat()

        if state.step % hp.logging_steps == 0 or state.step == plan.total_steps:
            totals = accelerator.reduce(
                torch.cat([window_loss, torch.tensor([window_seen, window_samples], dtype=torch.float64,
                                                    device=device)]), reduction="sum").tolist()
            elapsed = time.monotonic() - window_start
            run_elapsed = time.monotonic() - run_start
            entry = {
                "event": "train",
                "step": state.step,
                "total_steps": plan.total_steps,
                "epoch": round(plan.epoch(state.micro_batch), 4),
                "loss": totals[0] / max(totals[1], 1),
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_second": totals[2] / elapsed,
                "samples_per_second": totals[3] / elapsed,
                "eta_seconds": run_elapsed / steps_this_run * (plan.total_steps - state.step),
            }
            state.train_time_seconds += elapsed
            state.history.append(entry)
            report(entry)
            if metrics:
                metrics.set(step=state.step, epoch=entry["epoch"], progress_ratio=state.step / plan.total_steps,
                            eta_seconds=entry["eta_seconds"], train_loss=entry["loss"],
                            learning_rate=entry["learning_rate"], grad_norm=entry["grad_norm"],
                            tokens_per_second=entry["tokens_per_second"],
                            samples_per_second=entry["samples_per_second"])
                metrics.sample_gpus()
            window_loss.zero_()
            window_seen = window_samples = 0
            window_start = time.monotonic()

        if val_seqs and config.evaluation.every_steps and state.step % config.evaluation.every_steps == 0:
            if _evaluate_and_check_patience(config, model, val_seqs, accelerator, state, metrics, report,
                                            pad_id):
                report({"event": "early_stopping", "step": state.step,
                        "best_validation_loss": state.best_validation_loss})
                break

        due_steps = ckpt.every_steps and state.step % ckpt.every_steps == 0
        due_time = ckpt.every_minutes and time.monotonic() - last_checkpoint >= ckpt.every_minutes * 60
        if (due_steps or due_time) and state.step < plan.total_steps:
            _checkpoint(config, accelerator, model, optimizer, scheduler, state, storage, metrics, report, work,
                        sharded)
            last_checkpoint = time.monotonic()

    return (model if sharded else accelerator.unwrap_model(model)), state, plan


def _evaluate_and_check_patience(config, model, val_seqs, accelerator, state, metrics, report, pad_id) -> bool:
    """Evaluate on the validation split; True when early stopping says to stop."""
    if metrics:
        metrics.set_phase("evaluating")
    result = evaluate(model, eval_batches(val_seqs, accelerator.process_index, accelerator.num_processes,
                                          config.hyperparameters.batch_size, pad_id), accelerator, metrics)
    state.last_validation = {"step": state.step, **result}
    report({"event": "validation", **state.last_validation})
    if metrics:
        metrics.set(validation_loss=result["loss"])
        metrics.set_phase("training")
    stopping = config.evaluation.early_stopping
    best = state.best_validation_loss
    min_delta = stopping.min_delta if stopping else 0.0
    if best is None or result["loss"] < best - min_delta:
        state.best_validation_loss = result["loss"]
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    return bool(stopping and state.evals_without_improvement >= stopping.patience)


def _checkpoint(config, accelerator, model, optimizer, scheduler, state, storage, metrics, report, work, sharded):
    """Rank 0 saves and uploads. Under FSDP every process first helps gather the shards (a collective)."""
    if sharded:
        weights = sharding.full_trainable_state(model)
        optimizer_state = sharding.full_optimizer_state(model, optimizer)
    if not accelerator.is_main_process:
        return
    if not sharded:
        weights, optimizer_state = trainable_state_dict(accelerator.unwrap_model(model)), optimizer.state_dict()
    if metrics:
        metrics.beat()  # the gather (a collective under FSDP) is done
    directory = checkpoint.save(work / "checkpoint" / f"step-{state.step:08d}", weights, optimizer_state,
                                scheduler, state)
    if metrics:
        metrics.beat()  # written locally; the upload beats per file and while bytes move (storage heartbeat)
    uri = checkpoint.upload(storage, directory, config.checkpoint_uri, state.step)
    checkpoint.prune(storage, config.checkpoint_uri, config.checkpoint.keep)
    if metrics:
        metrics.checkpoint_done()
    report({"event": "checkpoint", "step": state.step, "uri": uri})

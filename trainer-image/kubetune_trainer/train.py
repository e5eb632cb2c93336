"""Stage 4, train: the training loop, top to bottom.

Data order is a pure function of (seed, epoch), and one optimizer step always consumes the same number of
sequences (`Plan.step_samples`, fixed when the run starts), so the data position is one number of samples
(`TrainState.samples`). That is what makes resume exact, even with another number of processes: a restarted
run skips the samples it already trained on, deals each step's samples out to however many processes it has,
and ends at the same step.

One optimizer step = the step's samples, in `batchSize` micro-batches per process. The loss is summed over
the task's units (trained tokens, or labelled samples) and divided by the units of the whole step across all
processes, so every token (sample) weighs the same whatever the padding, packing, accumulation or number of
workers. The task (tasks/) makes the batches and computes the loss and the metrics; the loop knows no task.

Before the first step, the test split is evaluated on the untrained model (the baseline: with LoRA it is the
base model, the adapter starting as the identity). Validation every `evaluation.everySteps` follows
`evaluation.metric` for early stopping and, with `output.select: best`, keeps the best step's weights.

Stopping: SIGTERM (eviction, preemption, node drain, suspend) sets a flag; at the next step every process
learns of it (one all-reduce per step carries it, with the step's token count and rank 0's "a timed checkpoint
is due"), rank 0 writes a checkpoint, and the run exits 75 (retryable) in the process that was signalled and 76
(a peer stopped) in the others.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from kubetune_api import Select, TrainerConfig

from . import checkpoint, sharding
from .errors import ConfigError, PeerLost, Preempted
from .evaluate import evaluate
from .feed import HostFlags, StepBatches, StepFeed
from .identity import RunIdentity, check_claim
from .metrics import TrainerMetrics
from .modeling import load_trainable_state_dict, trainable_state_dict
from .plan import Plan
from .record.history import History, checkpoint_entry
from .storage import Storage
from .tasks import GeneratesText, Task, WindowMetrics

Reporter = Callable[[dict], None]


@lru_cache(maxsize=2)
def _epoch_order(sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of the training sequences: an index array, computed once per epoch."""
    return torch.randperm(sequences, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


def step_indices(plan: Plan, seed: int, step: int, rank: int) -> list[list[int]]:
    """The sequences this process trains on in step number `step`, as its micro-batches.

    The step's samples are the next `step_samples` of the epoch's order, dealt out round by round: in each
    round, process r takes `batch_size` of them after the r processes before it."""
    epoch, s = divmod(step, plan.steps_per_epoch)
    order = _epoch_order(plan.sequences, seed, epoch)
    start = s * plan.step_samples
    samples = order[np.arange(start, start + plan.step_samples) % plan.sequences].tolist()
    per_round = plan.batch_size * plan.processes
    return [samples[k * per_round + rank * plan.batch_size:][:plan.batch_size]
            for k in range(plan.accumulation)]


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


@dataclass
class Loop:
    """What every part of the loop shares: the run, where it reports, and how it is spread over processes."""

    config: TrainerConfig
    task: Task
    accelerator: object
    storage: Storage
    metrics: TrainerMetrics | None
    report: Reporter
    sharded: bool
    run: RunIdentity
    work: Path
    history: History  # metrics.jsonl: fed by `report`; carried in checkpoints

    def evaluate(self, model, examples, split: str) -> dict:
        return evaluate(self.task, model, examples, split, self.accelerator, self.config.hyperparameters.batch_size,
                        self.metrics)


class StopSignal:
    """SIGTERM sets `requested`; the loop acts on it at the next step. The previous handler is restored after.
    `request(why)` asks the same from inside the process (the local `kubetune sweep` pruning its trial)."""

    def __init__(self):
        self.requested = False
        self.why = "SIGTERM"

    def __call__(self, signum, frame) -> None:
        self.requested = True

    def request(self, why: str) -> None:
        self.requested, self.why = True, why

    @contextmanager
    def installed(self):
        previous = signal.signal(signal.SIGTERM, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def is_collective_error(e: BaseException) -> bool:
    """A failed collective (a peer process died, its connection closed or timed out)."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "NCCL", "gloo", "ProcessGroup", "Broken pipe"))


@contextmanager
def collective_failures_are_peer_lost(accelerator):
    """With several processes, a failed collective means a peer stopped or failed: raise PeerLost (exit 76, not
    charged to backoffLimit; the failing worker itself is)."""
    try:
        yield
    except Exception as e:
        if accelerator.num_processes > 1 and not isinstance(e, (Preempted, PeerLost)) and is_collective_error(e):
            raise PeerLost(f"a collective failed, so a peer worker stopped or failed ({str(e)[:300]}); the "
                           "workers restart from the last checkpoint") from e
        raise


def train(
    config: TrainerConfig,
    task: Task,
    model,
    splits: dict,
    accelerator,
    storage: Storage,
    metrics: TrainerMetrics | None,
    report: Reporter,
    inputs: dict,
    stop: StopSignal,
    history: History,
) -> tuple[object, checkpoint.TrainState, Plan]:
    """Train to the plan's last step (or early stopping). `splits`: the task's examples per split ("train", and
    "validation", "test" when given). `inputs`: {"datasets": {split: sha256}, "tokenizer": sha256}, what the
    checkpoints' fingerprint records. `stop`: the installed StopSignal the loop watches. `history`: the metric
    history `report` feeds, which checkpoints carry and a resumed run starts from. Raises
    Preempted/PeerLost when stopped (see above). With output.select best, the model returned has the best
    step's weights."""
    loop = Loop(config, task, accelerator, storage, metrics, report, sharding.is_sharded(config, accelerator),
                RunIdentity.of(config), Path(config.work_dir) / config.job_name, history)
    return _train(loop, model, splits, inputs, stop)


def _train(loop: Loop, model, splits: dict, inputs: dict, stop: StopSignal):
    config, accelerator, metrics = loop.config, loop.accelerator, loop.metrics
    hp, train_seqs, val_seqs = config.hyperparameters, splits["train"], splits.get("validation")

    # Restore: this run's newest checkpoint (or step 0); the model sharded or wrapped, with its optimizer.
    t, resumed = _restore(loop, model, len(train_seqs), inputs)
    # Baseline: the test split on the untrained model, before the first step (not again on resume).
    if not resumed and config.evaluation.baseline and "test" in splits:
        t.state.baseline = _baseline(loop, t.model, splits["test"])
    # Start: train mode; the plan to the log and the metrics.
    _start(loop, t)

    counters, window = Counters.at(t.state.step, accelerator.device), Window(accelerator.device)
    feed = StepFeed(partial(_step_batches, loop, t.plan, train_seqs), pin=accelerator.device.type == "cuda")
    flags = HostFlags()
    try:
        while t.state.step < t.plan.total_steps:
            batches = feed.get(t.state.step, t.plan.total_steps)
            # The step's loss units (trained tokens or samples) and tokens over every process: one all-reduce the
            # host does not wait for. Whether any process got SIGTERM, and rank 0's clock deciding a timed
            # checkpoint (every process takes the same decision about a collective): on the host, over gloo.
            counts = accelerator.reduce(torch.tensor([batches.units, batches.tokens], device=accelerator.device),
                                        reduction="sum")
            due = counters.checkpoint_due(config.checkpoint.every_minutes)
            stopping, due_time = flags.any(stop.requested, due and accelerator.is_main_process)
            # Stop: a checkpoint where the run stands, then exit (Preempted; PeerLost in the other processes).
            if stopping:
                _stop(loop, t, counters, stop.why if stop.requested else None)
            # One optimizer step; tokens trained: the loss-bearing tokens of a token task, else every input token.
            grad_norm = _step(loop, t, batches, counts[0], window)
            counters.stepped(counts[0] if loop.task.unit == "token" else counts[1])
            if metrics:  # the host runs ahead of the GPU by a bounded queue of work: a hang still stops this
                metrics.beat()
            # Log: the window's loss and throughput, every hyperparameters.loggingSteps and at the last step.
            if t.state.step % hp.logging_steps == 0 or t.state.step == t.plan.total_steps:
                counters.count_trained(t.state, metrics)
                window.log(loop, t, grad_norm, counters.eta_seconds(t.plan.total_steps - t.state.step))
            # Evaluate: the validation split every evaluation.everySteps; early stopping ends the loop.
            every = config.evaluation.every_steps
            if val_seqs and every and t.state.step % every == 0:
                if _evaluate_and_check_patience(loop, t.model, val_seqs, t.state):
                    loop.report({"event": "early_stopping", "step": t.state.step,
                                 **_best_event(t.state.best_validation)})
                    break
            # Checkpoint: every checkpoint.everySteps or everyMinutes (the last step is published instead).
            due_steps = config.checkpoint.every_steps and t.state.step % config.checkpoint.every_steps == 0
            if (due_steps or due_time) and t.state.step < t.plan.total_steps:
                _save_checkpoint(loop, t, counters)
                counters.last_checkpoint = time.monotonic()
    finally:
        feed.close()
    counters.count_trained(t.state, metrics)

    # Finish: the model unwrapped; with output.select best, the best step's weights.
    model = t.model if loop.sharded else accelerator.unwrap_model(t.model)
    if config.output.select == Select.best:
        _select_best(loop, model, t.state)
    return model, t.state, t.plan


@dataclass
class Training:
    """What the loop trains and where it stands: the model (sharded, or wrapped by accelerate), its optimizer and
    schedule, the plan, the state a checkpoint keeps and the inputs it was made from."""

    model: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    plan: Plan
    state: checkpoint.TrainState
    fingerprint: checkpoint.Fingerprint
    trainable: list[torch.nn.Parameter] = field(init=False)  # what the optimizer updates, clipped each step

    def __post_init__(self):
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class Counters:
    """This start's own counters (the TrainState keeps what outlives it, in checkpoints)."""

    saved_at: int  # the step of the newest checkpoint (or 0): where a restart would resume
    trained: torch.Tensor  # tokens trained over every process and not yet counted (on the device: no host sync)
    steps: int = 0  # steps trained since this start
    started: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)

    @classmethod
    def at(cls, step: int, device: torch.device) -> Counters:
        return cls(step, torch.zeros((), dtype=torch.int64, device=device))

    def checkpoint_due(self, every_minutes: float | None) -> bool:
        """Whether checkpoint.everyMinutes have passed since the last checkpoint (or the start)."""
        return bool(every_minutes) and time.monotonic() - self.last_checkpoint >= every_minutes * 60

    def stepped(self, tokens: torch.Tensor) -> None:
        self.trained += tokens
        self.steps += 1

    def count_trained(self, state: checkpoint.TrainState, metrics: TrainerMetrics | None) -> None:
        """Add the tokens trained since the last call to the state and the metric (one host sync: at logging
        steps and checkpoints, not every step)."""
        n = int(self.trained.item())
        state.tokens_trained += n
        if metrics:
            metrics.add_tokens(n)
        self.trained.zero_()

    def eta_seconds(self, steps_left: int) -> float:
        return (time.monotonic() - self.started) / self.steps * steps_left


class Window:
    """The steps since the last log line: their loss and throughput. The loss stays on the device (no host sync
    per step) until `log` sums it over the processes."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, trained units
        self.tokens = self.samples = self.steps = 0  # this process's input tokens and samples; steps
        self.started = time.monotonic()

    def add_batches(self, batches: StepBatches) -> None:
        self.steps += 1
        self.tokens += batches.tokens
        self.samples += batches.samples

    def add_loss(self, loss_sum: torch.Tensor, units: torch.Tensor) -> None:
        self.loss += torch.stack([loss_sum.detach().double(), units.double()])

    def log(self, loop: Loop, t: Training, grad_norm, eta_seconds: float) -> None:
        """Report the window's `train` event (kept in the state's history), set the metrics, start a new window."""
        accelerator, state, plan, metrics = loop.accelerator, t.state, t.plan, loop.metrics
        counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64, device=self.loss.device)
        totals = accelerator.reduce(torch.cat([self.loss, counts]), reduction="sum").tolist()
        elapsed = time.monotonic() - self.started
        entry = {
            "event": "train",
            "step": state.step,
            "total_steps": plan.total_steps,
            "epoch": round(plan.epoch(state.step), 4),
            "loss": totals[0] / max(totals[1], 1),
            "learning_rate": t.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens_per_second": totals[2] / elapsed,
            "samples_per_second": totals[3] / elapsed,
            "eta_seconds": eta_seconds,
            "step_seconds": elapsed / max(self.steps, 1),
            **({"gpu_memory_bytes": torch.cuda.max_memory_allocated(accelerator.device)}
               if accelerator.device.type == "cuda" else {}),
        }
        # the task's metrics of the window (preference rewards)
        own = loop.task.window_metrics(accelerator) if isinstance(loop.task, WindowMetrics) else {}
        entry.update(own)
        state.train_time_seconds += elapsed
        state.history.append(entry)
        loop.report(entry)
        if metrics:
            metrics.set(step=state.step, epoch=entry["epoch"], progress_ratio=state.step / plan.total_steps,
                        eta_seconds=entry["eta_seconds"], train_loss=entry["loss"],
                        learning_rate=entry["learning_rate"], grad_norm=entry["grad_norm"],
                        tokens_per_second=entry["tokens_per_second"], samples_per_second=entry["samples_per_second"])
            metrics.set_train(own)
            metrics.sample_gpus()
        self.loss.zero_()
        self.tokens = self.samples = self.steps = 0
        self.started = time.monotonic()


def _restore(loop: Loop, model, sequences: int, inputs: dict) -> tuple[Training, bool]:
    """Resume from this run's newest complete checkpoint, if any (it fixes the step size, in samples), else start
    at step 0; shard (FSDP) or wrap (DDP) the model and make its optimizer. Returns it all, and whether resumed."""
    config, accelerator, hp = loop.config, loop.accelerator, loop.config.hyperparameters
    rank, processes = accelerator.process_index, accelerator.num_processes
    restored = checkpoint.restore_latest(loop.storage, config.checkpoint_uri, loop.work / "resume", loop.run,
                                         loop.report)
    saved = restored.fingerprint if restored else {}
    plan = Plan.make(sequences, config, processes, saved.get("step_samples"))
    fingerprint = _fingerprint(loop, plan, inputs)
    changed = "; ".join(fingerprint.differences(saved)) if restored else ""
    if changed:
        raise ConfigError(
            f"{restored.uri}: this checkpoint was written with other inputs: {changed}. Resuming would not "
            "continue the same run: restore those inputs, or set checkpoint.uri to a new "
            "prefix to start over")

    if loop.sharded:  # FSDP: shard first; the optimizer then works on this process's shards only
        model = sharding.shard(model, accelerator.device, accelerator.mixed_precision)
    optimizer, scheduler = make_optimizer(model, config, plan.total_steps)
    state = checkpoint.TrainState()
    torch.manual_seed(hp.seed + rank)  # dropout; the adapter was initialised from hp.seed alone (load_model)
    if restored is not None:
        state = restored.state
        scheduler.load_state_dict(restored.scheduler)
        if loop.sharded:
            sharding.load_full_state(model, optimizer, restored.weights, restored.optimizer)
        else:
            load_trainable_state_dict(model, restored.weights)
            optimizer.load_state_dict(restored.optimizer)
        if len(restored.rng) == processes:
            checkpoint.set_rng_state(restored.rng[rank])
        else:  # resharded: a fresh, still deterministic, stream per process
            torch.manual_seed(hp.seed + rank + 1000 * state.step)
        loop.report({"event": "resumed", "step": state.step, "checkpoint": restored.uri,
                     **({"processes": {"before": saved.get("processes"), "now": processes}}
                        if saved.get("processes") != processes else {})})

    loop.history.resume(restored.history if restored else [], state.step)  # the lines up to the checkpoint's step
    if not loop.sharded:  # DDP (or a single process): accelerate wraps the model and moves it to the device
        model, optimizer = accelerator.prepare(model, optimizer)
    return Training(model, optimizer, scheduler, plan, state, fingerprint), restored is not None


def _fingerprint(loop: Loop, plan: Plan, inputs: dict) -> checkpoint.Fingerprint:
    """What this run's checkpoints record of its inputs and step shape: a resume needs the same."""
    hp = loop.config.hyperparameters
    return checkpoint.Fingerprint(
        datasets=inputs.get("datasets", {}), tokenizer=inputs.get("tokenizer", ""),
        max_seq_length=hp.max_seq_length, packing=hp.packing, batch_size=hp.batch_size,
        accumulation=hp.gradient_accumulation_steps, strategy=hp.strategy.value,
        processes=loop.accelerator.num_processes, step_samples=plan.step_samples, task=loop.task.describe(),
        quality=loop.config.dataset.quality.dump())


def _start(loop: Loop, t: Training) -> None:
    """Train mode; report the plan, and set the training phase and its steps in the metrics."""
    t.model.train()
    loop.report({"event": "plan", "total_steps": t.plan.total_steps, "sequences": t.plan.sequences,
                 "step_samples": t.plan.step_samples, "processes": loop.accelerator.num_processes,
                 "strategy": "fsdp" if loop.sharded else "ddp", "start_step": t.state.step})
    if loop.metrics:
        loop.metrics.set_phase("training")
        loop.metrics.set(total_steps=t.plan.total_steps, step=t.state.step)


def _step_batches(loop: Loop, plan: Plan, train_seqs, step: int) -> StepBatches:
    """This process's micro-batches of step number `step`, collated (StepFeed prepares them a step ahead)."""
    task, rank = loop.task, loop.accelerator.process_index
    micro = [[train_seqs[i] for i in indices]
             for indices in step_indices(plan, loop.config.hyperparameters.seed, step, rank)]
    sizes = [task.size(s) for seqs in micro for s in seqs]
    batches = [task.collate(seqs) if seqs else task.blank(train_seqs[0]) for seqs in micro]
    return StepBatches(batches, sum(t for t, _ in sizes), sum(n for _, n in sizes),
                       sum(task.units(b) for b in batches))


def _step(loop: Loop, t: Training, batches: StepBatches, step_units: torch.Tensor, window: Window):
    """One optimizer step: forward and backward over this process's micro-batches (their loss added to the
    window), gradient clipping, the optimizer's and the schedule's step. Returns the gradient norm."""
    accelerator = loop.accelerator
    window.add_batches(batches)
    for k, batch in enumerate(batches.on(accelerator.device)):
        sync = gradient_sync(t.model, accelerator, loop.sharded, sync=k == len(batches.batches) - 1)
        with sync, accelerator.autocast():
            loss_sum, units = loop.task.loss(t.model, batch)
            # DDP and FSDP average gradients over processes; scale back so the step loss is a global unit mean.
            loss = loss_sum * accelerator.num_processes / step_units.clamp(min=1)
        accelerator.backward(loss)
        window.add_loss(loss_sum, units)
    grad_norm = accelerator.clip_grad_norm_(t.trainable, loop.config.hyperparameters.max_grad_norm)
    if loop.sharded:  # FSDP2's norm is a DTensor
        grad_norm = sharding.full(grad_norm)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.state.step += 1
    t.state.samples += t.plan.step_samples
    return grad_norm


def _stop(loop: Loop, t: Training, counters: Counters, why: str | None) -> NoReturn:
    """A checkpoint where the run stands, then Preempted where a stop was requested (`why`: SIGTERM, or what asked
    for it), else PeerLost."""
    _save_checkpoint(loop, t, counters)  # unless the newest checkpoint (or step 0) is where this run stands already
    loop.report({"event": "stopped", "step": t.state.step, "reason": why or "peer"})
    if why:
        raise Preempted(f"stopped by {why} at step {t.state.step}; checkpoint written, the run resumes from it")
    raise PeerLost(f"a peer worker was stopped at step {t.state.step}; the workers resume from its checkpoint")


def _save_checkpoint(loop: Loop, t: Training, counters: Counters) -> None:
    """Checkpoint, unless the newest checkpoint (or step 0) is at this step already."""
    if t.state.step != counters.saved_at:
        counters.count_trained(t.state, loop.metrics)
        _checkpoint(loop, t)
        counters.saved_at = t.state.step


def _baseline(loop: Loop, model, test_seqs) -> dict:
    """The test split's metrics before the first step: the base model (a LoRA adapter starts as the identity; a
    new classification head as it was initialised), what the fine-tuned model is compared with."""
    if loop.metrics:
        loop.metrics.set_phase("evaluating")
    result = loop.evaluate(model, test_seqs, "test")
    if isinstance(loop.task, GeneratesText):
        result.update(loop.task.generation_metrics(model, loop.accelerator, loop.metrics.beat if loop.metrics
                                                   else (lambda: None)))
    loop.report({"event": "baseline", "split": "test", **result})
    if loop.metrics:
        loop.metrics.set_evaluation("test", "baseline", result)
    return {"test": result}


def _best_event(best: dict | None) -> dict:
    return {f"best_{k}": v for k, v in (best or {}).items()}


def _evaluate_and_check_patience(loop: Loop, model, val_seqs, state) -> bool:
    """Evaluate on the validation split, keep the best step (output.select best: its weights too); True when
    early stopping says to stop."""
    metrics, config = loop.metrics, loop.config
    if metrics:
        metrics.set_phase("evaluating")
    result = loop.evaluate(model, val_seqs, "validation")
    state.last_validation = {"step": state.step, **result}
    loop.report({"event": "validation", **state.last_validation})
    if metrics:
        metrics.set(validation_loss=result["loss"], validation_step=state.step)
        metrics.set_evaluation("validation", "finetuned", result)
        metrics.set_phase("training")
    stopping, metric = config.evaluation.early_stopping, config.evaluation.metric
    value = result[metric.value]
    best = state.best_validation["value"] if state.best_validation else None
    if loop.task.better(metric, value, best, stopping.min_delta if stopping else 0.0):
        state.best_validation = {"step": state.step, "metric": metric.value, "value": value}
        state.evals_without_improvement = 0
        if config.output.select == Select.best:
            _save_best(loop, model, state.best_validation)
    else:
        state.evals_without_improvement += 1
    return bool(stopping and state.evals_without_improvement >= stopping.patience)


def _trainable_weights(loop: Loop, model) -> dict | None:
    """The trainable weights in full on rank 0 (under FSDP every process helps gather them: a collective)."""
    if loop.sharded:
        return sharding.full_trainable_state(model)
    if not loop.accelerator.is_main_process:
        return None
    return trainable_state_dict(loop.accelerator.unwrap_model(model))


def _save_best(loop: Loop, model, best: dict) -> None:
    weights = _trainable_weights(loop, model)
    if loop.accelerator.is_main_process:
        check_claim(loop.storage, loop.config, loop.run)
        uri = checkpoint.save_best(loop.storage, loop.work / "best" / f"step-{best['step']:08d}", weights,
                                   loop.config.checkpoint_uri, best, loop.run)
        loop.report({"event": "best", **best, "uri": uri})
    loop.accelerator.wait_for_everyone()


def _select_best(loop: Loop, model, state) -> None:
    """output.select best: load the best step's weights (every process reads them from storage) unless the model
    is at that step already."""
    best = state.best_validation
    if best is None:
        return
    if best["step"] != state.step:
        weights = checkpoint.load_best(loop.storage, loop.config.checkpoint_uri, best["step"],
                                       loop.work / "resume" / f"rank-{loop.accelerator.process_index}")
        if loop.sharded:
            sharding.load_full_weights(model, weights)
        else:
            load_trainable_state_dict(model, weights)
    loop.report({"event": "selected", "select": "best", **best})


def _checkpoint(loop: Loop, t: Training) -> None:
    """Rank 0 saves and uploads. Every process first sends it its RNG state, and under FSDP helps gather the
    shards (collectives)."""
    from accelerate.utils import gather_object

    accelerator, config = loop.accelerator, loop.config
    model, optimizer, scheduler, state = t.model, t.optimizer, t.scheduler, t.state
    rng = gather_object([checkpoint.rng_state()]) if accelerator.num_processes > 1 else [checkpoint.rng_state()]
    if loop.sharded:
        weights = sharding.full_trainable_state(model)
        optimizer_state = sharding.full_optimizer_state(model, optimizer)
    if not accelerator.is_main_process:
        return
    if not loop.sharded:
        weights, optimizer_state = trainable_state_dict(accelerator.unwrap_model(model)), optimizer.state_dict()
    metrics = loop.metrics
    if metrics:
        metrics.beat()  # the gather (a collective under FSDP) is done
    # This checkpoint in the run's list (which it carries), with the validation metrics at its step; the history.
    state.checkpoints.append(checkpoint_entry(state.step, checkpoint.step_uri(config.checkpoint_uri, state.step),
                                              time.time(), state.last_validation))
    directory = checkpoint.save(loop.work / "checkpoint" / f"step-{state.step:08d}", weights, optimizer_state,
                                scheduler, state, rng)
    loop.history.save(directory)
    if metrics:
        metrics.beat()  # written locally; the upload beats per file and while bytes move (storage heartbeat)
    check_claim(loop.storage, config, loop.run)  # the prefix is still this run's: nobody moved it meanwhile
    uri = checkpoint.upload(loop.storage, directory, config.checkpoint_uri, state.step, loop.run, t.fingerprint)
    left = checkpoint.prune(loop.storage, config.checkpoint_uri, config.checkpoint.keep, loop.run)
    if config.output.select == Select.best:  # the best this checkpoint records is the one a resume would use
        left += checkpoint.prune_best(loop.storage, config.checkpoint_uri, (state.best_validation or {}).get("step"),
                                      loop.run)
    if left:
        loop.report({"event": "checkpoints_not_pruned", "uris": left,
                     "reason": "their manifest does not name this run (another run's, or an unfinished upload)"})
    if metrics:
        metrics.checkpoint_done(state.step)
    loop.report({"event": "checkpoint", "step": state.step, "uri": uri})

"""What early stopping saves: the CPU-seconds a FineTuneSweep spends to reach a validation loss, TPE + ASHA against
TPE without pruning and random search, on one tiny task (issue 30, section 5).

One tiny Llama (a BPE tokenizer and a random model pre-trained a few steps on generic English, so that it writes
words) and one support-chat data set are made once. Every sweep searches the same space (learningRate log-uniform in
[1e-5, 1e-1], method.lora.r an integer, log-uniform in [2, 32]) with the same template (`--steps` LoRA steps,
validation every `--every` steps), maxTrials (`--trials`) and seed, through `kubetune_trainer.sweep.run_sweep`: the
real pipeline, in this process, one trial after another, pruned by Optuna as `kubetune sweep` and the operator prune.
One warm-up trial, not counted, runs first: it tokenizes the data into the data cache every sweep then reads
(dataset.cacheUri), and pays the process's one-off costs (imports, first kernels).

Per trial: the CPU-seconds of this process (`resource.getrusage`, user + system, SELF + CHILDREN) from the trial's
start to its end, which covers everything a trial costs here (loading the model, the steps, the evaluations, the
checkpoint a pruned trial writes, publishing), and the steps it trained. Torch runs one thread (OMP_NUM_THREADS=1,
torch.set_num_threads(1)): CPU-seconds then count work, not threads spinning, and vary little with the machine's load
(wall time does).

Per algorithm and seed: the total CPU-s, the best validation loss of a succeeded trial, and the CPU-s spent until
the best so far first came within `--tolerance` (relative) of the target: the best loss of TPE without pruning for
that seed. The goal (issue 30): TPE + ASHA's sweep reaches the same best loss (the target, within the tolerance)
with at most 60% of the CPU-s of the whole sweep without pruning (a user runs the whole sweep: which trial will be
the best is not known while it runs). The result is a markdown snippet on stdout; progress on stderr.

Short horizon: every trial's validation losses are kept, and over the trials of TPE without pruning (which all run
to the end) the report gives, at each evaluation step, Spearman's rank correlation between the loss there and the
final loss, over all trials and over the best third: how far a rung at that step ranks the trials as their end
does (Wu et al. 2018, short-horizon bias). `--asha FIRST:ETA` swaps the asha sweeps' pruner for a
SuccessiveHalvingPruner with that first rung and reduction factor (in this process, for exploring; the default is
the product's, kubetune_search.pruner).

    python bench/bench_sweep.py                      # 12 trials x 3 sweeps x 4 seeds
    python bench/bench_sweep.py --trials 6 --steps 12 --seeds 0 --algorithms tpe+asha,tpe+none
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread, as in the tests

import argparse
import json
import math
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GOAL = 0.60  # issue 30: ASHA spends at most this share of the no-pruning compute for the same best metric
BASELINE = "tpe+none"  # the target is its best loss; the goal compares tpe+asha to it
ASHA = "tpe+asha"
LR = "hyperparameters.learningRate"
RANK = "method.lora.r"


@dataclass
class TrialCost:
    """One trial as the benchmark counts it."""

    number: int
    phase: str  # Succeeded, Pruned or Failed
    metric: float | None  # a succeeded trial's validation loss (a pruned trial's last evaluation, not counted)
    cpu_s: float
    wall_s: float
    steps: int
    parameters: dict
    evaluations: dict[int, float] = field(default_factory=dict)  # validation loss by step


# -- the summary: pure functions of the trials ------------------------------------------------------------------------


def best_metric(trials: list[TrialCost]) -> float | None:
    """The lowest loss of a succeeded trial (what the sweep would promote)."""
    done = [t.metric for t in trials if t.phase == "Succeeded" and t.metric is not None]
    return min(done) if done else None


def reached(metric: float | None, target: float, tolerance: float) -> bool:
    """Whether a loss is within `tolerance` (relative) of the target loss, or below it."""
    return metric is not None and metric <= target * (1 + tolerance)


def cpu_to_target(trials: list[TrialCost], target: float, tolerance: float) -> float | None:
    """The CPU-seconds of the trials up to and including the first succeeded one that reached the target; None where
    none did."""
    spent = 0.0
    for t in trials:
        spent += t.cpu_s
        if t.phase == "Succeeded" and reached(t.metric, target, tolerance):
            return spent
    return None


def summarize(runs: dict[str, list[TrialCost]], tolerance: float, baseline: str = BASELINE) -> dict[str, dict]:
    """One seed's sweeps by algorithm: totals, best loss, CPU-s to the baseline's best (within tolerance), and that
    CPU-s relative to the baseline's."""
    target = best_metric(runs[baseline])
    out = {}
    for name, trials in runs.items():
        to = None if target is None else cpu_to_target(trials, target, tolerance)
        out[name] = {"trials": len(trials), "cpu_s": sum(t.cpu_s for t in trials),
                     "steps": sum(t.steps for t in trials), "pruned": sum(t.phase == "Pruned" for t in trials),
                     "best": best_metric(trials), "target": target, "cpu_to_target": to}
    base = out[baseline]["cpu_to_target"]
    for row in out.values():
        row["ratio"] = None if row["cpu_to_target"] is None or not base else row["cpu_to_target"] / base
        row["total_ratio"] = row["cpu_s"] / out[baseline]["cpu_s"] if out[baseline]["cpu_s"] else None
    return out


def goal_met(row: dict, tolerance: float) -> bool:
    """Issue 30's goal for one sweep's summary row: the same best loss as the baseline's (within tolerance) for at
    most GOAL of the baseline's CPU-s."""
    return (row["target"] is not None and reached(row["best"], row["target"], tolerance)
            and row["total_ratio"] is not None and row["total_ratio"] <= GOAL)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (scipy's: Pearson's on the ranks, ties sharing their mean rank); None under 3
    pairs or where one side is constant."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def rung_agreement(trials: list[TrialCost], step: int, share: float = 1.0) -> tuple[float | None, int]:
    """How the loss at `step` ranks the trials that ran to the end as their final loss does: Spearman's rho over
    the best `share` of them by final loss, and how many that is."""
    done = sorted((t for t in trials if t.phase == "Succeeded" and t.metric is not None and step in t.evaluations),
                  key=lambda t: t.metric)
    kept = done[:math.ceil(len(done) * share)]
    return spearman([t.evaluations[step] for t in kept], [t.metric for t in kept]), len(kept)


# -- running the sweeps -----------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare(work: Path, args) -> tuple[Path, dict[str, Path]]:
    """The tiny base (pre-trained `--pretrain` steps) and the support chats, made once for every sweep."""
    from kubetune_dev import demo_data
    from kubetune_dev.tiny import make_tiny_base

    texts = demo_data.generic_texts(400) + demo_data.chat_texts(demo_data.support_records(60, seed=99))
    base = make_tiny_base(work / "base", texts, vocab_size=512, hidden_size=64, layers=2, heads=2,
                          pretrain_steps=args.pretrain, log=None)
    data = demo_data.write_support_dataset(work / "data", train=args.train, validation=args.validation, test=0)
    return base, data


def sweep_doc(args, base: Path, data: dict[str, Path], out: Path, algorithm: str, pruning: str, seed: int,
              trials: int) -> dict:
    template = {"baseModel": {"uri": str(base)},
                "dataset": {"train": str(data["train"]), "validation": str(data["validation"]),
                            "cacheUri": str(out.parent / "data-cache") + "/"},  # tokenized once, by the warm-up
                "hyperparameters": {"maxSteps": args.steps, "batchSize": 8, "maxSeqLength": 128, "warmupRatio": 0.0},
                "evaluation": {"everySteps": args.every, "baseline": False}, "checkpoint": {"everySteps": 10_000}}
    parameters = [{"path": LR, "min": 1e-5, "max": 1e-1, "log": True}, {"path": RANK, "min": 2, "max": 32, "log": True}]
    spec = {"template": template, "parameters": parameters, "objective": {"metric": "loss", "goal": "minimize"},
            "algorithm": algorithm, "earlyStopping": pruning, "seed": seed, "maxTrials": trials,
            "maxFailedTrials": trials, "output": {"uri": str(out) + "/"}}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": out.name}, "spec": spec}


def parse_sweep(name: str) -> tuple[str, str, int | None] | None:
    """`tpe+asha` or `tpe+asha@36` (maxTrials 36 instead of --trials): (algorithm, pruning, trials); None if bad."""
    sweep, _, trials = name.partition("@")
    algorithm, _, pruning = sweep.partition("+")
    if algorithm not in ("tpe", "random") or pruning not in ("asha", "median", "none") \
            or (trials and not trials.isdigit()):
        return None
    return algorithm, pruning, int(trials) if trials else None


def run_one(args, base: Path, data: dict[str, Path], work: Path, name: str, seed: int,
            trials: int | None = None) -> list[TrialCost]:
    """One sweep (`trials`: maxTrials, else the name's, else --trials): its trials, each with the CPU-s and steps
    it took."""
    from kubetune_api import FineTuneSweep
    from kubetune_trainer.pipeline import run as run_pipeline
    from kubetune_trainer.sweep import run_sweep

    algorithm, pruning, more = parse_sweep(name)
    trials = trials or more or args.trials
    out = work / "sweeps" / (f"{algorithm}-{pruning}-{seed}" + (f"-{trials}" if more else ""))
    sweep = FineTuneSweep.model_validate(sweep_doc(args, base, data, out, algorithm, pruning, seed, trials))
    costs: list[dict] = []

    def timed(config, report, stop):  # pipeline.run, measured
        steps, losses = [0], {}

        def counting(event: dict) -> None:  # train events come per logging window: the last step of any event
            if event["event"] in ("train", "validation", "stopped"):
                steps[0] = max(steps[0], event["step"])
            if event["event"] == "validation" and isinstance(event.get("loss"), float):
                losses[event["step"]] = event["loss"]
            report(event)

        cpu, wall = cpu_seconds(), time.monotonic()
        try:
            return run_pipeline(config, report=counting, stop=stop)
        finally:
            costs.append({"cpu_s": cpu_seconds() - cpu, "wall_s": time.monotonic() - wall, "steps": steps[0],
                          "evaluations": losses})

    def show(run, row, event) -> None:
        if event["event"] == "trial_ended":
            c = costs[row.number]
            print(f"  {row.name}: {row.phase.value} loss {row.metric} at step {row.step}, {c['cpu_s']:.1f} CPU-s, "
                  f"lr {row.parameters[LR]:.2g} r {row.parameters[RANK]}", file=sys.stderr, flush=True)

    run = run_sweep(sweep, work / "run", show=show, train=timed)
    return [TrialCost(r.number, r.phase.value, r.metric if r.phase.value == "Succeeded" else None, **c,
                      parameters=r.parameters) for r, c in zip(run.trials, costs, strict=True)]


def swap_asha(first: int, eta: int) -> None:
    """--asha: the asha sweeps' pruner becomes SuccessiveHalvingPruner(first, eta) (kubetune_search.study looks
    `pruner` up when it makes each sweep's study); the other sweeps keep theirs."""
    import kubetune_search
    import optuna
    from kubetune_api import Pruning

    product = kubetune_search.pruner

    def pruner(spec):
        if spec.early_stopping != Pruning.asha:
            return product(spec)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=eta)

    kubetune_search.pruner = pruner


# -- the report -------------------------------------------------------------------------------------------------------


def _num(value, fmt: str = "{:.1f}", none: str = "not reached") -> str:
    return none if value is None else fmt.format(value)


def agreement(args, trials: dict[int, dict[str, list[TrialCost]]]) -> list[str]:
    """The short-horizon table: at each evaluation step, Spearman's rho between the loss there and the final loss
    over every seed's tpe+none trials (all of them run to the end), all and the best third."""
    pooled = [t for runs in trials.values() for t in runs.get(BASELINE, [])]
    lines = [f"How the loss at each evaluation step ranks {BASELINE}'s {len(pooled)} trials (every seed) as their "
             "final loss does (Spearman's rho; the best third: the trials a sweep must tell apart):", "",
             "| step | rho, all trials | rho, best third |", "|---:|---:|---:|"]
    for step in range(args.every, args.steps, args.every):
        (every, _), (best, n) = rung_agreement(pooled, step), rung_agreement(pooled, step, 1 / 3)
        lines.append(f"| {step} | {_num(every, '{:.2f}', '-')} | {_num(best, '{:.2f}', '-')} ({n}) |")
    return lines


def markdown(args, seeds: dict[int, dict[str, dict]], facts: dict,
             trials: dict[int, dict[str, list[TrialCost]]]) -> str:
    lines = [f"### TPE + ASHA vs no pruning vs random search: {args.trials} trials of {args.steps} steps", "",
             f"Tiny Llama ({facts['params'] / 1e6:.2f}M parameters, pre-trained {args.pretrain} steps), LoRA on "
             f"{args.train} support chats (validation {args.validation}), batch 8, validation every {args.every} "
             f"steps (ASHA's rungs at {args.every} x 3^n steps); learningRate log-uniform in [1e-5, 1e-1], lora.r "
             f"log-uniform integer in [2, 32]. Target: {BASELINE}'s best validation loss for the seed, reached within "
             f"{args.tolerance:.0%}. CPU-s: this process's user + system time over each trial "
             f"(one torch thread), everything a trial costs included.", "",
             "| seed | sweep | trials | pruned | steps trained | CPU-s total | best loss | CPU-s to target | "
             f"vs {BASELINE} (to target) | vs {BASELINE} (total) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for seed, rows in seeds.items():
        for name, r in rows.items():
            lines.append(f"| {seed} | {name} | {r['trials']} | {r['pruned']} | {r['steps']} | {r['cpu_s']:.1f} | "
                         f"{_num(r['best'], '{:.4f}', 'none')} | {_num(r['cpu_to_target'])} | "
                         f"{_num(r['ratio'], '{:.0%}', '-')} | {_num(r['total_ratio'], '{:.0%}', '-')} |")
    lines.append("")
    if args.asha:
        lines += [f"{ASHA}: SuccessiveHalvingPruner(min_resource={args.asha[0]}, reduction_factor={args.asha[1]}) "
                  "(--asha), not the product's.", ""]
    verdicts = [goal_met(rows[ASHA], args.tolerance) for rows in seeds.values() if ASHA in rows]
    if verdicts:
        shown = ", ".join(f"seed {seed}: {_num(rows[ASHA]['total_ratio'], '{:.0%}')} of the CPU-s, best "
                          f"{_num(rows[ASHA]['best'], '{:.4f}', 'none')} vs {_num(rows[ASHA]['target'], '{:.4f}')}"
                          for seed, rows in seeds.items() if ASHA in rows)
        lines.append(f"Goal: {ASHA} reaches {BASELINE}'s best loss (within {args.tolerance:.0%}) with at most "
                     f"{GOAL:.0%} of its CPU-s: {shown}: **{'met' if all(verdicts) else 'not met'}**"
                     f"{'' if all(verdicts) or not any(verdicts) else ' for every seed'} "
                     f"({sum(verdicts)} of {len(verdicts)} seeds).")
    lines += ["", *agreement(args, trials), ""]
    lines.append(f"Python {platform.python_version()}, torch {facts['torch']}, transformers {facts['transformers']}, "
                 f"peft {facts['peft']}, optuna {facts['optuna']}; {facts['machine']}.")
    return "\n".join(lines)


def facts(base: Path) -> dict:
    import optuna
    import peft
    import torch
    import transformers
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"params": params, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "optuna": optuna.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or platform.system()})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="maxTrials of every sweep")
    parser.add_argument("--steps", type=int, default=27, help="hyperparameters.maxSteps of every trial")
    parser.add_argument("--every", type=int, default=3, help="evaluation.everySteps (ASHA's first rung)")
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0, 1, 2, 3])
    parser.add_argument("--algorithms", type=lambda v: v.split(","), default=[ASHA, BASELINE, "random+none"],
                        help="comma-separated <tpe|random>+<asha|median|none>[@trials]; must include tpe+none; "
                        "@trials: this sweep's maxTrials, e.g. tpe+asha@36 for the no-pruning sweep's compute")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative, on the target loss")
    parser.add_argument("--pretrain", type=int, default=150, help="pre-training steps of the tiny base")
    parser.add_argument("--train", type=int, default=96, help="training records")
    parser.add_argument("--validation", type=int, default=16, help="validation records")
    parser.add_argument("--asha", type=lambda v: tuple(int(x) for x in v.split(":")), metavar="FIRST:ETA",
                        help="explore: the asha sweeps' SuccessiveHalvingPruner with this first rung (steps) and "
                        "reduction factor instead of the product's")
    parser.add_argument("--work-dir", help="keep files here, with trials.json (default: a temporary folder)")
    args = parser.parse_args()
    if BASELINE not in args.algorithms:
        parser.error(f"--algorithms must include {BASELINE} (the target)")
    if bad := [a for a in args.algorithms if parse_sweep(a) is None]:
        parser.error(f"--algorithms: {', '.join(bad)}: use <tpe|random>+<asha|median|none>[@trials]")

    import torch

    torch.set_num_threads(1)
    if args.asha:
        swap_asha(*args.asha)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-sweep-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        print(f"preparing the tiny model and data in {work}", file=sys.stderr, flush=True)
        base, data = prepare(work, args)
        # One trial first, not counted: it tokenizes the data into the cache every sweep reads, and pays what
        # the process pays once (imports, first kernels), which would otherwise weigh on the first sweep alone.
        print("warm-up trial", file=sys.stderr, flush=True)
        run_one(args, base, data, work, "random+none", 9999, trials=1)
        trials: dict[int, dict[str, list[TrialCost]]] = {}
        for seed in args.seeds:
            trials[seed] = {}
            for name in args.algorithms:
                print(f"seed {seed}: {name}", file=sys.stderr, flush=True)
                trials[seed][name] = run_one(args, base, data, work, name, seed)
        (work / "trials.json").write_text(json.dumps(
            {seed: {n: [asdict(t) for t in ts] for n, ts in runs.items()} for seed, runs in trials.items()}, indent=1))
        summaries = {seed: summarize(runs, args.tolerance) for seed, runs in trials.items()}
        print(markdown(args, summaries, facts(base), trials))


if __name__ == "__main__":
    main()

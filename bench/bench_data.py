"""The data path at scale: generated chat data through Kubetune's trainer and through Hugging Face `datasets`.

For each size (default 200,000 and 1,000,000 records), in one run, one after the other, each in its own process
tree, timed from its start by this process's clock, with the peak RSS of the whole tree (the process and all its
children, summed, polled every 50 ms; a pool's forked workers share pages, so the sum over-counts them, on both
sides alike):

* baseline: what a `datasets` user writes: `load_dataset("json", data_files=..., cache_dir=<fresh>)`, then
  `.map(lambda r: {"input_ids": tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]},
  num_proc=2)`; timed until the map returns;
* kubetune, first run: `kubetune train --config cfg.yaml` (one JSON event per line on stdout) with maxSteps 1,
  packing, maxSeqLength 512, metrics off, a fresh `dataset.cacheUri` (a local folder) and output: timed until the
  `plan` event (the first optimizer step starts right after), and to the end;
* kubetune, cached: the same data and cacheUri with a new job name, output and work folder (as a second job, or a
  retry on another node): the cache is reused;
* kubetune, unchecked: the first run again (a fresh cacheUri) with every data-quality check off
  (`dataset.quality`: off), for what the checks cost (docs/data-quality.md);
* kubetune, plain: the train split alone (as the baseline has it), default checks, a fresh cacheUri, run to the
  end: the whole 1-step run against the baseline's map.

The first three are stopped at their first step: what follows (the step, the test split's evaluation, publishing)
times the model, not the data path.

Kubetune's runs also read a test split (`--test-records`, 10,000 by default, written with another seed, every 100th
record a train record with one word changed), which the train split is checked against for leakage; the baseline
maps the train split only. The label-error check (`--label-records`, 100,000 by default) is timed on its own on
generated labelled texts (20 classes, 5% of the labels flipped), with its recall and precision.

"data" is the time from the first `phase` event to the `training` phase (fetching, validating and tokenizing;
interpreter start, imports, model loading and the optimizer left out): the cached run's goal is under 10% of the
first run's. The records (bench/chat_data.py, `--text`) are the demo support bot's system/user/assistant
conversations with people's own words (`varied`, the default), or its templates alone (`templated`: nearly every
record a near copy of many others, the near-copy check's worst case), streamed to a JSONL file; the base is a tiny
Llama with a BPE tokenizer (ChatML chat template) trained here, no pre-training (`kubetune_dev.tiny.make_tiny_base`).
The result is a markdown section for BENCHMARKS.md on stdout; progress and the children's logs go to stderr and
to the work folder. Temporary folders are removed and every child is killed on Ctrl-C, SIGTERM and timeouts.

    python bench/bench_data.py                          # 200,000 and 1,000,000 records
    python bench/bench_data.py --records 20000,100000   # a quick try
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from chat_data import labelled_texts, planted_test_split, templated_chats, varied_chats

GOALS = {"time_ratio": 1.2, "rss_bytes": 1.5e9, "rss_growth": 1.3, "cached_ratio": 0.10, "quality_cost": 1.25,
         "label_seconds": 120}
QUALITY_OFF = dict.fromkeys(("duplicates", "leakage", "conflicts", "labelErrors", "personalData"), "off")
MIB = 2**20
CHATS = {"varied": varied_chats, "templated": templated_chats}


# -- data and base model ----------------------------------------------------------------------------

def write_chat_records(path: Path, records) -> Path:
    """Chat records (an iterable: a million never sit in a list) as JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def make_base(model_dir: Path) -> Path:
    """The demo's tiny Llama: tokenizer trained on its texts, random weights (training 1 step needs no more)."""
    from kubetune_dev.demo_data import demo_base_texts
    from kubetune_dev.tiny import make_tiny_base

    return make_tiny_base(model_dir, demo_base_texts())


# -- the baseline, in its own process ---------------------------------------------------------------

def hf_side(args) -> None:
    """What a Hugging Face `datasets` user does; says "mapped" on stdout when the map has returned."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def input_ids(encoded):  # transformers 5 returns a BatchEncoding, 4 a list of ids
        return encoded["input_ids"] if isinstance(encoded, Mapping) else encoded

    dataset = load_dataset("json", data_files=args.data, cache_dir=args.cache_dir, split="train")
    dataset = dataset.map(
        lambda r: {"input_ids": input_ids(tokenizer.apply_chat_template(r["messages"], tokenize=True))},
        num_proc=args.num_proc)
    print(json.dumps({"event": "mapped"}), flush=True)
    import pyarrow.compute as pc  # after the mark: a sanity check, not timed

    tokens = pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py()
    print(json.dumps({"event": "counted", "rows": len(dataset), "tokens": tokens}), flush=True)


def labels_side(args) -> None:
    """The label-error check on generated labelled texts; says "suspected" on stdout with its recall and precision."""
    from kubetune_trainer.quality.labels import suspected_label_errors

    texts, labels, flipped = labelled_texts(args.label_records, seed=args.seed)
    print(json.dumps({"event": "generated"}), flush=True)
    suspected = set(suspected_label_errors(texts, [str(label) for label in labels], seed=args.seed))
    found = len(suspected & flipped)
    print(json.dumps({"event": "suspected", "count": len(suspected), "flipped": len(flipped),
                      "recall": found / len(flipped), "precision": found / len(suspected) if suspected else None}),
          flush=True)


# -- measuring a process tree -----------------------------------------------------------------------

class TreeRSS:
    """Polls the summed RSS of a process and all its descendants every `interval` seconds and keeps the peak;
    also the summed PSS (shared pages split between their processes: what a forked pool really holds) every
    `pss_every` polls, as reading it walks each process's page tables (milliseconds a process)."""

    def __init__(self, pid: int, interval: float = 0.05, pss_every: int = 5):
        self.root = psutil.Process(pid)
        self.interval, self.pss_every = interval, pss_every
        self.peak = self.peak_pss = 0
        self.seen: dict[int, psutil.Process] = {}  # every descendant seen, to kill stragglers by PID
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        polls = 0
        while not self._stop.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            pss = polls % self.pss_every == 0
            rss_total = pss_total = 0
            for p in tree:
                self.seen.setdefault(p.pid, p)
                try:
                    rss_total += p.memory_info().rss
                    pss_total += p.memory_full_info().pss if pss else 0
                except psutil.Error:
                    pass
            self.peak = max(self.peak, rss_total)
            self.peak_pss = max(self.peak_pss, pss_total)
            polls += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Run:
    """One measured child: when each event came (seconds from its start), the total, the peaks."""

    seconds: float = 0.0
    rc: int | None = None
    timed_out: bool = False
    events: list[tuple[float, dict]] = field(default_factory=list)
    peak: tuple[int, int] = (0, 0)  # (RSS, PSS) bytes, over the whole run
    peak_at: dict[str, tuple[int, int]] = field(default_factory=dict)  # up to the first event of a kind
    stopped: bool = False  # killed on purpose at its stop_at event

    def at(self, kind: str, **match) -> float | None:
        return next((t for t, e in self.events
                     if e.get("event") == kind and all(e.get(k) == v for k, v in match.items())), None)

    @property
    def ok(self) -> bool:
        return (self.rc == 0 or self.stopped) and not self.timed_out


def kill_tree(proc: subprocess.Popen, monitor: TreeRSS | None) -> None:
    """SIGTERM, then SIGKILL, to the child's process group and to every descendant seen (by PID)."""
    others = [p for p in (list(monitor.seen.values()) if monitor else []) if p.pid != proc.pid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None and not any(p.is_running() for p in others):
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in others:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        psutil.wait_procs(others, timeout=5)


def measure(name: str, command: list[str], log: Path, timeout: float, env: dict | None = None,
            marks: tuple[str, ...] = (), stop_at: str | None = None) -> Run:
    """Run `command` in its own session, reading its stdout's JSON lines as they come; stderr goes to `log`.
    With `stop_at`, the process tree is killed when that event comes (what follows it is not measured)."""
    print(f"  {name}: {' '.join(command[1:3])} ... (log {log})", file=sys.stderr, flush=True)
    run = Run()
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                env={**os.environ, **(env or {})})
        monitor = TreeRSS(proc.pid)

        def expire() -> None:
            run.timed_out = True
            kill_tree(proc, monitor)

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                run.events.append((time.perf_counter() - start, event))
                kind = event.get("event")
                if kind in marks and kind not in run.peak_at:
                    run.peak_at[kind] = (monitor.peak, monitor.peak_pss)
                if kind == stop_at:
                    run.stopped = True
                    kill_tree(proc, monitor)
                    break
            run.rc = proc.wait()
            run.seconds = time.perf_counter() - start
        finally:
            timer.cancel()
            kill_tree(proc, monitor)  # the pool's workers, if the parent left any
            monitor.stop()
            proc.stdout.close()
    run.peak = (monitor.peak, monitor.peak_pss)
    if not run.ok:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        why = f"timed out after {timeout:.0f} s" if run.timed_out else f"exit {run.rc}"
        print(f"  {name}: {why}; the end of its log:\n    " + "\n    ".join(tail), file=sys.stderr, flush=True)
    return run


# -- one size ---------------------------------------------------------------------------------------

def trainer_config(name: str, data: Path, model: Path, cache: Path, work: Path, checks: bool = True,
                   test_split: bool = True) -> dict:
    test = data.with_name("test.jsonl")
    test_split = test_split and test.exists()
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TrainerConfig",
        "jobName": name,
        "baseModel": {"uri": str(model)},
        "dataset": {"train": str(data), "format": "chat", "cacheUri": str(cache) + "/",
                    **({"test": str(test)} if test_split else {}), **({} if checks else {"quality": QUALITY_OFF})},
        "hyperparameters": {"maxSteps": 1, "packing": True, "maxSeqLength": 512},
        # The test split is here for the leakage check: no baseline evaluation before the first step.
        "evaluation": {"baseline": False},
        "output": {"uri": str(work / "output") + "/"},
        "metrics": {"enabled": False},
        "workDir": str(work / "trainer"),
    }


def kubetune_run(name: str, data: Path, model: Path, cache: Path, work: Path, timeout: float,
                 checks: bool = True, test_split: bool = True) -> Run:
    """A `kubetune train` run; with the test split it is stopped at its first step (the test evaluation at the end
    would time the model, not the data path), without it it runs to the end."""
    work.mkdir(parents=True)
    config = work / "trainer.yaml"
    config.write_text(yaml.safe_dump(trainer_config(name, data, model, cache, work, checks, test_split),
                                     sort_keys=False))
    command = [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(config)]
    return measure(name, command, work / "stderr.log", timeout, marks=("plan",),
                   stop_at="plan" if test_split else None)


def bench_size(records: int, args, model: Path, root: Path) -> dict[str, Run]:
    """The three runs on `records` records, in `root` (removed afterwards unless --work-dir)."""
    shutil.rmtree(root, ignore_errors=True)  # a kept --work-dir's earlier run: every run starts fresh
    root.mkdir(parents=True)
    started = time.perf_counter()
    chats = CHATS[args.text]
    data = write_chat_records(root / "train.jsonl", chats(records, args.seed))
    if args.test_records:
        write_chat_records(root / "test.jsonl", planted_test_split(chats, args.test_records, args.seed, args.seed + 1))
    print(f"{records:,} records: {data.stat().st_size / MIB:,.0f} MiB of JSONL in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    runs: dict[str, Run] = {}
    hf_home = root / "hf-home"
    runs["hf"] = measure(
        "hf", [sys.executable, __file__, "--side", "hf", "--data", str(data), "--model", str(model),
               "--cache-dir", str(root / "hf-cache"), "--num-proc", str(args.num_proc)],
        root / "hf.log", args.timeout, env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}, marks=("mapped",))
    shutil.rmtree(root / "hf-cache", ignore_errors=True)  # its disk, before the next run
    cache = root / "kubetune-cache"
    runs["first"] = kubetune_run("bench-data-first", data, model, cache, root / "first", args.timeout)
    if runs["first"].ok:
        runs["cached"] = kubetune_run("bench-data-cached", data, model, cache, root / "cached", args.timeout)
    runs["unchecked"] = kubetune_run("bench-data-unchecked", data, model, root / "unchecked-cache",
                                     root / "unchecked", args.timeout, checks=False)
    runs["plain"] = kubetune_run("bench-data-plain", data, model, root / "plain-cache", root / "plain", args.timeout,
                                 test_split=False)
    return runs


# -- report -----------------------------------------------------------------------------------------

def hf_seconds(r: Run) -> float | None:
    return r.at("mapped")


def to_plan(r: Run) -> float | None:
    return r.at("plan")


def data_seconds(r: Run) -> float | None:
    """First `phase` event to the `training` phase: fetching, validating and tokenizing."""
    first = next((t for t, e in r.events if e.get("event") == "phase"), None)
    training = r.at("phase", phase="training")
    return training - first if first is not None and training is not None else None


def rss_to(r: Run, mark: str) -> int:
    return peak_to(r, mark)[0]


def peak_to(r: Run, mark: str) -> tuple[int, int]:
    return r.peak_at.get(mark, r.peak)


def reused(r: Run) -> bool | None:
    """What the trainer's events say about the cache: the first `reused` flag found, one level deep."""
    for _, e in r.events:
        for value in (e, *(v for v in e.values() if isinstance(v, dict))):
            if isinstance(value.get("reused"), bool):
                return value["reused"]
    return None


def secs(value: float | None, r: Run | None = None) -> str:
    if r is not None and r.timed_out:
        return "timeout"
    if r is not None and r.rc not in (0, None) and value is None:
        return f"failed ({r.rc})"
    return "n/a" if value is None else f"{value:,.1f} s"


def mib(value: int | None) -> str:
    return "n/a" if not value else f"{value / MIB:,.0f} MiB"


def rss_pss(peak: tuple[int, int]) -> str:
    return "n/a" if not peak[0] else f"{peak[0] / MIB:,.0f} / {peak[1] / MIB:,.0f} MiB"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(value: float | None, percent: bool = False) -> str:
    return "n/a" if value is None else (f"{value:.1%}" if percent else f"{value:.2f}x")


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**not met**")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"Python {platform.python_version()}, torch {v('torch')}, transformers {v('transformers')}, "
            f"datasets {v('datasets')}, pyarrow {v('pyarrow')}")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"`{platform.node()}` ({cores} cores, {cpu}, {platform.machine()}, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB)")


def measure_labels(args, work: Path) -> Run:
    """The label-error check on `--label-records` generated texts, in its own process."""
    return measure("labels", [sys.executable, __file__, "--side", "labels", "--label-records", str(args.label_records),
                              "--seed", str(args.seed)], work / "labels.log", args.timeout, marks=("suspected",))


def label_seconds(r: Run) -> float | None:
    generated, suspected = r.at("generated"), r.at("suspected")
    return suspected - generated if generated is not None and suspected is not None else None


def markdown(args, results: dict[int, dict[str, Run]], labels: Run | None, load: tuple[float, float]) -> str:
    sizes = sorted(results)
    options = " ".join(([] if args.records == DEFAULT_RECORDS else [f"--records {args.records}"])
                       + ([] if args.text == "varied" else [f"--text {args.text}"])
                       + ([] if args.label_records == 100_000 else [f"--label-records {args.label_records}"]))
    command = f"make bench-data BENCH_DATA_ARGS=\"{options}\"" if options else "make bench-data"
    lines = [
        "## Data path at scale (`make bench-data`)",
        "",
        "Goals (issue 14), on generated chat data: Kubetune's time to the first training step within 1.2x of a "
        "Hugging Face `datasets` script that only tokenizes; peak RSS of the process tree under 1.5 GB at "
        "1,000,000 records and at most 1.3x the RSS at 200,000 (streaming, not in memory); a second job on the "
        "same data (the cache reused) spends under 10% of the first one's data time.",
        "",
        f"`{command}`",
        "",
        "What `bench/bench_data.py` does is described at its top: per size, "
        + ("the support bot's system/user/assistant conversations with people's own words (bench/chat_data.py), "
           if args.text == "varied" else "the support bot's templated system/user/assistant conversations alone "
           "(bench/chat_data.py: the near-copy check's worst case), ")
        + f"a {args.test_records:,}-record test split of another seed with 1% planted near copies of train "
        "records, written as JSONL, a tiny Llama with a BPE tokenizer (ChatML "
        f"template) made locally; the baseline is `load_dataset(\"json\")` + `.map(apply_chat_template, "
        f"num_proc={args.num_proc})` on a fresh cache; Kubetune is `kubetune train` with maxSteps 1, packing, "
        "maxSeqLength 512, timed until its `plan` event (the first step starts right after), first with a fresh "
        "`dataset.cacheUri`, then as a new job on the same one. RSS / PSS: peaks of the sums over the process "
        "and all its children, up to the mark (RSS polled every 50 ms, PSS every 250 ms; the goals are on RSS, "
        "which counts the pages a forked pool shares once per process; PSS splits them).",
        "",
        f"Machine: {machine()}, load average {load[0]:.1f} at the start, {load[1]:.1f} at the end; "
        f"{versions()}; {datetime.date.today().isoformat()}. One run; read the ratios.",
        "",
        "| records | HF `datasets` | HF RSS / PSS | Kubetune (to first step) | Kubetune RSS / PSS | Kubetune / HF "
        "| cached | cached RSS / PSS | cached / first (data) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        hf, first = results[n]["hf"], results[n]["first"]
        cached = results[n].get("cached", Run(rc=None))  # not run when the first run failed
        lines.append(
            f"| {n:,} | {secs(hf_seconds(hf), hf)} | {rss_pss(peak_to(hf, 'mapped'))} "
            f"| {secs(to_plan(first), first)} | {rss_pss(peak_to(first, 'plan'))} "
            f"| {fmt_ratio(ratio(to_plan(first), hf_seconds(hf)))} "
            f"| {secs(to_plan(cached), cached)} | {rss_pss(peak_to(cached, 'plan'))} "
            f"| {fmt_ratio(ratio(data_seconds(cached), data_seconds(first)), percent=True)} |")
    lines += ["", "To the end (`plain`: the train split alone, as the baseline has it, default checks; Kubetune's "
              "whole 1-step run with saving and publishing against the baseline's map): "
              + ", ".join(f"{fmt_ratio(ratio(results[n]['plain'].seconds, hf_seconds(results[n]['hf'])))} at {n:,}"
                          for n in sizes if results[n]["plain"].ok) + "."]
    lines += ["", "Kubetune's runs in detail (data: from the first `phase` event to the `training` phase; "
              "total: to the end of the 1-step run, with saving and publishing):", "",
              "| records | run | data | to first step | total | RSS / PSS, whole run | cache reused |",
              "|---:|---|---:|---:|---:|---:|---|"]
    for n in sizes:
        for key in ("first", "cached", "unchecked", "plain"):
            r = results[n].get(key)
            if r is None:
                continue
            flag = reused(r)
            total = "stopped" if r.stopped else secs(r.seconds, r)
            lines.append(f"| {n:,} | {key} | {secs(data_seconds(r))} | {secs(to_plan(r), r)} | {total} "
                         f"| {rss_pss(r.peak)} "
                         f"| {'not reported' if flag is None else ('yes' if flag else 'no')} |")

    def all_of(checks: list[bool | None]) -> bool | None:
        return None if not checks or None in checks else all(checks)

    time_ratios = {n: ratio(to_plan(results[n]["first"]), hf_seconds(results[n]["hf"])) for n in sizes}
    largest, smallest = sizes[-1], sizes[0]
    rss_large = rss_to(results[largest]["first"], "plan") if results[largest]["first"].ok else None
    rss_small = rss_to(results[smallest]["first"], "plan") if results[smallest]["first"].ok else None
    pss_large = peak_to(results[largest]["first"], "plan")[1] if results[largest]["first"].ok else None
    cached_ratios = {n: ratio(data_seconds(results[n]["cached"]), data_seconds(results[n]["first"]))
                     if "cached" in results[n] else None for n in sizes}
    growth = ratio(rss_large, rss_small) if largest != smallest else None
    quality_ratios = {n: ratio(data_seconds(results[n]["first"]), data_seconds(results[n]["unchecked"]))
                      if "unchecked" in results[n] else None for n in sizes}
    lines += [
        "",
        "Against the goals:",
        "",
        "- time within 1.2x of the baseline: "
        + ", ".join(f"{fmt_ratio(time_ratios[n])} at {n:,}" for n in sizes)
        + f": {verdict(all_of([None if r is None else r <= GOALS['time_ratio'] for r in time_ratios.values()]))}.",
        f"- RSS under 1.5 GB at {largest:,} records: {mib(rss_large)}: "
        f"{verdict(None if rss_large is None else rss_large < GOALS['rss_bytes'])}"
        + ("" if largest >= 1_000_000 else " (the goal is for 1,000,000)") + ".",
        f"- the same as PSS (a page the pool's forked workers share with their parent counted once, not once per "
        f"process): {mib(pss_large)}: {verdict(None if pss_large is None else pss_large < GOALS['rss_bytes'])}.",
        f"- RSS({largest:,}) at most 1.3x RSS({smallest:,}): "
        + (f"{fmt_ratio(growth)}: {verdict(growth <= GOALS['rss_growth'])}." if growth is not None
           else "needs two sizes." if largest == smallest else "not measured."),
        "- cached run under 10% of the first run's data time: "
        + ", ".join(f"{fmt_ratio(cached_ratios[n], percent=True)} at {n:,}" for n in sizes)
        + f": {verdict(all_of([None if r is None else r < GOALS['cached_ratio'] for r in cached_ratios.values()]))}.",
        "- the data-quality checks add at most 25% to the data time (first run / unchecked run, both with the "
        f"{args.test_records:,}-record test split): "
        + ", ".join(f"{fmt_ratio(quality_ratios[n])} at {n:,}" for n in sizes)
        + f": {verdict(all_of([None if r is None else r <= GOALS['quality_cost'] for r in quality_ratios.values()]))}.",
    ]
    if labels is not None:
        done = next((e for _, e in labels.events if e.get("event") == "suspected"), None)
        seconds = label_seconds(labels)
        lines.append(
            f"- suspected label errors on {args.label_records:,} labelled texts (20 classes, 5% of the labels "
            f"flipped) under 2 minutes: {secs(seconds, labels)}"
            + (f" (found {done['count']:,}: recall {done['recall']:.0%}, precision {done['precision']:.0%})"
               if done and done.get("precision") is not None else "")
            + f": {verdict(None if seconds is None else seconds < GOALS['label_seconds'])}.")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------

DEFAULT_RECORDS = "200000,1000000"


def sizes_of(text: str) -> list[int]:
    try:
        sizes = sorted({int(s.replace("_", "")) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected comma-separated record counts") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected positive record counts")
    return sizes


def terminate(signum, _frame) -> None:
    """SIGINT (also where a shell started this with it ignored), SIGTERM, SIGHUP: unwind, so the children are
    killed and the temporary folders removed."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default=DEFAULT_RECORDS,
                        help=f"comma-separated dataset sizes (default {DEFAULT_RECORDS})")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    parser.add_argument("--num-proc", type=int, default=2, help="the baseline's map(num_proc=...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-records", type=int, default=10_000,
                        help="records of the test split Kubetune's runs check train against (0: none)")
    parser.add_argument("--text", choices=sorted(CHATS), default="varied",
                        help="varied: chats with people's own words (default); templated: the support bot's "
                             "templates alone, the near-copy check's worst case (bench/chat_data.py)")
    parser.add_argument("--label-records", type=int, default=100_000,
                        help="labelled texts the label-error check is timed on (0: not timed)")
    parser.add_argument("--work-dir", help="keep the files here (default: a temporary folder, removed)")
    parser.add_argument("--side", choices=["hf", "labels"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return {"hf": hf_side, "labels": labels_side}[args.side](args)
    try:
        sizes = sizes_of(args.records)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    load_start = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="kubetune-bench-data-") as tmp:
            work = Path(args.work_dir or tmp).resolve()
            print(f"preparing the tiny base in {work}", file=sys.stderr, flush=True)
            model = make_base(work / "model")
            results = {}
            labels = measure_labels(args, work) if args.label_records else None
            for n in sizes:
                root = work / f"records-{n}"
                try:
                    results[n] = bench_size(n, args, model, root)
                finally:
                    if not args.work_dir:
                        shutil.rmtree(root, ignore_errors=True)
            print(markdown(args, results, labels, (load_start, os.getloadavg()[0])))
    except KeyboardInterrupt as e:
        print(f"interrupted{f' ({e})' if str(e) else ''}: children killed, temporary files removed",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

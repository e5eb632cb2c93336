"""The fixed cost of a trainer process, per entry point a pod runs (issue 30, section 5; issue 25): what a trial pays
beside its training steps, from its process's start to its first step and from its last step to its end.

Entry points, each a fresh process as in a pod: `validate` (`kubetune validate`, the validation pod, its data cache
in storage already), `validate-cold` (the same with no cache anywhere: it loads the tokenizer and tokenizes), `launch`
(`kubetune launch ... -m kubetune_trainer train`, the training pod's entrypoint, one CPU process), `train`
(`python -m kubetune_trainer train`, what each process of a multi-process launch runs) and `run` (`kubetune run`,
on this machine). One tiny Llama and a support-chat data set are made once and put in an embedded S3 server on
loopback (this process); a first `kubetune validate` writes the data cache (dataset.cacheUri) that every measured
run then finds, as a sweep's trials after the first do. Each measured run is a new job (its own output prefix).

Per run: wall seconds, CPU-seconds of the process and its children (wait4: user + system), and for the training
entry points the wall seconds before the first step and after the last one (from the `train` events,
logged every step, as they reach stdout; the steps' own time is the span between them). OMP_NUM_THREADS=1, as in
the tests. The sources compared (`--src`, repeatable: a checkout's root, say one made with `git worktree add` or
`git archive`) run in turn, entry point by entry point, `--repeat` times: back to back, so that the machine's
load weighs on all alike. The result is a markdown table of medians on stdout; every run's numbers on stderr.

    python bench/bench_startup.py                                       # this checkout
    python bench/bench_startup.py --src /tmp/kt-before --src . --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ("validate", "validate-cold", "launch", "train", "run")
PACKAGES = ("api", "search", "operator", "trainer-image", "testing", "")  # a checkout's import roots


def pythonpath(src: Path) -> str:
    return os.pathsep.join(str(src / p) if p else str(src) for p in PACKAGES)


def prepare(work: Path, endpoint: str) -> dict[str, str]:
    """The tiny base under s3://models/tiny/ and the chats under s3://data/support/; the split URIs."""
    from kubetune_api import StorageEndpoint
    from kubetune_dev.demo_data import chat_texts, generic_texts, support_records, write_support_dataset
    from kubetune_dev.tiny import make_tiny_base
    from kubetune_trainer.storage import Storage

    storage = Storage(StorageEndpoint(endpoint=endpoint))
    base = make_tiny_base(work / "base", generic_texts(200) + chat_texts(support_records(100, seed=1)),
                          vocab_size=512, hidden_size=64, layers=2, heads=2, pretrain_steps=0, log=None)
    data = write_support_dataset(work / "data", train=192, validation=32, test=32)
    storage.upload_dir(base, "s3://models/tiny/")
    for split, path in data.items():
        storage.upload_file(path, f"s3://data/support/{split}.jsonl")
    return {s: f"s3://data/support/{s}.jsonl" for s in data}


def config_file(work: Path, name: str, endpoint: str, data: dict[str, str], steps: int, cold: bool = False) -> Path:
    """A TrainerConfig: LoRA, `steps` steps logged one by one, validation at the end, test and baseline on. `cold`:
    a data cache of its own (prefix and work folder), so that nothing is found cached."""
    doc = {"jobName": name, "baseModel": {"uri": "s3://models/tiny/"},
           "dataset": {**data, "cacheUri": f"s3://data/cache-{name}/" if cold else "s3://data/cache/"},
           "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
           "hyperparameters": {"maxSteps": steps, "batchSize": 4, "learningRate": 5e-3, "maxSeqLength": 128,
                               "loggingSteps": 1, "warmupRatio": 0.0},
           "evaluation": {"everySteps": steps}, "checkpoint": {"everySteps": 10_000},
           "output": {"uri": f"s3://adapters/{name}/"}, "storage": {"endpoint": endpoint},
           "metrics": {"port": 0}, "workDir": str(work / ("jobs-" + name if cold else "jobs"))}
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def command(entry: str, config: Path, work: Path) -> list[str]:
    trainer = [sys.executable, "-m", "kubetune_trainer"]
    return {"validate": [*trainer, "validate", "--config", str(config)],
            "validate-cold": [*trainer, "validate", "--config", str(config)],
            "launch": [*trainer, "launch", "--num_machines", "1", "--num_processes", "1", "--cpu",
                       "-m", "kubetune_trainer", "train", "--config", str(config)],
            "train": [*trainer, "train", "--config", str(config)],
            "run": [*trainer, "run", str(config), "--work-dir", str(work / "runs" / config.stem),
                    "--metrics-port", "-1"]}[entry]


def measure(argv: list[str], env: dict) -> dict:
    """One process: wall and CPU-s (wait4), and when its `train` events reached stdout. (Not its peak RSS: a forked
    child's counts this process's, large, from before its exec.)"""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    steps = []
    for line in process.stdout:
        if line.startswith('{"event": "train"'):
            steps.append(time.monotonic() - started)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(argv)} exited {process.returncode}:\n{stderr[-3000:]}")
    out = {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime}
    if len(steps) > 1:
        step = (steps[-1] - steps[0]) / (len(steps) - 1)  # the first event comes after the first step
        out.update(before_first_step=steps[0] - step, after_last_step=wall - steps[-1],
                   steps=steps[-1] - steps[0] + step)
    return out


def markdown(rows: list[dict], sources: list[str], args) -> str:
    keys = ("wall", "cpu", "before_first_step", "after_last_step")
    lines = [f"### Fixed cost per trainer process: medians of {args.repeat} runs, {args.steps} LoRA steps", "",
             "| entry point | source | wall s | CPU-s | before first step s | after last step s |"
             + (" CPU-s vs first source |" if len(sources) > 1 else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if len(sources) > 1 else "")]
    for entry in args.entries:
        first = None
        for src in sources:
            runs = [r for r in rows if r["entry"] == entry and r["src"] == src]
            med = {k: statistics.median(r[k] for r in runs) if all(k in r for r in runs) else None for k in keys}
            first = first or med["cpu"]
            cells = [f"{med[k]:.2f}" if med[k] is not None else "-" for k in keys]
            ratio = [f"{med['cpu'] / first:.2f}"] if len(sources) > 1 else []
            lines.append(f"| {entry} | {src} | " + " | ".join(cells + ratio) + " |")
    lines += ["", f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f} at the end. Sources run back to back, entry by entry."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", type=Path, help="a checkout's root (repeatable; default: this one)")
    parser.add_argument("--entries", type=lambda v: v.split(","), default=["validate", "launch", "run"],
                        help=f"comma-separated, of {', '.join(ENTRIES)}")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="hyperparameters.maxSteps")
    args = parser.parse_args()
    if bad := [e for e in args.entries if e not in ENTRIES]:
        parser.error(f"--entries: {', '.join(bad)}: use {', '.join(ENTRIES)}")
    sources = [s.resolve() for s in args.src or [ROOT]]

    from kubetune_dev.s3server import FAKE_CREDENTIALS, S3Server

    env = {**os.environ, **FAKE_CREDENTIALS, "KUBETUNE_TERMINATION_LOG": os.devnull, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "KUBETUNE_DATA_WORKERS": "1"}
    os.environ.update(FAKE_CREDENTIALS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-startup-") as tmp, S3Server() as s3:
        work = Path(tmp)
        for bucket in ("models", "data", "adapters"):
            s3.create_bucket(bucket)
        print(f"preparing the tiny model and data in {work}", file=sys.stderr, flush=True)
        data = prepare(work, s3.endpoint)
        warm = config_file(work, "warm-up", s3.endpoint, data, args.steps)  # writes the data cache
        measure(command("validate", warm, work), {**env, "PYTHONPATH": pythonpath(sources[0])})
        n = 0
        for r in range(args.repeat):
            for entry in args.entries:
                for src in sources:
                    n += 1
                    config = config_file(work, f"job-{n}", s3.endpoint, data, args.steps, cold=entry == "validate-cold")
                    m = measure(command(entry, config, work), {**env, "PYTHONPATH": pythonpath(src)})
                    rows.append({"entry": entry, "src": str(src), "repeat": r, **m})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(markdown(rows, [str(s) for s in sources], args))


if __name__ == "__main__":
    main()

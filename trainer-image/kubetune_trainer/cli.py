"""`kubetune`: the command line of the trainer (and, later, of the operator).

    kubetune validate --config trainer.yaml   check every record on CPU; exit 65/78 if bad (permanent)
    kubetune train --config trainer.yaml      what each process of `accelerate launch` runs
    kubetune launch ACCELERATE_ARGS...        the pod's entrypoint: `accelerate launch`, exit codes kept
    kubetune run finetunejob.yaml             a FineTuneJob manifest, trained on this machine
    kubetune sweep finetunesweep.yaml         a FineTuneSweep's trials on this machine, with a live leaderboard
    kubetune checkpoints JOB|OUTPUT_URI       a run's checkpoints with their validation metrics, as a table
    kubetune report JOB|OUTPUT_URI...         one HTML page: a run's report, or several runs side by side
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import os
import shutil
import subprocess
import sys
from numbers import Real
from pathlib import Path
from typing import Annotated

import typer
from kubetune_api import CHECKPOINTS_IN_STATUS
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from . import redact
from .configfile import load_config
from .errors import ConfigError
from .failure import failure

# No locals in tracebacks: a frame's variables can hold credentials (the callback below prints plain, redacted ones).
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Kubetune: fine-tuning on Kubernetes.",
                  pretty_exceptions_show_locals=False)
err = Console(stderr=True)
out = Console()

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="TrainerConfig or FineTuneJob YAML/JSON")]


TERMINATION_LIMIT = 4000  # bytes: Kubernetes keeps at most 4096 of a container's termination message


def termination_log(message: str) -> None:
    """Kubernetes shows /dev/termination-log as the container's termination message (the operator copies it into
    the FineTuneJob's status): redacted, as everything the trainer prints."""
    path = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log"))
    try:
        if path.parent.is_dir():
            path.write_text(redact.redact(message).encode()[:TERMINATION_LIMIT].decode(errors="ignore"))
    except OSError:
        pass


def fail(e: BaseException) -> None:
    """The one way a command fails: a redacted one-line message on stderr and as the termination message (an
    unexpected exception's text can hold a presigned URL or a key as much as ours), and the exception's exit code."""
    message, code = failure(e)
    report_failure(message)
    raise typer.Exit(code)


def report_failure(message: str) -> None:
    """A failure's one line, redacted, on stderr and as the termination message."""
    message = redact.redact(message)
    err.print(f"[bold red]error[/] {escape(message)}", highlight=False, soft_wrap=True)
    termination_log(message)


@app.callback()
def _redacting() -> None:
    """Before any command: uncaught exceptions, in any thread, print redacted tracebacks. At exit, the objects
    still alive are frozen (gc.freeze): the interpreter's last garbage collections would otherwise walk every one
    that torch, transformers and peft made (1 to 2 seconds of a trainer process's end), to free memory that the
    process's end frees anyway."""
    redact.install()
    atexit.unregister(gc.freeze)  # once, however many commands this process runs (tests run several)
    atexit.register(gc.freeze)


@app.command()
def validate(config: ConfigOption,
             as_json: Annotated[bool, typer.Option("--json", help="Print the whole data report as one JSON object "
                                                   "on stdout, the quality section's lines included")] = False) -> None:
    """Check the datasets against the config, on CPU, without downloading model weights; within the pod's memory
    limit (memory.py: a clear error, exit 78, rather than an out-of-memory kill)."""
    from .memory import stop_now, watch
    from .quality.report import compact
    from .validation import validate_only, without_torch

    watch(stop_now(lambda message: report_failure(f"{ConfigError.reason}: {message}")))
    try:
        cfg = load_config(config)
        without_torch(cfg)
        reports, data = validate_only(cfg)
    except Exception as e:  # noqa: BLE001 - every failure becomes a clear message and exit code
        fail(e)
    # The operator turns this into status.dataset (kubetune_operator.observe.validation_report): counts, no lines.
    brief = {**data, "quality": compact(data["quality"])} if "quality" in data else data
    termination_log(json.dumps({"valid": True, **brief}, separators=(",", ":")))
    if as_json:
        print(json.dumps(data, indent=1, sort_keys=False))
        return
    table = Table("split", "file", "format", "samples", "tokens", "trained tokens", "truncated")
    for split, r in reports.items():
        table.add_row(split, r.file, r.format.value, str(r.samples), str(r.tokens), str(r.trained_tokens),
                      str(r.truncated))
    out.print(table)
    if reports["train"].classes:  # classification: the records of each class, per split
        classes = Table("class", *reports)
        for label in reports["train"].classes:
            classes.add_row(label, *(str((r.classes or {}).get(label, 0)) for r in reports.values()))
        out.print(classes)
    for r in reports.values():
        for w in r.warnings:
            err.print(f"[yellow]warning[/] {escape(f'{r.file}: {w}')}", highlight=False)
    if "quality" in data:
        out.print(quality_table(compact(data["quality"]), data["quality"]["policy"]))
    out.print(escape(data["summary"]), highlight=False, soft_wrap=True)
    if "cache" in data:
        how = "reused" if data["cache"]["reused"] else "written"
        out.print(escape(f"tokenized cache {how}: {data['cache']['uri']}"), highlight=False, soft_wrap=True)


def quality_table(quality: dict, policy: dict) -> Table:
    """The data-quality findings (the compact section, quality/report.py) per check and split, and what the
    dataset.quality policy did about each."""
    from .quality.report import quality_rows

    table = Table("quality check", "split", "found", "action")
    for row in quality_rows(quality, policy):
        table.add_row(*(escape(cell) for cell in row))
    return table


@app.command()
def train(config: ConfigOption) -> None:
    """Run the whole pipeline (every process of `accelerate launch`). Logs one JSON line per event."""
    from kubetune_api import join_uri

    from .modeling import without_bitsandbytes
    from .pipeline import run
    from .storage import manifest_sha256

    try:
        cfg = load_config(config)
        without_bitsandbytes(cfg.method.type)
        manifest = run(cfg)
    except Exception as e:  # noqa: BLE001
        fail(e)
    if manifest:  # rank 0: the operator copies this termination message into status.result
        termination_log(success_message(manifest, join_uri(cfg.output.uri, "manifest.json"),
                                       manifest_sha256(manifest)))


def _significant(value: float) -> float | int:
    return value if isinstance(value, int) else float(f"{value:.6g}")


def _scalars(result: dict | None) -> dict[str, float | int]:
    """A split's top-level numbers, 6 significant digits; nested details and non-finite values left out."""
    return {k: _significant(v) for k, v in (result or {}).items() if _is_number(v)}


def success_message(manifest: dict, manifest_uri: str, manifest_sha256: str) -> str:
    """Rank 0's termination message, which the operator turns into status.result (status.success_report):
    where the manifest is, how far the run went, the task, its headline metric, the published step and the test
    split's scalars on the fine-tuned and on the base model. Kubernetes keeps 4096 bytes of it: when the metrics
    do not fit, only the headline ones are kept, and failing that none. The validation split's scalars (of the
    published step) are what a FineTuneSweep judges its trials on."""
    metrics = manifest.get("metrics") or {}
    headline = manifest.get("headline") or "loss"
    doc = {"manifestUri": manifest_uri, "manifestSha256": manifest_sha256, "steps": manifest.get("steps"),
           "totalSteps": manifest.get("totalSteps"), "tokensTrained": manifest.get("tokensTrained"),
           "task": manifest.get("task"), "headline": headline,
           "selectedStep": (manifest.get("selected") or {}).get("step")}
    doc = {k: v for k, v in doc.items() if v is not None}
    found = {"test": _scalars(metrics.get("test")), "baseline": _scalars((metrics.get("baseline") or {}).get("test")),
             "validation": _scalars(metrics.get("validation"))}
    found = {model: values for model, values in found.items() if values}
    headlines = {model: {k: v for k, v in values.items() if k == headline} for model, values in found.items()}
    headlines = {m: v for m, v in headlines.items() if v}
    newest = (manifest.get("checkpoints") or [])[-CHECKPOINTS_IN_STATUS:]
    text = ""
    for candidate, keep in ((found, None), (headlines, None), (headlines, {headline}), (headlines, set()), ({}, set())):
        checkpoints = [_status_checkpoint(c, keep) for c in newest]
        extra = {**({"metrics": candidate} if candidate else {}), **({"checkpoints": checkpoints} if newest else {})}
        text = json.dumps({**doc, **extra}, allow_nan=False)
        if len(text.encode()) <= TERMINATION_LIMIT:
            break
    return text


def _status_checkpoint(entry: dict, metrics: set[str] | None) -> dict:
    """A manifest checkpoint as status.checkpoints has it (kubetune_api.CheckpointStatus): its validation's scalars,
    only those named in `metrics` when given."""
    validation = {k: v for k, v in _scalars(entry.get("validation")).items() if metrics is None or k in metrics}
    row = {"step": entry.get("step"), "uri": entry.get("uri"), "time": entry.get("time"),
           "validation": validation or None, "published": entry.get("published")}
    return {k: v for k, v in row.items() if v is not None}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "help_option_names": []})
def launch(ctx: typer.Context) -> None:
    """`accelerate launch ARGS` that exits with the trainer's own code (65/78 permanent, 75 retryable)."""
    from .launch import launch as accelerate_launch

    try:
        code = accelerate_launch(ctx.args)
    except Exception as e:  # noqa: BLE001
        fail(e)
    raise typer.Exit(code)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _human(value) -> str:
    """A scalar for people: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _flat(event: dict) -> list[tuple[str, object]]:
    """An event's scalars as (key, value) pairs, dicts of scalars one level down as "key.sub"; lists and deeper
    values (per-class scores, a confusion matrix, generated samples) are left out: they are for the manifest and
    `--verbose`, not for one line."""
    pairs = []
    for key, value in event.items():
        if key == "event":
            continue
        if isinstance(value, dict):
            pairs += [(f"{key}.{k}", v) for k, v in value.items() if isinstance(v, str | Real | None)]
        elif isinstance(value, str | Real):
            pairs.append((key, value))
    return pairs


def event_line(event: dict) -> str:
    """One event as a line of plain text: `test step 40: loss 1.234, accuracy 0.912, samples 200`,
    `baseline test: loss 2.345, ...`."""
    kind = event["event"]
    if kind == "selected":  # `selected step 120 (best, validation accuracy 0.912)`
        notes = [str(event["select"])] if event.get("select") else []
        if _is_number(event.get("value")):
            notes.append(f"validation {event.get('metric')} {_human(event['value'])}")
        return f"selected step {event.get('step')}" + (f" ({', '.join(notes)})" if notes else "")
    pairs = _flat(event)
    step = next((v for k, v in pairs if k == "step"), None)
    split = event.get("split") if kind == "baseline" else None
    head = " ".join(str(p) for p in (kind, split, f"step {step}" if step is not None else None) if p)
    details = ", ".join(f"{k} {_human(v)}" for k, v in pairs if k not in ("step", "split"))
    return f"{head}: {details}" if details else head


def per_class_table(per_class, limit: int = 12) -> Table | None:
    """A classification split's per-class scores ({class: {precision, recall, f1, support}}, or a list of such
    rows with a "label") as a small table; None when there are none."""
    rows = per_class.items() if isinstance(per_class, dict) else (
        (r.get("label", r.get("class", i)), r) for i, r in enumerate(per_class or []) if isinstance(r, dict))
    rows = [(str(name), scores) for name, scores in rows if isinstance(scores, dict)]
    if not rows:
        return None
    columns = list(dict.fromkeys(k for _, scores in rows for k, v in scores.items() if _is_number(v)))
    table = Table("class", *columns, box=None, padding=(0, 1), show_edge=False)
    for name, scores in rows[:limit]:
        table.add_row(escape(name), *(_human(scores[c]) if _is_number(scores.get(c)) else "" for c in columns))
    if len(rows) > limit:
        table.add_row(f"[dim]{len(rows) - limit} more in manifest.json", *([""] * len(columns)))
    return table


def outcome(manifest: dict) -> str:
    """`N steps, test accuracy 0.912 vs base 0.334`: the task's headline test metric, with the baseline's."""
    metrics = manifest.get("metrics") or {}
    headline = manifest.get("headline") or "loss"
    test = (metrics.get("test") or {}).get(headline)
    base = ((metrics.get("baseline") or {}).get("test") or {}).get(headline)
    text = f"{manifest.get('steps')} steps"
    if _is_number(test):
        text += f", test {headline} {_human(float(test))}"
        if _is_number(base):
            text += f" vs base {_human(float(base))}"
    return text


class ProgressReporter:
    """Shows the run as a rich progress bar and one readable line per event; the JSON events with --verbose."""

    SHOWN = ("validation", "test", "baseline", "selected", "generation", "checkpoint", "resumed", "stopped",
             "early_stopping", "published", "metrics", "output_will_move_aside", "output_moved_aside")

    def __init__(self, progress: Progress, verbose: bool):
        self.progress, self.verbose = progress, verbose
        self.task = progress.add_task("starting", total=None, loss="")
        self.already_published = False

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        console = self.progress.console
        if self.verbose:
            console.print_json(data=event)
        if kind == "phase":
            self.progress.update(self.task, description=event["phase"])
        elif kind == "plan":
            self.progress.update(self.task, total=event["total_steps"], completed=event["start_step"])
        elif kind == "train":
            rewards = f", rewards accuracy {event['rewards_accuracy']:.2f}" if "rewards_accuracy" in event else ""
            self.progress.update(self.task, completed=event["step"], loss=f"loss {event['loss']:.4f}{rewards}")
        elif kind == "already_published":
            self.already_published = True
        elif kind == "data":  # what the data costs, one line; the data-quality findings as a table
            console.print(f"[cyan]data[/] {escape(event['summary'])}", highlight=False, soft_wrap=True)
            if event.get("quality"):
                console.print(quality_table(event["quality"], event["quality"].get("policy", {})))
        elif kind == "data_cache":
            console.print(f"[cyan]data cache[/] {event['cache']}: {escape(event['uri'])}", highlight=False,
                          soft_wrap=True)
        elif kind == "data_cache_rebuilt":
            console.print(f"[yellow]data cache[/] {escape(event['uri'])} not used: {escape(event['problem'])}",
                          highlight=False, soft_wrap=True)
        elif kind == "tracking":  # the MLflow server's trouble, never the run's (tracking.py)
            console.print(f"[yellow]tracking[/] {escape(redact.redact(event['warning']))}", highlight=False,
                          soft_wrap=True)
        elif kind in self.SHOWN:
            line = event_line(event)
            console.print(f"[cyan]{kind}[/]{escape(line.removeprefix(kind))}", highlight=False, soft_wrap=True)
            table = per_class_table(event.get("per_class")) if kind == "test" else None
            if table is not None:
                console.print(table, highlight=False)


@app.command()
def promote(config: ConfigOption,
            to: Annotated[str, typer.Option("--to", help="Where the output goes: the sweep's <output.uri>best/")],
            record: Annotated[str, typer.Option("--record", help="JSON naming the sweep, the trial, its parameters "
                                                "and metric, written as sweep.json")]) -> None:
    """Publish the output at the config's output.uri again at --to (a FineTuneSweep's best trial, promote: best)."""
    from .promote import promote as copy_output

    try:
        doc = copy_output(load_config(config), to, json.loads(record))
    except Exception as e:  # noqa: BLE001
        fail(e)
    termination_log(json.dumps({"promoted": to, "trial": doc.get("trial"), "files": doc["files"]}))


@app.command("run")
def run_local(
    manifest: Annotated[Path, typer.Argument(help="FineTuneJob manifest (or a TrainerConfig)")],
    work_dir: Annotated[Path, typer.Option(help="Local cache for the model, data and checkpoints")] = Path(
        ".work"),
    metrics_port: Annotated[int, typer.Option(help="Prometheus port; 0 picks a free one, -1 turns it off")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every event as JSON")] = False,
) -> None:
    """Train a FineTuneJob's spec on this machine, with a progress bar.

    The run's identity is a hash of the manifest: the same manifest again is the same run (already published:
    nothing to do); an edited one is another run, refused on a prefix this one used (exit 73)."""
    from .modeling import without_bitsandbytes
    from .pipeline import run

    try:
        config = load_config(manifest)
        without_bitsandbytes(config.method.type)
        config = config.model_copy(update={
            "work_dir": str(work_dir.resolve()),
            "metrics": config.metrics.model_copy(update={"port": max(metrics_port, 0),
                                                         "enabled": metrics_port >= 0}),
        })
        columns = (TextColumn("{task.description:>11}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[loss]}"), TimeRemainingColumn())
        with Progress(*columns, console=err) as progress:
            reporter = ProgressReporter(progress, verbose)
            manifest_doc = run(config, report=reporter)
    except Exception as e:  # noqa: BLE001
        fail(e)
    verb = "already published" if reporter.already_published else "published"
    out.print(f"[green]{verb}[/] {escape(config.output.uri)} ({outcome(manifest_doc)})", soft_wrap=True,
              highlight=False)  # one line, for grep


@app.command("sweep")
def sweep_local(
    manifest: Annotated[Path, typer.Argument(help="FineTuneSweep manifest")],
    work_dir: Annotated[Path, typer.Option(help="Local cache for the model, data and checkpoints")] = Path(
        ".work"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every event as JSON")] = False,
) -> None:
    """Search a FineTuneSweep's hyperparameters on this machine: its trials one after another (the operator's
    search: sampler, pruner, trial outputs, shared data cache), with a live leaderboard; at the end, the best
    trial and where its output is. Exits non-zero when the sweep fails."""
    from kubetune_api import SweepPhase
    from rich.live import Live

    from .configfile import load_sweep
    from .modeling import without_bitsandbytes
    from .sweep import leaderboard, run_sweep, trial_line

    try:
        sweep = load_sweep(manifest)
        without_bitsandbytes(sweep.spec.template.method.type)  # every trial's: method.type is not tuned
        with Live(console=err, transient=True) as live:

            def show(run, row, event: dict) -> None:
                kind = event["event"]
                if verbose and kind != "trial_ended":
                    live.console.print_json(data={"trial": row.name, **event}, default=str)
                if kind == "trial_ended":
                    live.console.print(trial_line(row, run.metric), highlight=False, soft_wrap=True)
                elif kind == "data_cache":  # written by the first trial, reused by the others
                    live.console.print(f"[cyan]data cache[/] {event['cache']}: {escape(event['uri'])}",
                                       highlight=False, soft_wrap=True)
                live.update(leaderboard(run))

            run = run_sweep(sweep, work_dir, show)
    except Exception as e:  # noqa: BLE001
        fail(e)
    out.print(leaderboard(run))
    if run.phase != SweepPhase.Succeeded:
        report_failure(f"{run.reason.value}: {run.message}")
        raise typer.Exit(run.exit_code)
    best = run.best
    parameters = ", ".join(f"{path} {_human(value)}" for path, value in best.parameters.items())
    where = f"promoted to {run.promoted}" if run.promoted else f"its output: {best.config.output.uri}"
    if run.retrain:
        where = f"retrained on train + validation as {run.retrain.name}, {where}"
    out.print(f"[green]best[/] {escape(best.name)}: {escape(run.metric)} {best.metric:.4g} at step {best.step} "
              f"with {escape(parameters)}; {escape(where)}", highlight=False, soft_wrap=True)


@app.command("checkpoints")
def checkpoints_command(
    target: Annotated[str, typer.Argument(help="A FineTuneJob's name (read with kubectl), or an output URI or its "
                                          "manifest.json (s3://bucket/prefix/, a local folder)")],
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="The FineTuneJob's namespace")] = None,
    endpoint: Annotated[str | None, typer.Option(help="S3-compatible endpoint URL (AWS when unset)")] = None,
) -> None:
    """A run's checkpoints: step, time, validation metrics at that step, and where they are; the published step is
    marked. An output URI lists every one (its manifest.json); a job's name, the newest (status.checkpoints)."""
    try:
        rows, source = checkpoints_of(target, namespace, endpoint)
    except Exception as e:  # noqa: BLE001
        fail(e)
    out.print(checkpoints_table(rows, source))


def checkpoints_of(target: str, namespace: str | None, endpoint: str | None) -> tuple[list[dict], str]:
    """(the checkpoints, where they were read): from the manifest at an output URI, or the FineTuneJob's status."""
    if is_output(target):
        manifest, uri = read_manifest(target, endpoint)
        return manifest.get("checkpoints") or [], uri
    status = finetunejob_status(target, namespace)
    if not status.get("checkpoints"):
        result = (status.get("result") or {}).get("adapterUri")
        hint = f"; every one is in the manifest: kubetune checkpoints {result}" if result else \
            "; they are listed once it succeeded"
        raise ConfigError(f"FineTuneJob {target} has no checkpoints in its status (phase {status.get('phase')})"
                          + hint)
    return status["checkpoints"], f"FineTuneJob {target}"


def is_output(target: str) -> bool:
    """Whether `target` names an output (a URI, a folder, a manifest) rather than a FineTuneJob."""
    return "://" in target or target.startswith((".", "/")) or Path(target).exists()


def read_manifest(target: str, endpoint: str | None) -> tuple[dict, str]:
    """(the manifest, its URI) of an output URI or folder, or of a manifest's own URI."""
    from kubetune_api import StorageEndpoint, join_uri

    from .storage import Storage

    uri = target if target.endswith(".json") else join_uri(target, "manifest.json")
    manifest = Storage(StorageEndpoint(endpoint=endpoint)).get_json(uri)
    if manifest is None:
        raise ConfigError(f"{uri}: no manifest.json there; give the output.uri of a run that was published")
    return manifest, uri


def finetunejob_status(name: str, namespace: str | None) -> dict:
    """A FineTuneJob's status, read with kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ConfigError("kubectl is not on the PATH: install it to read a FineTuneJob, or give its output URI")
    command = [kubectl, "get", "finetunejob", name, "-o", "json", *(["-n", namespace] if namespace else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        problem = (done.stderr.strip().splitlines() or ["kubectl failed"])[-1]
        raise ConfigError(f"FineTuneJob {name}: {problem}")
    return json.loads(done.stdout).get("status") or {}


def manifest_of(target: str, namespace: str | None, endpoint: str | None) -> tuple[dict, str]:
    """(the manifest, its URI) of a published run: an output URI, a manifest, or a FineTuneJob that succeeded."""
    if is_output(target):
        return read_manifest(target, endpoint)
    status = finetunejob_status(target, namespace)
    uri = (status.get("result") or {}).get("manifestUri")
    if not uri:
        raise ConfigError(f"FineTuneJob {target} has published nothing yet (phase {status.get('phase')}): its "
                          "report is written once it succeeded")
    return read_manifest(uri, endpoint)


def checkpoints_table(rows: list[dict], source: str) -> Table:
    """The checkpoints for people: one row each, the validation metrics as columns, the published one marked."""
    metrics = list(dict.fromkeys(k for r in rows for k, v in (r.get("validation") or {}).items() if _is_number(v)))
    table = Table("step", Column("time (UTC)", no_wrap=True), *metrics, "", Column("uri", overflow="fold"),
                  title=escape(f"checkpoints of {source}"),
                  caption="the metrics: the validation split's at each step")
    for r in rows:
        validation = r.get("validation") or {}
        note = "published" if r.get("published") else "pruned" if r.get("kept") is False else ""
        when = str(r.get("time") or "").replace("T", " ")[:19]
        table.add_row(str(r.get("step")), when, *(_human(validation[m]) if _is_number(validation.get(m)) else ""
                                                  for m in metrics), note, escape(str(r.get("uri", ""))))
    if not rows:
        table.caption = "no checkpoints: the run took none (checkpoint.everySteps, everyMinutes)"
    return table


@app.command("report")
def report_command(
    targets: Annotated[list[str], typer.Argument(help="Runs: FineTuneJob names (read with kubectl), output URIs or "
                                                 "their manifest.json (s3://bucket/prefix/, a local folder)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write")] = Path("report.html"),
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="The FineTuneJobs' namespace")] = None,
    endpoint: Annotated[str | None, typer.Option(help="S3-compatible endpoint URL (AWS when unset)")] = None,
) -> None:
    """One self-contained HTML page: a run's results, plots, metric history, checkpoints, data and model card; for
    several runs, their parameters (the differing ones marked), metrics and curves side by side."""
    from kubetune_api import StorageEndpoint

    from .record.report import load_run, page
    from .storage import Storage

    try:
        storage = Storage(StorageEndpoint(endpoint=endpoint))
        runs = [load_run(storage, uri, manifest)
                for manifest, uri in (manifest_of(t, namespace, endpoint) for t in targets)]
        output.write_text(page(runs), encoding="utf-8")
    except Exception as e:  # noqa: BLE001
        fail(e)
    out.print(f"[green]wrote[/] {escape(str(output))} ({len(runs)} run{'s' if len(runs) > 1 else ''})",
              highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover
    sys.exit(app())

"""`kubetune`: the command line of the trainer (and, later, of the operator and the local cluster).

    kubetune validate --config trainer.yaml   check every record on CPU; exit 65/78 if bad (permanent)
    kubetune train --config trainer.yaml      what each process of `accelerate launch` runs
    kubetune launch ACCELERATE_ARGS...        the pod's entrypoint: `accelerate launch`, exit codes kept
    kubetune logs POD -n NAMESPACE            a pod's log on the local cluster's node agent (make cluster-up)
    kubetune run finetunejob.yaml             a FineTuneJob manifest, trained on this machine
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .config import load_config
from .errors import EXIT_UNEXPECTED, KubetuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Kubetune: fine-tuning on Kubernetes.")
err = Console(stderr=True)
out = Console()

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="TrainerConfig or FineTuneJob YAML/JSON")]


def termination_log(message: str) -> None:
    """Kubernetes shows /dev/termination-log as the container's termination message."""
    path = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log"))
    try:
        if path.parent.is_dir():
            path.write_text(message[:4000])
    except OSError:
        pass


def fail(e: BaseException) -> None:
    if isinstance(e, KubetuneError):
        message, code = f"{e.reason}: {e.message}", e.exit_code
    else:
        message, code = f"Unexpected: {type(e).__name__}: {e}", EXIT_UNEXPECTED
    err.print(f"[bold red]error[/] {escape(message)}", highlight=False, soft_wrap=True)
    termination_log(message)
    raise typer.Exit(code)


@app.command()
def validate(config: ConfigOption) -> None:
    """Check the datasets against the config, on CPU, without downloading model weights."""
    from .pipeline import validate_only

    try:
        reports = validate_only(load_config(config))
    except Exception as e:  # noqa: BLE001 - every failure becomes a clear message and exit code
        fail(e)
    table = Table("split", "file", "format", "samples", "tokens", "trained tokens", "truncated")
    for split, r in reports.items():
        table.add_row(split, r.file, r.format.value, str(r.samples), str(r.tokens), str(r.trained_tokens),
                      str(r.truncated))
    out.print(table)
    for r in reports.values():
        for w in r.warnings:
            err.print(f"[yellow]warning[/] {escape(f'{r.file}: {w}')}", highlight=False)
    termination_log("dataset valid: " + ", ".join(f"{s} {r.samples} samples" for s, r in reports.items()))


@app.command()
def train(config: ConfigOption) -> None:
    """Run the whole pipeline (every process of `accelerate launch`). Logs one JSON line per event."""
    from .config import join_uri
    from .pipeline import run
    from .storage import manifest_sha256

    try:
        cfg = load_config(config)
        manifest = run(cfg)
    except Exception as e:  # noqa: BLE001
        fail(e)
    if manifest:  # rank 0: the operator copies this termination message into status.result
        termination_log(json.dumps({"manifestUri": join_uri(cfg.output.uri, "manifest.json"),
                                    "manifestSha256": manifest_sha256(manifest),
                                    "steps": manifest.get("steps"), "totalSteps": manifest.get("totalSteps"),
                                    "tokensTrained": manifest.get("tokensTrained")}))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "help_option_names": []})
def launch(ctx: typer.Context) -> None:
    """`accelerate launch ARGS` that exits with the trainer's own code (65/78 permanent, 75 retryable)."""
    from .launch import launch as accelerate_launch

    raise typer.Exit(accelerate_launch(ctx.args))


@app.command()
def logs(
    pod: Annotated[str, typer.Argument(help="Pod name")],
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    container: Annotated[str | None, typer.Option("--container", "-c", help="Needed if the pod has several")] = None,
    previous: Annotated[bool, typer.Option("--previous", "-p", help="The run before the last restart")] = False,
    state_dir: Annotated[Path | None, typer.Option(help="The node agent's state dir (default: make cluster-up's)")]
    = None,
) -> None:
    """A container's log, as the local cluster's node agent keeps it (`kubectl logs` serves the same)."""
    from kubetune_cluster.__main__ import state_dir as cluster_state_dir
    from kubetune_cluster.agent import read_logs

    try:
        text = read_logs(state_dir or cluster_state_dir() / "agent", namespace, pod, container, previous)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[bold red]error[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    sys.stdout.write(text)


def _human(value) -> str:
    """An event's value for people: numbers rounded, nested values as JSON (no Python reprs)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, default=str)


class ProgressReporter:
    """Shows the run as a rich progress bar; keeps the JSON events for --verbose."""

    def __init__(self, progress: Progress, verbose: bool):
        self.progress, self.verbose = progress, verbose
        self.task = progress.add_task("starting", total=None, loss="")
        self.already_published = False

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if self.verbose:
            self.progress.console.print_json(data=event)
        if kind == "phase":
            self.progress.update(self.task, description=event["phase"])
        elif kind == "plan":
            self.progress.update(self.task, total=event["total_steps"], completed=event["start_step"])
        elif kind == "train":
            self.progress.update(self.task, completed=event["step"], loss=f"loss {event['loss']:.4f}")
        elif kind == "already_published":
            self.already_published = True
        elif kind in ("validation", "test", "checkpoint", "resumed", "early_stopping", "published", "metrics",
                      "output_moved_aside"):
            details = ", ".join(f"{k} {_human(v)}" for k, v in event.items() if k != "event")
            self.progress.console.print(f"[cyan]{kind}[/] {escape(details)}", highlight=False)


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
    from .pipeline import run

    try:
        config = load_config(manifest)
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
    test = manifest_doc.get("metrics", {}).get("test")
    verb = "already published" if reporter.already_published else "published"
    out.print(f"[green]{verb}[/] {config.output.uri} ({manifest_doc.get('steps')} steps"
              + (f", test loss {test['loss']:.4f}" if test else "") + ")", soft_wrap=True)  # one line, for grep


def main() -> None:  # pragma: no cover
    sys.exit(app())

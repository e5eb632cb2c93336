"""`python -m kubetune_dev`: development commands, beside the shipped `kubetune` command line.

    python -m kubetune_dev logs POD -n NAMESPACE   a pod's log on the local cluster's node agent (make cluster-up)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Kubetune's development commands.")
err = Console(stderr=True)


@app.callback()
def main() -> None:
    """Kubetune's development commands (the local cluster itself: python -m kubetune_dev.cluster)."""


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
    from .cluster.__main__ import state_dir as cluster_state_dir
    from .cluster.agent import read_logs

    try:
        text = read_logs(state_dir or cluster_state_dir() / "agent", namespace, pod, container, previous)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[bold red]error[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    sys.stdout.write(text)

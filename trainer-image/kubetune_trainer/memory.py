"""The validation Job's memory budget: a clear error before the kernel's out-of-memory kill.

A validation pod has a memory limit (spec.validation.memory). A record, a Parquet row group or an image that needs
more than the limit would get the pod OOMKilled: a failure with no reason but "OOMKilled", retried. `kubetune
validate` instead runs a watchdog thread that samples the memory in use every POLL_SECONDS and, past
BUDGET_FRACTION of the limit, stops the validation (its worker processes too) with a one-line message naming the
limit and what to change, as the termination message, exit 78 (ConfigInvalid: permanent, not retried).

The limit: KUBETUNE_MEMORY_LIMIT (bytes; the operator sets it from the container's limits.memory through the
downward API), else the cgroup's memory.max (v2). The use: the cgroup's working set (memory.current less its
inactive file cache, as the kubelet counts it) when the cgroup has that limit, else the proportional set size of
this process and its children (`kubetune run` on a laptop). Allocations faster than one sample apart can still be
killed first: the record (16 MiB), image (50 Mpx) and JSON nesting limits are what keep single records small.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from kubetune_api import EXIT_CONFIG_INVALID

BUDGET_FRACTION = 0.9
POLL_SECONDS = 0.2
CGROUP = Path("/sys/fs/cgroup")
MiB = 1 << 20


def limit_bytes(environ: dict[str, str] | None = None, cgroup: Path = CGROUP) -> int | None:
    """The memory this process (and its children) may use, or None when no limit is known."""
    value = (os.environ if environ is None else environ).get("KUBETUNE_MEMORY_LIMIT", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return _cgroup_limit(cgroup)


def _cgroup_limit(cgroup: Path) -> int | None:
    try:
        text = (cgroup / "memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def usage_bytes(cgroup: Path = CGROUP) -> int:
    """The memory in use now: the cgroup's working set if it has a limit, else this process tree's PSS."""
    if _cgroup_limit(cgroup) is not None:
        try:
            current = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            return current - int(stat.get("inactive_file", 0))
        except (OSError, ValueError):
            pass
    import psutil

    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.Error, AttributeError):
            pass
    return total


def over_budget_message(used: int, limit: int) -> str:
    return (f"validation used {used // MiB} MiB of its {limit // MiB} MiB memory limit (more than "
            f"{BUDGET_FRACTION:.0%}) and was stopped before an out-of-memory kill: raise spec.validation.memory, or "
            "make the data smaller per record (JSONL lines and CSV rows under 16 MiB, Parquet row groups of fewer "
            "rows, images under 50 megapixels)")


def watch(on_exceeded: Callable[[str], None], limit: int | None = None,
          usage: Callable[[], int] = usage_bytes) -> threading.Event | None:
    """Start the watchdog (a daemon thread); `on_exceeded(message)` is called once, from it, when the use passes
    BUDGET_FRACTION of `limit` (limit_bytes() by default). Returns an Event that stops it; None without a limit."""
    limit = limit or limit_bytes()
    if not limit:
        return None
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(POLL_SECONDS):
            used = usage()
            if used > BUDGET_FRACTION * limit:
                on_exceeded(over_budget_message(used, limit))
                return

    threading.Thread(target=loop, name="kubetune-memory-budget", daemon=True).start()
    return stop


def stop_now(report: Callable[[str], None]) -> Callable[[str], None]:
    """An on_exceeded for the validate command: report the message (stderr and termination message), kill this
    process's children (the tokenizer pool), and exit 78 at once: the main thread may be inside one allocation."""
    def exceeded(message: str) -> None:
        report(message)
        try:
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()
        except Exception:  # noqa: BLE001 - exiting matters more than the children
            pass
        os._exit(EXIT_CONFIG_INVALID)

    return exceeded

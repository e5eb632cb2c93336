"""What a failure says, and its exit code: the one line `kubetune` prints for any exception (cli.fail), and why a
trial of the local `kubetune sweep` failed. Not yet redacted: whoever shows it redacts it."""

from __future__ import annotations

from kubetune_api import EXIT_UNEXPECTED

from .errors import ConfigError, KubetuneError
from .storage import describe_error, is_storage_error


def failure(e: BaseException) -> tuple[str, int]:
    """(`Reason: message`, the exit code): ours say what to do; an unexpected exception says its type and text; a
    storage error no Storage call mapped says the operation and the reply's code, never the reply's text."""
    if isinstance(e, MemoryError):  # outside a record (records.beyond_limits names those)
        e = ConfigError("the process ran out of memory: raise spec.validation.memory (resources.memory for "
                        "training), or make the data smaller per record")
    if isinstance(e, KubetuneError):
        return f"{e.reason}: {e.message}", e.exit_code
    if is_storage_error(e):
        operation = getattr(e, "operation_name", "") or "a request"
        return f"Unexpected: object storage failed in {operation} ({describe_error(e)})", EXIT_UNEXPECTED
    return f"Unexpected: {type(e).__name__}: {e}", EXIT_UNEXPECTED

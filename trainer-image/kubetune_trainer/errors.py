"""Errors the trainer raises on purpose, and the exit codes they map to.

The exit codes are a contract with the operator (its Job's podFailurePolicy) and are documented in
trainer-image/README.md:

* 0  - success
* 65 - EX_DATAERR: the dataset is invalid. Permanent: retrying cannot help.
* 73 - EX_CANTCREAT: the output (or checkpoint) prefix holds another run's files. Permanent.
* 78 - EX_CONFIG: the trainer config, model or environment is invalid. Permanent.
* 75 - EX_TEMPFAIL: a transient failure (object storage, network), or stopped by SIGTERM after writing a
  checkpoint (preemption, eviction, suspend). Retryable.
* 76 - EX_PROTOCOL: a peer worker stopped or failed, so a collective could not complete. Not the failure
  itself: the operator's podFailurePolicy does not charge it to backoffLimit (the failing worker is charged).
* 1  - anything unexpected (a bug, an out-of-memory error). Retried within the backoff limit.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_DATA_INVALID = 65
EXIT_OUTPUT_IN_USE = 73
EXIT_RETRYABLE = 75
EXIT_PEER_LOST = 76
EXIT_CONFIG_INVALID = 78
PERMANENT_EXIT_CODES = (EXIT_DATA_INVALID, EXIT_OUTPUT_IN_USE, EXIT_CONFIG_INVALID)


class KubetuneError(Exception):
    """Base class: a failure we understand, with a message meant for the user."""

    exit_code = EXIT_UNEXPECTED
    reason = "Error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(KubetuneError):
    """The config, the model or the environment cannot work. Permanent."""

    exit_code = EXIT_CONFIG_INVALID
    reason = "ConfigInvalid"


class DatasetError(KubetuneError):
    """A dataset record is bad. Names the file, the line (1-based, 0 when not line-specific) and the problem."""

    exit_code = EXIT_DATA_INVALID
    reason = "DatasetInvalid"

    def __init__(self, file: str, line: int, problem: str, hint: str = ""):
        where = f"{file}:{line}" if line else file
        message = f"{where}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)
        self.file, self.line, self.problem, self.hint = file, line, problem, hint


class TransientError(KubetuneError):
    """Storage or network failed after retries. Retryable."""

    exit_code = EXIT_RETRYABLE
    reason = "StorageUnavailable"


class OutputInUseError(KubetuneError):
    """The output or checkpoint prefix holds another run's manifest or checkpoints. Permanent."""

    exit_code = EXIT_OUTPUT_IN_USE
    reason = "OutputInUse"


class Preempted(KubetuneError):
    """SIGTERM arrived (eviction, preemption, drain, suspend); a checkpoint was written. Retryable."""

    exit_code = EXIT_RETRYABLE
    reason = "Preempted"


class PeerLost(KubetuneError):
    """Another worker stopped or failed, so this one cannot go on alone. Retryable, not charged."""

    exit_code = EXIT_PEER_LOST
    reason = "PeerLost"

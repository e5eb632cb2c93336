"""Errors the trainer raises on purpose, and the exit codes they map to (the contract: kubetune_api.exitcodes)."""

from __future__ import annotations

from kubetune_api.exitcodes import (
    EXIT_CONFIG_INVALID,
    EXIT_DATA_INVALID,
    EXIT_OUTPUT_IN_USE,
    EXIT_PEER_LOST,
    EXIT_RETRYABLE,
    EXIT_UNEXPECTED,
)


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

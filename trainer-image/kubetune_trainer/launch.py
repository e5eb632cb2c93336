"""`kubetune launch ARGS`: `accelerate launch ARGS`, with the trainer's exit code passed through.

`accelerate launch` turns every failed child into exit code 1 (a CalledProcessError from its simple
launcher, a ChildFailedError from torchrun). Kubernetes' podFailurePolicy needs the trainer's own code
(65/78: permanent, 75: retryable), so this runs accelerate's launcher in-process and returns it.
"""

from __future__ import annotations

import subprocess

from .errors import EXIT_UNEXPECTED, PERMANENT_EXIT_CODES


def child_exit_code(codes: list[int]) -> int:
    """One code for the pod from its processes' codes: a permanent one wins, a signal becomes 128+N."""
    for code in codes:
        if code in PERMANENT_EXIT_CODES:
            return code
    code = next((c for c in codes if c != 0), EXIT_UNEXPECTED)
    return 128 - code if code < 0 else code


def launch(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:
        return child_exit_code([e.returncode])
    except ChildFailedError as e:
        return child_exit_code([failure.exitcode for failure in e.failures.values()])
    return 0

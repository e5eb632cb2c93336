"""`kubetune launch ARGS`: `accelerate launch ARGS`, with the trainer's exit code passed through.

`accelerate launch` turns every failed child into exit code 1 (a CalledProcessError from its simple
launcher, a ChildFailedError from torchrun). Kubernetes' podFailurePolicy needs the trainer's own code
(65/73/78: permanent, 75: retryable, 76: a peer stopped), so this runs accelerate's launcher in-process and
returns it.

SIGTERM: Kubernetes signals only the container's first process, this one. It passes the signal on to the
trainer processes and waits for them: they write a checkpoint and exit 75. torchrun does the same for its
workers, and waits for them up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT, set here from the pod's grace period
(KUBETUNE_TERMINATION_GRACE_SECONDS, less a margin for the launcher itself).
"""

from __future__ import annotations

import os
import signal
import subprocess

from kubetune_api import EXIT_PEER_LOST, EXIT_RETRYABLE, EXIT_UNEXPECTED, PERMANENT_EXIT_CODES

GRACE_MARGIN_SECONDS = 5


def child_exit_code(codes: list[int]) -> int:
    """One code for the pod from its processes' codes: a permanent one wins, then a failure of this pod's own,
    then 76 (a peer stopped: not this pod's failure); a signal becomes 128+N."""
    for code in codes:
        if code in PERMANENT_EXIT_CODES:
            return code
    failed = [c for c in codes if c != 0]
    own = [c for c in failed if c != EXIT_PEER_LOST]
    code = (own or failed or [EXIT_UNEXPECTED])[0]
    return 128 - code if code < 0 else code


def _children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _forward_sigterm(signum, frame) -> None:
    """Pass SIGTERM on to the trainer processes and keep waiting for them."""
    for child in _children(os.getpid()):
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass


def launch(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    grace = os.environ.get("KUBETUNE_TERMINATION_GRACE_SECONDS")
    if grace and grace.isdigit():
        os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(max(int(grace) - GRACE_MARGIN_SECONDS, 1)))
    args = launch_command_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _forward_sigterm)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:
        return child_exit_code([e.returncode])
    except ChildFailedError as e:
        return child_exit_code([failure.exitcode for failure in e.failures.values()])
    except SignalException:  # torchrun stopped its workers on SIGTERM: they checkpointed (or ran out of time)
        return EXIT_RETRYABLE
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0

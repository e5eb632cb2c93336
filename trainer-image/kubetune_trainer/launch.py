"""`kubetune launch ARGS`: `accelerate launch ARGS`, with the trainer's exit code passed through.

One process in this pod (a CPU worker, one GPU per worker: where accelerate would use its simple launcher): the
trainer runs in this process, with the environment accelerate's simple launcher would give it
(`prepare_simple_launcher_cmd_env`). Starting a second interpreter would import torch and accelerate again (about
4 CPU-seconds per pod), and the trainer, as the container's first process, gets SIGTERM and sets the pod's exit
code itself.

Several processes (`--multi_gpu`, FSDP: torchrun): `accelerate launch` turns every failed child into exit code 1
(a CalledProcessError, a ChildFailedError from torchrun). Kubernetes' podFailurePolicy needs the trainer's own code
(65/73/78: permanent, 75: retryable, 76: a peer stopped), so this runs accelerate's launcher in-process and
returns it.

SIGTERM: Kubernetes signals only the container's first process, this one. It passes the signal on to the
trainer processes and waits for them: they write a checkpoint and exit 75. torchrun does the same for its
workers, and waits for them up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT, set here from the pod's grace period
(KUBETUNE_TERMINATION_GRACE_SECONDS, less a margin for the launcher itself).
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys

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


def one_process(args, defaults) -> bool:
    """Whether `accelerate launch` would start exactly one process here: its simple launcher, without mpirun
    (the branches of accelerate's `launch_command`, after `_validate_launch_command` filled in the defaults)."""
    several = args.use_deepspeed or args.use_fsdp or args.use_megatron_lm or args.multi_gpu or args.tpu
    sagemaker = defaults is not None and defaults.compute_environment == "AMAZON_SAGEMAKER"
    return (args.cpu or not several) and not sagemaker and not args.mpirun_hostfile


def _exit_on_sigterm(signum, frame) -> None:
    """Until the trainer installs its own handler: the container's first process ignores a signal it has no
    handler for, so SIGTERM would wait for the grace period's SIGKILL. It ends the process at once, as the
    signal ends a child: nothing is in progress to save, and no interpreter shutdown (torch's, accelerate's
    exit handlers) can hold the pod meanwhile."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(128 + signum)


def _take_sigterm(handler):
    """Install handler for SIGTERM and let this thread (the main one) receive it; return the previous handler."""
    previous = signal.signal(signal.SIGTERM, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    return previous


def run_here(args) -> int:
    """The training script or module in this process, as accelerate's simple launcher would start it."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    os.environ.update(env)
    argv = cmd[1:]  # [-m] target args...: what follows the interpreter
    module = argv[0] == "-m"
    target, sys.argv = (argv[1], argv[1:]) if module else (argv[0], argv)
    previous = _take_sigterm(_exit_on_sigterm)
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def launch(argv: list[str]) -> int:
    # torch starts a thread at import. The kernel gives a process's SIGTERM to any thread that does not block it,
    # and only the main thread runs Python's handlers: one asleep in a system call would not see the signal until
    # the call returned. Threads inherit the mask of the thread that starts them, so the imports run with SIGTERM
    # blocked; _take_sigterm unblocks it in this thread once a handler is in place (a pending signal comes then).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    from accelerate.commands.launch import _validate_launch_command, launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if one_process(args, defaults):
        return run_here(args)
    grace = os.environ.get("KUBETUNE_TERMINATION_GRACE_SECONDS")
    if grace and grace.isdigit():
        os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(max(int(grace) - GRACE_MARGIN_SECONDS, 1)))
    previous = _take_sigterm(_forward_sigterm)
    try:
        launch_command(args)  # validates the filled-in args again: nothing left to fill, nothing warned twice
    except subprocess.CalledProcessError as e:
        return child_exit_code([e.returncode])
    except ChildFailedError as e:
        return child_exit_code([failure.exitcode for failure in e.failures.values()])
    except SignalException:  # torchrun stopped its workers on SIGTERM: they checkpointed (or ran out of time)
        return EXIT_RETRYABLE
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0

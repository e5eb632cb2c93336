"""python -m kubetune_dev.cluster up|down|status: a local cluster in the background.

`up` starts a daemon that runs the control plane and (when available) the process node agent, waits
until it is ready, and prints `export KUBECONFIG=...`; `up --dev` adds the CRD, an S3 server seeded with
the demo model and data, and the operator (see dev.py) and prints what to type next; `up --dev --kueue` adds the
real Kueue with queues for the node's GPUs. `down` stops it all,
`status` tells. State (pid, kubeconfig, logs) lives in ${KUBETUNE_STATE:-$HOME/.cache/kubetune/cluster}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import dev
from .controlplane import REPO_ROOT, ControlPlane, ControlPlaneError, _get, find_bin_dir
from .kueue import find_home as find_kueue_home

NODE_NAME = "kubetune-node"


def state_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_STATE") or Path.home() / ".cache" / "kubetune" / "cluster")


def read_state() -> dict | None:
    """The running daemon's state, or None when no daemon is alive."""
    try:
        state = json.loads((state_dir() / "state.json").read_text())
        os.kill(state["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def ready_message(state: dict) -> str:
    if state.get("dev"):
        return dev.instructions(state)
    return (f"# kubernetes {state['version']} at {state['api_url']} (pid {state['pid']}); logs in {state_dir()}\n"
            f"export KUBECONFIG={state['kubeconfig']}")


def up(args) -> int:
    if state := read_state():
        if args.dev and not state.get("dev"):
            print(f"error: a cluster without the dev extras is running (pid {state['pid']}); stop it first "
                  "(make cluster-down)", file=sys.stderr)
            return 1
        print(f"# already running (pid {state['pid']})\n{ready_message(state)}")
        return 0
    find_bin_dir()  # fail early, with the `make control-plane` hint
    if args.kueue:
        find_kueue_home()  # and the `make kueue` one
    sd = state_dir()
    shutil.rmtree(sd, ignore_errors=True)
    sd.mkdir(parents=True)
    cmd = [sys.executable, "-m", "kubetune_dev.cluster", "serve", "--gpus", str(args.gpus)]
    if args.no_agent:
        cmd.append("--no-agent")
    if args.dev:
        cmd += ["--dev", "--pretrain-steps", str(args.pretrain_steps), "--train-records", str(args.train_records),
                *(["--kueue"] if args.kueue else [])]
        print("# starting the control plane, node agent, S3 server and operator, and building the demo model "
              "(a minute or two)", flush=True)
    with open(sd / "daemon.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + (args.timeout or (900 if args.dev else 300))
    while not (state := read_state()):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
            print(f"cluster did not start; {sd / 'daemon.log'}:\n{tail(sd / 'daemon.log')}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(ready_message(state))
    return 0


def down(args) -> int:
    state = read_state()
    if not state:
        print("not running")
        return 0
    pid = state["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):  # the components die with it (parent-death signal)
        os.kill(pid, signal.SIGKILL)
    print(f"stopped (pid {pid})")
    return 0


def status(args) -> int:
    state = read_state()
    if not state:
        print("not running")
        return 1
    code, body = _get(f"{state['api_url']}/readyz", state["token"])
    print(f"running (pid {state['pid']}): kubernetes {state['version']} at {state['api_url']}, "
          f"readyz {code} {body.strip()[:40]}; node agent: {state.get('node') or 'none'}\n"
          f"export KUBECONFIG={state['kubeconfig']}")
    return 0 if code == 200 else 1


def serve(args) -> int:
    """The daemon: run the cluster until SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sd = state_dir()
    cp = ControlPlane(workdir=sd / "controlplane")
    agent = extras = None
    try:
        cp.start()
        shutil.copy(cp.kubeconfig, sd / "kubeconfig")
        if not args.no_agent:
            agent = start_agent(sd, args.gpus)
        state = {"pid": os.getpid(), "kubeconfig": str(sd / "kubeconfig"), "api_url": cp.api_url,
                 "token": cp.admin_token, "version": cp.version["gitVersion"],
                 "node": agent and agent.node_name}
        if args.dev:
            extras = dev.DevCluster(sd, sd / "kubeconfig", kueue_gpus=args.gpus if args.kueue else None)
            state["dev"] = extras.start(dev.DemoSize(args.pretrain_steps, args.train_records))
        (sd / "state.tmp").write_text(json.dumps(state))
        (sd / "state.tmp").chmod(0o600)  # it holds the admin token
        (sd / "state.tmp").rename(sd / "state.json")
        print(f"ready: {cp.api_url} {cp.version['gitVersion']}, node agent: {state['node']}", flush=True)
        stop.wait()
    finally:
        (sd / "state.json").unlink(missing_ok=True)
        (sd / "kubeconfig").unlink(missing_ok=True)
        if extras:
            extras.stop()
        if agent:
            agent.stop()
        cp.stop()
        print("stopped", flush=True)
    return 0


def start_agent(sd: Path, gpus: int):
    try:
        from .agent import GPU, NodeAgent
        from .agent_pod import ImageRule
    except ImportError as e:
        print(f"no node agent ({e}); pods will stay Pending", flush=True)
        return None
    venv = Path(sys.executable).parent  # any tag of the trainer image runs its entrypoint from this venv
    trainer = ImageRule(match="ghcr.io/kubetune/trainer*", path=[str(venv)], working_dir=str(REPO_ROOT),
                        env={"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
                        entrypoint=[str(venv / "kubetune"), "launch"])
    capacity = {GPU: str(gpus)} if gpus else {}
    return NodeAgent(str(sd / "kubeconfig"), node_name=NODE_NAME, capacity=capacity, image_map=[trainer],
                     state_dir=str(sd / "agent")).start(timeout=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubetune_dev.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    commands = (("up", up, "start the cluster in the background"), ("down", down, "stop it"),
                ("status", status, "is it running?"), ("serve", serve, "run it in the foreground"))
    for name, fn, helptext in commands:
        sp = sub.add_parser(name, help=helptext)
        sp.set_defaults(fn=fn)
        if name in ("up", "serve"):
            sp.add_argument("--gpus", type=int, default=2, help="nvidia.com/gpu the node advertises")
            sp.add_argument("--no-agent", action="store_true", help="control plane only (no Node)")
            sp.add_argument("--dev", action="store_true",
                            help="also the CRD, a seeded S3 server and the operator (make dev-cluster)")
            sp.add_argument("--pretrain-steps", type=int, default=dev.DemoSize.pretrain_steps,
                            help="--dev: pre-training steps of the demo base model (as make demo)")
            sp.add_argument("--train-records", type=int, default=dev.DemoSize.train_records,
                            help="--dev: records of the demo's training split (as make demo)")
            sp.add_argument("--kueue", action="store_true",
                            help="--dev: also the real Kueue, with a ClusterQueue of the node's GPUs and the "
                                 "LocalQueue user-queue in default (make dev-cluster KUEUE=1; needs make kueue)")
        if name in ("up", "down"):
            sp.add_argument("--timeout", type=float, default=None if name == "up" else 60,
                            help="seconds (up: 300, 900 with --dev)")
    args = p.parse_args(argv)
    if getattr(args, "dev", False) and args.no_agent:
        p.error("--dev needs the node agent (leave out --no-agent)")
    if getattr(args, "kueue", False) and not args.dev:
        p.error("--kueue goes with --dev (make dev-cluster KUEUE=1)")
    try:
        return args.fn(args)
    except ControlPlaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

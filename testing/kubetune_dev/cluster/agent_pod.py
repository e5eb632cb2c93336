"""One pod on the node agent: volumes, env, local processes and the pod's status.

A `PodWorker` thread owns one pod from the moment it is bound to the node until the pod object is
gone. Each container runs as `unshare --mount --uts -- /bin/sh <run script> ARGV...`: the script
bind-mounts the pod's volumes, /etc/hosts and the termination-message file at their paths in a
private mount namespace, sets the pod's hostname and `exec`s the container's command, so the
container process is the process-group leader the agent signals.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import ROUND_CEILING
from pathlib import Path

import yaml
from kubernetes.utils.quantity import parse_quantity

from .agent_kube import ApiError

log = logging.getLogger("kubetune.agent")

SYSTEM_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
TERMINAL = ("Succeeded", "Failed")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- image map


@dataclass
class ImageRule:
    """What an image name means on this machine: a local environment, not a container image."""

    match: str = "*"
    path: list[str] = field(default_factory=list)  # prepended to PATH
    working_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)  # used when the container has no command
    args: list[str] = field(default_factory=list)  # used when the container has neither command nor args
    pass_env: list[str] = field(default_factory=lambda: ["LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS"])

    def matches(self, image: str) -> bool:
        return fnmatch.fnmatchcase(image, self.match) or image.startswith(self.match)


def default_image_rule() -> ImageRule:
    """Every image: the venv that runs the agent (the repo's .venv/bin) first on PATH."""
    return ImageRule(match="*", path=[str(Path(sys.executable).parent)], working_dir=os.getcwd())


def image_paths(rule: ImageRule) -> list[str]:
    """The host folders an image rule's processes need: its working dir, and its PATH entries (a venv's whole
    folder when the entry is a venv's bin/)."""
    paths = [rule.working_dir] if rule.working_dir else []
    for entry in map(Path, rule.path):
        paths.append(str(entry.parent if (entry.parent / "pyvenv.cfg").is_file() else entry))
    return [p for p in dict.fromkeys(paths) if Path(p).is_absolute() and Path(p).is_dir()]


def load_image_map(spec=None) -> list[ImageRule]:
    """`spec`: None, a YAML file path, a list of rule dicts, or a dict {match: rule} / {"images": [...]}.

    Rule keys: match, path, workingDir, env, entrypoint, args, passEnv. The first match wins; the
    default rule (`*`, the agent's venv on PATH) is always last.
    """
    base = Path.cwd()
    if isinstance(spec, str | Path):
        base = Path(spec).resolve().parent
        spec = yaml.safe_load(Path(spec).read_text()) or []
    if isinstance(spec, dict):
        if "images" in spec:
            spec = spec["images"]
        else:
            spec = [{"match": k, **(v or {})} for k, v in spec.items()]
    rules = []
    for item in spec or []:
        if isinstance(item, ImageRule):
            rules.append(item)
            continue
        wd = item.get("workingDir", item.get("working_dir"))
        rules.append(ImageRule(
            match=item.get("match", "*"),
            path=[str((base / p).resolve()) for p in item.get("path", [])],
            working_dir=str((base / wd).resolve()) if wd else None,
            env={k: str(v) for k, v in (item.get("env") or {}).items()},
            entrypoint=list(item.get("entrypoint") or []),
            args=list(item.get("args") or []),
            pass_env=list(item.get("passEnv", item.get("pass_env", ["LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS"]))),
        ))
    return rules + [default_image_rule()]


def resolve_image(rules: list[ImageRule], image: str) -> ImageRule:
    return next(r for r in rules if r.matches(image or ""))


# ---------------------------------------------------------------- small helpers


class ConfigError(Exception):
    """A referenced ConfigMap/Secret/key is missing: the container waits (CreateContainerConfigError)."""


def expand(value: str, env: dict) -> str:
    """Kubernetes `$(VAR)` expansion; `$$` escapes."""
    def repl(m):
        return "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, value)


def field_value(pod: dict, path: str, ip: str, host_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in items)
    values = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": ip, "status.podIPs": ip, "status.hostIP": host_ip, "status.hostIPs": host_ip,
    }
    if path not in values:
        raise ConfigError(f"unsupported fieldRef {path}")
    return values[path]


def resource_value(pod: dict, ref: dict, node_alloc: dict) -> str:
    name = ref.get("containerName")
    containers = pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
    c = next((c for c in containers if c["name"] == name), pod["spec"]["containers"][0])
    kind, _, res = ref["resource"].partition(".")
    quantity = (c.get("resources") or {}).get(kind, {}).get(res) or node_alloc.get(res, "0")
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(int((parse_quantity(quantity) / divisor).to_integral_value(ROUND_CEILING)))


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, read from /proc (catches children that left the process group)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def kill_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal a container: its process tree while it lives, and always its process group."""
    for pid in process_tree(proc.pid) if proc.poll() is None else []:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- containers


@dataclass
class Container:
    spec: dict
    init: bool
    proc: subprocess.Popen | None = None
    restarts: int = -1  # becomes 0 on the first start
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    started_at: str = ""
    restart_at: float | None = None  # monotonic time of the next (re)start
    done: bool = False  # terminated and will not run again
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self, pod_uid: str) -> dict:
        running = "running" in self.state
        ready = (self.exit_code == 0 and self.done) if self.init else running
        return {
            "name": self.name, "image": self.spec.get("image", ""), "imageID": "",
            "containerID": f"kubetune://{pod_uid}/{self.name}/{max(self.restarts, 0)}",
            "ready": ready, "started": running, "restartCount": max(self.restarts, 0),
            "state": self.state, "lastState": self.last_state,
        }


class PodWorker(threading.Thread):
    def __init__(self, agent, pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent, self.pod = agent, pod
        self.uid, self.ns, self.pod_name = meta["uid"], meta["namespace"], meta["name"]
        self.dir = agent.state_dir / "pods" / self.uid
        self.log_dir = agent.state_dir / "logs" / self.ns / self.pod_name
        spec = pod["spec"]
        self.policy = spec.get("restartPolicy", "Always")
        self.hostname = (spec.get("hostname") or self.pod_name)[:63]
        self.subdomain = spec.get("subdomain")
        self.init_ctrs = [Container(c, True) for c in spec.get("initContainers", [])]
        self.ctrs = [Container(c, False) for c in spec["containers"]]
        for c in self.ctrs if self.init_ctrs else []:
            c.state = {"waiting": {"reason": "PodInitializing"}}
        self.phase = "Pending"
        self.ip = ""
        self.gpus: list[str] = []
        self.start_time = (pod.get("status") or {}).get("startTime") or now()
        self.conditions: dict[str, dict] = {}
        self.reported: dict | None = None
        self.wake = threading.Event()
        self.deleting = False  # deletionTimestamp seen: terminate, report, delete the object
        self.gone = False  # the object is gone or the agent stops: terminate, no API calls
        self.grace = 30.0
        self.volumes: dict[str, Path] = {}
        self.read_only_volumes: set[str] = set()

    # ------------------------------------------------------------ called by the agent

    def update(self, pod: dict) -> None:
        self.pod = pod
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and not self.deleting:
            self.grace = float(meta.get("deletionGracePeriodSeconds", 30))
            self.deleting = True
            self.wake.set()

    def stop(self, grace: float = 0, gone: bool = True) -> None:
        self.grace = min(self.grace, grace)
        self.gone = self.gone or gone
        self.deleting = True
        self.wake.set()

    @property
    def stopping(self) -> bool:
        return self.deleting or self.gone

    @property
    def hosts_file(self) -> Path:
        return self.dir / "hosts"

    # ------------------------------------------------------------ lifecycle

    def run(self) -> None:
        try:
            self._lifecycle()
        except Exception:
            log.exception("pod %s/%s: worker crashed", self.ns, self.pod_name)
            self._terminate()
        finally:
            self.agent.release(self)

    def _lifecycle(self) -> None:
        if self._lost_on_restart():
            return self._wait_for_deletion()
        self.ip = self.agent.ips.allocate(self.uid, (self.pod.get("status") or {}).get("podIP"))
        self.gpus = self.agent.gpus.allocate(self.uid, self._gpu_request())
        (self.dir / "volumes").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.hosts_file.write_text(self.agent.hosts_for(self))
        self._set_conditions()
        self._report()
        while not self.stopping:
            try:
                self._materialize_volumes()
                break
            except (ConfigError, ApiError) as e:
                for c in self.init_ctrs + self.ctrs:
                    c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)[:500]}}
                self._report()
                self.wake.wait(2)
                self.wake.clear()
        if self.stopping:
            return self._terminate()
        if not self._run_init_containers():
            return self._terminate() if self.stopping else self._wait_for_deletion()
        self._run_containers()
        if self.stopping:
            return self._terminate()
        self._wait_for_deletion()

    def _lost_on_restart(self) -> bool:
        """A restartPolicy=Never pod whose containers ran under an earlier agent cannot be re-run."""
        statuses = (self.pod.get("status") or {}).get("containerStatuses") or []
        ran = any("running" in s.get("state", {}) or "terminated" in s.get("state", {}) for s in statuses)
        if self.policy != "Never" or not ran:
            return False
        for c in self.ctrs:
            c.restarts, c.done, c.exit_code = 0, True, 137
            c.state = unknown_state("the node agent restarted while the container ran")
        self.ip = (self.pod.get("status") or {}).get("podIP", "")
        self.phase = "Failed"
        self._set_conditions()
        self._report()
        return True

    def _run_init_containers(self) -> bool:
        for c in self.init_ctrs:
            c.restart_at = time.monotonic()
            while not c.done:
                self._tick(c)
                self._set_conditions()
                self._report()
                if self.stopping:
                    return False
                if c.done and c.exit_code != 0:
                    self.phase = "Failed"
                    self._set_conditions()
                    self._report()
                    return False
                self._sleep()
        return True

    def _run_containers(self) -> None:
        for c in self.ctrs:
            c.restart_at = time.monotonic()
        while not self.stopping:
            for c in self.ctrs:
                self._tick(c)
            if any(c.proc for c in self.ctrs):
                self.phase = "Running"
            if all(c.done for c in self.ctrs):
                self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.ctrs) else "Failed"
            self._set_conditions()
            self._report()
            if self.phase in TERMINAL:
                self._release_resources()
                return
            self._sleep()

    def _sleep(self, seconds: float = 0.2) -> None:
        self.wake.wait(seconds)
        self.wake.clear()

    def _tick(self, c: Container) -> None:
        """Advance one container: notice its exit, decide a restart, (re)start it when due."""
        if c.proc is not None and c.proc.poll() is not None:
            self._exited(c)
        if c.restart_at is not None and time.monotonic() >= c.restart_at and not self.stopping:
            c.restart_at = None
            try:
                self._start(c)
            except ConfigError as e:
                c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)[:500]}}
                c.restart_at = time.monotonic() + 2

    def _exited(self, c: Container) -> None:
        kill_tree(c.proc, signal.SIGKILL)  # what the container left running in its process group
        code = c.proc.returncode
        code = 128 - code if code < 0 else code
        c.proc, c.exit_code = None, code
        c.state = {"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_at, "finishedAt": now(),
            "containerID": f"kubetune://{self.uid}/{c.name}/{c.restarts}",
            **({"message": msg} if (msg := self._termination_message(c, code)) else {}),
        }}
        if c.init:
            restart = code != 0 and self.policy != "Never"
        else:
            restart = self.policy == "Always" or (self.policy == "OnFailure" and code != 0)
        if not restart or self.stopping:
            c.done = True
            return
        delay = min(self.agent.backoff_s * 2 ** c.restarts, 300.0)
        c.last_state, c.restart_at = c.state, time.monotonic() + delay
        c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
            f"back-off {delay:g}s restarting failed container={c.name} pod={self.pod_name}")}}

    def _termination_message(self, c: Container, code: int) -> str:
        path = self.dir / "termination" / c.name
        msg = path.read_text(errors="replace")[:4096] if path.exists() else ""
        if not msg and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = (self.log_dir / f"{c.name}.log").read_text(errors="replace").splitlines()[-80:]
            msg = "\n".join(lines)[-2048:]
        return msg

    # ------------------------------------------------------------ starting a container

    def _start(self, c: Container) -> None:
        rule = resolve_image(self.agent.image_rules, c.spec.get("image", ""))
        env = self._env(c, rule)
        if c.spec.get("command"):
            argv = c.spec["command"] + c.spec.get("args", [])
        else:
            argv = rule.entrypoint + (c.spec["args"] if "args" in c.spec else rule.args)
        argv = [expand(a, env) for a in argv]
        if not argv:
            raise ConfigError(f"container {c.name}: no command and no entrypoint for {c.spec.get('image')}")
        workdir = c.spec.get("workingDir") or rule.working_dir or "/"
        term = self.dir / "termination" / c.name
        term.parent.mkdir(parents=True, exist_ok=True)
        term.write_text("")
        mounts = [(self.hosts_file, "/etc/hosts", False),
                  (term, c.spec.get("terminationMessagePath", "/dev/termination-log"), False)]
        for m in c.spec.get("volumeMounts", []):
            src = self.volumes.get(m["name"])
            if src is None:
                raise ConfigError(f"volume {m['name']} is not defined")
            src = src / m["subPath"] if m.get("subPath") else src
            read_only = m.get("readOnly", False) or m["name"] in self.read_only_volumes
            mounts.append((src, m["mountPath"], read_only))
        if self.agent.isolate:
            self.agent.claim_mount_points(self.uid, [(dst, Path(src).is_dir()) for src, dst, _ in mounts])
        script = self.dir / "run" / f"{c.name}.sh"
        script.parent.mkdir(exist_ok=True)
        read_only_root = bool((c.spec.get("securityContext") or {}).get("readOnlyRootFilesystem"))
        script.write_text(self._script(mounts, workdir, env, image_paths(rule), read_only_root))
        logfile = self.log_dir / f"{c.name}.log"
        if logfile.exists():  # an earlier run of this container, or of a pod with the same name
            logfile.replace(self.log_dir / f"{c.name}.previous.log")
        prefix = ["unshare", "--mount", "--uts", "--propagation", "private"] if self.agent.isolate else []
        with open(logfile, "ab") as out:
            c.proc = subprocess.Popen(
                [*prefix, "/bin/sh", str(script), *argv], env=env, cwd="/", stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        c.restarts += 1
        c.started_at, c.exit_code = now(), None
        c.state = {"running": {"startedAt": c.started_at}}
        log.info("pod %s/%s: started %s (pid %d): %s", self.ns, self.pod_name, c.name, c.proc.pid,
                 shlex.join(argv)[:200])

    def _script(self, mounts, workdir: str, env: dict, image: list[str], read_only_root: bool = False) -> str:
        q = shlex.quote
        lines = ["set -e"]
        if self.agent.isolate:
            # Sources relative to the state dir (the shell's cwd, uncanonicalized), so that a volume mounted over an
            # ancestor of the state dir (an emptyDir at /tmp when the state dir is under /tmp) hides no later source.
            state = self.agent.state_dir
            lines.append(f"cd {q(str(state))}")
            # The image's files (the image map's venv and working dir) are host paths; a volume over one of their
            # ancestors (an emptyDir at /tmp, a checkout under /tmp) must not hide them: keep a handle on each
            # first, and bind it back over the volume afterwards, as a container's image files would be there.
            covered = [p for p in image if any(Path(p).is_relative_to(dst) for _, dst, _ in mounts)]
            kept = [(p, (self.dir / "image" / str(i)).relative_to(state)) for i, p in enumerate(covered)]
            for path, handle in kept:
                lines.append(f"mkdir -p {q(str(handle))}; mount --bind {q(path)} {q(str(handle))}")
            for src, dst, ro in sorted(mounts, key=lambda m: m[1].count("/")):
                if Path(src).is_dir():
                    lines.append(f"mkdir -p {q(dst)}")
                else:
                    lines.append(f"mkdir -p {q(os.path.dirname(dst))}; [ -e {q(dst)} ] || : > {q(dst)}")
                source = Path(src).relative_to(state) if Path(src).is_relative_to(state) else src
                lines.append(f"mount --no-canonicalize --bind {q(str(source))} {q(dst)}")
                if ro:
                    lines.append(f"mount -o remount,bind,ro {q(dst)}")
            for path, handle in kept:
                lines.append(f"mkdir -p {q(path)}; mount --no-canonicalize --bind {q(str(handle))} {q(path)}")
            lines.append(f"echo {q(self.hostname)} > /proc/sys/kernel/hostname")
            if read_only_root:  # readOnlyRootFilesystem: only the volumes stay writable, as in a container
                lines += [f"mkdir -p {q(workdir)}", "mount -o remount,bind,ro /"]
        else:  # fallback: no mount namespace; volumes are reachable through KUBETUNE_VOLUME_<NAME>
            for name, path in self.volumes.items():
                var = "KUBETUNE_VOLUME_" + re.sub(r"[^A-Z0-9]", "_", name.upper())
                lines.append(f"export {var}={q(str(path))}")
        lines += [f"mkdir -p {q(workdir)}; cd {q(workdir)}", 'exec "$@"', ""]
        return "\n".join(lines)

    def _gpu_request(self) -> int:
        res = self.agent.gpu_resource
        limits = [(c.get("resources") or {}).get("limits", {}) for c in self.pod["spec"]["containers"]]
        return sum(int(lim.get(res, 0)) for lim in limits)

    def _env(self, c: Container, rule: ImageRule) -> dict:
        env = {"PATH": ":".join(rule.path + SYSTEM_PATH), "HOME": "/root", "HOSTNAME": self.hostname}
        env.update({k: os.environ[k] for k in rule.pass_env if k in os.environ})
        env.update(rule.env)
        env.update(self.agent.service_env)
        env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        if not self.gpus:
            env["NVIDIA_VISIBLE_DEVICES"] = "void"
        for src in c.spec.get("envFrom", []):
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                data = self._object("configmaps", src["configMapRef"])
                env.update({prefix + k: v for k, v in (data or {}).get("data", {}).items()})
            elif "secretRef" in src:
                data = self._object("secrets", src["secretRef"])
                env.update({prefix + k: b64(v) for k, v in (data or {}).get("data", {}).items()})
        for e in c.spec.get("env", []):
            value = self._env_value(e, env)
            if value is not None:
                env[e["name"]] = value
        return env

    def _env_value(self, e: dict, env: dict) -> str | None:
        if "valueFrom" not in e:
            return expand(e.get("value", ""), env)
        vf = e["valueFrom"]
        if "fieldRef" in vf:
            return field_value(self.pod, vf["fieldRef"]["fieldPath"], self.ip, self.agent.host_ip)
        if "resourceFieldRef" in vf:
            return resource_value(self.pod, vf["resourceFieldRef"], self.agent.allocatable)
        if "configMapKeyRef" in vf:
            kind, ref = "configmaps", vf["configMapKeyRef"]
        else:
            kind, ref = "secrets", vf["secretKeyRef"]
        obj = self._object(kind, ref)
        if obj is None:
            return None
        data = obj.get("data") or {}
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind[:-1]} {self.ns}/{ref['name']}")
        return b64(data[ref["key"]]) if kind == "secrets" else data[ref["key"]]

    def _object(self, kind: str, ref: dict) -> dict | None:
        """A ConfigMap or Secret of the pod's namespace; None if it is optional and missing."""
        name = ref.get("name") or ref.get("secretName")
        try:
            return self.agent.kube.get(f"/api/v1/namespaces/{self.ns}/{kind}/{name}")
        except ApiError as e:
            if e.status != 404:
                raise
            if kind == "configmaps" and name == "kube-root-ca.crt":
                return {"data": {"ca.crt": self.agent.ca_pem}}  # not published yet: the agent's CA
            if ref.get("optional"):
                return None
            raise ConfigError(f"{kind[:-1]} {self.ns}/{name} not found") from None

    # ------------------------------------------------------------ volumes

    def _materialize_volumes(self) -> None:
        for vol in self.pod["spec"].get("volumes", []):
            name = vol["name"]
            if "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                    path.mkdir(parents=True, exist_ok=True)
                self.volumes[name] = path
                continue
            if "persistentVolumeClaim" in vol:  # a directory per claim, shared by the node's pods
                path = self.agent.state_dir / "pvcs" / self.ns / vol["persistentVolumeClaim"]["claimName"]
                path.mkdir(parents=True, exist_ok=True)
                self.volumes[name] = path
                continue
            path = self.dir / "volumes" / name
            files: dict[str, tuple[bytes, int]] = {}
            if "configMap" in vol or "secret" in vol or "downwardAPI" in vol:
                files = self._projection(vol)
                self.read_only_volumes.add(name)
            elif "projected" in vol:
                mode = vol["projected"].get("defaultMode", 0o644)
                for source in vol["projected"].get("sources", []):
                    if "serviceAccountToken" in source:
                        sat = source["serviceAccountToken"]
                        files[sat["path"]] = (self._token(sat).encode(), mode)
                    else:
                        kind = next(iter(source))
                        files.update(self._projection({kind: {**source[kind], "defaultMode": mode}}))
                self.read_only_volumes.add(name)
            elif "emptyDir" not in vol:
                log.warning("pod %s/%s: volume %s: unsupported type, using an empty directory",
                            self.ns, self.pod_name, name)
            if path.exists() and files:
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
            for rel, (data, mode) in files.items():
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                target.chmod(mode)
            self.volumes[name] = path

    def _projection(self, vol: dict) -> dict[str, tuple[bytes, int]]:
        """Files of a configMap, secret or downwardAPI volume (or projected source): {path: (bytes, mode)}."""
        kind = next(k for k in ("configMap", "secret", "downwardAPI") if k in vol)
        src = vol[kind]
        mode = src.get("defaultMode", 0o644)
        if kind == "downwardAPI":
            out = {}
            for item in src.get("items", []):
                if "fieldRef" in item:
                    value = field_value(self.pod, item["fieldRef"]["fieldPath"], self.ip, self.agent.host_ip)
                else:
                    value = resource_value(self.pod, item["resourceFieldRef"], self.agent.allocatable)
                out[item["path"]] = (value.encode(), item.get("mode", mode))
            return out
        obj = self._object("configmaps" if kind == "configMap" else "secrets", src)
        if obj is None:
            return {}
        if kind == "secret":
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        else:
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        if "items" not in src:
            return {k: (v, mode) for k, v in data.items()}
        out = {}
        for item in src["items"]:
            if item["key"] not in data:
                if src.get("optional"):
                    continue
                raise ConfigError(f"key {item['key']} not in {kind} {self.ns}/{obj['metadata']['name']}")
            out[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return out

    def _token(self, sat: dict) -> str:
        sa = self.pod["spec"].get("serviceAccountName", "default")
        spec = {"expirationSeconds": sat.get("expirationSeconds", 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid}}
        if sat.get("audience"):
            spec["audiences"] = [sat["audience"]]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        try:
            resp = self.agent.kube.create(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
            return resp["status"]["token"]
        except ApiError as e:
            log.warning("pod %s/%s: no service account token (%s)", self.ns, self.pod_name, e)
            return ""

    # ------------------------------------------------------------ status

    def _set_conditions(self) -> None:
        initialized = all(c.done and c.exit_code == 0 for c in self.init_ctrs)
        ready = self.phase == "Running" and all("running" in c.state for c in self.ctrs)
        reason = "PodCompleted" if self.phase in TERMINAL else "ContainersNotReady"
        wanted = {
            "PodReadyToStartContainers": (bool(self.ip), ""),
            "Initialized": (initialized or self.phase == "Succeeded",
                            "PodCompleted" if self.phase in TERMINAL else "ContainersNotInitialized"),
            "ContainersReady": (ready, reason),
            "Ready": (ready, reason),
        }
        for ctype, (ok, why) in wanted.items():
            status = "True" if ok else "False"
            old = self.conditions.get(ctype)
            if old is None or old["status"] != status:
                cond = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": now()}
                if not ok and why:
                    cond["reason"] = why
                self.conditions[ctype] = cond

    def _status(self) -> dict:
        others = [c for c in (self.pod.get("status") or {}).get("conditions") or []
                  if c["type"] not in self.conditions]
        status = {
            "phase": self.phase,
            "conditions": others + list(self.conditions.values()),
            "hostIP": self.agent.host_ip, "hostIPs": [{"ip": self.agent.host_ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status(self.uid) for c in self.ctrs],
        }
        if self.ip:
            status.update(podIP=self.ip, podIPs=[{"ip": self.ip}])
        if self.init_ctrs:
            status["initContainerStatuses"] = [c.status(self.uid) for c in self.init_ctrs]
        return status

    def _report(self) -> None:
        if self.gone:
            return
        status = self._status()
        if status == self.reported:
            return
        path = f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status"
        try:  # strategic, as the kubelet's: a condition set meanwhile (DisruptionTarget: an eviction) stays
            self.pod = self.agent.kube.patch(path, {"metadata": {"uid": self.uid}, "status": patchable(status)},
                                             strategic=True)
            self.reported = status
        except ApiError as e:
            if e.status in (404, 409):
                self.gone = True
            else:
                log.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, e)

    # ------------------------------------------------------------ termination

    def _terminate(self) -> None:
        """SIGTERM every running container's process tree, SIGKILL after the grace period, report, delete."""
        running = [c for c in self.init_ctrs + self.ctrs if c.proc is not None]
        for c in running:
            kill_tree(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while any(c.proc.poll() is None for c in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        for c in running:
            kill_tree(c.proc, signal.SIGKILL)
            c.proc.wait()
            self._exited(c)
        for c in self.init_ctrs + self.ctrs:
            c.restart_at = None
            if "waiting" in c.state and "terminated" in c.last_state:  # deleted while backing off
                c.state, c.exit_code = c.last_state, c.last_state["terminated"]["exitCode"]
            elif "waiting" in c.state:
                c.state, c.exit_code = unknown_state("the pod was deleted before the container started"), 137
            c.done = True
        if self.phase not in TERMINAL:
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.ctrs) else "Failed"
        self._set_conditions()
        self._report()
        self._release_resources()
        if self.deleting and not self.gone:
            self._delete_object()

    def _wait_for_deletion(self) -> None:
        self._release_resources()
        while not self.stopping:
            self._sleep(5)
        if not self.gone:
            self._delete_object()

    def _delete_object(self) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
        try:
            self.agent.kube.delete(f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}", body)
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("pod %s/%s: delete failed: %s", self.ns, self.pod_name, e)

    def _release_resources(self) -> None:
        self.agent.ips.release(self.uid)
        self.agent.gpus.release(self.uid)


def patchable(status: dict) -> dict:
    """The status as a strategic merge patch: lists merge by key (conditions by type, containers by name), so
    each container's state names its other kinds null, or the API server would merge `terminated` into the
    `running` it holds."""
    def states(c: dict) -> dict:
        return {**c, **{key: {kind: c[key].get(kind) for kind in ("waiting", "running", "terminated")}
                        for key in ("state", "lastState")}}
    return {**status, **{key: [states(c) for c in status[key]]
                         for key in ("containerStatuses", "initContainerStatuses") if key in status}}


def unknown_state(message: str) -> dict:
    return {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now(),
                           "message": message}}


def b64(value: str) -> str:
    return base64.b64decode(value).decode(errors="replace")

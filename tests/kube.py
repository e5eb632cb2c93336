"""Helpers shared by the tests that talk to the local control plane: kubectl, polling, free ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kubernetes
import urllib3

KUBECTL = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def kubectl(cp, *args: str, stdin: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """The real kubectl against the control plane `cp`; with check, a failure raises with its stderr."""
    out = subprocess.run([KUBECTL, "--kubeconfig", str(cp.kubeconfig), *args], input=stdin,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {out.stderr}")
    return out


def get_json(cp, *args: str) -> dict:
    """What `kubectl get ARGS -o json` prints. The forms the tests poll with (a resource, a name, -n, -A, -l,
    --field-selector) are read from the API server in this process: the same objects, without a kubectl process
    (about 0.08 CPU-s each, thousands of times a run while the tests wait). Anything else runs kubectl."""
    got = Reader.of(cp).get(args)
    return got if got is not None else json.loads(kubectl(cp, "get", *args, "-o", "json").stdout)



def drop_finalizers(cp, resource: str, *scope: str, check: bool = True) -> None:
    """Take the finalizers off every `resource` object in `scope` (`-n NAMESPACE` or `-A`) that has any: those of a
    controller no longer running, which would keep the object, and its namespace or CRD, from going."""
    for obj in get_json(cp, resource, *scope)["items"]:
        meta = obj["metadata"]
        if meta.get("finalizers"):
            kubectl(cp, "patch", resource, meta["name"], *(["-n", meta["namespace"]] if meta.get("namespace") else []),
                    "--type=merge", "-p", '{"metadata": {"finalizers": null}}', check=check)

class Reader:
    """GETs against the API server a kubeconfig names (its current context, kubernetes' client), resolving resource
    names as kubectl does: plural, singular or short name, the core group first, then the groups in the server's
    order, each at its preferred version (aggregated discovery, re-read when a name is new: a CRD installed since)."""

    _readers: dict[tuple, Reader] = {}
    _ACCEPT_DISCOVERY = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"

    @classmethod
    def of(cls, cp) -> Reader:
        path = Path(cp.kubeconfig)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in cls._readers:
            cls._readers[key] = cls(str(path))
        return cls._readers[key]

    def __init__(self, kubeconfig: str):
        self.api = kubernetes.config.new_client_from_config(config_file=kubeconfig)  # its current context
        _, active = kubernetes.config.list_kube_config_contexts(kubeconfig)
        self.namespace = active["context"].get("namespace") or "default"
        self.resources: dict[str, tuple[str, str, str, bool]] | None = None

    def get(self, args: tuple[str, ...]) -> dict | None:
        """The object or list, or None where kubectl must answer (a form this does not read)."""
        words, query, namespace, every_namespace = [], {}, self.namespace, False
        flags = {"-n": "namespace", "--namespace": "namespace", "-l": "labelSelector",
                 "--selector": "labelSelector", "--field-selector": "fieldSelector"}
        rest = list(args)
        while rest:
            arg = rest.pop(0)
            flag, _, value = arg.partition("=")
            if flag in flags:
                value = value or (rest.pop(0) if rest else "")
                if flags[flag] == "namespace":
                    namespace = value
                else:
                    query[flags[flag]] = value
            elif arg in ("-A", "--all-namespaces"):
                every_namespace = True
            elif arg.startswith("-") or "/" in arg or "." in arg:
                return None
            else:
                words.append(arg)
        if len(words) not in (1, 2):
            return None
        found = self.resource(words[0].lower())
        if found is None:
            return None
        base, plural, kind, namespaced = found
        path = base
        if namespaced and not (every_namespace and len(words) == 1):
            path += f"/namespaces/{namespace}"
        path += f"/{plural}" + (f"/{words[1]}" if len(words) == 2 else "")
        body = self.read(path, args, query)
        if len(words) == 2:
            return _shown(body)
        api_version = base.removeprefix("/api/").removeprefix("/apis/")
        items = [_shown({"apiVersion": api_version, "kind": kind, **item}) for item in body.get("items") or []]
        return {"apiVersion": "v1", "items": items, "kind": "List", "metadata": {"resourceVersion": ""}}

    def resource(self, name: str) -> tuple[str, str, str, bool] | None:
        """(API path, plural, kind, namespaced) for a name kubectl accepts; discovery is read again once for a
        name it does not know."""
        if self.resources is None or name not in self.resources:
            self.resources = self.discover()
        return self.resources.get(name)

    def discover(self) -> dict[str, tuple[str, str, str, bool]]:
        names: dict[str, tuple[str, str, str, bool]] = {}
        for root in ("/api", "/apis"):
            for group in self.read(root, (root,), accept=self._ACCEPT_DISCOVERY).get("items") or []:
                version = (group.get("versions") or [{}])[0]  # the preferred version comes first
                prefix = "/api" if root == "/api" else f"/apis/{group['metadata']['name']}"
                for r in version.get("resources") or []:
                    found = (f"{prefix}/{version['version']}", r["resource"], r["responseKind"]["kind"],
                             r.get("scope") == "Namespaced")
                    for alias in (r["resource"], r.get("singularResource"), *(r.get("shortNames") or [])):
                        if alias:
                            names.setdefault(alias, found)
        return names

    def read(self, path: str, args: tuple[str, ...], query: dict | None = None,
             accept: str = "application/json") -> dict:
        """The decoded answer; a 429 (a CRD's storage starting, say) is retried after its Retry-After, as
        kubectl's client does; any other error raises as kubectl(check=True) would."""
        _, url, headers, _, _ = self.api.param_serialize(
            method="GET", resource_path=path, query_params=list((query or {}).items()),
            header_params={"Accept": accept}, auth_settings=["BearerToken"])
        for _ in range(10):
            try:
                resp = self.api.call_api("GET", url, headers, _request_timeout=30)
            except urllib3.exceptions.HTTPError as e:  # nothing answers: kubectl fails too
                raise AssertionError(f"kubectl get {' '.join(args)}: {e}") from None
            data = resp.read()
            if resp.status < 400:
                return json.loads(data)
            status = json.loads(data or b"{}")
            if resp.status != 429:
                break
            time.sleep(float(resp.getheader("Retry-After") or 1))
        raise AssertionError(f"kubectl get {' '.join(args)}: Error from server ({status.get('reason')}): "
                             f"{status.get('message')}")


def _shown(obj: dict) -> dict:
    """An object as `kubectl get -o json` shows it: without metadata.managedFields."""
    obj.get("metadata", {}).pop("managedFields", None)
    return obj


def wait_for(what: str, predicate, timeout: float = 180, every: float = 0.5):
    """Poll until predicate() is truthy and return its value; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def stop_process(proc: subprocess.Popen, kill: bool = False, grace: float = 20) -> None:
    """SIGTERM (or SIGKILL at once), wait up to `grace` seconds, then SIGKILL."""
    if kill:
        proc.kill()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    """(status, body), or (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""

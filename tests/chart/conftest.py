"""Helpers for the chart tests: the real helm, promtool and hadolint binaries, never mocks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.kube import free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
BIN = Path(sys.executable).parent
INSTALL_HINT = "run `hack/install-system-deps` (as root) to install it"


def tool(name: str) -> str:
    """A binary from the virtualenv (helm, hadolint, kubectl) or the system (promtool); missing fails."""
    local = BIN / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        hint = INSTALL_HINT if name in ("promtool", "prometheus") else "run `make venv`"
        pytest.fail(f"{name} not found: {hint}")
    return found


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def documented_rbac() -> dict[tuple[str, str], set[str]]:
    """The RBAC table of docs/operator.md: | `group` | `resource` | verbs | why |"""
    text = (ROOT / "docs" / "operator.md").read_text()
    section = text.split("## RBAC", 1)[1].split("\n## ", 1)[0]
    rules: dict[tuple[str, str], set[str]] = {}
    for row in re.findall(r"^\| `([^`]*)`[^|]*\| `([^`]+)` \| ([^|]+) \|", section, flags=re.MULTILINE):
        group, resource, verbs = row
        group = "" if group == '""' else group
        rules.setdefault((group, resource), set()).update(v.strip() for v in verbs.split(","))
    return rules


RBAC_MATRIX = Path(__file__).with_name("rbac-expected.yaml")


def rbac_matrix() -> dict[str, dict[str, dict[str, set[str]]]]:
    """tests/chart/rbac-expected.yaml: mode -> namespace checked -> resource -> verbs, as `kubectl auth can-i
    --list` prints them for the operator's ServiceAccount (less what the `default` ServiceAccount has)."""
    raw = yaml.safe_load(RBAC_MATRIX.read_text())
    return {mode: {where: {resource: set(verbs) for resource, verbs in (rules or {}).items()}
                   for where, rules in places.items()}
            for mode, places in raw.items()}


def kubectl_resource(group: str, resource: str, names: list[str] | tuple[str, ...] = ()) -> str:
    """A rule's resource as `kubectl auth can-i --list` names it: configmaps, jobs.batch,
    finetunejobs.kubetune.io/status, and `<resource> [<name> ...]` when the rule names its objects."""
    name, slash, sub = resource.partition("/")
    key = f"{name}.{group}{slash}{sub}" if group else resource
    return f"{key} [{' '.join(sorted(names))}]" if names else key


def granted(*roles: dict) -> dict[str, set[str]]:
    """The rules of (Cluster)Roles, resource (kubectl_resource) -> verbs."""
    out: dict[str, set[str]] = {}
    for role in roles:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    key = kubectl_resource(group, resource, rule.get("resourceNames", ()))
                    out.setdefault(key, set()).update(rule["verbs"])
    return out


def entrypoint(dockerfile: Path) -> list[str]:
    """A Dockerfile's (last) ENTRYPOINT, exec form."""
    lines = [line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT ")]
    return json.loads(lines[-1].removeprefix("ENTRYPOINT "))


def set_args(values: dict[str, str]) -> list[str]:
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def helm_template(values: dict[str, str] | None = None, release: str = "kubetune",
                  namespace: str = "kubetune-system", check: bool = True) -> subprocess.CompletedProcess:
    return run(tool("helm"), "template", release, str(CHART), "--namespace", namespace,
               *set_args(values or {}), check=check)


def render(values: dict[str, str] | None = None, **kwargs) -> list[dict]:
    """The chart's objects, parsed."""
    return [doc for doc in yaml.safe_load_all(helm_template(values, **kwargs).stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


# Every optional part on, a namespace list and more replicas.
FULL_VALUES = {
    "replicas": "2",
    "watchNamespaces": "{team-a,team-b}",
    "leaderElection.leaseName": "kubetune-ops",
    "imagePullSecrets[0].name": "regcred",
    "serviceMonitor.enabled": "true",
    "podMonitor.enabled": "true",
    "prometheusRule.enabled": "true",
    "storage.endpoint": "http://minio.minio:9000",
    "storage.region": "eu-west-1",
    "storage.secretName": "s3-credentials",
    "trainer.image.tag": "0.2.0",
    "estimate.gpuTflops": "125",
    "priorityClassName": "system-cluster-critical",
    "nodeSelector.kubernetes\\.io/os": "linux",
    "policy.allowedImagePrefixes": "{registry.example.com/ml/,ghcr.io/kubetune/trainer}",
    "policy.defaultCredentialsNamespaces": "{team-a}",
    "policy.allowTrustRemoteCode": "true",
    "policy.allowedNodeSelectors": "{kubetune.io/pool=training,topology.kubernetes.io/zone}",
    "policy.allowedTolerations": "{nvidia.com/gpu:NoSchedule,kubetune.io/pool=training}",
    "policy.allowedGPUResourceNames": "{nvidia.com/gpu,amd.com/gpu}",
    "policy.maxTerminationGracePeriodSeconds": "900",
    "policy.requireQueue": "true",
    "policy.allowedStoragePrefixes[0]": "s3://ml-{namespace}/",
    "policy.allowedStoragePrefixes[1]": "hf://",
    "policy.allowedStorageEndpoints": "{https://s3.eu-west-1.amazonaws.com}",
}


class Prometheus:
    """A real Prometheus server (the Debian package's binary) on a free local port, for queries."""

    def __init__(self, data_dir: Path, config: str = "global: {scrape_interval: 15s}\n"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_file = data_dir.parent / "prometheus.yml"
        config_file.write_text(config)
        self.log = (data_dir.parent / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=30d"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited ({self.proc.returncode}), see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(f"prometheus not ready after {timeout}s, see {self.log.name}")

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; fails the test on a query error."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}",
                                        timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            pytest.fail(f"query {expr!r} failed: {err.read().decode()}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's label_values(match, label) lists."""
        query = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/label/{label}/values?{query}", timeout=10) as resp:
            return json.load(resp)["data"]

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()

"""The chart's ServiceMonitor and PodMonitor as a plain Prometheus config, with targets from the live cluster.

`scrape_config()` writes what the Prometheus Operator generates from a monitor: a Kubernetes role (pod for a
PodMonitor, endpointslice for a ServiceMonitor) and relabelings that select targets by their
`__meta_kubernetes_*` labels (the monitor's selector, port and own relabelings) and set job, namespace, pod, ...

Debian's Prometheus is built without `kubernetes_sd_configs` (it rejects the field: Debian does not package
client-go), so `KubernetesTargets` stands in for that discovery: every second it lists pods and Services from
the API server and writes, for each scrape config, a `file_sd_configs` file holding every
target the Kubernetes discovery of that role would find, with the same `__meta_kubernetes_*` labels. The
relabelings, so the selection the chart's monitors make, run unchanged in the real Prometheus.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from kubernetes import client


def _name(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _selects(role: str, selector: dict) -> list[dict]:
    """Relabelings keeping the targets whose pod's or Service's labels match a label selector."""
    meta = f"__meta_kubernetes_{role}_label"
    rules = [{"action": "keep", "source_labels": [f"{meta}_{_name(k)}", f"{meta}present_{_name(k)}"],
              "regex": f"({v});true"} for k, v in selector.get("matchLabels", {}).items()]
    for expr in selector.get("matchExpressions", []):
        key, op = _name(expr["key"]), expr["operator"]
        action = "keep" if op in ("In", "Exists") else "drop"
        if op in ("Exists", "DoesNotExist"):
            rules.append({"action": action, "source_labels": [f"{meta}present_{key}"], "regex": "true"})
        else:
            rules.append({"action": action, "source_labels": [f"{meta}_{key}", f"{meta}present_{key}"],
                          "regex": f"({'|'.join(expr['values'])});true"})
    return rules


def _snake(relabeling: dict) -> dict:
    return {re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), k): v for k, v in relabeling.items()}


def scrape_config(monitor: dict, targets_file: Path) -> dict:
    """A PodMonitor's or ServiceMonitor's scrape config; `targets_file` is where KubernetesTargets writes."""
    ns, name, spec = monitor["metadata"]["namespace"], monitor["metadata"]["name"], monitor["spec"]
    pod = monitor["kind"] == "PodMonitor"
    (endpoint,) = spec["podMetricsEndpoints"] if pod else spec["endpoints"]
    selector = spec.get("namespaceSelector", {})
    if pod:
        relabel = [*_selects("pod", spec["selector"]),
                   {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
                   {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                    "regex": endpoint["port"]},
                   {"target_label": "job", "replacement": f"{ns}/{name}"}]
    else:
        relabel = [*_selects("service", spec["selector"]),
                   {"action": "keep", "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
                    "regex": endpoint["port"]},
                   {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                   {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"}]
    relabel += [{"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                {"target_label": "endpoint", "replacement": endpoint["port"]}]
    return {"job_name": f"{'podMonitor' if pod else 'serviceMonitor'}/{ns}/{name}/0",
            "scrape_interval": endpoint["interval"], "scrape_timeout": endpoint["scrapeTimeout"],
            "metrics_path": endpoint["path"],
            "file_sd_configs": [{"files": [str(targets_file)]}],
            "relabel_configs": relabel + [_snake(r) for r in endpoint.get("relabelings", [])],
            "metric_relabel_configs": [_snake(r) for r in endpoint.get("metricRelabelings", [])],
            # what kubernetes_sd_configs would say; KubernetesTargets reads it
            "_kubernetes": {"role": "pod" if pod else "endpointslice",
                            "namespaces": [] if selector.get("any") else selector.get("matchNames") or [ns]}}


def _labels(prefix: str, labels: dict | None) -> dict[str, str]:
    out = {}
    for key, value in (labels or {}).items():
        out[f"{prefix}_label_{_name(key)}"] = value
        out[f"{prefix}_labelpresent_{_name(key)}"] = "true"
    return out


def _pod_meta(pod: dict) -> dict[str, str]:
    meta = pod["metadata"]
    return {"__meta_kubernetes_namespace": meta["namespace"], "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_phase": pod.get("status", {}).get("phase", ""),
            "__meta_kubernetes_pod_ip": pod.get("status", {}).get("podIP", ""),
            **_labels("__meta_kubernetes_pod", meta.get("labels"))}


def pod_targets(pods: list[dict]) -> list[dict]:
    """role: pod: one target per container port of every pod that has an IP."""
    groups = []
    for pod in pods:
        ip = pod.get("status", {}).get("podIP")
        for container in pod["spec"]["containers"] if ip else []:
            for port in container.get("ports", []):
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": {
                    **_pod_meta(pod), "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"])}})
    return groups


def endpointslice_targets(services: list[dict], pods: list[dict]) -> list[dict]:
    """role: endpointslice: one target per endpoint and port, with its Service's and pod's labels. The endpoints
    are derived from each Service's selector and ports as the EndpointSlice controller derives them: its
    EndpointSlices stay empty here, as the API server refuses the node agent's loopback pod IPs in them."""
    groups = []
    for service in services:
        meta, selector = service["metadata"], service["spec"].get("selector")
        members = [p for p in pods if selector and p["metadata"]["namespace"] == meta["namespace"]
                   and selector.items() <= (p["metadata"].get("labels") or {}).items()
                   and p.get("status", {}).get("podIP") and p["status"].get("phase") not in ("Succeeded", "Failed")]
        base = {"__meta_kubernetes_namespace": meta["namespace"], "__meta_kubernetes_service_name": meta["name"],
                **_labels("__meta_kubernetes_service", meta.get("labels"))}
        for pod in members:
            for port in service["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])  # a number or a container port's name
                for container in pod["spec"]["containers"]:
                    for number in [c["containerPort"] for c in container.get("ports", [])
                                   if target in (c["containerPort"], c.get("name"))]:
                        groups.append({"targets": [f"{pod['status']['podIP']}:{number}"], "labels": {
                            **base, **_pod_meta(pod), "__meta_kubernetes_pod_container_name": container["name"],
                            "__meta_kubernetes_endpointslice_port_name": port.get("name", ""),
                            "__meta_kubernetes_endpointslice_port": str(number)}})
    return groups


class KubernetesTargets:
    """Writes each scrape config's file_sd targets from the API server, every `every` seconds, until stop()."""

    def __init__(self, api: client.ApiClient, configs: list[dict], every: float = 1.0):
        self.core, self.configs, self.every = client.CoreV1Api(api), configs, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubernetes-targets", daemon=True)

    def refresh(self) -> None:
        pods = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)["items"]
        services = json.loads(self.core.list_service_for_all_namespaces(_preload_content=False).data)["items"]
        for config in self.configs:
            kube = config["_kubernetes"]
            groups = pod_targets(pods) if kube["role"] == "pod" else endpointslice_targets(services, pods)
            if kube["namespaces"]:
                groups = [g for g in groups if g["labels"]["__meta_kubernetes_namespace"] in kube["namespaces"]]
            path = Path(config["file_sd_configs"][0]["files"][0])
            text = json.dumps(groups, indent=1, sort_keys=True)
            if not path.exists() or path.read_text() != text:
                path.with_suffix(".tmp").write_text(text)
                path.with_suffix(".tmp").replace(path)  # atomic: Prometheus never reads half a file

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.refresh()
            except Exception as err:  # the API server going away at teardown; keep the last targets
                print(f"kubernetes targets: {err}")

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

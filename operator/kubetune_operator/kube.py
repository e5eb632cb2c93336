"""The operator's API calls: a small dict-in, dict-out client over the `kubernetes` package's ApiClient
(in-cluster config, else $KUBECONFIG), plus observing one FineTuneJob's children and scraping its trainer.
"""

from __future__ import annotations

import functools
import json
import urllib.request

import kubernetes

from .children import LABEL_COMPONENT, LABEL_JOB, Names
from .reconcile import Decision, Observed, rank0_pod
from .status import parse_trainer_metrics


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api = api_client

    @classmethod
    def from_environment(cls) -> Kube:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        return cls(kubernetes.client.ApiClient())

    def call(self, method: str, path: str, body=None, query=None, content_type="application/json"):
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()),
            header_params=headers, body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(method, url, headers, body, _request_timeout=30)
        data = resp.read()
        if resp.status >= 400:
            raise ApiError(resp.status, data.decode(errors="replace"))
        return json.loads(data) if data else None

    def get(self, path: str) -> dict | None:
        try:
            return self.call("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, path: str, selector: str) -> list[dict]:
        return self.call("GET", path, query={"labelSelector": selector})["items"]

    def create(self, obj: dict) -> bool:
        """Create; False when it already exists (names are deterministic, so never a duplicate)."""
        try:
            self.call("POST", collection_path(obj), obj)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    def merge_patch(self, obj_path: str, patch: dict) -> dict:
        return self.call("PATCH", obj_path, patch, content_type="application/merge-patch+json")


def collection_path(obj: dict) -> str:
    api = obj["apiVersion"]
    prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
    return f"{prefix}/namespaces/{obj['metadata']['namespace']}/{obj['kind'].lower()}s"


def object_path(obj: dict) -> str:
    return f"{collection_path(obj)}/{obj['metadata']['name']}"


def _path(api: str, kind: str, namespace: str, name: str) -> str:
    return object_path({"apiVersion": api, "kind": kind, "metadata": {"namespace": namespace, "name": name}})


def owned_by(obj: dict | None, uid: str) -> dict | None:
    """The object if its controller is this FineTuneJob, else None (a leftover of a deleted namesake)."""
    refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
    return obj if any(r.get("uid") == uid and r.get("controller") for r in refs) else None


def scrape(ip: str, port: int, job_name: str, timeout: float = 3.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=timeout) as resp:  # noqa: S310
            return parse_trainer_metrics(resp.read().decode(), job_name)
    except (OSError, ValueError):
        return None


def observe(kube: Kube, body: dict, metrics_port: int | None) -> Observed:
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    names = Names(name)

    def pods_of(job: dict | None, component: str) -> list[dict]:
        if job is None:
            return []
        pods = kube.list(f"/api/v1/namespaces/{ns}/pods", f"{LABEL_JOB}={name},{LABEL_COMPONENT}={component}")
        return [p for p in pods if owned_by(p, job["metadata"]["uid"])]

    o = Observed(
        config_map=owned_by(kube.get(_path("v1", "ConfigMap", ns, names.config_map)), uid),
        validation_job=owned_by(kube.get(_path("batch/v1", "Job", ns, names.validation)), uid),
        service=owned_by(kube.get(_path("v1", "Service", ns, names.service)), uid),
        training_job=owned_by(kube.get(_path("batch/v1", "Job", ns, names.training)), uid),
    )
    o.validation_pods = pods_of(o.validation_job, "validation")
    o.training_pods = pods_of(o.training_job, "workers")
    rank0 = rank0_pod(o.training_pods)
    if rank0 and metrics_port:
        o.trainer_metrics = scrape(rank0["status"]["podIP"], metrics_port, name)
    return o


def act(kube: Kube, meta: dict, decision: Decision) -> list[str]:
    """Apply a Decision's child changes; returns what it created, for events."""
    created = []
    for obj in decision.create:
        if kube.create(obj):
            created.append(f"{obj['kind']} {obj['metadata']['name']}")
    for obj in decision.update:
        kube.merge_patch(object_path(obj), {"data": obj["data"]})
    if decision.suspend_training is not None:
        job = _path("batch/v1", "Job", meta["namespace"], Names(meta["name"]).training)
        kube.merge_patch(job, {"spec": {"suspend": decision.suspend_training}})
    return created


@functools.cache
def client() -> Kube:
    return Kube.from_environment()


"""The operator's API calls: a small dict-in, dict-out client over the `kubernetes` package's ApiClient
(in-cluster config, else $KUBECONFIG), and applying a Decision: children first, then the status (guarded by
the FineTuneJob's resourceVersion), then what may only happen once the status holds the outcome.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator

import kubernetes
from kubetune_api import Reason

from . import GROUP, PLURAL, VERSION
from .children import JOB_FINALIZER, Names
from .reconcile import Decision

POOL_SIZE = 16  # connections: one per reconcile thread (loop.THREADS)


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        self.status, self.body = status, body
        try:
            self.message = json.loads(body).get("message") or body
        except (ValueError, AttributeError):
            self.message = body
        self.message = str(self.message)[:1000]
        super().__init__(f"HTTP {status}: {self.message}")


class Refused(Exception):
    """The API server refused to create a child (4xx other than 404/409)."""

    def __init__(self, obj: dict, error: ApiError):
        super().__init__(str(error))
        self.obj, self.status, self.message = obj, error.status, error.message


class Conflict(Exception):
    """A child's name is taken by an object this FineTuneJob does not own."""

    def __init__(self, obj: dict, owner: str):
        super().__init__(f"{obj['kind']} {obj['metadata']['name']}: {owner}")
        self.obj, self.owner = obj, owner


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api = api_client

    @classmethod
    def from_environment(cls) -> Kube:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        config = kubernetes.client.Configuration.get_default_copy()
        config.connection_pool_maxsize = POOL_SIZE
        return cls(kubernetes.client.ApiClient(config))

    def call(self, method: str, path: str, body=None, query=None, content_type="application/json",
             timeout: float = 30):
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()),
            header_params=headers, body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(method, url, headers, body, _request_timeout=timeout)
        data = resp.read()
        if resp.status >= 400:
            raise ApiError(resp.status, data.decode(errors="replace"))
        return json.loads(data) if data else None

    def watch(self, path: str, query: dict, timeout: float,
              opened: Callable[[Callable[[], None]], None] = lambda shutdown: None) -> Iterator[dict]:
        """A WATCH of `path`: its events, one dict each, as the API server streams them, until it ends the watch
        (its timeoutSeconds) or nothing arrives for `timeout` seconds (urllib3's read timeout). An error before
        the stream raises ApiError; one in it is an event of type ERROR (410 Gone among them). `opened` is given
        a function that ends the stream from another thread (a read blocked in it returns)."""
        headers = {"Accept": "application/json"}
        _, url, headers, _, _ = self.api.param_serialize(
            method="GET", resource_path=path, query_params=[*query.items(), ("watch", "true")],
            header_params=headers, auth_settings=["BearerToken"])
        resp = self.api.call_api("GET", url, headers, _request_timeout=(10, timeout))
        if resp.status >= 400:
            raise ApiError(resp.status, resp.read().decode(errors="replace"))
        stream, pending = resp.response, b""
        opened(stream.shutdown)
        try:
            for chunk in stream.stream(amt=None, decode_content=True):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:  # closed, not returned to the pool: it may hold the rest of the stream
            stream.close()
            stream.release_conn()

    def get(self, path: str) -> dict | None:
        try:
            return self.call("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: dict, uid: str) -> dict | None:
        """Create a child of the FineTuneJob `uid`: the new object, or None when ours already exists (names
        are deterministic, so never a duplicate). Raises Refused or Conflict."""
        try:
            return self.call("POST", collection_path(obj), obj)
        except ApiError as e:
            if e.status == 409:
                found = self.get(object_path(obj))
                if found is None or owned_by(found, uid):
                    return None
                refs = found["metadata"].get("ownerReferences") or []
                owner = ", ".join(f"owned by {r['kind']} {r['name']}" for r in refs) or "it has no owner"
                raise Conflict(obj, owner) from e
            if 400 <= e.status < 500 and e.status != 404:
                raise Refused(obj, e) from e
            raise

    def delete(self, obj: dict) -> None:
        try:
            self.call("DELETE", object_path(obj), {"propagationPolicy": "Background"})
        except ApiError as e:
            if e.status != 404:
                raise

    def release(self, obj: dict) -> None:
        """Remove JOB_FINALIZER, with a test of its position so that no other finalizer is touched."""
        finalizers = obj["metadata"].get("finalizers") or []
        if JOB_FINALIZER not in finalizers:
            return
        i = finalizers.index(JOB_FINALIZER)
        patch = [{"op": "test", "path": f"/metadata/finalizers/{i}", "value": JOB_FINALIZER},
                 {"op": "remove", "path": f"/metadata/finalizers/{i}"}]
        try:
            self.call("PATCH", object_path(obj), patch, content_type="application/json-patch+json")
        except ApiError as e:
            if e.status not in (404, 422):  # gone, or the list moved (the next event retries)
                raise

    def admission_policy(self, binding: str) -> str | None:
        """Since when (RFC 3339) the ValidatingAdmissionPolicyBinding `binding` and its policy have been as they
        are, if the binding exists and denies: FineTuneJobs created after that were checked by the API server
        against their author's permissions (policy.py). None: no such binding, or one the operator may not read."""
        if not binding:
            return None
        try:
            found = self.get(f"{ADMISSION}/validatingadmissionpolicybindings/{binding}")
            spec = (found or {}).get("spec") or {}
            name = spec.get("policyName")
            policy = name and self.get(f"{ADMISSION}/validatingadmissionpolicies/{name}")
        except ApiError as e:
            if e.status == 403:
                return None
            raise
        if not policy or "Deny" not in (spec.get("validationActions") or []):
            return None
        return max(_last_change(found), _last_change(policy))

    def finetunejobs(self, namespace: str) -> list[dict]:
        """Every FineTuneJob the operator may list: in every namespace (an operator serving all of them), else in
        `namespace` (an operator given its namespaces may list only those)."""
        base = f"/apis/{GROUP}/{VERSION}"
        try:
            return self.call("GET", f"{base}/{PLURAL}").get("items") or []
        except ApiError as e:
            if e.status != 403:
                raise
        return self.call("GET", f"{base}/namespaces/{namespace}/{PLURAL}").get("items") or []

    def serves(self, api_version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in `api_version` (discovery, readable by every user)."""
        found = self.get(f"/apis/{api_version}")
        return any(r.get("name") == plural for r in (found or {}).get("resources") or [])

    def merge_patch(self, obj_path: str, patch: dict) -> dict:
        return self.call("PATCH", obj_path, patch, content_type="application/merge-patch+json")

    def patch_status(self, body: dict, changes: dict) -> dict:
        """Merge-patch status keys, only if the FineTuneJob is still at the resourceVersion the decision was
        made from (else ApiError 409: a stale copy never overwrites a newer decision)."""
        meta = body["metadata"]
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": changes}
        return self.merge_patch(object_path(body) + "/status", patch)


ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def _last_change(obj: dict) -> str:
    """When an object was last written: its newest managedFields entry, else its creation (RFC 3339, UTC, so
    the strings order as the times do)."""
    meta = obj["metadata"]
    return max([m["time"] for m in meta.get("managedFields") or [] if m.get("time")] + [meta["creationTimestamp"]])


def collection_path(obj: dict) -> str:
    api = obj["apiVersion"]
    prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
    kind = obj["kind"].lower()
    plural = f"{kind[:-1]}ies" if kind.endswith("y") else f"{kind}s"  # NetworkPolicy: networkpolicies
    return f"{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}"


def object_path(obj: dict) -> str:
    return f"{collection_path(obj)}/{obj['metadata']['name']}"


def _path(api: str, kind: str, namespace: str, name: str) -> str:
    return object_path({"apiVersion": api, "kind": kind, "metadata": {"namespace": namespace, "name": name}})


def training_job_path(meta: dict, attempt: int) -> str:
    return _path("batch/v1", "Job", meta["namespace"], Names(meta["name"]).training(attempt))


def _job_path(meta: dict, name: str) -> str:
    return _path("batch/v1", "Job", meta["namespace"], name)


def owned_by(obj: dict | None, uid: str) -> dict | None:
    """The object if its controller is this FineTuneJob, else None (a leftover of a deleted namesake)."""
    refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
    return obj if any(r.get("uid") == uid and r.get("controller") for r in refs) else None


def act(kube: Kube, meta: dict, decision: Decision) -> list[dict]:
    """Apply a Decision's child changes (before the status); returns the objects it created."""
    created = []
    for obj in decision.create:
        new = kube.create(obj, meta["uid"])
        if new:
            created.append(new)
    for obj in decision.update:
        kube.merge_patch(object_path(obj), {"data": obj["data"]})
    if decision.suspend_training is not None:
        kube.merge_patch(_job_path(meta, decision.training_job), {"spec": {"suspend": decision.suspend_training}})
    if decision.workload_patch:
        workload, patch = decision.workload_patch
        kube.merge_patch(object_path(workload), patch)
    if decision.training_spec:
        try:
            kube.merge_patch(_job_path(meta, decision.training_job), {"spec": decision.training_spec})
        except ApiError as e:
            if e.status != 422:
                raise
            decision.events.append(("Warning", Reason.RunPolicyNotApplied,
                                    f"the training Job did not take the runPolicy change: {e.message}"))
    return created


def after_status(kube: Kube, decision: Decision) -> None:
    """What may only happen once the status holds the outcome: delete finished validation Jobs, release
    deleted training Jobs."""
    for obj in decision.delete:
        kube.delete(obj)
    for obj in decision.release:
        kube.release(obj)


@functools.cache
def client() -> Kube:
    return Kube.from_environment()

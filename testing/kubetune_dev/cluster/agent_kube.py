"""A small dict-in, dict-out REST client for the node agent.

The generated `kubernetes` client validates bodies against its models; the agent builds plain JSON
(status patches, TokenRequests, Leases), so it talks to the API server through `ApiClient.call_api`
with the kubeconfig's credentials and gets dicts back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import kubernetes
from kubernetes.watch.watch import iter_resp_lines


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class Kube:
    def __init__(self, kubeconfig: str):
        self.api_client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        self.host = self.api_client.configuration.host

    def _send(self, method, path, body=None, query=None, content_type="application/json", timeout=30):
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self.api_client.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()),
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )
        return self.api_client.call_api(method, url, headers, body, _request_timeout=timeout)

    def call(self, method: str, path: str, body=None, query=None, content_type="application/json"):
        resp = self._send(method, path, body, query, content_type)
        data = resp.read()
        if resp.status >= 400:
            raise ApiError(resp.status, data.decode(errors="replace"))
        return json.loads(data) if data else None

    def get(self, path: str, **query):
        return self.call("GET", path, query=query)

    def create(self, path: str, body: dict):
        return self.call("POST", path, body)

    def replace(self, path: str, body: dict):
        return self.call("PUT", path, body)

    def patch(self, path: str, body: dict, strategic: bool = False):
        """JSON merge patch (lists are replaced as a whole); `strategic`: a strategic merge patch, which merges
        lists such as a pod's conditions by their key (built-in kinds only)."""
        kind = "strategic-merge-patch" if strategic else "merge-patch"
        return self.call("PATCH", path, body, content_type=f"application/{kind}+json")

    def delete(self, path: str, body: dict | None = None):
        return self.call("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_s: int = 60) -> Iterator[dict]:
        """Yield watch events ({"type": ..., "object": {...}}) until the server closes the stream."""
        query = {"watch": "true", "resourceVersion": resource_version, "timeoutSeconds": str(timeout_s),
                 "allowWatchBookmarks": "true"}
        resp = self._send("GET", path, query=query, timeout=(10, timeout_s + 10))
        if resp.status >= 400:
            raise ApiError(resp.status, resp.read().decode(errors="replace"))
        try:
            for line in iter_resp_lines(resp.response):
                if line:
                    yield json.loads(line)
        finally:
            resp.response.release_conn()

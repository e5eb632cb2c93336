"""Pytest fixtures for the local control plane.

Register them in a test module: `pytest_plugins = ["kubetune_dev.cluster.pytest_plugin"]`. Not by importing
the fixtures: an imported `control_plane` is a second session fixture of that name, and so a second control
plane, running beside the first until the session ends.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from .controlplane import ControlPlane
from .kueue import Kueue


@pytest.fixture(scope="session")
def control_plane(request, tmp_path_factory):
    """One control plane for the whole session. Missing binaries fail (not skip): run `make control-plane`."""
    cp = ControlPlane(keep=True)  # the work dir is removed below, after saving the logs on failure
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()
        if request.session.testsfailed and cp.logs.is_dir():
            saved = tmp_path_factory.getbasetemp() / "control-plane-logs"
            shutil.copytree(cp.logs, saved, dirs_exist_ok=True)
            print(f"\ncontrol-plane logs kept in {saved}")
        shutil.rmtree(cp.workdir, ignore_errors=True)


@pytest.fixture
def namespace(control_plane):
    """A fresh namespace, deleted (without waiting) after the test."""
    from kubernetes import client

    name = f"test-{uuid.uuid4().hex[:8]}"
    with control_plane.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        yield name
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture(scope="module")
def kueue(request, control_plane, tmp_path_factory):
    """The real Kueue against the session's control plane, for one test module (its webhooks go with it, so other
    modules' Jobs never depend on it; its CRDs stay). Missing binaries fail: run `make kueue`. Its log is kept in
    <pytest basetemp>/kueue-logs/ when a test failed."""
    k = Kueue(control_plane.kubeconfig)
    k.start()
    try:
        yield k
    finally:
        k.stop(keep_log=tmp_path_factory.getbasetemp() / "kueue-logs" if request.session.testsfailed else None)

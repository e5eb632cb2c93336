"""Pytest fixture: a process node agent attached to the session's local control plane.

Use it from a test module with `pytest_plugins = ["kubetune_dev.cluster.pytest_plugin",
"kubetune_dev.cluster.agent_fixtures"]`. Not by importing `node_agent`: that defines a second session fixture of
the name, so a second node agent for that module.
"""

from __future__ import annotations

import pytest

from .agent import GPU, NodeAgent

NODE_NAME = "kubetune-node"
NODE_GPUS = 2


@pytest.fixture(scope="session")
def node_agent(control_plane, tmp_path_factory):
    """One Node (`kubetune-node`, 8 CPUs, 32Gi, 2 `nvidia.com/gpu`) whose pods run as local processes."""
    agent = NodeAgent(
        str(control_plane.kubeconfig),
        node_name=NODE_NAME,
        capacity={"cpu": "8", "memory": "32Gi", "pods": "110", GPU: str(NODE_GPUS)},
        labels={"kubetune.io/node-agent": "process"},
        state_dir=str(tmp_path_factory.mktemp("node-agent")),
        backoff_s=1.0,
    )
    agent.start(timeout=120)
    yield agent
    agent.stop()

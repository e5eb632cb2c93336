"""Tests against a real local control plane (`make control-plane` builds its binaries)."""

from kubetune_dev.cluster.pytest_plugin import control_plane, namespace  # noqa: F401 (fixtures)

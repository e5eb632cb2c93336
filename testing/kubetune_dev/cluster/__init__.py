"""A local Kubernetes cluster for tests and demos: a real control plane built from upstream sources
(`controlplane`) and a node agent that runs pods as local processes (`agent`)."""

from .controlplane import ControlPlane, ControlPlaneError, find_bin_dir

__all__ = ["ControlPlane", "ControlPlaneError", "find_bin_dir"]

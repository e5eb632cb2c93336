"""Kubetune's Grafana dashboard (generated from code) and its alerts as a plain rules file.

`kubetune_dashboard.panel_queries()` lists every panel query (`substitute()` fills in the variables) for tests
against a real Prometheus. The dashboard needs grafana-foundation-sdk; it is imported on first use, so
`kubetune_dashboard.alerts` works without it.
"""

from __future__ import annotations

import importlib

__all__ = ["Query", "build", "panel_queries", "substitute", "to_json"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("kubetune_dashboard.dashboard"), name)
    raise AttributeError(f"module 'kubetune_dashboard' has no attribute {name!r}")

"""Registers the `e2e` marker used by test_e2e.py (the fixtures come from kubetune_dev.cluster's plugins)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: the operator end to end against the local control plane")

"""Fixtures for tests that need S3: an embedded server for the session, a fresh bucket, a fault proxy.

A test module that uses them declares `pytest_plugins = ["tests.s3fixtures"]`.
"""

from __future__ import annotations

import uuid

import pytest
from kubetune_dev.s3server import S3Server

from tests.faults import FaultProxy


@pytest.fixture(scope="session")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint) as p:
        yield p

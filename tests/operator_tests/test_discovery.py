"""Kueue found live (discovery.follow) against a fake discovery: each change is noticed and handed to kopf once,
an unreachable API server is asked again later, never taken for an answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from kubetune_operator import discovery, kube


class Done(BaseException):
    """No more answers: ends the test's loop (follow retries every Exception)."""


class FakeDiscovery:
    def __init__(self, answers: list):
        self.answers = answers

    def serves(self, api_version: str, plural: str) -> bool:
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            raise Done
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_kueue_appearing_and_disappearing_is_noticed(monkeypatch):
    revised, delays = [], []
    real_sleep = asyncio.sleep

    async def sleep(seconds):
        delays.append(seconds)
        await real_sleep(0)

    async def revise(view, settings):
        revised.append(discovery.served())

    fake = FakeDiscovery([False, True, True, OSError("refused"), False])
    monkeypatch.setattr(kube, "client", lambda: fake)
    monkeypatch.setattr(discovery, "_revise", revise)
    async def to_thread(call, *args):
        return call(*args)

    monkeypatch.setattr(discovery, "asyncio", SimpleNamespace(sleep=sleep, to_thread=to_thread))
    discovery.found(False)
    with pytest.raises(Done):
        asyncio.run(discovery.follow(discovery.new_view(), None))
    assert revised == [False, True]  # kopf's view revised once per change (before the flag follows it)
    assert delays == [10, 10, 10, 10, 20, 10]  # after an error, a longer wait; then back to the usual one
    assert discovery.served() is False

"""Rank 0's /metrics, scraped as its own bounded activity: one request at a time per FineTuneJob, a total
deadline and a size cap, every exception caught, so a slow or hostile endpoint can neither hold the
reconcile nor grow the operator's memory."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from kubetune_api import OPERATOR_SCRAPER

from .progress import parse_trainer_metrics
from .settings import SCRAPE_SECONDS

TIMEOUT_SECONDS = 3.0
MAX_BYTES = 1 << 20
_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}  # one per event loop (the operator has one)


def _client() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = _sessions[loop] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS),
                                                          headers={"User-Agent": OPERATOR_SCRAPER})
    return session


async def fetch(url: str, job_name: str) -> dict:
    """The parsed metrics; raises on anything else (slow, too big, not Prometheus text)."""
    data = bytearray()
    async with _client().get(url) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > MAX_BYTES:
                raise ValueError(f"more than {MAX_BYTES} bytes")
    return await asyncio.to_thread(parse_trainer_metrics, bytes(data).decode(), job_name)


class Scraper:
    """Scrapes `target` (an URL, set by the reconcile while rank 0 runs) every `seconds` (the operator's
    KUBETUNE_SCRAPE_SECONDS, by default SCRAPE_SECONDS), then wakes the reconcile. `metrics` is the last good
    result while it is fresh; `failures` counts failures in a row."""

    def __init__(self, job_name: str, wake: asyncio.Event, seconds: float = SCRAPE_SECONDS):
        self.job_name, self.wake, self.seconds = job_name, wake, seconds
        self.target: str | None = None
        self.metrics: dict | None = None
        self.failures, self.error, self.at = 0, None, 0.0

    def fresh(self) -> dict | None:
        ok = self.failures == 0 and time.monotonic() - self.at < 3 * self.seconds
        return self.metrics if ok else None

    async def run(self) -> None:
        while True:
            target = self.target
            if target:
                await self.once(target)
                self.wake.set()
            await asyncio.sleep(self.seconds)

    async def once(self, url: str) -> None:
        try:
            self.metrics = await asyncio.wait_for(fetch(url, self.job_name), TIMEOUT_SECONDS + 1)
            self.failures, self.error, self.at = 0, None, time.monotonic()
        except Exception as e:  # noqa: BLE001 -- any failure of a remote endpoint is a failed scrape
            self.failures += 1
            self.error = f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__

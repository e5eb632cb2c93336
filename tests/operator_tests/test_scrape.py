"""Scraping rank 0 is bounded: an endpoint that never answers, trickles bytes or sends too much cannot hold
the scraper past its deadline or grow the operator's memory, and every failure is counted, not raised."""

from __future__ import annotations

import asyncio

import pytest
from kubetune_operator import scrape
from kubetune_trainer.metrics import TrainerMetrics
from prometheus_client import generate_latest

GOOD = generate_latest(TrainerMetrics("demo", "lora", "s3://m/").registry)


async def _serve(behaviour: str):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            if behaviour == "silent":
                await asyncio.sleep(60)
            elif behaviour == "trickle":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                for _ in range(600):
                    writer.write(b"#")
                    await writer.drain()
                    await asyncio.sleep(0.1)
            elif behaviour == "huge":
                size = 8 * scrape.MAX_BYTES
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                writer.write(b"# " + b"x" * (size - 2))
                await writer.drain()
            elif behaviour == "garbage":
                body = b"\xff\xfe not prometheus {{{"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(GOOD), GOOD))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"


@pytest.mark.parametrize("behaviour", ["silent", "trickle", "huge", "garbage"])
def test_a_hostile_endpoint_is_a_counted_failure_within_the_deadline(behaviour):
    async def main():
        server, url = await _serve(behaviour)
        scraper = scrape.Scraper("demo", asyncio.Event())
        try:
            await asyncio.wait_for(scraper.once(url), scrape.TIMEOUT_SECONDS + 3)  # bounded, never raises
        finally:
            server.close()
        return scraper

    scraper = asyncio.run(main())
    assert scraper.failures == 1 and scraper.error and scraper.fresh() is None


def test_a_good_endpoint_is_parsed_and_fresh():
    async def main():
        server, url = await _serve("good")
        scraper = scrape.Scraper("demo", asyncio.Event())
        try:
            await scraper.once(url)
        finally:
            server.close()
        return scraper

    scraper = asyncio.run(main())
    assert scraper.failures == 0 and scraper.fresh()["phase"] == "downloading"

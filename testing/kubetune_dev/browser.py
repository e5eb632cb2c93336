"""A real headless Chromium for the tests of HTML pages (`kubetune report`): Debian's `chromium` package
(hack/install-system-deps), started by the test with its own temporary profile, driven over the DevTools protocol
(websocket-client), and stopped by its PID.

    with Chromium.start() as browser:
        visit = browser.visit(Path("report.html"), {"images": "document.images.length"})
        visit.errors, visit.requests, visit.answers["images"], visit.screenshot
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket

INSTALL_HINT = "install Debian's chromium package: hack/install-system-deps (make system-deps), as root"


@dataclass
class Visit:
    """What one page load showed: the console's and the page's errors, every request the page made, the values of
    the expressions asked of its DOM, and a screenshot of the whole page (PNG bytes)."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    answers: dict[str, object] = field(default_factory=dict)
    screenshot: bytes = b""


class Chromium:
    def __init__(self, process: subprocess.Popen, profile: Path, port: int):
        self.process, self.profile, self.port = process, profile, port
        self._ids = itertools.count(1)

    @classmethod
    @contextlib.contextmanager
    def start(cls, timeout: float = 30):
        binary = shutil.which("chromium")
        if binary is None:
            raise FileNotFoundError(f"chromium not found: {INSTALL_HINT}")
        profile = Path(tempfile.mkdtemp(prefix="kubetune-chromium-"))
        command = [binary, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                   "--disable-extensions", "--disable-background-networking", "--disable-sync",
                   "--disable-component-update", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                   f"--user-data-dir={profile}", "--window-size=1280,1024", "about:blank"]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
        log = (profile / "chromium.log").open("wb")  # a file, not a pipe: a full pipe would block the browser
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        try:
            port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
            while not (port_file.is_file() and port_file.read_text().strip()):
                if process.poll() is not None or time.monotonic() > deadline:
                    problem = (profile / "chromium.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"chromium did not start: {problem}")
                time.sleep(0.1)
            yield cls(process, profile, int(port_file.read_text().split()[0]))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # its own session: the browser and its helpers
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
            shutil.rmtree(profile, ignore_errors=True)

    def visit(self, page: Path, ask: dict[str, str], timeout: float = 30) -> Visit:
        """Load `page` in the open tab, wait for its load event, then evaluate each JavaScript expression of `ask`
        in it and take the screenshot."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as reply:
            (tab,) = [t for t in json.load(reply) if t["type"] == "page"]
        ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        visit, events = Visit(), []

        def call(method: str, **params):
            ident = next(self._ids)
            ws.send(json.dumps({"id": ident, "method": method, "params": params}))
            while True:
                message = json.loads(ws.recv())
                if message.get("id") == ident:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})
                events.append(message)

        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                call(f"{domain}.enable")
            call("Log.clear")  # an earlier visit's entries, which enabling the domains replays
            call("Runtime.discardConsoleEntries")
            events.clear()
            call("Page.navigate", url=page.resolve().as_uri())
            deadline = time.monotonic() + timeout
            while not any(m.get("method") == "Page.loadEventFired" for m in events):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{page}: no load event in {timeout} s")
                events.append(json.loads(ws.recv()))
            call("Runtime.evaluate", expression="new Promise(r => setTimeout(r, 300))", awaitPromise=True)

            for name, expression in ask.items():
                result = call("Runtime.evaluate", expression=expression, returnByValue=True)
                if "exceptionDetails" in result:
                    raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
                visit.answers[name] = result["result"].get("value")
            metrics = call("Page.getLayoutMetrics")["cssContentSize"]
            visit.screenshot = base64.b64decode(call(
                "Page.captureScreenshot", format="png", captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1})["data"])
        finally:
            ws.close()
        for m in events:
            method, params = m.get("method"), m.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                visit.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                visit.errors.append(str(params["exceptionDetails"].get("text")))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                visit.errors.append(params["entry"]["text"])
            elif method == "Network.requestWillBeSent":
                visit.requests.append(params["request"]["url"])
        return visit

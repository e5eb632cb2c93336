"""A fault-injecting HTTP proxy on loopback, put between boto3 (endpoint_url=proxy.endpoint) and a server.

    with FaultProxy(s3.endpoint) as proxy:
        proxy.inject("GET", "big.bin", "truncate", times=2)   # the next 2 GETs of a path containing big.bin
        proxy.inject("PUT", "partNumber=2", "status", status=503)
        proxy.inject("*", "", "delay", delay=2.0, times=None)  # every request, forever
        proxy.inject("PUT", "step-00000004/manifest.json", "hold")  # parks the request until clear()

Kinds: "status" answers `status` with an S3 error document without forwarding; "drop" closes the connection
without an answer; "delay" waits `delay` seconds, then forwards; "truncate" forwards, then sends the full
Content-Length but only half the body and closes; "corrupt" forwards and flips one byte of the body;
"hold" keeps the request waiting until clear() (or `delay` seconds, when set), then closes the connection
without forwarding it, so a client that is stopped meanwhile never reaches the server.
`match` is a substring of the request path and query; times=None means every matching request.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "expect",
              "content-length"}
ERROR_CODES = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "SlowDown"}


@dataclass
class Fault:
    method: str
    match: str
    kind: str
    times: int | None = 1
    status: int = 500
    delay: float = 0.0
    hits: int = 0
    released: threading.Event = field(default_factory=threading.Event)  # ends a "hold"


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault kind or "")
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def inject(self, method: str, match: str, kind: str, *, times: int | None = 1, status: int = 500,
               delay: float = 0.0) -> Fault:
        assert kind in ("status", "drop", "delay", "truncate", "corrupt", "hold"), kind
        fault = Fault(method.upper(), match, kind, times, status, delay)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            for fault in self.faults:
                fault.released.set()
            self.faults.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.method in ("*", method) and f.match in path and (f.times is None or f.hits < f.times):
                    f.hits += 1
                    self.log.append((method, path, f.kind))
                    return f
            self.log.append((method, path, ""))
        return None

    def start(self) -> FaultProxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.clear()  # no request stays on hold
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and answers Expect: 100-continue itself

        def log_message(self, *args) -> None:
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return body
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._read_body()
            fault = proxy._take(self.command, self.path)
            kind = fault.kind if fault else ""
            if kind == "hold":
                fault.released.wait(fault.delay or None)
            if kind in ("drop", "hold"):
                self.close_connection = True
                return
            if kind == "status":
                code = ERROR_CODES.get(fault.status, "InjectedError")
                self._send(fault.status, [("Content-Type", "application/xml")],
                           f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode())
                return
            if kind == "delay":
                time.sleep(fault.delay)
            status, headers, data = self._forward(body)
            if kind == "corrupt" and data:
                i = len(data) // 2
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
            try:
                self._send(status, headers, data, truncate=kind == "truncate")
            except OSError:
                self.close_connection = True  # the client gave up (a delay past its read timeout)

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
                if self.command == "HEAD":  # no body, but the object's length
                    kept.append(("Content-Length", resp.getheader("Content-Length", "0")))
                return resp.status, kept, data
            finally:
                conn.close()

        def _send(self, status: int, headers: list[tuple[str, str]], data: bytes, truncate: bool = False):
            self.send_response_only(status)
            for k, v in headers:
                self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data[: len(data) // 2] if truncate else data)
            self.wfile.flush()
            if truncate:
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler

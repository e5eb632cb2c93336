"""An embedded S3-protocol server on loopback (moto's server mode), for the demo, the dev cluster and tests.

    with S3Server() as s3:          # http://127.0.0.1:<free port>
        s3.create_bucket("models")
        Storage(StorageEndpoint(endpoint=s3.endpoint)).upload_file(...)

    python -m kubetune_dev.s3server --port 9000 --buckets models,data,outputs

It sets placeholder credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) for in-process clients when none
are set; moto accepts any. State lives in this process's memory (and is shared by every server in it).
Set KUBETUNE_S3_ENDPOINT to use a real S3-compatible endpoint instead (see endpoint_from_env).

Conditional writes (If-None-Match: *, If-Match) are atomic here as on AWS S3: moto checks the condition and
then stores the object in two steps, so the server runs each object write or delete under one lock
(`_serialize_object_writes`); two clients racing to create the same key get one 200 and one 412.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "kubetune-local",
    "AWS_SECRET_ACCESS_KEY": "kubetune-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def endpoint_from_env() -> str | None:
    """The real S3-compatible endpoint named by KUBETUNE_S3_ENDPOINT, or None to use an embedded server."""
    return os.environ.get("KUBETUNE_S3_ENDPOINT") or None


_WRITE_LOCK = threading.RLock()


def _serialize_object_writes() -> None:
    """Make moto's check-then-store of conditional writes atomic: one object write or delete at a time (reads and
    the request bodies' transfer stay concurrent). Idempotent; process-wide, like moto's state."""
    from moto.s3.responses import S3Response

    for name in ("put_object", "copy_object", "delete_object"):
        method = getattr(S3Response, name, None)
        if method is None or getattr(method, "_kubetune_serialized", False):
            continue

        def serialized(self, *args, _method=method, **kwargs):
            with _WRITE_LOCK:
                return _method(self, *args, **kwargs)

        serialized._kubetune_serialized = True
        setattr(S3Response, name, serialized)


class S3Server:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, access_log: bool = False):
        self.host, self.port = host, port
        if not access_log:
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = None
        self._env_set: list[str] = []

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("S3Server is not started")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        if self.port:  # moto's thread would die silently and start() would wait forever
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.host, self.port))
                except OSError as e:
                    raise OSError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        _serialize_object_writes()
        server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        server.start()
        self._server = server
        self.port = server.get_host_and_port()[1]
        for name, value in FAKE_CREDENTIALS.items():
            if name not in os.environ:
                os.environ[name] = value
                self._env_set.append(name)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        for name in self._env_set:
            os.environ.pop(name, None)
        self._env_set = []

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"]),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY",
                                                 FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]),
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_dev.s3server",
                                     description="Run an in-memory S3-protocol server in the foreground.")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port (default 9000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--buckets", default="", help="comma-separated buckets to create")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    # Path-style requests only: moto otherwise takes the first label of a host name as the bucket, so a
    # client reaching this server by name (a Service such as minio.minio:9000) would get NoSuchBucket.
    os.environ.setdefault("S3_IGNORE_SUBDOMAIN_BUCKETNAME", "true")  # read when moto is imported

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with S3Server(port=args.port, host=args.host, access_log=args.access_log) as server:
        for bucket in filter(None, (b.strip() for b in args.buckets.split(","))):
            server.create_bucket(bucket)
        print(server.endpoint, flush=True)
        print(f"S3 server at {server.endpoint}; use any credentials, e.g. "
              + " ".join(f"{k}={v}" for k, v in FAKE_CREDENTIALS.items()) + "; Ctrl-C stops it",
              file=sys.stderr, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

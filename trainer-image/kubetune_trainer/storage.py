"""Object storage: `s3://bucket/key` URIs through boto3, and local paths (or `file://`) for local runs.

Credentials come from the standard AWS chain (env, web identity/IRSA, profile); they never appear in
config files or error messages. A custom endpoint (MinIO, Ceph, R2), the region and the addressing style
come from StorageEndpoint.

Integrity: uploads store the file's sha256 as object metadata (x-amz-meta-sha256) and are checked with a
HEAD (size, and the ETag when it is a plain MD5); downloads are checked against the size, that sha256 or
the plain-MD5 ETag. Truncated or corrupt transfers are retried as a whole, on top of botocore's own
retries. What still fails raises TransientError (retryable); a missing bucket or key, or a denied request,
raises ConfigError (permanent).

`publish` writes a folder under a prefix and manifest.json last: readers that trust only prefixes with a
manifest never see a half-written adapter or checkpoint.

Heartbeat: `with_heartbeat(metrics.beat)` gives a Storage that reports progress: after every S3 request and
local copy that succeeds, and (at most once a second) from boto3's transfer callback while the bytes of a large
file move. Storage that moves nothing never beats, so the operator can tell a hung upload from a slow one.

Run metadata: `with_run(uid)` gives a Storage whose uploads say which run made them (x-amz-meta-kubetune-run;
local files have no metadata, their manifests say it). `move_prefix` moves a prefix aside: a server-side copy
of every object, each verified, then the originals are deleted; nothing is deleted that was not copied.

Conditional writes (`put_json_if`, `get_json_etag`): a JSON document written only if it is absent
(`If-None-Match: *`) or still the version that was read (`If-Match` on its ETag), so that of two writers exactly
one wins; identity.py claims and commits an output prefix with them. AWS S3, MinIO and the project's S3 server
(moto, made atomic in kubetune_dev.s3server) honour both headers. Local paths (file://, pvc:// volumes) do the
same with a hard link (create only if absent) and an flock'd compare-and-replace; their ETag is the sha256 of
the bytes. A store that answers 501 NotImplemented falls back to read-compare-write (`conditional_writes` turns
False): a race between two writers is then caught by the later re-reads of the claim (docs/security.md).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TypeVar

from kubetune_api import StorageEndpoint

from . import redact
from .errors import ConfigError, KubetuneError, TransientError

MANIFEST = "manifest.json"
MiB = 1024 * 1024
_TMP_MARK = ".kubetune-tmp-"  # partial local files; never listed
T = TypeVar("T")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, posix
    size: int
    sha256: str


class _Corrupt(Exception):
    """A transfer arrived incomplete or did not match its checksum: retry it as a whole."""


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def sha256_file(path: Path) -> str:
    """The file's sha256 alone (no md5: that would take more than twice as long; a base model is many GB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ConfigError(f"{uri}: not a valid S3 URI; expected s3://bucket/key")
    return bucket, key


def _folder(prefix: str) -> str:
    """A prefix as a folder: 'a/b' and 'a/b/' both mean 'a/b/' (so 'a/b' never matches 'a/bc')."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


PVC_ROOT = "/mnt/pvc"  # where the operator mounts each claim of a job's pvc:// URIs ($KUBETUNE_PVC_ROOT/<claim>)


def local_path(uri: str) -> Path:
    """A `pvc://claim/path` URI (the claim's volume at $KUBETUNE_PVC_ROOT/claim, default /mnt/pvc), a `file://`
    URI or a plain path, as a local path: what every read and write of a non-s3:// URI goes through (output,
    checkpoint, cache and data alike). A pvc:// path never leads out of its claim's folder."""
    if not uri.startswith("pvc://"):
        return Path(uri.removeprefix("file://"))
    claim, _, rest = uri.removeprefix("pvc://").partition("/")
    if not claim or claim in (".", ".."):
        raise ConfigError(f"{uri}: not a valid pvc:// URI; expected pvc://claim/path")
    root = Path(os.environ.get("KUBETUNE_PVC_ROOT") or PVC_ROOT) / claim
    rest = rest.strip("/")
    return safe_join(root, rest, uri) if rest else root


_local = local_path


def safe_join(root: Path, rel: str, uri: str) -> Path:
    """root/rel for an object key (or a manifest's path) below a prefix: every key-to-path join goes through here.
    Refuses (ConfigError naming `uri`) what would land outside root: an absolute name, a '..' part, or a link
    on the way that points out."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or ".." in parts:
        raise ConfigError(f"{uri}: refusing object name {rel!r} (absolute, or contains '..'): it would be written "
                          "outside its folder; rename or remove the object")
    target = Path(root) / rel
    if not target.resolve().is_relative_to(Path(root).resolve()):
        raise ConfigError(f"{uri}: refusing object name {rel!r}: a link in the way leads out of its folder")
    return target


_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "AllAccessDisabled", "AccountProblem"}
_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeTooSkewed", "ExpiredToken", "RequestExpired",
                    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests"}


_ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,63}")  # an S3 error code: AccessDenied, SlowDown, 503


def reply_summary(error: dict, status: int) -> str:
    """What of an endpoint's error reply may reach a message (and so the FineTuneJob's status): the HTTP status
    and the S3 error code when it is a plain code word; never the reply's Message, or a Code of any other
    shape: the endpoint chooses them, and a status is read as Kubetune's word."""
    code = str(error.get("Code", ""))
    code = code if _ERROR_CODE.fullmatch(code) and code != str(status) else ""
    return " ".join(part for part in (f"HTTP {status}" if status else "", code) if part) or "no status"


def describe_error(exc: BaseException) -> str:
    """A boto3/botocore/s3transfer error in a few words of ours: the reply's status and code for an error reply,
    else the exception's type (EndpointConnectionError, ReadTimeoutError, ...), never its text."""
    from botocore.exceptions import ClientError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            status = int(seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return reply_summary(seen.response.get("Error", {}), status)
        seen = getattr(seen, "last_exception", None) or seen.__cause__ or seen.__context__
    inner = getattr(exc, "last_exception", None) or exc.__cause__ or exc
    return type(inner).__name__


def _classify(exc: BaseException, uri: str, action: str) -> KubetuneError:
    """Map a boto3/botocore/s3transfer error to ConfigError (permanent) or TransientError (retryable). The
    message names the action and the URI (so its bucket), and of the endpoint's reply only reply_summary()."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    seen = exc
    while seen is not None:  # s3transfer wraps the ClientError (S3UploadFailedError, RetriesExceededError)
        if isinstance(seen, KubetuneError):
            return seen
        if isinstance(seen, (NoCredentialsError, PartialCredentialsError)):
            return ConfigError(
                f"{action} {uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(storage.secretRef), a web identity token (IRSA) or AWS_PROFILE")
        if isinstance(seen, ClientError):
            error = seen.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = reply_summary(error, status)
            if code == "NoSuchBucket":
                return ConfigError(f"{action} {uri}: the bucket does not exist; create it or fix the URI")
            if code in _NOT_FOUND:
                return ConfigError(f"{action} {uri}: no such object; check the URI")
            if code in _DENIED:
                return ConfigError(f"{action} {uri}: access denied ({detail}); check the credentials "
                                   "(storage.secretRef or the service account's role) and the bucket policy")
            if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES:
                break
            return ConfigError(f"{action} {uri}: rejected by the storage service ({detail})")
        seen = getattr(seen, "last_exception", None) or seen.__cause__ or seen.__context__
    return TransientError(f"{action} {uri}: object storage failed after retries ({describe_error(exc)})")


class Storage:
    """Read and write s3:// URIs and local paths alike. Thread-safe; the S3 client is created on first use."""

    retry_backoff = 0.5  # seconds, doubled per attempt, for whole-object retries (tests make it small)
    heartbeat: Callable[..., None] | None = None  # TrainerMetrics.beat(min_interval=...); see with_heartbeat
    run: str | None = None  # the run whose objects this Storage writes (x-amz-meta-kubetune-run); see with_run
    conditional_writes = True  # False once the S3 store answered NotImplemented to If-None-Match/If-Match

    def __init__(
        self,
        endpoint: StorageEndpoint | None = None,
        *,
        max_attempts: int = 5,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        retry_mode: str = "standard",
    ):
        self.endpoint = endpoint or StorageEndpoint()
        self.max_attempts = max(1, max_attempts)
        self._timeouts = (connect_timeout, read_timeout)
        self._multipart = (multipart_threshold, multipart_chunksize)
        self.max_concurrency = max_concurrency
        self._retry_mode = retry_mode
        self._client = None
        self._lock = threading.Lock()

    def with_heartbeat(self, beat: Callable[..., None] | None) -> Storage:
        """A copy (sharing the client) that calls beat() per request or file done and beat(min_interval=1.0)
        while a transfer's bytes move; beat is TrainerMetrics.beat."""
        clone = copy.copy(self)
        clone.heartbeat = beat
        return clone

    def with_run(self, uid: str | None) -> Storage:
        """A copy (sharing the client) whose uploads carry the metadata kubetune-run=uid."""
        clone = copy.copy(self)
        clone.run = uid
        return clone

    def _metadata(self, sha256: str) -> dict[str, str]:
        return {"sha256": sha256, **({"kubetune-run": self.run} if self.run else {})}

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat()

    def _progress(self) -> Callable[[int], None] | None:
        """boto3's transfer Callback (called per chunk of bytes moved, from its worker threads): rate-limited beats."""
        beat = self.heartbeat
        return None if beat is None else (lambda _bytes: beat(min_interval=1.0))

    # -- S3 plumbing ---------------------------------------------------------------------------------

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self):
        import boto3
        from botocore.config import Config

        ep = self.endpoint
        custom = any([ep.endpoint, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL")])
        style = "path" if custom and ep.addressing_style == "auto" else ep.addressing_style
        options = {}
        if custom:  # MinIO/Ceph/R2 do not all accept the flexible (CRC) checksums newer botocore sends
            options = {"request_checksum_calculation": "when_required",
                       "response_checksum_validation": "when_required"}
        config = Config(
            region_name=ep.region,
            connect_timeout=self._timeouts[0],
            read_timeout=self._timeouts[1],
            retries={"mode": self._retry_mode, "total_max_attempts": self.max_attempts},
            # 'auto' against a custom endpoint means path style: what MinIO and Ceph expect
            s3={"addressing_style": style},
            max_pool_connections=max(10, self.max_concurrency**2),  # files in parallel, each in parts
            **options,
        )
        session = boto3.session.Session()
        client = session.client("s3", endpoint_url=ep.endpoint or None, config=config)
        redact.watch(session.get_credentials())  # keys from no environment variable (a web identity) too
        return client

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self._multipart[0], multipart_chunksize=self._multipart[1],
            max_concurrency=self.max_concurrency, num_download_attempts=self.max_attempts,
            preferred_transfer_client="classic",
        )

    def _call(self, uri: str, action: str, fn: Callable[[], T]) -> T:
        """Run fn, retrying whole-object failures (truncated bodies, checksum mismatches); map errors."""
        from botocore.exceptions import IncompleteReadError, ResponseStreamingError

        for attempt in range(1, self.max_attempts + 1):
            try:
                result = fn()
                self._beat()
                return result
            except (_Corrupt, IncompleteReadError, ResponseStreamingError) as e:
                if attempt == self.max_attempts:
                    raise _classify(e, uri, action) from None
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            except KubetuneError:
                raise
            except Exception as e:
                if is_storage_error(e):
                    raise _classify(e, uri, action) from None
                raise
        raise AssertionError("unreachable")

    def _head(self, bucket: str, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND:
                return None
            raise

    def _keys(self, bucket: str, prefix: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return keys

    def _get_object(self, bucket: str, key: str, target: Path, head: dict | None = None) -> Path:
        """Download one object to target, verified; no retries of its own (see _call)."""
        head = head or self._head(bucket, key)
        if head is None:
            raise ConfigError(f"download s3://{bucket}/{key}: no such object; check the URI")
        size, expected_sha = head["ContentLength"], head.get("Metadata", {}).get("sha256")
        if expected_sha and target.is_file() and target.stat().st_size == size:
            if sha256_file(target) == expected_sha:
                return target  # already here, intact
        target.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(bucket, key, str(target), Callback=self._progress(),
                                  Config=self._transfer_config())
        try:
            _verify(target, size, expected_sha, _plain_md5(head))
        except _Corrupt:
            target.unlink(missing_ok=True)
            raise
        return target

    # -- the API -------------------------------------------------------------------------------------

    def download(self, uri: str, dest: Path) -> Path:
        """An object to dest/<basename> (returns the file); a prefix to dest/<relative paths> (returns dest).

        A local path is returned unchanged, without a copy."""
        dest = Path(dest)
        if not is_remote(uri):
            path = _local(uri)
            if not path.exists():
                raise ConfigError(f"{uri}: no such file or directory")
            return path
        bucket, key = _split(uri)
        if key and not key.endswith("/"):
            head = self._call(uri, "download", lambda: self._head(bucket, key))
            if head is not None:
                name = PurePosixPath(key).name
                return self._call(uri, "download", lambda: self._get_object(bucket, key, dest / name, head))
        prefix = _folder(key)
        keys = self._call(uri, "list", lambda: self._keys(bucket, prefix))
        if not keys:
            raise ConfigError(f"download {uri}: no object or prefix with that name; check the URI")

        def one(k: str) -> Path:
            target = safe_join(dest, k[len(prefix):], uri)
            return self._call(f"s3://{bucket}/{k}", "download", lambda: self._get_object(bucket, k, target))

        _parallel(one, keys, self.max_concurrency)
        return dest

    def upload_file(self, src: Path, uri: str) -> FileEntry:
        """Upload one file (multipart above the threshold). A URI ending in '/' gets the file's name."""
        src = Path(src)
        if uri.endswith("/"):
            uri += src.name
        sha, md5 = _digests(src)
        size = src.stat().st_size
        entry = FileEntry(path=PurePosixPath(uri).name, size=size, sha256=sha)
        if not is_remote(uri):
            _atomic_copy(src, _local(uri))
            self._beat()
            return entry
        bucket, key = _split(uri)

        def put() -> None:
            self.client.upload_file(str(src), bucket, key, ExtraArgs={"Metadata": self._metadata(sha)},
                                    Callback=self._progress(), Config=self._transfer_config())
            head = self._head(bucket, key)
            if head is None:
                raise _Corrupt(f"{uri}: not found right after upload")
            _check_head(uri, head, size, sha, md5)

        self._call(uri, "upload", put)
        return entry

    def upload_dir(self, src: Path, uri_prefix: str, *, skip: tuple[str, ...] = ()) -> list[FileEntry]:
        """Upload every file under src (in parallel) but the relative paths in `skip`, keeping relative paths;
        entries sorted by path."""
        src = Path(src)
        return self._upload_files(src, _folder(uri_prefix), [f for f in _files(src) if f.relative_to(src).as_posix()
                                                             not in skip])

    def _upload_files(self, src: Path, prefix: str, files: list[Path]) -> list[FileEntry]:
        def one(f: Path) -> FileEntry:
            rel = f.relative_to(src).as_posix()
            return replace(self.upload_file(f, prefix + rel), path=rel)

        return sorted(_parallel(one, files, self.max_concurrency), key=lambda e: e.path)

    def put_json(self, uri: str, obj) -> None:
        body = json_body(obj)
        if not is_remote(uri):
            _atomic_write(_local(uri), body)
            return
        bucket, key = _split(uri)
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        self._call(uri, "upload", lambda: self.client.put_object(
            Bucket=bucket, Key=key, Body=body, ContentMD5=md5, ContentType="application/json",
            Metadata=self._metadata(hashlib.sha256(body).hexdigest())))

    def get_json(self, uri: str) -> dict | None:
        """The parsed JSON document, or None when the object (or file) does not exist."""
        return self.get_json_etag(uri)[0]

    def get_json_etag(self, uri: str) -> tuple[dict | None, str | None]:
        """(document, ETag) of a JSON object, (None, None) when it does not exist: the ETag is what put_json_if's
        `match` takes (local files: the sha256 of their bytes)."""
        if not is_remote(uri):
            path = _local(uri)
            body = path.read_bytes() if path.is_file() else None
            etag = hashlib.sha256(body).hexdigest() if body is not None else None
        else:
            bucket, key = _split(uri)
            body, etag = self._call(uri, "download", lambda: self._get_bytes(bucket, key))
        if body is None:
            return None, None
        try:
            return json.loads(body), etag
        except ValueError as e:
            raise ConfigError(f"{uri}: not valid JSON ({e}); delete or fix it") from None

    def put_json_if(self, uri: str, obj, *, match: str | None = None) -> str | None:
        """Write a JSON document only if the object is absent (match None: If-None-Match: *) or its ETag is still
        `match` (If-Match). Returns the new ETag; None when the condition does not hold (another writer came
        first, or the object is gone), and then nothing was written."""
        body = json_body(obj)
        if not is_remote(uri):
            return _local_put_if(_local(uri), body, match)
        bucket, key = _split(uri)
        condition = {"IfNoneMatch": "*"} if match is None else {"IfMatch": match}

        def put() -> str | None:
            from botocore.exceptions import ClientError

            args = dict(Bucket=bucket, Key=key, Body=body, ContentType="application/json",
                        ContentMD5=base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode(),
                        Metadata=self._metadata(hashlib.sha256(body).hexdigest()))
            if not self.conditional_writes:
                return self._put_compared(bucket, key, args, match)
            try:
                return self.client.put_object(**args, **condition)["ETag"]
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code"))
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or code in _NOT_FOUND:
                    return None  # 409: a conditional write to the same key was in flight: the other one won
                if code not in ("NotImplemented", "501"):
                    raise
            self.conditional_writes = False  # the documented fallback: compare, then write
            return self._put_compared(bucket, key, args, match)

        return self._call(uri, "upload", put)

    def _put_compared(self, bucket: str, key: str, args: dict, match: str | None) -> str | None:
        """put_json_if for a store without conditional writes: read the ETag, compare, write (not atomic)."""
        head = self._head(bucket, key)
        if (head is None) != (match is None) or (head is not None and head["ETag"].strip('"') != match.strip('"')):
            return None
        return self.client.put_object(**args)["ETag"]

    def delete_if(self, uri: str, match: str) -> bool:
        """Delete an object only while its ETag is `match` (what put_json_if returned): whether it was deleted.
        S3: read-compare-delete (If-Match on DeleteObject is not offered by every store); local: flock'd."""
        if not is_remote(uri):
            path = _local(uri)
            with _flocked(path):
                if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != match:
                    return False
                path.unlink()
                return True
        bucket, key = _split(uri)

        def delete() -> bool:
            head = self._head(bucket, key)
            if head is None or head["ETag"].strip('"') != match.strip('"'):
                return False
            self.client.delete_object(Bucket=bucket, Key=key)
            return True

        return self._call(uri, "delete", delete)

    def _get_bytes(self, bucket: str, key: str) -> tuple[bytes | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND:
                return None, None
            raise
        body = response["Body"].read()
        if len(body) != response["ContentLength"]:
            raise _Corrupt(f"s3://{bucket}/{key}: got {len(body)} of {response['ContentLength']} bytes")
        expected = response.get("Metadata", {}).get("sha256")
        if expected and hashlib.sha256(body).hexdigest() != expected:
            raise _Corrupt(f"s3://{bucket}/{key}: sha256 mismatch")
        return body, response.get("ETag")

    def list(self, uri_prefix: str) -> list[str]:
        """Full URIs (or paths) of the objects under the prefix, sorted; a prefix is a folder."""
        prefix = _folder(uri_prefix)
        if not is_remote(uri_prefix):
            root = _local(prefix)
            if not root.is_dir():
                return []
            return sorted(prefix + p.relative_to(root).as_posix()
                          for p in root.rglob("*") if p.is_file() and _TMP_MARK not in p.name)
        bucket, key = _split(prefix)
        keys = self._call(uri_prefix, "list", lambda: self._keys(bucket, key))
        return [f"s3://{bucket}/{k}" for k in sorted(keys)]

    def exists(self, uri: str) -> bool:
        """Whether the object exists; for a URI ending in '/', whether anything is under it."""
        if not is_remote(uri):
            path = _local(uri)
            return path.is_file() or (path.is_dir() and any(path.iterdir()))
        bucket, key = _split(uri)
        if not key or key.endswith("/"):
            return self._call(uri, "list", lambda: bool(self.client.list_objects_v2(
                Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0)))
        return self._call(uri, "check", lambda: self._head(bucket, key)) is not None

    def delete(self, uri: str) -> None:
        """Delete one object (or local file); absent is fine."""
        if not is_remote(uri):
            _local(uri).unlink(missing_ok=True)
            return
        bucket, key = _split(uri)
        self._call(uri, "delete", lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def delete_prefix(self, uri_prefix: str) -> None:
        """Delete everything under the prefix (a folder); absent is fine. Refuses a whole bucket."""
        if not is_remote(uri_prefix):
            path = _local(uri_prefix)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            return
        bucket, key = _split(uri_prefix)
        if not key.strip("/"):
            raise ConfigError(f"delete {uri_prefix}: refusing to delete a whole bucket")
        prefix = _folder(key)
        self._call(uri_prefix, "delete", lambda: self._delete_keys(bucket, self._keys(bucket, prefix), uri_prefix))

    def _delete_keys(self, bucket: str, keys: list[str], uri: str) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            errors = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if errors.get("Errors"):
                first = errors["Errors"][0]
                raise TransientError(f"delete {uri}: {first.get('Key')}: {first.get('Code')}")

    def move_prefix(self, src: str, dst: str, *, into: bool = False) -> int:
        """Move everything under src to dst (both folders) and return how many objects moved.

        S3: a server-side copy of each object (metadata kept), checked against the original's size, sha256
        metadata and plain-MD5 ETag, then the copied originals are deleted. Local: a rename. Refuses a whole
        bucket, and (unless `into`: same-named objects at dst are replaced) a dst that already holds anything."""
        src, dst = _folder(src), _folder(dst)
        if is_remote(src) != is_remote(dst):
            raise ConfigError(f"move {src} to {dst}: both must be s3:// URIs or both local paths")
        if not into and self.exists(dst):
            raise ConfigError(f"move {src} to {dst}: the destination is not empty; nothing was moved")
        if not is_remote(src):
            source = _local(src)
            if not source.is_dir():
                return 0
            files = _files(source)
            if into:
                for f in files:
                    target = safe_join(_local(dst), f.relative_to(source).as_posix(), dst)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, target)
                shutil.rmtree(source)
                with contextlib.suppress(OSError):  # a folder has no object of its own: drop one left empty
                    source.parent.rmdir()
                return len(files)
            _local(dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, _local(dst))
            return len(files)
        (src_bucket, src_key), (dst_bucket, dst_key) = _split(src), _split(dst)
        if not src_key.strip("/") or not (into or dst_key.strip("/")):
            raise ConfigError(f"move {src} to {dst}: refusing to move a whole bucket; use a prefix")
        keys = self._call(src, "list", lambda: self._keys(src_bucket, src_key))

        def one(key: str) -> None:
            target = dst_key + key[len(src_key):]

            def copy_verified() -> None:
                head = self._head(src_bucket, key)
                self.client.copy({"Bucket": src_bucket, "Key": key}, dst_bucket, target,
                                 Config=self._transfer_config())
                copied = self._head(dst_bucket, target)
                etags = _plain_md5(head), _plain_md5(copied or {})
                if (copied is None or copied["ContentLength"] != head["ContentLength"]
                        or copied.get("Metadata") != head.get("Metadata") or (all(etags) and len(set(etags)) > 1)):
                    raise _Corrupt(f"s3://{dst_bucket}/{target}: the copy does not match s3://{src_bucket}/{key}")

            self._call(f"s3://{dst_bucket}/{target}", "copy", copy_verified)

        _parallel(one, keys, self.max_concurrency)
        self._call(src, "delete", lambda: self._delete_keys(src_bucket, keys, src))
        return len(keys)

    def download_to(self, uri: str, target: Path) -> Path:
        """One object or local file to exactly `target` (a copy for local paths)."""
        if not is_remote(uri):
            if not _local(uri).is_file():
                raise ConfigError(f"{uri}: no such file")
            _atomic_copy(_local(uri), target)
            self._beat()
            return target
        bucket, key = _split(uri)
        return self._call(uri, "download", lambda: self._get_object(bucket, key, target))


def json_body(obj) -> bytes:
    """The bytes put_json stores for obj."""
    return json.dumps(obj, indent=1).encode()


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the stored manifest.json of a manifest that `publish` returned."""
    return hashlib.sha256(json_body(manifest)).hexdigest()


def publish(storage: Storage, src_dir: Path, uri_prefix: str, manifest: dict) -> dict:
    """Upload every file of src_dir under uri_prefix, then manifest.json last; returns the full manifest.

    A manifest already there is removed first, so a failed upload leaves the prefix unpublished rather than
    published with mismatched files."""
    prefix = _folder(uri_prefix)
    storage.delete(prefix + MANIFEST)
    src_dir = Path(src_dir)
    files = storage.upload_dir(src_dir, prefix, skip=(MANIFEST,))
    full = {**manifest, "files": [asdict(e) for e in files]}
    storage.put_json(prefix + MANIFEST, full)
    return full


def read_published(storage: Storage, uri_prefix: str, dest: Path) -> dict:
    """Download a published prefix to dest, verifying every file's size and sha256 against its manifest."""
    prefix = _folder(uri_prefix)
    manifest = storage.get_json(prefix + MANIFEST)
    if manifest is None:
        raise ConfigError(f"{prefix}: no {MANIFEST}; it was never published or its upload did not finish")
    dest = Path(dest)
    for f in manifest.get("files", []):
        rel = f["path"]
        target = storage.download_to(prefix + rel, safe_join(dest, rel, prefix))
        size = target.stat().st_size
        if size != f["size"] or sha256_file(target) != f["sha256"]:
            raise ConfigError(
                f"{prefix}{rel}: does not match {MANIFEST} (size {size} vs {f['size']}, or sha256); the "
                "stored copy is corrupt or was modified: publish it again or delete the prefix")
    return manifest


# -- helpers -----------------------------------------------------------------------------------------


def is_storage_error(e: BaseException) -> bool:
    """A boto3, botocore or s3transfer exception."""
    return type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and _TMP_MARK not in p.name)


def _plain_md5(head: dict) -> str | None:
    """The object's MD5 when its ETag is one: single-part, and not SSE-KMS or SSE-C encrypted."""
    etag = str(head.get("ETag", "")).strip('"')
    kms = str(head.get("ServerSideEncryption", "")).startswith("aws:kms")
    encrypted = kms or head.get("SSECustomerAlgorithm")
    return etag if re.fullmatch(r"[0-9a-f]{32}", etag) and not encrypted else None


def _verify(path: Path, size: int, sha: str | None, md5: str | None) -> None:
    actual = path.stat().st_size
    if actual != size:
        raise _Corrupt(f"{path.name}: got {actual} of {size} bytes")
    if sha or md5:
        got_sha, got_md5 = _digests(path)
        if (sha and got_sha != sha) or (not sha and md5 and got_md5 != md5):
            raise _Corrupt(f"{path.name}: checksum mismatch after download")


def _check_head(uri: str, head: dict, size: int, sha: str, md5: str) -> None:
    if head["ContentLength"] != size:
        raise _Corrupt(f"{uri}: stored {head['ContentLength']} bytes, sent {size}")
    if head.get("Metadata", {}).get("sha256") != sha:
        raise _Corrupt(f"{uri}: stored sha256 metadata does not match")
    etag = _plain_md5(head)
    if etag and etag != md5:
        raise _Corrupt(f"{uri}: ETag does not match the file's MD5")


def _parallel(fn: Callable[[T], object], items: list, workers: int) -> list:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(fn, i) for i in items]
        try:
            return [f.result() for f in as_completed(futures)]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _temp_beside(path: Path, data: bytes) -> str:
    """A complete temporary file holding `data` in path's folder (named so that list() never shows it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _temp_beside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _flocked:
    """An exclusive flock on a lock file beside `path` (named so that list() never shows it)."""

    def __init__(self, path: Path):
        self.lock = path.parent / f".{path.name}{_TMP_MARK}lock"

    def __enter__(self):
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the lock


def _local_put_if(path: Path, body: bytes, match: str | None) -> str | None:
    """put_json_if for a local file: create only if absent (a hard link of a complete temporary file, which fails
    when the name exists), or replace only if the current bytes still hash to `match` (under an flock)."""
    etag = hashlib.sha256(body).hexdigest()
    with _flocked(path):
        if match is not None:
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != match:
                return None
            _atomic_write(path, body)
            return etag
        tmp = _temp_beside(path, body)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return etag


def _atomic_copy(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}{_TMP_MARK}")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

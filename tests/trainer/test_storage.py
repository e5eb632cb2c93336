"""The storage layer: real boto3 over HTTP against the embedded S3 server (through a fault proxy), and local
paths, which must behave the same."""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys

import boto3
import pytest
from kubetune_api import EXIT_RETRYABLE, StorageEndpoint
from kubetune_dev.s3server import endpoint_from_env
from kubetune_trainer.errors import ConfigError, TransientError
from kubetune_trainer.storage import Storage, is_remote, publish, read_published, sha256_file

pytest_plugins = ["tests.s3fixtures"]
MiB = 1024 * 1024

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def fast_storage(endpoint: str, **overrides) -> Storage:
    """Few attempts, short timeouts and 5 MiB parts (the S3 minimum), so the fault tests take seconds."""
    options = dict(max_attempts=3, connect_timeout=2, read_timeout=5, multipart_threshold=5 * MiB,
                   multipart_chunksize=5 * MiB, max_concurrency=4)
    storage = Storage(StorageEndpoint(endpoint=endpoint), **{**options, **overrides})
    storage.retry_backoff = 0.01
    return storage


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def adapter(tmp_path):
    """A small folder like a published adapter."""
    src = tmp_path / "adapter"
    write(src / "adapter_config.json", b'{"r": 8}')
    write(src / "adapter_model.safetensors", os.urandom(300_000))
    write(src / "tokenizer" / "vocab.txt", b"a\nb\n")
    return src


@pytest.fixture(params=["s3", "local"])
def base(request, tmp_path):
    """(storage, base URI): the same tests run against S3 and a local directory."""
    if request.param == "local":
        return Storage(), str(tmp_path / "store")
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("bucket")
    return fast_storage(server.endpoint), f"s3://{bucket}/run"


def test_is_remote():
    assert is_remote("s3://b/k") and not is_remote("/tmp/x") and not is_remote("file:///tmp/x")


def test_object_roundtrip(base, tmp_path):
    storage, root = base
    src = write(tmp_path / "in" / "train.jsonl", b'{"text": "hi"}\n' * 100)
    entry = storage.upload_file(src, f"{root}/data/train.jsonl")
    assert (entry.path, entry.size, entry.sha256) == ("train.jsonl", src.stat().st_size, sha256_file(src))
    assert storage.exists(f"{root}/data/train.jsonl") and storage.exists(f"{root}/data/")
    assert not storage.exists(f"{root}/data/nope.jsonl") and not storage.exists(f"{root}/nothing/")
    got = storage.download(f"{root}/data/train.jsonl", tmp_path / "out")
    assert got.name == "train.jsonl" and got.read_bytes() == src.read_bytes()


def test_prefix_roundtrip(base, adapter, tmp_path):
    storage, root = base
    entries = storage.upload_dir(adapter, f"{root}/adapter")
    paths = ["adapter_config.json", "adapter_model.safetensors", "tokenizer/vocab.txt"]
    assert [e.path for e in entries] == paths
    assert storage.list(f"{root}/adapter/") == [f"{root}/adapter/{e.path}" for e in entries]
    assert storage.list(f"{root}/adapter") == storage.list(f"{root}/adapter/")
    for i, uri in enumerate([f"{root}/adapter/", f"{root}/adapter"]):  # a prefix, with or without '/'
        got = storage.download(uri, tmp_path / f"out{i}")
        for e in entries:
            assert sha256_file(got / e.path) == e.sha256


def test_json_list_delete(base):
    storage, root = base
    assert storage.get_json(f"{root}/manifest.json") is None
    storage.put_json(f"{root}/a/manifest.json", {"step": 1})
    storage.put_json(f"{root}/ab/manifest.json", {"step": 2})
    assert storage.get_json(f"{root}/a/manifest.json") == {"step": 1}
    storage.delete_prefix(f"{root}/a")  # a folder: leaves the sibling 'ab/' alone
    assert storage.list(f"{root}/") == [f"{root}/ab/manifest.json"]
    storage.delete_prefix(f"{root}/nothing/")  # absent is fine
    assert storage.list(f"{root}/nothing/") == []


def test_multipart_upload_and_download(s3_server, bucket, proxy, tmp_path):
    storage = fast_storage(proxy.endpoint)
    src = write(tmp_path / "model.safetensors", os.urandom(11 * MiB))
    part = proxy.inject("PUT", "partNumber=2", "status", status=500, times=2)
    storage.upload_file(src, f"s3://{bucket}/m/model.safetensors")
    head = s3_server.client().head_object(Bucket=bucket, Key="m/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3") and part.hits == 2  # 3 parts; part 2 retried twice
    ranged = proxy.inject("GET", "model.safetensors", "truncate", times=2)
    got = storage.download(f"s3://{bucket}/m/model.safetensors", tmp_path / "out")
    assert sha256_file(got) == sha256_file(src) and ranged.hits == 2
    assert sum(1 for m, p, _ in proxy.log if m == "GET" and "model.safetensors" in p) >= 4  # ranged GETs


def test_server_errors_and_timeouts_are_retried(bucket, proxy, tmp_path):
    storage = fast_storage(proxy.endpoint, read_timeout=0.5, max_attempts=4)  # a spare one for slow CI
    src = write(tmp_path / "f.bin", os.urandom(50_000))
    faults = [proxy.inject("PUT", "f.bin", "status", status=500), proxy.inject("PUT", "f.bin", "drop")]
    storage.upload_file(src, f"s3://{bucket}/f.bin")
    faults += [proxy.inject("GET", "f.bin", "status", status=503),
               proxy.inject("GET", "f.bin", "delay", delay=1.5)]
    assert sha256_file(storage.download(f"s3://{bucket}/f.bin", tmp_path / "out")) == sha256_file(src)
    proxy.inject("PUT", "j.json", "delay", delay=1.5)
    proxy.inject("GET", "j.json", "status", status=500, times=2)
    storage.put_json(f"s3://{bucket}/j.json", {"ok": True})
    assert storage.get_json(f"s3://{bucket}/j.json") == {"ok": True}
    assert [f.hits for f in faults] == [1, 1, 1, 1]


def test_truncated_and_corrupt_bodies_are_detected_and_retried(s3_server, bucket, proxy, tmp_path):
    storage = fast_storage(proxy.endpoint)
    src = write(tmp_path / "d.bin", os.urandom(200_000))
    storage.upload_file(src, f"s3://{bucket}/d.bin")
    truncated = proxy.inject("GET", "d.bin", "truncate", times=2)
    corrupt = proxy.inject("GET", "d.bin", "corrupt")
    assert sha256_file(storage.download(f"s3://{bucket}/d.bin", tmp_path / "a")) == sha256_file(src)
    assert (truncated.hits, corrupt.hits) == (2, 1)
    # an object someone else uploaded (no sha256 metadata): its plain-MD5 ETag catches corruption
    s3_server.client().put_object(Bucket=bucket, Key="raw.bin", Body=src.read_bytes())
    corrupt = proxy.inject("GET", "raw.bin", "corrupt")
    assert sha256_file(storage.download(f"s3://{bucket}/raw.bin", tmp_path / "b")) == sha256_file(src)
    assert corrupt.hits == 1
    storage.put_json(f"s3://{bucket}/s.json", {"step": 3})
    proxy.inject("GET", "s.json", "truncate")
    proxy.inject("GET", "s.json", "corrupt")
    assert storage.get_json(f"s3://{bucket}/s.json") == {"step": 3}


def test_exhausted_retries_raise_transient_error_without_credentials(monkeypatch, bucket, proxy, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    storage = fast_storage(proxy.endpoint)
    src = write(tmp_path / "x.bin", b"x" * 1000)
    storage.upload_file(src, f"s3://{bucket}/x.bin")
    cases = [
        (lambda: storage.download(f"s3://{bucket}/x.bin", tmp_path / "o"), "GET", "corrupt"),
        (lambda: storage.get_json(f"s3://{bucket}/x.bin"), "GET", "status"),
        (lambda: storage.upload_file(src, f"s3://{bucket}/y.bin"), "PUT", "drop"),
        (lambda: storage.list(f"s3://{bucket}/"), "GET", "status"),
    ]
    for call, method, kind in cases:
        proxy.clear()
        proxy.inject(method, "", kind, times=None, status=503 if method == "PUT" else 500)
        with pytest.raises(TransientError) as err:
            call()
        message = str(err.value)
        assert err.value.exit_code == EXIT_RETRYABLE and f"s3://{bucket}/" in message, message
        assert SECRET not in message and KEY_ID not in message and "Signature" not in message, message


def test_missing_and_denied_are_permanent(s3_server, bucket, proxy, tmp_path):
    storage = fast_storage(proxy.endpoint)
    src = write(tmp_path / "x.bin", b"x")
    for call in [lambda: storage.download("s3://no-such-bucket-kt/x.bin", tmp_path),
                 lambda: storage.list("s3://no-such-bucket-kt/p/"),
                 lambda: storage.upload_file(src, "s3://no-such-bucket-kt/x.bin"),
                 lambda: storage.get_json("s3://no-such-bucket-kt/m.json")]:
        with pytest.raises(ConfigError, match="no-such-bucket-kt.*bucket does not exist"):
            call()
    with pytest.raises(ConfigError, match=f"s3://{bucket}/nope: no object or prefix"):
        storage.download(f"s3://{bucket}/nope", tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        Storage().download(str(tmp_path / "nope"), tmp_path)
    denied = proxy.inject("PUT", "x.bin", "status", status=403, times=None)
    with pytest.raises(ConfigError, match=f"s3://{bucket}/x.bin: access denied"):
        storage.upload_file(src, f"s3://{bucket}/x.bin")
    assert denied.hits == 1  # not retried


def test_no_credentials_is_a_config_error(monkeypatch, s3_server, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="s3://b/k: no AWS credentials"):
        fast_storage(s3_server.endpoint).get_json("s3://b/k")


def test_publish_and_read_published(base, adapter, tmp_path):
    storage, root = base
    manifest = publish(storage, adapter, f"{root}/out/", {"kind": "FineTuneResult", "step": 7})
    assert manifest["step"] == 7 and [f["path"] for f in manifest["files"]][0] == "adapter_config.json"
    assert storage.list(f"{root}/out/")[-1].endswith("out/tokenizer/vocab.txt")
    got = read_published(storage, f"{root}/out", tmp_path / "copy")
    assert got == manifest and storage.get_json(f"{root}/out/manifest.json") == manifest
    for f in manifest["files"]:
        assert sha256_file(tmp_path / "copy" / f["path"]) == f["sha256"]
    with pytest.raises(ConfigError, match="no manifest.json"):
        read_published(storage, f"{root}/elsewhere/", tmp_path / "x")


def test_read_published_detects_a_tampered_file(base, adapter, tmp_path):
    storage, root = base
    publish(storage, adapter, f"{root}/out/", {"step": 1})
    tampered = write(tmp_path / "evil.safetensors", os.urandom(300_000))
    storage.upload_file(tampered, f"{root}/out/adapter_model.safetensors")  # same size, other bytes
    with pytest.raises(ConfigError, match="adapter_model.safetensors: does not match manifest.json"):
        read_published(storage, f"{root}/out/", tmp_path / "copy")


def test_failed_publish_leaves_no_manifest(bucket, proxy, adapter, tmp_path):
    storage = fast_storage(proxy.endpoint)
    prefix = f"s3://{bucket}/adapters/support-bot/"
    publish(storage, adapter, prefix, {"step": 1})  # an earlier, complete publish
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    failing = proxy.inject("PUT", "adapter_model.safetensors", "status", status=500, times=None)
    with pytest.raises(TransientError, match="adapter_model.safetensors"):
        publish(storage, adapter, prefix, {"step": 2})
    assert failing.hits == 3
    assert not storage.exists(prefix + "manifest.json") and storage.get_json(prefix + "manifest.json") is None
    assert not any(p.endswith("manifest.json") and m == "PUT" for m, p, _ in proxy.log[-3:])
    with pytest.raises(ConfigError, match="no manifest.json"):
        read_published(storage, prefix, tmp_path / "copy")


def test_local_publish_never_leaves_partial_files(tmp_path, adapter):
    storage = Storage()
    publish(storage, adapter, f"file://{tmp_path}/out", {"step": 1})
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors",
                                                   "manifest.json", "tokenizer"]
    assert storage.download(str(tmp_path / "out"), tmp_path / "elsewhere") == tmp_path / "out"  # no copy
    data = (tmp_path / "out" / "manifest.json").read_bytes()
    assert storage.get_json(f"file://{tmp_path}/out/manifest.json")["files"][2]["sha256"] == hashlib.sha256(
        (adapter / "tokenizer" / "vocab.txt").read_bytes()).hexdigest() and data


def test_client_config_follows_the_storage_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    minio = Storage(StorageEndpoint(endpoint="http://minio:9000", region="eu-west-1"), max_attempts=4).client
    assert minio.meta.endpoint_url == "http://minio:9000" and minio.meta.region_name == "eu-west-1"
    assert minio.meta.config.s3["addressing_style"] == "path"  # 'auto' on a custom endpoint
    assert minio.meta.config.retries == {"mode": "standard", "total_max_attempts": 4}
    aws = Storage(StorageEndpoint(addressing_style="virtual")).client
    assert aws.meta.config.s3["addressing_style"] == "virtual" and "amazonaws.com" in aws.meta.endpoint_url


def test_s3server_command_line(monkeypatch):
    monkeypatch.delenv("KUBETUNE_S3_ENDPOINT", raising=False)
    assert endpoint_from_env() is None
    monkeypatch.setenv("KUBETUNE_S3_ENDPOINT", "https://s3.example.com")
    assert endpoint_from_env() == "https://s3.example.com"
    cmd = [sys.executable, "-m", "kubetune_dev.s3server", "--port", "0", "--buckets", "models,data"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        endpoint = server.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="any", aws_secret_access_key="any")
        assert {b["Name"] for b in client.list_buckets()["Buckets"]} >= {"models", "data"}
        # reached by a host name (a Service, minio.minio:9000), the bucket is still the path's first part
        conn = http.client.HTTPConnection(endpoint.removeprefix("http://"), timeout=10)
        conn.request("GET", "/models?list-type=2", headers={"Host": "minio.minio:9000"})
        assert conn.getresponse().status == 200
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0


# -- no object key leads out of its folder ---------------------------------------------------------------------


@pytest.mark.parametrize("evil", ["model/../escape.txt", "model/sub/../../escape.txt"])
def test_an_object_key_with_dotdot_is_refused_and_writes_nothing_outside(s3_server, bucket, tmp_path, evil):
    """S3 keeps keys with '..' as they are (so does this server); a model prefix holding one must neither overwrite
    what lies beside the download folder nor be reported as fetched."""
    from kubetune_trainer.fetch import fetch_model

    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=evil, Body=b"planted")
    assert evil in [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    dest = tmp_path / "deep" / "model"
    for fetch in (lambda: fetch_model(storage, f"s3://{bucket}/model/", dest),
                  lambda: storage.download(f"s3://{bucket}/model/", dest)):
        with pytest.raises(ConfigError, match=r"refusing object name '(sub/)?\.\./.*escape\.txt'.*outside its folder"):
            fetch()
    assert not [p for p in tmp_path.rglob("escape.txt")], "nothing is written outside the download folder"


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    from kubetune_trainer.storage import safe_join

    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    assert safe_join(root, "inside/model.safetensors", "s3://b/m/") == root / "inside" / "model.safetensors"
    for rel in ("out/x", "/etc/passwd", "../x", "a/../../x", ""):
        with pytest.raises(ConfigError, match="refusing object name"):
            safe_join(root, rel, "s3://b/m/")


def test_a_remote_image_is_cached_under_the_hash_of_its_uri(tmp_path):
    """A record's s3:// image with '..' in its key still lands in the run's image cache, named by its URI."""
    from kubetune_trainer.images import ImageStore

    store = ImageStore(None, tmp_path / "images", tmp_path / "split", "s3://b/split/")
    for uri in ("s3://b/../../model/model.safetensors", "s3://b/a/../../x.png", "s3://b/photos/ant.JPG"):
        cached = store.cached(uri)
        assert cached.parent == tmp_path / "images" / "remote"
        assert cached.name.startswith(hashlib.sha256(uri.encode()).hexdigest())
    assert store.cached("s3://b/photos/ant.JPG").suffix == ".jpg"
    assert store.cached("s3://b/../../model/model.safetensors").suffix == ""


def test_conditional_json_writes(base):
    """put_json_if: create only if absent, replace only at the ETag that was read; a failed condition writes
    nothing and answers None. delete_if deletes only that version. The same on S3 and local paths."""
    storage, root = base
    uri = f"{root}/claim/run.json"
    first = storage.put_json_if(uri, {"v": 1})
    assert first and storage.put_json_if(uri, {"v": 2}) is None
    assert storage.get_json_etag(uri) == ({"v": 1}, first)
    second = storage.put_json_if(uri, {"v": 3}, match=first)
    assert second and second != first and storage.put_json_if(uri, {"v": 4}, match=first) is None
    assert storage.get_json(uri) == {"v": 3}
    assert storage.put_json_if(f"{root}/claim/absent.json", {"v": 5}, match=first) is None
    assert not storage.delete_if(uri, first) and storage.delete_if(uri, second)
    assert storage.list(f"{root}/claim/") == []  # the local lock files are never listed


def test_a_store_without_conditional_writes_falls_back_to_compare_and_write(s3_server, bucket, monkeypatch):
    """A store that answers 501 NotImplemented to If-None-Match/If-Match: the documented fallback reads the ETag,
    compares and writes (not atomic: the claim's later re-reads catch a race), and says so."""
    from botocore.exceptions import ClientError

    storage = fast_storage(s3_server.endpoint)
    real = storage.client.put_object

    def put_object(**kwargs):
        if "IfNoneMatch" in kwargs or "IfMatch" in kwargs:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "A header you provided implies "
                                         "functionality that is not implemented"},
                               "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
        return real(**kwargs)

    monkeypatch.setattr(storage.client, "put_object", put_object)
    uri = f"s3://{bucket}/fallback/run.json"
    first = storage.put_json_if(uri, {"v": 1})
    assert first and not storage.conditional_writes
    assert storage.put_json_if(uri, {"v": 2}) is None and storage.get_json(uri) == {"v": 1}
    assert storage.put_json_if(uri, {"v": 3}, match=first) and storage.put_json_if(uri, {"v": 4}, match=first) is None

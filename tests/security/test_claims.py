"""Output claims are atomic (issue 27, item 4): two runs never both own an output prefix, and a run whose prefix
was taken over never reports Succeeded.

Each test names what a second run (a careless colleague, or a tenant with `output.overwrite: true`) tries and what
the trainer answers. Against the project's own S3 server (moto, over HTTP) and local paths alike.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
from kubetune_api import StorageEndpoint, TrainerConfig
from kubetune_trainer.errors import OutputInUseError
from kubetune_trainer.identity import MARKER, RunIdentity, check_claim, claim, staging_uri
from kubetune_trainer.manifest import Manifest
from kubetune_trainer.publish import publish_output
from kubetune_trainer.storage import Storage, read_published

from tests.operator_tests import test_e2e as e2e

crd, operator, author_policy = e2e.crd, e2e.operator, e2e.author_policy  # the cluster test's fixtures
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "tests.s3fixtures"]


@pytest.fixture(params=["s3", "local"])
def where(request, tmp_path):
    """(storage, a fresh base URI) on the project's S3 server or a local directory."""
    if request.param == "local":
        return Storage(), str(tmp_path / "store")
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("bucket")
    return Storage(StorageEndpoint(endpoint=server.endpoint)), f"s3://{bucket}/claims-{uuid.uuid4().hex[:6]}"


def config_for(out: str, name: str, r: int = 8, overwrite: bool = False) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "jobName": name, "baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"train": "s3://data/t.jsonl"},
        "method": {"type": "lora", "lora": {"r": r}}, "output": {"uri": out, "overwrite": overwrite}})


def manifest_of(config: TrainerConfig, identity: RunIdentity) -> Manifest:
    return Manifest(job=config.job_name, run=identity.dump(), task_fields={"task": "causal-lm"}, headline="loss",
                    method="lora", base_model={"uri": config.base_model.uri, "sha256": "0" * 64}, datasets={},
                    format="text", hyperparameters={}, lora={"r": 8}, steps=1, total_steps=1, epochs=1.0,
                    early_stopped=False, tokens_trained=1, metrics={}, selected={"select": "last", "step": 1},
                    history=[], wall_time_seconds=1.0, train_time_seconds=1.0, processes=1, precision="no")


def adapter(tmp_path, content: bytes):
    folder = tmp_path / f"adapter-{uuid.uuid4().hex[:6]}"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(content)
    (folder / "sub" / "tokenizer.json").write_bytes(b"{}")
    return folder


def test_two_runs_claiming_a_fresh_prefix_at_once_exactly_one_wins(where):
    """Attack: two FineTuneJobs with different specs start on the same fresh output.uri at the same instant (both
    read "nobody here" before either writes). Answer: the claim is a conditional write (If-None-Match: *, or a
    hard link locally), so exactly one run claims the prefix; the other fails at claim time, before any GPU work,
    with a message naming the run and job that won."""
    storage, base = where
    for round_ in range(5):
        out = f"{base}/round-{round_}/"
        configs = [config_for(out, "alice", r=8), config_for(out, "bob", r=16)]
        start, results = threading.Barrier(2), {}

        def run(config: TrainerConfig, start=start, results=results) -> None:
            start.wait()
            try:
                claim(storage, config, RunIdentity.of(config), report=lambda e: None)
                results[config.job_name] = "won"
            except OutputInUseError as e:
                results[config.job_name] = e

        threads = [threading.Thread(target=run, args=(c,)) for c in configs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [name for name, r in results.items() if r == "won"]
        assert len(winners) == 1, results
        loser = next(c for c in configs if c.job_name not in winners)
        winner = next(c for c in configs if c.job_name in winners)
        message = str(results[loser.job_name])
        assert RunIdentity.of(winner).uid in message and f"job '{winner.job_name}'" in message
        assert storage.get_json(out + MARKER)["run"] == RunIdentity.of(winner).dump()
        check_claim(storage, winner, RunIdentity.of(winner))


def test_publishing_goes_through_staging_and_keeps_the_layout(where, tmp_path):
    """Not an attack: the layout readers expect. Files land at <output>/ with manifest.json last; nothing is left
    under <output>/.staging/, and the claim marker records the commit."""
    storage, base = where
    config = config_for(f"{base}/out/", "alice")
    me = RunIdentity.of(config)
    claim(storage, config, me)
    manifest = publish_output(storage, adapter(tmp_path, b"alice weights"), config, me, manifest_of(config, me))
    assert {f["path"] for f in manifest["files"]} == {"adapter_model.safetensors", "sub/tokenizer.json"}
    assert read_published(storage, f"{base}/out/", tmp_path / "back") == manifest
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == b"alice weights"
    assert sorted(storage.list(f"{base}/out/")) == sorted(
        f"{base}/out/{p}" for p in ("adapter_model.safetensors", "sub/tokenizer.json", "manifest.json", MARKER))
    assert storage.get_json(f"{base}/out/{MARKER}")["committed"]["staging"] == staging_uri(config, me)
    assert not storage.exists(f"{base}/out/.staging/") and not Path(f"{base}/out/.staging").exists()
    assert claim(storage, config, me) == manifest  # the same run again: already published


def test_a_run_whose_prefix_was_taken_over_before_publishing_fails(where, tmp_path):
    """Attack: while run A saves and merges its adapter (minutes after its last claim check), run B with
    output.overwrite: true moves A's files aside and claims the prefix. Answer: A's commit is a write
    conditional on its claim's ETag; it fails with OutputInUseError naming B, A publishes nothing into B's
    prefix, and B's claim is untouched."""
    storage, base = where
    a = config_for(f"{base}/out/", "alice")
    b = config_for(f"{base}/out/", "bob", r=16, overwrite=True)
    claim(storage, a, RunIdentity.of(a))
    check_claim(storage, a, RunIdentity.of(a))  # A's last check before publishing passes ...
    claim(storage, b, RunIdentity.of(b), report=lambda e: None)  # ... then B takes the prefix over
    with pytest.raises(OutputInUseError) as e:
        publish_output(storage, adapter(tmp_path, b"alice weights"), a, RunIdentity.of(a),
                       manifest_of(a, RunIdentity.of(a)))
    assert RunIdentity.of(b).uid in str(e.value) and "job 'bob'" in str(e.value)
    assert storage.get_json(f"{base}/out/manifest.json") is None
    assert not storage.exists(f"{base}/out/adapter_model.safetensors")
    assert storage.get_json(f"{base}/out/{MARKER}")["run"] == RunIdentity.of(b).dump()


def test_a_takeover_during_the_commit_withdraws_the_manifest(where, tmp_path):
    """Attack: B takes the prefix over in the seconds while A's commit moves its staged files into place (after
    A's conditional commit of the marker). Answer: A's final conditional write of the marker fails, A withdraws
    the manifest it wrote and fails with OutputInUseError; no manifest of A is left to be trusted."""
    storage, base = where
    a = config_for(f"{base}/out/", "alice")
    b = config_for(f"{base}/out/", "bob", r=16, overwrite=True)
    me = RunIdentity.of(a)
    claim(storage, a, me)

    class TakenOverMidway(Storage):
        def put_json_if(self, uri, obj, *, match=None):
            result = super().put_json_if(uri, obj, match=match)
            if uri.endswith("manifest.json"):  # A's manifest is written: now B strikes
                claim(storage, b, RunIdentity.of(b), report=lambda e: None)
            return result

    racing = TakenOverMidway(storage.endpoint)
    racing._client = storage._client
    with pytest.raises(OutputInUseError, match="changed while it committed|holds another run's files"):
        publish_output(racing, adapter(tmp_path, b"alice weights"), a, me, manifest_of(a, me))
    left = storage.get_json(f"{base}/out/manifest.json")
    assert left is None or not me.matches(left.get("run"))
    assert storage.get_json(f"{base}/out/{MARKER}")["run"] == RunIdentity.of(b).dump()


def test_pruning_deletes_only_this_runs_checkpoints(where, tmp_path):
    """Attack: another run's checkpoints (or a half-uploaded folder nobody can attribute) sit under this run's
    checkpoint prefix, older than the ones it keeps; pruning used to delete step-N/ folders by number, whoever
    wrote them. Answer: only folders whose manifest names this run are deleted; the others are left and
    reported, and another run's newer checkpoint does not push this run's own out of `keep`."""
    from kubetune_trainer import checkpoint
    from kubetune_trainer.storage import publish

    storage, base = where
    prefix = f"{base}/ckpt/"
    me, other = RunIdentity("me-uid", "aa" * 32), RunIdentity("other-uid", "bb" * 32)
    for step, run in ((2, me), (4, me), (6, me), (1, other), (3, other), (99, other), (8, me)):
        publish(storage, adapter(tmp_path, f"step {step}".encode()), checkpoint.step_uri(prefix, step),
                {"kind": "checkpoint", "step": step, "run": run.dump()})
    publish(storage, adapter(tmp_path, b"my best"), checkpoint.best_uri(prefix, 4), {"kind": "best", "run": me.dump()})
    publish(storage, adapter(tmp_path, b"other best"), checkpoint.best_uri(prefix, 3),
            {"kind": "best", "run": other.dump()})
    storage.upload_dir(adapter(tmp_path, b"partial"), checkpoint.step_uri(prefix, 5))  # no manifest: unfinished

    left = checkpoint.prune(storage, prefix, 2, me)
    assert sorted(checkpoint.complete_steps(storage, prefix)) == [1, 3, 6, 8, 99]  # mine: the newest 2 (8, 6)
    assert left == [checkpoint.step_uri(prefix, s) for s in (1, 3, 5)]
    assert storage.exists(checkpoint.step_uri(prefix, 5) + "adapter_model.safetensors")
    assert checkpoint.prune_best(storage, prefix, None, me) == [checkpoint.best_uri(prefix, 3)]
    assert not storage.exists(checkpoint.best_uri(prefix, 4)) and storage.exists(checkpoint.best_uri(prefix, 3))


@pytest.mark.cluster
@pytest.mark.e2e
def test_a_second_unfinished_finetunejob_on_the_same_output_is_refused(control_plane, namespace, operator):
    """Attack: while FineTuneJob `first` has not finished, a colleague creates `second` writing to a prefix inside
    first's output (with overwrite it would move first's files aside mid-run). Answer: the operator reads the
    other FineTuneJobs from the API server before creating any child of `second`, and fails it OutputInUse,
    naming `first`; `first` goes on."""
    from tests.kube import get_json, kubectl, wait_for
    from tests.operator_tests.test_e2e import submit, wait_phase

    # No pod may start in the namespace, so `first` stays unfinished (its validation Job waits for its pod) whether
    # or not the worker's node agent runs; Jobs may still be created, so `second` could make children if it were let.
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"},
             "spec": {"hard": {"pods": "0"}}}
    kubectl(control_plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(quota))
    wait_for("the quota to be counted", lambda: get_json(control_plane, "resourcequota", "-n", namespace,
                                                         "no-pods").get("status", {}).get("hard"), timeout=60)
    spec = {"baseModel": {"uri": "s3://nowhere/model/"}, "dataset": {"train": "s3://nowhere/train.jsonl"},
            "output": {"uri": "s3://shared-outputs/team/"}}
    submit(control_plane, namespace, "first", spec)
    wait_phase(control_plane, namespace, "first", ("Pending", "Validating"), timeout=60)
    submit(control_plane, namespace, "second", {**spec, "output": {"uri": "s3://shared-outputs/team/v2",
                                                                   "overwrite": True}})
    status = wait_phase(control_plane, namespace, "second", ("Failed",), timeout=60)["status"]
    assert status["reason"] == "OutputInUse", status
    assert f"FineTuneJob {namespace}/first" in status["message"] and "s3://shared-outputs/team/" in status["message"]
    assert not [j for j in get_json(control_plane, "jobs", "-n", namespace)["items"]
                if j["metadata"]["name"].startswith("second-")], "no child of the refused job"
    assert get_json(control_plane, "ftj", "-n", namespace, "first")["status"]["phase"] != "Failed"

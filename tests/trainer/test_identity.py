"""Run identity in object storage: a prefix holding another run's output or checkpoints is refused (exit 73),
the same run again is idempotent, and output.overwrite moves the old files aside. Against the embedded S3
server over HTTP and local paths alike."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import yaml
from kubetune_api import EXIT_OUTPUT_IN_USE, TrainerConfig
from kubetune_trainer.configfile import load_config
from kubetune_trainer.errors import OutputInUseError
from kubetune_trainer.identity import MARKER, RunIdentity, check_claim, claim
from kubetune_trainer.storage import Storage, publish, read_published


def config_for(out: str, name: str = "bot", r: int = 8, **sections) -> TrainerConfig:
    doc = {"jobName": name, "baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"train": "s3://data/t.jsonl"},
           "method": {"type": "lora", "lora": {"r": r}}, "output": {"uri": out}, **sections}
    return TrainerConfig.model_validate(doc)


@pytest.fixture(params=["s3", "local"])
def where(request, tmp_path):
    """(storage, a fresh base URI) on the embedded S3 server or a local directory."""
    if request.param == "local":
        return Storage(), str(tmp_path / "store")
    return request.getfixturevalue("storage"), f"s3://adapters/identity-{uuid.uuid4().hex[:8]}"


def publish_run(storage, tmp_path, prefix: str, run: dict | None, job: str = "old-bot", kind: str = "result"):
    src = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"old weights")
    return publish(storage, src, prefix, {"kind": kind, "job": job, **({"run": run} if run else {})})


def test_identity_is_the_manifest_less_where_it_runs():
    base = config_for("s3://adapters/x/")
    same = config_for("s3://adapters/x/", workDir="/elsewhere", metrics={"port": 1},
                      storage={"endpoint": "http://127.0.0.1:1"}).model_copy(
        update={"output": base.output.model_copy(update={"overwrite": True})})
    assert RunIdentity.of(same) == RunIdentity.of(base)
    assert RunIdentity.of(base).uid.startswith("local-")
    edited = RunIdentity.of(config_for("s3://adapters/x/", r=32))
    assert edited.uid != RunIdentity.of(base).uid and edited.spec_hash != RunIdentity.of(base).spec_hash
    job = RunIdentity.of(base.model_copy(update={"run_id": "0f6c-uid"}))
    assert job == RunIdentity("0f6c-uid", RunIdentity.of(base).spec_hash)


def test_how_the_trainer_computes_is_not_what_it_trains():
    """hyperparameters.performance changes no identity: the run resumes from its checkpoints with another loss
    kernel, or under a trainer that knows more performance fields."""
    base = config_for("s3://adapters/x/")
    faster = config_for("s3://adapters/x/", hyperparameters={"performance": {"loss": "full", "compile": True}})
    assert RunIdentity.of(faster) == RunIdentity.of(base)
    assert RunIdentity.of(config_for("s3://adapters/x/", hyperparameters={"seed": 7})) != RunIdentity.of(base)


def test_first_claim_writes_a_marker_and_the_same_run_claims_again(where):
    storage, base = where
    config = config_for(f"{base}/out/")
    me = RunIdentity.of(config)
    assert claim(storage, config, me) is None
    marker = storage.get_json(f"{base}/out/{MARKER}")
    assert marker["run"] == me.dump() and marker["job"] == "bot"
    assert claim(storage, config, me) is None  # a restart before anything was published
    assert storage.get_json(f"{base}/out/{MARKER}") == marker
    check_claim(storage, config, me)
    storage.delete(f"{base}/out/{MARKER}")  # moved aside by another run's overwrite, say
    with pytest.raises(OutputInUseError, match="the claim marker of this run local-.* is gone"):
        check_claim(storage, config, me)


def test_another_run_on_a_claimed_prefix_is_refused_with_what_to_do(where):
    storage, base = where
    first = config_for(f"{base}/out", name="bot")
    claim(storage, first, RunIdentity.of(first))
    edited = config_for(f"{base}/out", name="bot", r=32)  # the bug: lora.r 8 -> 32 on the same output.uri
    with pytest.raises(OutputInUseError) as e:
        claim(storage, edited, RunIdentity.of(edited))
    message = str(e.value)
    assert f"output.uri {base}/out/ holds another run's files" in message
    assert RunIdentity.of(first).uid in message and "job 'bot'" in message
    assert "set a new output.uri" in message and "output.overwrite: true" in message
    assert f"{base}/out.replaced-<UTC time>/" in message and "nothing is deleted" in message
    with pytest.raises(OutputInUseError):  # a run that started first learns it lost the prefix
        check_claim(storage, edited, RunIdentity.of(edited))


def test_a_manifest_from_before_run_identity_counts_as_another_run(where, tmp_path):
    storage, base = where
    publish_run(storage, tmp_path, f"{base}/out/", run=None)
    config = config_for(f"{base}/out/")
    with pytest.raises(OutputInUseError, match="published output of a run that recorded no identity"):
        claim(storage, config, RunIdentity.of(config))
    assert not storage.exists(f"{base}/out/{MARKER}")  # refused: nothing written


def test_the_same_run_after_it_published_is_already_published(where, tmp_path):
    storage, base = where
    config = config_for(f"{base}/out/", output={"uri": f"{base}/out/", "overwrite": True})
    me = RunIdentity.of(config)
    claim(storage, config, me)
    manifest = publish_run(storage, tmp_path, f"{base}/out/", run=me.dump(), job="bot")
    assert claim(storage, config, me) == manifest  # overwrite or not: its own output is never moved
    assert storage.exists(f"{base}/out/adapter_model.safetensors")


def test_another_runs_checkpoints_are_refused(where, tmp_path):
    storage, base = where
    other = RunIdentity("0f6c-other-uid", "ab" * 32)
    publish_run(storage, tmp_path, f"{base}/ckpt/step-00000040/", run=other.dump(), kind="checkpoint")
    config = config_for(f"{base}/out/", checkpoint={"uri": f"{base}/ckpt/"})
    with pytest.raises(OutputInUseError) as e:
        claim(storage, config, RunIdentity.of(config))
    message = str(e.value)
    assert f"checkpoint.uri {base}/ckpt/ holds another run's files" in message
    assert "step-00000040/manifest.json is the checkpoint of run 0f6c-other-uid (spec abababababab)" in message
    assert "set a new checkpoint.uri" in message


def test_overwrite_moves_the_old_output_and_checkpoints_aside(where, tmp_path):
    storage, base = where
    other = RunIdentity("0f6c-other-uid", "ab" * 32)
    old = publish_run(storage, tmp_path, f"{base}/out/", run=other.dump())
    publish_run(storage, tmp_path, f"{base}/out/checkpoints/step-00000008/", run=other.dump(), kind="checkpoint")
    publish_run(storage, tmp_path, f"{base}/ckpt/step-00000016/", run=other.dump(), kind="checkpoint")
    config = config_for(f"{base}/out/", output={"uri": f"{base}/out/", "overwrite": True},
                        checkpoint={"uri": f"{base}/ckpt/"})
    me, events = RunIdentity.of(config), []

    claim(storage, config, me, write=False, report=events.append)  # `kubetune validate`: says, moves nothing
    assert [e["event"] for e in events] == ["output_will_move_aside"] * 2
    assert storage.get_json(f"{base}/out/manifest.json") == old and not storage.exists(f"{base}/ckpt/{MARKER}")

    events.clear()
    assert claim(storage, config, me, report=events.append) is None
    moved = {e["from"]: e for e in events}
    assert list(moved) == [f"{base}/out/", f"{base}/ckpt/"]
    assert all(e["event"] == "output_moved_aside" and e["run"] == other.dump() for e in events)
    out_aside, ckpt_aside = moved[f"{base}/out/"]["to"], moved[f"{base}/ckpt/"]["to"]
    assert out_aside.startswith(f"{base}/out.replaced-") and ckpt_aside.startswith(f"{base}/ckpt.replaced-")
    assert read_published(storage, out_aside, tmp_path / "back") == old  # all there, verified
    assert storage.exists(f"{out_aside}checkpoints/step-00000008/manifest.json")
    assert storage.exists(f"{ckpt_aside}step-00000016/manifest.json")
    assert storage.list(f"{base}/out/") == [f"{base}/out/{MARKER}"]  # only this run's claim is left
    assert storage.list(f"{base}/ckpt/") == [f"{base}/ckpt/{MARKER}"]
    assert claim(storage, config, me, report=events.append) is None and len(events) == 2  # a restart: no move


def test_run_metadata_and_a_verified_server_side_move(storage, tmp_path):
    base = f"s3://adapters/move-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "a"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"x" * 1000)
    storage.with_run("run-1").upload_dir(src, f"{base}/a/")
    storage.with_run("run-1").put_json(f"{base}/a/run.json", {"ok": True})
    head = storage.client.head_object(Bucket="adapters", Key=f"{base[14:]}/a/sub/w.bin")
    assert head["Metadata"]["kubetune-run"] == "run-1"
    assert storage.move_prefix(f"{base}/a", f"{base}/b") == 2
    assert storage.list(f"{base}/a/") == []
    moved = storage.client.head_object(Bucket="adapters", Key=f"{base[14:]}/b/sub/w.bin")
    assert moved["Metadata"] == head["Metadata"]  # it still says which run made it
    assert storage.get_json(f"{base}/b/run.json") == {"ok": True}
    storage.upload_dir(src, f"{base}/c/")
    with pytest.raises(Exception, match="the destination is not empty"):
        storage.move_prefix(f"{base}/c/", f"{base}/b/")
    with pytest.raises(Exception, match="refusing to move a whole bucket"):
        storage.move_prefix("s3://adapters/", f"{base}/d/")


def _cli(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "kubetune_trainer", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_refuses_another_runs_output_and_reruns_its_own(uploaded, s3, storage, trainer_env, tmp_path):
    """`kubetune run` of a FineTuneJob whose output.uri another run published to: exit 73 before any training;
    `kubetune validate` says the same on CPU; the run that published it is already published (exit 0)."""
    out = f"s3://adapters/cli-identity-{uuid.uuid4().hex[:8]}/"
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "cli-bot"},
           "spec": {"baseModel": {"uri": uploaded["model"]}, "dataset": uploaded["data"],
                    "method": {"type": "lora", "lora": {"r": 8}}, "hyperparameters": {"maxSteps": 4},
                    "output": {"uri": out}, "storage": {"endpoint": s3.endpoint}}}
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(job))
    published = publish_run(storage, tmp_path, out, run=RunIdentity.of(load_config(first)).dump(), job="cli-bot")
    published["steps"] = 4
    storage.put_json(out + "manifest.json", published)

    job["spec"]["method"]["lora"]["r"] = 32
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(job))
    for args in (["run", str(edited), "--work-dir", str(tmp_path / "work"), "--metrics-port", "-1"],
                 ["validate", "--config", str(edited)]):
        done = _cli(args, trainer_env)
        assert done.returncode == EXIT_OUTPUT_IN_USE, done.stderr[-3000:]
        assert f"OutputInUse: output.uri {out} holds another run's files" in done.stderr
        assert "output.overwrite: true" in done.stderr
    assert not storage.exists(out + "run.json")  # refused: nothing written

    again = _cli(["run", str(first), "--work-dir", str(tmp_path / "work"), "--metrics-port", "-1"], trainer_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already published {out} (4 steps)" in again.stdout

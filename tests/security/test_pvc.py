"""`pvc://` is honoured everywhere (issue 27, item 5): output, checkpoint and cache URIs on a PersistentVolumeClaim
go to the claim's volume ($KUBETUNE_PVC_ROOT/<claim>, where the operator mounts it), like reads always did.

Before, every write took `pvc://c/out` for the relative path `pvc:/c/out`: on the cluster it failed on the
read-only root, and `kubetune run` reported Succeeded with nothing on the volume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import yaml
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.identity import MARKER, RunIdentity, claim
from kubetune_trainer.storage import Storage, local_path, publish, read_published

from tests.operator_tests import test_e2e as e2e

crd = e2e.crd  # the fixture that applies the CRD, for the cluster test
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]


@pytest.fixture
def pvc_root(tmp_path, monkeypatch):
    """A folder standing for the operator's /mnt/pvc, with the claim `vol` mounted in it."""
    root = tmp_path / "mnt-pvc"
    (root / "vol").mkdir(parents=True)
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(root))
    monkeypatch.chdir(tmp_path)  # where the old code's relative `pvc:/...` folder would appear
    return root


def test_every_storage_operation_maps_pvc_uris_to_the_volume(pvc_root, tmp_path):
    """Not an attack: writes (JSON, files, folders, conditional claims, moves, deletes) and reads of pvc:// URIs
    land on the claim's volume, and nothing lands in the working directory."""
    storage = Storage()
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    storage.put_json("pvc://vol/out/a.json", {"a": 1})
    assert json.loads((pvc_root / "vol/out/a.json").read_text()) == {"a": 1}
    assert storage.get_json("pvc://vol/out/a.json") == {"a": 1}
    assert storage.put_json_if("pvc://vol/out/a.json", {"a": 2}) is None
    manifest = publish(storage, src, "pvc://vol/out/adapter/", {"kind": "test"})
    assert (pvc_root / "vol/out/adapter/manifest.json").is_file()
    assert read_published(storage, "pvc://vol/out/adapter/", tmp_path / "back") == manifest
    assert storage.list("pvc://vol/out/") == ["pvc://vol/out/a.json", "pvc://vol/out/adapter/adapter_model.safetensors",
                                              "pvc://vol/out/adapter/manifest.json"]
    assert storage.move_prefix("pvc://vol/out/adapter/", "pvc://vol/aside/") == 2
    assert (pvc_root / "vol/aside/manifest.json").is_file() and storage.exists("pvc://vol/aside/")
    storage.delete_prefix("pvc://vol/aside/")
    assert not (pvc_root / "vol/aside").exists()
    assert not (tmp_path / "pvc:").exists()


def test_a_claim_on_a_pvc_output_marks_the_volume(pvc_root):
    """The output claim of a pvc:// output (and its checkpoint prefix) is on the volume, so a second run with
    another spec is refused there."""
    from kubetune_api import TrainerConfig

    config = TrainerConfig.model_validate({
        "jobName": "on-pvc", "baseModel": {"uri": "pvc://vol/model/"}, "dataset": {"train": "pvc://vol/t.jsonl"},
        "output": {"uri": "pvc://vol/out/"}, "checkpoint": {"uri": "pvc://vol/ckpt/"}})
    claim(Storage(), config, RunIdentity.of(config))
    assert (pvc_root / "vol/out" / MARKER).is_file() and (pvc_root / "vol/ckpt" / MARKER).is_file()


@pytest.mark.parametrize("uri", ["pvc://vol/../../etc/passwd", "pvc://vol/a/../../other/x", "pvc://../etc",
                                 "pvc:///etc/passwd"])
def test_a_pvc_uri_never_leads_out_of_its_claim(pvc_root, uri):
    """Attack: a pvc:// URI that climbs out of its claim's folder (to another claim's volume, or the pod's own
    files). Answer: refused, naming the URI, before anything is read or written."""
    with pytest.raises(ConfigError, match="pvc://"):
        local_path(uri)
    with pytest.raises(ConfigError):
        Storage().put_json(uri.rstrip("/") + "/x.json", {})


@pytest.mark.slow
def test_kubetune_run_writes_output_checkpoints_and_cache_to_the_volume(pvc_root, tmp_path):
    """`kubetune run` of a FineTuneJob whose model, data, output, checkpoints and cache are all on a claim: the
    adapter, its manifest, the checkpoints and the data cache are on the volume (before: Succeeded, with
    everything under ./pvc:/ and nothing on the volume)."""
    from kubetune_dev.demo_data import chat_texts, support_records, write_support_dataset
    from kubetune_dev.tiny import make_tiny_base

    make_tiny_base(pvc_root / "vol/model", chat_texts(support_records(60, seed=1)), vocab_size=512,
                   hidden_size=32, layers=1, heads=2)
    write_support_dataset(pvc_root / "vol/data", train=32, validation=8, test=8)
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "pvc-run"},
           "spec": {"baseModel": {"uri": "pvc://vol/model/"},
                    "dataset": {"train": "pvc://vol/data/train.jsonl", "validation": "pvc://vol/data/validation.jsonl",
                                "test": "pvc://vol/data/test.jsonl", "cacheUri": "pvc://vol/cache/"},
                    "hyperparameters": {"maxSteps": 4, "batchSize": 4, "maxSeqLength": 256},
                    "checkpoint": {"uri": "pvc://vol/ckpt/", "everySteps": 2, "keep": 1},
                    "output": {"uri": "pvc://vol/out/"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": os.devnull}
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer", "run", str(path), "--work-dir",
                           str(tmp_path / f"work-{uuid.uuid4().hex[:6]}"), "--metrics-port", "-1"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((pvc_root / "vol/out/manifest.json").read_text())
    assert manifest["steps"] == 4 and (pvc_root / "vol/out/adapter_model.safetensors").is_file()
    assert not (pvc_root / "vol/out/.staging").exists()
    assert sorted(p.name for p in (pvc_root / "vol/ckpt").glob("step-*")) == ["step-00000002"]
    assert list((pvc_root / "vol/cache").glob("*/meta.json")), "the data cache is on the volume"
    assert not (tmp_path / "pvc:").exists()


# --- on the cluster: the real API server, scheduler, operator and trainer; the node agent mounts the claim --------

POLICY_LABEL = "kubetune.io/pvc-test"


@pytest.fixture(scope="module")
def pvc_admission(control_plane, crd):
    """The admission policy bound to namespaces labelled POLICY_LABEL: the operator then trusts the API server's
    check that the author may use the claims a job names (without it, a pvc:// job is refused)."""
    from pathlib import Path

    from kubetune_operator import policy

    from tests.kube import kubectl

    root = Path(__file__).resolve().parents[2]
    name = f"kubetune-pvc-test-{uuid.uuid4().hex[:6]}"
    vap, binding, params = yaml.safe_load_all((root / "crds" / "policy" / "admission-policy.yaml").read_text())
    ns = f"kubetune-system-{uuid.uuid4().hex[:6]}"
    kubectl(control_plane, "create", "namespace", ns)
    params["metadata"]["namespace"] = binding["spec"]["paramRef"]["namespace"] = ns
    vap["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = name
    params["data"] = policy.Settings(image_prefixes=("ghcr.io/kubetune/trainer",)).params()
    binding["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {POLICY_LABEL: "true"}}}
    for doc in (vap, params, binding):
        kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(doc))
    yield name
    for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
        kubectl(control_plane, "delete", kind, name, "--wait=false")
    kubectl(control_plane, "delete", "namespace", ns, "--wait=false")


@pytest.fixture(scope="module")
def pvc_operator(control_plane, crd, pvc_admission, tmp_path_factory):
    yield from e2e.run_operator(tmp_path_factory, e2e.operator_env(control_plane,
                                                                   KUBETUNE_POLICY_BINDING=pvc_admission))


@pytest.fixture
def real_trainer(node_agent):
    """test_e2e's real trainer (`kubetune launch` from the .venv), with this checkout's PYTHONPATH: the .venv's
    editable installs may point at another checkout, whose trainer the pods would run otherwise."""
    from pathlib import Path

    from kubetune_dev.cluster.agent_pod import ImageRule

    venv_bin = Path(sys.executable).parent
    rule = ImageRule(match=e2e.REAL_IMAGE, path=[str(venv_bin)], working_dir=str(e2e.ROOT),
                     entrypoint=[str(venv_bin / "kubetune"), "launch"],
                     env={k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ})
    node_agent.image_rules.insert(0, rule)
    yield e2e.REAL_IMAGE
    node_agent.image_rules.remove(rule)


def _claim(cp, namespace: str, name: str) -> None:
    """A PersistentVolumeClaim bound to a PersistentVolume of its own (the node agent backs every claim with a
    folder of its state dir: state_dir/pvcs/<namespace>/<claim>)."""
    from tests.kube import kubectl

    pv = f"pv-{namespace}-{name}"
    for doc in ({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                 "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                          "hostPath": {"path": f"/tmp/{pv}"}, "claimRef": {"namespace": namespace, "name": name}}},
                {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                 "metadata": {"name": name, "namespace": namespace},
                 "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
                          "resources": {"requests": {"storage": "1Gi"}}}}):
        kubectl(cp, "apply", "-f", "-", stdin=json.dumps(doc))


@pytest.mark.cluster
@pytest.mark.e2e
@pytest.mark.slow
def test_a_finetunejob_on_a_pvc_writes_output_checkpoints_and_cache_to_the_claim(
        control_plane, node_agent, namespace, pvc_operator, real_trainer):
    """On the cluster: model, data, output, checkpoints and cache all on one claim. The validation Job and the
    training pods mount it at /mnt/pvc/<claim>; the run succeeds and everything is on the claim's volume (before:
    the writes went to the relative path pvc:/..., on the pods' read-only root, and the job failed)."""
    from kubetune_dev.demo_data import generic_texts, write_support_dataset
    from kubetune_dev.tiny import make_tiny_base

    from tests.kube import kubectl
    from tests.operator_tests.test_e2e import submit, wait_phase

    kubectl(control_plane, "label", "namespace", namespace, f"{POLICY_LABEL}=true")
    _claim(control_plane, namespace, "vol")
    volume = node_agent.state_dir / "pvcs" / namespace / "vol"
    make_tiny_base(volume / "model", generic_texts(50), vocab_size=512, hidden_size=32, layers=1, heads=2)
    write_support_dataset(volume / "data", train=32, validation=8, test=8)
    submit(control_plane, namespace, "on-pvc", {
        "baseModel": {"uri": "pvc://vol/model/"}, "image": real_trainer,
        "dataset": {"train": "pvc://vol/data/train.jsonl", "validation": "pvc://vol/data/validation.jsonl",
                    "test": "pvc://vol/data/test.jsonl", "cacheUri": "pvc://vol/cache/"},
        "hyperparameters": {"maxSteps": 4, "batchSize": 2, "maxSeqLength": 256},
        "checkpoint": {"uri": "pvc://vol/ckpt/", "everySteps": 2},
        "output": {"uri": "pvc://vol/out/"}, "resources": {"workers": 1, "gpusPerWorker": 0}})
    status = wait_phase(control_plane, namespace, "on-pvc", ("Succeeded", "Failed"), timeout=480)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["manifestUri"] == "pvc://vol/out/manifest.json"
    manifest = json.loads((volume / "out" / "manifest.json").read_text())
    assert manifest["steps"] == 4 and (volume / "out" / "adapter_model.safetensors").is_file()
    assert (volume / "ckpt" / "step-00000002" / "manifest.json").is_file()
    assert list((volume / "cache").glob("*/meta.json")), "the validation Job's data cache is on the claim"

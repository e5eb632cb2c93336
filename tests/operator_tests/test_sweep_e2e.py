"""FineTuneSweep on the real API server: the CRD's CEL rules refuse each bad spec naming the field; with the
operator and the real trainer, a small sweep runs its trials to the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetune_api import StorageEndpoint
from kubetune_dev.cluster.kueue import wait_established
from kubetune_trainer.storage import Storage

from tests.kube import get_json, kubectl, wait_for
from tests.operator_tests import test_e2e as e2e
from tests.operator_tests.test_sweep_api import BAD, sweep

real_trainer = e2e.real_trainer  # the e2e fixture

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
pytest_plugins = ["kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures", "tests.s3fixtures"]

ROOT = Path(__file__).resolve().parents[2]
CRDS = [ROOT / "crds" / "kubetune.io_finetunejobs.yaml", ROOT / "crds" / "kubetune.io_finetunesweeps.yaml"]


@pytest.fixture(scope="module")
def crds(control_plane):
    for path in CRDS:
        kubectl(control_plane, "apply", "--server-side", "-f", str(path))
    wait_established(control_plane.kubeconfig, ["finetunejobs.kubetune.io", "finetunesweeps.kubetune.io"])


@pytest.mark.parametrize("name", BAD)
def test_each_bad_spec_is_refused_naming_the_field(control_plane, crds, namespace, name):
    doc, message, field = BAD[name]
    out = kubectl(control_plane, "create", "-n", namespace, "--dry-run=server", "-f", "-",
                  stdin=json.dumps(doc), check=False)
    assert out.returncode != 0, f"{name} was accepted"
    assert message in out.stderr and field in out.stderr, out.stderr


def test_a_valid_sweep_is_accepted_defaulted_and_listed(control_plane, crds, namespace):
    kubectl(control_plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(sweep()))
    spec = get_json(control_plane, "fts", "-n", namespace, "search")["spec"]
    assert (spec["algorithm"], spec["earlyStopping"], spec["maxTrials"], spec["parallelTrials"]) == (
        "tpe", "asha", 10, 2)
    assert spec["template"]["hyperparameters"]["scheduler"] == "cosine"  # the template's defaults too
    header = kubectl(control_plane, "get", "fts", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "TRIALS", "BEST", "METRIC", "AGE"]


# -- the operator runs a sweep, with the real trainer -----------------------------------------------------------


@pytest.fixture(scope="module")
def operator(control_plane, crds, s3_server, tmp_path_factory):
    """The operator with both CRDs installed (it serves FineTuneSweeps only then), the test S3 server's
    credentials as the platform's."""
    yield from e2e.run_operator(tmp_path_factory, e2e.operator_env(control_plane,
                                                                  **e2e.platform_credentials(s3_server.endpoint)))


@pytest.fixture
def trainer(node_agent, real_trainer):
    """The real trainer, with this checkout's PYTHONPATH in its pods (the venv's editable installs may point at
    another checkout of the repository)."""
    rule = next(r for r in node_agent.image_rules if r.match == real_trainer)
    rule.pass_env = [*rule.pass_env, "PYTHONPATH"]
    return real_trainer


@pytest.fixture
def tiny_task(s3_server, bucket, tmp_path):
    """A tiny causal LM and train and validation splits in the test bucket."""
    from kubetune_dev.demo_data import generic_texts, write_support_dataset
    from kubetune_dev.tiny import make_tiny_base

    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    base = make_tiny_base(tmp_path / "tiny", generic_texts(50), vocab_size=512, hidden_size=32, layers=1, heads=2)
    storage.upload_dir(base, f"s3://{bucket}/model/")
    data = write_support_dataset(tmp_path / "data", train=48, validation=8, test=1)
    for split in ("train", "validation"):
        storage.upload_file(data[split], f"s3://{bucket}/data/{split}.jsonl")
    return {"model": f"s3://{bucket}/model/", "data": f"s3://{bucket}/data/", "output": f"s3://{bucket}/sweep/",
            "storage": storage}


def test_a_tpe_asha_sweep_runs_its_trials_to_the_best(control_plane, node_agent, namespace, operator, tiny_task,
                                                      trainer):
    """Four trials, one at a time (the node agent's pods share the host's ports), of 40 steps evaluated every 4; the
    operator killed and restarted mid-sweep; the best trial promoted."""
    e2e.credentials(control_plane, namespace)
    d = tiny_task["data"]
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "lr"}, "spec": {
        "template": {
            "baseModel": {"uri": tiny_task["model"]}, "image": trainer,
            "dataset": {"train": f"{d}train.jsonl", "validation": f"{d}validation.jsonl"},
            "hyperparameters": {"maxSteps": 40, "batchSize": 2, "maxSeqLength": 128, "loggingSteps": 4},
            "evaluation": {"everySteps": 4, "baseline": False},
            "resources": {"workers": 1, "gpusPerWorker": 0}},
        "parameters": [{"path": "hyperparameters.learningRate", "min": 1e-5, "max": 0.3, "log": True},
                       {"path": "method.lora.r", "min": 2, "max": 8}],
        "maxTrials": 4, "parallelTrials": 1, "promote": "best", "output": {"uri": tiny_task["output"]}}}
    kubectl(control_plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(doc))
    wait_for("the first trial", lambda: kubectl(control_plane, "get", "ftj", "-n", namespace, "lr-0",
                                                check=False).returncode == 0, timeout=60)
    first = get_json(control_plane, "ftj", "-n", namespace, "lr-0")
    operator.stop(kill=True)  # mid-sweep, no goodbye: the next one rebuilds the search from the API
    operator.start()

    def ended():
        status = get_json(control_plane, "fts", "-n", namespace, "lr").get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for("the sweep to end", ended, timeout=600)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    trials = status["trials"]
    assert [t["name"] for t in trials] == ["lr-0", "lr-1", "lr-2", "lr-3"]
    jobs = get_json(control_plane, "ftj", "-n", namespace, "-l", "kubetune.io/sweep=lr")["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == ["lr-0", "lr-1", "lr-2", "lr-3"]  # no duplicate
    assert next(j for j in jobs if j["metadata"]["name"] == "lr-0")["metadata"]["uid"] == first["metadata"]["uid"]
    assert {t["phase"] for t in trials} <= {"Succeeded", "Pruned"}
    succeeded = [t for t in trials if t["phase"] == "Succeeded"]
    best = min(succeeded, key=lambda t: t["metric"])
    assert status["best"]["trial"] == best["name"] and status["best"]["metric"] == best["metric"]
    assert status["best"]["parameters"] == best["parameters"] and 2 <= best["parameters"]["method.lora.r"] <= 8
    # The best trial's reported value is its published model's validation loss, in its manifest too.
    job = get_json(control_plane, "ftj", "-n", namespace, best["name"])
    assert job["status"]["result"]["metrics"]["validation"]["loss"] == best["metric"]
    assert job["spec"]["output"]["uri"] == tiny_task["output"] + f"trials/{best['name']}/"
    assert job["spec"]["method"]["lora"]["r"] == best["parameters"]["method.lora.r"]
    manifest = tiny_task["storage"].get_json(job["status"]["result"]["manifestUri"])
    assert manifest["metrics"]["validation"]["loss"] == pytest.approx(best["metric"], rel=1e-5)
    # promote: best copied the winner to <output>best/, sweep.json naming the trial and its parameters
    assert status["promotion"] == {"trial": best["name"], "uri": tiny_task["output"] + "best/", "phase": "Succeeded"}
    promoted = tiny_task["storage"].get_json(tiny_task["output"] + "best/sweep.json")
    assert (promoted["sweep"], promoted["trial"], promoted["parameters"]) == ("lr", best["name"], best["parameters"])
    assert tiny_task["storage"].get_json(tiny_task["output"] + "best/manifest.json") == manifest
    assert tiny_task["storage"].exists(tiny_task["output"] + "best/adapter_model.safetensors")
    # One data cache for the sweep: every trial's validation found or wrote it there.
    caches = {get_json(control_plane, "ftj", "-n", namespace, t["name"])["status"]["dataset"]["cacheUri"]
              for t in trials}
    assert len(caches) == 1 and caches.pop().startswith(tiny_task["output"] + "data-cache/")
    reasons = [e["reason"] for e in e2e.events_of(control_plane, namespace, "lr")]
    assert reasons.count("TrialCreated") == 4 and "NewBest" in reasons and "Promoting" in reasons
    assert "SearchCompleted" in reasons
    pruned = [t for t in trials if t["phase"] == "Pruned"]
    assert reasons.count("TrialPruned") == len(pruned)
    for t in pruned:
        assert get_json(control_plane, "ftj", "-n", namespace, t["name"])["spec"]["runPolicy"]["suspend"] is True
    print(f"trials: {[(t['name'], t['phase'], t.get('metric')) for t in trials]}")
    row = kubectl(control_plane, "get", "fts", "-n", namespace, "lr").stdout.splitlines()[1].split()
    assert row[1:3] == ["Succeeded", "4/4"] and row[4] == "loss"


def test_a_template_with_bad_data_ends_the_sweep_after_max_failed_trials(control_plane, node_agent, namespace,
                                                                         operator, tiny_task, trainer, tmp_path):
    """Each trial's validation (on CPU, no training) refuses line 2: two failed trials end the sweep, not ten."""
    e2e.credentials(control_plane, namespace)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine record"}\nthis is not json\n')
    tiny_task["storage"].upload_file(bad, tiny_task["data"] + "bad.jsonl")
    doc = sweep(template={"baseModel": {"uri": tiny_task["model"]}, "image": trainer,
                          "dataset": {"train": tiny_task["data"] + "bad.jsonl",
                                      "validation": tiny_task["data"] + "validation.jsonl"},
                          "evaluation": {"everySteps": 2}, "resources": {"workers": 1, "gpusPerWorker": 0}},
                maxFailedTrials=2, parallelTrials=1, output={"uri": tiny_task["output"]})
    kubectl(control_plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(doc))

    def ended():
        status = get_json(control_plane, "fts", "-n", namespace, "search").get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for("the sweep to fail", ended, timeout=240)
    assert (status["phase"], status["reason"]) == ("Failed", "TooManyFailedTrials"), status
    assert "DatasetInvalid: " in status["message"] and "bad.jsonl:2: invalid JSON" in status["message"]
    assert [t["phase"] for t in status["trials"]] == ["Failed", "Failed"]
    assert len(get_json(control_plane, "ftj", "-n", namespace, "-l", "kubetune.io/sweep=search")["items"]) == 2

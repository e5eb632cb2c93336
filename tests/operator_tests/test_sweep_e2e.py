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
    credentials as the platform's. Its resync every 5 s, not every second: each trial's FineTuneJob has a
    supervisor that would reconcile each second, ended or not; events and the scrapes (each second) drive it."""
    env = e2e.operator_env(control_plane, KUBETUNE_RESYNC_SECONDS="5", **e2e.platform_credentials(s3_server.endpoint))
    yield from e2e.run_operator(tmp_path_factory, env)


@pytest.fixture
def trainer(node_agent, real_trainer):
    """The real trainer, with this checkout's PYTHONPATH in its pods (the venv's editable installs may point at
    another checkout of the repository)."""
    rule = next(r for r in node_agent.image_rules if r.match == real_trainer)
    rule.pass_env = [*rule.pass_env, "PYTHONPATH"]
    return real_trainer


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny causal LM, made once for the module's tests (about 3 CPU-seconds)."""
    from kubetune_dev.demo_data import generic_texts
    from kubetune_dev.tiny import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny"), generic_texts(50), vocab_size=512, hidden_size=32,
                          layers=1, heads=2)


@pytest.fixture
def tiny_task(s3_server, bucket, tmp_path, tiny_base):
    """The tiny causal LM and train and validation splits in the test bucket."""
    from kubetune_dev.demo_data import write_support_dataset

    storage = Storage(StorageEndpoint(endpoint=s3_server.endpoint))
    storage.upload_dir(tiny_base, f"s3://{bucket}/model/")
    data = write_support_dataset(tmp_path / "data", train=48, validation=8, test=1)
    for split in ("train", "validation"):
        storage.upload_file(data[split], f"s3://{bucket}/data/{split}.jsonl")
    return {"model": f"s3://{bucket}/model/", "data": f"s3://{bucket}/data/", "output": f"s3://{bucket}/sweep/",
            "storage": storage}


LR, RANK = "hyperparameters.learningRate", "method.lora.r"
SEED = 4  # TPE starts with two random trials, seeded: lr-0's learning rate learns, lr-1's barely moves the loss


def first_trials(doc: dict) -> list[dict]:
    """The parameters of the sweep's first two trials, from the pure search (the operator's)."""
    from kubetune_api import FineTuneSweepSpec
    from kubetune_search import ask, study

    spec = FineTuneSweepSpec.model_validate(doc["spec"])
    s = study(spec)
    return [ask(s, spec, n).params for n in range(2)]


def lr_sweep(tiny_task: dict, trainer: str) -> dict:
    """Six trials of 80 steps, evaluated every 4: ASHA's rungs at steps 4, 12 and 36. The tiny model trains them in
    a second or two (about 10 ms a step); the operator's scrape (every second here) sees a trial's evaluations
    while it trains or publishes (seconds more), and a trailing trial is pruned before its run ends."""
    d = tiny_task["data"]
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "lr"}, "spec": {
        "template": {
            "baseModel": {"uri": tiny_task["model"]}, "image": trainer,
            "dataset": {"train": f"{d}train.jsonl", "validation": f"{d}validation.jsonl"},
            "hyperparameters": {"maxSteps": 80, "batchSize": 2, "maxSeqLength": 128, "loggingSteps": 4},
            "evaluation": {"everySteps": 4, "baseline": False},
            "resources": {"workers": 1, "gpusPerWorker": 0}},
        "parameters": [{"path": LR, "min": 1e-5, "max": 0.3, "log": True}, {"path": RANK, "min": 2, "max": 8}],
        "algorithm": "tpe", "earlyStopping": "asha", "seed": SEED, "maxTrials": 6, "parallelTrials": 1,
        "promote": "best", "output": {"uri": tiny_task["output"]}}}


def test_a_tpe_asha_sweep_prunes_a_trailing_trial_and_promotes_the_best(control_plane, node_agent, namespace,
                                                                         operator, tiny_task, trainer):
    """Six trials, one at a time (the node agent's pods share the host's ports); the operator killed and restarted
    mid-sweep; lr-1 (a learning rate too small to learn) pruned while it runs, the best trial promoted."""
    doc = lr_sweep(tiny_task, trainer)
    # The design: lr-0 learns (its validation loss 6.18 at step 4, under 6.15 from step 8 on), lr-1's learning
    # rate is too small to (6.24 at step 4, still 6.22 at step 80): lr-1 trails at the first rung whichever of their
    # evaluations the scrapes catch, and is pruned there.
    first, second = first_trials(doc)
    assert 0.01 <= first[LR] <= 0.1 and second[LR] <= 1e-4, (first, second)
    e2e.credentials(control_plane, namespace)
    kubectl(control_plane, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(doc))
    wait_for("the first trial", lambda: kubectl(control_plane, "get", "ftj", "-n", namespace, "lr-0",
                                                check=False).returncode == 0, timeout=60)
    first = get_json(control_plane, "ftj", "-n", namespace, "lr-0")
    # and its Event, which the operator posts after the trial and the status: a kill between them loses it (Events
    # are best effort), and the events counted below would then be one short.
    e2e.events_of(control_plane, namespace, "lr", {"TrialCreated": 1})
    operator.stop(kill=True)  # mid-sweep, no goodbye: the next one rebuilds the search from the API
    operator.start()

    def ended():
        status = get_json(control_plane, "fts", "-n", namespace, "lr").get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for("the sweep to end", ended, timeout=600, every=3)  # each look is a kubectl
    trials = status["trials"]
    print("trials:\n" + "\n".join(
        f"{t['name']} {t['phase']:9} lr {t['parameters'][LR]:.3g} r {t['parameters'][RANK]} metric "
        f"{t.get('metric')} step {t.get('step')} seen {[(p['step'], p['value']) for p in t.get('history') or []]}"
        for t in trials))
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    names = [f"lr-{n}" for n in range(6)]
    assert [t["name"] for t in trials] == names
    jobs = {j["metadata"]["name"]: j for j in get_json(control_plane, "ftj", "-n", namespace, "-l",
                                                       "kubetune.io/sweep=lr")["items"]}
    assert sorted(jobs) == names  # no duplicate
    assert jobs["lr-0"]["metadata"]["uid"] == first["metadata"]["uid"]
    # Pruned: lr-1 by design, maybe others; each one's FineTuneJob suspended (a checkpoint, then stopped) with
    # why, and an Event naming it. The rest ran to the end.
    pruned = [t["name"] for t in trials if t["phase"] == "Pruned"]
    assert "lr-1" in pruned and all(t["phase"] == "Succeeded" for t in trials if t["name"] not in pruned)
    events = e2e.events_of(control_plane, namespace, "lr", {"TrialCreated": 6, "TrialPruned": len(pruned), "NewBest": 1,
                                                           "Promoting": 1, "SearchCompleted": 1})
    pruned_events = sorted(e["message"].split(":")[0] for e in events if e["reason"] == "TrialPruned")
    assert pruned_events == sorted(pruned)
    for name in pruned:
        job = jobs[name]
        assert job["spec"]["runPolicy"]["suspend"] is True
        assert job["metadata"]["annotations"]["kubetune.io/pruned"].startswith(f"{name}: ")
        assert job["status"].get("phase") != "Succeeded" and job["status"].get("result") is None
    # The best: the succeeded trial with the lowest validation loss, as each reported it in its result.
    succeeded = [t for t in trials if t["phase"] == "Succeeded"]
    reported = {t["name"]: jobs[t["name"]]["status"]["result"]["metrics"]["validation"]["loss"] for t in succeeded}
    assert {t["name"]: t["metric"] for t in succeeded} == reported
    best = min(succeeded, key=lambda t: t["metric"])
    assert status["best"]["trial"] == best["name"] and status["best"]["metric"] == min(reported.values())
    assert status["best"]["parameters"] == best["parameters"] and 2 <= best["parameters"][RANK] <= 8
    job = jobs[best["name"]]
    assert job["spec"]["output"]["uri"] == tiny_task["output"] + f"trials/{best['name']}/"
    assert job["spec"]["method"]["lora"]["r"] == best["parameters"][RANK]
    assert job["spec"]["hyperparameters"]["learningRate"] == best["parameters"][LR]
    manifest = tiny_task["storage"].get_json(job["status"]["result"]["manifestUri"])
    assert manifest["job"] == best["name"]
    assert manifest["metrics"]["validation"]["loss"] == pytest.approx(best["metric"], rel=1e-5)
    # promote: best copied the winner to <output>best/: its manifest (naming the trial) and sweep.json
    assert status["promotion"] == {"trial": best["name"], "uri": tiny_task["output"] + "best/", "phase": "Succeeded"}
    promoted = tiny_task["storage"].get_json(tiny_task["output"] + "best/sweep.json")
    assert (promoted["sweep"], promoted["trial"], promoted["parameters"]) == ("lr", best["name"], best["parameters"])
    assert promoted["metric"] == {"loss": best["metric"]}
    assert tiny_task["storage"].get_json(tiny_task["output"] + "best/manifest.json") == manifest
    assert tiny_task["storage"].exists(tiny_task["output"] + "best/adapter_model.safetensors")
    # One data cache for the sweep: every trial's validation found or wrote it there.
    caches = {jobs[name]["status"]["dataset"]["cacheUri"] for name in names}
    assert len(caches) == 1 and caches.pop().startswith(tiny_task["output"] + "data-cache/")
    reasons = [e["reason"] for e in events]
    assert reasons.count("TrialCreated") == 6 and "NewBest" in reasons and "Promoting" in reasons
    assert "SearchCompleted" in reasons
    row = kubectl(control_plane, "get", "fts", "-n", namespace, "lr").stdout.splitlines()[1].split()
    assert row[1:3] == ["Succeeded", "6/6"] and row[4] == "loss"


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

    status = wait_for("the sweep to fail", ended, timeout=240, every=2)
    assert (status["phase"], status["reason"]) == ("Failed", "TooManyFailedTrials"), status
    assert "DatasetInvalid: " in status["message"] and "bad.jsonl:2: invalid JSON" in status["message"]
    assert [t["phase"] for t in status["trials"]] == ["Failed", "Failed"]
    assert len(get_json(control_plane, "ftj", "-n", namespace, "-l", "kubetune.io/sweep=search")["items"]) == 2

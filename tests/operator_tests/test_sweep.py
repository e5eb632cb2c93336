"""sweep.decide: pure, like reconcile.decide. From (FineTuneSweep, its trial FineTuneJobs, now): the trials to
create and prune, the status and the Events; Optuna's study rebuilt from the API each time."""

from __future__ import annotations

import copy
import json

import pytest
from kubetune_api import FineTuneJobSpec, FineTuneSweepSpec, FineTuneSweepStatus
from kubetune_operator import kube
from kubetune_operator import sweep as sw
from kubetune_operator.settings import OperatorSettings

from tests.operator_tests.builders import NOW, UID

LR = {"path": "hyperparameters.learningRate", "min": 1e-5, "max": 1e-2, "log": True}
RANK = {"path": "method.lora.r", "min": 2, "max": 16}


def fts(status: dict | None = None, name: str = "s", **spec) -> dict:
    body = {
        "template": {"baseModel": {"uri": "s3://m/"},
                     "dataset": {"train": "s3://d/train.jsonl", "validation": "s3://d/val.jsonl"},
                     "evaluation": {"everySteps": 2}, "hyperparameters": {"maxSteps": 8},
                     "scheduling": {"queueName": "team-a"}},
        "parameters": [LR, RANK], "output": {"uri": "s3://o/sweep/"}, "maxTrials": 6, "parallelTrials": 2,
    }
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": name, "namespace": "ml", "uid": UID, "generation": 1},
            "spec": {**body, **spec}, "status": status or {}}


def trial(number: int, phase: str = "Running", params: dict | None = None, history: dict | None = None,
          final: float | None = None, sweep: str = "s", spec: dict | None = None, **status) -> dict:
    """A trial FineTuneJob as the API shows it: `history` {step: loss} is its status's last evaluation."""
    params = params or {"hyperparameters.learningRate": 1e-3, "method.lora.r": 8}
    st: dict = {"phase": phase, **status}
    if history:
        step = max(history)
        st.update(evalStep=step, evalMetrics={"loss": history[step]})
    if final is not None:
        st["result"] = {"adapterUri": f"s3://o/sweep/trials/{sweep}-{number}/", "metrics": {"validation":
                                                                                          {"loss": final}}}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": f"{sweep}-{number}", "namespace": "ml",
                         "annotations": {sw.PARAMETERS: json.dumps(params)}, "labels": {sw.SWEEP_LABEL: sweep}},
            "spec": {"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl"},
                     "output": {"uri": f"s3://o/sweep/trials/{sweep}-{number}/"}, **(spec or {})},
            "status": st}


def recorded(jobs: list[dict], histories: dict[int, dict]) -> dict:
    """A sweep status that has seen each trial's whole history (as earlier reconciles would have)."""
    return {"phase": "Running", "trials": [
        {"name": j["metadata"]["name"], "number": n, "parameters": {}, "phase": "Running",
         "history": [{"step": s, "value": v} for s, v in histories[n].items()]}
        for n, j in enumerate(jobs) if n in histories]}


def reasons(d: sw.SweepDecision) -> list[str]:
    return [r for _, r, _ in d.events]


def test_the_first_reconcile_starts_parallel_trials_from_the_template():
    d = sw.decide(fts(), [], NOW)
    assert [j["metadata"]["name"] for j in d.create] == ["s-0", "s-1"]
    first = d.create[0]
    params = json.loads(first["metadata"]["annotations"][sw.PARAMETERS])
    assert 1e-5 <= params["hyperparameters.learningRate"] <= 1e-2 and isinstance(params["method.lora.r"], int)
    spec = first["spec"]
    assert spec["hyperparameters"] == {"maxSteps": 8, "learningRate": params["hyperparameters.learningRate"]}
    assert spec["method"]["lora"]["r"] == params["method.lora.r"]
    assert spec["output"]["uri"] == "s3://o/sweep/trials/s-0/" and spec["dataset"]["cacheUri"] == "s3://o/sweep/data-cache/"
    assert spec["scheduling"]["queueName"] == "team-a" and first["metadata"]["labels"] == {sw.SWEEP_LABEL: "s"}
    owner = first["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneSweep", UID, True)
    assert (d.status["phase"], d.status["progress"], d.status["objective"]) == ("Running", "0/6", "loss (minimize)")
    assert [t["phase"] for t in d.status["trials"]] == ["Pending", "Pending"]
    assert reasons(d) == ["TrialCreated", "TrialCreated"]
    FineTuneSweepStatus.model_validate(d.status)


def test_the_same_api_state_gives_the_same_trials_and_the_seed_changes_them():
    def params(d):
        return [j["metadata"]["annotations"][sw.PARAMETERS] for j in d.create]

    assert params(sw.decide(fts(), [], NOW)) == params(sw.decide(fts(), [], NOW))
    assert params(sw.decide(fts(), [], NOW)) != params(sw.decide(fts(seed=7), [], NOW))
    assert params(sw.decide(fts(), [], NOW))[0] != params(sw.decide(fts(), [], NOW))[1]


def test_a_restarted_operator_creates_no_duplicate():
    """No status at all (lost), the trials exist: nothing new while the slots are full; then the next number."""
    jobs = [trial(0), trial(1)]
    assert sw.decide(fts(), jobs, NOW).create == []
    d = sw.decide(fts(parallelTrials=3), jobs, NOW)
    assert [j["metadata"]["name"] for j in d.create] == ["s-2"]
    ended = trial(5, "Succeeded", final=1.0)
    assert [j["metadata"]["name"] for j in sw.decide(fts(parallelTrials=3), [*jobs, ended], NOW).create] == ["s-6"]


def test_a_finished_trial_frees_its_slot_and_the_history_builds_up():
    jobs = [trial(0, "Succeeded", history={8: 1.2}, final=1.1), trial(1, history={2: 1.0})]
    old = recorded(jobs, {1: {}})
    d = sw.decide(fts(status=old), jobs, NOW)
    assert [j["metadata"]["name"] for j in d.create] == ["s-2"] and d.prune == {}
    views = {t["name"]: t for t in d.status["trials"]}
    assert views["s-0"]["metric"] == 1.1 and views["s-0"]["phase"] == "Succeeded"
    assert views["s-1"]["history"] == [{"step": 2, "value": 1.0}] and views["s-1"]["metric"] == 1.0
    jobs[1] = trial(1, history={4: 0.8})
    d = sw.decide(fts(status=d.status), jobs, NOW)
    assert {t["name"]: t for t in d.status["trials"]}["s-1"]["history"] == [
        {"step": 2, "value": 1.0}, {"step": 4, "value": 0.8}]


def test_the_history_kept_is_bounded():
    view = sw.Trial("s-0", 0, {}, sw.TrialPhase.Running, {s: 1.0 / s for s in range(1, 301)}).dump()
    steps = [p["step"] for p in view["history"]]
    assert len(steps) == sw.MAX_HISTORY and steps[:2] == [1, 2] and steps[-2:] == [99, 300]


def test_best_follows_the_goal_and_a_new_best_is_an_event():
    jobs = [trial(0, "Succeeded", final=1.5), trial(1, "Succeeded", final=1.2, params={
        "hyperparameters.learningRate": 1e-4, "method.lora.r": 4})]
    d = sw.decide(fts(), jobs, NOW)
    assert d.status["best"] == {"trial": "s-1", "metric": 1.2, "adapterUri": "s3://o/sweep/trials/s-1/",
                                "parameters": {"hyperparameters.learningRate": 1e-4, "method.lora.r": 4}}
    assert "NewBest" in reasons(d)
    assert "NewBest" not in reasons(sw.decide(fts(status=d.status), jobs, NOW))
    maximize = sw.decide(fts(objective={"goal": "maximize"}), jobs, NOW)
    assert maximize.status["best"]["trial"] == "s-0"


def test_asha_prunes_a_running_trial_that_trails_at_a_rung():
    good = {2: 1.0, 4: 0.8, 6: 0.7, 8: 0.6}
    jobs = [trial(0, "Succeeded", history=good, final=0.6), trial(1, "Succeeded", history={2: 1.1, 4: 0.9},
                                                                   final=0.9),
            trial(2, history={2: 3.0})]
    old = recorded(jobs, {0: good, 1: {2: 1.1, 4: 0.9}})
    d = sw.decide(fts(status=old), jobs, NOW)
    assert list(d.prune) == ["s-2"] and "3 at step 2" in d.prune["s-2"]
    assert "SuccessiveHalvingPruner" in d.prune["s-2"] and "TrialPruned" in reasons(d)
    assert {t["name"]: t["phase"] for t in d.status["trials"]}["s-2"] == "Pruned"
    # ...and a trial ahead of the others runs on
    jobs[2] = trial(2, history={2: 0.5})
    assert sw.decide(fts(status=old), jobs, NOW).prune == {}


def test_a_trial_that_ended_between_scrapes_competes_with_its_published_evaluation():
    """s-0 was scraped at step 2 only, then ended: its published step's value (result.selectedStep) joins its
    history, so s-1, ahead at rung 0 (step 2) but trailing at rung 1 (step 6), is pruned there."""
    done = trial(0, "Succeeded", history={2: 1.0}, final=0.5)
    done["status"]["result"]["selectedStep"] = 8
    jobs = [done, trial(1, history={6: 0.95})]
    old = recorded(jobs, {0: {2: 1.0}, 1: {2: 0.9}})
    d = sw.decide(fts(status=old), jobs, NOW)
    assert d.status["trials"][0]["history"] == [
        {"step": 2, "value": 1.0}, {"step": 8, "value": 0.5}]
    assert list(d.prune) == ["s-1"] and "0.95 at step 6" in d.prune["s-1"]
    del done["status"]["result"]["selectedStep"]  # without it, s-1 would be alone at rung 1: not pruned
    assert sw.decide(fts(status=old), jobs, NOW).prune == {}


def test_a_pruned_trial_stays_pruned_and_frees_its_slot():
    jobs = [trial(0, "Succeeded", final=0.6), trial(1, "Suspended", history={2: 3.0})]
    jobs[1]["metadata"]["annotations"][sw.PRUNED] = "s-1: trails"
    d = sw.decide(fts(), jobs, NOW)
    assert {t["name"]: (t["phase"], t.get("reason")) for t in d.status["trials"]}["s-1"] == ("Pruned", "s-1: trails")
    assert d.status["counts"]["pruned"] == 1 and len(d.create) == 2 and d.prune == {}


def test_median_pruning_and_no_pruning():
    finished = [trial(n, "Succeeded", history={2: 1.0, 4: 0.8}, final=0.8) for n in range(2)]
    jobs = [*finished, trial(2, history={2: 2.0})]
    old = recorded(jobs, {0: {2: 1.0, 4: 0.8}, 1: {2: 1.0, 4: 0.8}})
    assert list(sw.decide(fts(status=old, earlyStopping="median"), jobs, NOW).prune) == ["s-2"]
    assert sw.decide(fts(status=old, earlyStopping="none"), jobs, NOW).prune == {}


def test_max_failed_trials_ends_the_sweep_with_the_trials_reason():
    jobs = [trial(n, "Failed", reason="DatasetInvalid", message="train.jsonl line 2: not JSON") for n in range(3)]
    d = sw.decide(fts(status={"phase": "Running"}), jobs, NOW)
    assert d.create == [] and d.status["phase"] == "Failed" and d.status["reason"] == "TooManyFailedTrials"
    assert "DatasetInvalid: train.jsonl line 2: not JSON" in d.status["message"]
    assert reasons(d).count("TrialFailed") == 3 and "TooManyFailedTrials" in reasons(d)
    assert sw.decide(fts(status=d.status), jobs, NOW).create == []  # terminal: sticky
    said = [trial(0, "Failed", reason="DatasetInvalid", message="DatasetInvalid: t.jsonl:2: invalid JSON")]
    assert sw.decide(fts(), said, NOW).status["trials"][0]["reason"] == "DatasetInvalid: t.jsonl:2: invalid JSON"


def test_the_budget_stops_new_trials():
    """A trial measured 0.6 GPU-hours: a second one would pass 1.0; without a measure, the data report's estimate."""
    used = [trial(0, "Succeeded", final=1.0, gpuSeconds=0.6 * 3600)]
    d = sw.decide(fts(budget={"gpuHours": 1.0}), used, NOW)
    assert d.create == [] and d.status["phase"] == "Succeeded" and d.status["reason"] == "BudgetExhausted"
    assert d.status["budget"] == {"gpuHours": 1.0, "used": 0.6, "left": 0.4}
    assert len(sw.decide(fts(budget={"gpuHours": 1.3}), used, NOW).create) == 1
    first = sw.decide(fts(budget={"gpuHours": 1.0}), [], NOW)
    assert len(first.create) == 1  # no estimate yet: one trial, whose data report gives one
    running = [trial(0, dataset={"estimatedGPUHours": 0.4})]
    assert len(sw.decide(fts(budget={"gpuHours": 1.0}), running, NOW).create) == 1
    assert sw.decide(fts(budget={"gpuHours": 0.7}), running, NOW).create == []
    assert sw.decide(fts(budget={"gpuHours": 1.0}), [trial(0)], NOW).create == []  # no report yet: wait


def test_the_sweep_succeeds_once_max_trials_are_done():
    jobs = [trial(n, "Succeeded", final=1.0 + n / 10) for n in range(5)] + [trial(5, "Failed", reason="Hung")]
    d = sw.decide(fts(status={"phase": "Running"}), jobs, NOW)
    assert d.create == [] and (d.status["phase"], d.status["reason"]) == ("Succeeded", "SearchCompleted")
    assert d.status["progress"] == "6/6" and d.status["best"]["trial"] == "s-0" and d.status["completionTime"]
    assert d.status["counts"] == {"total": 6, "pending": 0, "running": 0, "succeeded": 5, "pruned": 0, "failed": 1}
    done = next(c for c in d.status["conditions"] if c["type"] == "Succeeded")
    assert done["status"] == "True"
    FineTuneSweepStatus.model_validate(d.status)  # fits the CRD's status schema


def test_no_succeeded_trial_fails_the_sweep():
    jobs = [trial(n, "Succeeded") for n in range(2)]  # no validation metric reported
    d = sw.decide(fts(maxTrials=2, status={"phase": "Running"}), jobs, NOW)
    assert (d.status["phase"], d.status["reason"]) == ("Failed", "NoTrialSucceeded")


def test_grid_tries_every_combination_once():
    spec = {"algorithm": "grid", "parameters": [{"path": "method.lora.r", "values": [4, 8]},
                                                {"path": "hyperparameters.scheduler", "values": ["cosine", "linear"]}],
            "maxTrials": 10, "parallelTrials": 10}
    d = sw.decide(fts(**spec), [], NOW)
    combos = {j["metadata"]["annotations"][sw.PARAMETERS] for j in d.create}
    assert len(d.create) == 4 and len(combos) == 4 and d.status["progress"] == "0/4"


def test_grid_over_an_integer_range_with_a_step():
    spec = FineTuneSweepSpec.model_validate(fts(algorithm="grid", parameters=[
        {"path": "method.lora.r", "min": 4, "max": 16, "step": 4},
        {"path": "hyperparameters.warmupRatio", "min": 0.0, "max": 0.1, "step": 0.05}])["spec"])
    assert sw.grid(spec) == {"method.lora.r": [4, 8, 12, 16], "hyperparameters.warmupRatio": [0.0, 0.05, 0.1]}


def test_a_deleted_trial_ends_failed_and_keeps_its_view():
    old = {"phase": "Running", "trials": [{"name": "s-0", "number": 0, "parameters": {"method.lora.r": 4},
                                           "phase": "Running", "history": [{"step": 2, "value": 1.5}]}]}
    d = sw.decide(fts(status=old), [], NOW)
    view = d.status["trials"][0]
    assert (view["phase"], view["history"]) == ("Failed", [{"step": 2, "value": 1.5}])
    assert "TrialDeleted" in view["reason"] and d.create[0]["metadata"]["name"] == "s-1"


def test_an_unreadable_spec_fails_the_sweep():
    body = fts()
    body["spec"]["parameters"] = [{"path": "hyperparameters.learningRate", "min": 1, "max": 0.1}]
    d = sw.decide(body, [], NOW)
    assert (d.status["phase"], d.status["reason"]) == ("Failed", "SpecUnreadable") and d.create == []
    assert "parameters.0" in d.status["message"]


def test_another_metric_is_read_from_the_evaluations_and_the_result():
    job = trial(0, "Succeeded")
    job["status"].update(evalStep=4, evalMetrics={"loss": 1.0, "tokenAccuracy": 0.4},
                         result={"metrics": {"validation": {"loss": 1.0, "token_accuracy": 0.45}}, "selectedStep": 8})
    d = sw.decide(fts(objective={"metric": "tokenAccuracy"}), [job], NOW)
    view = d.status["trials"][0]
    assert (view["metric"], view["step"], view["history"]) == (0.45, 8, [{"step": 4, "value": 0.4},
                                                                        {"step": 8, "value": 0.45}])
    assert d.status["objective"] == "tokenAccuracy (maximize)"


@pytest.mark.parametrize("algorithm", ["tpe", "random"])
def test_samples_stay_in_the_space_as_trials_accumulate(algorithm):
    jobs: list[dict] = []
    for _ in range(3):
        d = sw.decide(fts(algorithm=algorithm, maxTrials=6), copy.deepcopy(jobs), NOW)
        for created in d.create:
            params = json.loads(created["metadata"]["annotations"][sw.PARAMETERS])
            assert 2 <= params["method.lora.r"] <= 16
            n = int(created["metadata"]["name"].split("-")[1])
            jobs.append(trial(n, "Succeeded", params=params, final=params["hyperparameters.learningRate"]))
    assert len(jobs) == 6


def test_a_trial_the_api_server_refuses_fails_the_sweep():
    d = sw.decide(fts(), [], NOW)
    sw.refused(d, fts(), "s-0", "spec.hyperparameters.scheduler: Unsupported value", NOW)
    assert (d.status["phase"], d.status["reason"]) == ("Failed", "InvalidChildSpec")
    assert "s-0" in d.status["message"] and d.events[-1][:2] == ("Warning", "InvalidChildSpec")


class FakeApi:
    """The calls sweeps.reconcile makes, recorded in order."""

    def __init__(self, body: dict, trials: list[dict], conflicts: dict | None = None):
        self.body, self.trials, self.calls = body, trials, []
        self.conflicts = conflicts or {}  # trial name -> the FineTuneJob a patch at an older version finds
        for n, t in enumerate(trials):
            t["metadata"].setdefault("resourceVersion", str(100 + n))

    def get(self, path):
        if "/finetunesweeps/" in path:
            return self.body
        return self.conflicts.get(path.rsplit("/", 1)[1])

    def call(self, method, path, query=None):
        self.calls.append(("list", query["labelSelector"]))
        return {"items": self.trials}

    def create(self, obj, uid):
        self.calls.append(("create", obj["metadata"]["name"]))

    def merge_patch(self, path, patch):
        name = path.rsplit("/", 1)[1]
        self.calls.append(("patch", name, patch))
        newer = self.conflicts.get(name)
        if newer and patch["metadata"]["resourceVersion"] != newer["metadata"]["resourceVersion"]:
            raise kube.ApiError(409, '{"message": "the object has been modified"}')

    def patch_status(self, body, changes):
        self.calls.append(("status", changes["counts"]))


def test_the_handler_creates_prunes_then_writes_the_status_then_posts_events(monkeypatch):
    from kubetune_operator import sweeps

    good = {2: 1.0, 4: 0.8}
    jobs = [trial(0, "Succeeded", history=good, final=0.8), trial(1, history={2: 3.0})]
    for job in jobs:
        job["metadata"]["ownerReferences"] = [{"uid": UID, "controller": True}]
    api = FakeApi(fts(status=recorded(jobs, {0: good}), parallelTrials=1), [*jobs, trial(7)])  # 7: not ours
    monkeypatch.setattr(sweeps.kopf, "event", lambda body, type, reason, message: api.calls.append(("event", reason)))
    d = sweeps.reconcile(api, "ml", "s", OperatorSettings())
    assert api.calls[0] == ("list", f"{sw.SWEEP_LABEL}=s")
    assert api.calls[1:] == [
        ("patch", "s-1", {"metadata": {"resourceVersion": "101", "annotations": {sw.PRUNED: d.prune["s-1"]}},
                          "spec": {"runPolicy": {"suspend": True}}}),  # at the version it was judged at
        ("create", "s-2"),  # s-7 is not the sweep's: its number does not count
        ("status", {"total": 3, "pending": 1, "running": 0, "succeeded": 1, "pruned": 1, "failed": 0}),
        ("event", "TrialPruned"), ("event", "TrialCreated"), ("event", "NewBest")]


@pytest.mark.parametrize("phase", ["Running", "Succeeded"])
def test_a_trial_that_changed_since_it_was_judged_is_pruned_only_if_it_has_not_ended(monkeypatch, phase):
    """The prune patch at the version judged meets a newer one: a progress update is patched again; a trial that
    succeeded meanwhile (its trainer was publishing) is left Succeeded: no create, status or TrialPruned Event from
    that stale decision (the trial's change wakes the next reconcile)."""
    from kubetune_operator import sweeps

    good = {2: 1.0, 4: 0.8}
    jobs = [trial(0, "Succeeded", history=good, final=0.8), trial(1, history={2: 3.0})]
    for job in jobs:
        job["metadata"]["ownerReferences"] = [{"uid": UID, "controller": True}]
    newer = copy.deepcopy(jobs[1])
    newer["metadata"]["resourceVersion"], newer["status"]["phase"] = "150", phase
    api = FakeApi(fts(status=recorded(jobs, {0: good}), parallelTrials=1), jobs, conflicts={"s-1": newer})
    monkeypatch.setattr(sweeps.kopf, "event", lambda body, type, reason, message: api.calls.append(("event", reason)))
    d = sweeps.reconcile(api, "ml", "s", OperatorSettings())
    patched = [c[2]["metadata"]["resourceVersion"] for c in api.calls if c[0] == "patch"]
    if phase == "Running":
        assert patched == ["101", "150"] and d is not None
        assert [c[0] for c in api.calls[3:]] == ["create", "status", "event", "event", "event"]
    else:
        assert patched == ["101"] and d is None and [c[0] for c in api.calls] == ["list", "patch"]


def test_promote_best_copies_the_winner_then_succeeds():
    """spec.promote best: once the trials are done, a Job runs `kubetune promote` with the best trial's config and
    credentials; the sweep succeeds once it completed, and fails with its reason when it failed."""
    jobs = [trial(n, "Succeeded", final=1.0 + n, spec={"storage": {"secretRef": {"name": "s3"}}}) for n in range(2)]
    body = fts(maxTrials=2, promote="best", status={"phase": "Running"})
    d = sw.decide(body, jobs, NOW, OperatorSettings())
    (job,) = d.create
    assert job["kind"] == "Job" and job["metadata"]["name"] == "s-promote"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneSweep"
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:6] == ["kubetune", "promote", "--config", "/etc/kubetune/trainer.yaml", "--to",
                           "s3://o/sweep/best/"]
    assert json.loads(command[7]) == {"sweep": "s", "trial": "s-0", "metric": {"loss": 1.0}, "step": None,
                                      "parameters": {"hyperparameters.learningRate": 1e-3, "method.lora.r": 8}}
    assert {"name": "config", "configMap": {"name": "s-0-config"}} in pod["volumes"]  # the trial's config
    assert any(e["name"] == "AWS_ACCESS_KEY_ID" for e in pod["containers"][0]["env"])
    assert (d.status["phase"], d.status["reason"]) == ("Running", "Promoting")
    assert d.status["promotion"] == {"trial": "s-0", "uri": "s3://o/sweep/best/", "phase": "Running"}
    running = {"metadata": {"name": "s-promote"}, "status": {}}
    assert sw.decide(fts(maxTrials=2, promote="best", status=d.status), jobs, NOW, promotion=running).create == []
    complete = {"metadata": {"name": "s-promote"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    done = sw.decide(fts(maxTrials=2, promote="best", status=d.status), jobs, NOW, promotion=complete)
    assert (done.status["phase"], done.status["promotion"]["phase"]) == ("Succeeded", "Succeeded")
    assert "promoted to s3://o/sweep/best/" in done.status["message"]
    failed = {"metadata": {"name": "s-promote"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the "
                                                                                          "specified backoff limit"}]}}
    lost = sw.decide(fts(maxTrials=2, promote="best", status=d.status), jobs, NOW, promotion=failed)
    assert (lost.status["phase"], lost.status["reason"]) == ("Failed", "PromotionFailed")
    assert "backoff limit" in lost.status["message"]
    FineTuneSweepStatus.model_validate(lost.status)
    assert done.status["promotion"] == {"trial": "s-0", "uri": "s3://o/sweep/best/", "phase": "Succeeded"}
    gone = sw.decide(fts(maxTrials=2, promote="best", status=d.status), jobs[1:], NOW)
    assert (gone.status["phase"], gone.status["reason"]) == ("Failed", "PromotionFailed")
    assert "s-0's FineTuneJob was deleted" in gone.status["message"]


def retrain(phase: str | None, **status) -> dict:
    """<sweep>-fit as the API shows it."""
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "s-fit", "namespace": "ml", "labels": {sw.SWEEP_LABEL: "s"}},
            "spec": {"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl"},
                     "output": {"uri": "s3://o/sweep/retrain/"}, "storage": {"secretRef": {"name": "s3"}}},
            "status": {"phase": phase, **status} if phase else {}}


def retrain_sweep(status: dict, **spec) -> dict:
    return fts(maxTrials=2, promote="retrain", status=status, template={
        **fts()["spec"]["template"], "evaluation": {"everySteps": 2, "earlyStopping": {"patience": 2}},
        "output": {"select": "best"}}, **spec)


RETRAIN_TRIALS = [trial(n, "Succeeded", final=1.0 + n, params={"hyperparameters.learningRate": 0.001 * (n + 1),
                                                                "method.lora.r": 4 + n}) for n in range(2)]


def test_retrain_first_trains_the_best_parameters_on_train_and_validation():
    """promote retrain, once the trials are done: <sweep>-fit, the template with the best trial's parameters, on
    train + validation (nothing evaluated while training: no everySteps, early stopping or select best), its
    output under the sweep's, the shared data cache; the sweep runs on, saying so."""
    d = sw.decide(retrain_sweep({"phase": "Running"}), RETRAIN_TRIALS, NOW, OperatorSettings())
    (job,) = d.create
    assert job["kind"] == "FineTuneJob" and job["metadata"]["name"] == "s-fit"
    assert job["metadata"]["labels"] == {sw.SWEEP_LABEL: "s"}
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneSweep"
    spec = job["spec"]
    assert spec["hyperparameters"]["learningRate"] == 0.001 and spec["method"]["lora"]["r"] == 4  # s-0's
    assert spec["dataset"] == {"train": "s3://d/train.jsonl", "validation": "s3://d/val.jsonl",
                               "trainOnValidation": True, "cacheUri": "s3://o/sweep/data-cache/"}
    assert spec["evaluation"] == {} and spec["output"] == {"uri": "s3://o/sweep/retrain/", "select": "last"}
    FineTuneJobSpec.model_validate(spec)  # a FineTuneJob the API server takes (the same rules as CEL)
    assert (d.status["phase"], d.status["reason"]) == ("Running", "Retraining")
    assert d.status["promotion"] == {"trial": "s-0", "uri": "s3://o/sweep/best/", "phase": "Running",
                                     "retrain": {"job": "s-fit", "phase": "Pending"}}
    assert "s-fit trains s-0's parameters on train + validation (Pending)" in d.status["message"]
    assert ("Normal", "Retraining") in [e[:2] for e in d.events]
    FineTuneSweepStatus.model_validate(d.status)


def test_retrain_progress_shows_in_the_status_and_nothing_is_created_twice():
    d = sw.decide(retrain_sweep({"phase": "Running"}), RETRAIN_TRIALS, NOW, OperatorSettings())
    running = retrain("Running", progress={"step": 3, "totalSteps": 8, "text": "3/8 steps"})
    later = sw.decide(retrain_sweep(d.status), [*RETRAIN_TRIALS, running], NOW, OperatorSettings())
    assert later.create == [] and later.status["phase"] == "Running"
    assert later.status["promotion"]["retrain"] == {"job": "s-fit", "phase": "Running", "progress": "3/8 steps"}
    assert later.status["message"].endswith("(Running, 3/8 steps)")


def test_a_succeeded_retrain_is_promoted_with_a_manifest_naming_it_then_the_sweep_succeeds():
    d = sw.decide(retrain_sweep({"phase": "Running"}), RETRAIN_TRIALS, NOW, OperatorSettings())
    jobs = [*RETRAIN_TRIALS, retrain("Succeeded")]
    copying = sw.decide(retrain_sweep(d.status), jobs, NOW, OperatorSettings())
    (job,) = copying.create
    assert job["kind"] == "Job" and job["metadata"]["name"] == "s-promote"
    pod = job["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": "s-fit-config"}} in pod["volumes"]  # the retrain's config
    command = pod["containers"][0]["command"]
    assert command[4:6] == ["--to", "s3://o/sweep/best/"]
    assert json.loads(command[7]) == {"sweep": "s", "trial": "s-0", "retrain": "s-fit", "metric": {"loss": 1.0},
                                      "step": None, "parameters": {"hyperparameters.learningRate": 0.001,
                                                                   "method.lora.r": 4}}
    assert (copying.status["phase"], copying.status["reason"]) == ("Running", "Promoting")
    assert "copying s-fit's output to s3://o/sweep/best/" in copying.status["message"]
    complete = {"metadata": {"name": "s-promote"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    done = sw.decide(retrain_sweep(copying.status), jobs, NOW, promotion=complete)
    assert (done.status["phase"], done.status["reason"]) == ("Succeeded", "SearchCompleted")
    assert done.status["promotion"]["phase"] == "Succeeded"
    assert "retrained as s-fit; promoted to s3://o/sweep/best/" in done.status["message"]


@pytest.mark.parametrize("job", [retrain("Failed", reason="DatasetInvalid", message="train.jsonl line 3: bad"), None])
def test_a_failed_or_deleted_retrain_fails_the_sweep_with_its_reason(job):
    d = sw.decide(retrain_sweep({"phase": "Running"}), RETRAIN_TRIALS, NOW, OperatorSettings())
    ended = sw.decide(retrain_sweep(d.status), [*RETRAIN_TRIALS, *([job] if job else [])], NOW, OperatorSettings())
    assert ended.create == []
    assert (ended.status["phase"], ended.status["reason"]) == ("Failed", "RetrainFailed")
    assert ended.status["promotion"]["phase"] == "Failed"
    why = "DatasetInvalid: train.jsonl line 3: bad" if job else "s-fit was deleted before it ended"
    assert ended.status["message"] == f"the retrain s-fit failed: {why}"
    assert ("Warning", "RetrainFailed", ended.status["message"]) in ended.events
    FineTuneSweepStatus.model_validate(ended.status)


def test_the_sweeps_metrics_come_from_its_status():
    """Prometheus series per sweep, none per trial: trials by phase, the objective (named as the trainer labels its
    evaluations), the best so far and the GPU-hours; removed with the sweep."""
    from kubetune_operator import metrics
    from prometheus_client import generate_latest

    jobs = [trial(0, "Succeeded", final=0.8, gpuSeconds=360), trial(1, history={2: 3.0}),
            trial(2, "Failed", reason="DatasetInvalid")]
    status = sw.decide(fts(objective={"metric": "tokenAccuracy"}, budget={"gpuHours": 1}, parallelTrials=1), jobs,
                       NOW).status
    status["best"] = {"trial": "s-0", "metric": 0.61, "parameters": {}}  # as tokenAccuracy would have it
    assert metrics.sweep_series(status) == {
        "trials": {("Pending",): 0, ("Running",): 1, ("Succeeded",): 1, ("Pruned",): 0, ("Failed",): 1},
        "objective": {("token_accuracy", "maximize"): 1},
        "best": {("token_accuracy",): 0.61},
        "gpu_hours": {("used",): 0.1, ("budget",): 1, ("left",): 0.9}}
    assert metrics.sweep_series({"objective": "f1 (maximize)"})["objective"] == {("f1", "maximize"): 1}
    assert metrics.sweep_series({}) == {"trials": {(p,): 0 for p in ("Pending", "Running", "Succeeded", "Pruned",
                                                                    "Failed")},
                                        "objective": {}, "best": {}, "gpu_hours": {}}
    running = metrics.REGISTRY.get_sample_value("kubetune_operator_finetunesweeps", {"phase": "Running"})
    metrics.record_sweep("uid-m", ("ml", "m"), status)
    try:
        text = generate_latest(metrics.REGISTRY).decode()
        assert 'kubetune_operator_finetunesweep_trials{phase="Failed",sweep="m",sweep_namespace="ml"} 1.0' in text
        assert ('kubetune_operator_finetunesweep_best_metric{metric="token_accuracy",sweep="m",'
                'sweep_namespace="ml"} 0.61') in text
        assert 'kubetune_operator_finetunesweep_gpu_hours{kind="left",sweep="m",sweep_namespace="ml"} 0.9' in text
        assert metrics.REGISTRY.get_sample_value("kubetune_operator_finetunesweeps", {"phase": "Running"}) == \
            running + 1
        ours = [line for line in text.splitlines() if 'sweep="m"' in line]
        assert len(ours) == 5 + 1 + 1 + 3  # no trial, no reason: a few series per sweep
        assert not [line for line in ours if "s-0" in line or "DatasetInvalid" in line]
    finally:
        metrics.forget_sweep("uid-m")
    assert 'sweep="m"' not in generate_latest(metrics.REGISTRY).decode()

"""One FineTuneSweep reconcile, as a pure function: (sweep, its trial FineTuneJobs as observed, now) ->
SweepDecision (the trials to create, those to prune, the status, the Events). No clock, no operator memory.

The search's state is the API's: each trial is a FineTuneJob named <sweep>-<n> whose annotation holds its sampled
parameters; its evaluations are in its status (evalMetrics at evalStep while it runs, as the operator's scrape
of the trainer saw them; result.metrics.validation at result.selectedStep once it succeeded), and the sweep's
status.trials[].history keeps the (step, value) points observed so far. Each reconcile
rebuilds an in-memory Optuna study from them, asks the pruner about the running trials and the sampler (seeded with
spec.seed and the trial number, so the same state gives the same next trial) for new ones. The next n is one more
than the highest that exists, so a restarted operator creates no duplicate (and a create of an existing name is a
409 the handler ignores).

    Pending -> Running -> Succeeded (the trials are done: maxTrials, the grid or the budget reached)
                  |
                  v
                Failed (maxFailedTrials trials failed, or none succeeded)

Once the trials are done, spec.promote best runs the Job <sweep>-promote (`kubetune promote`), which copies the
best trial's output to <output.uri>best/ with sweep.json; promote retrain first trains the best parameters once
more on train + validation (the FineTuneJob <sweep>-fit), then copies its output. The sweep stays Running (reason
Retraining, then Promoting) until then, and fails with RetrainFailed or PromotionFailed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from kubetune_api import (
    SWEEP_KIND,
    SWEEP_TERMINAL,
    TRIAL_DONE,
    FineTuneJobSpec,
    FineTuneSweepSpec,
    Promote,
    Reason,
    SweepPhase,
    TrialPhase,
    join_uri,
    metric_key,
)
from kubetune_search import (  # the spec's search as Optuna's, shared with the local `kubetune sweep`
    ENDED,
    PROMOTED,
    ask,
    best_trial,
    distributions,
    fits,
    grid,  # noqa: F401 - re-exported: the grid of a spec, as the operator's tests read it
    promotion_record,
    pruned_why,
    retrain_name,
    retrain_spec,
    study,
    trial_count,
    trial_name,
    trial_spec,
)
from optuna.trial import TrialState
from pydantic import ValidationError

from . import SWEEP_LABEL, children, policy
from .conditions import rfc3339, set_condition
from .observe import job_finished
from .settings import OperatorSettings

PARAMETERS = "kubetune.io/parameters"  # annotation: the trial's sampled values, JSON {path: value}
PRUNED = "kubetune.io/pruned"  # annotation: why the sweep pruned the trial (set with spec.runPolicy.suspend)
PROMOTE = "promote"  # the promotion Job <sweep>-promote, and its container
MAX_HISTORY = 100  # evaluations kept per trial in the status: the first ones (the pruner's rungs) and the last


@dataclass
class SweepDecision:
    status: dict
    create: list[dict] = field(default_factory=list)  # trial FineTuneJobs (a 409: it exists already, fine)
    prune: dict[str, str] = field(default_factory=dict)  # trial name -> why: suspend it, annotated PRUNED
    events: list[tuple[str, str, str]] = field(default_factory=list)  # after the status: (type, reason, message)


@dataclass
class Trial:
    """One trial as the API shows it."""

    name: str
    number: int
    parameters: dict[str, Any]
    phase: TrialPhase
    history: dict[int, float] = field(default_factory=dict)  # step -> the objective metric at that evaluation
    metric: float | None = None  # the final value once succeeded, else the last evaluation's
    step: int | None = None
    gpu_hours: float | None = None
    estimate: float | None = None  # GPU-hours its data report estimated
    reason: str | None = None
    adapter_uri: str | None = None

    def dump(self) -> dict:
        points = [{"step": s, "value": v} for s, v in sorted(self.history.items())]
        if len(points) > MAX_HISTORY:
            points = points[:MAX_HISTORY - 1] + points[-1:]
        out = {"name": self.name, "number": self.number, "parameters": self.parameters, "phase": self.phase.value,
               "metric": self.metric, "step": self.step, "gpuHours": self.gpu_hours, "reason": self.reason,
               "history": points or None}
        return {k: v for k, v in out.items() if v is not None}


def trial_number(sweep: str, name: str) -> int | None:
    tail = name.removeprefix(f"{sweep}-")
    return int(tail) if tail != name and tail.isdigit() else None


def _finite(value) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _phase(job: dict) -> tuple[TrialPhase, str | None]:
    """The trial's phase (and reason) from its FineTuneJob."""
    status, annotations = job.get("status") or {}, job["metadata"].get("annotations") or {}
    phase = status.get("phase")
    if annotations.get(PRUNED) and phase != "Succeeded":
        return TrialPhase.Pruned, annotations[PRUNED]
    if phase in ("Succeeded", "Failed", "Running"):
        reason, message = status.get("reason"), status.get("message") or ""
        why = (message if reason and message.startswith(reason) else ": ".join(filter(None, (reason, message))))
        return TrialPhase(phase), why if phase == "Failed" else None
    return (TrialPhase.Running if phase == "Suspended" else TrialPhase.Pending), None


def observe(sweep: str, metric: str, jobs: list[dict], old_trials: list[dict]) -> list[Trial]:
    """The trials, by number: each FineTuneJob of the sweep, its history so far (the status) plus what its
    status shows now; a trial whose FineTuneJob is gone keeps its last view (Failed if it had not ended)."""
    old = {t["name"]: t for t in old_trials}
    trials = {}
    for job in jobs:
        name = job["metadata"]["name"]
        number = trial_number(sweep, name)
        if number is None:
            continue
        try:
            parameters = json.loads((job["metadata"].get("annotations") or {}).get(PARAMETERS) or "{}")
        except json.JSONDecodeError:
            parameters = {}
        status = job.get("status") or {}
        phase, reason = _phase(job)
        history = {int(p["step"]): float(p["value"]) for p in (old.get(name) or {}).get("history") or []}
        evaluated = status.get("evalMetrics") or {}
        value = _finite(evaluated.get(metric, status.get("evalLoss") if metric == "loss" else None))
        if value is not None and isinstance(status.get("evalStep"), int):
            history[status["evalStep"]] = value
        result = status.get("result") or {}
        final = _finite(((result.get("metrics") or {}).get("validation") or {}).get(metric_key(metric)))
        done = phase == TrialPhase.Succeeded and final is not None
        selected = result.get("selectedStep")
        if done and isinstance(selected, int) and not isinstance(selected, bool):
            # The published step's evaluation, though no scrape caught it (a trial may end between two): a trial
            # seen only at the start still competes at the later rungs when a running trial reaches them.
            history.setdefault(selected, final)
        last = max(history) if history else None
        gpu = _finite(status.get("gpuSeconds"))
        trials[number] = Trial(
            name, number, parameters, phase, history,
            metric=final if done else history.get(last) if last is not None else None,
            step=result.get("selectedStep", (status.get("progress") or {}).get("step")) if done else last,
            gpu_hours=round(gpu / 3600, 6) if gpu is not None else None,
            estimate=_finite((status.get("dataset") or {}).get("estimatedGPUHours")), reason=reason,
            adapter_uri=result.get("adapterUri"))
    for name, seen in old.items():  # deleted by hand: its last view stays, and ends
        number = trial_number(sweep, name)
        if number is not None and number not in trials:
            phase = TrialPhase(seen["phase"])
            gone = phase not in TRIAL_DONE
            trials[number] = Trial(
                name, number, seen.get("parameters") or {}, TrialPhase.Failed if gone else phase,
                {int(p["step"]): float(p["value"]) for p in seen.get("history") or []}, seen.get("metric"),
                seen.get("step"), seen.get("gpuHours"),
                reason=f"{Reason.TrialDeleted.value}: its FineTuneJob was deleted" if gone else seen.get("reason"))
    return [trials[n] for n in sorted(trials)]


# -- the search: Optuna, rebuilt from the trials ------------------------------------------------------------------


def replay(spec: FineTuneSweepSpec, trials: list[Trial]) -> tuple[optuna.Study, dict[str, str]]:
    """An in-memory study rebuilt from the trials, in their order: each one asked with its own parameters, its
    evaluations reported step by step with the pruner asked at each (successive halving records the value at each
    rung a trial reaches), then told how it ended; the unfinished stay running. Returns the study and the running
    trials the pruner stops, with why. Trials whose parameters do not fit the space (an edited annotation) are
    left out."""
    s = study(spec)  # fixed params: not sampled
    dists, verdicts = distributions(spec), {}
    for t in trials:
        if not fits(dists, t.parameters):
            continue
        s.enqueue_trial({p: t.parameters[p] for p in dists})
        live = s.ask(dists)
        for step in sorted(t.history):
            live.report(t.history[step], step)
            if live.should_prune() and t.phase == TrialPhase.Running and t.name not in verdicts:
                verdicts[t.name] = f"{t.name}: {pruned_why(s, t.history[step], step)}"
        state = ENDED.get(t.phase)
        if state == TrialState.COMPLETE and t.metric is None:
            state = TrialState.FAIL  # succeeded without reporting the metric: nothing to learn from
        if state is not None:
            s.tell(live, t.metric if state == TrialState.COMPLETE else None, state=state)
    return s, verdicts


# -- the trials' FineTuneJobs --------------------------------------------------------------------------------------


def _owner(sweep: dict) -> list[dict]:
    meta = sweep["metadata"]
    return [{"apiVersion": "kubetune.io/v1alpha1", "kind": SWEEP_KIND, "name": meta["name"], "uid": meta.get("uid"),
             "controller": True, "blockOwnerDeletion": True}]


def trial_job(sweep: dict, spec: FineTuneSweepSpec, number: int, parameters: dict) -> dict:
    """Trial `number`'s FineTuneJob: the template with the parameters set, its output under the sweep's, the
    sweep's shared data cache, owned by the sweep."""
    meta = sweep["metadata"]
    name = trial_name(meta["name"], number)
    template = trial_spec(sweep["spec"]["template"], spec, name, parameters)
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": meta.get("namespace"),
                     "labels": {SWEEP_LABEL: meta["name"]},
                     "annotations": {PARAMETERS: json.dumps(parameters, sort_keys=True)},
                     "ownerReferences": _owner(sweep)},
        "spec": template,
    }


def promotion_name(sweep: str) -> str:
    return f"{sweep}-{PROMOTE}"


def promotion_job(sweep: dict, trial: dict, uri: str, record: dict, settings: OperatorSettings) -> dict:
    """The Job that copies the best trial's output to `uri` (`kubetune promote`): a CPU pod with the trial's
    trainer config, storage credentials and volumes, owned by the sweep."""
    meta = sweep["metadata"]
    spec = FineTuneJobSpec.model_validate(children.with_storage_defaults(trial["spec"], settings))
    command = ["kubetune", PROMOTE, "--config", children.CONFIG_PATH, "--to", uri, "--record", json.dumps(record)]
    labels = {SWEEP_LABEL: meta["name"], "app.kubernetes.io/managed-by": children.MANAGED_BY,
              children.LABEL_COMPONENT: PROMOTE}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": promotion_name(meta["name"]), "namespace": meta.get("namespace"), "labels": labels,
                         "ownerReferences": _owner(sweep)},
            "spec": {"backoffLimit": 1, "template": {"metadata": {"labels": labels}, "spec": children.tool_pod(
                trial["metadata"], spec, PROMOTE, command, settings)}}}


def retrain_job(sweep: dict, spec: FineTuneSweepSpec, best: Trial) -> dict:
    """promote retrain: a FineTuneJob like `best`'s trial, on train + validation (kubetune_search.retrain_spec)."""
    job = trial_job(sweep, spec, best.number, best.parameters)
    job["metadata"]["name"] = retrain_name(sweep["metadata"]["name"])
    job["spec"] = retrain_spec(sweep["spec"]["template"], spec, job["metadata"]["name"], best.parameters)
    return job


def _retrain(d: SweepDecision, sweep: dict, spec: FineTuneSweepSpec, best: Trial, jobs: list[dict]) -> dict | None:
    """promote retrain: create <sweep>-fit, or follow it into status.promotion.retrain. Returns its FineTuneJob
    once it has succeeded, else None (a failed or deleted one: status.promotion.retrain.phase Failed)."""
    name = retrain_name(sweep["metadata"]["name"])
    promotion = d.status["promotion"]
    job = next((j for j in jobs if j["metadata"]["name"] == name), None)
    seen = promotion.get("retrain")
    if job is None and seen and seen.get("phase") != "Failed":  # created before, deleted since
        promotion["retrain"] = {"job": name, "phase": "Failed", "message": f"{name} was deleted before it ended"}
    elif job is None and not seen:
        d.create.append(retrain_job(sweep, spec, best))
        promotion["retrain"] = {"job": name, "phase": "Pending"}
        d.events.append(("Normal", Reason.Retraining.value, f"{name}: {best.name}'s parameters on train + "
                         f"validation: {json.dumps(best.parameters)}"))
    elif job is not None:
        status = job.get("status") or {}
        failed = status.get("phase") == "Failed"
        promotion["retrain"] = {k: v for k, v in {
            "job": name, "phase": status.get("phase") or "Pending",
            "progress": (status.get("progress") or {}).get("text"),
            "message": ": ".join(filter(None, (status.get("reason"), status.get("message")))) if failed else None,
        }.items() if v is not None}
    return job if promotion["retrain"]["phase"] == "Succeeded" else None


def _promote(d: SweepDecision, sweep: dict, spec: FineTuneSweepSpec, best: Trial, jobs: list[dict],
             promotion: dict | None, settings: OperatorSettings | None) -> dict | None:
    """spec.promote best or retrain, once the search is done: (retrain: train the best parameters on train +
    validation first, then) create the promotion Job, or read how it ended. Returns the finished condition (None
    while it runs), a failed one with the sweep's `reason`."""
    uri = join_uri(spec.output.uri, PROMOTED)
    d.status["promotion"] = {**(d.status.get("promotion") or {}), "trial": best.name, "uri": uri, "phase": "Running"}
    retrained = None
    source = next((j for j in jobs if j["metadata"]["name"] == best.name), None)
    if spec.promote == Promote.retrain:
        source = _retrain(d, sweep, spec, best, jobs)
        retrain = d.status["promotion"]["retrain"]
        if retrain["phase"] == "Failed":
            d.status["promotion"].update(phase="Failed", message=retrain.get("message"))
            return {"type": "Failed", "reason": Reason.RetrainFailed,
                    "message": f"the retrain {retrain['job']} failed: {retrain.get('message') or 'see its status'}"}
        if source is None:
            return None
        retrained = retrain["job"]
    ended = job_finished(promotion)
    if promotion is None and source is None:  # deleted by hand: its config and credentials with it
        d.status["promotion"].update(phase="Failed", message=f"{best.name}'s FineTuneJob was deleted")
    elif promotion is None:
        record = promotion_record(sweep["metadata"]["name"], spec, best, retrained)
        d.create.append(promotion_job(sweep, source, uri, record, settings or OperatorSettings()))
        d.events.append(("Normal", Reason.Promoting.value, f"copying {source['metadata']['name']}'s output to {uri}"))
    elif ended and ended["type"] == "Complete":
        d.status["promotion"]["phase"] = "Succeeded"
    elif ended:
        d.status["promotion"].update(phase="Failed", message=ended.get("message") or ended.get("reason"))
    if d.status["promotion"]["phase"] == "Failed":
        return {"type": "Failed", "reason": Reason.PromotionFailed,
                "message": f"the promotion Job {promotion_name(sweep['metadata']['name'])} failed: "
                           f"{d.status['promotion'].get('message') or 'see its pod log'}"}
    return ended


# -- the decision --------------------------------------------------------------------------------------------------


def _budget(spec: FineTuneSweepSpec, trials: list[Trial]) -> tuple[dict, int | None]:
    """status.budget, and how many more trials fit (None: no limit). GPU-hours used, plus for each unfinished trial
    the larger of what it used and a trial's estimate (the succeeded trials' mean use, else a data report's
    estimate), plus each new trial's estimate, must stay within spec.budget.gpuHours. Without an estimate yet,
    only the first trial starts: its data report gives one."""
    limit = spec.budget.gpu_hours
    used = round(sum(t.gpu_hours or 0 for t in trials), 6)
    if limit is None:
        return {"used": used}, None
    budget = {"gpuHours": limit, "used": used, "left": round(max(limit - used, 0), 6)}
    measured = [t.gpu_hours for t in trials if t.phase == TrialPhase.Succeeded and t.gpu_hours]
    reports = [t.estimate for t in trials if t.estimate is not None]
    estimate = sum(measured) / len(measured) if measured else max(reports) if reports else None
    if not estimate:
        return budget, 0 if trials else 1
    committed = sum(max(t.gpu_hours or 0, estimate) if t.phase not in TRIAL_DONE else t.gpu_hours or 0
                    for t in trials)
    return budget, max(math.floor((limit - committed) / estimate + 1e-9), 0)


def _finish(status: dict, phase: SweepPhase, reason: Reason, message: str, generation: int, now: datetime) -> None:
    status.update(phase=phase.value, reason=reason.value, message=message, completionTime=rfc3339(now))
    for type_ in ("Running", "Succeeded", "Failed"):
        set_condition(status, type_, type_ == phase.value, reason.value, message, generation, now)


def refused(d: SweepDecision, sweep: dict, trial: str, why: str, now: datetime) -> None:
    """The API server refused to create a trial (the template with its values is no valid FineTuneJob): the sweep
    fails, saying why; no later trial would fare better."""
    message = f"the API server refused trial {trial}: {why}"
    _finish(d.status, SweepPhase.Failed, Reason.InvalidChildSpec, message, sweep["metadata"].get("generation") or 0,
            now)
    d.events.append(("Warning", Reason.InvalidChildSpec.value, message))


def _promoting(done: int, best: Trial, promotion: dict) -> dict:
    """The status's reason and message while the promotion runs: the retrain and its progress, or the copy."""
    retrain = promotion.get("retrain")
    if retrain and retrain["phase"] != "Succeeded":
        progress = f", {retrain['progress']}" if retrain.get("progress") else ""
        return {"reason": Reason.Retraining.value, "message": f"{done} trials done; {retrain['job']} trains "
                f"{best.name}'s parameters on train + validation ({retrain['phase']}{progress})"}
    source = retrain["job"] if retrain else best.name
    return {"reason": Reason.Promoting.value, "message": f"{done} trials done; copying {source}'s output to "
            f"{promotion['uri']}"}


def decide(sweep: dict, jobs: list[dict], now: datetime, settings: OperatorSettings | None = None,
           promotion: dict | None = None, admission_policy: str | None = None) -> SweepDecision:
    """`jobs`: the sweep's FineTuneJobs (its trials, and <sweep>-fit with promote retrain); `promotion`: the Job
    <sweep>-promote as observed (spec.promote best and retrain); `settings`: the operator's, for the
    Job it creates and the admission rules its trials must keep; `admission_policy`: since when the API server
    enforces the admission policy (kube.admission_policy), read when policy.sweep_needs_admission_check."""
    meta, old = sweep["metadata"], sweep.get("status") or {}
    generation = meta.get("generation") or 0
    d = SweepDecision(status=copy.deepcopy(old))
    status = d.status

    def finish(phase: SweepPhase, reason: Reason, message: str) -> None:
        _finish(status, phase, reason, message, generation, now)

    try:
        spec = FineTuneSweepSpec.model_validate(sweep.get("spec") or {})
    except ValidationError as e:
        if old.get("phase") not in SWEEP_TERMINAL:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            finish(SweepPhase.Failed, Reason.SpecUnreadable, f"spec does not fit the FineTuneSweep API: {problems}")
            d.events.append(("Warning", Reason.SpecUnreadable.value, status["message"]))
        return d

    # Before the first trial: the rules its trials must keep (policy.py), the author's only if the API server
    # checked them when the sweep was created; else the trials would be created by the operator unchecked.
    if settings is not None and not jobs and old.get("phase") not in SWEEP_TERMINAL:
        denied = policy.sweep_violations(meta.get("namespace") or "", spec, settings.policy,
                                         policy.author_checked(meta, admission_policy))
        if denied:
            finish(SweepPhase.Failed, Reason.PolicyDenied, "; ".join(denied))
            d.events.append(("Warning", Reason.PolicyDenied.value, status["message"]))
            return d

    metric = spec.metric()
    trials = observe(meta["name"], metric, jobs, old.get("trials") or [])
    terminal = old.get("phase") in SWEEP_TERMINAL
    s, verdicts = replay(spec, trials)
    if not terminal:
        d.prune = verdicts
        for t in trials:
            if t.name in d.prune:
                t.phase, t.reason = TrialPhase.Pruned, d.prune[t.name]
                d.events.append(("Normal", Reason.TrialPruned.value, d.prune[t.name]))

    # New trials: free slots, while trials remain (maxTrials, the grid) and the budget allows.
    failed = [t for t in trials if t.phase == TrialPhase.Failed]
    active = [t for t in trials if t.phase not in TRIAL_DONE]
    target = trial_count(spec)
    budget, affordable = _budget(spec, trials)
    stop = terminal or len(failed) >= spec.max_failed_trials
    next_number = max((t.number for t in trials), default=-1) + 1
    slots = 0 if stop else min(spec.parallel_trials - len(active), target - len(trials),
                               spec.max_trials if affordable is None else affordable)
    for number in range(next_number, next_number + max(slots, 0)):
        parameters = ask(s, spec, number).params
        d.create.append(trial_job(sweep, spec, number, parameters))
        trials.append(Trial(trial_name(meta["name"], number), number, parameters, TrialPhase.Pending))
        d.events.append(("Normal", Reason.TrialCreated.value, f"{trials[-1].name}: {json.dumps(parameters)}"))
        active.append(trials[-1])

    for t in failed:
        if next((o for o in old.get("trials") or [] if o["name"] == t.name and o["phase"] == "Failed"), None) is None:
            d.events.append(("Warning", Reason.TrialFailed.value, f"{t.name}: {t.reason or 'failed'}"))

    # The status: the trials, their counts, the best, the budget; then the phase.
    best = best_trial(spec, trials)
    counts = {phase.value.lower(): sum(t.phase == phase for t in trials) for phase in TrialPhase}
    done = sum(t.phase in TRIAL_DONE for t in trials)
    status.update(objective=f"{metric} ({spec.goal().value})", trials=[t.dump() for t in trials],
                  counts={"total": len(trials), **counts}, progress=f"{done}/{target}", budget=budget,
                  observedGeneration=generation)
    if best:
        status["best"] = {k: v for k, v in {"trial": best.name, "metric": best.metric, "parameters": best.parameters,
                                            "adapterUri": best.adapter_uri}.items() if v is not None}
        if (old.get("best") or {}).get("trial") != best.name:
            d.events.append(("Normal", Reason.NewBest.value, f"{best.name}: {metric} {best.metric:.4g} with "
                             f"{json.dumps(best.parameters)}"))
    if terminal:
        return d
    if trials and not status.get("startTime"):
        status["startTime"] = rfc3339(now)
    if len(failed) >= spec.max_failed_trials:
        last = failed[-1]
        finish(SweepPhase.Failed, Reason.TooManyFailedTrials,
               f"{len(failed)} trials failed (maxFailedTrials {spec.max_failed_trials}); {last.name}: {last.reason}")
        d.events.append(("Warning", Reason.TooManyFailedTrials.value, status["message"]))
    elif not active and (len(trials) >= target or affordable == 0):
        why = Reason.SearchCompleted if len(trials) >= target else Reason.BudgetExhausted
        ended = _promote(d, sweep, spec, best, jobs, promotion, settings) if best and \
            spec.promote != Promote.none else {"type": "Complete"}
        if not ended:
            status.update(phase=SweepPhase.Running.value, **_promoting(done, best, status["promotion"]))
            return d
        if ended["type"] != "Complete":
            finish(SweepPhase.Failed, ended["reason"], ended["message"])
        elif best:
            retrained = (status.get("promotion") or {}).get("retrain")
            promoted = (f"; retrained as {retrained['job']}" if retrained else "") + \
                (f"; promoted to {status['promotion']['uri']}" if status.get("promotion") else "")
            finish(SweepPhase.Succeeded, why, f"{done} trials done; best {best.name}: {metric} {best.metric:.4g}"
                   f"{promoted}")
        else:
            finish(SweepPhase.Failed, Reason.NoTrialSucceeded, f"{done} trials done ({why.value}), none succeeded "
                   f"with a {metric} on the validation split")
        d.events.append(("Normal" if status["phase"] == SweepPhase.Succeeded else "Warning", status["reason"],
                         status["message"]))
    elif trials:
        message = f"{done}/{target} trials done, {len(active)} running"
        status.update(phase=SweepPhase.Running.value, reason=Reason.Searching.value, message=message)
        set_condition(status, "Running", True, Reason.Searching.value, message, generation, now)
    return d

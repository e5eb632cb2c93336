"""Observing the children: what the validation and training Jobs and their pods say happened (finished or not,
how each worker ended, why a pod cannot start, the trainer's termination messages). Pure: no API calls here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kubetune_api import EXIT_PEER_LOST, EXIT_RETRYABLE, PERMANENT_REASONS, Reason

from .conditions import get_condition


def job_finished(job: dict | None) -> dict | None:
    """The Complete or Failed condition of a batch/v1 Job, if it has finished."""
    for c in (job or {}).get("status", {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c
    return None


def kube_owned(pod: dict, job: dict) -> bool:
    """`pod` is one of `job`'s."""
    return any(r.get("uid") == job["metadata"].get("uid") for r in pod["metadata"].get("ownerReferences") or [])


def completed(job: dict | None, pods: list[dict]) -> dict | None:
    """job_finished, or a Complete condition as soon as every completion of the Job has a Succeeded pod (an
    index each for an Indexed Job): the Job controller writes the same a second later (it batches its syncs), and
    nothing can undo a succeeded pod. Every FineTuneJob waits on two Jobs, so this is two seconds off each run."""
    done = job_finished(job)
    spec = (job or {}).get("spec") or {}
    want = spec.get("completions")
    if done or not want or spec.get("suspend") or job["metadata"].get("deletionTimestamp"):
        # no Job, one whose completions this copy lacks, or one being stopped (a suspend, a prune, a delete: its
        # workers may still finish, and the Job controller decides what that makes it): the Job's word only
        return done
    succeeded = {completion_index(p) or p["metadata"].get("name") for p in pods
                 if (p.get("status") or {}).get("phase") == "Succeeded" and kube_owned(p, job)}
    if len(succeeded) < want:
        return None
    return {"type": "Complete", "status": "True", "reason": "PodsSucceeded",
            "message": f"{want} of {want} pods succeeded"}


def terminations(pods: list[dict], container: str) -> list[dict]:
    """`state.terminated` (or lastState) of `container` in each pod, newest first; `disrupted`: the pod was
    stopped by an eviction, a preemption or a drain."""
    found = []
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            if cs.get("name") != container:
                continue
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term:
                found.append({**term, "pod": pod["metadata"]["name"], "index": completion_index(pod),
                              "disrupted": disruption(pod) is not None})
    return sorted(found, key=lambda t: t.get("finishedAt") or "", reverse=True)


def disruption(pod: dict) -> dict | None:
    """The pod's DisruptionTarget condition: the API server, the scheduler or the kubelet is stopping it (an
    eviction, a preemption, a node drain). The Job's podFailurePolicy does not count such a pod as failed."""
    cond = get_condition(pod.get("status") or {}, "DisruptionTarget")
    return cond if cond and cond.get("status") == "True" else None


def peer_lost(term: dict) -> bool:
    """The worker stopped because another one did (exit 76), and not for a disruption of its own."""
    return term.get("exitCode") == EXIT_PEER_LOST and not term.get("disrupted")


def charged(term: dict) -> bool:
    """A worker failure that the training Job counts against backoffLimit (see children._failure_policy)."""
    return bool(term.get("exitCode")) and not term.get("disrupted") and term.get("exitCode") != EXIT_PEER_LOST


def completion_index(pod: dict) -> str | None:
    meta = pod.get("metadata", {})
    return (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index") or (
        meta.get("labels") or {}).get("batch.kubernetes.io/job-completion-index")


STARTING = {"ContainerCreating", "PodInitializing"}


def pod_problem(pods: list[dict], container: str) -> tuple[str, str] | None:
    """(reason, message) of the first pod that cannot start: a waiting container (ImagePullBackOff,
    CreateContainerConfigError for a missing Secret, ...) or a pod the scheduler cannot place."""
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        name = pod["metadata"]["name"]
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if cs.get("name") == container and waiting.get("reason") and waiting["reason"] not in STARTING:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                return waiting["reason"], f"pod {name}: {waiting['reason']}{detail}"[:1000]
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                reason = c.get("reason") or Reason.Unschedulable
                return reason, f"pod {name} cannot be scheduled: {c.get('message') or reason}"[:1000]
    return None


PERMANENT = frozenset(PERMANENT_REASONS.values())  # reasons no retry can help with


def failure_reason(term: dict) -> str | None:
    """DatasetInvalid/OutputInUse/ConfigInvalid when the trainer failed on purpose: by exit code (`kubetune
    validate`, `kubetune launch`), or by its termination message's prefix, because plain `accelerate launch`
    turns every child failure into exit 1."""
    reason = PERMANENT_REASONS.get(term.get("exitCode"))
    message = (term.get("message") or "").strip()
    return reason or next((r for r in PERMANENT_REASONS.values() if message.startswith(f"{r}:")), None)


def permanent_failure(pods: list[dict], container: str) -> tuple[str, str] | None:
    """(reason, message) of the newest purposeful trainer failure among the pods, if any."""
    for t in terminations(pods, container):
        reason = t.get("exitCode") and failure_reason(t)
        if reason:
            return reason, last_line(t)
    return None


def explain_failure(job: dict, pods: list[dict], container: str) -> tuple[str, str]:
    """(reason, message) for a failed Job: the trainer's own reason and one-line message when it exited on
    purpose (65/73/78), else the Job controller's reason with the last termination message of a worker that
    failed itself (not one that stopped because a peer did)."""
    cond = job_finished(job) or {}
    permanent = permanent_failure(pods, container)
    if permanent:
        return permanent[0], permanent[1] or cond.get("message", "")
    ends = [t for t in terminations(pods, container) if t.get("exitCode")]
    ends = [t for t in ends if charged(t)] or ends
    reason = cond.get("reason") or Reason.Failed
    detail = last_line(ends[0]) if ends else ""
    message = cond.get("message") or reason
    return reason, f"{message}: {detail}" if detail else message


def last_line(term: dict) -> str:
    text = (term.get("message") or "").strip()
    return text.splitlines()[-1][:1000] if text else ""


def success_report(pods: list[dict], container: str) -> dict:
    """Rank 0's termination message after a successful run, when the trainer wrote it as JSON
    ({"manifestUri", "manifestSha256", "steps", "totalSteps", "tokensTrained", "task", "headline", "selectedStep",
    "metrics": {"test": {...}, "baseline": {...}}}: kubetune_trainer.cli.success_message); {} otherwise."""
    for t in terminations(pods, container):
        if t.get("exitCode") == 0 and t.get("index") in ("0", None):
            try:
                doc = json.loads(t.get("message") or "")
            except ValueError:
                continue
            if isinstance(doc, dict):
                return doc
    return {}


def validation_report(pods: list[dict], container: str) -> dict | None:
    """The validation pod's termination message when the trainer wrote it as JSON (kubetune validate: {"valid",
    "splits", "sequences", "packingEfficiency", "plannedSteps", "estimate", "cache", "summary"}); None for an older
    trainer's plain text."""
    ends = terminations(pods, container)
    try:
        doc = json.loads((ends[0].get("message") or "") if ends else "")
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


# -- what ended a training attempt ----------------------------------------------------------------------------

PREEMPTION, INFRASTRUCTURE, FAILURE = "preemptions", "infrastructure", "failures"  # keys of status.attempts
# DisruptionTarget reasons that mean the node went away or failed, not that someone wanted the GPUs back
NODE_DISRUPTIONS = {"DeletionByTaintManager": "node lost (not ready or unreachable)",
                    "DeletionByPodGC": "node lost (the Node is gone)",
                    "TerminationByKubelet": "node failing (the kubelet stopped the pod: pressure or shutdown)"}
IMAGE_PULL = frozenset({"ImagePullBackOff", "InvalidImageName"})  # a waiting trainer that will not start


@dataclass(frozen=True)
class Incident:
    """What ended (or must end) a training attempt: its kind (a key of status.attempts) and the evidence."""

    kind: str
    message: str


def _pod(p: dict, why: str) -> str:
    return f"worker {completion_index(p)} (pod {p['metadata']['name']}): {why}"


def _disrupted(pods: list[dict]) -> Incident | None:
    for p in pods:
        cond = disruption(p)
        if cond:
            reason = cond.get("reason") or "DisruptionTarget"
            why = reason + (f" ({cond['message']})" if cond.get("message") else "")
            node = NODE_DISRUPTIONS.get(reason)
            return Incident(INFRASTRUCTURE, _pod(p, f"{node}: {why}")) if node else Incident(PREEMPTION, _pod(p, why))
        if (p.get("status") or {}).get("reason") in ("NodeLost", "Evicted", "Terminated"):
            status = p["status"]
            return Incident(INFRASTRUCTURE, _pod(p, f"{status['reason']}: {status.get('message') or 'node failed'}"))
    return None


def _sidecar_oom(pods: list[dict], container: str) -> Incident | None:
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            if cs.get("name") != container and term.get("reason") == "OOMKilled":
                return Incident(INFRASTRUCTURE, _pod(p, f"container {cs['name']} was killed for memory (OOMKilled)"))
    return None


def _stuck(pods: list[dict], container: str) -> Incident | None:
    """A worker whose image cannot be pulled: the Job would wait for it forever."""
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if cs.get("name") == container and waiting.get("reason") in IMAGE_PULL:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                return Incident(INFRASTRUCTURE, _pod(p, f"{waiting['reason']}{detail}"[:500]))
    return None


def _exits(pods: list[dict], container: str) -> Incident | None:
    ends = [t for t in terminations(pods, container) if charged(t)]
    if ends:
        t = ends[-1]  # the first to fail: the others may have failed because it did
        detail = f": {last_line(t)}" if last_line(t) else ""
        why = f"worker {t['index']} (pod {t['pod']}): exit code {t['exitCode']}{detail}"
        return Incident(INFRASTRUCTURE if t["exitCode"] == EXIT_RETRYABLE else FAILURE, why)
    if any(peer_lost(t) for t in terminations(pods, container)):
        return Incident(INFRASTRUCTURE, "every worker that stopped lost a peer (exit 76) and none failed itself: "
                        "the workers lost each other (network, rendezvous)")
    return None


def disrupted(pods: list[dict]) -> Incident | None:
    """A worker's disruption while the attempt still runs, as evidence to keep (an evicted pod is deleted once
    it has stopped: its DisruptionTarget goes with it)."""
    return _disrupted(pods)


def attempt_end(job: dict, pods: list[dict], container: str, eviction: tuple[str, str] | None,
                seen: Incident | None = None) -> Incident | None:
    """Whether the training attempt of `job` has ended, or must end, for an incident, and its kind, by evidence:
    - preemption: a worker's DisruptionTarget condition (eviction, scheduler preemption), or Kueue's eviction
      (`eviction`: the Workload's Evicted (reason, message) while Kueue suspends the Job; not one the operator
      asked for);
    - infrastructure: the node lost (DisruptionTarget by the taint manager, the pod GC or the kubelet, a pod
      NodeLost), an image pull failing, a container other than the trainer killed for memory, the trainer's
      exit 75 (storage or network unreachable after retries) without a disruption, workers that only lost each
      other, or a Job failed with no worker left to say why;
    - failure: the trainer's own exit code (1, a crash; 137, killed for memory; ...).
    `seen`: the evidence of a disruption recorded while the attempt still ran (status.attempts.ending), which
    outweighs what the remaining workers say (they exit 75 or 76 because of it).
    None: the attempt goes on, or ended otherwise (success, a permanent failure, its deadline)."""
    done = job_finished(job)
    if eviction and (job.get("spec") or {}).get("suspend"):
        reason, message = eviction
        kind = PREEMPTION if reason == "Preempted" else INFRASTRUCTURE
        return Incident(kind, f"evicted by Kueue: {reason}" + (f" ({message})" if message else ""))
    if done is None:
        return _stuck(pods, container)
    if done["type"] != "Failed" or done.get("reason") == "DeadlineExceeded" or permanent_failure(pods, container):
        return None
    found = _disrupted(pods) or seen or _sidecar_oom(pods, container) or _exits(pods, container)
    if found:
        return found
    why = done.get("message") or done.get("reason") or "no reason given"
    return Incident(INFRASTRUCTURE, f"the training Job failed with no worker left to say why ({why}): were the "
                    "workers' node and pods lost?")

"""Kueue, as the reconcile sees it: the Workload that Kueue makes for a queued training Job.

With `spec.scheduling.queueName`, Kueue alone owns the training Job's `spec.suspend`: it admits the Job by
unsuspending it and preempts it by suspending it. The operator stops and restarts such workers through the
Workload instead: `spec.active: false` (Kueue's deactivation) makes Kueue evict the workload and suspend the Job,
`spec.active: true` puts it back in its queue. The operator marks the Workloads it deactivates with
DEACTIVATED_BY, so that it only ever reactivates its own (an administrator's deactivation stays).

Pure functions over the Workload dicts (kueue.x-k8s.io/v1beta2) the loop's index holds.
"""

from __future__ import annotations

GROUP, VERSION, PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
API_VERSION = f"{GROUP}/{VERSION}"
DEACTIVATED_BY = "kubetune.io/deactivated"  # annotation: why the operator deactivated the Workload (suspend, restart)
PREEMPTED = "Preempted"  # Kueue's reason for an eviction by preemption (the Evicted condition, schedulingStats)
DEACTIVATED = frozenset({"Deactivated", "InactiveWorkload"})  # Kueue's reasons for evicting an inactive Workload


def _condition(workload: dict, type_: str) -> dict | None:
    return next((c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def condition(workload: dict, type_: str) -> dict | None:
    """The Workload's condition `type_` if it is True."""
    found = _condition(workload, type_)
    return found if found and found.get("status") == "True" else None


def of_job(workloads: list[dict], job: dict | None) -> dict | None:
    """The Workload Kueue made for `job` (its controller owner), if any."""
    uid = job and job["metadata"].get("uid")
    return next((w for w in workloads if uid and any(r.get("uid") == uid and r.get("controller")
                                                     for r in w["metadata"].get("ownerReferences") or [])), None)


def owner_job(workload: dict) -> str | None:
    """The name of the Job that owns `workload`, if a Job does."""
    return next((r["name"] for r in workload["metadata"].get("ownerReferences") or []
                 if r.get("kind") == "Job" and r.get("controller")), None)


def active(workload: dict) -> bool:
    return (workload.get("spec") or {}).get("active") is not False


def deactivated_by_us(workload: dict | None) -> str | None:
    """Why the operator deactivated `workload` (suspend, restart), if it did and it is still inactive."""
    if not workload or active(workload):
        return None
    return (workload["metadata"].get("annotations") or {}).get(DEACTIVATED_BY)


def pending(workload: dict) -> bool:
    """Waiting in its queue: active, holding no quota, not finished."""
    return active(workload) and not any(condition(workload, t) for t in ("QuotaReserved", "Finished"))


def deactivate(why: str) -> dict:
    """A merge patch that makes Kueue evict the workload (it suspends the Job), marked as ours."""
    return {"metadata": {"annotations": {DEACTIVATED_BY: why}}, "spec": {"active": False}}


def reactivate() -> dict:
    """A merge patch that puts a workload the operator deactivated back in its queue."""
    return {"metadata": {"annotations": {DEACTIVATED_BY: None}}, "spec": {"active": True}}


def position(workload: dict, workloads: list[dict]) -> tuple[int, int]:
    """(position, pending) of `workload` among the pending workloads of its LocalQueue (this namespace's view of
    the queue): Kueue takes higher priorities first, then the earlier ones (the time an evicted one was requeued
    counts as its time)."""
    queue = (workload.get("spec") or {}).get("queueName")
    waiting = [w for w in workloads if pending(w) and (w.get("spec") or {}).get("queueName") == queue]

    def order(w: dict) -> tuple[int, str]:
        requeued = condition(w, "Requeued") or {}
        since = requeued.get("lastTransitionTime") or w["metadata"].get("creationTimestamp") or ""
        return -((w.get("spec") or {}).get("priority") or 0), since

    ranked = sorted(waiting, key=order)
    uid = workload["metadata"].get("uid")
    index = next((i for i, w in enumerate(ranked) if w["metadata"].get("uid") == uid), len(ranked))
    return index + 1, max(len(ranked), index + 1)


def eviction(workload: dict | None) -> tuple[str, str] | None:
    """(reason, message) of the Workload's eviction while it is evicted (Preempted, Deactivated, ...)."""
    evicted = workload and condition(workload, "Evicted")
    return (evicted.get("reason") or "Evicted", evicted.get("message") or "") if evicted else None


def incident(workload: dict | None) -> tuple[str, str] | None:
    """(reason, message) of an eviction that ends a training attempt: by preemption or for the infrastructure
    (PodsReadyTimeout, ...), not a deactivation (the operator's suspend or restart, an administrator's), which
    stays until the Workload is admitted again."""
    evicted = eviction(workload) if workload and active(workload) else None
    return evicted if evicted and evicted[0] not in DEACTIVATED else None


def waiting_message(queue: dict, workload: dict | None) -> str:
    """What the FineTuneJob's status says while Kueue holds its training Job: the queue and the position in it
    (`queue`: status.queue, from queue_status) and Kueue's own reason (the quota it waits for, a LocalQueue that
    does not exist, ...)."""
    name = queue["localQueue"]
    if workload is None:
        return (f"waiting for Kueue to admit the workload (LocalQueue {name}); Kueue has not made a Workload for "
                "the training Job yet (is Kueue running, with the batch/job integration?)")
    if queue.get("admitted"):
        return f"admitted by Kueue (LocalQueue {name}); starting the workers"
    where = f", position {queue['position']} of {queue['pending']}" if "position" in queue else ""
    reserved = _condition(workload, "QuotaReserved")
    why = f": {reserved['message']}" if reserved and reserved.get("message") else ""
    return f"waiting for Kueue to admit the workload (LocalQueue {name}{where}){why}"


def preemptions(workload: dict) -> int:
    """Times Kueue preempted the workload (its schedulingStats)."""
    stats = ((workload.get("status") or {}).get("schedulingStats") or {}).get("evictions") or []
    return sum(e.get("count") or 0 for e in stats if e.get("reason") == PREEMPTED)


def queue_status(queue: str, workload: dict | None, workloads: list[dict]) -> dict:
    """status.queue (status.QueueStatus)."""
    out: dict = {"localQueue": queue}
    if workload is None:
        return out
    admission = (workload.get("status") or {}).get("admission") or {}
    out.update(workload=workload["metadata"]["name"], admitted=bool(condition(workload, "QuotaReserved")),
               clusterQueue=admission.get("clusterQueue"), preemptions=preemptions(workload) or None)
    if pending(workload):
        out["position"], out["pending"] = position(workload, workloads)
    return {k: v for k, v in out.items() if v is not None}

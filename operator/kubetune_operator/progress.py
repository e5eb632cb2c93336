"""The trainer's progress and results, into the status: rank 0's /metrics while it trains, and the reports it
leaves in its termination message when validation or training ends. Pure: no API calls here.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from kubetune_api import CHECKPOINTS_IN_STATUS, QUALITY_CLASSES
from prometheus_client.parser import text_string_to_metric_families
from pydantic.alias_generators import to_camel

from .conditions import rfc3339
from .observe import success_report


def human_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# -- the reports: the validation's (status.dataset), and rank 0's on success (status.result, progress) -----------

URI_LIMIT = 2048
STORAGE_LOCATIONS = ("s3://", "pvc://", "/")  # where dataset.cacheUri and a checkpoint may be (a local path: a volume)


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(value) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return value if ok else None


def dataset_status(report: dict) -> dict:
    """status.dataset from the validation report: only the fields the status schema has, each only when it is
    there and of its type. Nothing else of the message is copied (it names the data; the cache URI is ours)."""
    def part(key: str) -> dict:
        return report.get(key) if isinstance(report.get(key), dict) else {}

    train, estimate, cache = part("splits").get("train"), part("estimate"), part("cache")
    train = train if isinstance(train, dict) else {}
    uri = cache.get("uri")
    uri = uri if isinstance(uri, str) and uri.startswith(STORAGE_LOCATIONS) and len(uri) <= URI_LIMIT else None
    fields = {
        "samples": _count(train.get("samples")), "tokens": _count(train.get("tokens")),
        "trainedTokens": _count(train.get("trainedTokens")), "truncated": _count(train.get("truncated")),
        "sequences": _count(report.get("sequences")), "packingEfficiency": _number(report.get("packingEfficiency")),
        "plannedSteps": _count(report.get("plannedSteps")), "estimatedSeconds": _number(estimate.get("seconds")),
        "estimatedGPUHours": _number(estimate.get("gpuHours")),
        "cacheUri": uri,
        "quality": dataset_quality(report.get("quality")),
    }
    return {k: v for k, v in fields.items() if v is not None}


# -- status.dataset.quality: counts only, from the report's `quality` (kubetune_api.DatasetQuality) -------------

SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # a split name the status and a metric label may carry
PII_KINDS = ("email", "phone", "card", "secret")
SUMMARY_LIMIT = 1000


def _per_split(value, read) -> dict | None:
    """{split: read(value)} for the splits with a plain name and a value `read` accepts (not None, not {})."""
    if not isinstance(value, dict):
        return None
    kept = {k: read(v) for k, v in value.items() if isinstance(k, str) and SPLIT_NAME.fullmatch(k)}
    return {k: v for k, v in kept.items() if v not in (None, {})} or None


def _kinds(kinds: tuple[str, ...]):
    """A reader of {kind: count} for these kinds."""
    def read(value) -> dict | None:
        counts = {k: _count(value.get(k)) for k in kinds} if isinstance(value, dict) else {}
        return {k: v for k, v in counts.items() if v is not None}
    return read


def _classes(value) -> list[str] | None:
    """Class names (a classifier's labels: str or int), each at most 100 characters, at most QUALITY_CLASSES."""
    if not isinstance(value, list):
        return None
    names = [str(v)[:100] for v in value if isinstance(v, str | int) and not isinstance(v, bool)]
    return names[:QUALITY_CLASSES] or None


def _labels(value) -> dict | None:
    if not isinstance(value, dict):
        return None
    suspected = value.get("suspected")  # a count, or {"count": N, "lines": [...]} (the lines stay out)
    suspected = suspected.get("count") if isinstance(suspected, dict) else suspected
    labels = {"conflicts": _count(value.get("conflicts")), "suspected": _count(suspected),
              "rare": _classes(value.get("rare")), "unseen": _classes(value.get("unseen"))}
    return {k: v for k, v in labels.items() if v is not None} or None


def dataset_quality(quality) -> dict | None:
    """status.dataset.quality from the report's `quality`: each count that is a count, for splits with a plain
    name, the labels' class names and the one-line summary; anything else of it (the line numbers) is left out,
    and a malformed part is dropped, never an error."""
    if not isinstance(quality, dict):
        return None
    summary = quality.get("summary")
    summary = summary.strip().splitlines()[0][:SUMMARY_LIMIT] if isinstance(summary, str) and summary.strip() else None
    fields = {
        "duplicates": _per_split(quality.get("duplicates"), _count),
        "leakage": _per_split(quality.get("leakage"), _kinds(("exact", "near"))),
        "pii": _per_split(quality.get("pii"), _kinds(PII_KINDS)),
        "labels": _labels(quality.get("labels")),
        "dropped": _per_split(quality.get("dropped"), _count),
        "findings": _count(quality.get("findings")),
        "summary": summary,
    }
    return {k: v for k, v in fields.items() if v is not None} or None


def quality_message(quality: dict | None) -> str | None:
    """What the Validated condition and the DataQuality Event say when a check found something; None when none
    did."""
    findings = (quality or {}).get("findings")
    if not findings:
        return None
    return quality.get("summary") or (f"{findings} data-quality check{'s' if findings > 1 else ''} found "
                                      "something; see status.dataset.quality")


def result_from_pods(pods: list[dict], container: str, output_uri: str) -> dict:
    """status.result once training succeeded; the sha256, the task, the published step and the test metrics come
    from rank 0's success report (what a trainer without them leaves out stays out)."""
    res = {"adapterUri": output_uri, "manifestUri": output_uri.rstrip("/") + "/manifest.json"}
    report = success_report(pods, container)
    if report.get("manifestSha256") or report.get("sha256"):
        res["sha256"] = report.get("manifestSha256") or report["sha256"]
    if isinstance(report.get("task"), str):
        res["task"] = report["task"]
    if isinstance(report.get("selectedStep"), int) and not isinstance(report["selectedStep"], bool):
        res["selectedStep"] = report["selectedStep"]
    reported = report.get("metrics") if isinstance(report.get("metrics"), dict) else {}
    metrics = {model: _scalars(reported.get(model)) for model in ("test", "baseline", "validation")}
    metrics = {model: values for model, values in metrics.items() if values}
    if metrics:
        res["metrics"] = metrics
    summary = result_summary(metrics, report.get("headline") if isinstance(report.get("headline"), str) else "loss")
    if summary:
        res["summary"] = summary
    return res


TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


def checkpoints_from_report(report: dict) -> list[dict] | None:
    """status.checkpoints from rank 0's success report (kubetune_api.CheckpointStatus): the newest ones, each
    field only when it is of its type (a malformed entry is dropped, never an error); None when there are none."""
    entries = report.get("checkpoints") if isinstance(report.get("checkpoints"), list) else []
    rows = []
    for entry in entries[-CHECKPOINTS_IN_STATUS:]:
        entry = entry if isinstance(entry, dict) else {}
        step, uri, when = _count(entry.get("step")), entry.get("uri"), entry.get("time")
        if step is None or not isinstance(uri, str) or not uri.startswith(STORAGE_LOCATIONS) or len(uri) > URI_LIMIT:
            continue
        row = {"step": step, "uri": uri, "time": when if isinstance(when, str) and TIME.fullmatch(when) else None,
               "validation": _scalars(entry.get("validation")) or None,
               "published": True if entry.get("published") is True else None}
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows or None


def _scalars(values) -> dict[str, float]:
    """The finite numbers of a reported split (the status schema takes numbers only, and JSON no NaN)."""
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _three(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def result_summary(metrics: dict, headline: str) -> str | None:
    """The printer column's text: `accuracy 0.912 (base 0.334)`, `loss 1.234 (base 2.345)`, `loss 1.234` without
    a baseline; None without a test split."""
    test = (metrics.get("test") or {}).get(headline)
    if test is None:
        return None
    base = (metrics.get("baseline") or {}).get(headline)
    return f"{headline} {_three(test)}" + (f" (base {_three(base)})" if base is not None else "")


def final_progress(status: dict, report: dict) -> None:
    """On success, status.progress and tokensTrained say where the run ended (rank 0's success report), not
    what the last scrape saw, which may be many steps earlier or count only the tokens since a resume; no ETA."""
    if isinstance(report.get("tokensTrained"), int):
        status["tokensTrained"] = report["tokensTrained"]
    progress = {k: v for k, v in (status.get("progress") or {}).items() if k not in ("eta", "etaSeconds")}
    step, total = report.get("steps"), report.get("totalSteps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        percent = round(100 * min(step / total, 1.0), 1)
        progress.update(step=step, totalSteps=total, percent=percent, text=f"{step}/{total} ({percent:g}%)")
    if progress:
        status["progress"] = progress


# -- rank 0's /metrics while it trains ----------------------------------------------------------------------

TRAINER_PREFIX = "kubetune_trainer_"
TRAIN_METRIC = "train_metric:"  # kubetune_trainer_train_metric{metric="x"} is parsed as "train_metric:x"
EVAL_METRIC = "validation_metric:"  # kubetune_trainer_evaluation{split="validation",model="finetuned",metric="x"}


def parse_trainer_metrics(text: str, job_name: str) -> dict[str, float | str]:
    """The rank-0 trainer's /metrics text -> {"step": 12.0, ..., "phase": "training"} for this job; the objective's
    training metrics as "train_metric:<name>"."""
    values: dict[str, float | str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("finetunejob") != job_name or not sample.name.startswith(TRAINER_PREFIX):
                continue
            name = sample.name.removeprefix(TRAINER_PREFIX)
            if name == "phase":
                if sample.value == 1:
                    values["phase"] = sample.labels.get("phase", "")
            elif name == "train_metric" and math.isfinite(sample.value):
                values[f"{TRAIN_METRIC}{sample.labels.get('metric', '')}"] = sample.value
            elif name == "evaluation" and math.isfinite(sample.value) and \
                    (sample.labels.get("split"), sample.labels.get("model")) == ("validation", "finetuned"):
                values[f"{EVAL_METRIC}{sample.labels.get('metric', '')}"] = sample.value
            elif name.endswith("_created") or "gpu" in sample.labels or "split" in sample.labels or \
                    not math.isfinite(sample.value):  # per-GPU and evaluation families: not status fields
                continue
            else:
                values[name] = sample.value
    return values


def apply_metrics(status: dict, m: dict, checkpoint_uri: str, now: datetime) -> None:
    """Copy what the trainer reported into status (in place). Zero losses mean "not measured yet"."""
    step, total = int(m.get("step", 0)), int(m.get("total_steps", 0))
    old = status.get("progress") or {}
    percent = round(100 * min(m.get("progress_ratio", step / total if total else 0), 1.0), 1)
    progress = {"step": step, "totalSteps": total, "epoch": round(m.get("epoch", 0), 3), "percent": percent,
                "text": f"{step}/{total} ({percent:g}%)" if total else None}
    if m.get("eta_seconds") is not None and total:
        progress["etaSeconds"] = int(m["eta_seconds"])
        progress["eta"] = human_duration(m["eta_seconds"])
    status["progress"] = {k: v for k, v in progress.items() if v is not None}
    if step > old.get("step", 0) or not status.get("lastProgressTime"):
        status["lastProgressTime"] = rfc3339(now)
    for key, metric, cast in (("trainLoss", "train_loss", float), ("evalLoss", "validation_loss", float),
                              ("tokensPerSecond", "tokens_per_second", float),
                              ("tokensTrained", "tokens_trained_total", int)):
        value = m.get(metric)
        if value is not None and (value > 0 or key == "tokensTrained"):
            status[key] = round(cast(value), 4) if cast is float else cast(value)
    for key, prefix, digits in (("trainMetrics", TRAIN_METRIC, 4), ("evalMetrics", EVAL_METRIC, 6)):
        found = {to_camel(k.removeprefix(prefix)): round(float(v), digits) for k, v in m.items()
                 if k.startswith(prefix)}
        if found:
            status[key] = found
    if m.get("validation_step") is not None:
        status["evalStep"] = int(m["validation_step"])
    beat = m.get("heartbeat_timestamp_seconds")
    if beat:
        status["lastHeartbeatTime"] = rfc3339(datetime.fromtimestamp(beat, UTC))
    stamp = m.get("last_checkpoint_timestamp_seconds")
    if stamp:
        when = rfc3339(datetime.fromtimestamp(stamp, UTC))
        status["lastCheckpoint"] = {"time": when, "count": int(m.get("checkpoints_total", 0)), "uri": checkpoint_uri}
        if m.get("last_checkpoint_step"):
            status["checkpoints"] = add_checkpoint(status.get("checkpoints"), int(m["last_checkpoint_step"]),
                                                   checkpoint_uri, when)


def add_checkpoint(checkpoints: list[dict] | None, step: int, prefix: str, when: str) -> list[dict]:
    """status.checkpoints while the run trains: the newest checkpoint added (step, its folder, time; the validation
    metrics come with rank 0's report at the end), the newest CHECKPOINTS_IN_STATUS kept, one entry per step."""
    rows = [c for c in checkpoints or [] if c.get("step") != step]
    rows.append({"step": step, "uri": f"{prefix.rstrip('/')}/step-{step:08d}/", "time": when})
    return sorted(rows, key=lambda c: c["step"])[-CHECKPOINTS_IN_STATUS:]

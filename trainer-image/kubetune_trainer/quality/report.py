"""The data report's `quality` section, from what each split's checks found (checks.SplitChecks.finish), and
its compact form for the validation's termination message and the FineTuneJob's status (counts, no lines)."""

from __future__ import annotations

from typing import Any

from kubetune_api import QualitySpec

from .pii import KINDS

CHECKS = {"duplicates": "duplicates", "leakage": "leakage", "pii": "personalData", "conflicts": "conflicts",
          "suspected": "labelErrors"}  # a finding -> the dataset.quality field that decides what it does


def section(policy: QualitySpec, splits: dict[str, dict | None]) -> dict[str, Any] | None:
    """The whole section (`kubetune validate --json`): per split and per check, counts and 1-based lines."""
    found = {split: doc for split, doc in splits.items() if doc is not None}
    if not found:
        return None
    actions = policy.dump()
    doc: dict[str, Any] = {"policy": actions}
    for check in ("duplicates", "leakage", "pii"):
        per_split = {split: d[check] for split, d in found.items() if check in d}
        if per_split:
            doc[check] = per_split
    labels = (found.get("train") or {}).get("labels")
    if labels is not None:
        unseen = {split: d["unseenClasses"] for split, d in found.items() if d.get("unseenClasses")}
        doc["labels"] = {**labels, **({"unseen": unseen} if unseen else {})}
    doc["actions"] = _actions(doc, found, actions)
    doc["dropped"] = {split: d["dropped"] for split, d in found.items() if d.get("dropped", {}).get("count")}
    doc["findings"] = sum(1 for a in doc["actions"] if a["count"]) + bool(labels and labels.get("rare")) + \
        bool(doc.get("labels", {}).get("unseen"))
    doc["summary"] = summary(doc, found)
    return doc


def _actions(doc: dict, found: dict[str, dict], actions: dict) -> list[dict]:
    """What each check with findings did: dropped records (with the train lines) or a warning."""
    out = []
    train = found.get("train") or {}
    for check, field in CHECKS.items():
        action = actions.get(field)
        if check == "duplicates":
            for split, d in doc.get("duplicates", {}).items():
                if d["count"]:
                    what = action if split == "train" else "warn"  # repeats in evaluation splits are reported
                    out.append({"check": check, "action": what, "split": split, "count": d["count"],
                                "lines": d["lines"]})
        elif check == "leakage":
            copies = train.get("trainCopies") or {"count": 0, "lines": []}
            if copies["count"]:
                out.append({"check": check, "action": action, "split": "train", "count": copies["count"],
                            "lines": copies["lines"]})
        elif check == "pii":
            pii = train.get("pii") or {}
            if pii.get("lines"):
                out.append({"check": "personalData", "action": action, "split": "train", "count": len(pii["lines"]),
                            "lines": pii["lines"]})
        else:
            labels = train.get("labels") or {}
            entry = labels.get(check)
            lines = labels.get("conflictLines") if check == "conflicts" else (entry or {}).get("lines")
            if lines:
                out.append({"check": field, "action": action, "split": "train", "count": len(lines), "lines": lines})
    return out


def summary(doc: dict, found: dict[str, dict]) -> str:
    """One line for people, per split: what was found and what was done; never a value found."""
    parts: dict[str, list[str]] = {}
    for a in doc["actions"]:
        if a["check"] == "leakage":
            continue  # said with the evaluation split it leaked from
        n = a["count"]
        what = {"duplicates": f"{_records(n, 'repeated record')}",
                "personalData": f"{_records(n, 'record')} with personal data",
                "conflicts": f"{_records(n, 'record')} whose text has another label too",
                "labelErrors": f"{_records(n, 'suspected label error')}"}[a["check"]]
        if a["check"] == "personalData":
            pii = found["train"]["pii"]
            what += " (" + ", ".join(f"{pii[k]} {k}" for k in KINDS if pii.get(k)) + ")"
        parts.setdefault(a["split"], []).append(what + (" dropped" if a["action"] == "drop" else ""))
    copies = next((a for a in doc["actions"] if a["check"] == "leakage"), None)
    for split, leak in (doc.get("leakage") or {}).items():
        if leak["exact"] or leak["near"]:
            text = f"{_records(leak['exact'] + leak['near'], 'record')} also in train ({leak['exact']:,} exact, " \
                   f"{leak['near']:,} near)"
            if copies and copies["action"] == "drop":
                text += ", their train copies dropped"
            parts.setdefault(split, []).append(text)
    labels = doc.get("labels") or {}
    if labels.get("rare"):
        parts.setdefault("train", []).append("rare classes " + ", ".join(map(str, labels["rare"][:10])))
    for split, classes in (labels.get("unseen") or {}).items():
        parts.setdefault(split, []).append("classes not in train " + ", ".join(map(str, classes[:10])))
    return "; ".join(f"{split}: " + ", ".join(texts) for split, texts in parts.items()) or "no findings"


def _records(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def compact(doc: dict[str, Any]) -> dict[str, Any]:
    """The section without lines: what status.dataset.quality holds."""
    out: dict[str, Any] = {}
    if doc.get("duplicates"):
        out["duplicates"] = {split: d["count"] for split, d in doc["duplicates"].items()}
    if doc.get("leakage"):
        out["leakage"] = {split: {"exact": d["exact"], "near": d["near"]} for split, d in doc["leakage"].items()}
    if doc.get("pii"):
        out["pii"] = {split: {k: d.get(k, 0) for k in KINDS} for split, d in doc["pii"].items()}
    labels = doc.get("labels")
    if labels is not None:
        out["labels"] = {"conflicts": labels.get("conflicts", 0),
                         "suspected": (labels.get("suspected") or {}).get("count", 0),
                         "rare": labels.get("rare", []),
                         "unseen": sorted({c for classes in (labels.get("unseen") or {}).values() for c in classes})}
    out["dropped"] = {split: d["count"] for split, d in (doc.get("dropped") or {}).items()}
    out["findings"] = doc.get("findings", 0)
    out["summary"] = doc.get("summary", "")
    return out


def quality_rows(quality: dict[str, Any], policy: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The compact section's findings for people: (check, split, found, action) per check and split, the action
    being what the dataset.quality policy did about a finding (`kubetune validate`'s table, the report page's)."""
    rows: list[tuple[str, str, str, str]] = []

    def row(check: str, field: str, split: str, found: str, nonzero: bool) -> None:
        action = policy.get(field, "") if split == "train" or field == "leakage" else "report"
        rows.append((check, split, found, str(action) if nonzero else ""))

    for split, n in (quality.get("duplicates") or {}).items():
        row("duplicates", "duplicates", split, f"{n:,}", n > 0)
    for split, leak in (quality.get("leakage") or {}).items():
        row("in train (leakage)", "leakage", split, f"{leak['exact']:,} exact, {leak['near']:,} near",
            leak["exact"] + leak["near"] > 0)
    for split, kinds in (quality.get("pii") or {}).items():
        found = ", ".join(f"{n:,} {kind}" for kind, n in kinds.items() if n) or "0"
        row("personal data", "personalData", split, found, found != "0")
    labels = quality.get("labels")
    if labels is not None:
        row("label conflicts", "conflicts", "train", f"{labels['conflicts']:,}", labels["conflicts"] > 0)
        row("suspected label errors", "labelErrors", "train", f"{labels['suspected']:,}", labels["suspected"] > 0)
        rows.append(("rare classes", "train", ", ".join(map(str, labels["rare"])) or "none", ""))
        if labels.get("unseen"):
            rows.append(("classes not in train", "", ", ".join(map(str, labels["unseen"])), ""))
    for split, n in (quality.get("dropped") or {}).items():
        rows.append(("dropped in all", split, f"{n:,}", ""))
    return rows

"""Writing the status: its conditions, and times as RFC 3339 strings. Pure helpers on the status dict."""

from __future__ import annotations

from datetime import UTC, datetime

from kubetune_api import CONDITION_TYPES


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def get_condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def set_condition(status: dict, type_: str, value: bool | None, reason: str, message: str, generation: int,
                  now: datetime) -> None:
    """Set one condition in place; lastTransitionTime only moves when the True/False/Unknown value does."""
    new = {"type": type_, "status": {True: "True", False: "False", None: "Unknown"}[value], "reason": reason,
           "message": message, "observedGeneration": generation}
    old = get_condition(status, type_)
    same = old and old["status"] == new["status"]
    new["lastTransitionTime"] = old["lastTransitionTime"] if same else rfc3339(now)
    others = [c for c in status.get("conditions") or [] if c.get("type") != type_]
    status["conditions"] = sorted([*others, new], key=lambda c: CONDITION_TYPES.index(c["type"])
                                  if c["type"] in CONDITION_TYPES else len(CONDITION_TYPES))

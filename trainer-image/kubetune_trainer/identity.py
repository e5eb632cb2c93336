"""Run identity: which run made an object in storage.

A run is (uid, specHash): the FineTuneJob's uid (`kubetune run`: a hash of the config) and a hash of the
fields that determine what is trained (base model, data, method, hyperparameters less their `performance`).
The published manifest and every checkpoint carry it, so a run never mistakes another run's output or
checkpoints for its own.

`claim` runs before any GPU work (and in `kubetune validate`): a prefix that holds another run's manifest,
checkpoints or claim marker is refused (OutputInUseError, exit 73) unless `output.overwrite: true`, which moves
the old files aside to `<prefix>.replaced-<UTC time>/` (never deletes them). A first claim writes the marker
`run.json` (the identity, the job, the time) at the output prefix, and at the checkpoint prefix when that lies
outside it, with a conditional write (If-None-Match: *, storage.put_json_if): of two runs that start on a fresh
prefix at once exactly one claims it, the other is refused at once, naming the run (and job) that won.
The marker is not part of the adapter: the manifest's `files` lists only what `publish` uploaded.

`commit` publishes: the files were uploaded to `<output>/.staging/<run uid>/` (minutes, outside the published
files); the commit is the marker rewritten with If-Match on the ETag of this run's claim (one conditional write:
whoever moved or claimed the prefix since makes it fail), then the staged files moved next to it, manifest.json
written (only if absent) and the marker rewritten again, conditionally, as committed. A run whose claim was
taken over at any point fails with OutputInUseError instead of reporting Succeeded.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubetune_api import TrainerConfig

from .errors import OutputInUseError
from .layout import STEP_DIR
from .redact import redact
from .storage import MANIFEST, Storage, manifest_sha256

TRAINING_FIELDS = ("baseModel", "dataset", "method", "hyperparameters")
MARKER = "run.json"
STAGING = ".staging/"  # under the output prefix: <output>/.staging/<run uid>/ holds the files until the commit


def _sha256(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    uid: str
    spec_hash: str

    @classmethod
    def of(cls, config: TrainerConfig) -> RunIdentity:
        doc = config.dump()
        # hyperparameters.performance says how the trainer computes, not what it trains: a change of it (or a
        # performance field that a newer trainer adds) is the same run, and resumes from its checkpoints.
        doc["hyperparameters"].pop("performance", None)
        spec_hash = _sha256({k: doc.get(k) for k in TRAINING_FIELDS})
        if config.run_id:
            return cls(config.run_id, spec_hash)
        # The manifest, less where it runs (work dir, metrics port, storage endpoint), where it is tracked and
        # output.overwrite.
        local = {k: v for k, v in doc.items() if k not in ("workDir", "metrics", "runId", "storage", "tracking")}
        local["output"] = {k: v for k, v in local["output"].items() if k != "overwrite"}
        return cls("local-" + _sha256(local)[:32], spec_hash)

    def dump(self) -> dict:
        """The manifest's `run` entry."""
        return {"uid": self.uid, "specHash": self.spec_hash}

    def matches(self, run: dict | None) -> bool:
        """Whether a manifest's `run` entry (None: a manifest from before run identity) is this run."""
        return bool(run) and run.get("uid") == self.uid and run.get("specHash") == self.spec_hash

    def __str__(self) -> str:
        return f"run {self.uid} (spec {self.spec_hash[:12]})"


def _folder(uri: str) -> str:
    return uri.rstrip("/") + "/"


def _markers(config: TrainerConfig) -> list[str]:
    """Where a run's claim marker goes: the output prefix, and the checkpoint prefix when that lies outside it."""
    out, ckpt = _folder(config.output.uri), _folder(config.checkpoint_uri)
    return [out + MARKER] + ([] if ckpt.startswith(out) else [ckpt + MARKER])


def _log(event: dict) -> None:
    print(redact(json.dumps(event)), file=sys.stderr, flush=True)


def aside_uri(storage: Storage, prefix: str) -> str:
    """Where output.overwrite moves a prefix: `<prefix>.replaced-<UTC time>/`, with -2, -3... if that is taken."""
    base = prefix.rstrip("/") + ".replaced-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    uri, n = base + "/", 1
    while storage.exists(uri):
        n += 1
        uri = f"{base}-{n}/"
    return uri


def _others(storage: Storage, config: TrainerConfig, identity: RunIdentity) -> list[tuple[str, dict]]:
    """(uri, document) of each manifest, checkpoint manifest and claim marker that another run wrote."""
    uris = [_folder(config.output.uri) + MANIFEST, *_markers(config)]
    uris += [uri for uri in storage.list(_folder(config.checkpoint_uri)) if STEP_DIR.search(uri)]
    docs = ((uri, storage.get_json(uri)) for uri in uris)
    return [(uri, doc) for uri, doc in docs if doc is not None and not identity.matches(doc.get("run"))]


def _refusal(config: TrainerConfig, identity: RunIdentity, uri: str, doc: dict) -> str:
    out = _folder(config.output.uri)
    field, prefix = ("output.uri", out) if uri.startswith(out) else ("checkpoint.uri", _folder(config.checkpoint_uri))
    what = ("published output" if uri == out + MANIFEST else "claim marker" if uri.endswith("/" + MARKER)
            else "checkpoint")
    run = doc.get("run")
    other = (f"run {run.get('uid')} (spec {str(run.get('specHash'))[:12]})" if run
             else "a run that recorded no identity (from before run identity)")
    job = f" of job {doc['job']!r}" if doc.get("job") else ""
    return (f"{field} {prefix} holds another run's files: {uri} is the {what} of {other}{job}, not of this "
            f"{identity}. Refusing to publish over it or resume from its checkpoints: set a new {field}, or set "
            f"output.overwrite: true to move the old files aside to {prefix.rstrip('/')}.replaced-<UTC time>/ "
            "(nothing is deleted)")


def claim(storage: Storage, config: TrainerConfig, identity: RunIdentity, *, write: bool = True,
          report: Callable[[dict], None] = _log) -> dict | None:
    """Make the output and checkpoint prefixes this run's, before any GPU work.

    Returns the published manifest when this very run already published (nothing to do). Raises
    OutputInUseError when another run's files are there, unless output.overwrite is set: then they are moved
    aside (event `output_moved_aside`). write=False only checks (`kubetune validate`, the non-main processes):
    nothing is moved or written, an overwrite to come is reported as `output_will_move_aside`."""
    out, ckpt = _folder(config.output.uri), _folder(config.checkpoint_uri)
    published = storage.get_json(out + MANIFEST)
    if published is not None and identity.matches(published.get("run")):
        return published
    others = _others(storage, config, identity)
    if others and not config.output.overwrite:
        raise OutputInUseError(_refusal(config, identity, *others[0]))
    prefixes = list(dict.fromkeys(out if uri.startswith(out) else ckpt for uri, _ in others))
    for prefix in prefixes:
        run = next(doc.get("run") for uri, doc in others if uri.startswith(prefix))
        if not write:
            report({"event": "output_will_move_aside", "from": prefix, "run": run})
            continue
        aside = aside_uri(storage, prefix)
        moved = storage.move_prefix(prefix, aside)
        report({"event": "output_moved_aside", "from": prefix, "to": aside, "objects": moved, "run": run})
    if write:
        marker = {"kind": "RunClaim", "job": config.job_name, "run": identity.dump(),
                  "claimedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for uri in _markers(config):
            if storage.put_json_if(uri, marker) is None:  # If-None-Match: *: of two runs at once, one claims
                current = storage.get_json(uri)
                if current is None:
                    raise OutputInUseError(f"{uri}: the claim marker changed while this {identity} claimed it "
                                           "(another run moved the prefix); set a new output.uri")
                if not identity.matches(current.get("run")):  # another run was first: refused before any GPU
                    raise OutputInUseError(_refusal(config, identity, uri, current))
        if not storage.conditional_writes:
            report({"event": "conditional_writes_unsupported", "uri": _markers(config)[0],
                    "fallback": "read, compare, write: a concurrent claim is caught by the checks before each "
                                "checkpoint and the commit"})
        check_claim(storage, config, identity)
    return None


def staging_uri(config: TrainerConfig, identity: RunIdentity) -> str:
    """Where `publish_output` uploads this run's files before the commit."""
    return f"{_folder(config.output.uri)}{STAGING}{identity.uid}/"


def commit(storage: Storage, config: TrainerConfig, identity: RunIdentity, staging: str, manifest: dict) -> dict:
    """Publish the files under `staging` (this run's `staging_uri`) at the output prefix, with `manifest` (the
    full manifest.json, `files` included) last. Raises OutputInUseError, and leaves no manifest of this run, when
    the prefix is no longer this run's claim."""
    out = _folder(config.output.uri)
    marker_uri = out + MARKER
    marker, etag = storage.get_json_etag(marker_uri)
    if marker is None or not identity.matches(marker.get("run")):
        check_claim(storage, config, identity)  # raises, naming who holds the prefix now
    committing = {**marker, "committing": {"staging": staging, "manifestSha256": manifest_sha256(manifest)}}
    etag = storage.put_json_if(marker_uri, committing, match=etag)  # the commit: only while the claim is ours
    if etag is None:
        check_claim(storage, config, identity)
        raise OutputInUseError(f"{marker_uri}: the claim of this {identity} changed while it committed; set a "
                               "new output.uri")
    storage.move_prefix(staging, out, into=True)
    manifest_etag = storage.put_json_if(out + MANIFEST, manifest)
    if manifest_etag is None:
        other = storage.get_json(out + MANIFEST) or {}
        raise OutputInUseError(_refusal(config, identity, out + MANIFEST, other))
    done = {**marker, "committed": committing["committing"]}
    if storage.put_json_if(marker_uri, done, match=etag) is None:  # taken over while the files moved
        storage.delete_if(out + MANIFEST, manifest_etag)
        check_claim(storage, config, identity)
        raise OutputInUseError(f"{marker_uri}: the claim of this {identity} changed while it committed; its "
                               "manifest was withdrawn; set a new output.uri")
    storage.delete_prefix(staging)  # empty after the move; a leftover of a store that listed late
    return manifest


def check_claim(storage: Storage, config: TrainerConfig, identity: RunIdentity) -> None:
    """Raise OutputInUseError unless this run's claim marker is still in place (another run may have claimed or
    moved the prefix since): call before writing a checkpoint or publishing."""
    for uri in _markers(config):
        marker = storage.get_json(uri)
        if marker is None:
            raise OutputInUseError(f"{uri}: the claim marker of this {identity} is gone: another run moved or "
                                   "deleted its files; stopping rather than mixing two runs' files. Set a new "
                                   "output.uri")
        if not identity.matches(marker.get("run")):
            raise OutputInUseError(_refusal(config, identity, uri, marker))

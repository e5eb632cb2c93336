"""`kubetune promote`: a FineTuneSweep's best trial, published again under the sweep's output (spec.promote best).

The trial's published output (config.output.uri: the adapter or model files and manifest.json; not its
checkpoints, its unfinished uploads or its claim marker) is copied to the destination, the manifest after the files
it lists, then `sweep.json` naming the sweep, the trial, its parameters and metric, last: a destination with
sweep.json holds a complete promotion.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from kubetune_api import TrainerConfig, join_uri

from .errors import ConfigError
from .identity import MARKER
from .redact import redact
from .storage import Storage, manifest_sha256

RECORD = "sweep.json"
MANIFEST = "manifest.json"
LEFT_OUT = ("checkpoints/", ".staging/", MARKER)  # a trial's checkpoints, unfinished uploads, its run's claim


def _log(event: dict) -> None:
    print(redact(json.dumps(event)), file=sys.stderr, flush=True)


def promote(config: TrainerConfig, to: str, record: dict, storage: Storage | None = None,
            report: Callable[[dict], None] = _log) -> dict:
    """Copy the output at config.output.uri to `to`; returns the sweep.json written there. `report`: the promoted
    event (a JSON line on stderr, the pod's log, by default)."""
    storage = storage or Storage(config.storage)
    src, dst = config.output.uri.rstrip("/") + "/", to.rstrip("/") + "/"
    manifest = storage.get_json(src + MANIFEST)
    if manifest is None:
        raise ConfigError(f"{src} holds no published output (no {MANIFEST}): nothing to promote")
    files = [uri for uri in storage.list(src) if not uri[len(src):].startswith(LEFT_OUT)
             and ".replaced-" not in uri[len(src):] and uri[len(src):] != MANIFEST]
    with tempfile.TemporaryDirectory(dir=config.work_dir if Path(config.work_dir).is_dir() else None) as tmp:
        for uri in files:
            storage.download_to(uri, Path(tmp) / uri[len(src):])
        storage.upload_dir(Path(tmp), dst)
    storage.put_json(dst + MANIFEST, manifest)
    doc = {**record, "source": src, "manifestSha256": manifest_sha256(manifest), "files": len(files)}
    storage.put_json(join_uri(dst, RECORD), doc)
    report({"event": "promoted", "uri": dst, "files": len(files)})
    return doc

"""Stages 2 and 3, validate and tokenize: once per data set, not once per process or per start.

For a task that caches rows (`tasks.CachesRows`: causal-lm), one streaming pass over each split checks every record and
writes its tokens into the memory-mapped cache of data/cache.py, kept in object storage at
`<dataset.cacheUri or checkpoint uri + data-cache/>/<key>/`. The key hashes the data's and the tokenizer's
sha256, the task, the format, maxSeqLength and packing, so whoever comes next with the same inputs (the training
pods after the validation Job, a resumed or retried run, another job) downloads it once per node instead of
tokenizing again, and every process of the node memory-maps the same files.

Other tasks validate here and build their examples in memory (tasks/classification.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kubetune_api import DataFormat, QualityAction, TrainerConfig, join_uri

from .data import DatasetReport
from .data import cache as data_cache
from .data.formats import RecordError, guess_format, with_fields
from .data.records import load_records
from .errors import DatasetError
from .fetch import Fetched, local_path, tokenizer_sha256, tree_sha256
from .quality.checks import Evaluation, Quality
from .quality.normalize import record_text
from .storage import Storage, is_remote
from .tasks import CachesRows, Task

Report = Callable[[dict], None]


@dataclass
class Prepared:
    reports: dict[str, DatasetReport]
    splits: dict[str, Sequence] = field(default_factory=dict)  # what training and evaluation read, per split
    cache: dict = field(default_factory=dict)  # {"uri", "key", "reused"} when the task caches


def inputs_of(fetched: Fetched, beat: Callable[[], None] | None = None) -> dict:
    """What the run trains on, as the checkpoints' fingerprint, the manifest and the cache key record it: the
    sha256 of every split's bytes and of the tokenizer files."""
    return {"datasets": {s: tree_sha256(p, beat=beat) for s, p in fetched.splits.items()},
            "tokenizer": tokenizer_sha256(fetched.model_dir)}


def cache_parts(config: TrainerConfig, task: Task, inputs: dict) -> dict:
    """What the cached arrays depend on (and nothing else: not the learning rate, not the number of processes)."""
    hp = config.hyperparameters
    return {"datasets": inputs["datasets"], "tokenizer": inputs["tokenizer"], **task.describe(),
            "format": config.dataset.format.value, "maxSeqLength": hp.max_seq_length, "packing": hp.packing,
            **({"seed": hp.seed} if hp.packing else {}),
            **({"fields": dict(config.dataset.fields)} if config.dataset.fields else {}),
            "quality": config.dataset.quality.dump()}  # what the checks drop is not in the arrays


def validate_splits(config: TrainerConfig, task: Task, fetched: Fetched, check: Callable | None = None,
                    beat: Callable[[], None] | None = None) -> dict[str, DatasetReport]:
    """Check every record of every split, train first; the first bad one raises DatasetError (exit 65). `check`:
    what checks a split (task.validate, or a pass that also writes the cache). Beats per split. The task's
    quality checks (task.quality) compare train with the validation and test splits, indexed first."""
    check = check or task.validate
    task.quality = quality_of(config, fetched)
    reports: dict[str, DatasetReport] = {}
    for split, path in fetched.splits.items():
        fmt = reports["train"].format if reports else config.dataset.format
        reports[split] = check(split, path, fetched.uris[split], fmt,
                               config.dataset.min_samples if split == "train" else 1)
        if reports[split].format != reports["train"].format:
            raise DatasetError(fetched.uris[split], 0, f"{split} split is {reports[split].format.value} but "
                               f"train is {reports['train'].format.value}", "use one format for all splits")
        if beat:
            beat()
    return reports


def quality_of(config: TrainerConfig, fetched: Fetched) -> Quality:
    """The run's quality checks, with the validation and test splits indexed for the leakage check."""
    policy = config.dataset.quality
    if policy.leakage == QualityAction.off or set(fetched.splits) == {"train"}:
        return Quality(policy)
    return Quality(policy, Evaluation.build(_evaluation_texts(config, fetched), policy.near_threshold))


def _evaluation_texts(config: TrainerConfig, fetched: Fetched) -> Iterator[tuple[str, int, str]]:
    """(split, line, text) of every validation and test record that parses; one that does not is left to the
    split's own pass, which names it."""
    fmt, fields = config.dataset.format, config.dataset.fields
    for split, path in fetched.splits.items():
        if split == "train":
            continue
        try:
            for record in load_records(path, fetched.uris[split]):
                value = with_fields(record.value, fields)
                try:
                    found = guess_format(value) if fmt == DataFormat.auto else fmt
                except RecordError:
                    continue
                yield split, record.line, record_text(value, found)
        except DatasetError:
            continue


def prepare(config: TrainerConfig, task: Task, fetched: Fetched, storage: Storage, inputs: dict, *,
            build: bool = True, upload: bool = True, examples: bool = True, report: Report = lambda e: None,
            beat: Callable[[], None] = lambda: None) -> Prepared:
    """The splits validated, and (examples=True) ready for training.

    build: this process may download or build the node's cache (the local main process; the others find it in
    place). upload: a cache built here is uploaded for whoever comes next. examples=False (kubetune validate):
    the reports only; a complete cache in object storage is not downloaded. Events: `data_cache` (reused,
    downloaded, built, or found in storage by validation) and `data_cache_rebuilt` (a damaged one, named).

    The task's processor is loaded here where the caller has not (kubetune validate), and only to read records: a
    cache found instead was made with this very tokenizer (its files' sha256 are in the key), and loading one
    costs transformers' imports, over a CPU-second."""
    if not isinstance(task, CachesRows):
        _load_processor(task)
        reports = validate_splits(config, task, fetched, beat=beat)
        splits = {s: task.examples(s, p, fetched.uris[s], reports["train"].format)
                  for s, p in fetched.splits.items()} if examples else {}
        return Prepared(reports, splits)
    parts = cache_parts(config, task, inputs)
    key = data_cache.cache_key(parts)
    uri = join_uri(config.cache_uri, key + "/")
    local = Path(config.work_dir) / "data-cache" / key
    if not examples and is_remote(uri):  # kubetune validate: a cache in object storage already says it all
        meta = storage.get_json(join_uri(uri, data_cache.META))
        if data_cache.matches(meta, key):
            report({"event": "data_cache", "cache": "found", "uri": uri, "key": key})
            return Prepared(data_cache.reports(meta), {}, {"uri": uri, "key": key, "reused": True})
    cache, how = _find(storage, uri, local, key, report, download=build)
    if cache is None:
        if not build:  # the node's first process prepared it a moment ago (pipeline.run: local main first)
            raise DatasetError(uri, 0, f"this node's data cache is not usable ({data_cache.problem(local, key)})",
                               "restart the run")
        _load_processor(task)
        cache = _build(config, task, fetched, local, key, parts, beat)
        how = "built"
        if upload:
            _upload(storage, local, uri)
    report({"event": "data_cache", "cache": how, "uri": uri, "key": key})
    splits = {s: task.load(s, cache) for s in fetched.splits} if examples else {}
    return Prepared(cache.reports(), splits, {"uri": uri, "key": key, "reused": how != "built"})


def _load_processor(task: Task) -> None:
    if task.processor is None:
        task.load_processor()


def _find(storage: Storage, uri: str, local: Path, key: str, report: Report,
          download: bool) -> tuple[data_cache.Cache | None, str]:
    """The cache from this node's disk, else (download) from object storage; (None, "") when there is no complete
    one. How it was found: "reused" (on this machine) or "downloaded"."""
    def usable(directory: Path, where: str, verify: bool) -> bool:
        why = data_cache.problem(directory, key, verify=verify)
        if why and why != data_cache.ABSENT:
            report({"event": "data_cache_rebuilt", "uri": where, "problem": why})
        return why is None

    if usable(local, str(local), verify=False):  # this pod's own disk: built or verified here
        return data_cache.Cache(local), "reused"
    # A cache at the cache URI may have been written by anyone who can write there: every file is checked
    # against the sha256 its meta.json records before its arrays are trusted.
    if not is_remote(uri):  # a folder on this machine (a volume): memory-mapped where it is
        there = local_path(uri)
        return (data_cache.Cache(there), "reused") if usable(there, uri, verify=True) else (None, "")
    if not download or not storage.exists(join_uri(uri, data_cache.META)):
        return None, ""
    partial = local.with_name(f"{key}.download-{os.getpid()}")
    data_cache.remove(partial)
    storage.download(uri, partial)
    if not usable(partial, uri, verify=True):
        data_cache.remove(partial)
        return None, ""
    return data_cache.Cache(_settle(partial, local)), "downloaded"


def _upload(storage: Storage, local: Path, uri: str) -> None:
    """The splits' arrays, then meta.json: a reader never sees a cache whose files are still on the way."""
    for split in sorted(p for p in local.iterdir() if p.is_dir()):
        storage.upload_dir(split, join_uri(uri, split.name + "/"))
    storage.upload_file(local / data_cache.META, join_uri(uri, data_cache.META))


def _build(config: TrainerConfig, task: Task, fetched: Fetched, local: Path, key: str, parts: dict,
           beat: Callable[[], None]) -> data_cache.Cache:
    """One pass over every split into a fresh folder, moved into place once complete."""
    partial = local.with_name(f"{key}.build-{os.getpid()}")
    data_cache.remove(partial)
    try:
        reports = validate_splits(config, task, fetched, lambda split, path, uri, fmt, minimum: task.prepare(
            split, path, uri, fmt, minimum, partial / split, beat), beat)
        data_cache.write_meta(partial, key, parts, reports)
    except BaseException:
        data_cache.remove(partial)
        raise
    return data_cache.Cache(_settle(partial, local))


def _settle(partial: Path, local: Path) -> Path:
    """Move a complete folder to its place; if another process got there first, keep theirs."""
    local.parent.mkdir(parents=True, exist_ok=True)
    if data_cache.problem(local, local.name) is not None:
        data_cache.remove(local)
        try:
            os.replace(partial, local)
            return local
        except OSError:
            pass
    data_cache.remove(partial)
    return local

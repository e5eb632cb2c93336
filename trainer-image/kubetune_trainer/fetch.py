"""Stage 1, fetch: bring the base model and the dataset splits to local disk.

Model URIs: `s3://bucket/prefix/` (a Hugging Face model folder), `hf://org/name` (the Hub, for real
clusters), `pvc://claim/path` (a volume the operator mounts under $KUBETUNE_PVC_ROOT, default /mnt/pvc),
`file://` or a plain local path. Dataset URIs: an s3:// object or prefix, pvc:// or a local path.

Weights in pickle-based formats (.bin, .pt, .pth, .pkl) can run code when they are loaded. Unless the spec opts in
(baseModel.allowPickleWeights) they are neither downloaded (s3://, hf://) nor loaded (the tasks pass
from_pretrained use_safetensors=True), and a model folder whose weights are only in those formats is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kubetune_api import TrainerConfig

from .errors import ConfigError
from .storage import Storage, is_remote, local_path, safe_join, sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")  # torch.save / pickle files: loading them can run code
PICKLE_OPT_IN = "baseModel.allowPickleWeights"
SPLITS = ("train", "validation", "test")


@dataclass
class Fetched:
    model_dir: Path
    splits: dict[str, Path]  # split name -> local file or directory
    uris: dict[str, str]  # split name -> URI as the user wrote it


def check_weight_formats(names: Iterable[str], uri: str, allow_pickle: bool) -> None:
    """Refuse (ConfigError naming baseModel.allowPickleWeights) a model folder, given its file names, whose weights
    are only in pickle-based formats, unless the spec allows them."""
    names = [PurePosixPath(n).name for n in names]
    if allow_pickle or any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickled:
        shown = ", ".join(pickled[:3]) + (", ..." if len(pickled) > 3 else "")
        raise ConfigError(f"baseModel.uri: {uri} has weights only in pickle-based formats ({shown}), which can run "
                          "code when loaded, and no .safetensors weights: convert them to safetensors "
                          "(save_pretrained(..., safe_serialization=True)), or, if you trust the folder's author, "
                          f"set {PICKLE_OPT_IN}: true")


def fetch_model(storage: Storage, uri: str, dest: Path, *, weights: bool = True, revision: str | None = None,
                allow_pickle: bool = False) -> Path:
    """The model folder on local disk; with weights=False only its config and tokenizer files. Pickle-based
    weights are skipped (and a folder with only those refused) unless allow_pickle."""
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        patterns = None if weights else ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
        skipped = None if allow_pickle else [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
        path = Path(snapshot_download(uri.removeprefix("hf://"), revision=revision, allow_patterns=patterns,
                                      ignore_patterns=skipped))
        if weights and not allow_pickle and not any(path.rglob("*.safetensors")):
            raise ConfigError(f"baseModel.uri: {uri} has no .safetensors weights (pickle-based formats "
                              f"{', '.join(PICKLE_SUFFIXES)} are not downloaded, as loading them can run code): "
                              f"use a revision with safetensors weights, or, if you trust the repository's "
                              f"author, set {PICKLE_OPT_IN}: true")
        return path
    if is_remote(uri):
        prefix = uri.rstrip("/") + "/"
        dest.mkdir(parents=True, exist_ok=True)
        objects = storage.list(prefix)
        if not objects:
            raise ConfigError(f"baseModel.uri: no objects under {prefix}; upload a Hugging Face model folder there")
        check_weight_formats(objects, uri, allow_pickle)
        for obj in objects:
            rel = obj.removeprefix(prefix)
            if (not weights and rel.endswith(WEIGHT_SUFFIXES)) or (not allow_pickle and rel.endswith(PICKLE_SUFFIXES)):
                continue
            storage.download_to(obj, safe_join(dest, rel, obj))
        return dest
    path = local_path(uri)
    if not (path / "config.json").exists():
        raise ConfigError(f"baseModel.uri: {uri} is not a Hugging Face model folder (no config.json)")
    check_weight_formats((p.name for p in path.iterdir()), uri, allow_pickle)
    return path


def fetch_dataset(storage: Storage, uri: str, dest: Path) -> Path:
    if is_remote(uri):
        return storage.download(uri, dest)
    path = local_path(uri)
    if not path.exists():
        raise ConfigError(f"dataset: {uri} does not exist")
    return path


def fetch(config: TrainerConfig, storage: Storage, *, weights: bool = True) -> Fetched:
    """Download what the config names, once: a marker file lets the other local processes reuse it."""
    work = Path(config.work_dir) / config.job_name
    work.mkdir(parents=True, exist_ok=True)
    marker = work / ("fetched.json" if weights else "fetched-no-weights.json")
    allow_pickle = bool(config.base_model.allow_pickle_weights)
    key = {"model": config.base_model.uri, "allowPickleWeights": allow_pickle, **config.dataset.dump()}
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved["key"] == key:
            return Fetched(Path(saved["model_dir"]), {s: Path(p) for s, p in saved["splits"].items()}, saved["uris"])
    model_dir = fetch_model(
        storage, config.base_model.uri, work / "model", weights=weights, revision=config.base_model.revision,
        allow_pickle=allow_pickle)
    uris = {s: getattr(config.dataset, s) for s in SPLITS if getattr(config.dataset, s)}
    splits = {s: fetch_dataset(storage, uri, work / "data" / s) for s, uri in uris.items()}
    marker.write_text(json.dumps({"key": key, "model_dir": str(model_dir), "uris": uris,
                                  "splits": {s: str(p) for s, p in splits.items()}}))
    return Fetched(model_dir=model_dir, splits=splits, uris=uris)


def tree_sha256(path: Path, *, skip_weights: bool = False, beat: Callable[[], None] | None = None) -> str:
    """One hash for a file or a folder: sha256 over the sorted (relative path, file sha256) pairs.

    `beat` (TrainerMetrics.beat) is called per file hashed: a base model can be hundreds of GB."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if skip_weights and f.name.endswith(WEIGHT_SUFFIXES):
            continue
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
        if beat:
            beat()
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "preprocessor_config.json")


def tokenizer_sha256(model_dir: Path) -> str:
    """One hash of the tokenizer's (or image processor's) files in a model folder: what turns the records into
    the model's inputs."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            h.update(f"{name}\0{sha256_file(model_dir / name)}\n".encode())
    return h.hexdigest()

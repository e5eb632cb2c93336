"""Images for image classification: image folders, where a record's image is, fetching it, and checking it decodes.

A record's `image` is a path relative to the folder of its data file (s3://data/defects/train.jsonl with
"images/1.png" means s3://data/defects/images/1.png), an s3:// URI, or a local path (relative, absolute or file://)
inside the split's own folder: the folder of its data file, or the whole volume of a pvc:// split. A local path
that leads anywhere else (/etc/passwd, file:///proc/self/environ, ../../x, a link out) is refused, naming the
record's file and line: a dataset cannot make the pod read its own files. Images that came
with the split (a prefix holds the data file and its images) are used where they were fetched; the others are
downloaded once per run into <workDir>/<job>/images/remote/, each named by the sha256 of its URI (so no key can
lead out of it). Parquet exports of Hugging Face datasets carry the image itself ({"bytes": ..., "path": ...});
those bytes are written under images/embedded/, named by their hash.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune_api import uri_allowed

from .data.formats import RecordError
from .data.records import Record, data_files
from .errors import ConfigError
from .fetch import local_path
from .storage import Storage, is_remote

# What torchvision's ImageFolder and Hugging Face's imagefolder read (the formats Pillow decodes).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
REFERENCE_HINT = "give a path relative to the data file's folder, or an s3:// URI"
OUTSIDE_HINT = "records may name only images inside the dataset's own folder: " + REFERENCE_HINT
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith((".", "_")) for part in parts)


def image_files(folder: Path) -> list[Path]:
    """Image files under a folder, sorted, hidden ones (.x, _x) left out."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p.relative_to(folder).parts))


def is_imagefolder(path: Path) -> bool:
    """A folder without data files whose subfolders hold images: <prefix>/<label>/<image>."""
    path = Path(path)
    if not path.is_dir() or data_files(path):
        return False
    return any(image_files(sub) for sub in _label_folders(path))


# Folder names that mean a split, not a class, and the dataset field each belongs in.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
                 "validation": "validation", "dev": "validation", "eval": "validation", "test": "test",
                 "testing": "test"}


def split_folders(path: Path) -> list[str]:
    """The subfolders of an image folder that are splits, not classes: named like a split (train, val, test, ...)
    and themselves laid out <label>/<image>. Two or more of them make the folder a root of splits."""
    found = [p.name for p in _label_folders(Path(path)) if p.name.lower() in SPLIT_FOLDERS and is_imagefolder(p)]
    return found if len(found) > 1 else []


def _label_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not _hidden((p.name,)))


def imagefolder_records(path: Path, uri: str) -> Iterator[Record]:
    """One record {"image": <local path>, "label": <folder name>} per image of <path>/<label>/**; each record's
    `file` is the image's URI (as the user wrote the prefix) and its line 0, so errors name the image."""
    path = Path(path)
    prefix = uri.rstrip("/")
    for folder in _label_folders(path):
        for image in image_files(folder):
            rel = image.relative_to(path).as_posix()
            yield Record(0, {"image": str(image), "label": folder.name}, f"{prefix}/{rel}")


@dataclass
class Located:
    """Where a record's image is: `uri` as the user would name it, `local` once it is on local disk."""

    uri: str
    local: Path | None = None  # None: to be downloaded from `uri`


class ImageStore:
    """Resolves the images of one split and brings the remote ones to local disk, once per run."""

    def __init__(self, storage: Storage | None, cache: Path, split_path: Path, split_uri: str,
                 prefixes: list[str] | tuple[str, ...] = ()):
        self.storage, self.cache = storage, Path(cache)
        self.split_path, self.split_uri = Path(split_path), split_uri
        self.split_prefix = split_uri.rstrip("/") + "/"
        self.prefixes = tuple(prefixes)  # the config's storagePrefixes: where remote images may be (empty: anywhere)

    def locate(self, image: Any, record_file: str) -> Located:
        """The image a record in `record_file` (its data file's URI) refers to. RecordError for what cannot be
        an image reference."""
        if isinstance(image, dict) and ("bytes" in image or "path" in image):  # a Hugging Face Image feature
            if image.get("bytes"):
                return self._embedded(bytes(image["bytes"]), image.get("path"))
            image = image.get("path")
        if not isinstance(image, str) or not image.strip():
            raise RecordError(f"field 'image' is {_kind(image)}, expected the image's path or URI", REFERENCE_HINT)
        if image.startswith("s3://"):
            return self._remote(image)
        if image.startswith("file://") or image.startswith("/"):
            local = Path(image.removeprefix("file://"))
            return self.inside(image, Located(str(local), local))
        if _SCHEME.match(image):
            raise RecordError(f"image {image!r}: only s3:// URIs and paths are read, not "
                              f"{image.split('://')[0]}://", "copy the images to object storage; " + REFERENCE_HINT)
        folder = posixpath.dirname(record_file)
        if is_remote(record_file):
            bucket, _, key = record_file.removeprefix("s3://").partition("/")
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), image))
            if joined.startswith("../") or joined == "..":
                raise RecordError(f"image {image!r} points above the bucket s3://{bucket}/", REFERENCE_HINT)
            return self._remote(f"s3://{bucket}/{joined}")
        data_file = self._local_data_file(record_file)
        return self.inside(image, Located(posixpath.normpath(posixpath.join(folder, image)),
                                           Path(posixpath.normpath((data_file.parent / image).as_posix()))))

    @property
    def root(self) -> Path:
        """The folder a record's local image must lie in: the claim's volume for a pvc:// split, else the split's
        folder (for a split that is one file, the folder that holds it)."""
        if self.split_uri.startswith("pvc://"):
            return local_path("pvc://" + self.split_uri.removeprefix("pvc://").split("/")[0])
        return self.split_path if self.split_path.is_dir() else self.split_path.parent

    def inside(self, image: str, located: Located) -> Located:
        """`located` if its local path (links followed) is inside `root`; RecordError otherwise."""
        root = self.root
        if not located.local.resolve().is_relative_to(root.resolve()):
            where = (f"pvc://{self.split_uri.removeprefix('pvc://').split('/')[0]}/"
                     if self.split_uri.startswith("pvc://") else str(root))
            raise RecordError(f"image {image!r} is outside the dataset's folder {where}: refusing to read it",
                              OUTSIDE_HINT)
        return located

    def _local_data_file(self, record_file: str) -> Path:
        """The local copy of a data file named by its URI (the split itself, or a file under the split folder)."""
        if self.split_path.is_dir() and record_file.startswith(self.split_prefix):
            return self.split_path / record_file[len(self.split_prefix):]
        return self.split_path

    def _remote(self, uri: str) -> Located:
        if not uri_allowed(uri, self.prefixes):
            raise RecordError(f"image {uri!r} is outside the storage prefixes this job may use "
                              f"(policy.allowedStoragePrefixes: {', '.join(self.prefixes)})",
                              "keep the images under one of them, next to the data file or by an s3:// URI there")
        if is_remote(self.split_uri) and self.split_path.is_dir() and uri.startswith(self.split_prefix):
            return Located(uri, self.split_path / uri[len(self.split_prefix):])  # fetched with the split
        return Located(uri, None)

    def _embedded(self, data: bytes, name: str | None) -> Located:
        digest = hashlib.sha256(data).hexdigest()
        suffix = Path(name).suffix.lower() if name and Path(name).suffix.lower() in IMAGE_SUFFIXES else ""
        target = self.cache / "embedded" / f"{digest}{suffix}"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return Located(name or f"(embedded image sha256 {digest[:12]})", target)

    def cached(self, uri: str) -> Path:
        """Where a remote image is kept: named by the sha256 of its URI (whatever its key holds, '..' included,
        it stays in the cache), with its image suffix."""
        suffix = PurePosixPath(uri).suffix.lower()
        return self.cache / "remote" / (hashlib.sha256(uri.encode()).hexdigest() + (suffix if suffix in
                                                                                   IMAGE_SUFFIXES else ""))

    def fetch(self, located: list[Located]) -> list[Path | None]:
        """Local paths of the located images, downloading the remote ones not here yet (in parallel); None for an
        object or file that does not exist. Storage failures raise (TransientError is retryable, a denied
        request is ConfigError): they are not the dataset's fault."""
        def one(item: Located) -> Path | None:
            if item.local is not None:
                return item.local if item.local.is_file() else None
            target = self.cached(item.uri)
            if target.is_file():
                return target
            if self.storage is None:
                raise ConfigError(f"{item.uri}: no object storage configured to download the image from")
            if not self.storage.exists(item.uri):
                return None
            return self.storage.download_to(item.uri, target)

        workers = max(1, min(getattr(self.storage, "max_concurrency", 8), len(located)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, located))


# Pillow's own limit warns from 89 Mpx and refuses from 179 Mpx: a few kilobytes of PNG can decode to gigabytes.
# Images for a classifier are a few hundred pixels a side; this trainer refuses any image over 50 Mpx, on open,
# before a pixel is decoded (DecompressionBombWarning is made an error).
MAX_IMAGE_PIXELS = 50_000_000
BOMB_HINT = f"resize the image below {MAX_IMAGE_PIXELS // 1_000_000} megapixels, or remove the record"


def _pillow():
    """PIL.Image with the lower pixel limit, its decompression-bomb warning an error."""
    import warnings

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    return Image


def decode_problem(path: Path) -> tuple[str, str] | None:
    """(why Pillow cannot read the image at `path` in full, what to do), or None when it can."""
    Image = _pillow()
    try:
        with Image.open(path) as image:
            image.verify()  # the file's structure (chunks, checksums)
        with Image.open(path) as image:
            image.load()  # every pixel: a truncated file fails here
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return f"it is too large to decode ({e})", BOMB_HINT
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"{type(e).__name__}: {e}", "re-export the image as PNG or JPEG, or remove the record"
    except MemoryError:
        return "it does not fit in the memory this process has", BOMB_HINT
    return None


def load_rgb(path: str | Path):
    """The image at `path` as an RGB Pillow image (grey, palette, alpha and CMYK images converted); the same
    pixel limit as decode_problem."""
    with _pillow().open(path) as image:
        return image.convert("RGB")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string"
    kinds = {dict: "an object", list: "an array", bool: "a boolean"}
    return kinds.get(type(value), "a number")

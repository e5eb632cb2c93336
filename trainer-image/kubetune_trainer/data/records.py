"""Reading dataset files into records: JSONL, JSON arrays, CSV/TSV and Parquet, one file or a directory of them."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv")
MAX_RECORD_BYTES = 16 << 20  # a JSONL or CSV line, or a JSON array's element, longer than this is refused unread
SMALLER_RECORD = ("a record is text and references: keep each under 16 MiB, and put images and large documents in "
                  "object storage")
DELIMITERS = {".csv": ",", ".tsv": "\t"}
PARQUET_MAGIC = b"PAR1"


@dataclass
class Record:
    line: int  # 1-based: the JSONL or CSV line (where the row starts), JSON array index + 1, or Parquet row + 1
    value: Any
    file: str = ""  # display name of the file the record came from


def load_records(path: Path, display_name: str | None = None, *, raw: bool = False) -> Iterator[Record]:
    """Every record of a data file, or of every data file under a directory in sorted order, read as a stream
    (a constant amount of memory, whatever the size of the file).

    Errors name `display_name` (e.g. the s3:// URI the file was fetched from), the line and the problem.
    raw=True leaves JSONL lines undecoded (`Record.value` is the line's bytes): `parse` decodes them, in the
    worker process that checks the record.
    """
    path = Path(path)
    name = display_name or str(path)
    if not path.exists():
        raise DatasetError(name, 0, "no such file or directory", "check the dataset URI")
    if not path.is_dir():
        yield from _load_file(path, name, raw)
        return
    files = data_files(path)
    if not files:
        raise DatasetError(name, 0, f"no data files ({', '.join(DATA_SUFFIXES)}) in this directory",
                           "point the dataset at JSONL, JSON, CSV or Parquet files")
    for file in files:
        yield from _load_file(file, name.rstrip("/") + "/" + file.relative_to(path).as_posix(), raw)


def data_files(directory: Path) -> list[Path]:
    """Data files under a directory, sorted, skipping hidden and marker files (.x, _SUCCESS)."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts)
    )


def _load_file(path: Path, name: str, raw: bool) -> Iterator[Record]:
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(0)
        first = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if path.suffix.lower() == ".parquet" or head == PARQUET_MAGIC:
        yield from _load_parquet(path, name)
    elif path.suffix.lower() in DELIMITERS:
        yield from _load_csv(path, name, DELIMITERS[path.suffix.lower()])
    elif first == b"[":
        yield from _load_json_array(path, name)
    else:
        yield from _load_jsonl(path, name, raw)


def _lines(path: Path, name: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every line of a file; a line longer than MAX_RECORD_BYTES raises DatasetError
    naming it, having held at most that much of it in memory."""
    with path.open("rb") as f:
        line = 0
        while data := f.readline(MAX_RECORD_BYTES + 1):
            line += 1
            if len(data) > MAX_RECORD_BYTES:
                raise too_long(name, line)
            yield line, data


def too_long(name: str, line: int) -> DatasetError:
    return DatasetError(name, line, f"the record is longer than {MAX_RECORD_BYTES >> 20} MiB", SMALLER_RECORD)


def beyond_limits(name: str, line: int, e: RecursionError | MemoryError) -> DatasetError:
    """The DatasetError for a record that parsing or checking could not hold: nested too deeply for Python's
    recursion limit, or too large for the memory the process has."""
    if isinstance(e, RecursionError):
        return DatasetError(name, line, "the record is nested too deeply to read",
                            "flatten it: records hold strings, numbers and shallow lists and objects")
    return DatasetError(name, line, "the record does not fit in the memory this process has",
                        f"{SMALLER_RECORD}; or raise spec.validation.memory")


def _load_jsonl(path: Path, name: str, raw: bool) -> Iterator[Record]:
    for line, data in _lines(path, name):
        if data.isspace():
            continue
        record = Record(line, data, name)
        yield record if raw else parse(record)


def parse(record: Record) -> Record:
    """A record whose value is a raw JSONL line (load_records(raw=True)), decoded and checked to be an object."""
    if not isinstance(record.value, bytes):
        return record
    try:
        text = record.value.decode("utf-8-sig" if record.line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(record.file, record.line, f"not valid UTF-8 (byte {e.start + 1} of the line)",
                           "save the file as UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(record.file, record.line, f"invalid JSON: {e.msg} at column {e.colno}",
                           "each line must be one complete JSON object") from None
    except (RecursionError, MemoryError) as e:
        raise beyond_limits(record.file, record.line, e) from None
    return _object(Record(record.line, value, record.file))


def _utf8_lines(path: Path, name: str) -> Iterator[str]:
    """The file's lines as text (a leading BOM dropped); DatasetError with the line of an invalid byte."""
    for line, data in _lines(path, name):
        try:
            yield data.decode("utf-8-sig" if line == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DatasetError(name, line, "not valid UTF-8", "save the file as UTF-8") from None


def _utf8_chunks(path: Path, name: str, size: int) -> Iterator[str]:
    """The file as text in pieces of about `size` bytes (a leading BOM dropped, a character never cut); DatasetError
    with the line of an invalid byte."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    lines = 1
    with path.open("rb") as f:
        while True:
            data = f.read(size)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                line = lines + data[: max(e.start, 0)].count(b"\n")
                raise DatasetError(name, line, "not valid UTF-8", "save the file as UTF-8") from None
            if not data:
                return
            lines += data.count(b"\n")
            yield text


JSON_CHUNK = 1 << 20  # characters read at a time from a JSON array


def _load_json_array(path: Path, name: str) -> Iterator[Record]:
    """The elements of a JSON array, decoded one at a time from a buffer that holds about one record: a huge
    array never sits in memory whole. Parse errors name the line of the file; record errors the element
    (index + 1)."""
    decoder = json.JSONDecoder()
    chunks = _utf8_chunks(path, name, JSON_CHUNK)
    buf, pos, line_base, eof = "", 0, 1, False  # line_base: the file's line at buf[0]

    def more() -> bool:
        nonlocal buf, pos, line_base, eof
        line_base += buf.count("\n", 0, pos)
        text = next(chunks, None)
        eof = text is None
        buf, pos = buf[pos:] + (text or ""), 0
        return not eof

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos] if pos < len(buf) else ""

    def invalid(problem: str, at: int) -> DatasetError:
        line = line_base + buf.count("\n", 0, at)
        column = at - buf.rfind("\n", 0, at)
        return DatasetError(name, line, f"invalid JSON: {problem} at column {column}",
                            "the file must be one JSON array of objects, or JSONL")

    if skip_space() != "[":
        raise DatasetError(name, 0, "a JSON file must hold an array of records", "or use JSONL")
    pos += 1
    index = 0
    if skip_space() == "]":
        pos += 1
    else:
        while True:
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end - pos > MAX_RECORD_BYTES:
                        raise too_long(name, index + 1)
                    pos = end
                    break
                except json.JSONDecodeError as e:
                    if eof:
                        raise invalid(e.msg if buf.strip() else "unterminated array", e.pos) from None
                    if len(buf) - pos > MAX_RECORD_BYTES:
                        raise too_long(name, index + 1) from None
                    more()  # the record may go on in the next chunk: decode it again with more text
                except (RecursionError, MemoryError) as e:
                    raise beyond_limits(name, index + 1, e) from None
            index += 1
            yield _object(Record(index, value, name))
            after = skip_space()
            if after == "]":
                pos += 1
                break
            if after != ",":
                raise invalid("Expecting ',' delimiter" if after else "unterminated array", pos)
            pos += 1
            skip_space()
    if skip_space():
        raise invalid("Extra data", pos)


def _load_parquet(path: Path, name: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(name, 0, f"not a readable Parquet file: {e}", "re-export the dataset") from None
    line = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            line += 1
            yield Record(line, value, name)


def class_names(path: Path, column: str = "label") -> list[str] | None:
    """The class names a Hugging Face `datasets` export keeps for an integer column: its ClassLabel feature in the
    Parquet schema's "huggingface" metadata (`names`, in the order of the integers). None for another file, or a
    column without them. A folder: its first Parquet file."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = [f for f in (data_files(path) if path.is_dir() else [path]) if f.suffix.lower() == ".parquet"]
    if not files:
        return None
    try:
        metadata = pq.read_schema(files[0]).metadata or {}
        feature = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {}).get(column)
    except (OSError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _load_csv(path: Path, name: str, delimiter: str) -> Iterator[Record]:
    """Rows as records keyed by the header row's column names; every value is a string (an empty cell is "")."""
    csv.field_size_limit(MAX_RECORD_BYTES)  # the default (128 KiB a field) is less than a long document
    reader = csv.reader(_utf8_lines(path, name), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    while True:
        line = reader.line_num + 1  # where the row starts: a quoted field may span lines
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DatasetError(name, line, f"malformed CSV: {e}",
                               'quote fields that hold the delimiter, quotes or line breaks ("a, b")') from None
        if not row:
            continue  # a blank line
        if header is None:
            header = [column.strip() for column in row]
            _check_header(header, name, line)
            continue
        if len(row) != len(header):
            raise DatasetError(name, line, f"the row has {len(row)} fields but the header has {len(header)} "
                               f"({', '.join(header)})",
                               'quote fields that hold the delimiter or line breaks ("a, b")')
        yield Record(line, dict(zip(header, row, strict=True)), name)


def _check_header(header: list[str], name: str, line: int) -> None:
    hint = "the first row must name the columns, e.g. text,label"
    for n, column in enumerate(header, start=1):
        if not column:
            raise DatasetError(name, line, f"column {n} of the header row has no name", hint)
        if header.index(column) != n - 1:
            raise DatasetError(name, line, f"the header row names column {column!r} twice", hint)


def _object(record: Record) -> Record:
    if not isinstance(record.value, dict):
        kind = type(record.value).__name__ if record.value is not None else "null"
        problem = f"record is a JSON {_json_type(kind)}, expected an object"
        raise DatasetError(record.file, record.line, problem,
                           'write one object per record, e.g. {"text": "..."}')
    return record


def _json_type(python_type: str) -> str:
    return {"list": "array", "str": "string", "int": "number", "float": "number", "bool": "boolean"}.get(
        python_type, python_type)

"""Raw records from files, folders and Hub datasets, in batches, each named as errors name it.

Every reader yields batches of ``(where, record)``: a batch at a time is all that is ever held
as Python objects, so a million-row Parquet file streams through in record batches.

| format    | read with                          | ``where``                      |
|-----------|------------------------------------|--------------------------------|
| jsonl     | lines, decoded one at a time       | ``file:line`` (from 1)         |
| json      | the whole file (one JSON value)    | ``file[index]``                |
| parquet   | pyarrow, one record batch at a time| ``file[row]`` (from 0)         |
| csv / tsv | the csv module; values are strings | ``file:line`` (the record's first line) |
| saved     | ``datasets.load_from_disk``        | ``folder[split][row]``         |
| hub       | ``datasets.load_dataset``          | ``path[split][row]``, ``path:name[split][row]`` |

Files may be compressed (``.gz``, ``.zst``): pyarrow's codecs decompress them as a stream.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instruct.data.records import DataError, normalise

Row = tuple[str, Any]  # (where, raw record)
BATCH_ROWS = 8192  # rows a reader yields at once: 10-20 MB of Alpaca-sized records
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}
# What save_to_disk writes: a DatasetDict's index, or a single Dataset's state.
SAVED_MARKERS = ("dataset_dict.json", "state.json")
# A Hub id: "name" or "owner/name" (letters, digits, - _ .), never a local path.
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass(frozen=True)
class Location:
    """Where a source's rows are: a path or Hub id, and what load_dataset needs besides."""

    path: str
    format: str = "auto"
    name: str | None = None  # Hub configuration
    split: str = "train"
    revision: str | None = None

    def label(self) -> str:
        """How the source is named in logs: the path, ``:name`` and ``[split]`` if not train."""
        text = self.path + (f":{self.name}" if self.name else "")
        return text + (f"[{self.split}]" if self.split != "train" else "")


def compression(path: str | Path) -> str | None:
    return COMPRESSIONS.get(Path(path).suffix.lower())


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """The reader for ``path``: ``fmt`` when it is not auto; else by the suffix (after a
    compression suffix), a folder's files, or a Hub id for a path that is not on disk.

    A file with another suffix is read as JSON Lines, as before Parquet and CSV were known.
    """
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "saved" if any((p / m).is_file() for m in SAVED_MARKERS) else "hub"
    stem = p.with_suffix("") if compression(p) else p
    known = SUFFIXES.get(stem.suffix.lower())
    if known is not None:
        if not p.is_file():
            raise DataError(f"{path}: no such data file")
        return known
    if p.is_file():
        return "jsonl"
    if HUB_ID.fullmatch(str(path)) and not str(path).startswith("."):
        return "hub"
    raise DataError(f"{path}: no such data file or folder, and not a Hub dataset id")


def read_batches(loc: Location, rows: int = BATCH_ROWS) -> Iterator[list[Row]]:
    """Batches of at most ``rows`` ``(where, record)`` pairs from ``loc``, in order.

    A source with no record at all is an error naming it: a wrong path or a failed export
    should not quietly train on less data.
    """
    fmt = detect_format(loc.path, loc.format)
    if fmt not in READERS:
        raise DataError(f"{loc.path}: unknown data format {fmt!r}; known: {sorted(READERS)}")
    return READERS[fmt](loc, rows)


def read_records(path: str | Path, fmt: str = "auto") -> Iterator[Row]:
    """``(where, record)`` for every record of a data file (or folder, or Hub id)."""
    for batch in read_batches(Location(str(path), fmt)):
        yield from batch


def load_records(paths: Iterable[str | Path], columns: Mapping[str, str] | None = None):
    """Every record of ``paths`` normalised (any format :func:`read_records` reads)."""
    return [normalise(rec, where, columns) for p in paths for where, rec in read_records(p)]


def open_binary(path: str) -> io.BufferedIOBase:
    """``path`` as a binary stream, decompressed on the fly when its suffix says so."""
    import pyarrow as pa

    codec = compression(path)
    if codec is None:
        return open(path, "rb")
    return io.BufferedReader(pa.input_stream(path, compression=codec))


def batched(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- JSON and JSON Lines


def read_jsonl(loc: Location, rows: int) -> Iterator[list[Row]]:
    return batched(jsonl_rows(loc.path), rows)


def jsonl_rows(path: str) -> Iterator[Row]:
    offset, empty = 0, True
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                at = offset + e.start  # in the file, as when it was decoded whole
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {at})"
                ) from e
            offset += len(raw)
            if not line.strip():
                continue
            empty = False
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
            yield f"{path}:{lineno}", record
    if empty:
        raise DataError(f"{path}: the file is empty; expected JSON records")


def read_json(loc: Location, rows: int) -> Iterator[list[Row]]:
    return batched(json_rows(loc.path), rows)


def json_rows(path: str) -> Iterator[Row]:
    with open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected JSON records")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: the JSON list is empty; expected records")
    for i, record in enumerate(records):
        yield f"{path}[{i}]", record


# ---------------------------------------------------------------- CSV and TSV


def read_csv(loc: Location, rows: int, delimiter: str = ",") -> Iterator[list[Row]]:
    return batched(csv_rows(loc.path, delimiter), rows)


def read_tsv(loc: Location, rows: int) -> Iterator[list[Row]]:
    return read_csv(loc, rows, delimiter="\t")


def csv_rows(path: str, delimiter: str) -> Iterator[Row]:
    """Rows of a CSV/TSV file with a header line, each named by the line it starts on.

    Every value stays a string (no type guessing: an answer "42" is text), and an empty
    field is an empty string, as the file has it.
    """
    # utf-8-sig: a byte-order mark (spreadsheet exports write one) is not part of the header.
    with io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text, delimiter=delimiter)
        line = 1
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty; expected a header line")
            empty = True
            while True:
                line = reader.line_num + 1
                values = next(reader, None)
                if values is None:
                    break
                if not any(v.strip() for v in values):
                    continue
                empty = False
                where = f"{path}:{line}"
                if len(values) != len(header):
                    raise DataError(
                        f"{where}: {len(values)} fields; the header line has {len(header)}"
                    )
                yield where, dict(zip(header, values, strict=True))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from e
        except csv.Error as e:
            raise DataError(f"{path}:{line}: {e}") from e
    if empty:
        raise DataError(f"{path}: no record after the header line")


# ---------------------------------------------------------------- Parquet


def read_parquet(loc: Location, rows: int) -> Iterator[list[Row]]:
    """One record batch at a time: only ``rows`` rows are ever Python objects at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = loc.path
    try:
        if compression(path):  # Parquet needs random access: decompressed into memory
            with open_binary(path) as f:
                parquet = pq.ParquetFile(pa.BufferReader(f.read()))
        else:
            parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: the Parquet file has no rows")
    start = 0
    for batch in parquet.iter_batches(batch_size=rows):
        records = batch.to_pylist()
        yield [(f"{path}[{start + i}]", r) for i, r in enumerate(records)]
        start += len(records)


# ---------------------------------------------------------------- datasets: saved and Hub


def read_saved(loc: Location, rows: int) -> Iterator[list[Row]]:
    """A folder written by ``save_to_disk``: a Dataset, or a DatasetDict's ``loc.split``."""
    import datasets

    try:
        data = datasets.load_from_disk(loc.path)
    except (OSError, ValueError) as e:
        raise DataError(f"{loc.path}: not a dataset saved with save_to_disk ({e})") from e
    if isinstance(data, datasets.DatasetDict):
        if loc.split not in data:
            raise DataError(
                f"{loc.path}: no split {loc.split!r}; the saved dataset has {sorted(data)}"
            )
        return dataset_batches(data[loc.split], f"{loc.path}[{loc.split}]", rows)
    return dataset_batches(data, loc.path, rows)


def read_hub(loc: Location, rows: int) -> Iterator[list[Row]]:
    """``datasets.load_dataset(path, name, split=, revision=)``: a Hub id or a Hub-style
    folder. With ``HF_HUB_OFFLINE=1`` (read by datasets itself) only its cache is used."""
    import datasets

    try:
        data = datasets.load_dataset(loc.path, loc.name, split=loc.split, revision=loc.revision)
    except (OSError, ValueError) as e:  # ConnectionError is an OSError
        hint = ""
        if not Path(loc.path).exists():
            hint = " (no local file or folder has that path"
            if datasets.config.HF_HUB_OFFLINE:
                hint += "; HF_HUB_OFFLINE=1: only the datasets cache is read, and it has no copy"
            hint += ")"
        raise DataError(f"{loc.label()}: could not load the dataset{hint}: {e}") from e
    name = loc.path + (f":{loc.name}" if loc.name else "")
    return dataset_batches(data, f"{name}[{loc.split}]", rows)


def dataset_batches(data: Any, name: str, rows: int) -> Iterator[list[Row]]:
    """Rows of a ``datasets.Dataset`` (memory-mapped Arrow) as ``name[row]``, a batch at a time."""
    if len(data) == 0:
        raise DataError(f"{name}: the dataset has no rows")
    table = data.with_format("arrow")
    for start in range(0, len(data), rows):
        records = table[start : start + rows].to_pylist()
        yield [(f"{name}[{start + i}]", r) for i, r in enumerate(records)]


READERS: dict[str, Callable[[Location, int], Iterator[list[Row]]]] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "tsv": read_tsv,
    "parquet": read_parquet,
    "saved": read_saved,
    "hub": read_hub,
}

"""Canonical prompt and preference data (DESIGN §4).

Every job reads its data through ``load_prompts`` or ``load_preferences``, so a
JSONL, Parquet, CSV or saved ``datasets`` folder all become the same canonical
rows, and every bad row is reported as ``{path}:{row}: {field}: {problem}``
before any training starts. Rows are never dropped silently: either the load
fails with all problems, or (``skip_bad=True``) the dropped rows are counted and
listed.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from uprlhf.atomic import atomic_write

PROMPT_FIELDS = ("prompt",)
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
RESPONSE_FIELDS = ("prompt", "response")
OPTIONAL_FIELDS = ("id", "subtask")

DEFAULT_SUBTASK = "default"
ALLOWED_FORMATS = (
    ".jsonl or .json (JSON lines), .parquet, .csv (with a header row), "
    "or a folder saved with datasets.Dataset.save_to_disk"
)

_MAX_LISTED = 50
_BATCH_ROWS = 4096

StrPath = str | os.PathLike[str]
# One source row before validation: its 1-based number, its fields (None when the
# row could not be parsed at all) and the (field, problem) pairs the reader found.
_RawRow = tuple[int, dict[str, object] | None, list[tuple[str, str]]]


class DataError(ValueError):
    """All problems of one load, so a user fixes a file in one pass; str() lists them one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        listed = self.problems[:_MAX_LISTED]
        hidden = len(self.problems) - len(listed)
        if hidden:
            listed.append(f"... and {hidden} more")
        super().__init__("\n".join(listed))


@dataclass
class Loaded:
    """Canonical rows plus what was dropped, so callers can log what ``skip_bad`` cost."""

    rows: list[dict]
    skipped: int
    problems: list[str]


def load_prompts(path: StrPath, *, max_chars: int = 4000, skip_bad: bool = False) -> Loaded:
    """Load prompt rows: ``prompt`` plus canonical ``id`` and ``subtask``."""
    return _load(Path(path), PROMPT_FIELDS, max_chars, skip_bad)


def load_preferences(path: StrPath, *, max_chars: int = 4000, skip_bad: bool = False) -> Loaded:
    """Load preference rows: ``prompt``, ``chosen``, ``rejected`` plus canonical ``id`` and ``subtask``."""
    return _load(Path(path), PREFERENCE_FIELDS, max_chars, skip_bad)


def load_responses(path: StrPath, *, max_chars: int = 4000, skip_bad: bool = False) -> Loaded:
    """Load scored-sample rows: ``prompt``, ``response`` plus canonical ``id`` and ``subtask``."""
    return _load(Path(path), RESPONSE_FIELDS, max_chars, skip_bad)


def write_parquet(rows: list[dict], path: StrPath) -> None:
    """Write rows as Parquet so that a reader (or a resumed job) never sees a half-written file."""
    names = dict.fromkeys(name for row in rows for name in row)
    # Columns come from every row, not just the first, so no key is dropped.
    table = pa.table({name: [row.get(name) for row in rows] for name in names})
    atomic_write(path, lambda handle: pq.write_table(table, handle), binary=True)


def _load(path: Path, required: tuple[str, ...], max_chars: int, skip_bad: bool) -> Loaded:
    """Validate every row of ``path``, then either raise with all problems or return the good rows."""
    rows: list[dict] = []
    problems: list[str] = []
    skipped = 0
    try:
        for number, record, found in _read(path, required):
            canonical: dict | None = None
            if record is not None:
                canonical, field_problems = _canonical(record, number, required, max_chars)
                found = found + field_problems
            if found:
                problems.extend(f"{path}:{number}: {name}: {problem}" for name, problem in found)
                skipped += 1
            else:
                rows.append(canonical)
    except pa.ArrowException as error:
        raise DataError([f"{path}: cannot read: {error}"]) from error
    if not rows and not problems:
        raise DataError([f"{path}: no rows"])
    if problems and not skip_bad:
        raise DataError(problems)
    if not rows:
        raise DataError([*problems, f"{path}: no valid rows ({skipped} skipped)"])
    return Loaded(rows=rows, skipped=skipped, problems=problems)


def _read(path: Path, required: tuple[str, ...]) -> Iterator[_RawRow]:
    """Pick the reader from the path: a folder is a saved dataset, a file goes by its extension."""
    if path.is_dir():
        return _read_saved_dataset(path, required)
    if not path.exists():
        raise DataError([f"{path}: no such file or folder"])
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path, required)
    raise DataError([f"{path}: unsupported format; allowed: {ALLOWED_FORMATS}"])


def _read_jsonl(path: Path) -> Iterator[_RawRow]:
    """One JSON object per line; the line number is the row number."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if not data.strip():
        return
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line, not a blank row
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            yield number, None, [("row", "empty line")]
            continue
        problems: list[tuple[str, str]] = []
        try:
            text = line.decode("utf-8")
            valid_utf8 = True
        except UnicodeDecodeError:
            # Keep the bad bytes as surrogates so validation can name the field that holds them.
            text = line.decode("utf-8", "surrogateescape")
            valid_utf8 = False
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            record = None
            reason = f"{error.msg} (column {error.colno})"
        else:
            reason = f"got {_type_name(record)}"
        if not isinstance(record, dict):
            if not valid_utf8:
                problems.append(("row", "not valid UTF-8"))
            problems.append(("row", f"not a JSON object: {reason}"))
            yield number, None, problems
            continue
        if not valid_utf8 and _all_text_encodable(record):
            problems.append(("row", "not valid UTF-8"))  # the bad bytes are nested below the top level
        yield number, record, problems


def _read_csv(path: Path) -> Iterator[_RawRow]:
    """A header row, then one data row per record; the first data row is row 1."""
    # Bad bytes become surrogates, so validation reports the exact row and field.
    text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    if not all(_encodable(name) for name in header):
        raise DataError([f"{path}: header: not valid UTF-8"])
    number = 0
    while True:
        number += 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield number, None, [("row", f"not valid CSV: {error}")]
            continue
        if not cells:
            yield number, None, [("row", "empty line")]
            continue
        problems = []
        if len(cells) != len(header):
            problems.append(("row", f"expected {len(header)} cells, got {len(cells)}"))
        yield number, dict(zip(header, cells)), problems


def _read_parquet(path: Path, required: tuple[str, ...]) -> Iterator[_RawRow]:
    """Read only the canonical columns, in batches, so wide or large files stay cheap."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise _unreadable_parquet(path, error) from error
    columns = _present(required, parquet.schema_arrow.names)
    return _parquet_rows(path, parquet, columns)


def _parquet_rows(path: Path, parquet: pq.ParquetFile, columns: list[str]) -> Iterator[_RawRow]:
    """The rows of an opened Parquet file; a corrupt page (found only when read) is a DataError too."""
    try:
        yield from _arrow_rows(parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns))
    except (pa.ArrowException, OSError) as error:
        raise _unreadable_parquet(path, error) from error


def _unreadable_parquet(path: Path, error: BaseException) -> DataError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return DataError([f"{path}: not a readable Parquet file ({reason})"])


def _read_saved_dataset(path: Path, required: tuple[str, ...]) -> Iterator[_RawRow]:
    """A folder written by ``datasets.Dataset.save_to_disk``; the row number is the 1-based index."""
    import datasets  # slow to import, and only folders need it

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(
            [f"{path}: not a folder saved with datasets.Dataset.save_to_disk; allowed: {ALLOWED_FORMATS}"]
        ) from error
    if not isinstance(dataset, datasets.Dataset):
        raise DataError([f"{path}: holds splits {sorted(dataset)}; save one split with Dataset.save_to_disk"])
    columns = _present(required, dataset.column_names)
    if columns:  # selecting no columns would also lose the row count
        dataset = dataset.select_columns(columns)
    return _arrow_rows(dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS))


def _present(required: tuple[str, ...], names: list[str]) -> list[str]:
    """The canonical columns a columnar source actually has."""
    return [name for name in (*required, *OPTIONAL_FIELDS) if name in names]


def _arrow_rows(batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[_RawRow]:
    """Rows of Arrow batches; binary values are decoded so that bad UTF-8 shows up in validation."""
    number = 0
    for batch in batches:
        try:
            records = batch.to_pylist()
        except UnicodeDecodeError:
            # A string column holding bytes that are not UTF-8 (a damaged page, or a
            # writer that did not check): read it as binary so validation names the row.
            records = _as_binary(batch).to_pylist()
        for record in records:
            number += 1
            yield number, {name: _bytes_to_text(value) for name, value in record.items()}, []


def _as_binary(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """``batch`` with its string columns as binary (the same bytes, not checked as UTF-8)."""
    fields = [
        pa.field(f.name, pa.large_binary() if pa.types.is_large_string(f.type) else pa.binary())
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
        else f
        for f in batch.schema
    ]
    return batch.cast(pa.schema(fields))


def _bytes_to_text(value: object) -> object:
    """Binary cells as text, with undecodable bytes kept as surrogates for validation to report."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def _canonical(
    record: dict[str, object], number: int, required: tuple[str, ...], max_chars: int
) -> tuple[dict | None, list[tuple[str, str]]]:
    """The canonical row for ``record``, or None with every (field, problem) found in it."""
    problems: list[tuple[str, str]] = []
    for name in required:
        if name not in record:
            problems.append((name, "missing"))
            continue
        problem = _text_problem(record[name], max_chars)
        if problem:
            problems.append((name, problem))
    bad = {name for name, _ in problems}
    if "chosen" in required and not bad & {"chosen", "rejected"}:
        if str(record["chosen"]).strip() == str(record["rejected"]).strip():
            problems.append(("chosen", "identical to rejected"))

    row_id = str(number)
    raw_id = record.get("id")
    if not _absent(raw_id):
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            problems.append(("id", f"expected a string or int, got {_type_name(raw_id)}"))
        elif isinstance(raw_id, str) and not _encodable(raw_id):
            problems.append(("id", "not valid UTF-8"))
        else:
            row_id = str(raw_id)

    subtask = DEFAULT_SUBTASK
    raw_subtask = record.get("subtask")
    if not _absent(raw_subtask):
        if not isinstance(raw_subtask, str):
            problems.append(("subtask", f"expected a string, got {_type_name(raw_subtask)}"))
        elif not _encodable(raw_subtask):
            problems.append(("subtask", "not valid UTF-8"))
        else:
            subtask = raw_subtask

    known = {*required, *OPTIONAL_FIELDS}
    # Extra columns are ignored, but bad bytes anywhere in the row still make it suspect.
    if not all(_encodable(name) for name in record):
        problems.append(("row", "not valid UTF-8"))
    problems.extend(
        (name, "not valid UTF-8")
        for name, value in record.items()
        if name not in known and _encodable(name) and isinstance(value, str) and not _encodable(value)
    )
    if problems:
        return None, problems
    return {**{name: record[name] for name in required}, "id": row_id, "subtask": subtask}, problems


def _text_problem(value: object, max_chars: int) -> str | None:
    """Why ``value`` is not usable text, or None when it is."""
    if not isinstance(value, str):
        return f"expected a string, got {_type_name(value)}"
    if not _encodable(value):
        return "not valid UTF-8"
    if not value.strip():
        return "empty"
    if len(value) > max_chars:
        return f"longer than {max_chars} characters ({len(value)})"
    return None


def _absent(value: object) -> bool:
    """Optional fields fall back to their default when null or blank (an empty CSV cell)."""
    return value is None or (isinstance(value, str) and not value.strip())


def _type_name(value: object) -> str:
    """The type as a user reads it in a message: null for None, else the Python type name."""
    return "null" if value is None else type(value).__name__


def _encodable(text: str) -> bool:
    """False when ``text`` holds surrogates, i.e. it came from bytes that were not valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _all_text_encodable(record: dict[str, object]) -> bool:
    """Whether every top-level key and string value of ``record`` is valid UTF-8."""
    return all(
        _encodable(name) and (not isinstance(value, str) or _encodable(value))
        for name, value in record.items()
    )

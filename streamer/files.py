"""Transactions in files: read Parquet, CSV or Avro files, convert every row, write tables safely.

The file modes (`streamer score`, `streamer train --data`, `streamer features`) read a table
whose columns are named after the fields of `schemas/transaction.avsc`; other columns are kept
for the rejects and otherwise ignored, except a label column when asked for. `card_country` and
`card_avg_amount` may be absent (null: the schema's defaults). No Kafka here.

Each cell is converted to the type the Avro decoder gives that field; a cell that cannot be
converted makes its row fail at stage `decode` with a reason naming the column, as a value that
is not a Transaction fails in the stream. Converted rows then meet the stream's own checks
(`serde.validate_columns`, the rules of `events`), so a row passes here exactly when the same
event passes on the topic.

- Text fields: text (Parquet string, dictionary of strings; every CSV cell). In a CSV an empty
  `card_country` is null; an empty required cell is a missing value.
- `event_time`: epoch milliseconds as an integer (or digits in text), a timestamp (Parquet or
  Arrow timestamp of any unit, without a time zone read as UTC; finer units are floored to the
  millisecond), or RFC 3339 text with its offset (`2026-01-01T08:30:00Z`,
  `2026-01-01T09:30:00.250+01:00`; a time without an offset is refused, as it names no instant).
- `amount`, `card_avg_amount`: any number (integer, float, decimal) or text of one.
- `card_present` and the label: boolean, the integers 0 and 1, or text `true`/`false`/`0`/`1`.

Row numbers in messages count data rows from 1 in file order (in a CSV, row 1 is the line after
the header). Output is written to a temporary file beside the target and renamed into place when
complete, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import structlog

from streamer.errors import DataFileError as DataFileError  # re-exported
from streamer.errors import DecodeError, RecordError
from streamer.features import FEATURE_ORDER, build_features_from_columns
from streamer.serde import TRANSACTION_FIELDS, validate_columns
from streamer.state.card import CardHistory

log = structlog.get_logger(__name__)

FORMATS: Final[dict[str, str]] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".avro": "avro",
}
"""File name suffix (any case) to format. Avro object container files are read, never written."""

OPTIONAL_FIELDS: Final = frozenset({"card_country", "card_avg_amount"})
"""Fields with a schema default (null): a file may leave their column out."""

TEXT_FIELDS: Final = frozenset(
    {
        "transaction_id",
        "card_id",
        "merchant_id",
        "merchant_category",
        "currency",
        "country",
        "channel",
        "card_country",
    }
)
NUMBER_FIELDS: Final = frozenset({"amount", "card_avg_amount"})
BOOLEAN_FIELDS: Final = frozenset({"card_present"})

CHUNK_ROWS: Final = 50_000
"""Rows turned into Python values at a time: bounds the memory beyond the Arrow table."""

_MS: Final = pa.timestamp("ms", tz="UTC")
_NS: Final = pa.timestamp("ns", tz="UTC")
_NS_PER_UNIT: Final = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_SHOWN: Final = 60
"""Characters of a bad cell shown in a message."""


def file_format(path: Path, *, for_output: bool = False) -> str:
    """The format of `path` by its suffix; `DataFileError` for any other suffix."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None or (for_output and kind == "avro"):
        allowed = ".parquet, .pq, .csv" + ("" if for_output else ", .avro")
        raise DataFileError(f"{path}: unknown file type {path.suffix!r}; use {allowed}")
    return kind


def read_table(path: Path, *, extra_columns: Sequence[str] = ()) -> pa.Table:
    """The file at `path` as one Arrow table, columns as stored (CSV: the fields as text).

    `extra_columns` (a label) are read as text from a CSV too, so that one converter sees them.
    """
    kind = file_format(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    try:
        if kind == "parquet":
            return pq.read_table(path)
        if kind == "csv":
            text = dict.fromkeys((*TRANSACTION_FIELDS, *extra_columns), pa.string())
            return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=text))
        with path.open("rb") as stream:
            records = list(fastavro.reader(stream))
        return pa.Table.from_pylist(records)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataFileError(f"{path}: cannot read it as {kind}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Rows:
    """A file's rows converted to the Transaction fields, and each row's conversion problem."""

    path: Path
    source: pa.Table
    """The file as read (the rejects repeat its rows)."""
    columns: pa.Table
    """The Transaction fields, typed as the Avro decoder gives them; null where a row failed."""
    problems: dict[int, DecodeError]
    """Row index (0-based, file order) to why it could not be read as a Transaction."""
    labels: np.ndarray | None
    """The label column as booleans (False where a row failed), when one was asked for."""

    def __len__(self) -> int:
        return int(self.source.num_rows)

    def order(self) -> np.ndarray:
        """The indexes of the rows without problems, stably sorted by event time.

        The stream applies a card's records in the order they arrive; a file's rows are applied
        in event-time order, rows of the same millisecond in file order.
        """
        good = np.ones(len(self), dtype=bool)
        good[list(self.problems)] = False
        event_times = self.columns.column("event_time").to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(good)
        return rows[np.argsort(event_times[rows], kind="stable")]

    def chunks(
        self, order: np.ndarray, size: int = CHUNK_ROWS
    ) -> Iterator[tuple[np.ndarray, dict[str, list[Any]]]]:
        """`order` in slices of `size` rows: each and its Transaction fields as Python lists."""
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            taken = self.columns.take(pa.array(rows))
            yield rows, {name: taken.column(name).to_pylist() for name in TRANSACTION_FIELDS}


def row_label(row: int) -> str:
    """How messages name the row at index `row` (0-based): its 1-based data row number."""
    return f"row {row + 1}"


def load_rows(path: Path, *, label_column: str | None = None, require_label: bool = True) -> Rows:
    """Read `path` and convert its rows; `DataFileError` for a problem of the whole file.

    With `label_column`, its values become `Rows.labels`; a file without that column is refused,
    or has no labels when `require_label` is false.
    """
    source = read_table(path, extra_columns=() if label_column is None else (label_column,))
    if label_column is not None and not require_label and label_column not in source.column_names:
        label_column = None
    text_nulls = file_format(path) == "csv"
    missing = [
        name
        for name in (*TRANSACTION_FIELDS, *(() if label_column is None else (label_column,)))
        if name not in source.column_names and name not in OPTIONAL_FIELDS
    ]
    if missing:
        raise DataFileError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
            f" (the file has: {', '.join(source.column_names) or 'no columns'})"
        )
    duplicated = sorted(
        {name for name in source.column_names if source.column_names.count(name) > 1}
    )
    if duplicated:
        raise DataFileError(f"{path}: column {', '.join(duplicated)} appears more than once")
    problems: dict[int, list[str]] = {}
    converted: dict[str, pa.Array] = {}
    count = source.num_rows
    for name in TRANSACTION_FIELDS:
        if name not in source.column_names:
            converted[name] = pa.nulls(count, _TYPES[name])
            continue
        column = source.column(name).combine_chunks()
        try:
            converted[name], bad = _convert(name, column, text_nulls=text_nulls)
        except _WrongTypeError as exc:
            raise DataFileError(f"{path}: column {name}: {exc}") from None
        for row, problem in bad:
            problems.setdefault(row, []).append(f"{name}: {problem}")
    labels = None
    if label_column is not None:
        column = source.column(label_column).combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        if _is_text(column.type):
            column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
        try:
            flags, bad = _to_boolean(column)
        except _WrongTypeError as exc:
            raise DataFileError(f"{path}: label column {label_column}: {exc}") from None
        bad += [(row, "missing") for row in _null_rows(column)]
        for row, problem in sorted(bad):
            problems.setdefault(row, []).append(
                f"{label_column}: the label must be 0 or 1 ({problem})"
            )
        labels = flags.fill_null(False).to_numpy(zero_copy_only=False)
    return Rows(
        path,
        source,
        pa.table(converted),
        {row: DecodeError("; ".join(parts)) for row, parts in sorted(problems.items())},
        labels,
    )


# -- conversion of one column ---------------------------------------------------------------------

_TYPES: Final[dict[str, pa.DataType]] = {
    name: pa.string()
    if name in TEXT_FIELDS
    else pa.float64()
    if name in NUMBER_FIELDS
    else pa.bool_()
    if name in BOOLEAN_FIELDS
    else pa.int64()
    for name in TRANSACTION_FIELDS
}

Problems = list[tuple[int, str]]


class _WrongTypeError(Exception):
    """A column whose type cannot hold the field at all (a list for an amount)."""


def _convert(name: str, column: pa.Array, *, text_nulls: bool) -> tuple[pa.Array, Problems]:
    """`column` as the field `name`'s type, null where a cell fails, with those cells' problems."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    cells = column
    if name not in TEXT_FIELDS and _is_text(column.type):
        # An empty cell is a missing value (null where the field may be null), not a bad one.
        cells = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
    if name == "event_time":
        converted, bad = _to_millis(cells)
    elif name in TEXT_FIELDS:
        converted, bad = _to_text(cells)
    elif name in NUMBER_FIELDS:
        converted, bad = _to_number(cells)
    else:
        converted, bad = _to_boolean(cells)
    if name in OPTIONAL_FIELDS:
        if text_nulls and name in TEXT_FIELDS:  # CSV has no null but the empty cell
            converted = pc.if_else(pc.equal(converted, ""), pa.scalar(None, pa.string()), converted)
        return converted, bad
    failed = {row for row, _ in bad}
    missing = [(row, "missing value") for row in _null_rows(column) if row not in failed]
    return converted, sorted(bad + missing)


def _null_rows(column: pa.Array) -> list[int]:
    """Rows of `column` that are null, or an empty text where a value is needed."""
    empty = pc.is_null(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        empty = pc.or_(empty, pc.equal(column, ""))
    return np.flatnonzero(empty.to_numpy(zero_copy_only=False)).tolist()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _is_text(data_type: pa.DataType) -> bool:
    return bool(pa.types.is_string(data_type) or pa.types.is_large_string(data_type))


def _cast_cells(column: pa.Array, target: pa.DataType, problem: str) -> tuple[pa.Array, Problems]:
    """Cast `column` to `target`; when some cells fail, find them one by one (null them)."""
    try:
        return pc.cast(column, target), []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values: list[Any] = []
    bad: Problems = []
    for row in range(len(column)):
        cell = column[row : row + 1]
        try:
            values.append(pc.cast(cell, target)[0].as_py())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values.append(None)
            bad.append((row, f"{problem} (got {_shown(cell[0].as_py())})"))
    return pa.array(values, type=target), bad


def _to_text(column: pa.Array) -> tuple[pa.Array, Problems]:
    if not _is_text(column.type):
        raise _WrongTypeError(f"expected text, the file has {column.type}")
    return column.cast(pa.string()), []


def _to_number(column: pa.Array) -> tuple[pa.Array, Problems]:
    data_type = column.type
    if pa.types.is_integer(data_type) or pa.types.is_floating(data_type):
        return pc.cast(column, pa.float64()), []
    if pa.types.is_decimal(data_type):
        return pc.cast(column, pa.float64(), safe=False), []
    if _is_text(data_type):
        return _cast_cells(column, pa.float64(), "not a number")
    raise _WrongTypeError(f"expected a number, the file has {data_type}")


def _to_boolean(column: pa.Array) -> tuple[pa.Array, Problems]:
    data_type = column.type
    if pa.types.is_boolean(data_type):
        return column, []
    if pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or _is_text(data_type):
        if _is_text(data_type):
            column = pc.utf8_lower(column)
            allowed = pa.array(["0", "1", "true", "false"])
        else:
            allowed = pa.array([0, 1], type=data_type)
        outside = pc.and_(pc.invert(pc.is_in(column, value_set=allowed)), pc.is_valid(column))
        rows = np.flatnonzero(outside.to_numpy(zero_copy_only=False)).tolist()
        bad = [(row, f"not a boolean (got {_shown(column[row].as_py())})") for row in rows]
        kept = pc.if_else(outside, pa.scalar(None, column.type), column)
        return pc.cast(kept, pa.bool_()), bad
    raise _WrongTypeError(f"expected a boolean, the file has {data_type}")


def _to_millis(column: pa.Array) -> tuple[pa.Array, Problems]:
    data_type = column.type
    if pa.types.is_integer(data_type):
        return _cast_cells(column, pa.int64(), "not epoch milliseconds")
    if pa.types.is_timestamp(data_type):
        values = column.cast(pa.int64())  # in the column's unit
        per_unit = _NS_PER_UNIT[data_type.unit]
        if per_unit >= 1_000_000:
            return pc.multiply(values, per_unit // 1_000_000), []
        return _floor_divide(values, 1_000_000 // per_unit), []
    if _is_text(data_type):
        return _text_millis(column)
    raise _WrongTypeError(
        f"expected epoch milliseconds, a timestamp or RFC 3339 text, the file has {data_type}"
    )


def _text_millis(column: pa.Array) -> tuple[pa.Array, Problems]:
    """Epoch milliseconds from digits or RFC 3339 text (floored to the millisecond)."""
    digits = pc.match_substring_regex(column, r"^-?[0-9]+$").fill_null(False)
    if pc.all(digits).as_py():
        return _cast_cells(column, pa.int64(), "not epoch milliseconds")
    try:
        as_int = pc.cast(pc.if_else(digits, column, "0"), pa.int64())
        as_time = pc.cast(pc.if_else(digits, "1970-01-01T00:00:00Z", column), _NS)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values: list[int | None] = []
        bad: Problems = []
        for row in range(len(column)):
            cell = column[row : row + 1]
            converted, problems = _text_millis_strict(cell)
            values.append(converted[0].as_py())
            bad.extend((row, problem) for _, problem in problems)
        return pa.array(values, type=pa.int64()), bad
    millis = _floor_divide(as_time.cast(pa.int64()), 1_000_000)
    return pc.if_else(digits, as_int, millis), []


def _floor_divide(values: pa.Array, divisor: int) -> pa.Array:
    """int64 `values` // `divisor`, rounding down (before 1970 too); nulls stay null."""
    exact = np.floor_divide(values.fill_null(0).to_numpy(zero_copy_only=False), divisor)
    return pa.array(exact, type=pa.int64(), mask=pc.is_null(values).to_numpy(zero_copy_only=False))


def _text_millis_strict(cell: pa.Array) -> tuple[pa.Array, Problems]:
    """One text cell as `_text_millis` converts it; its problem when it cannot."""
    text = cell[0].as_py()
    if text is None or text == "":
        return pa.nulls(1, pa.int64()), []
    try:
        if text.lstrip("-").isdigit() and text.isascii():
            return pc.cast(cell, pa.int64()), []
        nanos = pc.cast(cell, _NS).cast(pa.int64())[0].as_py()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.nulls(1, pa.int64()), [
            (0, f"not epoch milliseconds or an RFC 3339 time with offset (got {_shown(text)})")
        ]
    return pa.array([nanos // 1_000_000], type=pa.int64()), []


# -- writing -------------------------------------------------------------------------------------


class TableWriter:
    """Writes a table in slices to a temporary file beside `path`; `commit` renames it there.

    Parquet or CSV by `path`'s suffix. In a CSV, timestamp columns are written as RFC 3339 text
    in UTC (`2026-01-01T08:30:00.250Z`), which `load_rows` reads back; Parquet keeps them typed.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self._kind = file_format(path, for_output=True)
        self._temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self.rows = 0
        if self._kind == "csv":
            schema = pa.schema(
                pa.field(f.name, pa.string()) if pa.types.is_timestamp(f.type) else f
                for f in schema
            )
        self._schema = schema
        try:
            self._writer: pq.ParquetWriter | pacsv.CSVWriter = (
                pq.ParquetWriter(self._temporary, schema)
                if self._kind == "parquet"
                else pacsv.CSVWriter(self._temporary, schema)
            )
        except OSError as exc:
            raise DataFileError(f"{path}: cannot write: {exc}") from exc

    def write(self, table: pa.Table) -> None:
        if self._kind == "csv":
            for index, field in enumerate(table.schema):
                if pa.types.is_timestamp(field.type):
                    text = pc.strftime(
                        pc.cast(table.column(index), _MS, safe=False), format="%Y-%m-%dT%H:%M:%SZ"
                    )
                    table = table.set_column(index, field.name, text)
        self._writer.write_table(table.select(self._schema.names).cast(self._schema))
        self.rows += table.num_rows

    def commit(self) -> None:
        """Finish the file and put it at `path` (replacing what was there)."""
        self._writer.close()
        os.replace(self._temporary, self.path)

    def discard(self) -> None:
        """Close and delete the temporary file; `path` is left as it was."""
        try:
            self._writer.close()
        finally:
            self._temporary.unlink(missing_ok=True)


@contextmanager
def writing(path: Path, schema: pa.Schema) -> Iterator[TableWriter]:
    """A `TableWriter` committed when the block ends normally and discarded otherwise."""
    writer = TableWriter(path, schema)
    try:
        yield writer
    except BaseException:
        writer.discard()
        raise
    writer.commit()


# -- progress ------------------------------------------------------------------------------------


class Progress:
    """Progress of a long pass over rows: a bar on a terminal, a log line every few seconds else."""

    def __init__(
        self,
        what: str,
        total: int,
        *,
        stream: TextIO = sys.stderr,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what
        self._total = max(total, 1)
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = 0.1 if self._tty else interval
        self._clock = clock
        self._started = clock()
        self._next = self._started + self._interval
        self._shown = -1

    def update(self, done: int, *, final: bool = False) -> None:
        now = self._clock()
        if (not final and now < self._next) or (final and done == self._shown and not self._tty):
            return
        self._next = now + self._interval
        self._shown = done
        rate = done / max(now - self._started, 1e-9)
        if self._tty:
            filled = 30 * done // self._total
            end = "\n" if final else ""
            self._stream.write(
                f"\r{self._what} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{done:,}/{self._total:,} {rate:,.0f}/s {end}"
            )
            self._stream.flush()
        else:
            log.info(
                "progress",
                stage=self._what,
                done=done,
                total=self._total,
                rows_per_second=round(rate),
            )


# -- the strict pass: every row must be good (training, the feature matrix) ----------------------

MAX_REPORTED: Final = 5
"""Bad rows named in a `DataFileError`; the message gives the total too."""


@dataclass(frozen=True, slots=True)
class FileFeatures:
    """The feature matrix of a file whose every row is good, in the order it was built."""

    order: np.ndarray
    """File row index of each matrix row: event-time order, ties in file order."""
    features: np.ndarray
    """float64, one row per file row, columns `features.FEATURE_ORDER`."""
    event_times: np.ndarray
    """int64 event time (ms) of each matrix row, non-decreasing."""


def bad_rows_error(path: Path, errors: dict[int, RecordError]) -> DataFileError:
    """The error for a file with bad rows: the first `MAX_REPORTED` by row, and the count."""
    rows = sorted(errors)
    lines = [
        f"{row_label(row)} ({errors[row].stage}): {errors[row]}" for row in rows[:MAX_REPORTED]
    ]
    more = len(rows) - MAX_REPORTED
    if more > 0:
        lines.append(f"... and {more:,} more")
    plural = "s" if len(rows) > 1 else ""
    return DataFileError(f"{path}: {len(rows):,} invalid row{plural}:\n  " + "\n  ".join(lines))


def build_file_features(rows: Rows, *, progress: Progress | None = None) -> FileFeatures:
    """Validate every row as the stream does and build its features, in event-time order.

    The same code as the stream's: `serde.validate_columns` for the rules and
    `features.build_features_from_columns` with one history per card, each row seeing its
    card's rows before it. `DataFileError` naming the bad rows when any row fails.
    """
    if rows.problems:
        raise bad_rows_error(rows.path, dict(rows.problems))
    order = rows.order()
    matrix = np.empty((len(order), len(FEATURE_ORDER)), dtype=np.float64)
    histories: dict[str, CardHistory] = {}
    errors: dict[int, RecordError] = {}
    done = 0
    for chunk, columns in rows.chunks(order):
        batch = validate_columns(columns)
        errors.update((int(chunk[position]), error) for position, error in batch.errors)
        if not errors:
            matrix[done : done + len(chunk)] = build_features_from_columns(batch.columns, histories)
        done += len(chunk)
        if progress is not None:
            progress.update(done)
    if progress is not None:
        progress.update(done, final=True)
    if errors:
        raise bad_rows_error(rows.path, errors)
    event_times = rows.columns.column("event_time").to_numpy(zero_copy_only=False)[order]
    return FileFeatures(order, matrix, event_times)

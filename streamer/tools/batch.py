"""`streamer score` and `streamer features`: the stream's pipeline over a file of transactions.

`score_file` runs the rows of a Parquet or CSV file through `pipeline.Pipeline`, the code
`streamer run` scores with, with the card histories in a plain dict (`pipeline.Histories`):
rows are applied in event-time order (rows of the same millisecond in file order), so each is
scored with its card's history before it, as the stream scores events that arrive in that
order. `write_features` writes the feature matrix that scoring builds, for teams that train
their own model. No Kafka.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from streamer.errors import RecordError
from streamer.features import FEATURE_ORDER
from streamer.files import (
    DataFileError,
    Progress,
    Rows,
    TableWriter,
    bad_rows_error,
    build_file_features,
    file_format,
    load_rows,
    writing,
)
from streamer.model.scorer import Scorer
from streamer.pipeline import Histories, Pipeline, Scored

log = structlog.get_logger(__name__)

_TIME: Final = pa.timestamp("ms", tz="UTC")

VERDICT_COLUMNS: Final = pa.schema(
    [
        ("transaction_id", pa.string()),
        ("card_id", pa.string()),
        ("score", pa.float64()),
        ("is_fraud", pa.bool_()),
        ("threshold", pa.float64()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("event_time", _TIME),
        ("scored_at", _TIME),
    ]
)
"""The fields of `schemas/verdict.avsc`, in its order; times as UTC millisecond timestamps."""

REJECT_COLUMNS: Final = pa.schema(
    [
        ("row_number", pa.int64()),
        ("error_stage", pa.string()),
        ("error_reason", pa.string()),
        ("error_class", pa.string()),
    ]
)
"""Added to a rejected row's own columns: its 1-based row number in the input, and what the
dead-letter headers `streamer.error.stage`, `.reason` and `.class` would say."""


@dataclass(frozen=True, slots=True)
class ScoreReport:
    rows: int
    scored: int
    rejected: int
    flagged: int
    seconds: float


def score_file(
    input_path: Path,
    output_path: Path,
    scorer: Scorer,
    *,
    rejects_path: Path | None = None,
    max_event_bytes: int,
    chunk_rows: int | None = None,
) -> ScoreReport:
    """Score every row of `input_path`; write verdicts to `output_path`, rejects to `rejects_path`.

    A row that cannot be read, breaks a rule or cannot be scored goes to `rejects_path` with its
    stage and reason; without `rejects_path` such a row stops the job (`DataFileError`), since
    leaving it out unnoticed would lose it. Output files appear complete or not at all.
    """
    started = time.perf_counter()
    for path in (output_path, rejects_path):
        if path is not None:
            file_format(path, for_output=True)  # refuse a bad name before any work
    rows = load_rows(input_path)
    if rejects_path is None and rows.problems:
        raise _unrecorded(bad_rows_error(input_path, dict(rows.problems)))
    clashing = set(REJECT_COLUMNS.names) & set(rows.source.column_names)
    if rejects_path is not None and clashing:
        raise DataFileError(
            f"{input_path}: the rejects add the columns {', '.join(REJECT_COLUMNS.names)}; "
            f"the input already has {', '.join(sorted(clashing))}"
        )
    order = rows.order()
    pipeline = Pipeline(scorer, max_event_bytes=max_event_bytes)
    state = Histories()
    progress = Progress("scoring", len(order))
    scored_count = flagged = 0
    with ExitStack() as stack:
        verdicts = stack.enter_context(writing(output_path, VERDICT_COLUMNS))
        rejects: TableWriter | None = None
        if rejects_path is not None:
            schema = pa.schema([*rows.source.schema, *REJECT_COLUMNS])
            rejects = stack.enter_context(writing(rejects_path, schema))
            _write_rejects(rejects, rows, dict(rows.problems))
        for chunk, columns in (
            rows.chunks(order) if chunk_rows is None else rows.chunks(order, chunk_rows)
        ):
            # The verdicts are written as columns here, not as Avro records.
            scored = pipeline.process_columns(columns, state, encode=False)
            if scored.errors:
                errors = {int(chunk[p]): error for p, error in scored.errors.items()}
                if rejects is None:
                    raise _unrecorded(bad_rows_error(input_path, errors))
                _write_rejects(rejects, rows, errors)
            table = verdict_table(scored)
            verdicts.write(table)
            scored_count += table.num_rows
            flagged += scored.flagged
            progress.update(scored_count)
        progress.update(scored_count, final=True)
        rejected = rejects.rows if rejects is not None else 0
    report = ScoreReport(len(rows), scored_count, rejected, flagged, time.perf_counter() - started)
    log.info(
        "file scored",
        input=str(input_path),
        output=str(output_path),
        rows=report.rows,
        scored=report.scored,
        rejected=report.rejected,
        flagged=report.flagged,
        seconds=round(report.seconds, 3),
        rows_per_second=round(report.rows / max(report.seconds, 1e-9)),
        model_name=scorer.name,
        model_version=scorer.version,
    )
    return report


def _unrecorded(error: DataFileError) -> DataFileError:
    return DataFileError(
        f"{error}\nNothing was written: give --rejects PATH to score the other rows and "
        "write these there."
    )


def verdict_table(scored: Scored) -> pa.Table:
    """The verdicts of a scored batch (its records with a verdict) as `VERDICT_COLUMNS`."""
    batch = scored.batch
    count = len(batch.indexes)
    scored_at = int(time.time_ns() // 1_000_000)
    has_verdict = pa.array([scored.verdicts[index] is not None for index in batch.indexes])
    scores = pa.array(scored.scores, type=pa.float64())
    table = pa.table(
        [
            pa.array(batch.columns["transaction_id"], type=pa.string()),
            pa.array(batch.columns["card_id"], type=pa.string()),
            scores,
            pc.greater_equal(scores, scored.threshold),  # as the verdict's is_fraud
            pa.array(np.full(count, scored.threshold)),
            pa.array([scored.model_name] * count, type=pa.string()),
            pa.array([scored.model_version] * count, type=pa.string()),
            pa.array(batch.columns["event_time"], type=pa.int64()).cast(_TIME),
            pa.array(np.full(count, scored_at, dtype=np.int64)).cast(_TIME),
        ],
        schema=VERDICT_COLUMNS,
    )
    return table if count == 0 else table.filter(has_verdict)


def _write_rejects(writer: TableWriter, rows: Rows, errors: dict[int, RecordError]) -> None:
    if not errors:
        return
    indexes = sorted(errors)
    table = rows.source.take(pa.array(indexes, type=pa.int64()))
    added = [
        pa.array([index + 1 for index in indexes], type=pa.int64()),
        pa.array([errors[index].stage for index in indexes], type=pa.string()),
        pa.array([str(errors[index]) for index in indexes], type=pa.string()),
        pa.array([type(errors[index]).__name__ for index in indexes], type=pa.string()),
    ]
    for field, column in zip(REJECT_COLUMNS, added, strict=True):
        table = table.append_column(field, column)
    writer.write(table)


def write_features(
    data_path: Path, output_path: Path, *, label_column: str | None = "is_fraud"
) -> int:
    """Write the feature matrix of `data_path` to `output_path`; return its rows.

    Columns: transaction_id, event_time, then `features.FEATURE_ORDER`, then the label (as
    0/1, named `label_column`) when the file has that column. Rows in event-time order, each
    with its card's history before it, exactly as `streamer score` and `streamer run` build
    them. Every row must be good (`DataFileError` names the bad ones).
    """
    file_format(output_path, for_output=True)
    rows = load_rows(data_path, label_column=label_column, require_label=False)
    built = build_file_features(rows, progress=Progress("features", len(rows)))
    order = pa.array(built.order, type=pa.int64())
    columns: list[tuple[str, pa.Array]] = [
        ("transaction_id", rows.columns.column("transaction_id").take(order)),
        ("event_time", pa.array(built.event_times, type=pa.int64()).cast(_TIME)),
    ]
    columns += [(name, pa.array(built.features[:, i])) for i, name in enumerate(FEATURE_ORDER)]
    if label_column is not None and rows.labels is not None:
        columns.append((label_column, pa.array(rows.labels[built.order].astype(np.int8))))
    table = pa.table(dict(columns))
    with writing(output_path, table.schema) as writer:
        writer.write(table)
    log.info("features written", data=str(data_path), output=str(output_path), rows=len(order))
    return len(order)

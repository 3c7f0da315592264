"""Synthetic transactions written to Parquet and CSV files, for the file modes' tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from streamer.serde import TRANSACTION_FIELDS
from streamer.synthetic import LabelledTransaction


def events_table(
    events: Sequence[LabelledTransaction], *, label: str | None = "is_fraud"
) -> pa.Table:
    """The events as a table: the Transaction fields (event_time as epoch ms) and the label."""
    columns: dict[str, list[Any]] = {
        name: [event.record[name] for event in events] for name in TRANSACTION_FIELDS
    }
    if label is not None:
        columns[label] = [int(event.is_fraud) for event in events]
    return pa.table(columns)


def write_events(table: pa.Table, path: Path) -> Path:
    """Write `table` as Parquet or CSV by `path`'s suffix."""
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def read_any(path: Path) -> pa.Table:
    """A Parquet or CSV file written by the tool, as a table."""
    if path.suffix == ".csv":
        return pacsv.read_csv(path)
    return pq.read_table(path)

"""Avro binary (no framing header) for transactions and verdicts, bound to `schemas/*.avsc`.

Schemas are parsed once, at import. Timestamps travel as `long` milliseconds; we read and write
them as plain integers (the `timestamp-millis` logical type is dropped from the parsed copy), which
is the same wire format and spares a datetime object per record.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any, Final

import fastavro

from streamer.errors import DecodeError

SCHEMA_DIR: Final = Path(__file__).resolve().parent.parent / "schemas"


def _load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    return schema


def _without_logical_types(schema: dict[str, Any]) -> dict[str, Any]:
    wire = copy.deepcopy(schema)
    for field in wire["fields"]:
        if isinstance(field["type"], dict):
            field["type"].pop("logicalType", None)
    return wire


TRANSACTION_SCHEMA: Final = _load_schema("transaction")
VERDICT_SCHEMA: Final = _load_schema("verdict")
_TRANSACTION: Final = fastavro.parse_schema(_without_logical_types(TRANSACTION_SCHEMA))
_VERDICT: Final = fastavro.parse_schema(_without_logical_types(VERDICT_SCHEMA))


def decode_transaction(value: bytes) -> dict[str, Any]:
    """Decode one Transaction; `DecodeError` if the bytes are not exactly one such record."""
    buffer = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(buffer, _TRANSACTION)
    except Exception as exc:  # fastavro raises whatever its reader hits: EOFError, UnicodeError...
        raise DecodeError(
            f"not an Avro Transaction: {type(exc).__name__}: {exc}".rstrip(": ")
        ) from exc
    if not isinstance(record, dict):  # the schema is a record; this only narrows the type
        raise DecodeError("not an Avro Transaction record")
    if buffer.tell() != len(value):
        raise DecodeError(
            f"not an Avro Transaction: {len(value) - buffer.tell()} trailing bytes after the record"
        )
    return record


def encode_transaction(record: dict[str, Any]) -> bytes:
    """Encode one Transaction record (a dict with the schema's fields)."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, _TRANSACTION, record)
    return buffer.getvalue()


def encode_verdict(record: dict[str, Any]) -> bytes:
    """Encode one Verdict record (a dict with the schema's fields)."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, _VERDICT, record)
    return buffer.getvalue()


def decode_verdict(value: bytes) -> dict[str, Any]:
    """Decode one Verdict; `DecodeError` if the bytes are not a Verdict."""
    try:
        record = fastavro.schemaless_reader(io.BytesIO(value), _VERDICT)
    except Exception as exc:  # see decode_transaction
        raise DecodeError(f"not an Avro Verdict: {type(exc).__name__}: {exc}") from exc
    if not isinstance(record, dict):
        raise DecodeError("not an Avro Verdict record")
    return record

"""Avro binary (no framing header) for transactions and verdicts, bound to `schemas/*.avsc`.

Schemas are parsed once, at import. Timestamps travel as `long` milliseconds; we read and write
them as plain integers (the `timestamp-millis` logical type is dropped from the parsed copy), which
is the same wire format and spares a datetime object per record.

The per-record functions (`decode_transaction`, `encode_verdict`, ...) use fastavro. The scoring
loop's batch functions do the same work at a fraction of the cost per record:
`decode_and_validate` reads the canonical encoding of a Transaction by hand (what fastavro and
every other Avro writer produce) and hands any value it does not recognise to
`decode_transaction`, so a bad value gets exactly that function's `DecodeError`; then it checks
the domain rules column by column (`events.screen_transactions`) and asks
`events.validate_transaction` only about the records that may break one. `encode_verdicts` writes
verdicts by hand, reusing the input's bytes of the ids and event time. Unit tests hold both to
fastavro byte for byte, and to the per-record path outcome for outcome.
"""

from __future__ import annotations

import copy
import io
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import repeat
from typing import Any, Final

import fastavro

from streamer.errors import DecodeError, RecordError, ValidationError
from streamer.events import screen_transactions, validate_transaction

SCHEMAS: Final = resources.files("streamer") / "schemas"
"""The package's copy of the top-level `schemas/` (package data: it ships in the wheel)."""


def _load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMAS.joinpath(f"{name}.avsc").read_text("utf-8"))
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
    """Decode one Transaction; `DecodeError` if the bytes are not exactly one such record.

    The error of a value that starts like the Confluent Schema Registry wire format says so (see
    `framing_hint`).
    """
    return _decode_transaction(value, framing_hint(value))


def framing_hint(value: bytes) -> str:
    """What to add to the decode error of `value` if it looks framed for a Schema Registry.

    Confluent's serializers put a magic byte and the schema's id before the Avro body: 0 and a
    4-byte big-endian id, or 1 and a 16-byte GUID. No Transaction in plain Avro starts with
    either byte: its first field, transaction_id, is a string, so the value starts with the
    string's length as a zig-zag varint, and 0 (an empty id) is refused by validation, 1 (a
    length of -1) is no Avro at all. So a value that starts so and fails to decode was almost
    surely framed; one that does decode is left to validation, which refuses it.
    """
    if len(value) >= 5 and value[0] == 0:
        schema_id = int.from_bytes(value[1:5], "big")
        return (
            "; it looks framed for a Schema Registry (Confluent wire format: magic byte 0, "
            f"schema id {schema_id}): set STREAMER_SCHEMA_REGISTRY_URL to read such records"
        )
    if len(value) >= 17 and value[0] == 1:
        return (
            "; it looks framed for a Schema Registry (Confluent wire format: magic byte 1, "
            f"schema GUID {value[1:17].hex()})"
        )
    return ""


def _decode_transaction(value: bytes, hint: str = "") -> dict[str, Any]:
    """`decode_transaction`, with `hint` appended to the reason of a `DecodeError`."""
    buffer = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(buffer, _TRANSACTION)
    except Exception as exc:  # fastavro raises whatever its reader hits: EOFError, UnicodeError...
        reason = f"not an Avro Transaction: {type(exc).__name__}: {exc}".rstrip(": ")
        raise DecodeError(reason + hint) from exc
    if not isinstance(record, dict):  # the schema is a record; this only narrows the type
        raise DecodeError("not an Avro Transaction record" + hint)
    if buffer.tell() != len(value):
        raise DecodeError(
            f"not an Avro Transaction: {len(value) - buffer.tell()} trailing bytes after the record"
            + hint
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


# -- the scoring loop's batch path ---------------------------------------------------------------

TRANSACTION_FIELDS: Final[tuple[str, ...]] = tuple(f["name"] for f in TRANSACTION_SCHEMA["fields"])
"""The fields of a Transaction, in schema order."""

# The layouts the hand-written reader and writer below follow, field by field. A change to either
# schema must change them (and the code) too; import fails rather than write the wrong bytes.
_TRANSACTION_LAYOUT: Final = (
    ("transaction_id", "string"),
    ("event_time", "long"),
    ("card_id", "string"),
    ("merchant_id", "string"),
    ("merchant_category", "string"),
    ("amount", "double"),
    ("currency", "string"),
    ("country", "string"),
    ("channel", "string"),
    ("card_present", "boolean"),
    ("card_country", ["null", "string"]),
    ("card_avg_amount", ["null", "double"]),
)
_VERDICT_LAYOUT: Final = (
    ("transaction_id", "string"),
    ("card_id", "string"),
    ("score", "double"),
    ("is_fraud", "boolean"),
    ("threshold", "double"),
    ("model_name", "string"),
    ("model_version", "string"),
    ("event_time", "long"),
    ("scored_at", "long"),
)


def _layout(schema: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (f["name"], f["type"]["type"] if isinstance(f["type"], dict) else f["type"])
        for f in schema["fields"]
    )


for _schema, _expected in (
    (TRANSACTION_SCHEMA, _TRANSACTION_LAYOUT),
    (VERDICT_SCHEMA, _VERDICT_LAYOUT),
):
    if _layout(_schema) != _expected:
        raise RuntimeError(
            f"schemas/{_schema['name'].lower()}.avsc no longer matches the hand-written Avro "
            "reader and writer in streamer/serde.py; update them together"
        )

_DOUBLE: Final = struct.Struct("<d")
_SCORE_FLAG_THRESHOLD: Final = struct.Struct("<d?d")
"""A verdict's score, is_fraud and threshold: two little-endian doubles around a 0/1 byte."""
_MAX_VARINT_SHIFT: Final = 56
"""Varints of up to 9 bytes (63 bits) are read by hand; longer ones go to fastavro."""


class _NotCanonicalError(Exception):
    """An encoding the hand-written reader leaves to fastavro, valid or not."""


_UNREADABLE: Final = (_NotCanonicalError, IndexError, struct.error, UnicodeDecodeError)
"""What `_read_transaction` raises for a value it leaves to `decode_transaction`."""


def _varint(value: bytes, at: int) -> tuple[int, int]:
    """The zig-zag varint starting at `at` (canonical, at most 9 bytes) and where it ends."""
    result = shift = 0
    while True:
        byte = value[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > _MAX_VARINT_SHIFT:
            raise _NotCanonicalError
    if byte == 0 and shift:  # an overlong encoding: fastavro accepts it, we do not bother
        raise _NotCanonicalError
    return result, at


def _span(value: bytes, at: int) -> tuple[int, int]:
    """Start and end of the string or bytes whose length starts at `at`."""
    zigzag, start = _varint(value, at)
    if zigzag & 1:  # a negative length
        raise _NotCanonicalError
    return start, start + (zigzag >> 1)


def _read_transaction(value: bytes) -> tuple[Any, ...]:
    """One Transaction: its fields in schema order, then its verdict's two wire pieces.

    The pieces are the encoded transaction_id and card_id, back to back, and the encoded
    event_time, which a verdict repeats. Reads the canonical encoding only (shortest varints,
    union branches 0 and 1, booleans 0 and 1, exactly the record's bytes) and raises one of
    `_UNREADABLE` on anything else, including every malformed value. Lengths are never used to
    allocate (slicing stops at the end of the value), so hostile bytes cost no more than their
    size. Strings of fewer than 64 bytes (a one-byte length) take the short way inline.
    """
    length = value[0]
    if length & 0x81:
        start, ids_end = _span(value, 0)
    else:
        start, ids_end = 1, 1 + (length >> 1)
    transaction_id = value[start:ids_end].decode()
    # event_time, inline: a millisecond timestamp is a 6-byte varint, the loop's common case.
    byte = value[ids_end]
    zigzag = byte & 0x7F
    card_at = ids_end + 1
    shift = 7
    while byte & 0x80:
        if shift > _MAX_VARINT_SHIFT:
            raise _NotCanonicalError
        byte = value[card_at]
        zigzag |= (byte & 0x7F) << shift
        shift += 7
        card_at += 1
    if (byte == 0 and shift > 7) or zigzag & 1:  # overlong, or negative (validation refuses)
        raise _NotCanonicalError
    length = value[card_at]
    if length & 0x81:
        start, at = _span(value, card_at)
    else:
        start, at = card_at + 1, card_at + 1 + (length >> 1)
    card_id = value[start:at].decode()
    card_end = at
    length = value[at]
    if length & 0x81:
        start, at = _span(value, at)
    else:
        start, at = at + 1, at + 1 + (length >> 1)
    merchant_id = value[start:at].decode()
    length = value[at]
    if length & 0x81:
        start, at = _span(value, at)
    else:
        start, at = at + 1, at + 1 + (length >> 1)
    merchant_category = value[start:at].decode()
    (amount,) = _DOUBLE.unpack_from(value, at)
    at += 8
    length = value[at]
    if length & 0x81:
        start, at = _span(value, at)
    else:
        start, at = at + 1, at + 1 + (length >> 1)
    currency = value[start:at].decode()
    length = value[at]
    if length & 0x81:
        start, at = _span(value, at)
    else:
        start, at = at + 1, at + 1 + (length >> 1)
    country = value[start:at].decode()
    length = value[at]
    if length & 0x81:
        start, at = _span(value, at)
    else:
        start, at = at + 1, at + 1 + (length >> 1)
    channel = value[start:at].decode()
    card_present = value[at]
    if card_present > 1:
        raise _NotCanonicalError
    branch = value[at + 1]
    at += 2
    card_country: str | None = None
    if branch == 2:  # zig-zag 1: the string branch of ["null", "string"]
        length = value[at]
        if length & 0x81:
            start, at = _span(value, at)
        else:
            start, at = at + 1, at + 1 + (length >> 1)
        card_country = value[start:at].decode()
    elif branch:
        raise _NotCanonicalError
    branch = value[at]
    at += 1
    card_avg_amount: float | None = None
    if branch == 2:
        (card_avg_amount,) = _DOUBLE.unpack_from(value, at)
        at += 8
    elif branch:
        raise _NotCanonicalError
    if at != len(value):
        raise _NotCanonicalError
    return (
        transaction_id,
        zigzag >> 1,
        card_id,
        merchant_id,
        merchant_category,
        amount,
        currency,
        country,
        channel,
        card_present == 1,
        card_country,
        card_avg_amount,
        value[:ids_end] + value[card_at:card_end],
        value[ids_end:card_at],
    )


def _long(number: int) -> bytes:
    """An Avro long: zig-zag, then a little-endian base-128 varint."""
    if not -(1 << 63) <= number < 1 << 63:
        raise ValueError(f"{number} does not fit an Avro long")
    zigzag = (number << 1) ^ (number >> 63)
    out = bytearray()
    while zigzag > 0x7F:
        out.append(zigzag & 0x7F | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def _string(text: str) -> bytes:
    """An Avro string: its UTF-8 length as a long, then the bytes."""
    data = text.encode()
    return _long(len(data)) + data


Row = tuple[Any, ...]
"""A Transaction's fields in schema order, then its verdict's two wire pieces (see
`_read_transaction`)."""


def _row(record: Mapping[str, Any]) -> Row:
    """A record `decode_transaction` gave, in the form `_read_transaction` returns."""
    return (
        *(record[name] for name in TRANSACTION_FIELDS),
        _string(record["transaction_id"]) + _string(record["card_id"]),
        _long(record["event_time"]),
    )


@dataclass(frozen=True, slots=True)
class TransactionBatch:
    """A polled batch after `decode_and_validate`: its good records and the others' errors."""

    indexes: list[int]
    """The batch index of each good record, ascending."""
    columns: dict[str, tuple[Any, ...]]
    """The good records by field: each name of `TRANSACTION_FIELDS` to one value per good
    record, in the order of `indexes`, each as `decode_transaction` gives it."""
    errors: list[tuple[int, RecordError]]
    """The batch index and error of each bad record, ascending; the error is the one the
    per-record path raises (`DecodeError` or `ValidationError`, same reason and cause)."""
    _verdict_ids: tuple[bytes, ...]
    """For `encode_verdicts`: each good record's transaction_id and card_id as Avro writes them."""
    _verdict_event_times: tuple[bytes, ...]
    """For `encode_verdicts`: each good record's event_time as Avro writes it."""

    @property
    def records(self) -> list[dict[str, Any]]:
        """The good records as `decode_transaction` gives them (built on each access)."""
        names = TRANSACTION_FIELDS
        return [
            dict(zip(names, values, strict=True))
            for values in zip(*(self.columns[name] for name in names), strict=True)
        ]


def decode_and_validate(
    values: Sequence[bytes | None],
    keys: Sequence[bytes | None],
    max_bytes: int,
    *,
    lap: Callable[[str], None] | None = None,
) -> TransactionBatch:
    """Decode and validate a polled batch: `values[i]` and `keys[i]` are record i's value and key.

    The batch form of, per record: a tombstone (no value) or a value over `max_bytes` is a
    `DecodeError`; then `decode_transaction`, then `events.validate_transaction`. Each bad
    record gets exactly the error that sequence raises (class, reason and cause); the good ones
    come back as columns (see `TransactionBatch`), ready for
    `features.build_features_from_columns` and `encode_verdicts`. Raises nothing for bad
    records; `ValueError` if `values` and `keys` differ in length. `lap("decode")` is called
    once decoding is done, before validation (the pipeline's stage timing).
    """
    if len(values) != len(keys):
        raise ValueError(f"{len(values)} values but {len(keys)} keys")
    errors: list[tuple[int, RecordError]] = []
    indexes: list[int] = []
    rows: list[Row] = []
    read = _read_transaction
    for index, value in enumerate(values):
        if value is None or len(value) > max_bytes:
            errors.append((index, unreadable(value, max_bytes)))
            continue
        try:
            row = read(value)
        except _UNREADABLE:
            row = None
        if row is None:  # outside the except clause, so the DecodeError's context stays its own
            try:
                row = _row(decode_transaction(value))
            except DecodeError as exc:
                errors.append((index, exc))
                continue
        indexes.append(index)
        rows.append(row)
    return validated_batch(indexes, rows, errors, keys, lap=lap)


def validate_columns(
    columns: Mapping[str, Sequence[Any]], *, wire: bool = True
) -> TransactionBatch:
    """Validate records held by field, as `decode_and_validate` validates decoded values.

    For records that come from somewhere other than Avro bytes (a file's rows): `columns` maps
    every name of `TRANSACTION_FIELDS` to one value per record, each of the type
    `decode_transaction` gives (str, int, float, bool, None). Record i's key is its card_id.
    The good records and the errors come back as from `decode_and_validate` (indexes are
    positions in the columns); the rules and the reasons are the same, as the same code checks
    them (`validated_batch`). With `wire` false the batch lacks what `encode_verdicts` needs (a
    caller that does not encode verdicts saves building it). Raises `ValueError` if a column is
    missing or the columns differ in length.
    """
    missing = [name for name in TRANSACTION_FIELDS if name not in columns]
    if missing:
        raise ValueError(f"missing columns: {', '.join(missing)}")
    fields = [columns[name] for name in TRANSACTION_FIELDS]
    count = len(fields[0])
    if any(len(values) != count for values in fields):
        raise ValueError("columns differ in length")
    card_ids = columns["card_id"]
    rows: list[Row]
    if wire:
        # The verdict's wire pieces, as `_read_transaction` cuts them out of an encoded value.
        ids = map(bytes.__add__, map(_string, columns["transaction_id"]), map(_string, card_ids))
        rows = list(zip(*fields, ids, map(_long, columns["event_time"]), strict=True))
    else:
        rows = list(zip(*fields, repeat(b"", count), repeat(b"", count), strict=True))
    keys: list[bytes | None] = [card_id.encode() for card_id in card_ids]
    return validated_batch(list(range(count)), rows, [], keys)


def unreadable(value: bytes | None, max_bytes: int) -> DecodeError:
    """The error of a value `decode_and_validate` does not read: absent, or over `max_bytes`."""
    if value is None:
        return DecodeError("tombstone: the record has no value")
    return DecodeError(f"value of {len(value)} bytes exceeds the limit of {max_bytes} bytes")


def read_row(value: bytes, hint: str = "") -> Row:
    """One Transaction in canonical Avro as a row of `decode_and_validate`'s batch.

    The hand-written reader first, `decode_transaction` if that gives up; `DecodeError` (with
    `hint` appended to its reason) if the value is not one Transaction. For decoders that read
    values `decode_and_validate` cannot (`streamer.registry`) and then call `validated_batch`.
    """
    try:
        return _read_transaction(value)
    except _UNREADABLE:
        pass
    return _row(_decode_transaction(value, hint))


def record_row(record: Mapping[str, Any]) -> Row:
    """A decoded Transaction record (every field of the schema) as a row of the batch."""
    return _row(record)


def validated_batch(
    indexes: list[int],
    rows: list[Row],
    errors: list[tuple[int, RecordError]],
    keys: Sequence[bytes | None],
    *,
    lap: Callable[[str], None] | None = None,
) -> TransactionBatch:
    """The batch of decoded `rows` (of the records at `indexes`, ascending) after validation.

    `errors`: the decode errors met so far, ascending by index; the validation errors join them.
    `keys` are the whole batch's keys, by index. `lap("decode")` is called before validation.
    """
    good_keys = [keys[i] for i in indexes]
    columns, wire = _transpose(rows)
    if lap is not None:
        lap("decode")
    invalid: set[int] = set()
    for position in screen_transactions(columns, good_keys):
        record = dict(zip(TRANSACTION_FIELDS, rows[position], strict=False))
        try:
            validate_transaction(record, good_keys[position])
        except ValidationError as exc:
            errors.append((indexes[position], exc))
            invalid.add(position)
    if invalid:
        kept = [p for p in range(len(rows)) if p not in invalid]
        indexes = [indexes[p] for p in kept]
        columns, wire = _transpose([rows[p] for p in kept])
        errors.sort(key=lambda error: error[0])
    return TransactionBatch(indexes, columns, errors, *wire)


def _transpose(
    rows: Sequence[tuple[Any, ...]],
) -> tuple[dict[str, tuple[Any, ...]], tuple[tuple[bytes, ...], tuple[bytes, ...]]]:
    """Rows of `_read_transaction` as columns by field name, and the two wire-piece columns."""
    if not rows:
        return dict.fromkeys(TRANSACTION_FIELDS, ()), ((), ())
    transposed = zip(*rows, strict=True)
    columns = {name: next(transposed) for name in TRANSACTION_FIELDS}
    return columns, (next(transposed), next(transposed))


def encode_verdicts(
    batch: TransactionBatch,
    scores: Sequence[float],
    *,
    threshold: float,
    model_name: str,
    model_version: str,
    scored_at: int,
) -> list[bytes]:
    """The verdict of each good record of `batch`, in order, byte for byte as `encode_verdict`.

    `scores[i]` scores the batch's good record i; its verdict carries that record's
    transaction_id, card_id and event_time, and is_fraud = score >= threshold. Every score is
    encoded, whatever its value: leaving out a score outside [0, 1] is the caller's decision.
    """
    if len(scores) != len(batch.indexes):
        raise ValueError(f"{len(scores)} scores for {len(batch.indexes)} records")
    model = _string(model_name) + _string(model_version)
    scored = _long(scored_at)
    pack = _SCORE_FLAG_THRESHOLD.pack
    join = b"".join
    return [
        join((ids, pack(score, score >= threshold, threshold), model, event_time, scored))
        for ids, event_time, score in zip(
            batch._verdict_ids, batch._verdict_event_times, scores, strict=True
        )
    ]

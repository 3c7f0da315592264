"""Transactions written through a Confluent Schema Registry: the wire format, resolved to ours.

Confluent's serializers frame each value: magic byte 0, the writer schema's id (4 bytes, big
endian), then the Avro body in that schema. `RegistryDecoder` reads such values: it asks the
registry for each writer schema once (then keeps it), and reads the body as
`schemas/transaction.avsc` by Avro schema resolution (fastavro), so a writer that added optional
fields or ordered the fields differently still decodes. Values without the frame are read as
plain Avro of `transaction.avsc`, as without a registry: producers can move to the registry one
at a time. (No plain Transaction starts with byte 0 or 1: see `serde.framing_hint`.)

Speed: a writer schema whose parsing canonical form is our own writes exactly our bytes, so its
records take the hand-written batch reader of `serde` after the 5-byte prefix (the common case:
producers that registered `transaction.avsc`). A writer that holds each of our fields with its
type (in any order, with fields of its own besides, or without some of our optional ones) is
read by fastavro with the writer schema alone, our fields picked from the result; any other
writer is resolved record by record by fastavro, slower still.

Errors: a record whose writer cannot be read as a Transaction (an incompatible schema, an id the
registry does not know, a schema that is not Avro) is a `DecodeError` naming the schema id, and
is dead-lettered. A registry that cannot be reached (or answers with anything but "not found") is
no fault of the record: `SchemaRegistryUnavailableError` fails the whole batch before anything is
scored, and the caller reads it again later.

No Kafka here: the registry is an HTTP service, asked through confluent-kafka's
`SchemaRegistryClient` (`connect`), or any object with its `get_schema(schema_id)`.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import fastavro
import structlog
from fastavro.schema import to_parsing_canonical_form

from streamer.errors import DecodeError, RecordError, SchemaRegistryUnavailableError
from streamer.serde import (
    TRANSACTION_SCHEMA,
    Row,
    TransactionBatch,
    read_row,
    record_row,
    unreadable,
    validated_batch,
)

log = structlog.get_logger(__name__)

MAGIC_BYTE: Final = 0
"""The Confluent wire format's first byte when a 4-byte schema id follows (its version 0)."""
PREFIX_BYTES: Final = 5
NOT_FOUND_TTL_SECONDS: Final = 60.0
"""How long an id the registry said it does not know is taken as unknown before asking again."""
MAX_UNKNOWN_IDS: Final = 10_000
"""Unknown ids remembered at most (values with random ids must not grow memory without end)."""
CLIENT_CONFIG: Final = {
    # The client's default is no timeout at all: a registry that accepts the connection and never
    # answers would hang the scoring loop.
    "timeout": 10,
    # Retries inside one lookup stay short; a registry down for longer fails the batch, which is
    # read again after a back-off (`streamer.app`), so the loop keeps serving the consumer group.
    "max.retries": 2,
    "retries.wait.ms": 200,
    "retries.max.wait.ms": 2000,
}


class SchemaLookup(Protocol):
    """What the decoder needs of a registry client (`SchemaRegistryClient` has it)."""

    def get_schema(self, schema_id: int) -> Any:
        """The schema registered under `schema_id`: `schema_str`, `schema_type`, `references`."""
        ...


def connect(url: str) -> RegistryDecoder:
    """A decoder asking the registry at `url` (`http(s)://[user:password@]host[:port]`, several
    comma-separated, or `mock://name` for the client's in-process mock registry)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    client = SchemaRegistryClient.new_client({"url": url, **CLIENT_CONFIG})
    return RegistryDecoder(client)


def _without_logical_types(schema: Any) -> Any:
    """`schema` without its `logicalType`s: timestamps stay integers, as `serde` reads them."""
    if isinstance(schema, dict):
        return {
            key: _without_logical_types(value)
            for key, value in schema.items()
            if key != "logicalType"
        }
    if isinstance(schema, list):
        return [_without_logical_types(item) for item in schema]
    return schema


_READER: Final = fastavro.parse_schema(_without_logical_types(TRANSACTION_SCHEMA))
_READER_FORM: Final = to_parsing_canonical_form(TRANSACTION_SCHEMA)


@dataclass(frozen=True, slots=True)
class Writer:
    """One writer schema, as the decoder reads its records."""

    schema_id: int
    canonical: bool
    """Its parsing canonical form is `transaction.avsc`'s: the same bytes, the fast reader."""
    parsed: Any = None
    """The parsed schema (logical types dropped), unless `canonical` or `problem`."""
    defaults: dict[str, Any] | None = None
    """Set if each of our fields is in the writer with the same type, or missing with a default
    (which this holds): then a plain read of the writer's record, with these added, is what
    resolution would give, at about half the cost. None: resolution by fastavro."""
    problem: str | None = None
    """Why no record of this writer can be read, if so (not Avro, not in the registry...)."""
    expires: float | None = None
    """When to ask the registry again (for an id it did not know)."""

    @property
    def read_by(self) -> str:
        """How its records are read: `serde`, `projection`, `resolution`, or the problem."""
        if self.problem is not None:
            return self.problem
        if self.canonical:
            return "serde"
        return "resolution" if self.defaults is None else "projection"

    def read(self, value: bytes) -> Row:
        """The framed `value` as a batch row; `DecodeError` naming the schema id if it cannot be."""
        if self.problem is not None:
            raise DecodeError(self.problem)
        if self.canonical:
            try:
                return read_row(value[PREFIX_BYTES:])
            except DecodeError as exc:
                raise DecodeError(f"schema id {self.schema_id}: {exc}") from exc.__cause__
        buffer = io.BytesIO(value)
        buffer.seek(PREFIX_BYTES)
        defaults = self.defaults
        try:
            if defaults is None:
                record = fastavro.schemaless_reader(buffer, self.parsed, _READER)
            else:
                record = fastavro.schemaless_reader(buffer, self.parsed, None)
                if defaults and isinstance(record, dict):
                    record = {**defaults, **record}
        except fastavro.read.SchemaResolutionError as exc:
            raise DecodeError(
                f"schema id {self.schema_id} cannot be read as transaction.avsc: {exc}"
            ) from exc
        except Exception as exc:  # fastavro raises whatever its reader hits: EOFError, ...
            raise DecodeError(
                f"not an Avro record of schema id {self.schema_id}: {type(exc).__name__}: {exc}"
            ) from exc
        if buffer.tell() != len(value):
            raise DecodeError(
                f"not an Avro record of schema id {self.schema_id}: "
                f"{len(value) - buffer.tell()} trailing bytes after the record"
            )
        if not isinstance(record, dict):  # the reader schema is a record; this narrows the type
            raise DecodeError(f"schema id {self.schema_id} is not read as a record")
        return record_row(record)


class RegistryDecoder:
    """Decodes and validates batches of framed (or plain) Avro transactions; not thread-safe.

    `decode_and_validate` is `serde.decode_and_validate` for a topic written through a Schema
    Registry: same errors for plain values, same `TransactionBatch`.
    """

    def __init__(self, registry: SchemaLookup, *, clock: Callable[[], float] = time.monotonic):
        self._registry = registry
        self._clock = clock
        self._writers: dict[int, Writer] = {}
        """Writers the registry gave, for the life of the decoder (a schema id never changes)."""
        self._unknown: dict[int, Writer] = {}
        """Ids the registry did not know, until their `expires`."""

    def decode_and_validate(
        self,
        values: Sequence[bytes | None],
        keys: Sequence[bytes | None],
        max_bytes: int,
        *,
        lap: Callable[[str], None] | None = None,
    ) -> TransactionBatch:
        """Decode and validate a polled batch; `values[i]` and `keys[i]` are record i's.

        Raises `SchemaRegistryUnavailableError` if a writer schema it does not hold yet cannot
        be fetched: then no record of the batch is decoded, and the batch is to be read again.
        """
        if len(values) != len(keys):
            raise ValueError(f"{len(values)} values but {len(keys)} keys")
        errors: list[tuple[int, RecordError]] = []
        indexes: list[int] = []
        rows: list[Row] = []
        last_prefix = b""  # the common case: one writer for the whole batch, looked up once
        writer = None
        for index, value in enumerate(values):
            if value is None or len(value) > max_bytes:
                errors.append((index, unreadable(value, max_bytes)))
                continue
            try:
                if value[:1] == b"\x00" and len(value) >= PREFIX_BYTES:
                    prefix = value[:PREFIX_BYTES]
                    if prefix != last_prefix or writer is None:
                        writer = self._writer(int.from_bytes(prefix[1:], "big"))
                        last_prefix = prefix
                    row = writer.read(value)
                elif value[:1] == b"\x01":
                    raise DecodeError(
                        "framed with a schema GUID (Confluent wire format, magic byte 1), which "
                        "streamer does not read: configure the producer's serializer to write "
                        "schema ids (magic byte 0)"
                    )
                else:
                    row = read_row(value)
            except DecodeError as exc:
                errors.append((index, exc))
                continue
            indexes.append(index)
            rows.append(row)
        return validated_batch(indexes, rows, errors, keys, lap=lap)

    def _writer(self, schema_id: int) -> Writer:
        """The writer of `schema_id`: kept, or fetched now."""
        writer = self._writers.get(schema_id) or self._unknown.get(schema_id)
        if writer is None or (writer.expires is not None and writer.expires <= self._clock()):
            writer = self._fetch(schema_id)
        return writer

    def _fetch(self, schema_id: int) -> Writer:
        """Ask the registry for `schema_id` and keep the answer (an unknown id for a while)."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            schema = self._registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                writer = Writer(
                    schema_id,
                    canonical=False,
                    problem=f"schema id {schema_id} is not in the Schema Registry: {exc}",
                    expires=self._clock() + NOT_FOUND_TTL_SECONDS,
                )
                if len(self._unknown) >= MAX_UNKNOWN_IDS:
                    self._unknown.clear()
                self._unknown[schema_id] = writer
                return writer
            raise SchemaRegistryUnavailableError(
                f"the Schema Registry did not give schema id {schema_id}: {exc}"
            ) from exc
        except Exception as exc:  # the HTTP client's transport errors, timeouts, bad JSON...
            raise SchemaRegistryUnavailableError(
                f"the Schema Registry did not give schema id {schema_id}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        writer = _writer(schema_id, schema)
        self._writers[schema_id] = writer
        log.info("writer schema fetched", schema_id=schema_id, read_by=writer.read_by)
        return writer


def _writer(schema_id: int, schema: Any) -> Writer:
    """How to read records written with `schema` (a registry `Schema`) as Transactions."""
    schema_type = getattr(schema, "schema_type", None) or "AVRO"
    if schema_type != "AVRO":
        return Writer(
            schema_id, False, problem=f"schema id {schema_id} is a {schema_type} schema, not Avro"
        )
    if getattr(schema, "references", None):
        return Writer(
            schema_id,
            False,
            problem=f"schema id {schema_id} uses schema references, which streamer does not read",
        )
    try:
        document = json.loads(schema.schema_str)
        parsed = fastavro.parse_schema(_without_logical_types(document))
        canonical = to_parsing_canonical_form(document) == _READER_FORM
        defaults = None if canonical else _projection(document)
    except Exception as exc:  # json or fastavro: whatever makes it no Avro schema
        problem = f"schema id {schema_id} is not a valid Avro schema: {type(exc).__name__}: {exc}"
        return Writer(schema_id, False, problem=problem)
    if canonical:
        return Writer(schema_id, True)
    return Writer(schema_id, False, parsed, defaults=defaults)


def _projection(writer: Any) -> dict[str, Any] | None:
    """`Writer.defaults` for the writer schema `writer` (a parsed JSON document), or None."""
    if not isinstance(writer, dict) or writer.get("type") != "record":
        return None
    if writer.get("name", "").rpartition(".")[2] != TRANSACTION_SCHEMA["name"]:
        return None  # resolution decides whether a record of another name matches
    theirs = {field["name"]: field["type"] for field in writer.get("fields", [])}
    defaults: dict[str, Any] = {}
    for field in TRANSACTION_SCHEMA["fields"]:
        name = field["name"]
        if name not in theirs:
            if "default" not in field:
                return None
            defaults[name] = field["default"]
        elif _type_form(theirs[name]) != _type_form(field["type"]):
            return None
    return defaults


def _type_form(field_type: Any) -> str:
    """A field type's parsing canonical form (logical types and attributes left out)."""
    form: str = to_parsing_canonical_form(field_type)
    return form

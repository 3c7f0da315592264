"""Input written through a Schema Registry: the client's mock:// registry, no server."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any, cast

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext
from structlog.testing import capture_logs

from streamer.errors import DecodeError, SchemaRegistryUnavailableError, ValidationError
from streamer.model.scorer import Scorer
from streamer.registry import MAX_UNKNOWN_IDS, NOT_FOUND_TTL_SECONDS, RegistryDecoder, connect
from streamer.serde import (
    TRANSACTION_SCHEMA,
    TransactionBatch,
    decode_and_validate,
    encode_transaction,
    encode_verdicts,
)
from streamer.settings import Settings
from streamer.synthetic import SyntheticWorld
from tests.registry_schemas import evolved_writer, incompatible_writer
from tests.unit.fakes import app_on_fakes
from tests.unit.test_app import StubMessage

MAX_BYTES = 64 * 1024
TOPIC = "transactions"


def _records(count: int, seed: int = 5) -> list[dict[str, Any]]:
    return [event.record for event in SyntheticWorld(seed).generate(count)]


def _keys(records: list[dict[str, Any]]) -> list[bytes | None]:
    return [record["card_id"].encode() for record in records]


def _mock_registry() -> SchemaRegistryClient:
    return SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4().hex}"})


def _framed(
    client: SchemaRegistryClient, schema: dict[str, Any], records: list[dict[str, Any]]
) -> list[bytes]:
    """`records` as confluent-kafka's AvroSerializer writes them (registering `schema`)."""
    serializer = AvroSerializer(client, json.dumps(schema))
    context = SerializationContext(TOPIC, MessageField.VALUE)
    return [cast(bytes, serializer(record, context)) for record in records]


def _no_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _no_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_no_logical_types(item) for item in schema]
    return schema


def _same(batch: TransactionBatch, expected: TransactionBatch) -> None:
    """Same good records, columns and verdict bytes, same errors."""
    assert batch.indexes == expected.indexes
    assert batch.columns == expected.columns
    assert [(i, type(e), str(e)) for i, e in batch.errors] == [
        (i, type(e), str(e)) for i, e in expected.errors
    ]
    scores = [0.5] * len(batch.indexes)
    common: dict[str, Any] = {
        "threshold": 0.4,
        "model_name": "m",
        "model_version": "1",
        "scored_at": 7,
    }
    assert encode_verdicts(batch, scores, **common) == encode_verdicts(expected, scores, **common)


class CountingRegistry:
    """A registry client that counts lookups and can be made to fail."""

    def __init__(self, client: SchemaRegistryClient) -> None:
        self.client = client
        self.lookups: list[int] = []
        self.failure: Exception | None = None

    def get_schema(self, schema_id: int) -> Any:
        self.lookups.append(schema_id)
        if self.failure is not None:
            raise self.failure
        return self.client.get_schema(schema_id)


class TestFramedInput:
    def test_writer_equal_to_ours_decodes_as_plain_avro_does(self) -> None:
        """Framed with transaction.avsc itself: the same batch as the plain values give."""
        client = _mock_registry()
        records = _records(40)
        framed = _framed(client, TRANSACTION_SCHEMA, records)
        plain = [encode_transaction(r) for r in records]
        assert all(value[:1] == b"\x00" for value in framed)
        assert [value[5:] for value in framed] == plain
        decoder = RegistryDecoder(client)
        with capture_logs() as logs:
            batch = decoder.decode_and_validate(framed, _keys(records), MAX_BYTES)
        _same(batch, decode_and_validate(plain, _keys(records), MAX_BYTES))
        assert len(batch.indexes) == 40
        [fetched] = [entry for entry in logs if entry["event"] == "writer schema fetched"]
        assert fetched["read_by"] == "serde"

    def test_evolved_writer_decodes_with_defaults(self) -> None:
        """A writer with a new optional field, one optional field fewer and reordered fields."""
        client = _mock_registry()
        records = _records(30)
        written = [
            {**{k: v for k, v in r.items() if k != "card_avg_amount"}, "device_id": "d-1"}
            for r in records
        ]
        framed = _framed(client, evolved_writer(), written)
        with capture_logs() as logs:
            batch = RegistryDecoder(client).decode_and_validate(framed, _keys(records), MAX_BYTES)
        [fetched] = [entry for entry in logs if entry["event"] == "writer schema fetched"]
        assert fetched["read_by"] == "projection"
        expected = [{**r, "card_avg_amount": None} for r in records]
        plain = [encode_transaction(r) for r in expected]
        _same(batch, decode_and_validate(plain, _keys(records), MAX_BYTES))
        assert batch.records == expected

    def test_writer_with_promoted_types_is_resolved(self) -> None:
        """amount as a float and card_present moved: Avro promotes float to double."""
        client = _mock_registry()
        records = [{**r, "amount": 12.5} for r in _records(5)]
        schema = evolved_writer()
        for field in schema["fields"]:
            if field["name"] == "amount":
                field["type"] = "float"
        framed = _framed(client, schema, [{**r, "device_id": None} for r in records])
        with capture_logs() as logs:
            batch = RegistryDecoder(client).decode_and_validate(framed, _keys(records), MAX_BYTES)
        [fetched] = [entry for entry in logs if entry["event"] == "writer schema fetched"]
        assert fetched["read_by"] == "resolution"
        assert batch.records == [{**r, "card_avg_amount": None} for r in records]

    def test_projection_reads_as_resolution_does(self) -> None:
        """For a writer read by projection, the records equal fastavro's resolution of them."""
        client = _mock_registry()
        records = _records(50)
        schema = evolved_writer()
        framed = _framed(client, schema, [{**r, "device_id": "x"} for r in records])
        batch = RegistryDecoder(client).decode_and_validate(framed, _keys(records), MAX_BYTES)
        writer = fastavro.parse_schema(_no_logical_types(schema))
        reader = fastavro.parse_schema(_no_logical_types(TRANSACTION_SCHEMA))
        resolved = [
            fastavro.schemaless_reader(io.BytesIO(value[5:]), writer, reader) for value in framed
        ]
        assert batch.records == resolved

    def test_incompatible_writer_is_a_decode_error_naming_the_schema_id(self) -> None:
        """A writer whose amount is a string: each of its records is dead-lettered, by id."""
        client = _mock_registry()
        records = _records(3)
        framed = _framed(client, incompatible_writer(), [{**r, "amount": "12.5"} for r in records])
        schema_id = int.from_bytes(framed[0][1:5], "big")
        batch = RegistryDecoder(client).decode_and_validate(framed, _keys(records), MAX_BYTES)
        assert batch.indexes == []
        for index, (position, error) in enumerate(batch.errors):
            assert position == index
            assert isinstance(error, DecodeError)
            assert error.stage == "decode"
            assert f"schema id {schema_id} cannot be read as transaction.avsc" in str(error)

    def test_batch_mixing_writers_and_plain_values_keeps_order(self) -> None:
        """Two writers, plain Avro and garbage in one batch: each record where it was."""
        client = _mock_registry()
        records = _records(8)
        ours = _framed(client, TRANSACTION_SCHEMA, records[:3])
        evolved = _framed(
            client, evolved_writer(), [{**r, "device_id": None} for r in records[3:6]]
        )
        plain = [encode_transaction(r) for r in records[6:]]
        values: list[bytes | None] = [
            ours[0], evolved[0], plain[0], b"\xff\xfe", ours[1], evolved[1], None,
            plain[1], ours[2], evolved[2],
        ]  # fmt: skip
        keys = [b"k"] * len(values)
        order = [0, 3, 6, None, 1, 4, None, 7, 2, 5]
        for position, record_index in enumerate(order):
            if record_index is not None:
                keys[position] = records[record_index]["card_id"].encode()
        batch = RegistryDecoder(client).decode_and_validate(values, keys, MAX_BYTES)
        assert batch.indexes == [0, 1, 2, 4, 5, 7, 8, 9]
        assert [i for i, _ in batch.errors] == [3, 6]
        ids = [records[i]["transaction_id"] for i in order if i is not None]
        assert list(batch.columns["transaction_id"]) == ids

    def test_validation_applies_to_framed_records(self) -> None:
        """A framed record that breaks a domain rule is a validation error, as plain ones are."""
        client = _mock_registry()
        records = _records(2)
        framed = _framed(client, TRANSACTION_SCHEMA, [records[0], {**records[1], "amount": -1.0}])
        batch = RegistryDecoder(client).decode_and_validate(framed, _keys(records), MAX_BYTES)
        assert batch.indexes == [0]
        [(index, error)] = batch.errors
        assert index == 1
        assert isinstance(error, ValidationError)

    def test_corrupt_body_names_the_schema_id(self) -> None:
        """A truncated record of a known writer: a decode error naming the id."""
        client = _mock_registry()
        records = _records(2)
        framed = _framed(client, TRANSACTION_SCHEMA, records)
        evolved = _framed(client, evolved_writer(), [{**records[1], "device_id": None}])
        values: list[bytes | None] = [framed[0][:20], evolved[0][:20]]
        batch = RegistryDecoder(client).decode_and_validate(values, _keys(records), MAX_BYTES)
        reasons = [str(error) for _, error in batch.errors]
        assert reasons[0].startswith(f"schema id {int.from_bytes(framed[0][1:5], 'big')}: ")
        assert reasons[1].startswith(
            f"not an Avro record of schema id {int.from_bytes(evolved[0][1:5], 'big')}: "
        )

    def test_guid_framing_is_refused_with_a_reason(self) -> None:
        """Magic byte 1 (a schema GUID) is named, not read as garbage."""
        value = b"\x01" + uuid.uuid4().bytes + encode_transaction(_records(1)[0])
        batch = RegistryDecoder(_mock_registry()).decode_and_validate([value], [b"k"], MAX_BYTES)
        [(_, error)] = batch.errors
        assert "schema GUID" in str(error)
        assert "magic byte 1" in str(error)


class TestWriterSchemas:
    def test_each_schema_id_is_fetched_once(self) -> None:
        """Two batches of two writers: two lookups in all."""
        client = _mock_registry()
        records = _records(10)
        values = _framed(client, TRANSACTION_SCHEMA, records[:5]) + _framed(
            client, evolved_writer(), [{**r, "device_id": None} for r in records[5:]]
        )
        registry = CountingRegistry(client)
        decoder = RegistryDecoder(registry)
        for _ in range(2):
            batch = decoder.decode_and_validate(values, _keys(records), MAX_BYTES)
            assert len(batch.indexes) == 10
        assert sorted(registry.lookups) == sorted({int.from_bytes(v[1:5], "big") for v in values})

    def test_unknown_id_is_dead_lettered_and_asked_again_later(self) -> None:
        """An id the registry does not know: decode error; asked again once the TTL is over."""
        now = [100.0]
        registry = CountingRegistry(_mock_registry())
        decoder = RegistryDecoder(registry, clock=lambda: now[0])
        value = b"\x00" + (4242).to_bytes(4, "big") + encode_transaction(_records(1)[0])
        for _ in range(3):
            batch = decoder.decode_and_validate([value], [b"k"], MAX_BYTES)
            [(_, error)] = batch.errors
            assert "schema id 4242 is not in the Schema Registry" in str(error)
        assert registry.lookups == [4242]
        now[0] += NOT_FOUND_TTL_SECONDS
        decoder.decode_and_validate([value], [b"k"], MAX_BYTES)
        assert registry.lookups == [4242, 4242]

    def test_unknown_ids_are_remembered_within_a_bound(self) -> None:
        """Values with ever new random ids: each asked once, the memory of them bounded."""
        registry = CountingRegistry(_mock_registry())
        decoder = RegistryDecoder(registry)
        body = encode_transaction(_records(1)[0])
        values: list[bytes | None] = [
            b"\x00" + schema_id.to_bytes(4, "big") + body
            for schema_id in range(1000, 1000 + MAX_UNKNOWN_IDS + 5)
        ]
        batch = decoder.decode_and_validate(values, [b"k"] * len(values), MAX_BYTES)
        assert batch.indexes == []
        assert len(registry.lookups) == len(values)
        assert len(decoder._unknown) <= MAX_UNKNOWN_IDS  # the bound is the behaviour under test

    @pytest.mark.parametrize(
        "failure",
        [
            SchemaRegistryError(503, 50003, "Error in the backend data store"),
            SchemaRegistryError(401, 40101, "Unauthorized"),
            ConnectionRefusedError(111, "Connection refused"),
        ],
        ids=["503", "401", "refused"],
    )
    def test_unreachable_registry_fails_the_batch_not_the_records(self, failure: Exception) -> None:
        """The registry failing is no fault of the records: the batch raises, then decodes."""
        client = _mock_registry()
        records = _records(4)
        values = _framed(client, TRANSACTION_SCHEMA, records)
        registry = CountingRegistry(client)
        registry.failure = failure
        decoder = RegistryDecoder(registry)
        with pytest.raises(SchemaRegistryUnavailableError, match="did not give schema id"):
            decoder.decode_and_validate(values, _keys(records), MAX_BYTES)
        registry.failure = None
        batch = decoder.decode_and_validate(values, _keys(records), MAX_BYTES)
        assert batch.indexes == [0, 1, 2, 3]

    def test_known_writers_keep_decoding_while_the_registry_is_down(self) -> None:
        """Once fetched, a writer needs no registry."""
        client = _mock_registry()
        records = _records(4)
        values = _framed(client, TRANSACTION_SCHEMA, records)
        registry = CountingRegistry(client)
        decoder = RegistryDecoder(registry)
        decoder.decode_and_validate(values[:1], _keys(records)[:1], MAX_BYTES)
        registry.failure = ConnectionRefusedError(111, "Connection refused")
        batch = decoder.decode_and_validate(values, _keys(records), MAX_BYTES)
        assert batch.indexes == [0, 1, 2, 3]

    def test_schema_of_another_type_is_refused_by_id(self) -> None:
        """A JSON Schema id: its records are dead-lettered, saying so."""
        client = _mock_registry()
        schema_id = client.register_schema(
            "other-value", Schema(json.dumps({"type": "object"}), "JSON")
        )
        value = b"\x00" + schema_id.to_bytes(4, "big") + b"{}"
        batch = RegistryDecoder(client).decode_and_validate([value], [b"k"], MAX_BYTES)
        [(_, error)] = batch.errors
        assert str(error) == f"schema id {schema_id} is a JSON schema, not Avro"

    def test_connect_reads_a_mock_url(self) -> None:
        """`connect` builds the decoder from the setting's URL (the client's mock here)."""
        decoder = connect("mock://streamer-test")
        batch = decoder.decode_and_validate(
            [encode_transaction(r) for r in _records(2)], _keys(_records(2)), MAX_BYTES
        )
        assert batch.indexes == [0, 1]


class TestFramedWithoutRegistry:
    def test_framed_value_says_it_looks_framed(self) -> None:
        """Without the URL, a framed record is a decode error naming the id and the setting."""
        client = _mock_registry()
        records = _records(1)
        [value] = _framed(client, TRANSACTION_SCHEMA, records)
        schema_id = int.from_bytes(value[1:5], "big")
        batch = decode_and_validate([value], _keys(records), MAX_BYTES)
        [(_, error)] = batch.errors
        assert isinstance(error, DecodeError)
        assert "looks framed for a Schema Registry (Confluent wire format: magic byte 0, " in str(
            error
        )
        assert f"schema id {schema_id})" in str(error)
        assert "STREAMER_SCHEMA_REGISTRY_URL" in str(error)

    def test_plain_record_with_empty_id_is_a_validation_error(self) -> None:
        """A plain Transaction whose transaction_id is empty starts with byte 0 but decodes:
        validation refuses it for what it is, with no talk of framing."""
        record = {**_records(1)[0], "transaction_id": ""}
        value = encode_transaction(record)
        assert value[0] == 0
        batch = decode_and_validate([value], [record["card_id"].encode()], MAX_BYTES)
        [(_, error)] = batch.errors
        assert isinstance(error, ValidationError)
        assert "framed" not in str(error)

    def test_short_value_with_zero_first_byte_is_no_frame(self) -> None:
        """Fewer than 5 bytes cannot carry a schema id: the plain decode error."""
        batch = decode_and_validate([b"\x00\x01"], [b"k"], MAX_BYTES)
        [(_, error)] = batch.errors
        assert "framed" not in str(error)
        assert str(error).startswith("not an Avro Transaction")


class TestScorerWithRegistry:
    def test_registry_down_reads_the_batch_again_and_loses_nothing(self, model_path: Path) -> None:
        """The batch is sought back, nothing produced; once the registry answers, all scored."""
        client = _mock_registry()
        records = _records(6)
        values = _framed(client, TRANSACTION_SCHEMA, records)
        registry = CountingRegistry(client)
        registry.failure = ConnectionRefusedError(111, "Connection refused")
        rig = app_on_fakes(
            Scorer.from_path(model_path),
            Settings(),
            decode=RegistryDecoder(registry).decode_and_validate,
        )
        messages = [
            StubMessage(value, record["card_id"].encode(), 10 + i, i % 2)
            for i, (value, record) in enumerate(zip(values, records, strict=True))
        ]
        rig.app.process(messages)
        assert rig.producer.produced == []
        assert sorted(rig.consumer.seeks) == [(TOPIC, 0, 10), (TOPIC, 1, 11)]
        assert rig.app.counters.consumed == 0
        assert len(rig.store) == 0
        registry.failure = None
        rig.app.process(messages)
        assert [p.topic for p in rig.producer.produced] == ["fraud-verdicts"] * 6
        assert rig.app.counters.consumed == 6


def test_settings_registry_url() -> None:
    """Unset by default; an empty value is unset; credentials never show in the log form."""
    assert Settings().schema_registry_url is None
    assert Settings(schema_registry_url=" ").schema_registry_url is None
    settings = Settings(schema_registry_url="https://key:secret@registry:8081,http://other")
    shown = settings.loggable()["schema_registry_url"]
    assert "secret" not in shown
    assert shown == "https://**********@registry:8081,http://other"


@pytest.mark.parametrize("url", ["registry:8081", "ftp://registry", "http://", "http://h:99999"])
def test_bad_registry_url_names_the_variable(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad URL stops at start-up, naming STREAMER_SCHEMA_REGISTRY_URL."""
    from streamer.errors import ConfigError
    from streamer.settings import load_settings

    monkeypatch.setenv("STREAMER_SCHEMA_REGISTRY_URL", url)
    with pytest.raises(ConfigError, match="STREAMER_SCHEMA_REGISTRY_URL"):
        load_settings()

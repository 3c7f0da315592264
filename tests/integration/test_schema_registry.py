"""`streamer run` on input written through a Schema Registry (a local stand-in, a real broker)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streamer.serde import TRANSACTION_SCHEMA, decode_verdict, encode_transaction
from streamer.synthetic import SyntheticWorld
from tests.conftest import Topics
from tests.integration.registry_standin import RegistryStandIn
from tests.integration.support import Record, read_all, run_scorer, scorer_env
from tests.registry_schemas import evolved_writer, incompatible_writer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class FramingProducer:
    """Produces records framed by confluent-kafka's AvroSerializer through the stand-in."""

    def __init__(self, bootstrap: str, topic: str, registry_url: str) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap})
        self._client = SchemaRegistryClient({"url": registry_url})
        self._topic = topic
        self._failures: list[str] = []

    def send(
        self, schema: dict[str, Any], records: list[dict[str, Any]], **serializer: Any
    ) -> list[bytes]:
        serialize = AvroSerializer(self._client, json.dumps(schema), conf=serializer or None)
        context = SerializationContext(self._topic, MessageField.VALUE)
        values = [serialize(record, context) or b"" for record in records]
        for record, value in zip(records, values, strict=True):
            self.send_raw(record["card_id"].encode(), value)
        return values

    def send_raw(self, key: bytes, value: bytes) -> None:
        self._producer.produce(self._topic, value, key, on_delivery=self._delivered)

    def _delivered(self, error: object, _message: object) -> None:
        if error is not None:
            self._failures.append(str(error))

    def flush(self) -> None:
        assert self._producer.flush(30) == 0
        assert not self._failures, self._failures


def _verdict_ids(records: list[Record]) -> Counter[str]:
    return Counter(decode_verdict(r.value or b"")["transaction_id"] for r in records)


class TestSchemaRegistryInput:
    def test_writers_resolved_incompatible_dead_lettered_outage_loses_nothing(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """Our schema, an evolved one and plain Avro are scored; an incompatible writer and an
        unknown id are dead-lettered naming the id; a registry outage costs a retry, not records.
        """
        records = [event.record for event in SyntheticWorld(23).generate(420)]
        ours, evolved, plain = records[:200], records[200:350], records[350:380]
        incompatible, unknown = records[380:400], records[400:]
        with RegistryStandIn() as registry:
            producer = FramingProducer(bootstrap_servers, topics.input, registry.url)
            ours_values = producer.send(TRANSACTION_SCHEMA, ours)
            producer.send(
                evolved_writer(),
                [
                    {**{k: v for k, v in r.items() if k != "card_avg_amount"}, "device_id": "d"}
                    for r in evolved
                ],
            )
            bad_values = producer.send(
                incompatible_writer(),
                [{**r, "amount": str(r["amount"])} for r in incompatible],
                **{"subject.name.strategy.type": "RECORD"},
            )
            for record in plain:
                producer.send_raw(record["card_id"].encode(), encode_transaction(record))
            for record in unknown:
                framed = b"\x00" + (777_777).to_bytes(4, "big") + encode_transaction(record)
                producer.send_raw(record["card_id"].encode(), framed)
            producer.flush()
            assert set(registry.subjects) == {f"{topics.input}-value", "streamer.Transaction"}
            ours_id = int.from_bytes(ours_values[0][1:5], "big")
            bad_id = int.from_bytes(bad_values[0][1:5], "big")

            # The scorer's first lookups fail (each lookup is three requests: two retries).
            registry.fail_next(6, 503)
            env = scorer_env(
                bootstrap_servers,
                topics,
                model_path,
                STREAMER_SCHEMA_REGISTRY_URL=registry.url,
                STREAMER_BATCH_SIZE="100",
            )
            result = run_scorer(env, until_idle=2.0)
            lookups = [path for method, path in registry.requests if "/schemas/ids/" in path]
        assert result.returncode == 0, result.stderr[-3000:]
        assert "schema registry unavailable, reading the batch again" in result.stderr

        verdicts = _verdict_ids(read_all(bootstrap_servers, topics.output))
        scored = {r["transaction_id"] for r in ours + evolved + plain}
        assert set(verdicts) == scored
        assert set(verdicts.values()) == {1}

        dead = read_all(bootstrap_servers, topics.dlq)
        inputs = {(r.partition, r.offset): r for r in read_all(bootstrap_servers, topics.input)}
        reasons: Counter[str] = Counter()
        for letter in dead:
            assert letter.headers["streamer.error.stage"] == "decode"
            source = (
                int(letter.headers["streamer.source.partition"]),
                int(letter.headers["streamer.source.offset"]),
            )
            assert letter.value == inputs[source].value  # the bytes as they came
            reason = letter.headers["streamer.error.reason"]
            if reason.startswith(f"schema id {bad_id} cannot be read as transaction.avsc"):
                reasons["incompatible"] += 1
            elif reason.startswith("schema id 777777 is not in the Schema Registry"):
                reasons["unknown"] += 1
            else:
                reasons[reason] += 1
        assert reasons == {"incompatible": len(incompatible), "unknown": len(unknown)}
        # Each id asked for until answered: 6 failed requests, then one per id (the unknown id
        # once: a "not found" is kept for a minute).
        assert len(lookups) == 6 + 4
        assert sum(f"/schemas/ids/{ours_id}" in path for path in lookups[6:]) == 1

    def test_framed_input_without_the_url_is_dead_lettered_as_framed(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """No STREAMER_SCHEMA_REGISTRY_URL: framed records go to the DLQ saying why."""
        records = [event.record for event in SyntheticWorld(29).generate(20)]
        with RegistryStandIn() as registry:
            producer = FramingProducer(bootstrap_servers, topics.input, registry.url)
            values = producer.send(TRANSACTION_SCHEMA, records[:10])
            for record in records[10:]:
                producer.send_raw(record["card_id"].encode(), encode_transaction(record))
            producer.flush()
        result = run_scorer(scorer_env(bootstrap_servers, topics, model_path), until_idle=2.0)
        assert result.returncode == 0, result.stderr[-3000:]
        verdicts = _verdict_ids(read_all(bootstrap_servers, topics.output))
        assert set(verdicts) == {r["transaction_id"] for r in records[10:]}
        dead = read_all(bootstrap_servers, topics.dlq)
        assert sorted(d.value or b"" for d in dead) == sorted(values)
        schema_id = int.from_bytes(values[0][1:5], "big")
        for letter in dead:
            reason = letter.headers["streamer.error.reason"]
            assert "looks framed for a Schema Registry" in reason
            assert f"schema id {schema_id})" in reason
            assert "STREAMER_SCHEMA_REGISTRY_URL" in reason

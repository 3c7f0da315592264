"""The scoring loop's hot path on stub messages: one verdict or one dead letter per record."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from confluent_kafka import KafkaError

from streamer.app import ScoringApp
from streamer.kafka.changelog import value_position
from streamer.model.scorer import Scorer
from streamer.serde import decode_verdict, encode_transaction
from streamer.settings import Settings
from streamer.synthetic import SyntheticWorld
from tests.unit.fakes import AppRig, RecordingProducer, app_on_fakes

INPUT = "transactions"


@dataclass
class StubMessage:
    """Satisfies `KafkaMessage`: what the consumer hands the loop."""

    _value: bytes | None
    _key: bytes | None
    _offset: int
    _partition: int = 0
    _error: KafkaError | None = None

    def topic(self) -> str:
        return INPUT

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> KafkaError | None:
        return self._error

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_767_225_600_000 + self._offset)


class FailingScorer:
    """A model that fails on any batch containing an amount above 1,000."""

    def __init__(self, real: Scorer) -> None:
        self._real = real
        self.name, self.version, self.threshold = real.name, real.version, real.threshold

    def score(self, features: np.ndarray) -> np.ndarray:
        if (features[:, 0] > math.log1p(1_000)).any():
            raise RuntimeError("model blew up")
        return self._real.score(features)


@pytest.fixture
def scorer(model_path: Path) -> Scorer:
    return Scorer.from_path(model_path)


def _rig(scorer: Any, producer: RecordingProducer | None = None) -> AppRig:
    return app_on_fakes(cast(Scorer, scorer), Settings(max_event_bytes=4096), producer)


def _app(scorer: Any, producer: RecordingProducer) -> ScoringApp:
    """A scorer on fakes (partition 0, at-least-once) that produces to `producer`."""
    return _rig(scorer, producer).app


def _good_messages(count: int, start_offset: int = 0) -> list[StubMessage]:
    events = SyntheticWorld(3).generate(count)
    return [
        StubMessage(encode_transaction(e.record), e.record["card_id"].encode(), start_offset + i)
        for i, e in enumerate(events)
    ]


class TestProcess:
    def test_one_verdict_per_good_record_with_source_headers(self, scorer: Scorer) -> None:
        """Good records become verdicts keyed by card, naming their source position."""
        producer = RecordingProducer()
        messages = _good_messages(50)
        _app(scorer, producer).process(messages)
        assert [p.topic for p in producer.produced] == ["fraud-verdicts"] * 50
        for message, produced in zip(messages, producer.produced, strict=True):
            verdict = decode_verdict(produced.value or b"")
            assert produced.key == message.key()
            assert produced.headers["streamer.source.offset"] == str(message.offset())
            assert produced.headers["streamer.source.topic"] == INPUT
            assert verdict["is_fraud"] == (verdict["score"] >= scorer.threshold)

    def test_bad_records_are_dead_lettered_and_the_rest_scored(self, scorer: Scorer) -> None:
        """A batch mixing bad and good input: each bad one to the DLQ, each good one scored."""
        producer = RecordingProducer()
        good = _good_messages(5)
        bad = [
            StubMessage(b"\xff\xfe", b"k", 100),
            StubMessage(None, b"k", 101),
            StubMessage(b"\x00" * 5000, b"k", 102),
            StubMessage(good[0].value(), None, 103),
        ]
        app = _app(scorer, producer)
        app.process([good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], *good[3:]])
        dead = [p for p in producer.produced if p.topic == "transactions-dlq"]
        stages = [
            (p.headers["streamer.source.offset"], p.headers["streamer.error.stage"]) for p in dead
        ]
        assert stages == [
            ("100", "decode"),
            ("101", "decode"),
            ("102", "decode"),
            ("103", "validate"),
        ]
        assert dead[1].value is None
        assert dead[2].value == b"\x00" * 5000
        assert "exceeds the limit of 4096 bytes" in dead[2].headers["streamer.error.reason"]
        assert sum(p.topic == "fraud-verdicts" for p in producer.produced) == 5
        assert app.counters.as_dict() == {
            "consumed": 9, "verdicts": 5, "dead_letters": 4, "flagged": app.counters.flagged,
            "aborted_transactions": 0,
        }  # fmt: skip

    def test_model_failure_isolates_the_record(self, scorer: Scorer) -> None:
        """When the model fails on a batch, only the record it fails on is dead-lettered (score)."""
        producer = RecordingProducer()
        messages = _good_messages(20)
        record = dict(SyntheticWorld(9).generate(1).__next__().record, amount=5_000.0)
        poison = StubMessage(encode_transaction(record), record["card_id"].encode(), 20)
        _app(FailingScorer(scorer), producer).process([*messages[:10], poison, *messages[10:]])
        dead = [p for p in producer.produced if p.topic == "transactions-dlq"]
        assert [
            (d.headers["streamer.source.offset"], d.headers["streamer.error.stage"]) for d in dead
        ] == [("20", "score")]
        assert sum(p.topic == "fraud-verdicts" for p in producer.produced) == 20

    def test_consumer_errors_are_not_records(self, scorer: Scorer) -> None:
        """A non-fatal error event in a batch produces nothing and counts nothing."""
        producer = RecordingProducer()
        error = StubMessage(None, None, -1, _error=KafkaError(KafkaError._TRANSPORT))
        app = _app(scorer, producer)
        app.process([error, *_good_messages(2)])
        assert app.counters.consumed == 2
        assert len(producer.produced) == 2


class TestCommitPosition:
    def test_outputs_are_produced_in_offset_order(self, scorer: Scorer) -> None:
        """Dead letters and verdicts leave in consume order, so the commit position reaches the
        end of the batch even when its last records are dead-lettered."""
        rig = _rig(scorer)
        messages = [
            StubMessage(b"\x00garbage", b"k", 0),
            *_good_messages(3, start_offset=1),
            StubMessage(None, b"k", 4),
            StubMessage(b"\x01", b"k", 5),
        ]
        rig.app.process(messages)
        sources = [int(p.headers["streamer.source.offset"]) for p in rig.producer.produced]
        assert sources == [0, 1, 2, 3, 4, 5]
        rig.app._checkpoint.maintain()
        rig.app._checkpoint.maintain()
        assert rig.consumer.committed_offsets == {(INPUT, 0): 6}


class TestState:
    def test_each_good_record_adds_to_its_card(self, scorer: Scorer) -> None:
        """After a batch, every scored card has a history holding its records; bad ones none."""
        rig = _rig(scorer)
        messages = _good_messages(40)
        bad = StubMessage(b"\xff", b"card-bad", 40)
        rig.app.process([*messages, bad])
        cards = {(m.key() or b"").decode() for m in messages}
        assert set(rig.store.values(0)) == cards
        assert rig.store.position(0) == 41

    def test_a_card_seen_before_is_scored_with_its_history(self, scorer: Scorer) -> None:
        """The same record scores differently once its card has history (the state is used)."""
        record = next(iter(SyntheticWorld(3).generate(1))).record
        first = dict(record, transaction_id="a", event_time=record["event_time"])
        second = dict(record, transaction_id="b", event_time=record["event_time"] + 60_000)
        key = record["card_id"].encode()
        cold, warm = _rig(scorer), _rig(scorer)
        warm.app.process([StubMessage(encode_transaction(first), key, 0)])
        warm.producer.produced.clear()
        message = StubMessage(encode_transaction(second), key, 1)
        cold.app.process([message])
        warm.app.process([message])
        cold_score = decode_verdict(cold.producer.produced[0].value or b"")["score"]
        warm_score = decode_verdict(warm.producer.produced[0].value or b"")["score"]
        assert cold_score != warm_score

    def test_commit_writes_each_changed_card_to_the_changelog(self, scorer: Scorer) -> None:
        """A commit puts one changelog record per changed card, at the batch's end position."""
        rig = _rig(scorer)
        messages = _good_messages(30)
        rig.app.process(messages)
        rig.app._checkpoint.maintain()
        changelog = [p for p in rig.producer.produced if p.topic == "changelog"]
        assert {p.key for p in changelog} == {m.key() for m in messages}
        assert {value_position(p.value or b"")[0] for p in changelog} == {30}
        assert all(p.partition == 0 for p in changelog)

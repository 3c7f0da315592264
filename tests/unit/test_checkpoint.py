"""Each checkpoint with fakes: what commits together, in which order, and what a failure undoes."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from streamer.errors import DeliveryFailedError, FencedError, KafkaFatalError
from streamer.headers import CHANGELOG_POSITION
from streamer.kafka import checkpoint as checkpoint_module
from streamer.kafka.changelog import value_position
from streamer.kafka.checkpoint import (
    EXPIRY_EVERY_MS,
    AtLeastOnce,
    Changelog,
    Checkpoint,
    ExactlyOnce,
)
from streamer.kafka.clients import ClientErrors, OutputProducer
from streamer.kafka.transactions import AbortableError, Transactions
from streamer.state.store import KeyedStore, StateCodec
from tests.unit.fakes import FakeConsumer, FakeTransactions, RecordingProducer

INPUT = "transactions"
OUTPUT = "verdicts"
CHANGELOG = "group-counts-changelog"
MODES = ("at-least-once", "exactly-once")

COUNTS: StateCodec[list[int]] = StateCodec(
    encode=lambda value: json.dumps(value).encode(),
    decode=lambda data: list(json.loads(data)),
    copy=list,
    expired=lambda value, now: False,
    expired_encoded=lambda data, now: False,
)
"""A store of per-key lists of offsets: what each key has seen."""


class Rig:
    """A checkpoint of one mode on fakes, and a way to push records through it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.events: list[tuple[Any, ...]] = []
        self.consumer = FakeConsumer(events=self.events)
        self.producer = RecordingProducer(events=self.events)
        # At-least-once: the changelog's own producer, as the scorer runs it (its events in the
        # same list, to check the order of the steps); exactly-once: the one producer.
        self.changelog_producer = (
            self.producer
            if mode == "exactly-once"
            else RecordingProducer(events=self.events, errors=ClientErrors("changelog producer"))
        )
        self.store: KeyedStore[list[int]] = KeyedStore(
            "counts", COUNTS, keep_undo=mode == "exactly-once"
        )
        for partition in (0, 1):
            self.store.assign(partition)
            self.consumer.assigned.append(TopicPartition(INPUT, partition))
        changelogs = [Changelog(self.store, CHANGELOG)]
        consumer = cast(Consumer, self.consumer)
        producer = cast(OutputProducer, self.producer)
        self.transactions = FakeTransactions(
            events=self.events, offsets=self.consumer.committed_offsets
        )
        self.checkpoint: Checkpoint
        if mode == "exactly-once":
            self.checkpoint = ExactlyOnce(
                consumer, producer, changelogs, 0.0, cast(Transactions, self.transactions)
            )
        else:
            self.checkpoint = AtLeastOnce(
                consumer,
                producer,
                changelogs,
                0.0,
                cast(OutputProducer, self.changelog_producer),
            )

    def feed(self, partition: int, offsets: range, key: str = "k", at: int | None = None) -> None:
        """Records `offsets` of `partition`, each adding its offset to `key`'s state, produced;
        `at`: their event time (the partition's stream time moves to it)."""
        sources = [(INPUT, partition, offset) for offset in offsets]
        keys = [key.encode()] * len(sources)
        view = self.store.checkout([partition] * len(sources), [key] * len(sources))
        value = view.setdefault(key, [])
        value.extend(offsets)
        self.store.checkin(
            view,
            [partition] * len(sources),
            [key] * len(sources),
            {partition: offsets[-1] + 1},
            {} if at is None else {partition: at},
        )
        outputs: list[bytes | None] = []
        callbacks = self.checkpoint.outputs(sources, keys, outputs)
        for (_, _, offset), callback in zip(sources, callbacks, strict=True):
            outputs.append(str(offset).encode())
            self.producer.produce(OUTPUT, key.encode(), outputs[-1], [], callback)
        self.checkpoint.processed(sources)

    def settle(self) -> None:
        """Turns of the loop with nothing new: at-least-once commits on the turn that finds the
        acknowledgements of its snapshot and of the outputs before it."""
        self.checkpoint.maintain()
        self.checkpoint.maintain()

    def changelog(self) -> list[tuple[int | None, bytes | None, bytes | None, str]]:
        """(partition, key, the store's value, position) of every changelog record produced:
        a value begins with its position, a tombstone has it in a header."""
        records: list[tuple[int | None, bytes | None, bytes | None, str]] = []
        for p in self.changelog_producer.produced:
            if p.topic != CHANGELOG:
                continue
            if p.value is None:
                records.append((p.partition, p.key, None, p.headers[CHANGELOG_POSITION]))
                continue
            position, value = value_position(p.value)
            assert position is not None, "a changelog value begins with its position"
            assert CHANGELOG_POSITION not in p.headers, "a value's position is not a header too"
            records.append((p.partition, p.key, value, str(position)))
        return records

    def forget_produced(self) -> None:
        """Forget what was produced so far (outputs and changelog records)."""
        self.producer.produced.clear()
        self.changelog_producer.produced.clear()

    def committed(self) -> list[tuple[Any, ...]]:
        return [event for event in self.events if event[0] == "commit"]


@pytest.fixture(params=MODES)
def rig(request: pytest.FixtureRequest) -> Rig:
    return Rig(request.param)


class TestCommit:
    def test_changelog_then_offsets(self, rig: Rig) -> None:
        """The state's changes are produced, then the offsets after them commit: at-least-once
        on a later turn, once everything before them is acknowledged, without waiting for it;
        exactly-once in one transaction."""
        rig.feed(0, range(0, 3))
        rig.feed(1, range(0, 2), key="j")
        rig.checkpoint.maintain()
        assert sorted(rig.changelog()) == [(0, b"k", b"[0, 1, 2]", "3"), (1, b"j", b"[0, 1]", "2")]
        last_changelog = max(i for i, e in enumerate(rig.events) if e == ("produce", CHANGELOG))
        if rig.mode == "at-least-once":
            assert rig.committed() == []  # nothing acknowledged yet
            rig.checkpoint.maintain()
            assert ("flush",) not in rig.events
        else:
            steps = [e[0] for e in rig.events if e[0] != "begin"]
            assert steps[-2:] == ["flush", "commit"]
            assert rig.events.index(("flush",)) > last_changelog
        assert rig.events.index(rig.committed()[0]) > last_changelog
        assert rig.committed() == [("commit", [(INPUT, 0, 3), (INPUT, 1, 2)])]
        assert not rig.checkpoint.pending

    def test_only_changed_keys_are_written_again(self, rig: Rig) -> None:
        """After a commit, the next one writes only the keys changed since."""
        rig.feed(0, range(0, 2))
        rig.feed(0, range(2, 3), key="other")
        rig.settle()
        rig.forget_produced()
        rig.feed(0, range(3, 4))
        rig.settle()
        assert rig.changelog() == [(0, b"k", b"[0, 1, 3]", "4")]

    def test_the_snapshot_keeps_values_as_they_were(self) -> None:
        """At-least-once: a record that changes a value of the snapshot being written does not
        change what the snapshot writes, and the offsets committed are the snapshot's."""
        rig = Rig("at-least-once")
        checkpoint = cast(AtLeastOnce, rig.checkpoint)
        rig.feed(0, range(0, 2))
        rig.feed(0, range(2, 3), key="other")
        checkpoint._begin_snapshot()  # as maintain does, before writing any of it
        rig.feed(0, range(3, 5))
        checkpoint.maintain()
        assert sorted(rig.changelog()) == [(0, b"k", b"[0, 1]", "3"), (0, b"other", b"[2]", "3")]
        checkpoint.maintain()
        assert rig.committed() == [("commit", [(INPUT, 0, 3)])]
        assert checkpoint.pending  # offsets 3 and 4 are in the next snapshot
        rig.settle()
        assert rig.changelog()[-1] == (0, b"k", b"[0, 1, 3, 4]", "5")
        assert rig.committed()[-1] == ("commit", [(INPUT, 0, 5)])

    def test_a_restored_partition_with_nothing_new_holds_nothing_up(self, rig: Rig) -> None:
        """A partition restored from its changelog and not scored since has a position but no
        outputs: the other partitions' offsets commit, and nothing stays pending."""
        rig.store.restore(1, [(b"j", b"[7]")])
        rig.store.restored(1, 8)
        rig.feed(0, range(0, 2))
        rig.settle()
        assert rig.committed() == [("commit", [(INPUT, 0, 2)])]
        assert not rig.checkpoint.pending

    @pytest.mark.parametrize("held", [OUTPUT, CHANGELOG])
    def test_offsets_wait_for_the_outputs_before_them(self, held: str) -> None:
        """At-least-once: a snapshot's offsets commit only once every output before them, and
        every changelog record of the snapshot (its own producer), is acknowledged, however
        long that takes."""
        rig = Rig("at-least-once")
        producer = rig.producer if held == OUTPUT else rig.changelog_producer
        producer.hold.add(held)
        rig.feed(0, range(0, 2))
        rig.settle()
        rig.settle()
        assert rig.committed() == []
        assert rig.checkpoint.pending
        producer.hold.clear()
        rig.settle()
        assert rig.committed() == [("commit", [(INPUT, 0, 2)])]

    def test_nothing_to_commit_commits_nothing(self, rig: Rig) -> None:
        """An idle checkpoint neither produces nor commits."""
        rig.checkpoint.maintain()
        assert rig.committed() == []
        assert not rig.checkpoint.pending

    def test_revoke_commits_then_drops_the_state(self, rig: Rig) -> None:
        """Partitions taken away are committed first, then their state is forgotten."""
        rig.feed(0, range(0, 2))
        rig.checkpoint.revoke([(INPUT, 0), (INPUT, 1)])
        assert rig.committed() == [("commit", [(INPUT, 0, 2)])]
        assert rig.store.partitions == []


class TestChangelogProducer:
    """At-least-once writes the changelog with a producer of its own: a verdict never waits
    behind a request of changelog records (one request in flight per broker)."""

    def test_outputs_and_changelog_go_each_to_its_producer(self) -> None:
        rig = Rig("at-least-once")
        rig.feed(0, range(0, 2))
        rig.settle()
        assert {p.topic for p in rig.producer.produced} == {OUTPUT}
        assert {p.topic for p in rig.changelog_producer.produced} == {CHANGELOG}
        assert rig.committed() == [("commit", [(INPUT, 0, 2)])]

    def test_commit_flushes_both_producers(self) -> None:
        """A revoke (or the stop) waits for the changelog producer as for the outputs'."""
        rig = Rig("at-least-once")
        rig.feed(0, range(0, 3))
        assert cast(AtLeastOnce, rig.checkpoint).commit()
        assert rig.changelog_producer.pending == []
        assert rig.producer.pending == []
        assert rig.consumer.committed_offsets == {(INPUT, 0): 3}

    def test_a_fatal_changelog_producer_stops_the_scorer_and_is_named(self) -> None:
        rig = Rig("at-least-once")
        assert [name for name, _ in rig.checkpoint.producer_errors] == [
            "producer",
            "changelog producer",
        ]
        rig.changelog_producer.errors.fatal = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
        rig.feed(0, range(0, 2))
        with pytest.raises(KafkaFatalError):
            rig.checkpoint.maintain()
        assert rig.committed() == []


class TestExpiry:
    def test_a_sweep_goes_a_slice_a_turn_and_its_deletes_commit(
        self, rig: Rig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An hour of stream time on, a partition's idle keys are swept a slice per turn of the
        loop, and their tombstones commit like any change (exactly-once: in the open
        transaction)."""
        monkeypatch.setattr(checkpoint_module, "SWEEP_SLICE_KEYS", 2)
        monkeypatch.setattr(checkpoint_module, "SWEEP_SECONDS", 0.0)
        monkeypatch.setattr(checkpoint_module, "SWEEP_MIN_SECONDS", 0.0)
        rig.store.codec = replace(COUNTS, expired=lambda value, now: value[-1] < 5)
        for offset, key in enumerate("abc"):
            rig.feed(0, range(offset, offset + 1), key=key, at=0)
        rig.settle()
        rig.forget_produced()
        rig.feed(0, range(10, 11), at=EXPIRY_EVERY_MS)
        rig.checkpoint.maintain()
        assert rig.store.sweeping(0), "four keys, two a turn: the sweep goes on"
        rig.feed(0, range(11, 12), at=EXPIRY_EVERY_MS)
        rig.settle()
        rig.settle()
        assert not rig.store.sweeping(0)
        assert set(rig.store.values(0)) == {"k"}
        tombstones = [key for _, key, value, _ in rig.changelog() if value is None]
        assert sorted(tombstones, key=repr) == [b"a", b"b", b"c"]
        assert (INPUT, 0, 12) in rig.committed()[-1][1]
        assert not rig.checkpoint.pending

    def test_sweeps_wait_for_the_clock_when_stream_time_runs_ahead(
        self, rig: Rig, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Hours of stream time in a moment (a backlog, a replay) start no sweep before
        `SWEEP_MIN_SECONDS` of the clock have passed since the partition was first seen."""
        rig.store.codec = replace(COUNTS, expired=lambda value, now: value[-1] < 5)
        for offset, key in enumerate("abc"):
            rig.feed(0, range(offset, offset + 1), key=key, at=0)
        rig.settle()
        for hours in range(1, 4):
            rig.feed(0, range(9 + hours, 10 + hours), at=hours * EXPIRY_EVERY_MS)
            rig.settle()
            assert not rig.store.sweeping(0)
            assert {"a", "b", "c"} <= set(rig.store.values(0))
        monkeypatch.setattr(checkpoint_module, "SWEEP_MIN_SECONDS", 0.0)
        rig.feed(0, range(13, 14), at=4 * EXPIRY_EVERY_MS)
        rig.settle()
        assert set(rig.store.values(0)) == {"k"}


class TestFailure:
    def test_at_least_once_refused_output_stops_before_it(self) -> None:
        """A refused verdict stops the scorer; no offset at or after it is committed."""
        rig = Rig("at-least-once")
        rig.feed(0, range(0, 2))
        rig.settle()
        rig.producer.refuse.add(OUTPUT)
        rig.feed(0, range(2, 4))
        with pytest.raises(DeliveryFailedError, match=r"transactions\[0\]@2"):
            rig.checkpoint.maintain()
        assert rig.consumer.committed_offsets == {(INPUT, 0): 2}

    def test_at_least_once_refused_changelog_commits_nothing(self) -> None:
        """A refused changelog record stops the scorer before the offsets it covers commit."""
        rig = Rig("at-least-once")
        rig.changelog_producer.refuse.add(CHANGELOG)
        rig.feed(0, range(0, 2))
        with pytest.raises(DeliveryFailedError):
            rig.settle()
        assert rig.committed() == []

    def test_exactly_once_refused_output_aborts_rolls_back_and_rewinds(self) -> None:
        """An abort takes the state's changes back and rewinds to the committed offsets."""
        rig = Rig("exactly-once")
        rig.feed(0, range(0, 2))
        rig.checkpoint.maintain()
        rig.producer.refuse.add(OUTPUT)
        rig.producer.refuse_error = KafkaError(KafkaError._MSG_TIMED_OUT)
        rig.feed(0, range(2, 4))
        rig.feed(1, range(0, 1), key="new")
        rig.checkpoint.maintain()
        assert [e[0] for e in rig.events].count("abort") == 1
        assert rig.store.values(0) == {"k": [0, 1]}
        assert rig.store.values(1) == {}
        assert rig.store.position(0) == 2
        assert rig.consumer.seeks == [(INPUT, 0, 2), (INPUT, 1, -2)]
        assert rig.checkpoint.aborted == 1

    def test_exactly_once_abortable_commit_rolls_back(self) -> None:
        """A commit the coordinator refuses as abortable aborts, rolls back and rewinds."""
        rig = Rig("exactly-once")
        rig.feed(0, range(0, 2))
        error = KafkaError(KafkaError.INVALID_TXN_STATE)
        rig.transactions.commit_raises = AbortableError(error, "commit_transaction")
        rig.checkpoint.maintain()
        assert rig.store.values(0) == {}
        assert rig.store.position(0) is None
        assert rig.consumer.seeks == [(INPUT, 0, -2), (INPUT, 1, -2)]

    def test_exactly_once_fenced_commit_stops(self) -> None:
        """A fenced producer stops the scorer: nothing of the transaction is kept."""
        rig = Rig("exactly-once")
        rig.feed(0, range(0, 2))
        rig.transactions.commit_raises = FencedError("another producer took over")
        with pytest.raises(FencedError):
            rig.checkpoint.maintain()
        assert rig.committed() == []

    def test_lost_partitions_commit_nothing(self, rig: Rig) -> None:
        """Partitions the group already gave away: no commit, state dropped; exactly-once stops."""
        rig.feed(0, range(0, 2))
        rig.checkpoint.lose([(INPUT, 0), (INPUT, 1)])
        assert rig.committed() == []
        assert rig.store.partitions == []
        if isinstance(rig.checkpoint, ExactlyOnce):
            assert isinstance(rig.checkpoint.callback_error, FencedError)
            assert [e[0] for e in rig.events].count("abort") == 1
        else:
            assert rig.checkpoint.callback_error is None

    def test_close_on_error(self, rig: Rig) -> None:
        """Stopping on an error: at-least-once commits what is acknowledged, exactly-once aborts."""
        rig.feed(0, range(0, 2))
        rig.checkpoint.close(clean=False)
        if isinstance(rig.checkpoint, ExactlyOnce):
            assert rig.committed() == []
            assert [e[0] for e in rig.events].count("abort") == 1
        else:
            assert rig.committed() == [("commit", [(INPUT, 0, 2)])]


def lose_brokers(errors: ClientErrors) -> None:
    """What librdkafka's error callback reports once a client has no broker left."""
    errors(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))


class TestEveryBrokerDown:
    """Exactly-once while a client has every broker down: the transaction waits, open."""

    def test_no_commit_is_begun_until_a_broker_answers(self) -> None:
        rig = Rig("exactly-once")
        rig.feed(0, range(0, 2))
        lose_brokers(rig.producer.errors)
        rig.checkpoint.maintain()
        rig.feed(0, range(2, 3))
        rig.checkpoint.maintain()
        assert [e[0] for e in rig.events if e[0] in ("flush", "commit", "abort")] == []
        assert rig.checkpoint.pending
        assert rig.store.position(0) == 3  # the state keeps what the open transaction holds

        rig.producer.errors.reachable()  # what the loop's probe does once a broker answers
        rig.checkpoint.maintain()
        assert rig.committed() == [("commit", [(INPUT, 0, 3)])]
        assert rig.checkpoint.aborted == 0

    def test_an_output_that_timed_out_meanwhile_aborts_once_a_broker_answers(self) -> None:
        """An abort the returning coordinator has no record of is refused as fatal: it waits."""
        rig = Rig("exactly-once")
        rig.feed(0, range(0, 2))
        rig.checkpoint.maintain()
        lose_brokers(rig.producer.errors)
        rig.producer.refuse.add(OUTPUT)
        rig.producer.refuse_error = KafkaError(KafkaError._MSG_TIMED_OUT)
        rig.feed(0, range(2, 4))
        rig.checkpoint.maintain()
        assert rig.checkpoint.aborted == 0
        rig.producer.errors.reachable()
        rig.checkpoint.maintain()
        assert rig.checkpoint.aborted == 1
        assert rig.store.values(0) == {"k": [0, 1]}
        assert (INPUT, 0, 2) in rig.consumer.seeks

    def test_the_consumer_having_every_broker_down_holds_it_too(self) -> None:
        rig = Rig("exactly-once")
        consumer_errors = ClientErrors("consumer")
        rig.checkpoint = ExactlyOnce(
            cast(Consumer, rig.consumer),
            cast(OutputProducer, rig.producer),
            [Changelog(rig.store, CHANGELOG)],
            0.0,
            cast(Transactions, rig.transactions),
            consumer_errors,
        )
        rig.feed(0, range(0, 2))
        lose_brokers(consumer_errors)
        rig.checkpoint.maintain()
        assert rig.committed() == []
        consumer_errors.reachable()
        rig.checkpoint.maintain()
        assert rig.committed() == [("commit", [(INPUT, 0, 2)])]

    def test_brokers_lost_while_waiting_for_outputs_leave_it_open(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The wait for acknowledgements ends when every broker goes: no abort after
        `FLUSH_SECONDS`, the transaction stays open and commits once they are back."""
        rig = Rig("exactly-once")
        rig.producer.hold.add(OUTPUT)
        rig.feed(0, range(0, 2))
        flush = rig.producer.flush

        def flush_losing_brokers(timeout: float) -> int:
            lose_brokers(rig.producer.errors)  # librdkafka's error callback, served by flush
            return flush(timeout)

        monkeypatch.setattr(rig.producer, "flush", flush_losing_brokers)
        rig.checkpoint.maintain()
        assert rig.committed() == []
        assert rig.checkpoint.aborted == 0
        assert rig.checkpoint.pending

        monkeypatch.setattr(rig.producer, "flush", flush)
        rig.producer.hold.clear()
        rig.producer.errors.reachable()
        rig.checkpoint.maintain()
        assert rig.committed() == [("commit", [(INPUT, 0, 2)])]

    def test_a_clean_stop_meanwhile_commits_nothing(self) -> None:
        rig = Rig("exactly-once")
        rig.feed(0, range(0, 2))
        lose_brokers(rig.producer.errors)
        rig.checkpoint.close(clean=True)
        assert [e[0] for e in rig.events if e[0] in ("commit", "abort")] == []

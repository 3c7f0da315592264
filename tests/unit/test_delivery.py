"""The commit position never passes an output the broker has not acknowledged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

from streamer.kafka.delivery import DeliveryTracker

TOPIC = "transactions"
Callback = Callable[[KafkaError | None], None]


def _track(tracker: DeliveryTracker, partition: int, offsets: range) -> dict[int, object]:
    return {offset: tracker.track(TOPIC, partition, offset) for offset in offsets}


class TestDeliveryTracker:
    def test_in_order_acknowledgements_advance_the_position(self) -> None:
        """Each acknowledgement in order moves the position to the next offset."""
        tracker = DeliveryTracker()
        callbacks = _track(tracker, 0, range(10, 13))
        for offset in (10, 11, 12):
            callbacks[offset](None, None)  # type: ignore[operator]
        assert tracker.take_advanced() == [(TOPIC, 0, 13)]
        assert tracker.in_flight() == 0

    def test_out_of_order_acknowledgement_waits_for_the_gap(self) -> None:
        """A later offset acknowledged first does not move the position past an earlier one."""
        tracker = DeliveryTracker()
        callbacks = _track(tracker, 0, range(5))
        callbacks[3](None, None)  # type: ignore[operator]
        callbacks[4](None, None)  # type: ignore[operator]
        assert tracker.take_advanced() == []
        callbacks[0](None, None)  # type: ignore[operator]
        assert tracker.take_advanced() == [(TOPIC, 0, 1)]
        callbacks[2](None, None)  # type: ignore[operator]
        assert tracker.take_advanced() == []
        callbacks[1](None, None)  # type: ignore[operator]
        assert tracker.take_advanced() == [(TOPIC, 0, 5)]

    def test_failed_delivery_blocks_the_position_for_good(self) -> None:
        """A failure is recorded and no later acknowledgement moves the position past it."""
        tracker = DeliveryTracker()
        callbacks = _track(tracker, 0, range(3))
        callbacks[0](None, None)  # type: ignore[operator]
        callbacks[1](KafkaError(KafkaError._MSG_TIMED_OUT), None)  # type: ignore[operator]
        callbacks[2](None, None)  # type: ignore[operator]
        assert tracker.positions() == [(TOPIC, 0, 1)]
        assert [(f.partition, f.offset) for f in tracker.failures] == [(0, 1)]

    def test_partitions_are_independent(self) -> None:
        """A gap in one partition does not hold back another."""
        tracker = DeliveryTracker()
        p0 = _track(tracker, 0, range(2))
        p1 = _track(tracker, 1, range(100, 102))
        p1[100](None, None)  # type: ignore[operator]
        p1[101](None, None)  # type: ignore[operator]
        p0[1](None, None)  # type: ignore[operator]
        assert tracker.positions() == [(TOPIC, 1, 102)]

    def test_offset_gaps_from_compaction_are_fine(self) -> None:
        """Offsets need not be contiguous; the position is the last acknowledged plus one."""
        tracker = DeliveryTracker()
        callbacks = _track(tracker, 0, range(0, 30, 10))
        for offset in (20, 0, 10):
            callbacks[offset](None, None)  # type: ignore[operator]
        assert tracker.positions() == [(TOPIC, 0, 21)]

    def test_forgotten_partition_ignores_late_acknowledgements(self) -> None:
        """After a revoke the partition's late reports change nothing and raise nothing."""
        tracker = DeliveryTracker()
        callbacks = _track(tracker, 0, range(2))
        tracker.forget([(TOPIC, 0)])
        callbacks[0](None, None)  # type: ignore[operator]
        assert tracker.positions() == []
        assert tracker.in_flight() == 0


FAILED = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)


class Delivered:
    """What a delivery report carries of an output: its key and value (not its headers)."""

    def __init__(self, key: bytes | None, value: bytes | None) -> None:
        self._key, self._value = key, value

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value


def _output(offset: int) -> Delivered:
    return Delivered(b"card-%d" % (offset % 3), b"verdict-%d" % offset)


def _batch(tracker: DeliveryTracker, partition: int, offsets: range) -> dict[int, Callback]:
    """Tracks a batch of one partition; each callback is handed that record's output."""
    sources = [(TOPIC, partition, offset) for offset in offsets]
    outputs = [_output(offset) for offset in offsets]
    callbacks = tracker.track_batch(
        sources, [o.key() for o in outputs], [o.value() for o in outputs]
    )
    return {
        offset: _reporting(callback, output)
        for offset, callback, output in zip(offsets, callbacks, outputs, strict=True)
    }


def _reporting(callback: Callable[[Any, Any], None], output: Delivered) -> Callback:
    return lambda error: callback(error, output)


class TestBatches:
    def test_a_batch_advances_the_position_once_every_output_is_acknowledged(self) -> None:
        """A batch's records of one partition move the position together, past the last one."""
        tracker = DeliveryTracker()
        callbacks = _batch(tracker, 0, range(10, 13))
        callbacks[12](None)
        callbacks[10](None)
        assert tracker.take_advanced() == []
        assert tracker.in_flight() == 1
        callbacks[11](None)
        assert tracker.take_advanced() == [(TOPIC, 0, 13)]
        assert tracker.in_flight() == 0
        assert tracker.acknowledged_total == 3

    def test_a_batch_shares_one_callback_per_partition(self) -> None:
        """Nothing callable is built per record."""
        tracker = DeliveryTracker()
        sources = [(TOPIC, 0, 0), (TOPIC, 1, 50), (TOPIC, 0, 1)]
        callbacks = tracker.track_batch(sources, [None] * 3, [None] * 3)
        assert callbacks[0] is callbacks[2]
        assert callbacks[0] is not callbacks[1]

    def test_a_later_batch_waits_for_an_earlier_one(self) -> None:
        """Batches of one partition settle in any order; the position follows consume order."""
        tracker = DeliveryTracker()
        first = _batch(tracker, 0, range(2))
        second = _batch(tracker, 0, range(2, 4))
        for callback in second.values():
            callback(None)
        assert tracker.positions() == []
        first[0](None)
        assert tracker.positions() == []
        first[1](None)
        assert tracker.positions() == [(TOPIC, 0, 4)]

    def test_a_failure_stops_the_position_in_front_of_its_record_for_good(self) -> None:
        """The failure is named by its output's key and value; the position stops there."""
        tracker = DeliveryTracker()
        callbacks = _batch(tracker, 0, range(5, 9))
        later = _batch(tracker, 0, range(9, 10))
        later[9](None)
        callbacks[5](None)
        callbacks[7](FAILED)
        callbacks[8](None)
        assert tracker.positions() == []
        callbacks[6](None)
        assert tracker.positions() == [(TOPIC, 0, 7)]
        assert [(f.topic, f.partition, f.offset) for f in tracker.failures] == [(TOPIC, 0, 7)]
        assert tracker.in_flight() == 1

    def test_identical_outputs_are_named_earliest_first(self) -> None:
        """Of failed outputs equal in key and value, each failure names the next earliest."""
        tracker = DeliveryTracker()
        sources = [(TOPIC, 0, offset) for offset in range(4)]
        keys = [b"k", b"k", b"other", b"k"]
        values = [b"same", b"same", b"same", b"same"]
        callbacks = tracker.track_batch(sources, keys, values)
        callbacks[3](FAILED, Delivered(b"k", b"same"))
        callbacks[1](FAILED, Delivered(b"k", b"same"))
        assert [f.offset for f in tracker.failures] == [0, 1]

    def test_a_failure_at_the_start_of_a_batch_keeps_the_previous_position(self) -> None:
        """Nothing of the batch is committed when its first output failed."""
        tracker = DeliveryTracker()
        _batch(tracker, 0, range(1))[0](None)
        callbacks = _batch(tracker, 0, range(1, 3))
        callbacks[1](FAILED)
        callbacks[2](None)
        assert tracker.positions() == [(TOPIC, 0, 1)]

    def test_an_unnamed_failure_blocks_the_whole_batch(self) -> None:
        """A failure matching no output of its batch keeps the position before the batch."""
        tracker = DeliveryTracker()
        callbacks = tracker.track_batch([(TOPIC, 0, 3), (TOPIC, 0, 4)], [b"k"] * 2, [b"v"] * 2)
        callbacks[1](None, None)
        callbacks[0](FAILED, Delivered(b"k", b"unknown"))
        assert tracker.positions() == []
        assert [f.offset for f in tracker.failures] == [3]

    def test_partitions_of_one_batch_are_independent(self) -> None:
        """A batch interleaving partitions: each partition's position follows its own records."""
        tracker = DeliveryTracker()
        sources = [(TOPIC, 0, 0), (TOPIC, 1, 50), (TOPIC, 0, 1), (TOPIC, 1, 51), (TOPIC, 0, 2)]
        callbacks = tracker.track_batch(sources, [None] * 5, [None] * 5)
        for callback in callbacks[1::2]:
            callback(None, None)
        assert tracker.positions() == [(TOPIC, 1, 52)]
        for callback in callbacks[::2]:
            callback(None, None)
        assert sorted(tracker.positions()) == [(TOPIC, 0, 3), (TOPIC, 1, 52)]

    def test_forgotten_partition_ignores_a_late_batch(self) -> None:
        """After a revoke the reports of a batch change nothing and raise nothing."""
        tracker = DeliveryTracker()
        callbacks = _batch(tracker, 0, range(2))
        tracker.forget([(TOPIC, 0)])
        for callback in callbacks.values():
            callback(None)
        assert tracker.positions() == []
        assert tracker.take_advanced() == []


class TestFailureCallback:
    def test_a_failed_output_names_its_input_record(self) -> None:
        """Exactly-once: a failure report names the input record; there is no position."""
        tracker = DeliveryTracker()
        sources = [(TOPIC, 3, 41), (TOPIC, 3, 42)]
        callback = tracker.failure_callback(sources, [b"a", b"b"], [b"v", b"v"])
        callback(FAILED, Delivered(b"b", b"v"))
        assert [(f.topic, f.partition, f.offset, f.error) for f in tracker.failures] == [
            (TOPIC, 3, 42, FAILED)
        ]
        assert tracker.positions() == []
        assert tracker.in_flight() == 0

    def test_a_success_report_is_ignored(self) -> None:
        """Should a success be reported anyway, nothing is recorded."""
        tracker = DeliveryTracker()
        tracker.failure_callback([(TOPIC, 0, 1)], [b"a"], [b"v"])(None, Delivered(b"a", b"v"))
        assert tracker.failures == []

    def test_an_unnamed_failure_is_still_recorded(self) -> None:
        """A callback never raises; a failure it cannot name still aborts the transaction."""
        tracker = DeliveryTracker()
        tracker.failure_callback([(TOPIC, 0, 1)], [b"a"], [b"v"])(FAILED, None)
        assert [(f.topic, f.partition, f.offset) for f in tracker.failures] == [("?", -1, -1)]

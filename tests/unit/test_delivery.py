"""The commit position never passes an output the broker has not acknowledged."""

from __future__ import annotations

from confluent_kafka import KafkaError

from streamer.kafka.delivery import DeliveryTracker

TOPIC = "transactions"


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

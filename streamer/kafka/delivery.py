"""Which input offsets are safe to commit, given output deliveries acknowledged out of order.

An input record's offset may be committed only once the record it produced (verdict or dead
letter) *and every earlier record of the same partition* have been acknowledged by the broker.
Delivery reports can arrive out of offset order (different output partitions, retries), so per
partition we keep the offsets in consume order and advance the commit position over the
contiguous acknowledged prefix only. A failed delivery is never acknowledged: the position stops
in front of it for good, and the scorer stops.

Not thread-safe: librdkafka serves delivery reports on the thread that calls `poll`/`flush`,
which is the scorer's main thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError

Partition = tuple[str, int]
"""(topic, partition) of an input record."""


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """An output the broker did not acknowledge, and the input record it was for."""

    topic: str
    partition: int
    offset: int
    error: KafkaError


@dataclass(slots=True)
class _PartitionState:
    in_flight: deque[int] = field(default_factory=deque)
    acknowledged: set[int] = field(default_factory=set)
    position: int | None = None
    """The next offset to consume after the acknowledged prefix: what a commit would store."""


class DeliveryTracker:
    """Tracks in-flight outputs per input partition and the offsets that are safe to commit."""

    def __init__(self) -> None:
        self._partitions: dict[Partition, _PartitionState] = {}
        self._advanced: set[Partition] = set()
        self.failures: list[DeliveryFailure] = []
        self.acknowledged_total = 0

    def track(self, topic: str, partition: int, offset: int) -> Callable[[Any, Any], None]:
        """Register an input record whose output is about to be produced.

        Returns the delivery callback to hand to `produce`. Offsets of one partition must be
        tracked in increasing order (the order the consumer returns them in).
        """
        key = (topic, partition)
        state = self._partitions.get(key)
        if state is None:
            state = self._partitions[key] = _PartitionState()
        state.in_flight.append(offset)

        def on_delivery(error: KafkaError | None, _message: Any) -> None:
            # Runs inside librdkafka's poll/flush: record only, never raise.
            if error is None:
                self._acknowledge(key, offset)
            else:
                self.failures.append(DeliveryFailure(topic, partition, offset, error))

        return on_delivery

    def _acknowledge(self, key: Partition, offset: int) -> None:
        self.acknowledged_total += 1
        state = self._partitions.get(key)
        if state is None:  # partition forgotten after a revoke; its commit is already decided
            return
        in_flight = state.in_flight
        if not in_flight or in_flight[0] != offset:
            state.acknowledged.add(offset)  # an earlier record is still in flight
            return
        in_flight.popleft()
        last = offset
        acknowledged = state.acknowledged
        while in_flight and in_flight[0] in acknowledged:
            last = in_flight.popleft()
            acknowledged.discard(last)
        state.position = last + 1
        self._advanced.add(key)

    def take_advanced(self) -> list[tuple[str, int, int]]:
        """(topic, partition, position) for each partition whose position moved since last call."""
        advanced = []
        for key in self._advanced:
            state = self._partitions.get(key)
            if state is not None and state.position is not None:
                advanced.append((key[0], key[1], state.position))
        self._advanced.clear()
        return advanced

    def positions(
        self, partitions: Iterable[Partition] | None = None
    ) -> list[tuple[str, int, int]]:
        """Safe commit positions of the given partitions (default: all tracked ones)."""
        keys = self._partitions.keys() if partitions is None else partitions
        result = []
        for key in keys:
            state = self._partitions.get(key)
            if state is not None and state.position is not None:
                result.append((key[0], key[1], state.position))
        return result

    def in_flight(self) -> int:
        """How many tracked records still wait for their acknowledgement."""
        return sum(len(state.in_flight) for state in self._partitions.values())

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Drop the state of partitions this consumer no longer owns."""
        for key in partitions:
            self._partitions.pop(key, None)
            self._advanced.discard(key)

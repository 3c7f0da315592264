"""Which input offsets are safe to commit, given output deliveries acknowledged out of order.

An input record's offset may be committed only once the record it produced (verdict or dead
letter) *and every earlier record of the same partition* have been acknowledged by the broker.
Delivery reports can arrive out of offset order (different output partitions, retries), so per
partition we keep runs of offsets in consume order and advance the commit position over the
contiguous prefix of runs whose every output is acknowledged. A failed delivery is never
acknowledged: the position stops in front of it for good, and the scorer stops.

A run is the records of one input partition in one polled batch (`track_batch`), and its outputs
share one delivery callback, a bound method of the run: nothing is built per record (a callable
per record costs microseconds, mostly in the garbage collector, at tens of thousands of records a
second), and an acknowledgement counts the run down. The position moves by whole runs, so a
commit may trail the acknowledgements by up to one batch per partition; once every run is settled
(after a flush) the position is the one per-record tracking would give. A failure report carries
the output's key and value but not its headers, so the run names the input record by matching
them against the batch's outputs; of outputs identical in key and value the earliest not yet
named is taken, which keeps the position in front of the failed one.

Exactly-once needs no positions: a transaction commits only once every output is delivered. Its
producer reports failures only (`delivery.report.only.error`), to `failure_callback`.

Not thread-safe: librdkafka serves delivery reports on the thread that calls `poll`/`flush`,
which is the scorer's main thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError

Partition = tuple[str, int]
"""(topic, partition) of an input record."""

Source = tuple[str, int, int]
"""(topic, partition, offset) of an input record."""

DeliveryCallback = Callable[[Any, Any], None]
"""What `produce` takes as `on_delivery`: called with (error or None, delivered message)."""


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """An output the broker did not acknowledge, and the input record it was for."""

    topic: str
    partition: int
    offset: int
    error: KafkaError


class _Batch:
    """A polled batch's records and outputs, in consume order, to name the input of a failure."""

    __slots__ = ("keys", "named", "sources", "values")

    def __init__(
        self,
        sources: Sequence[Source],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> None:
        self.sources = sources
        self.keys = keys
        self.values = values
        self.named: set[int] = set()

    def name(self, message: Any, partition: Partition | None) -> Source | None:
        """The input record of a failed output (of `partition`'s records, if given), or None."""
        try:
            key, value = message.key(), message.value()
        except Exception:  # called in a delivery callback, which must not raise
            return None
        sources, keys, values, named = self.sources, self.keys, self.values, self.named
        for index in range(min(len(sources), len(keys), len(values))):
            source = sources[index]
            if (
                index not in named
                and keys[index] == key
                and values[index] == value
                and (partition is None or source[:2] == partition)
            ):
                named.add(index)
                return source
        return None


class _Run:
    """The records of one input partition in one batch, in consume order."""

    __slots__ = ("batch", "failed", "first", "key", "last", "pending", "tracker")

    def __init__(self, tracker: DeliveryTracker, batch: _Batch, key: Partition, first: int) -> None:
        self.tracker = tracker
        self.batch = batch
        self.key = key
        self.first = first
        self.last = first
        self.pending = 0
        """Outputs not yet reported delivered or failed."""
        self.failed: list[int] = []
        """Input offsets whose output failed."""

    def on_delivery(self, error: KafkaError | None, message: Any) -> None:
        # Runs inside librdkafka's poll/flush: record only, never raise.
        tracker = self.tracker
        if error is None:
            tracker.acknowledged_total += 1
        else:
            if self.first == self.last:
                offset = self.first
            else:
                source = self.batch.name(message, self.key)
                # Unnamed (cannot happen for outputs of this batch): the run's first record
                # keeps the position where it is.
                offset = self.first if source is None else source[2]
            self.failed.append(offset)
            tracker.failures.append(DeliveryFailure(self.key[0], self.key[1], offset, error))
        self.pending -= 1
        if self.pending == 0:
            tracker._settled(self)


class _FailureNamer:
    """Exactly-once: records a failed output of a batch in its tracker, named by its input."""

    __slots__ = ("batch", "tracker")

    def __init__(self, tracker: DeliveryTracker, batch: _Batch) -> None:
        self.tracker = tracker
        self.batch = batch

    def on_delivery(self, error: KafkaError | None, message: Any) -> None:
        # Runs inside librdkafka's poll/flush: record only, never raise.
        if error is None:
            return
        source = self.batch.name(message, None)
        topic, partition, offset = ("?", -1, -1) if source is None else source
        self.tracker.failures.append(DeliveryFailure(topic, partition, offset, error))


@dataclass(slots=True)
class _PartitionState:
    runs: deque[_Run] = field(default_factory=deque)
    position: int | None = None
    """The next offset to consume after the acknowledged prefix: what a commit would store."""


class DeliveryTracker:
    """Tracks in-flight outputs per input partition and the offsets that are safe to commit."""

    def __init__(self) -> None:
        self._partitions: dict[Partition, _PartitionState] = {}
        self._advanced: set[Partition] = set()
        self.failures: list[DeliveryFailure] = []
        self.acknowledged_total = 0

    def track(self, topic: str, partition: int, offset: int) -> DeliveryCallback:
        """Register an input record whose output is about to be produced.

        Returns the delivery callback to hand to `produce`. Offsets of one partition must be
        tracked in increasing order (the order the consumer returns them in).
        """
        return self.track_batch([(topic, partition, offset)], [None], [None])[0]

    def track_batch(
        self,
        sources: Sequence[Source],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> list[DeliveryCallback]:
        """Register a polled batch's records, whose outputs are about to be produced, one each.

        `sources`: each record's (topic, partition, offset), in consume order; offsets of one
        partition must increase, batch after batch. `keys` and `values`: each record's output
        key and value, in the same order, to name the input of a failed output; `values` may be
        a list the caller fills as it produces. Returns each record's delivery callback, in
        order: one per partition of the batch, repeated.
        """
        batch = _Batch(sources, keys, values)
        runs: dict[Partition, tuple[_Run, DeliveryCallback]] = {}
        callbacks = []
        for topic, partition, offset in sources:
            found = runs.get((topic, partition))
            if found is None:
                key = (topic, partition)
                run = _Run(self, batch, key, offset)
                # One bound method per run: each attribute access would build another.
                found = runs[key] = (run, run.on_delivery)
                state = self._partitions.get(key)
                if state is None:
                    state = self._partitions[key] = _PartitionState()
                state.runs.append(run)
            run, on_delivery = found
            run.last = offset
            run.pending += 1
            callbacks.append(on_delivery)
        return callbacks

    def failure_callback(
        self,
        sources: Sequence[Source],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> DeliveryCallback:
        """Exactly-once: the delivery callback of a batch's outputs, recording failures only.

        For a producer with `delivery.report.only.error`, which reports failures only; nothing
        is tracked and there is no position. `sources`, `keys` and `values` as for
        `track_batch`. Use one tracker per transaction, so a late report of an aborted one stays
        out of the next.
        """
        return _FailureNamer(self, _Batch(sources, keys, values)).on_delivery

    def _settled(self, run: _Run) -> None:
        """Every output of `run` is reported: advance its partition's position if it can."""
        state = self._partitions.get(run.key)
        if state is None:  # partition forgotten after a revoke; its commit is already decided
            return
        runs = state.runs
        if not runs or runs[0] is not run:
            return  # an earlier run is still in flight; its settling advances over this one
        position = state.position
        while runs and runs[0].pending == 0:
            head = runs[0]
            if head.failed:
                # Blocked for good in front of the first failure; the run stays at the head.
                first_failed = min(head.failed)
                if first_failed > head.first:
                    position = first_failed
                break
            runs.popleft()
            position = head.last + 1
        if position != state.position:
            state.position = position
            self._advanced.add(run.key)

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

    def tracked(self) -> list[Partition]:
        """The partitions with outputs tracked since they were assigned (acknowledged or not)."""
        return list(self._partitions)

    def in_flight(self) -> int:
        """How many tracked records still wait for their acknowledgement (failed ones included)."""
        return sum(
            run.pending + len(run.failed)
            for state in self._partitions.values()
            for run in state.runs
        )

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Drop the state of partitions this consumer no longer owns."""
        for key in partitions:
            self._partitions.pop(key, None)
            self._advanced.discard(key)

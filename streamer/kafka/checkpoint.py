"""What commits together: outputs, state changes, changelog records and input offsets.

The scoring loop never names the delivery guarantee. It polls a batch, runs the pipeline, hands
the outputs to its checkpoint (`outputs`, then `processed`) and calls `maintain` once per turn;
the checkpoint decides when and how everything commits, and what an error does:

- `AtLeastOnce`: every `interval` seconds, the state's changes go to its changelog topics (with
  a producer of their own, so verdicts never queue behind them), everything produced is
  acknowledged (verdicts, dead letters and changelog records), and only then are the input
  offsets committed, each partition's no further than its acknowledged prefix
  (`kafka.delivery`). A changelog record carries the input position its state covers
  (`kafka.changelog.positioned`), so a restore can leave out state newer than the committed
  offsets (`kafka.changelog`): after a crash between the flush and the commit the records are
  read again and applied to the state they were first applied to, not twice. A failed delivery
  stops the scorer, with offsets committed only in front of it.
- `ExactlyOnce`: verdicts, dead letters, changelog records and input offsets go into one Kafka
  transaction, begun lazily at the first output and committed every `interval` seconds. An abort
  returns the state to the last commit (the store's undo) and rewinds the consumer to the
  committed offsets, so the records are read and scored again; a fenced scorer stops. While every
  broker is down, the transaction stays open: no commit or abort is begun, since the calls would
  block or fail against brokers that are not there, and an abort the returning coordinator has
  no record of is refused as fatal (librdkafka #4849). The loop goes on turning (polling the
  consumer, serving reports); once a broker answers, the commit goes ahead. An outage longer than
  the transaction timeout ends the transaction at the coordinator; the producer is then fenced
  and the scorer stops, to be restarted from the last commit.

Kept from before: the delivery tracker's per-run positions, the classification of transactional
errors, and the watchdog around calls that can hang (`kafka.transactions`, `kafka.watchdog`).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from streamer.errors import DeliveryFailedError, FencedError, KafkaFatalError
from streamer.headers import CHANGELOG_POSITION
from streamer.kafka.changelog import positioned
from streamer.kafka.clients import ClientErrors, OutputProducer, commit_positions
from streamer.kafka.delivery import DeliveryCallback, DeliveryFailure, DeliveryTracker, Source
from streamer.kafka.transactions import MEMBERSHIP_CODES, AbortableError, Transactions
from streamer.state.store import KeyedStore

log = structlog.get_logger(__name__)

SLICE_SECONDS: Final = 0.001
"""At-least-once: about how long a turn of the loop spends writing the snapshot under way."""
SLICE_RECORDS: Final = 128
"""At-least-once: snapshot values encoded between two looks at the clock."""
FLUSH_SECONDS: Final = 30.0
"""How long a commit waits for outstanding acknowledgements before giving up on this commit."""
FLUSH_SLICE_SECONDS: Final = 0.25
"""Exactly-once: a commit's wait for acknowledgements looks this often whether every broker has
gone (then the transaction waits for them, open, rather than aborting after `FLUSH_SECONDS`)."""
MAX_ABORTS_IN_A_ROW: Final = 5
"""Exactly-once: transactions aborted one after another, with no commit between, before stopping."""
EXPIRY_EVERY_MS: Final = 3_600_000
"""Stream time (ms) between two sweeps of a partition's state for expired keys."""
EXPIRY_LATENESS_MS: Final = 7 * 86_400_000
"""A sweep deletes what expired this long before the partition's newest event time, so a record
up to a week late still meets the state it would have met without the sweep."""
SWEEP_MIN_SECONDS: Final = 60.0
"""Seconds of the clock at least between the starts of two sweeps of a partition. When stream time
runs far ahead of the clock (a backlog caught up, a replay; the synthetic world's day passes in
seconds at 5,000 events/s), a sweep per `EXPIRY_EVERY_MS` of stream time would look at every key
again and again, a millisecond of nearly every turn of the loop; an idle key is deleted at most
this much later."""
SWEEP_SECONDS: Final = 0.001
"""About how long a turn of the loop spends on the sweeps under way: a sweep looks at every key of
its partition, which at a million keys would stop the loop for a good part of a second."""
SWEEP_SLICE_KEYS: Final = 512
"""Keys a sweep looks at between two looks at the clock."""
_TRANSIENT_DELIVERY_ERRORS: Final = frozenset(
    {KafkaError._MSG_TIMED_OUT, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
)


@dataclass(frozen=True, slots=True)
class Changelog:
    """A store and the compacted topic its changes go to (partition i holds partition i's keys)."""

    store: KeyedStore[Any]
    topic: str


class Checkpoint(ABC):
    """Owns what commits together; see the module docstring for each guarantee."""

    def __init__(
        self,
        consumer: Consumer,
        producer: OutputProducer,
        changelogs: Sequence[Changelog],
        interval: float,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._changelogs = tuple(changelogs)
        self._interval = interval
        self._tracker = DeliveryTracker()
        self._last_commit = time.monotonic()
        self._swept: dict[tuple[str, int], tuple[int, float]] = {}
        """Per (store, partition), the stream time and the clock when its last sweep began."""
        self._expired: dict[tuple[str, int], int] = {}
        """Per (store, partition) with a sweep under way, the keys it has deleted so far."""
        self.callback_error: BaseException | None = None
        """An error met inside a rebalance callback, for the loop to raise."""
        self.committed = 0
        self.aborted = 0
        self.committed_positions: dict[tuple[str, int], int] = {}
        """Exactly-once: the input positions the transactions committed (the consumer, which
        did not commit them, does not know them: consumer lag is measured against them)."""

    # -- the loop's calls ------------------------------------------------------------------------

    @abstractmethod
    def outputs(
        self,
        sources: Sequence[Source],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> list[DeliveryCallback]:
        """The delivery callback of each output of a batch, about to be produced in this order.

        `sources`: each record's input (topic, partition, offset); `keys` and `values`: its
        output's key and value (`values` may be filled as the outputs are produced).
        """

    @abstractmethod
    def processed(self, sources: Sequence[Source]) -> None:
        """The batch's outputs (of the records at `sources`) are all produced."""

    @abstractmethod
    def failed(self, reason: str) -> None:
        """Producing a batch's outputs raised (the client refused a record): act on it."""

    @abstractmethod
    def maintain(self) -> None:
        """Serve delivery reports, act on failures, commit when the interval is up."""

    @abstractmethod
    def revoke(self, partitions: Sequence[tuple[str, int]]) -> None:
        """The group takes `partitions` away: commit what is done before they go."""

    @abstractmethod
    def lose(self, partitions: Sequence[tuple[str, int]]) -> None:
        """The group has given `partitions` to another member already: commit nothing."""

    @abstractmethod
    def close(self, *, clean: bool) -> None:
        """The scorer is stopping (`clean`: not on an error): leave nothing half done."""

    @property
    @abstractmethod
    def pending(self) -> bool:
        """Whether anything is produced or changed and not yet committed."""

    @abstractmethod
    def in_flight(self) -> int:
        """Outputs produced and not yet acknowledged."""

    @property
    def acknowledged(self) -> int | None:
        """Outputs the broker acknowledged so far (None: the producer reports failures only)."""
        return None

    @property
    def at_boundary(self) -> bool:
        """Whether the records processed so far end a unit of commit: a model swapped in now
        scores whole units (at-least-once: always, between batches)."""
        return True

    @property
    def guarding(self) -> tuple[str, float] | None:
        """The client call under way that the watchdog guards, and for how long (None: none)."""
        return None

    @property
    def producer_errors(self) -> list[tuple[str, ClientErrors]]:
        """Each producer's name (as readiness says it) and its client errors."""
        return [("producer", self._producer.errors)]

    @property
    def waiting_for_brokers(self) -> bool:
        """Whether the client call under way waits for brokers of which none answers."""
        return False

    def side_outputs(
        self,
        sources: Sequence[Source],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> list[DeliveryCallback] | None:
        """Delivery callbacks for outputs that ride along with a batch's (shadow verdicts), or
        None when they are best effort: at-least-once commits offsets without waiting for them."""
        return None

    def fence_on_poll_exceeded(self, reason: str) -> bool:
        """The consumer missed `max.poll.interval.ms`: True if the scorer must stop (fenced)."""
        return False

    # -- shared ------------------------------------------------------------------------------------

    def _drop_state(self, partitions: Sequence[tuple[str, int]]) -> None:
        numbers = [partition for _, partition in partitions]
        for changelog in self._changelogs:
            changelog.store.drop(numbers)

    def _write_changelogs(self, on_delivery: DeliveryCallback) -> int:
        """Produce every store's changes since the last commit; how many records."""
        produce = self._producer.produce
        written = 0
        for changelog in self._changelogs:
            store = changelog.store
            for partition in store.partitions:
                position = store.position(partition)
                if position is None:
                    continue
                prefix = positioned(position)
                tombstone_headers = _tombstone_headers(position)
                for key, value in store.changes(partition):
                    if value is None:
                        value, headers = None, tombstone_headers
                    else:
                        value, headers = prefix + value, _NO_HEADERS
                    produce(changelog.topic, key.encode(), value, headers, on_delivery, partition)
                    written += 1
        return written

    def _sweep(self, seconds: float) -> int:
        """Expire idle keys: a partition's sweep begins once per `EXPIRY_EVERY_MS` of its stream
        time (and `SWEEP_MIN_SECONDS` of the clock) and goes on a slice at a time, for about
        `seconds` a call (at least one slice). Returns how many keys this call deleted."""
        clock = time.monotonic()
        deadline = clock + seconds
        expired = self._expired
        deleted = 0
        for changelog in self._changelogs:
            store = changelog.store
            for partition in store.partitions:
                key = (store.name, partition)
                if not store.sweeping(partition):
                    now = store.stream_time(partition)
                    stream_then, clock_then = self._swept.setdefault(key, (now, clock))
                    if (
                        now - stream_then < EXPIRY_EVERY_MS
                        or clock - clock_then < SWEEP_MIN_SECONDS
                    ):
                        continue
                    self._swept[key] = (now, clock)
                    store.begin_sweep(partition, EXPIRY_LATENESS_MS)
                    expired[key] = 0
                while store.sweeping(partition):
                    gone = store.sweep(partition, SWEEP_SLICE_KEYS)
                    deleted += gone
                    expired[key] = expired.get(key, 0) + gone
                    if store.sweeping(partition) and time.monotonic() >= deadline:
                        return deleted
                keys = expired.pop(key, 0)
                if keys:
                    log.info("state expired", store=store.name, partition=partition, keys=keys)
        return deleted

    def _commit_stores(self) -> None:
        for changelog in self._changelogs:
            changelog.store.commit()

    def _changelog_failure(self, error: KafkaError | None, message: Any) -> None:
        # Runs inside librdkafka's poll/flush: record only, never raise.
        if error is not None:
            partition = message.partition() if message is not None else -1
            self._tracker.failures.append(
                DeliveryFailure(str(message.topic()) if message else "?", partition, -1, error)
            )


class AtLeastOnce(Checkpoint):
    """Every `interval` seconds a snapshot of the state's changes goes to the changelog, a slice
    per turn of the loop; once it and the outputs before it are acknowledged, offsets commit.

    Nothing waits on the hot path: the snapshot is encoded in slices of about `SLICE_SECONDS`
    between batches (`KeyedStore.begin_snapshot`: a record that would change a value not encoded
    yet has it encoded first), and the commit happens on the turn that finds every acknowledgement
    in, and in the background (the coordinator's answer is not waited for). The offsets committed
    are the snapshot's positions, never further: the changelog holds the state as of exactly those
    offsets. `commit` (at a revoke, at the stop) does all of it at once
    and waits.
    """

    _uncommitted = False
    """Outputs were produced since the last snapshot began."""

    def __init__(
        self,
        consumer: Consumer,
        producer: OutputProducer,
        changelogs: Sequence[Changelog],
        interval: float,
        changelog_producer: OutputProducer | None = None,
    ) -> None:
        """`changelog_producer`: the changelog's own producer (default: the outputs'). A
        producer has one request in flight per broker (`Settings.producer_config`), so sharing
        it, verdicts wait behind each request of the snapshot's changelog records, which can
        carry far more bytes than the verdicts: at 5,000 events/s, most of a second's state."""
        super().__init__(consumer, producer, changelogs, interval)
        self._changelog_producer = producer if changelog_producer is None else changelog_producer
        self._producers = {"producer": producer}
        """Each producer once, by the name readiness gives it: their delivery reports are served
        and their errors checked."""
        if changelog_producer is not None:
            self._producers["changelog producer"] = changelog_producer
        self._snapshot: dict[int, int] | None = None
        """Input partition → the position the snapshot being written covers (None: none)."""
        self._snapshot_prefixes: dict[int, bytes] = {}
        """Per partition, what every changelog value of the snapshot begins with (its position)."""
        self._snapshot_tombstone_headers: dict[int, list[tuple[str, str | bytes | None]]] = {}
        self._snapshot_size = 0
        """Changelog records the snapshot had to write when it began."""
        self._snapshot_written = 0
        self._changelog_unacknowledged = 0

    def outputs(
        self,
        sources: Sequence[Source],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> list[DeliveryCallback]:
        self._uncommitted = True
        return self._tracker.track_batch(sources, keys, values)

    def failed(self, reason: str) -> None:
        raise KafkaFatalError(f"producing failed: {reason}")

    def processed(self, sources: Sequence[Source]) -> None:
        # Positions advance with the acknowledgements (`DeliveryTracker`), not with producing.
        return

    def maintain(self) -> None:
        for producer in self._producers.values():
            producer.poll(0)
        self._check()
        if self._snapshot is not None:
            self._write_snapshot(SLICE_SECONDS)
            self._commit_snapshot()
        elif self._uncommitted and time.monotonic() - self._last_commit >= self._interval:
            self._last_commit = time.monotonic()
            self._begin_snapshot()
            self._write_snapshot(SLICE_SECONDS)
            self._commit_snapshot()
        if self._sweep(SWEEP_SECONDS):
            self._uncommitted = True  # the deletes go to the changelog with the next snapshot

    def _check(self) -> None:
        for producer in self._producers.values():
            producer.errors.raise_if_fatal()
        failures = self._tracker.failures
        if failures:
            raise DeliveryFailedError(
                describe_failures(failures) + "; offsets stay uncommitted from there"
            )

    def _begin_snapshot(self) -> None:
        """Take the changes since the last snapshot (and the records' positions) as the next."""
        self._uncommitted = False
        if not self._changelogs:  # no state: the acknowledged positions are the snapshot
            self._snapshot = {p: offset for _, p, offset in self._tracker.positions()}
            return
        snapshot: dict[int, int] = {}
        for changelog in self._changelogs:
            store = changelog.store
            for partition, position in store.begin_snapshot().items():
                snapshot[partition] = min(position, snapshot.get(partition, position))
        self._snapshot = snapshot
        self._snapshot_size = sum(changelog.store.snapshot_size for changelog in self._changelogs)
        self._snapshot_written = 0
        self._snapshot_prefixes = {
            partition: positioned(position) for partition, position in snapshot.items()
        }
        self._snapshot_tombstone_headers = {
            partition: _tombstone_headers(position) for partition, position in snapshot.items()
        }

    def _write_snapshot(self, seconds: float | None) -> None:
        """Produce the snapshot's changelog records (None: all of them).

        Otherwise for about `seconds`, and beyond that as far as needed to keep pace: by half
        the interval after it began, the whole snapshot is written, however few turns the loop
        takes meanwhile (a snapshot can begin only once the previous one is written).
        """
        produce = self._changelog_producer.produce
        prefixes = self._snapshot_prefixes
        delivered = self._delivered
        if seconds is None:
            deadline, due = math.inf, math.inf
        else:
            now = time.monotonic()
            deadline = now + seconds
            elapsed = (now - self._last_commit) / (self._interval / 2) if self._interval else 1.0
            due = self._snapshot_size * min(1.0, elapsed)
        for changelog in self._changelogs:
            store, topic = changelog.store, changelog.topic
            while store.snapshot_pending:
                records = store.snapshot_slice(SLICE_RECORDS)
                for partition, key, value in records:
                    if value is None:
                        headers = self._snapshot_tombstone_headers[partition]
                        produce(topic, key.encode(), None, headers, delivered, partition)
                    else:
                        value = prefixes[partition] + value
                        produce(topic, key.encode(), value, _NO_HEADERS, delivered, partition)
                self._changelog_unacknowledged += len(records)
                self._snapshot_written += len(records)
                if self._snapshot_written >= due and time.monotonic() >= deadline:
                    return

    def _delivered(self, error: KafkaError | None, message: Any) -> None:
        # Runs inside librdkafka's poll/flush: record only, never raise.
        self._changelog_unacknowledged -= 1
        self._changelog_failure(error, message)

    def _commit_snapshot(self) -> bool:
        """Commit the snapshot's positions if it and the outputs before them are acknowledged."""
        snapshot = self._snapshot
        if snapshot is None or self._changelog_unacknowledged:
            return False
        if any(changelog.store.snapshot_pending for changelog in self._changelogs):
            return False
        topics = {partition: topic for topic, partition in self._tracker.tracked()}
        acknowledged = {partition: offset for _, partition, offset in self._tracker.positions()}
        positions = []
        for partition, position in snapshot.items():
            topic = topics.get(partition)
            if topic is None:
                continue  # restored, and nothing of it scored since: nothing to commit
            if acknowledged.get(partition, -1) < position:
                return False
            positions.append((topic, partition, position))
        if not self._commit_offsets(positions, wait=False):
            return False
        self._snapshot = None
        return True

    def _commit_offsets(self, positions: Sequence[tuple[str, int, int]], *, wait: bool) -> bool:
        """Commit `positions`; False when the group has moved on without this scorer.

        Without `wait` the commit goes in the background (`clients.log_commit_result` reports a
        failure): the loop never stops for the coordinator's answer.
        """
        try:
            commit_positions(self._consumer, positions, wait=wait)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not isinstance(error, KafkaError) or error.code() not in MEMBERSHIP_CODES:
                raise
            # The group moved on without this scorer (it stalled past max.poll.interval.ms): the
            # partitions' new owner reads these records again, from state that leaves them out
            # (their changelog records cover positions past its committed offsets). The consumer
            # reports the partitions lost and rejoins.
            log.warning("commit refused: the group has moved on", error=error.str())
            return False
        self.committed += 1
        if positions:
            log.debug("committed", positions=positions)
        return True

    def commit(self, partitions: Sequence[tuple[str, int]] | None = None) -> bool:
        """Everything now, and wait: the snapshot under way and the changes since, flushed with
        the outputs, then the offsets (of `partitions`, default all). False: nothing committed.

        Raises `DeliveryFailedError` when an output or changelog record was refused.
        """
        self._last_commit = time.monotonic()
        if self._snapshot is not None:
            self._write_snapshot(None)
        self._begin_snapshot()
        self._write_snapshot(None)
        deadline = time.monotonic() + FLUSH_SECONDS
        remaining = sum(
            producer.flush(max(0.0, deadline - time.monotonic()))
            for producer in self._producers.values()
        )
        self._check()
        if remaining:
            log.error(
                "outputs not acknowledged in time; their inputs stay uncommitted",
                in_flight=remaining,
            )
            return False
        # Everything is acknowledged: the positions are the state's, the snapshot's.
        if not self._commit_offsets(self._tracker.positions(partitions), wait=True):
            return False
        self._snapshot = None
        return True

    def revoke(self, partitions: Sequence[tuple[str, int]]) -> None:
        # Runs inside consume() on the main thread. Wait for the outputs of the records read from
        # these partitions, then commit what is safe so the next owner starts after them.
        try:
            self.commit()
        except Exception as exc:  # never raise inside a librdkafka callback
            log.error("commit at revoke failed", error=repr(exc))
        self._tracker.forget(partitions)
        self._drop_state(partitions)

    def lose(self, partitions: Sequence[tuple[str, int]]) -> None:
        # The group moved on without us: another member owns these now; committing would be wrong.
        self._tracker.forget(partitions)
        self._drop_state(partitions)
        if self._snapshot is not None:
            for _, partition in partitions:
                self._snapshot.pop(partition, None)

    def close(self, *, clean: bool) -> None:
        # Even after an error, commit what is acknowledged: the records after it are redone.
        if clean:
            self.commit()
            return
        try:
            self.commit()
        except Exception as exc:  # already stopping on an error; that one is the one to report
            log.error("commit at stop failed", error=repr(exc))

    @property
    def producer_errors(self) -> list[tuple[str, ClientErrors]]:
        return [(name, producer.errors) for name, producer in self._producers.items()]

    @property
    def pending(self) -> bool:
        return self._uncommitted or self._snapshot is not None or self._tracker.in_flight() > 0

    def in_flight(self) -> int:
        return self._tracker.in_flight()

    @property
    def acknowledged(self) -> int | None:
        return self._tracker.acknowledged_total


class ExactlyOnce(Checkpoint):
    """Outputs, changelog records and offsets in one transaction, every `interval` seconds."""

    def __init__(
        self,
        consumer: Consumer,
        producer: OutputProducer,
        changelogs: Sequence[Changelog],
        interval: float,
        transactions: Transactions,
        consumer_errors: ClientErrors | None = None,
    ) -> None:
        super().__init__(consumer, producer, changelogs, interval)
        self.transactions = transactions
        self._positions: dict[tuple[str, int], int] = {}
        """The next offset to read per partition, for the open transaction."""
        self._aborts_in_a_row = 0
        self._client_errors = (producer.errors,) + (
            (consumer_errors,) if consumer_errors is not None else ()
        )
        self._held_since: float | None = None
        """When the open transaction began to wait for the brokers (None: it does not)."""

    def outputs(
        self,
        sources: Sequence[Source],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> list[DeliveryCallback]:
        self.transactions.begin()
        # The commit waits for every output; the producer reports failures only.
        return [self._tracker.failure_callback(sources, keys, values)] * len(sources)

    def processed(self, sources: Sequence[Source]) -> None:
        positions = self._positions
        for topic, partition, offset in sources:
            positions[(topic, partition)] = offset + 1

    def failed(self, reason: str) -> None:
        # Once a transaction has failed (a delivery refused, say), librdkafka refuses further
        # records in it: abort, and read the batch again in a new transaction.
        self._abort_and_rewind(f"producing failed: {reason}")

    def maintain(self) -> None:
        self._producer.poll(0)
        transactions = self.transactions
        if self._tracker.failures:
            if self._held_for_brokers():
                return  # abort once a coordinator can hear it
            self._abort_and_rewind("an output was not delivered")
        elif transactions.opened_at is not None:
            # Keys a sweep deletes are changes of the open transaction: written with it, or
            # restored by its abort.
            self._sweep(SWEEP_SECONDS)
            if time.monotonic() - transactions.opened_at >= self._interval:
                self.commit(rewind=True)

    def commit(self, *, rewind: bool) -> bool:
        """Commit the open transaction; on failure abort it (and rewind, if `rewind`)."""
        transactions = self.transactions
        if not transactions.is_open or self._held_for_brokers():
            return False
        # Should every broker go during the wait below, the changes are written again by the
        # next try, into the same transaction: a key's later record holds the same value.
        self._write_changelogs(self._tracker.failure_callback((), (), ()))
        # Wait for the deliveries first: a refused output shows up here, with its reason, rather
        # than as a transaction that cannot commit.
        remaining = self._flush()
        if remaining is None:
            self._held_for_brokers()
            return False
        if self._tracker.failures or remaining:
            self._abort_for(
                f"an output was not delivered ({remaining} unacknowledged after the wait)", rewind
            )
            return False
        try:
            transactions.commit(self._positions)
        except AbortableError as exc:
            self._abort_for(str(exc), rewind)
            return False
        self._commit_stores()
        self.committed_positions.update(self._positions)
        self._positions.clear()
        self._tracker = DeliveryTracker()
        self._aborts_in_a_row = 0
        self.committed += 1
        return True

    def _flush(self) -> int | None:
        """Wait up to `FLUSH_SECONDS` for every output's acknowledgement; how many are left, or
        None when every broker went away meanwhile (the transaction is left open for them)."""
        deadline = time.monotonic() + FLUSH_SECONDS
        with self.transactions.watchdog.guard("flush", FLUSH_SECONDS):
            while True:
                wait = min(FLUSH_SLICE_SECONDS, max(deadline - time.monotonic(), 0.0))
                remaining = self._producer.flush(wait)
                if not remaining:
                    return 0
                if self._brokers_down():
                    return None
                if time.monotonic() >= deadline:
                    return remaining

    def _brokers_down(self) -> bool:
        """Whether a client of this scorer has every broker down (until the loop's probe finds
        one answering: `clients.ReachabilityProbe`)."""
        return any(errors.all_down for errors in self._client_errors)

    def _held_for_brokers(self) -> bool:
        """Whether the open transaction must wait for the brokers (logged once per outage)."""
        if not self._brokers_down():
            if self._held_since is not None:
                log.info(
                    "brokers answer again; the transaction held open goes on",
                    held_seconds=round(time.monotonic() - self._held_since, 1),
                )
                self._held_since = None
            return False
        if self._held_since is None:
            self._held_since = time.monotonic()
            log.warning(
                "every broker is down; the open transaction waits for them",
                outputs_in_flight=len(self._producer),
            )
        return True

    def _abort_for(self, reason: str, rewind: bool) -> None:
        if rewind:
            self._abort_and_rewind(reason)
        else:
            self._abort(reason)

    def _abort(self, reason: str) -> None:
        """Abort the open transaction and forget what it did; stop if it cannot succeed."""
        self._producer.poll(0)  # serve the delivery reports that say why, if any are queued
        failures = self._tracker.failures
        permanent = [f for f in failures if f.error.code() not in _TRANSIENT_DELIVERY_ERRORS]
        self.transactions.abort(reason)
        self.aborted += 1
        for changelog in self._changelogs:
            changelog.store.rollback()
        self._positions.clear()
        self._tracker = DeliveryTracker()
        if permanent:
            raise DeliveryFailedError(f"{describe_failures(permanent)}; the transaction is aborted")
        self._aborts_in_a_row += 1
        if self._aborts_in_a_row >= MAX_ABORTS_IN_A_ROW:
            raise KafkaFatalError(
                f"{self._aborts_in_a_row} transactions aborted in a row, the last because: "
                f"{reason}; stopping with nothing committed past the last good transaction"
            )

    def _abort_and_rewind(self, reason: str) -> None:
        self._abort(reason)
        self._rewind()

    def _abort_quietly(self, reason: str) -> None:
        try:
            self.transactions.abort(reason)
        except Exception as exc:  # already stopping on an error; that one is the one to report
            log.error("abort failed", error=str(exc))

    def _rewind(self) -> None:
        """Seek every assigned partition back to its committed offset."""
        assignment = self._consumer.assignment()
        if not assignment:
            return
        committed = self._consumer.committed(assignment, timeout=30)
        for tp in committed:
            offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        log.info(
            "rewound to the committed offsets",
            positions={f"{tp.topic}[{tp.partition}]": tp.offset for tp in committed},
        )

    def revoke(self, partitions: Sequence[tuple[str, int]]) -> None:
        try:
            self.commit(rewind=False)
        except Exception as exc:  # never raise inside a librdkafka callback
            log.error("commit at revoke failed", error=repr(exc))
            self.callback_error = exc
        self._drop_state(partitions)

    def lose(self, partitions: Sequence[tuple[str, int]]) -> None:
        # A zombie: whatever it wrote must never become visible. Abort, then stop.
        self._abort_quietly("partitions lost")
        self._drop_state(partitions)
        self.callback_error = FencedError(
            "the consumer group moved on without this scorer (partitions lost: it was "
            "unresponsive past max.poll.interval.ms or session.timeout.ms); its open "
            "transaction is aborted and nothing it wrote is visible; restart it"
        )

    def fence_on_poll_exceeded(self, reason: str) -> bool:
        # The group has moved on: whatever the open transaction holds must never be visible.
        self._abort_quietly(reason)
        return True

    def close(self, *, clean: bool) -> None:
        """Exactly-once after an error commits nothing: a batch may be half-produced, so its
        transaction is aborted and the records are scored again by whoever reads them next."""
        if clean:
            if not self.commit(rewind=False) and self._held_since is not None:
                log.warning(
                    "stopping with the transaction open: no broker answers; nothing in it "
                    "becomes visible, and the next owner scores its records again"
                )
        else:
            self._abort_quietly("the scorer is stopping on an error")

    @property
    def pending(self) -> bool:
        return self.transactions.is_open

    @property
    def at_boundary(self) -> bool:
        return not self.transactions.is_open  # between transactions

    @property
    def guarding(self) -> tuple[str, float] | None:
        return self.transactions.watchdog.guarding

    @property
    def waiting_for_brokers(self) -> bool:
        return self.transactions.watchdog.waiting_for_brokers

    def side_outputs(
        self,
        sources: Sequence[Source],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> list[DeliveryCallback] | None:
        # In the transaction like every output: one not delivered aborts it.
        return self.outputs(sources, keys, values)

    def in_flight(self) -> int:
        return len(self._producer)


def describe_failures(failures: Sequence[DeliveryFailure]) -> str:
    first = failures[0]
    return (
        f"output for {first.topic}[{first.partition}]@{first.offset} was not delivered: "
        f"{first.error.str()} ({len(failures)} failed)"
    )


_NO_HEADERS: Final[list[tuple[str, str | bytes | None]]] = []
"""A changelog value's headers: none (its position begins the value). Never changed."""


def _tombstone_headers(position: int) -> list[tuple[str, str | bytes | None]]:
    """A tombstone has no value to begin with its position: it goes in a header."""
    return [(CHANGELOG_POSITION, str(position).encode())]

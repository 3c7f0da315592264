"""State changelog topics: their names and settings, and restoring a store from one.

Each store writes its changes to a compacted topic `<group id>-<store>-changelog` with as many
partitions as the input: partition i of the changelog holds the keys of input partition i, so the
process that is assigned input partition i restores its state from changelog partition i alone.

Every changelog record carries the input position its state covers (`kafka.checkpoint`): a value
begins with it (`positioned`), a tombstone has it in its `streamer.changelog.position` header. (A
value's position is not a header because reading a record's headers costs a restore more than
everything else it does with the record.) A restore applies the records of a partition in log
order and leaves out those whose position is past the input partition's committed offset: the
checkpoint that wrote them did not commit (the process died between flushing the changelog and
committing offsets, which only at-least-once can do), so their input records are read again, and
must meet the state they met the first time. Exactly-once reads the changelog `read_committed`:
an aborted transaction's records are never seen, and a committed record's position is never past
the committed offset.

Compaction keeps the latest record of each key. A record left out above needs the one before it,
so `min.compaction.lag.ms` keeps every record uncompacted for a day: a restore within a day of a
crash always finds it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping
from typing import Any, Final

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from streamer.errors import ConfigError, KafkaFatalError
from streamer.headers import CHANGELOG_POSITION
from streamer.kafka.admin import ensure_topics, partition_count
from streamer.kafka.clients import ClientErrors, create_consumer
from streamer.state.store import KeyedStore

log = structlog.get_logger(__name__)

CHANGELOG_TOPIC_CONFIG: Final[dict[str, str]] = {
    "cleanup.policy": "compact",
    # See the module docstring: the record before an uncommitted one must survive compaction.
    "min.compaction.lag.ms": str(24 * 3_600_000),
}
RESTORE_BATCH: Final = 10_000
"""Changelog records taken per consume call while restoring."""
PROGRESS_SECONDS: Final = 5.0
"""Seconds between restore progress log lines."""
REASSIGN_SECONDS: Final = 0.5
"""Wait before reading a changelog partition again that the reader did not know yet."""
METADATA_SECONDS: Final = 5.0
"""Longest wait for the changelog's partition leaders before a restore starts without them."""
_NOT_KNOWN_YET: Final = frozenset(
    {KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART}
)
"""Errors of a reader whose metadata does not have a topic created moments ago: it would wait
for that partition's end for ever, so the partition is assigned again (`Restorer.step`)."""


_POSITIONED: Final = struct.Struct(">Bq")
POSITIONED_MARK: Final = 0xFE
"""First byte of a changelog value that begins with its position: the mark, then the position as
a big-endian i64, then the store's encoded value. A value without the mark (written before the
position moved into the value) is the encoded value alone, its position in a header."""
_MARK_BYTE: Final = bytes((POSITIONED_MARK,))


def positioned(position: int) -> bytes:
    """The start of every changelog value written for state that covers input before `position`:
    the value is this followed by the store's encoded value."""
    return _POSITIONED.pack(POSITIONED_MARK, position)


def value_position(data: bytes) -> tuple[int | None, bytes]:
    """A changelog value's position (None: it has none of its own) and the store's value."""
    if data[:1] == _MARK_BYTE and len(data) >= _POSITIONED.size:
        return _POSITIONED.unpack_from(data)[1], data[_POSITIONED.size :]
    return None, data


def changelog_topic(group_id: str, store: str) -> str:
    """The changelog topic of `store` for the scorers of `group_id`."""
    return f"{group_id}-{store}-changelog"


def ensure_changelog(
    admin_config: dict[str, Any], topic: str, input_topic: str, *, replication_factor: int = -1
) -> bool:
    """Create `topic` with the input's partition count if missing; True if created.

    Raises `ConfigError` when the input topic does not exist, or the changelog exists with a
    different partition count (its partitions would not match the input's keys).
    """
    partitions = partition_count(admin_config, input_topic)
    if partitions == 0:
        raise ConfigError(
            f"input topic {input_topic!r} does not exist; create it (`streamer topics create`) "
            "or set STREAMER_INPUT_TOPIC"
        )
    existing = partition_count(admin_config, topic)
    if existing == 0:
        results = ensure_topics(
            admin_config,
            [topic],
            partitions=partitions,
            replication_factor=replication_factor,
            configs=CHANGELOG_TOPIC_CONFIG,
        )
        return any(result.created for result in results)
    if existing != partitions:
        raise ConfigError(
            f"changelog topic {topic!r} has {existing} partitions but input topic "
            f"{input_topic!r} has {partitions}: state partitions must match input partitions; "
            "delete the changelog (card histories then start empty) or use a new STREAMER_GROUP_ID"
        )
    return False


class Restorer:
    """Rebuilds a store's partitions from its changelog, a bounded step at a time.

    The scoring loop pauses the input partitions being restored and calls `step` once per turn,
    so the consumer keeps polling (and its group membership alive) while a large state loads.
    """

    def __init__(self, config: dict[str, Any], store: KeyedStore[Any], topic: str) -> None:
        self._config = {**config, "enable.partition.eof": True, "enable.auto.commit": False}
        self._read_committed = config.get("isolation.level") == "read_committed"
        self._unstable_logged: set[int] = set()
        """Partitions whose wait for a transaction is logged (once each)."""
        self._store = store
        self._topic = topic
        self._consumer: Consumer | None = None
        self._errors = ClientErrors("changelog reader")
        self._committed: dict[int, int | None] = {}
        """Partitions being restored → the input's committed offset (None: none committed)."""
        self._started = 0.0
        self._reassign_at: float | None = None
        self._records = 0
        self._records_before = 0
        """Records applied by the restores before the current one (for `records`)."""
        self._next_progress = 0.0

    @property
    def restoring(self) -> list[int]:
        """The partitions being restored."""
        return sorted(self._committed)

    @property
    def restored(self) -> list[int]:
        """The partitions whose state is restored."""
        return [p for p in self._store.partitions if p not in self._committed]

    @property
    def records(self) -> int:
        """Changelog records applied since this restorer was made, over every restore."""
        return self._records_before + self._records

    def remaining(self) -> dict[int, int]:
        """Records still to read per partition being restored, where the end is known yet.

        From the reader's position and the high watermark of its last fetch (no broker call).
        """
        consumer = self._consumer
        if consumer is None or not self._committed:
            return {}
        left: dict[int, int] = {}
        positions = consumer.position([TopicPartition(self._topic, p) for p in self._committed])
        for tp in positions:
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                left[tp.partition] = max(high - max(tp.offset, 0), 0)
        return left

    def start(self, committed: Mapping[int, int | None]) -> None:
        """Restore these partitions, given each input partition's committed offset."""
        if not committed:
            return
        self._started = time.monotonic()
        for partition in committed:
            self._store.assign(partition)
        self._committed.update(committed)
        self._unstable_logged.difference_update(committed)
        if self._consumer is None:
            self._consumer = create_consumer(self._config, self._errors)
            # Assigned before it knows the partitions' leaders, the reader would wait out
            # librdkafka's offset query retry timer (about 0.5 s) before the first fetch.
            try:
                self._consumer.list_topics(self._topic, timeout=METADATA_SECONDS)
            except KafkaException as exc:
                log.warning("changelog metadata not known yet", error=str(exc))
        self._consumer.assign(
            [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in self._committed]
        )
        self._next_progress = self._started + PROGRESS_SECONDS
        self._records_before += self._records
        self._records = 0
        log.info("restoring state", store=self._store.name, partitions=self.restoring)

    def cancel(self) -> None:
        """Stop restoring (the partitions were revoked)."""
        self._committed.clear()
        self._reassign_at = None
        if self._consumer is not None:
            self._consumer.unassign()

    def step(self, seconds: float) -> list[int]:
        """Apply changelog records for about `seconds`; the partitions finished in this step."""
        consumer = self._consumer
        if consumer is None or not self._committed:
            return []
        finished: list[int] = []
        deadline = time.monotonic() + seconds
        store, committed = self._store, self._committed
        unpack_position, positioned_size = _POSITIONED.unpack_from, _POSITIONED.size
        while committed and time.monotonic() < deadline:
            if self._reassign_at is not None and time.monotonic() >= self._reassign_at:
                self._reassign_at = None
                # Start the partitions not finished over: records applied twice converge.
                for unfinished in committed:
                    store.assign(unfinished)
                consumer.assign(
                    [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in committed]
                )
            messages = consumer.consume(RESTORE_BATCH, 0.05)
            self._errors.raise_if_fatal()
            # The hot part of a restore: a few calls per record, the store applies runs of them.
            applied: dict[int, list[tuple[bytes, bytes | None]]] = {}
            for message in messages:
                partition: Any = message.partition()  # an int: every message is of a partition
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        if partition in committed and not self._unstable(partition, message):
                            self._apply(applied)
                            finished.append(partition)
                            self._finish(partition)
                        continue
                    if error.fatal():
                        raise KafkaFatalError(f"changelog reader: {error.str()}")
                    if error.code() in _NOT_KNOWN_YET and self._reassign_at is None:
                        self._reassign_at = time.monotonic() + REASSIGN_SECONDS
                    log.warning("changelog reader error", error=error.str())
                    continue
                limit = committed.get(partition)
                if limit is None:
                    continue  # not restoring it, or no input offset committed: nothing counts
                value: bytes | None = message.value()
                if value and value[0] == POSITIONED_MARK and len(value) >= positioned_size:
                    position: int | None = unpack_position(value)[1]
                    value = value[positioned_size:]
                else:  # a tombstone, or a value written with its position in a header
                    position = _position(message.headers())
                if position is None or position > limit:
                    continue  # written by a checkpoint that did not commit: see module docstring
                key = message.key()
                if key is None:
                    continue
                runs = applied.get(partition)
                if runs is None:
                    runs = applied[partition] = []
                runs.append((key, value))
            self._apply(applied)
        now = time.monotonic()
        if committed and now >= self._next_progress:
            self._next_progress = now + PROGRESS_SECONDS
            log.info(
                "restoring state",
                store=store.name,
                partitions=self.restoring,
                records=self._records,
                seconds=round(now - self._started, 1),
            )
        if not committed:
            seconds_taken = max(now - self._started, 1e-9)
            log.info(
                "state restored",
                store=store.name,
                records=self._records,
                keys=len(store),
                seconds=round(seconds_taken, 3),
                records_per_second=round(self._records / seconds_taken),
            )
            consumer.unassign()
        return finished

    def _unstable(self, partition: int, eof: Any) -> bool:
        """Whether a read_committed end of `partition` is not its end yet: a transaction's records
        lie past it.

        Read committed, the end is the last stable offset, before the first record of a
        transaction not yet complete. A transaction whose commit the previous owner saw succeed
        can still be completing: the coordinator answers the commit once it is decided and
        writes its markers afterwards, so the input's committed offsets can already include it
        while its changelog records are not readable yet. Ending there would leave out state the
        committed offsets cover. The high watermark of the last fetch says whether records lie
        past the end; if so, the reader goes on, and the next end of partition (the transaction
        committed or aborted) is checked again.
        """
        if not self._read_committed or self._consumer is None:
            return False
        _, high = self._consumer.get_watermark_offsets(
            TopicPartition(self._topic, partition), cached=True
        )
        end = eof.offset()
        if high < 0 or end < 0 or high <= end:
            return False
        if partition not in self._unstable_logged:
            self._unstable_logged.add(partition)
            log.info(
                "restore waiting for a transaction in the changelog to complete",
                store=self._store.name,
                partition=partition,
                stable_end=end,
                high_watermark=high,
            )
        return True

    def _apply(self, applied: dict[int, list[tuple[bytes, bytes | None]]]) -> None:
        """Hand the records taken so far to the store, and forget them."""
        for partition, records in applied.items():
            self._store.restore(partition, records)
            self._records += len(records)
        applied.clear()

    def _finish(self, partition: int) -> None:
        self._store.restored(partition, self._committed.pop(partition))

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def _position(headers: Any) -> int | None:
    """The `CHANGELOG_POSITION` header's value (None: absent or not a number)."""
    for name, value in headers or ():
        if name == CHANGELOG_POSITION and value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None

"""A read-only replica of the scorers' card histories, kept by following their changelog.

The stream's scorers write every card history they change to `<group id>-card-state-changelog`
(`streamer.kafka.changelog`). `CardReplica` reads every partition of that topic from the start
and keeps on reading: it is assigned the partitions (it never joins the scorers' group), commits
nothing, writes nothing, and reads `read_committed`, so the state of an aborted exactly-once
transaction is never served. A tombstone deletes the card.

It keeps the latest changelog value of each card as bytes, with where it came from; a request
gets a `CardHistory` of its own (`history`: decoded once, then copied), so nothing a request does
can change the replica. At-least-once scorers can write a change whose input offsets they then
fail to commit; the replica serves it (it is the newest history of the card) and the scorer that
re-reads those inputs writes the same history again.

One background thread reads; request handlers read `card` from any thread (a dict look-up of an
immutable entry, atomic under the GIL).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from streamer.errors import KafkaFatalError
from streamer.kafka.changelog import changelog_topic, value_position
from streamer.kafka.clients import ClientErrors, create_consumer
from streamer.state.card import CARD_HISTORY_CODEC, CardHistory

log = structlog.get_logger(__name__)

STORE: Final = "card-state"
"""The card history store's name in its changelog topic (`<group id>-card-state-changelog`)."""
BATCH: Final = 10_000
"""Changelog records taken per consume call."""
POLL_SECONDS: Final = 0.1
"""Longest wait of one consume call; also how fast `stop` is noticed."""
WATERMARK_SECONDS: Final = 1.0
"""Seconds between two reads of the partitions' high watermarks (for the lag)."""
TOPIC_WAIT_SECONDS: Final = 5.0
"""Seconds between two looks for a changelog topic that does not exist yet."""
PROGRESS_SECONDS: Final = 5.0
"""Seconds between progress log lines while catching up."""


@dataclass(frozen=True, slots=True)
class CardEntry:
    """The latest changelog record of one card."""

    value: bytes
    """The encoded history (`CARD_HISTORY_CODEC`)."""
    partition: int
    offset: int
    """The record's changelog offset."""
    timestamp: int
    """The record's timestamp (ms): when the scorer wrote the history."""


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """How far the replica is behind, for `/readyz` and the metrics."""

    topic: str
    caught_up_once: bool
    """Every partition was read to its end at least once (only then is the replica ready)."""
    caught_up: bool
    """Every partition is read to its end now."""
    lag_records: int
    """Changelog records not read yet, over every partition (as of the last watermark read)."""
    seconds_since_caught_up: float | None
    """Since every partition was last read to its end (0 when it is now; None: never)."""
    cards: int
    records: int
    """Changelog records applied since start."""
    partitions: int
    error: str | None
    """Why the reader stopped, if it did (the replica then serves what it had)."""


class CardReplica:
    """Follows the card history changelog of the scorers of `group_id` (see the module doc).

    `start` starts the reader thread; `stop` stops it and closes the consumer.
    """

    def __init__(self, config: dict[str, Any], group_id: str) -> None:
        self.topic = changelog_topic(group_id, STORE)
        self._config = {**config, "enable.partition.eof": True, "enable.auto.commit": False}
        self._cards: dict[str, CardEntry] = {}
        self._decoded: dict[str, tuple[CardEntry, CardHistory]] = {}
        """Histories decoded for requests, by card, with the entry they come from."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = ClientErrors("changelog replica")
        self._error: str | None = None
        self._partitions: list[int] = []
        self._next: dict[int, int] = {}
        """Per partition: the offset after the last record read (0: none read)."""
        self._at_end: set[int] = set()
        """Partitions read to their end, with no record read since."""
        self._high: dict[int, int] = {}
        self._records = 0
        self._started = time.monotonic()
        self._caught_up_once = False
        self._caught_up_at: float | None = None
        """When every partition was last at its end (monotonic); None: never."""

    # -- reading (request handlers) ------------------------------------------------------------

    def card(self, card_id: str) -> CardEntry | None:
        """The card's latest changelog entry (None: the replica has no history for it)."""
        return self._cards.get(card_id)

    def history(self, card_id: str, entry: CardEntry) -> CardHistory:
        """A new `CardHistory` equal to `entry`'s: the caller may change it freely.

        The first request for an entry decodes it (about 0.2 ms for a card with a month of
        history) and keeps the decoded history; later ones get a copy of it (a few µs). Call it
        from one thread (the server's event loop).
        """
        cached = self._decoded.get(card_id)
        if cached is None or cached[0] is not entry:
            _, value = value_position(entry.value)
            cached = self._decoded[card_id] = (entry, CARD_HISTORY_CODEC.decode(value))
        return cached[1].copy()

    def status(self) -> ReplicaStatus:
        now = time.monotonic()
        caught_up = bool(self._partitions) and len(self._at_end) == len(self._partitions)
        lag = 0
        for partition in self._partitions:
            if partition not in self._at_end:
                lag += max(0, self._high.get(partition, 0) - self._next.get(partition, 0))
        since: float | None = None
        if caught_up:
            since = 0.0
        elif self._caught_up_at is not None:
            since = now - self._caught_up_at
        return ReplicaStatus(
            topic=self.topic,
            caught_up_once=self._caught_up_once,
            caught_up=caught_up,
            lag_records=lag,
            seconds_since_caught_up=since,
            cards=len(self._cards),
            records=self._records,
            partitions=len(self._partitions),
            error=self._error,
        )

    @property
    def alive(self) -> bool:
        """The reader thread runs (or has not been started)."""
        return self._thread is None or self._thread.is_alive()

    # -- the reader thread ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="changelog-replica", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        consumer = create_consumer(self._config, self._errors)
        try:
            self._follow(consumer)
        except Exception as exc:  # the thread's boundary: record why, /livez reports it
            self._error = f"{type(exc).__name__}: {exc}"
            log.error("changelog replica stopped", topic=self.topic, error=self._error)
        finally:
            consumer.close()

    def _follow(self, consumer: Consumer) -> None:
        partitions = self._wait_for_topic(consumer)
        if partitions is None:
            return
        self._partitions = partitions
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        log.info("following changelog", topic=self.topic, partitions=len(partitions))
        next_watermarks = 0.0
        next_progress = time.monotonic() + PROGRESS_SECONDS
        while not self._stop.is_set():
            messages = consumer.consume(BATCH, POLL_SECONDS)
            self._errors.raise_if_fatal()
            self._apply(messages)
            now = time.monotonic()
            if now >= next_watermarks:
                next_watermarks = now + WATERMARK_SECONDS
                self._read_watermarks(consumer)
            if not self._caught_up_once and now >= next_progress:
                next_progress = now + PROGRESS_SECONDS
                status = self.status()
                log.info(
                    "catching up with changelog",
                    topic=self.topic,
                    records=status.records,
                    lag_records=status.lag_records,
                )

    def _wait_for_topic(self, consumer: Consumer) -> list[int] | None:
        """The changelog's partitions, once it exists (None: stopped while waiting)."""
        warned = False
        while not self._stop.is_set():
            metadata = consumer.list_topics(self.topic, timeout=10)
            topic = metadata.topics.get(self.topic)
            if topic is not None and topic.error is None and topic.partitions:
                return sorted(topic.partitions)
            if not warned:
                warned = True
                log.warning(
                    "changelog topic does not exist yet; not ready until it does",
                    topic=self.topic,
                    hint="`streamer topics create` or a first `streamer run` creates it",
                )
            self._stop.wait(TOPIC_WAIT_SECONDS)
        return None

    def _apply(self, messages: list[Any]) -> None:
        cards = self._cards
        at_end = self._at_end
        next_offsets = self._next
        for message in messages:
            partition = message.partition()
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(partition)
                    # librdkafka reports the end offset with the event: under read_committed
                    # that is past any transaction marker, which no record ever covers.
                    next_offsets[partition] = max(next_offsets.get(partition, 0), message.offset())
                    self._check_caught_up()
                    continue
                if error.fatal():
                    raise KafkaFatalError(f"changelog replica: {error.str()}")
                log.warning("changelog replica error", topic=self.topic, error=error.str())
                continue
            offset = message.offset()
            at_end.discard(partition)
            next_offsets[partition] = offset + 1
            self._records += 1
            key = message.key()
            if key is None:
                continue
            card_id = key.decode()
            value = message.value()
            if value is None:
                cards.pop(card_id, None)
                self._decoded.pop(card_id, None)
            else:
                cards[card_id] = CardEntry(value, partition, offset, message.timestamp()[1])

    def _check_caught_up(self) -> None:
        if len(self._at_end) < len(self._partitions):
            return
        self._caught_up_at = time.monotonic()
        if not self._caught_up_once:
            self._caught_up_once = True
            seconds = max(self._caught_up_at - self._started, 1e-9)
            log.info(
                "changelog replica caught up",
                topic=self.topic,
                records=self._records,
                cards=len(self._cards),
                seconds=round(seconds, 3),
                records_per_second=round(self._records / seconds),
            )

    def _read_watermarks(self, consumer: Consumer) -> None:
        for partition in self._partitions:
            if partition in self._at_end:
                continue
            try:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=1.0, cached=False
                )
            except Exception as exc:  # a slow broker: keep the last known watermark
                log.debug("watermark read failed", partition=partition, error=repr(exc))
                continue
            self._high[partition] = high

"""Kafka clients built from librdkafka dicts, with the scorer's error handling wired in.

librdkafka reports most trouble (a broker down, a leader moving) as transient errors it recovers
from by itself; those are logged. Errors flagged fatal are recorded by the callbacks (which must
never raise) and raised on the main thread by `raise_if_fatal`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streamer.errors import KafkaFatalError
from streamer.headers import Headers

log = structlog.get_logger(__name__)

CLIENT_LOGGER = logging.getLogger("streamer.kafka.client")
"""librdkafka's own log lines arrive here (served by poll), in the process's log format."""


class KafkaMessage(Protocol):
    """The part of `confluent_kafka.Message` the scorer reads; unit tests stub it."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def error(self) -> KafkaError | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class ClientErrors:
    """Collects errors reported by librdkafka's `error_cb`; fatal ones stop the process."""

    def __init__(self, client: str) -> None:
        self._client = client
        self.fatal: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        # Runs inside librdkafka's poll: record only, never raise.
        if error.fatal():
            self.fatal = error
            log.error("kafka fatal error", client=self._client, error=error.str())
        elif error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            log.warning("kafka connection trouble", client=self._client, error=error.str())
        else:
            log.warning("kafka error", client=self._client, error=error.str())

    def raise_if_fatal(self) -> None:
        if self.fatal is not None:
            raise KafkaFatalError(f"{self._client}: {self.fatal.str()}")


def create_consumer(config: dict[str, Any], errors: ClientErrors) -> Consumer:
    """A consumer whose errors land in `errors` and whose logs go to the process log."""
    return Consumer({**config, "error_cb": errors, "logger": CLIENT_LOGGER})


class OutputProducer:
    """A producer that retries a full local queue by serving delivery reports, never by dropping.

    Delivery outcomes reach the `on_delivery` callback given per record (see DeliveryTracker).
    Client errors land in `errors`; librdkafka's logs go to the process log.
    """

    def __init__(self, config: dict[str, Any], name: str = "producer") -> None:
        self.errors = ClientErrors(name)
        self._producer = Producer({**config, "error_cb": self.errors, "logger": CLIENT_LOGGER})

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        on_delivery: Callable[[Any, Any], None] | None,
        partition: int | None = None,
    ) -> None:
        """Produce one record (to `partition`, or where the key hashes to when None)."""
        while True:
            try:
                if partition is None:
                    self._producer.produce(
                        topic, value, key, headers=headers, on_delivery=on_delivery
                    )
                else:
                    self._producer.produce(
                        topic, value, key, partition, headers=headers, on_delivery=on_delivery
                    )
                return
            except BufferError:
                # The local queue is full: wait for the broker to drain it, serving reports.
                self._producer.poll(0.05)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports and client errors."""
        self._producer.poll(timeout)

    def __len__(self) -> int:
        """Outputs produced and not yet delivered (or failed)."""
        return len(self._producer)

    def flush(self, timeout: float) -> int:
        """Wait until everything produced is acknowledged (or `timeout`); returns what remains."""
        return self._producer.flush(timeout)

    @property
    def client(self) -> Producer:
        """The underlying producer, for the transactional calls (see `kafka.transactions`)."""
        return self._producer


def poll_batch(consumer: Consumer, max_records: int, timeout: float) -> list[Any]:
    """Up to `max_records` messages: what is already fetched, or else the first to arrive.

    `Consumer.consume(n, timeout)` may wait for `n` messages until `timeout` (librdkafka) or
    return early (some client versions), so its latency depends on the version. We never ask it
    to wait for a full batch: take what is buffered without blocking; if nothing is, block for a
    single message and then take what arrived with it. Under load batches fill up; when idle,
    a record waits no longer than it takes to fetch it.
    """
    messages = consumer.consume(max_records, 0)
    if messages:
        return messages
    messages = consumer.consume(1, timeout)
    if messages and max_records > 1:
        messages.extend(consumer.consume(max_records - 1, 0))
    return messages


def store_positions(consumer: Consumer, positions: Sequence[tuple[str, int, int]]) -> None:
    """Store positions for librdkafka's periodic auto-commit."""
    if positions:
        consumer.store_offsets(offsets=[TopicPartition(t, p, o) for t, p, o in positions])


def commit_positions(consumer: Consumer, positions: Sequence[tuple[str, int, int]]) -> None:
    """Store, then synchronously commit, explicit positions.

    Storing first matters: librdkafka commits the *stored* offsets once more when the consumer
    closes or a partition is revoked, and a stored offset older than the one committed here would
    move the group back and replay records.
    """
    if not positions:
        return
    offsets = [TopicPartition(topic, partition, offset) for topic, partition, offset in positions]
    consumer.store_offsets(offsets=offsets)
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET:
            return
        raise


def watermarks(consumer: Consumer, topic: str, partition: int, timeout: float) -> tuple[int, int]:
    """(low, high) watermark offsets of one partition, retrying while its leader is not ready.

    A topic created moments ago (or a partition whose leader is moving) answers
    NOT_LEADER_FOR_PARTITION or LEADER_NOT_AVAILABLE for a while; that is worth waiting out, up
    to `timeout` seconds in all, rather than failing the command.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=max(deadline - time.monotonic(), 1.0)
            )
            return low, high
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if (
                not isinstance(error, KafkaError)
                or (not error.retriable() and error.code() not in _LEADER_NOT_READY)
            ) or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


_LEADER_NOT_READY = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)
"""Answers of a partition whose leader is not serving yet."""

"""The limit: a pass-through that moves records from the input to the output topic untouched.

It does what the scorer does minus the scoring: the same consumer and producer configuration
(`Settings.consumer_config()` / `producer_config()`), the same batch poll, each record produced
with its key, its value bytes and the three `streamer.source.*` headers, and its offset stored
only once the output is acknowledged (at-least-once, as the scorer, with the same per-partition
delivery tracking). No decoding, validation, features, model or encoding. The bench runs it as a
process of its own, like `streamer run`, so both are measured the same way; its events/s and
latency are the ceiling for the scorer.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from types import FrameType
from typing import Final

import structlog
from confluent_kafka import Consumer, TopicPartition

from streamer.errors import DeliveryFailedError, KafkaFatalError
from streamer.headers import SOURCE_OFFSET, source_header_prefix
from streamer.kafka.clients import (
    ClientErrors,
    KafkaMessage,
    OutputProducer,
    commit_positions,
    create_consumer,
    poll_batch,
    store_positions,
)
from streamer.kafka.delivery import DeliveryTracker
from streamer.settings import Settings

log = structlog.get_logger(__name__)

JOIN_GRACE_SECONDS: Final = 60.0
"""As the scorer: with `until_idle`, how long a first assignment may take before idleness counts."""
FLUSH_SECONDS: Final = 30.0


class PassThrough:
    """Consume → produce the same bytes → store offsets after delivery, until stopped or idle."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer_errors = ClientErrors("consumer")
        self._consumer = create_consumer(settings.consumer_config(), self._consumer_errors)
        self._producer = OutputProducer(settings.producer_config())
        self._tracker = DeliveryTracker()
        self._stopping = False
        self._assigned_at: float | None = None
        self.forwarded = 0

    def stop(self, *_: object) -> None:
        """Finish the batch, flush, commit and return. Safe in a signal handler."""
        self._stopping = True

    def install_signal_handlers(self) -> None:
        def handler(_signum: int, _frame: FrameType | None) -> None:
            self.stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def run(self, until_idle: float | None = None) -> int:
        """Forward records until stopped (or idle for `until_idle` s); returns how many."""
        settings = self._settings
        self._consumer.subscribe(
            [settings.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        consumer, producer, tracker = self._consumer, self._producer, self._tracker
        produce = producer.produce
        output_topic = settings.output_topic
        started = last_record = time.monotonic()
        try:
            while not self._stopping:
                messages = poll_batch(consumer, settings.batch_size, settings.poll_timeout)
                self._consumer_errors.raise_if_fatal()
                records = []
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.fatal():
                            raise KafkaFatalError(f"consumer: {error.str()}")
                        log.warning("consumer error", error=error.str())
                        continue
                    records.append(message)
                # As the scorer: one tracked run and header prefix per partition.
                sources = [_source(message) for message in records]
                keys = [message.key() for message in records]
                values = [message.value() for message in records]
                callbacks = tracker.track_batch(sources, keys, values)
                prefixes = {(t, p): source_header_prefix(t, p) for t, p, _ in sources}
                for key, value, (topic, partition, offset), on_delivery in zip(
                    keys, values, sources, callbacks, strict=True
                ):
                    topic_header, partition_header = prefixes[(topic, partition)]
                    produce(
                        output_topic,
                        key,
                        value,
                        [topic_header, partition_header, (SOURCE_OFFSET, str(offset).encode())],
                        on_delivery,
                    )
                self.forwarded += len(records)
                if messages:
                    last_record = time.monotonic()
                producer.poll(0)
                self._check_deliveries()
                store_positions(consumer, tracker.take_advanced())
                if until_idle is not None:
                    now = time.monotonic()
                    since = (
                        started + JOIN_GRACE_SECONDS
                        if self._assigned_at is None
                        else max(last_record, self._assigned_at)
                    )
                    if now - since >= until_idle and tracker.in_flight() == 0:
                        break
        finally:
            try:
                self._flush_and_commit()
            finally:
                consumer.close()
        self._check_deliveries()
        log.info("pass-through stopped", forwarded=self.forwarded)
        return self.forwarded

    def _check_deliveries(self) -> None:
        self._producer.errors.raise_if_fatal()
        failures = self._tracker.failures
        if failures:
            first = failures[0]
            raise DeliveryFailedError(
                f"output for {first.topic}[{first.partition}]@{first.offset} was not delivered: "
                f"{first.error.str()}"
            )

    def _flush_and_commit(self, partitions: Sequence[TopicPartition] = ()) -> None:
        remaining = self._producer.flush(FLUSH_SECONDS)
        if remaining:
            log.error("outputs not acknowledged in time", in_flight=remaining)
        keys = [(tp.topic, tp.partition) for tp in partitions] if partitions else None
        commit_positions(self._consumer, self._tracker.positions(keys))

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = time.monotonic()
        log.info(
            "partitions assigned", partitions=[f"{p.topic}[{p.partition}]" for p in partitions]
        )

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            self._flush_and_commit(partitions)
        except Exception as exc:  # never raise inside a librdkafka callback
            log.error("commit at revoke failed", error=repr(exc))
        self._tracker.forget((p.topic, p.partition) for p in partitions)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member owns these now: committing for them would be wrong.
        self._tracker.forget((p.topic, p.partition) for p in partitions)


def _source(message: KafkaMessage) -> tuple[str, int, int]:
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None
    assert partition is not None
    assert offset is not None
    return topic, partition, offset

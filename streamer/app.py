"""The scoring loop: poll a batch → decode → validate → score → produce → commit offsets.

At-least-once (the default), nothing lost: an input offset is stored for commit only when the
verdict or dead letter of that record, and of every earlier record of its partition, has been
acknowledged by the broker (see `kafka.delivery`). Librdkafka commits stored offsets every second;
on partition revoke and on shutdown we flush the producer and commit synchronously. A failed
delivery stops the scorer rather than skipping the record.

Exactly-once: the verdicts, dead letters and input offsets of every `transaction_interval` of
batches are committed in one Kafka transaction (see `kafka.transactions`). An aborted transaction
rewinds the consumer to the committed offsets, so its records are scored again; a fenced scorer
stops. Readers with `isolation.level=read_committed` see each verdict once.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

import numpy as np
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from streamer.errors import (
    DeliveryFailedError,
    FencedError,
    KafkaFatalError,
    RecordError,
    ScoreError,
)
from streamer.features import build_features_from_columns
from streamer.headers import (
    CONSUMER_GROUP,
    ERROR_CAUSE,
    ERROR_CLASS,
    ERROR_REASON,
    ERROR_STAGE,
    SOURCE_OFFSET,
    SOURCE_TIMESTAMP,
    source_header_prefix,
    source_headers,
)
from streamer.kafka.clients import (
    ClientErrors,
    KafkaMessage,
    OutputProducer,
    commit_positions,
    create_consumer,
    poll_batch,
    store_positions,
)
from streamer.kafka.delivery import DeliveryCallback, DeliveryFailure, DeliveryTracker
from streamer.kafka.transactions import AbortableError, Transactions
from streamer.model.scorer import Scorer
from streamer.serde import TransactionBatch, decode_and_validate, encode_verdicts
from streamer.settings import Settings

log = structlog.get_logger(__name__)


MAX_REASON_BYTES: Final = 1000
JOIN_GRACE_SECONDS: Final = 60.0
"""With `until_idle`, how long to wait for a first assignment before idleness counts: joining a
group on a freshly started broker waits for its group coordinator to load."""
SHUTDOWN_FLUSH_SECONDS: Final = 30.0
"""How long a stop waits for outstanding acknowledgements before committing what is safe."""
MAX_ABORTS_IN_A_ROW: Final = 5
"""Exactly-once: transactions aborted one after another, with no commit between, before stopping."""
_TRANSIENT_DELIVERY_ERRORS: Final = frozenset(
    {KafkaError._MSG_TIMED_OUT, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
)


@dataclass(slots=True)
class Counters:
    """What the scorer has done since it started."""

    consumed: int = 0
    verdicts: int = 0
    dead_letters: int = 0
    flagged: int = 0
    aborted_transactions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class ScoringApp:
    """Consumes transactions and publishes one verdict or dead letter per record.

    Build it with `ScoringApp.create(settings, scorer)`; `run()` blocks until `stop()` is called
    (SIGINT/SIGTERM do that) or, with `until_idle`, until nothing arrived for that long.
    """

    def __init__(
        self,
        settings: Settings,
        scorer: Scorer,
        consumer: Consumer,
        consumer_errors: ClientErrors,
        producer: OutputProducer,
        transactions: Transactions | None = None,
    ) -> None:
        self._settings = settings
        self._scorer = scorer
        self._consumer = consumer
        self._consumer_errors = consumer_errors
        self._producer = producer
        self._transactions = transactions
        self._tracker = DeliveryTracker()
        self.counters = Counters()
        # Exactly-once: the next offset to read per partition, for the open transaction; the
        # counters as of the last commit (an abort puts them back); an error a callback raised.
        self._positions: dict[tuple[str, int], int] = {}
        self._committed_counters = Counters()
        self._aborts_in_a_row = 0
        self._callback_error: BaseException | None = None
        self._stopping = False
        self._output_topic = settings.output_topic
        self._dlq_topic = settings.dlq_topic
        self._group = settings.group_id.encode()
        self._model_name = scorer.name
        self._model_version = scorer.version
        self._threshold = scorer.threshold
        self._started = time.monotonic()
        self._assigned_at: float | None = None
        self._stop_signal: str | None = None

    @classmethod
    def create(cls, settings: Settings, scorer: Scorer) -> ScoringApp:
        consumer_errors = ClientErrors("consumer")
        consumer = create_consumer(settings.consumer_config(), consumer_errors)
        if not settings.exactly_once:
            producer = OutputProducer(settings.producer_config())
            return cls(settings, scorer, consumer, consumer_errors, producer)
        producer = OutputProducer(settings.producer_config(transactional=True))
        transactions = Transactions(producer, consumer, settings.transactional_id())
        try:
            transactions.init()
        except BaseException:
            consumer.close()
            raise
        log.info("transactions ready", transactional_id=transactions.transactional_id)
        return cls(settings, scorer, consumer, consumer_errors, producer, transactions)

    # -- lifecycle -------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its batch, flush, commit and return. Safe in a signal handler."""
        self._stopping = True

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            # Only flip flags here; the loop logs, outside the handler.
            self._stop_signal = signal.Signals(signum).name
            self.stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def run(self, until_idle: float | None = None) -> Counters:
        """Consume, score and publish until stopped; then flush, commit and close."""
        settings = self._settings
        self._consumer.subscribe(
            [settings.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        started = last_record = time.monotonic()
        self._started = started
        next_progress = started + settings.progress_interval
        last_counters = (started, 0)
        transactions = self._transactions
        try:
            while not self._stopping:
                messages = poll_batch(self._consumer, settings.batch_size, settings.poll_timeout)
                self._raise_pending()
                if messages:
                    if transactions is None:
                        self.process(messages)
                    else:
                        self._process_in_transaction(transactions, messages)
                    last_record = time.monotonic()
                self._producer.poll(0)
                if transactions is None:
                    self._check_deliveries()
                    self._store_offsets()
                else:
                    self._maintain_transaction(transactions)
                now = time.monotonic()
                if now >= next_progress:
                    last_counters = self._log_progress(now, last_counters)
                    next_progress = now + settings.progress_interval
                if until_idle is not None and self._idle_for(until_idle, now, last_record):
                    log.info("idle, stopping", idle_seconds=until_idle)
                    break
        except BaseException:
            self._shutdown(clean=False)
            raise
        if self._stop_signal is not None:
            log.info("stop requested", signal=self._stop_signal)
        self._shutdown(clean=True)
        if transactions is None:
            self._check_deliveries()
        return self.counters

    def _raise_pending(self) -> None:
        self._consumer_errors.raise_if_fatal()
        error, self._callback_error = self._callback_error, None
        if error is not None:
            raise error

    def _idle_for(self, seconds: float, now: float, last_record: float) -> bool:
        """Nothing consumed for `seconds` (nor assigned since) and nothing in flight."""
        if self._assigned_at is None:
            idle_since = self._started + JOIN_GRACE_SECONDS
        else:
            idle_since = max(last_record, self._assigned_at)
        in_transaction = self._transactions is not None and self._transactions.is_open
        return now - idle_since >= seconds and self._tracker.in_flight() == 0 and not in_transaction

    def _shutdown(self, *, clean: bool) -> None:
        """Leave nothing half-done: commit what is safe, then close the consumer.

        Exactly-once after an error commits nothing: a batch may be half-produced, so its
        transaction is aborted and the records are scored again by whoever reads them next.
        """
        try:
            if self._transactions is None:
                self._flush_and_commit()
            elif clean:
                self._commit_transaction(self._transactions, rewind=False)
            else:
                self._abort_quietly("the scorer is stopping on an error")
        finally:
            self._consumer.close()
        # Exactly-once reports failed deliveries only; its commits count what was delivered.
        acknowledged = (
            {"acknowledged": self._tracker.acknowledged_total} if self._transactions is None else {}
        )
        log.info("scorer stopped", **acknowledged, **self.counters.as_dict())

    # -- the hot path ----------------------------------------------------------------------------

    def process(self, messages: Sequence[KafkaMessage]) -> None:
        """Turn one polled batch into verdicts and dead letters (produced, not yet acknowledged).

        Decoding and validation run over the whole batch (`serde.decode_and_validate`); the
        records that fail are dead-lettered with the same reasons the per-record path gives.
        """
        consumed: list[KafkaMessage] = []
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_consumer_error(error)
                continue
            consumed.append(message)
        if not consumed:
            return
        self.counters.consumed += len(consumed)
        keys = [message.key() for message in consumed]
        batch = decode_and_validate(
            [message.value() for message in consumed], keys, self._settings.max_event_bytes
        )
        scores: list[float] = []
        values: list[bytes] = []
        if batch.indexes:
            scores = self._score(batch).tolist()
            values = encode_verdicts(
                batch,
                scores,
                threshold=self._threshold,
                model_name=self._model_name,
                model_version=self._model_version,
                scored_at=time.time_ns() // 1_000_000,
            )
        self._publish(consumed, keys, batch, scores, values)

    def _publish(
        self,
        consumed: list[KafkaMessage],
        keys: list[bytes | None],
        batch: TransactionBatch,
        scores: list[float],
        values: list[bytes],
    ) -> None:
        """Produce every record's verdict or dead letter, in consume order.

        The order matters: the delivery tracker advances each partition's commit position over
        offsets in the order they were tracked. The topic and partition headers are built once per
        partition of the batch.
        """
        sources = [_source(message) for message in consumed]
        # Each record's output value, filled as it is produced: names the input of a failure.
        outputs: list[bytes | None] = []
        if self._transactions is None:
            callbacks = self._tracker.track_batch(sources, keys, outputs)
        else:
            # The transaction's commit waits for every output; only failures are reported.
            callbacks = [self._tracker.failure_callback(sources, keys, outputs)] * len(sources)
        prefixes = {
            (topic, partition): source_header_prefix(topic, partition)
            for topic, partition, _ in sources
        }
        errors = dict(batch.errors)
        threshold = self._threshold
        produce = self._producer.produce
        output_topic = self._output_topic
        flagged = verdicts = 0
        good = 0
        for index, message in enumerate(consumed):
            on_delivery = callbacks[index]
            record_error = errors.get(index)
            if record_error is None:
                score = scores[good]
                value = values[good]
                good += 1
                if not 0.0 <= score <= 1.0:  # also catches NaN
                    record_error = ScoreError(f"model returned score {score!r}")
            if record_error is not None:
                outputs.append(message.value())
                self._dead_letter(message, record_error, on_delivery)
                continue
            flagged += score >= threshold
            topic, partition, offset = sources[index]
            topic_header, partition_header = prefixes[(topic, partition)]
            outputs.append(value)
            produce(
                output_topic,
                keys[index],
                value,
                [topic_header, partition_header, (SOURCE_OFFSET, str(offset).encode())],
                on_delivery,
            )
            verdicts += 1
        assert good == len(scores), "every decoded record was scored once"
        self.counters.verdicts += verdicts
        self.counters.flagged += flagged

    def _score(self, batch: TransactionBatch) -> np.ndarray:
        """Score the batch in one call; if the model fails, isolate the records it fails on."""
        features = build_features_from_columns(batch.columns)
        try:
            return self._scorer.score(features)
        except Exception as exc:  # the model is third-party code; a failure must not lose records
            log.warning("batch scoring failed, scoring records one by one", error=repr(exc))
        scores = np.empty(len(features))
        for index in range(len(features)):
            try:
                scores[index] = self._scorer.score(features[index : index + 1])[0]
            except Exception as exc:  # as above; NaN routes the record to the dead-letter topic
                log.warning("record scoring failed", error=repr(exc))
                scores[index] = np.nan
        return scores

    def _dead_letter(
        self, message: KafkaMessage, error: RecordError, on_delivery: DeliveryCallback
    ) -> None:
        topic, partition, offset = _source(message)
        reason = str(error).encode()[:MAX_REASON_BYTES]
        headers = [
            (ERROR_STAGE, error.stage.encode()),
            (ERROR_REASON, reason),
            (ERROR_CLASS, f"{type(error).__module__}.{type(error).__qualname__}".encode()),
            *source_headers(topic, partition, offset),
            (SOURCE_TIMESTAMP, str(message.timestamp()[1]).encode()),
            (CONSUMER_GROUP, self._group),
        ]
        cause = error.__cause__
        if cause is not None:
            headers.append((ERROR_CAUSE, f"{type(cause).__qualname__}: {cause}".encode()[:500]))
        log.warning(
            "dead letter",
            stage=error.stage,
            reason=str(error)[:200],
            topic=topic,
            partition=partition,
            offset=offset,
        )
        self._producer.produce(
            self._dlq_topic,
            message.key(),
            message.value(),
            headers,
            on_delivery,
        )
        self.counters.dead_letters += 1

    # -- offsets and errors ----------------------------------------------------------------------

    def _check_deliveries(self) -> None:
        self._producer.errors.raise_if_fatal()
        failures = self._tracker.failures
        if failures:
            raise DeliveryFailedError(
                _describe_failures(failures) + "; offsets stay uncommitted from there"
            )

    def _store_offsets(self) -> None:
        store_positions(self._consumer, self._tracker.take_advanced())

    # -- exactly-once ----------------------------------------------------------------------------

    def _process_in_transaction(
        self, transactions: Transactions, messages: Sequence[KafkaMessage]
    ) -> None:
        transactions.begin()
        try:
            self.process(messages)
        except KafkaException as exc:
            # Once a transaction has failed (a delivery refused, say), librdkafka refuses
            # further records in it: abort, and read the batch again in a new transaction.
            self._abort_and_rewind(transactions, f"producing failed: {exc}")
            return
        self._advance_positions(messages)

    def _advance_positions(self, messages: Sequence[KafkaMessage]) -> None:
        positions = self._positions
        for message in messages:
            if message.error() is None:
                topic, partition, offset = _source(message)
                positions[(topic, partition)] = offset + 1

    def _maintain_transaction(self, transactions: Transactions) -> None:
        """Abort at the first failed delivery; commit once the transaction is old enough."""
        if self._tracker.failures:
            self._abort_and_rewind(transactions, "an output was not delivered")
        elif (
            transactions.opened_at is not None
            and time.monotonic() - transactions.opened_at >= self._settings.transaction_interval
        ):
            self._commit_transaction(transactions, rewind=True)

    def _commit_transaction(self, transactions: Transactions, *, rewind: bool) -> None:
        if not transactions.is_open:
            return
        # Wait for the deliveries first: a refused output shows up here, with its reason, rather
        # than as a transaction that cannot commit.
        with transactions.watchdog.guard("flush", SHUTDOWN_FLUSH_SECONDS):
            remaining = self._producer.flush(SHUTDOWN_FLUSH_SECONDS)
        if self._tracker.failures or remaining:
            reason = f"an output was not delivered ({remaining} unacknowledged after the wait)"
            if rewind:
                self._abort_and_rewind(transactions, reason)
            else:
                self._abort(transactions, reason)
            return
        try:
            transactions.commit(self._positions)
        except AbortableError as exc:
            if rewind:
                self._abort_and_rewind(transactions, str(exc))
            else:
                self._abort(transactions, str(exc))
            return
        self._positions.clear()
        self._tracker = DeliveryTracker()
        self._aborts_in_a_row = 0
        self._committed_counters = dataclasses.replace(self.counters)

    def _abort(self, transactions: Transactions, reason: str) -> None:
        """Abort the open transaction and forget what it did; stop if it cannot succeed."""
        self._producer.poll(0)  # serve the delivery reports that say why, if any are queued
        failures = self._tracker.failures
        permanent = [f for f in failures if f.error.code() not in _TRANSIENT_DELIVERY_ERRORS]
        transactions.abort(reason)
        aborted = self.counters.aborted_transactions + 1
        self.counters = dataclasses.replace(self._committed_counters, aborted_transactions=aborted)
        self._committed_counters.aborted_transactions = aborted
        self._positions.clear()
        self._tracker = DeliveryTracker()
        if permanent:
            described = _describe_failures(permanent)
            raise DeliveryFailedError(f"{described}; the transaction is aborted")
        self._aborts_in_a_row += 1
        if self._aborts_in_a_row >= MAX_ABORTS_IN_A_ROW:
            raise KafkaFatalError(
                f"{self._aborts_in_a_row} transactions aborted in a row, the last because: "
                f"{reason}; stopping with nothing committed past the last good transaction"
            )

    def _abort_and_rewind(self, transactions: Transactions, reason: str) -> None:
        self._abort(transactions, reason)
        self._rewind()

    def _abort_quietly(self, reason: str) -> None:
        assert self._transactions is not None
        try:
            self._transactions.abort(reason)
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

    def _flush_and_commit(self, partitions: Sequence[TopicPartition] = ()) -> None:
        """Wait for outstanding outputs, then commit the safe positions of `partitions` (or all).

        Outputs still unacknowledged after the wait keep their inputs uncommitted, so whoever
        consumes these partitions next redoes them.
        """
        remaining = self._producer.flush(SHUTDOWN_FLUSH_SECONDS)
        if remaining:
            log.error(
                "outputs not acknowledged in time; their inputs stay uncommitted",
                in_flight=remaining,
            )
        keys = [(tp.topic, tp.partition) for tp in partitions] if partitions else None
        positions = self._tracker.positions(keys)
        commit_positions(self._consumer, positions)
        if positions:
            log.debug("committed", positions=positions)

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = time.monotonic()
        log.info(
            "partitions assigned", partitions=[f"{p.topic}[{p.partition}]" for p in partitions]
        )

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Runs inside consume() on the main thread. Wait for the outputs of the records we read
        # from these partitions, then commit what is safe so the next owner starts after them.
        try:
            if self._transactions is None:
                self._flush_and_commit(partitions)
            else:
                self._commit_transaction(self._transactions, rewind=False)
        except Exception as exc:  # never raise inside a librdkafka callback
            log.error("commit at revoke failed", error=repr(exc))
            if self._transactions is not None:
                self._callback_error = exc
        self._tracker.forget((p.topic, p.partition) for p in partitions)
        log.info("partitions revoked", partitions=[f"{p.topic}[{p.partition}]" for p in partitions])

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group moved on without us: another member owns these now; committing would be wrong.
        self._tracker.forget((p.topic, p.partition) for p in partitions)
        log.warning("partitions lost", partitions=[f"{p.topic}[{p.partition}]" for p in partitions])
        if self._transactions is not None:
            # A zombie: whatever it wrote must never become visible. Abort, then stop.
            self._abort_quietly("partitions lost")
            self._callback_error = FencedError(
                "the consumer group moved on without this scorer (partitions lost: it was "
                "unresponsive past max.poll.interval.ms or session.timeout.ms); its open "
                "transaction is aborted and nothing it wrote is visible; restart it"
            )

    def _on_consumer_error(self, error: KafkaError) -> None:
        if error.fatal():
            raise KafkaFatalError(f"consumer: {error.str()}")
        if self._transactions is not None and error.code() == KafkaError._MAX_POLL_EXCEEDED:
            self._abort_quietly("max.poll.interval.ms exceeded")
            raise FencedError(
                f"consumer: {error.str()}; the group has moved on without this scorer, its open "
                "transaction is aborted and nothing it wrote is visible; restart it"
            )
        log.warning("consumer error", error=error.str(), code=error.name())

    def _log_progress(self, now: float, last: tuple[float, int]) -> tuple[float, int]:
        since, consumed_before = last
        counters = self.counters
        rate = (counters.consumed - consumed_before) / max(now - since, 1e-9)
        scored = counters.verdicts
        log.info(
            "progress",
            events_per_second=round(rate, 1),
            fraud_rate=round(counters.flagged / scored, 4) if scored else 0.0,
            in_flight=self._tracker.in_flight()
            if self._transactions is None
            else len(self._producer),
            **counters.as_dict(),
        )
        return now, counters.consumed


def _describe_failures(failures: Sequence[DeliveryFailure]) -> str:
    first = failures[0]
    return (
        f"output for {first.topic}[{first.partition}]@{first.offset} was not delivered: "
        f"{first.error.str()} ({len(failures)} failed)"
    )


def _source(message: KafkaMessage) -> tuple[str, int, int]:
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None
    assert partition is not None
    assert offset is not None
    return topic, partition, offset

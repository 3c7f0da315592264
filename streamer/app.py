"""The scoring loop: poll a batch → pipeline → outputs → checkpoint.

Each turn polls what the consumer has fetched, scores it with the pipeline (`streamer.pipeline`:
decode, validate, card-history features, model, verdicts) against the card state of the batch's
partitions, produces one verdict or dead letter per record in consume order, and lets the
checkpoint (`kafka.checkpoint`) decide when outputs, state changes and offsets commit. The loop
does not know the delivery guarantee: the checkpoint it was built with does.

Card history is kept per input partition (`state.store`) and restored from its changelog topic
(`kafka.changelog`) whenever partitions are assigned: those partitions stay paused until their
state is back, so no record is scored against a partial history.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from types import FrameType
from typing import Any, Final

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streamer.errors import (
    ConfigError,
    FencedError,
    KafkaFatalError,
    RecordError,
    SchemaRegistryUnavailableError,
)
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
from streamer.kafka.changelog import Restorer, changelog_topic, ensure_changelog
from streamer.kafka.checkpoint import AtLeastOnce, Changelog, Checkpoint, ExactlyOnce
from streamer.kafka.clients import (
    ClientErrors,
    KafkaMessage,
    OutputProducer,
    ReachabilityProbe,
    cluster_answers,
    create_consumer,
    poll_batch,
)
from streamer.kafka.delivery import DeliveryCallback, Source
from streamer.kafka.transactions import Transactions
from streamer.metrics import (
    DEAD_LETTER_STAGES,
    LIVENESS_SECONDS,
    STATE_EVERY_SECONDS,
    STATISTICS_INTERVAL_MS,
    ScorerMetrics,
)
from streamer.model.scorer import Scorer
from streamer.model.slot import ModelSlot
from streamer.pipeline import BatchDecoder, Histories, Pipeline, Scored
from streamer.serde import decode_and_validate
from streamer.settings import Settings
from streamer.shadow import Shadow, ShadowBatch
from streamer.state.card import CARD_HISTORY_CODEC, CardHistory
from streamer.state.store import KeyedStore

log = structlog.get_logger(__name__)


MAX_REASON_BYTES: Final = 1000
JOIN_GRACE_SECONDS: Final = 60.0
"""With `until_idle`, how long to wait for a first assignment before idleness counts: joining a
group on a freshly started broker waits for its group coordinator to load."""
CARD_STORE: Final = "card-state"
"""The card history store; its changelog is `<group id>-card-state-changelog`."""
RESTORE_STEP_SECONDS: Final = 0.2
"""Changelog reading per loop turn while restoring (the consumer is polled between steps)."""
REGISTRY_BACKOFF_SECONDS: Final = (0.5, 30.0)
"""First and longest wait before a batch the Schema Registry failed is read again; doubles."""


@dataclass(slots=True)
class Counters:
    """What the scorer has done since it started (work in aborted transactions included)."""

    consumed: int = 0
    verdicts: int = 0
    dead_letters: int = 0
    flagged: int = 0
    aborted_transactions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class CardState:
    """The card history store of the partitions this scorer owns, and its restorer.

    Without a store (`STREAMER_CARD_STATE=false`) every batch is scored against empty histories.
    """

    def __init__(self, store: KeyedStore[CardHistory] | None, restorer: Restorer | None) -> None:
        self.store = store
        self.restorer = restorer


_PARTITION = itemgetter(1)
_OFFSET = itemgetter(2)
"""Fields of a `Source`."""


class BatchState:
    """The `StateView` of one polled batch: the histories of its records' partitions."""

    __slots__ = ("_partitions", "_rows", "_store", "_view")

    def __init__(self, store: KeyedStore[CardHistory], partitions: Sequence[int]) -> None:
        self._store = store
        self._partitions = partitions
        self._view: dict[str, CardHistory] = {}
        self._rows: list[int] = []

    def checkout(self, rows: Sequence[int], card_ids: Sequence[str]) -> dict[str, CardHistory]:
        self._rows = list(map(self._partitions.__getitem__, rows))
        self._view = self._store.checkout(self._rows, card_ids)
        return self._view

    def checkin(
        self, card_ids: Sequence[str], event_times: Sequence[int], sources: Sequence[Source]
    ) -> None:
        """Take the updated histories back, with each partition's new position and time."""
        # Offsets ascend within a partition: its last source is its latest.
        latest = dict(zip(map(_PARTITION, sources), map(_OFFSET, sources), strict=True))
        positions = {partition: offset + 1 for partition, offset in latest.items()}
        rows = self._rows
        stream_times: dict[int, int] = {}
        if rows and rows.count(rows[0]) == len(rows):
            stream_times[rows[0]] = max(event_times)
        else:
            for partition, event_time in zip(rows, event_times, strict=True):
                if event_time > stream_times.get(partition, -1):
                    stream_times[partition] = event_time
        self._store.checkin(self._view, rows, card_ids, positions, stream_times)


class ScoringApp:
    """Consumes transactions and publishes one verdict or dead letter per record.

    Build it with `ScoringApp.create(settings, scorer)`; `run()` blocks until `stop()` is called
    (SIGINT/SIGTERM do that) or, with `until_idle`, until nothing arrived for that long.
    """

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        consumer: Consumer,
        consumer_errors: ClientErrors,
        producer: OutputProducer,
        checkpoint: Checkpoint,
        state: CardState,
        metrics: ScorerMetrics | None = None,
        slot: ModelSlot | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._consumer = consumer
        self._consumer_errors = consumer_errors
        self._producer = producer
        self._checkpoint = checkpoint
        self._state = state
        self.counters = Counters()
        self._stopping = False
        self._output_topic = settings.output_topic
        self._dlq_topic = settings.dlq_topic
        self._group = settings.group_id.encode()
        self._started = time.monotonic()
        self._assigned_at: float | None = None
        self._ready_at: float | None = None
        """When the last restore ended (idleness counts from then)."""
        self._to_restore: list[TopicPartition] = []
        self._restoring: dict[int, TopicPartition] = {}
        self._stop_signal: str | None = None
        self._retry_at = 0.0
        """Monotonic time before which nothing is polled (the Schema Registry failed a batch)."""
        self._retry_wait = REGISTRY_BACKOFF_SECONDS[0]
        self._metrics = metrics
        if metrics is not None:
            metrics.lag.read_committed = settings.exactly_once
            metrics.lag.committed = checkpoint.committed_positions
        self.dead_letters_by_stage: dict[str, int] = dict.fromkeys(DEAD_LETTER_STAGES, 0)
        self._assigned: list[tuple[str, int]] = []
        self._turned_at = time.monotonic()
        """When the loop last turned (for `/livez`)."""
        # Every broker lost: the clients retry by themselves; this notices when one answers.
        self._probe = ReachabilityProbe(
            consumer, [consumer_errors, *(errors for _, errors in checkpoint.producer_errors)]
        )
        self._slot = slot
        """Watches the model files; its new scorer goes into the pipeline between batches."""
        self._shadow = shadow
        self._shadow_topic = settings.shadow_topic
        self.shadow_delivery_failures = 0
        if metrics is not None:
            metrics.shadow_active.set(shadow is not None)

    @classmethod
    def create(
        cls, settings: Settings, scorer: Scorer, metrics: ScorerMetrics | None = None
    ) -> ScoringApp:
        """The scorer's clients, checkpoint and state, for `settings.processing_guarantee`.

        Creates the card state's changelog topic if missing (`kafka.changelog.ensure_changelog`).
        With `metrics`, the consumer reports librdkafka statistics (consumer lag) to it.
        """
        shadow = None
        if settings.shadow_model_path is not None:
            shadow = Shadow.load(settings.shadow_model_path)
        store_topic = changelog_topic(settings.group_id, CARD_STORE)
        changelogs: list[Changelog] = []
        state = CardState(None, None)
        if settings.card_state:
            ensure_changelog(settings.admin_config(), store_topic, settings.input_topic)
            store = KeyedStore(CARD_STORE, CARD_HISTORY_CODEC, keep_undo=settings.exactly_once)
            changelogs.append(Changelog(store, store_topic))
            restorer = Restorer(settings.changelog_reader_config(), store, store_topic)
            state = CardState(store, restorer)
        pipeline = Pipeline(
            scorer, max_event_bytes=settings.max_event_bytes, decode=_input_decoder(settings)
        )
        consumer_errors = ClientErrors("consumer")
        if metrics is None:
            consumer_config = settings.consumer_config()
        else:
            consumer_config = settings.consumer_config(
                statistics_interval_ms=STATISTICS_INTERVAL_MS
            )
            consumer_config["stats_cb"] = metrics.lag
        consumer = create_consumer(consumer_config, consumer_errors)
        checkpoint: Checkpoint
        if settings.exactly_once:
            producer = OutputProducer(settings.producer_config(transactional=True))
            transactions = Transactions(
                producer,
                consumer,
                settings.transactional_id(),
                cluster_answers=functools.partial(cluster_answers, producer.client),
            )
            try:
                transactions.init()
            except BaseException:
                consumer.close()
                raise
            log.info("transactions ready", transactional_id=transactions.transactional_id)
            checkpoint = ExactlyOnce(
                consumer,
                producer,
                changelogs,
                settings.transaction_interval,
                transactions,
                consumer_errors,
            )
        else:
            producer = OutputProducer(settings.producer_config())
            # The changelog has a producer of its own, so verdicts never wait behind its records
            # (one request in flight per broker); exactly-once needs the one transaction.
            changelog_producer = (
                OutputProducer(settings.producer_config(), name="changelog producer")
                if changelogs
                else None
            )
            checkpoint = AtLeastOnce(
                consumer, producer, changelogs, settings.commit_interval, changelog_producer
            )
        slot = ModelSlot(scorer, settings.model_path, threshold=settings.threshold)
        return cls(
            settings,
            pipeline,
            consumer,
            consumer_errors,
            producer,
            checkpoint,
            state,
            metrics,
            slot,
            shadow,
        )

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
        slot = self._slot
        sighup = getattr(signal, "SIGHUP", None)
        if slot is not None and sighup is not None:
            signal.signal(sighup, lambda _signum, _frame: slot.request_check())

    @property
    def ready(self) -> bool:
        """Partitions assigned and their state restored: records are being scored."""
        return self._assigned_at is not None and not self._to_restore and not self._restoring

    # -- what metrics and health checks read (from the HTTP server's thread) ---------------------

    def metric_counts(self) -> dict[str, int]:
        counters = self.counters
        return {
            "consumed": counters.consumed,
            "verdicts": counters.verdicts,
            "flagged": counters.flagged,
            "commits": self._checkpoint.committed,
            "aborted_transactions": self._checkpoint.aborted,
        }

    def dead_letter_counts(self) -> dict[str, int]:
        return self.dead_letters_by_stage.copy()

    def model_info(self) -> dict[str, str]:
        scorer = self._pipeline.scorer
        return {
            "name": scorer.name,
            "version": scorer.version,
            "sha256": scorer.sha256,
            "threshold": repr(scorer.threshold),
        }

    def assigned_partitions(self) -> int:
        return len(self._assigned)

    def readiness(self) -> list[str]:
        """The readiness checks that fail; empty when the scorer is scoring."""
        checkpoint_errors = self._checkpoint.producer_errors
        failing = []
        if self._stopping:
            failing.append("stopping")
        if not self._assigned:
            failing.append("no partitions assigned")
        restoring = sorted({tp.partition for tp in self._to_restore} | set(self._restoring))
        if restoring:
            failing.append(f"restoring state of partitions {restoring}")
        for client, errors in (("consumer", self._consumer_errors), *checkpoint_errors):
            if errors.fatal is not None:
                failing.append(f"{client} fatal error: {errors.fatal.str()}")
        return failing

    def liveness(self) -> str | None:
        """Why the loop is not live (it has not turned for `LIVENESS_SECONDS`), or None.

        A loop blocked in a client call that waits for brokers of which none answers is live:
        a restart would not bring them back (and would fail its start-up check meanwhile)."""
        stalled = time.monotonic() - self._turned_at
        if stalled <= LIVENESS_SECONDS or self._checkpoint.waiting_for_brokers:
            return None
        reason = (
            f"the scoring loop has not turned for {stalled:.0f}s (limit {LIVENESS_SECONDS:.0f}s)"
        )
        guarding = self._checkpoint.guarding
        if guarding is not None:
            reason += f"; in {guarding[0]} for {guarding[1]:.0f}s"
        return reason

    def run(self, until_idle: float | None = None) -> Counters:
        """Consume, score and publish until stopped; then commit and close."""
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
        checkpoint = self._checkpoint
        metrics = self._metrics
        next_state = started
        try:
            while not self._stopping:
                self._restore()
                timeout = 0.0 if self._restoring else settings.poll_timeout
                wait = self._retry_at - time.monotonic()
                if wait > 0:  # the Schema Registry failed the last batch: give it time
                    time.sleep(min(wait, settings.poll_timeout))
                    messages = []
                else:
                    messages = poll_batch(self._consumer, settings.batch_size, timeout)
                self._raise_pending()
                if messages:
                    self.process(messages)
                    last_record = time.monotonic()
                if metrics is None:
                    checkpoint.maintain()
                else:
                    self._maintain_timed(metrics)
                self._raise_pending()
                if self._slot is not None:
                    self._reload(self._slot)
                now = self._turned_at = time.monotonic()
                self._probe.check(now)
                if metrics is not None and now >= next_state:
                    self._observe_state(metrics)
                    next_state = now + STATE_EVERY_SECONDS
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
        return self.counters

    def _reload(self, slot: ModelSlot) -> None:
        """Look after the model slot; swap its new scorer in if one is ready.

        Called between batches. Under exactly-once only while no transaction is open (right
        after a commit or an abort, before the next batch begins one): a transaction's verdicts
        all come from one model, so a partition switches models at one offset, also when an
        aborted transaction is read again.
        """
        refused = slot.refused
        slot.maintain()
        metrics = self._metrics
        if metrics is not None and slot.refused != refused:
            metrics.model_reload_failures.inc(slot.refused - refused)
        if not slot.ready or not self._checkpoint.at_boundary:
            return
        self._pipeline.scorer = slot.swap()
        if metrics is not None:
            metrics.model_reloads.inc()

    def _maintain_timed(self, metrics: ScorerMetrics) -> None:
        """`checkpoint.maintain`, timed as the `commit` stage when it commits or aborts."""
        checkpoint = self._checkpoint
        before = checkpoint.committed + checkpoint.aborted
        started = time.perf_counter()
        checkpoint.maintain()
        if checkpoint.committed + checkpoint.aborted != before:
            metrics.stage("commit", time.perf_counter() - started)

    def _observe_state(self, metrics: ScorerMetrics) -> None:
        store, restorer = self._state.store, self._state.restorer
        if store is None or restorer is None:
            return
        metrics.state(
            store.name,
            len(store),
            len(restorer.restoring),
            restorer.records,
            restorer.remaining(),
        )

    def _raise_pending(self) -> None:
        self._consumer_errors.raise_if_fatal()
        error, self._checkpoint.callback_error = self._checkpoint.callback_error, None
        if error is not None:
            raise error

    def _idle_for(self, seconds: float, now: float, last_record: float) -> bool:
        """Nothing consumed for `seconds` (nor assigned since), nothing restoring or pending.

        A batch to be read again (the Schema Registry failed it) counts as consumed at the end
        of its back-off.
        """
        if self._assigned_at is None:
            idle_since = self._started + JOIN_GRACE_SECONDS
        else:
            idle_since = max(last_record, self._assigned_at, self._ready_at or 0.0, self._retry_at)
        return (
            now - idle_since >= seconds
            and self.ready
            and not self._checkpoint.pending
            and self._checkpoint.in_flight() == 0
        )

    def _shutdown(self, *, clean: bool) -> None:
        """Leave nothing half-done: let the checkpoint commit or abort, then close the clients."""
        try:
            self._checkpoint.close(clean=clean)
        finally:
            if self._slot is not None:
                self._slot.close()
            if self._state.restorer is not None:
                self._state.restorer.close()
            self._consumer.close()
        self.counters.aborted_transactions = self._checkpoint.aborted
        acknowledged = self._checkpoint.acknowledged
        extra = {} if acknowledged is None else {"acknowledged": acknowledged}
        log.info("scorer stopped", **extra, **self.counters.as_dict())

    # -- state restore ---------------------------------------------------------------------------

    def _restore(self) -> None:
        """Start restoring newly assigned partitions; advance a restore under way."""
        restorer = self._state.restorer
        if restorer is None:
            return
        if self._to_restore:
            assigned, self._to_restore = self._to_restore, []
            committed = self._consumer.committed(assigned, timeout=30)
            self._restoring.update({tp.partition: tp for tp in assigned})
            restorer.start(
                {tp.partition: tp.offset if tp.offset >= 0 else None for tp in committed}
            )
        if self._restoring:
            finished = restorer.step(RESTORE_STEP_SECONDS)
            resumed = [self._restoring.pop(p) for p in finished if p in self._restoring]
            if resumed:
                self._consumer.resume(resumed)
            if not self._restoring:
                self._ready_at = time.monotonic()
                log.info("ready", partitions=restorer.restored)

    # -- the hot path ----------------------------------------------------------------------------

    def process(self, messages: Sequence[KafkaMessage]) -> None:
        """Turn one polled batch into verdicts and dead letters, handed to the checkpoint."""
        consumed: list[KafkaMessage] = []
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_consumer_error(error)
                continue
            consumed.append(message)
        if not consumed:
            return
        keys = [message.key() for message in consumed]
        sources = [_source(message) for message in consumed]
        values = [message.value() for message in consumed]
        metrics = self._metrics
        timer = None
        if metrics is not None:
            timer = metrics.timer
            timer.start()
        store = self._state.store
        try:
            if store is None:
                scored = self._pipeline.process(values, keys, Histories(), laps=timer)
            else:
                state = BatchState(store, [partition for _, partition, _ in sources])
                scored = self._pipeline.process(values, keys, state, laps=timer)
                columns = scored.batch.columns
                state.checkin(columns["card_id"], columns["event_time"], sources)
                if timer is not None:
                    timer.lap("features")
        except SchemaRegistryUnavailableError as exc:
            self._read_again_later(sources, exc)
            return
        self._retry_wait = REGISTRY_BACKOFF_SECONDS[0]
        self.counters.consumed += len(consumed)
        try:
            self._publish(consumed, keys, sources, scored.verdicts, scored.errors)
            if self._shadow is not None and self._shadow.active:
                self._publish_shadow(self._shadow, scored, keys, sources)
        except KafkaException as exc:
            self._checkpoint.failed(str(exc))
            return
        self._checkpoint.processed(sources)
        self.counters.flagged += scored.flagged
        if metrics is not None and timer is not None:
            timer.lap("produce")
            metrics.batch(
                len(consumed),
                timer.seconds,
                [message.timestamp()[1] for message in consumed],
                _scored_rows(scored),
                scored.scores,
            )

    def _read_again_later(
        self, sources: Sequence[Source], error: SchemaRegistryUnavailableError
    ) -> None:
        """Seek back to the batch's first records and wait before polling again.

        The pipeline raised before it touched the state and nothing of the batch was produced,
        so the batch is simply read again: its records are not dead-lettered for the registry's
        fault, and under exactly-once the open transaction holds only earlier batches.
        """
        first: dict[tuple[str, int], int] = {}
        for topic, partition, offset in sources:
            first.setdefault((topic, partition), offset)
        for (topic, partition), offset in first.items():
            self._consumer.seek(TopicPartition(topic, partition, offset))
        wait = self._retry_wait
        self._retry_at = time.monotonic() + wait
        self._retry_wait = min(wait * 2, REGISTRY_BACKOFF_SECONDS[1])
        log.warning(
            "schema registry unavailable, reading the batch again",
            error=str(error),
            retry_in_seconds=wait,
            records=len(sources),
        )

    def _publish(
        self,
        consumed: list[KafkaMessage],
        keys: list[bytes | None],
        sources: list[Source],
        verdicts: list[bytes | None],
        errors: dict[int, RecordError],
    ) -> None:
        """Produce every record's verdict or dead letter, in consume order.

        The order matters: the delivery tracker advances each partition's commit position over
        offsets in the order they were tracked. The topic and partition headers are built once per
        partition of the batch.
        """
        # Each record's output value, filled as it is produced: names the input of a failure.
        outputs: list[bytes | None] = []
        callbacks = self._checkpoint.outputs(sources, keys, outputs)
        prefixes = {
            (topic, partition): source_header_prefix(topic, partition)
            for topic, partition, _ in sources
        }
        produce = self._producer.produce
        output_topic = self._output_topic
        produced = 0
        for index, value in enumerate(verdicts):
            on_delivery = callbacks[index]
            if value is None:
                message = consumed[index]
                outputs.append(message.value())
                self._dead_letter(message, errors[index], on_delivery)
                continue
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
            produced += 1
        self.counters.verdicts += produced

    def _publish_shadow(
        self,
        shadow: Shadow,
        scored: Scored,
        keys: list[bytes | None],
        sources: list[Source],
    ) -> None:
        """Produce the challenger's verdicts of the batch to the shadow topic, after its own.

        Exactly-once: inside the open transaction, with the checkpoint's callbacks (a shadow
        verdict not delivered aborts the transaction as any output would). At-least-once: best
        effort, not tracked (offsets do not wait for them; a failure is counted and logged once).
        """
        produced = shadow.score(scored)
        if not shadow.active and self._metrics is not None:
            self._metrics.shadow_active.set(0)
        if produced is None:
            return
        shadow_keys = [keys[index] for index in produced.indexes]
        shadow_sources = [sources[index] for index in produced.indexes]
        callbacks = self._checkpoint.side_outputs(shadow_sources, shadow_keys, produced.verdicts)
        if callbacks is None:
            callbacks = [self._shadow_delivered] * len(shadow_sources)
        produce = self._producer.produce
        topic = self._shadow_topic
        for key, value, source, on_delivery in zip(
            shadow_keys, produced.verdicts, shadow_sources, callbacks, strict=True
        ):
            produce(topic, key, value, list(source_headers(*source)), on_delivery)
        self._observe_shadow(produced)

    def _observe_shadow(self, produced: ShadowBatch) -> None:
        metrics = self._metrics
        if metrics is not None:
            comparison = produced.comparison
            metrics.shadow(comparison.records, comparison.agreements, comparison.differences)

    def _shadow_delivered(self, error: KafkaError | None, _message: Any) -> None:
        if error is None:
            return
        self.shadow_delivery_failures += 1
        if self._metrics is not None:
            self._metrics.shadow_delivery_failures.inc()
        if self.shadow_delivery_failures == 1:
            log.warning(
                "shadow verdicts not delivered (best effort under at-least-once; counted in"
                " streamer_shadow_delivery_failures_total)",
                topic=self._shadow_topic,
                error=error.str(),
            )

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
        self.dead_letters_by_stage[error.stage] = self.dead_letters_by_stage.get(error.stage, 0) + 1

    # -- rebalances and errors -------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = time.monotonic()
        self._rebalanced("assigned", [(p.topic, p.partition) for p in partitions])
        log.info(
            "partitions assigned", partitions=[f"{p.topic}[{p.partition}]" for p in partitions]
        )
        if self._state.restorer is not None and partitions:
            # Nothing is scored from these until their state is restored (see `_restore`).
            consumer.assign(partitions)
            consumer.pause(partitions)
            self._to_restore = list(partitions)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Runs inside consume() on the main thread.
        self._stop_restoring()
        self._checkpoint.revoke([(p.topic, p.partition) for p in partitions])
        self._rebalanced("revoked", [])
        log.info("partitions revoked", partitions=[f"{p.topic}[{p.partition}]" for p in partitions])

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._stop_restoring()
        log.warning("partitions lost", partitions=[f"{p.topic}[{p.partition}]" for p in partitions])
        self._checkpoint.lose([(p.topic, p.partition) for p in partitions])
        self._rebalanced("lost", [])

    def _rebalanced(self, event: str, assigned: list[tuple[str, int]]) -> None:
        # Eager rebalancing: an assignment is the whole set, a revocation takes all of it.
        self._assigned = assigned
        if self._metrics is not None:
            self._metrics.rebalanced(event, assigned)

    def _stop_restoring(self) -> None:
        self._to_restore = []
        self._restoring.clear()
        if self._state.restorer is not None:
            self._state.restorer.cancel()

    def _on_consumer_error(self, error: KafkaError) -> None:
        if error.fatal():
            raise KafkaFatalError(f"consumer: {error.str()}")
        if (
            error.code() == KafkaError._MAX_POLL_EXCEEDED
            and self._checkpoint.fence_on_poll_exceeded("max.poll.interval.ms exceeded")
        ):
            raise FencedError(
                f"consumer: {error.str()}; the group has moved on without this scorer, its open "
                "transaction is aborted and nothing it wrote is visible; restart it"
            )
        log.warning("consumer error", error=error.str(), code=error.name())

    def _log_progress(self, now: float, last: tuple[float, int]) -> tuple[float, int]:
        since, consumed_before = last
        counters = self.counters
        counters.aborted_transactions = self._checkpoint.aborted
        rate = (counters.consumed - consumed_before) / max(now - since, 1e-9)
        scored = counters.verdicts
        log.info(
            "progress",
            events_per_second=round(rate, 1),
            fraud_rate=round(counters.flagged / scored, 4) if scored else 0.0,
            in_flight=self._checkpoint.in_flight(),
            state_keys=0 if self._state.store is None else len(self._state.store),
            **counters.as_dict(),
        )
        return now, counters.consumed


def _input_decoder(settings: Settings) -> BatchDecoder:
    """Plain Avro of `transaction.avsc`, or, with a Schema Registry, its wire format too."""
    url = settings.schema_registry_url
    if url is None:
        return decode_and_validate
    from streamer.registry import connect

    try:
        return connect(url).decode_and_validate
    except (ValueError, TypeError) as exc:  # the client's own check of the URL
        raise ConfigError(f"STREAMER_SCHEMA_REGISTRY_URL: {exc}") from None


def _scored_rows(scored: Scored) -> list[int] | None:
    """The indexes of the batch's records that got a verdict (None: every record did)."""
    errors = scored.errors
    if not errors:
        return None
    return [index for index in scored.batch.indexes if index not in errors]


def _source(message: KafkaMessage) -> Source:
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None
    assert partition is not None
    assert offset is not None
    return topic, partition, offset

"""Test doubles shared by the unit tests that drive the scorer without a broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, TopicPartition

from streamer.app import CARD_STORE, CardState, ScoringApp
from streamer.headers import Headers, header_map
from streamer.kafka.checkpoint import AtLeastOnce, Changelog, Checkpoint, ExactlyOnce
from streamer.kafka.clients import ClientErrors, OutputProducer
from streamer.kafka.transactions import Transactions
from streamer.metrics import ScorerMetrics
from streamer.model.scorer import Scorer
from streamer.model.slot import ModelSlot
from streamer.pipeline import BatchDecoder, Pipeline
from streamer.serde import decode_and_validate
from streamer.settings import Settings
from streamer.shadow import Shadow
from streamer.state.card import CARD_HISTORY_CODEC, CardHistory
from streamer.state.store import KeyedStore


@dataclass
class Produced:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]
    partition: int | None = None


@dataclass(frozen=True)
class DeliveredMessage:
    """What a delivery report hands its callback: the output that was (not) delivered."""

    _topic: str
    _partition: int
    _key: bytes | None
    _value: bytes | None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value


@dataclass
class RecordingProducer:
    """Stands in for OutputProducer: keeps what is produced, reports it on poll or flush.

    Outputs to a topic in `refuse` are reported failed with `refuse_error`, those to a topic in
    `hold` are not reported until it no longer holds them; `events`, when
    given, receives ("produce", topic) per record, to check the order of a checkpoint's steps.
    """

    produced: list[Produced] = field(default_factory=list)
    pending: list[tuple[Callable[[Any, Any], None], Produced]] = field(default_factory=list)
    errors: ClientErrors = field(default_factory=lambda: ClientErrors("producer"))
    refuse: set[str] = field(default_factory=set)
    hold: set[str] = field(default_factory=set)
    refuse_error: KafkaError = field(
        default_factory=lambda: KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    )
    events: list[tuple[Any, ...]] | None = None

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        on_delivery: Callable[[Any, Any], None] | None,
        partition: int | None = None,
    ) -> None:
        record = Produced(topic, key, value, header_map(headers), partition)
        self.produced.append(record)
        if self.events is not None:
            self.events.append(("produce", topic))
        if on_delivery is not None:
            self.pending.append((on_delivery, record))

    def poll(self, timeout: float = 0.0) -> None:
        pending = [(c, r) for c, r in self.pending if r.topic not in self.hold]
        self.pending = [(c, r) for c, r in self.pending if r.topic in self.hold]
        for callback, record in pending:
            message = DeliveredMessage(
                record.topic, record.partition or 0, record.key, record.value
            )
            error = self.refuse_error if record.topic in self.refuse else None
            callback(error, message)

    def flush(self, timeout: float) -> int:
        if self.events is not None:
            self.events.append(("flush",))
        self.poll()
        return len(self.pending)

    def __len__(self) -> int:
        return len(self.pending)


@dataclass
class FakeConsumer:
    """Stands in for the scorer's consumer: records commits, seeks, pauses and resumes."""

    assigned: list[TopicPartition] = field(default_factory=list)
    committed_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    seeks: list[tuple[str, int, int]] = field(default_factory=list)
    events: list[tuple[Any, ...]] | None = None

    def commit(self, offsets: Sequence[TopicPartition], asynchronous: bool = True) -> None:
        for tp in offsets:
            self.committed_offsets[(tp.topic, tp.partition)] = tp.offset
        if self.events is not None:
            self.events.append(
                ("commit", sorted((t.topic, t.partition, t.offset) for t in offsets))
            )

    def store_offsets(self, offsets: Sequence[TopicPartition]) -> None:
        return

    def assignment(self) -> list[TopicPartition]:
        return list(self.assigned)

    def committed(self, partitions: Sequence[TopicPartition], timeout: float) -> list[Any]:
        return [
            TopicPartition(
                tp.topic, tp.partition, self.committed_offsets.get((tp.topic, tp.partition), -1001)
            )
            for tp in partitions
        ]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


class NoWatchdog:
    """A watchdog that never fires."""

    waiting_for_brokers = False

    @contextmanager
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        yield


@dataclass
class FakeTransactions:
    """Stands in for `kafka.transactions.Transactions`: begin, commit (or raise), abort."""

    events: list[tuple[Any, ...]] = field(default_factory=list)
    opened_at: float | None = None
    commit_raises: BaseException | None = None
    watchdog: NoWatchdog = field(default_factory=NoWatchdog)
    transactional_id: str = "streamer-test"
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    """Where a commit puts the input offsets (a `FakeConsumer`'s committed offsets, say)."""

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def begin(self) -> None:
        if self.opened_at is None:
            self.opened_at = 0.0
            self.events.append(("begin",))

    def commit(self, positions: dict[tuple[str, int], int]) -> None:
        if self.opened_at is None:
            return
        if self.commit_raises is not None:
            raise self.commit_raises
        self.events.append(("commit", sorted((t, p, o) for (t, p), o in positions.items())))
        self.offsets.update(positions)
        self.opened_at = None

    def abort(self, reason: str) -> None:
        if self.opened_at is not None:
            self.events.append(("abort", reason))
            self.opened_at = None


@dataclass
class AppRig:
    """A scorer on fakes, and the fakes."""

    app: ScoringApp
    producer: RecordingProducer
    consumer: FakeConsumer
    store: KeyedStore[CardHistory]


def app_on_fakes(
    scorer: Scorer,
    settings: Settings,
    producer: RecordingProducer | None = None,
    decode: BatchDecoder = decode_and_validate,
    metrics: ScorerMetrics | None = None,
    slot: ModelSlot | None = None,
    transactions: FakeTransactions | None = None,
    shadow: Shadow | None = None,
) -> AppRig:
    """A scorer (at-least-once, committing at every turn) owning partitions 0-2, on fakes.

    With `transactions`, exactly-once instead (committing at every `maintain`). The changelog
    topic is "changelog"; restoring is left out (no restorer).
    """
    producer = RecordingProducer() if producer is None else producer
    consumer = FakeConsumer()
    store = KeyedStore(CARD_STORE, CARD_HISTORY_CODEC, keep_undo=transactions is not None)
    for partition in (0, 1, 2):
        store.assign(partition)
    changelogs = [Changelog(store, "changelog")]
    checkpoint: Checkpoint
    if transactions is None:
        checkpoint = AtLeastOnce(
            cast(Consumer, consumer), cast(OutputProducer, producer), changelogs, 0.0
        )
    else:
        checkpoint = ExactlyOnce(
            cast(Consumer, consumer),
            cast(OutputProducer, producer),
            changelogs,
            0.0,
            cast(Transactions, transactions),
        )
    app = ScoringApp(
        settings,
        Pipeline(scorer, max_event_bytes=settings.max_event_bytes, decode=decode),
        cast(Consumer, consumer),
        ClientErrors("consumer"),
        cast(OutputProducer, producer),
        checkpoint,
        CardState(store, None),
        metrics,
        slot,
        shadow,
    )
    return AppRig(app, producer, consumer, store)

"""Exactly-once: the transaction that carries one stretch of verdicts, dead letters and offsets.

One transactional producer per process (KIP-447): the input offsets go into the transaction with
the consumer's group metadata, so the group coordinator rejects them from a member the group has
moved on from, and a restarted or rebalanced owner starts exactly after the last committed
transaction. librdkafka sorts the errors of the transactional calls into three kinds, and so do we:

- retriable: the same call is made again (a coordinator moving, a request timing out);
- abortable: the transaction is aborted and the caller rewinds the consumer to the committed
  offsets, so the aborted records are read and scored again;
- fatal (fenced, or the producer's state is lost): the process stops with a message that says why.

A call that blocks far past its timeout (a known librdkafka hang) ends the process through the
`Watchdog`, so that it is restarted rather than left alive and idle. While no broker answers at
all (`cluster_answers`), a call is not hung but waiting: the watchdog lets it wait, and a
retriable error is retried for as long as the outage lasts and `RETRY_FOR_SECONDS` after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streamer.errors import FencedError, KafkaFatalError
from streamer.kafka.clients import OutputProducer
from streamer.kafka.watchdog import Watchdog

log = structlog.get_logger(__name__)

T = TypeVar("T")

CALL_TIMEOUT_SECONDS: Final = 20.0
"""How long one transactional call may block; a timeout is retriable, so the call is made again."""
RETRY_FOR_SECONDS: Final = 60.0
"""How long a retriable error of one transactional call is retried before the scorer gives up."""

_FENCED_CODES: Final = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.TRANSACTION_COORDINATOR_FENCED,
    }
)
MEMBERSHIP_CODES: Final = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.FENCED_INSTANCE_ID,
    }
)
"""Offsets refused because the group moved on without this member: it has become a zombie."""


class AbortableError(Exception):
    """The open transaction was aborted; the caller must rewind to the committed offsets."""

    def __init__(self, error: KafkaError, during: str) -> None:
        super().__init__(f"{during}: {error.str()}")
        self.error = error


class Transactions:
    """Begins, commits and aborts the scorer's transactions; at most one is open at a time."""

    def __init__(
        self,
        producer: OutputProducer,
        consumer: Consumer,
        transactional_id: str,
        watchdog: Watchdog | None = None,
        cluster_answers: Callable[[], bool] | None = None,
    ):
        self._producer = producer.client
        self._consumer = consumer
        self.transactional_id = transactional_id
        self._cluster_answers = cluster_answers
        """Whether any broker answers now (None: assume one does); may block briefly."""
        self.watchdog = (
            watchdog if watchdog is not None else Watchdog(cluster_answers=cluster_answers)
        )
        """Ends the process if a call blocks far past its timeout (`streamer.kafka.watchdog`)."""
        self.opened_at: float | None = None
        self.committed = 0
        self.aborted = 0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def init(self) -> None:
        """Register the transactional id; this fences (aborts) a predecessor's open transaction."""
        self._call(
            "init_transactions", lambda: self._producer.init_transactions(CALL_TIMEOUT_SECONDS)
        )

    def begin(self) -> None:
        if self.opened_at is None:
            self._call("begin_transaction", self._producer.begin_transaction)
            self.opened_at = time.monotonic()

    def commit(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Add the input `positions` (next offset to read, per partition) and commit.

        Raises `AbortableError` when the transaction must be aborted (the caller calls `abort`),
        and `FencedError`, after aborting, when this process no longer owns what it was writing.
        """
        if self.opened_at is None:
            return
        try:
            if positions:
                offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
                self._call(
                    "send_offsets_to_transaction",
                    lambda: self._producer.send_offsets_to_transaction(
                        offsets, self._consumer.consumer_group_metadata(), CALL_TIMEOUT_SECONDS
                    ),
                )
            self._call(
                "commit_transaction",
                lambda: self._producer.commit_transaction(CALL_TIMEOUT_SECONDS),
            )
        except AbortableError as exc:
            if exc.error.code() in MEMBERSHIP_CODES:
                self.abort(str(exc))
                raise FencedError(
                    f"the consumer group moved on without this scorer ({exc.error.str()}); "
                    "its open transaction is aborted, nothing it wrote is visible"
                ) from None
            raise  # the caller looks at what failed, then aborts
        self.opened_at = None
        self.committed += 1

    def abort(self, reason: str) -> None:
        """Abort the open transaction (if any): nothing in it becomes visible."""
        if self.opened_at is None:
            return
        log.warning("aborting transaction", reason=reason)
        try:
            self._call(
                "abort_transaction", lambda: self._producer.abort_transaction(CALL_TIMEOUT_SECONDS)
            )
        except AbortableError as exc:  # an abort is not abortable; the state is lost
            raise KafkaFatalError(f"abort_transaction: {exc}") from None
        self.opened_at = None
        self.aborted += 1

    def _call(self, what: str, call: Callable[[], T]) -> T:
        deadline = time.monotonic() + RETRY_FOR_SECONDS
        while True:
            try:
                with self.watchdog.guard(what, CALL_TIMEOUT_SECONDS):
                    return call()
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if not isinstance(error, KafkaError):
                    raise
                if error.code() in _FENCED_CODES:
                    raise FencedError(
                        f"{what}: another producer with transactional id "
                        f"{self.transactional_id!r} took over ({error.str()}); "
                        "nothing this scorer wrote since its last commit is visible"
                    ) from None
                if error.fatal():
                    raise KafkaFatalError(f"{what}: {error.str()}") from None
                if error.txn_requires_abort():
                    raise AbortableError(error, what) from None
                if error.retriable():
                    if self._cluster_answers is not None and not self._cluster_answers():
                        deadline = time.monotonic() + RETRY_FOR_SECONDS  # an outage: wait it out
                    if time.monotonic() < deadline:
                        log.warning("retrying transactional call", call=what, error=error.str())
                        continue
                raise KafkaFatalError(f"{what}: {error.str()}") from None

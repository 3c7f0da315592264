"""Kafka clients built from librdkafka dicts, with the scorer's error handling wired in.

librdkafka reports most trouble (a broker down, a leader moving) as transient errors it recovers
from by itself, and reports them again at every retry (about 20 a second against a refused
port). They are logged once per change of state: when the trouble starts, when every broker is
down, and when a broker answers again (`ClientErrors.reachable`); reports of the outage served
only after that answer start no new trouble (`RECOVERY_GRACE_SECONDS`). Errors flagged fatal are
recorded by the callbacks (which must never raise) and raised on the main thread by
`raise_if_fatal`. librdkafka's own log lines go through the process's structlog set-up
(`CLIENT_LOGGER`), except its per-retry connection failures, which repeat what the error
callback already reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streamer.errors import ConfigError, KafkaFatalError
from streamer.headers import Headers
from streamer.settings import Settings, kafka_variable, masked_kafka_value

log = structlog.get_logger(__name__)


class _NoRetryNoise(logging.Filter):
    """Drops librdkafka's `FAIL` lines: one per failed connection attempt, each also reported to
    the error callback, which logs the trouble once (`ClientErrors`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("FAIL [")


CLIENT_LOGGER = logging.getLogger("streamer.kafka.client")
"""librdkafka's own log lines arrive here (served by poll), in the process's log format."""
CLIENT_LOGGER.addFilter(_NoRetryNoise())

SILENT_LOGGER = logging.getLogger("streamer.kafka.silent")
"""For throw-away clients (configuration checks, the broker probe): their lines say nothing new."""
SILENT_LOGGER.addHandler(logging.NullHandler())
SILENT_LOGGER.propagate = False

_CONNECTION_TROUBLE: Final = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT})
TROUBLE_QUIET_SECONDS: Final = 60.0
"""Connection trouble after this long without any is logged as a new episode (librdkafka retries
a connection at least every 10 s, `reconnect.backoff.max.ms`)."""
RECOVERY_GRACE_SECONDS: Final = 10.0
"""After a broker answers again, a failed connection reported within this long starts no new
trouble. librdkafka queues its reports until the client is polled, so a client whose thread sat
in a blocking call through the outage (an exactly-once commit waiting for its outputs) serves
reports made during the outage after its end. A failure that lasts is reported again at the next
connection attempt, at most 10 s later (`reconnect.backoff.max.ms`), and logged then. "All
brokers down" is never held back: librdkafka says it once per outage, and the next probe ends a
late one (`ReachabilityProbe`)."""
PROBE_TIMEOUT_SECONDS: Final = 0.5


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
    """Collects errors reported by librdkafka's `error_cb`; fatal ones stop the process.

    Connection trouble is logged once per change of state, not per retry: "kafka connection
    trouble" when a broker connection fails, "kafka brokers all down" when none is left, and
    "kafka brokers reachable again" once `reachable()` is called (by whoever saw a broker answer);
    the repeats in between are counted in that last line. A failed connection reported just after
    that call is taken for a late report of the same outage (`RECOVERY_GRACE_SECONDS`).
    """

    def __init__(self, client: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock
        self.fatal: KafkaError | None = None
        self.trouble_since: float | None = None
        """When the current connection trouble began (None: none now)."""
        self.all_down = False
        self.repeats = 0
        self._last_trouble = 0.0
        self._reachable_at: float | None = None

    def __call__(self, error: KafkaError) -> None:
        # Runs inside librdkafka's poll: record only, never raise.
        if error.fatal():
            self.fatal = error
            log.error("kafka fatal error", client=self._client, error=error.str())
        elif error.code() in _CONNECTION_TROUBLE:
            self._connection_trouble(error, self._clock())
        else:
            log.warning("kafka error", client=self._client, error=error.str())

    def _connection_trouble(self, error: KafkaError, now: float) -> None:
        all_down = error.code() == KafkaError._ALL_BROKERS_DOWN
        if (
            not all_down
            and self.trouble_since is None
            and self._reachable_at is not None
            and now - self._reachable_at < RECOVERY_GRACE_SECONDS
        ):
            log.debug("kafka connection failure from before the recovery", client=self._client)
            return
        if self.trouble_since is not None and now - self._last_trouble > TROUBLE_QUIET_SECONDS:
            # A new episode: librdkafka retries far more often than this.
            self._end_trouble(self._last_trouble)
        self._last_trouble = now
        if self.trouble_since is None:
            self.trouble_since = now
            self.all_down = all_down
            event = "kafka brokers all down, retrying" if all_down else "kafka connection trouble"
            log.warning(event, client=self._client, error=error.str())
        elif all_down and not self.all_down:
            self.all_down = True
            log.warning("kafka brokers all down, retrying", client=self._client, error=error.str())
        else:
            self.repeats += 1

    def reachable(self) -> None:
        """A broker answered this client: log the end of the connection trouble, if any."""
        now = self._reachable_at = self._clock()
        if self.trouble_since is not None:
            self._end_trouble(now)

    def _end_trouble(self, ended: float) -> None:
        assert self.trouble_since is not None
        log.info(
            "kafka brokers reachable again",
            client=self._client,
            trouble_seconds=round(ended - self.trouble_since, 1),
            repeated_errors=self.repeats,
        )
        self.trouble_since = None
        self.all_down = False
        self.repeats = 0

    def raise_if_fatal(self) -> None:
        if self.fatal is not None:
            raise KafkaFatalError(f"{self._client}: {self.fatal.str()}")


class ReachabilityProbe:
    """Ends the "all brokers down" state of clients when the cluster answers again.

    librdkafka reports no recovery, so while one of `errors` has every broker down, the probe
    asks `client` for the cluster's metadata every `interval` seconds (waiting at most
    `PROBE_TIMEOUT_SECONDS`, on the caller's thread); an answer calls `reachable()` on each.
    """

    def __init__(
        self, client: Consumer | Producer, errors: Sequence[ClientErrors], interval: float = 5.0
    ) -> None:
        self._client = client
        self._errors = errors
        self._interval = interval
        self._next = 0.0

    def check(self, now: float) -> None:
        if now < self._next or not any(errors.all_down for errors in self._errors):
            return
        self._next = now + self._interval
        try:
            self._client.list_topics(timeout=PROBE_TIMEOUT_SECONDS)
        except KafkaException:
            return
        for errors in self._errors:
            errors.reachable()


def cluster_answers(client: Consumer | Producer, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """Whether any broker answers `client` a metadata request within `timeout` seconds.

    Safe on any thread, beside a call of the same client blocked on another (librdkafka's
    handles are thread-safe, and the call releases the GIL while it waits).
    """
    try:
        client.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def check_client_config(settings: Settings) -> None:
    """Raise `ConfigError` naming the `STREAMER_KAFKA_*` variable librdkafka refuses, if any.

    Builds (and drops) a consumer and a producer from the scorer's own configurations, without
    bootstrap servers so that nothing connects: librdkafka checks every property name and value
    as a client is created (an unknown property, a value of the wrong kind, an unreadable
    certificate file). An alias is reported under its canonical name (`linger.ms` as
    `queue.buffering.max.ms`), so each pass-through setting is then tried alone to name the one
    at fault.
    """
    configs: list[tuple[type[Consumer] | type[Producer], dict[str, Any]]] = [
        (Consumer, settings.consumer_config()),
        (Producer, settings.producer_config(transactional=settings.exactly_once)),
    ]
    for kind, config in configs:
        problem = _refused(kind, config)
        if problem is not None:
            raise ConfigError(_culprit(kind, config, settings, problem))


def _culprit(
    kind: type[Consumer] | type[Producer], config: dict[str, Any], settings: Settings, problem: str
) -> str:
    """The message naming the `STREAMER_KAFKA_*` variable behind `problem`, best guess first:
    the property the message names; one refused even alone (an alias is named by its canonical
    property); one without which the rest is accepted (a file read only when SSL is on)."""
    passed = settings.kafka

    def named(key: str, why: str) -> str:
        shown = masked_kafka_value(key, passed[key])
        return f"{kafka_variable(key)}: librdkafka refuses {key}={shown!r}{why}: {problem}"

    for key in passed:
        if f'"{key}"' in problem or f"{key} " in problem:
            return named(key, "")
    own = {key: value for key, value in config.items() if key not in passed}
    for key in passed:
        if _refused(kind, {**own, key: config[key]}) is not None:
            return named(key, "")
    for key in passed:
        if _refused(kind, {k: v for k, v in config.items() if k != key}) is None:
            return named(key, " with the other STREAMER_KAFKA_* settings")
    variables = ", ".join(kafka_variable(key) for key in passed) or "none"
    return f"librdkafka refuses the STREAMER_KAFKA_* settings ({variables}): {problem}"


def _refused(kind: type[Consumer] | type[Producer], config: dict[str, Any]) -> str | None:
    """Why librdkafka refuses to build a client of `kind` from `config`, or None."""
    config = {key: value for key, value in config.items() if key != "bootstrap.servers"}
    try:
        client = kind({**config, "logger": SILENT_LOGGER})
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        return error.str() if isinstance(error, KafkaError) else str(exc)
    except (TypeError, ValueError) as exc:
        return str(exc)
    if isinstance(client, Consumer):
        client.close()
    return None


def create_consumer(config: dict[str, Any], errors: ClientErrors) -> Consumer:
    """A consumer whose errors land in `errors` and whose logs go to the process log."""
    return Consumer(
        {**config, "error_cb": errors, "logger": CLIENT_LOGGER, "on_commit": log_commit_result}
    )


def log_commit_result(error: KafkaError | None, partitions: Sequence[TopicPartition]) -> None:
    """A commit made in the background (`commit_positions(wait=False)`) that failed: say so.

    Nothing is lost: a later commit covers the same offsets, and until one does, a restart reads
    the records after the last commit again (at-least-once). Refused because the group moved on
    without this consumer, the partitions are reported lost and their new owner reads them again.
    Runs inside the consumer's poll: record only, never raise.
    """
    if error is None or error.code() == KafkaError._NO_OFFSET:
        return
    log.warning(
        "offset commit failed; a later commit covers it",
        error=error.str(),
        partitions=[f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions],
    )


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


def commit_positions(
    consumer: Consumer, positions: Sequence[tuple[str, int, int]], *, wait: bool = True
) -> None:
    """Store, then commit, explicit positions: synchronously, or with `wait` false in the
    background (its outcome goes to `log_commit_result`, served by the consumer's poll).

    Storing first matters: librdkafka commits the *stored* offsets once more when the consumer
    closes or a partition is revoked, and a stored offset older than the one committed here would
    move the group back and replay records.
    """
    if not positions:
        return
    offsets = [TopicPartition(topic, partition, offset) for topic, partition, offset in positions]
    consumer.store_offsets(offsets=offsets)
    if not wait:
        consumer.commit(offsets=offsets, asynchronous=True)
        return
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET:
            return
        raise


def topic_partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    """The partitions of `topic`, retrying while a topic created moments ago is not ready.

    Right after its creation, a topic can be unknown to the broker a client asks
    (UNKNOWN_TOPIC_OR_PART) or have partitions without a leader yet; that is waited out for up
    to `timeout` seconds. The consumer's requests never create the topic.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = max(deadline - time.monotonic(), 1.0)
        found = consumer.list_topics(topic, timeout=remaining).topics.get(topic)
        if (
            found is not None
            and found.error is None
            and found.partitions
            and all(p.leader >= 0 for p in found.partitions.values())
        ):
            return sorted(found.partitions)
        if time.monotonic() >= deadline:
            why = found.error.str() if found is not None and found.error else "no leader yet"
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, f"{topic}: not ready after {timeout:g} s: {why}")
            )
        time.sleep(0.2)


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

"""Topic administration: create what is missing, leave what exists alone; check at start-up
that a broker answers and that the topics a command needs exist."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._metadata import ClusterMetadata
from confluent_kafka.cimpl import NewTopic

from streamer.errors import BrokerUnreachableError, MissingTopicError
from streamer.kafka.clients import CLIENT_LOGGER, SILENT_LOGGER, ClientErrors

ADMIN_TIMEOUT_SECONDS = 30.0


def admin_client(config: dict[str, Any], name: str = "admin") -> AdminClient:
    """An AdminClient whose errors and librdkafka log lines go through the process's log."""
    wired: dict[str, Any] = {**config, "error_cb": ClientErrors(name), "logger": CLIENT_LOGGER}
    return AdminClient(wired)


def check_brokers(config: dict[str, Any], timeout: float) -> ClusterMetadata:
    """The cluster's metadata (every topic), once a broker answers within `timeout` seconds.

    Raises `BrokerUnreachableError` naming the bootstrap servers and the last connection error
    when none does. The attempts in between are not logged: the error says it all, once.
    """
    last: list[str] = []

    def on_error(error: KafkaError) -> None:
        last[:] = [error.str()]

    wired: dict[str, Any] = {**config, "error_cb": on_error, "logger": SILENT_LOGGER}
    admin = AdminClient(wired)
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if not isinstance(error, KafkaError) or error.code() not in _NO_ANSWER:
            raise
        admin.poll(0)  # serves the error callback: the last connection error, for the message
        servers = config.get("bootstrap.servers", "?")
        cause = f": {last[0]}" if last else ""
        raise BrokerUnreachableError(
            f"no Kafka broker answered at {servers} within {timeout:g} s "
            f"(STREAMER_BOOTSTRAP_SERVERS or --bootstrap-servers; STREAMER_CONNECT_TIMEOUT){cause}"
        ) from None


_NO_ANSWER = frozenset({KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN})


def require_topics(
    config: dict[str, Any],
    metadata: ClusterMetadata,
    topics: Mapping[str, str],
    *,
    allow_auto_create: bool | None = None,
    timeout: float = ADMIN_TIMEOUT_SECONDS,
) -> list[str]:
    """Check that every topic of `topics` (name → the variable that names it) exists.

    Raises `MissingTopicError` naming the first missing one (and its variable); the message
    offers `--allow-auto-create` unless `allow_auto_create` is None (a command without it). With
    `allow_auto_create`, missing topics are asked for by name instead, which a broker with
    `auto.create.topics.enable` answers by creating them with its defaults; returns those, once
    each has a leader, or raises `MissingTopicError` when the broker did not create one within
    `timeout` seconds.
    """
    missing = [name for name in topics if not _usable(metadata, name)]
    if not missing:
        return []
    for name in missing:
        error = metadata.topics[name].error if name in metadata.topics else None
        if error is not None and error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise MissingTopicError(
                f"topic {name!r} ({topics[name]}) cannot be used: {error.str()}"
            )
    if not allow_auto_create:
        name = missing[0]
        offer = ", or pass --allow-auto-create to let the broker create it"
        if allow_auto_create is None:
            offer = ""
        also = f" (missing as well: {', '.join(missing[1:])})" if missing[1:] else ""
        raise MissingTopicError(
            f"topic {name!r} ({topics[name]}) does not exist{also}; create it with "
            f"`streamer topics create`{offer}"
        )
    admin = admin_client(config)
    for name in missing:
        # A metadata request that names a topic is what makes the broker auto-create it.
        admin.list_topics(topic=name, timeout=timeout)
    try:
        _wait_for_leaders(admin, missing, timeout)
    except KafkaException:
        raise MissingTopicError(
            f"the broker did not create {', '.join(missing)} within {timeout:g} s "
            "(is auto.create.topics.enable off?); create them with `streamer topics create`"
        ) from None
    return missing


def _usable(metadata: ClusterMetadata, name: str) -> bool:
    found = metadata.topics.get(name)
    return found is not None and found.error is None and bool(found.partitions)


@dataclass(frozen=True, slots=True)
class TopicResult:
    name: str
    created: bool


def ensure_topics(
    config: dict[str, Any],
    names: Sequence[str],
    *,
    partitions: int,
    replication_factor: int = -1,
    configs: dict[str, str] | None = None,
) -> list[TopicResult]:
    """Create each topic in `names` that does not exist; report which were created.

    `replication_factor=-1` lets the broker apply its `default.replication.factor`; `configs`
    are topic settings for the topics created (an existing topic is left as it is).
    """
    admin = admin_client(config)
    existing = admin.list_topics(timeout=ADMIN_TIMEOUT_SECONDS).topics
    missing = [name for name in dict.fromkeys(names) if name not in existing]
    results = [TopicResult(name, created=False) for name in names if name in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(name, partitions, replication_factor, config=dict(configs or {}))
                for name in missing
            ],
            operation_timeout=ADMIN_TIMEOUT_SECONDS,
            request_timeout=ADMIN_TIMEOUT_SECONDS,
        )
        for name, future in futures.items():
            try:
                future.result()
                results.append(TopicResult(name, created=True))
            except KafkaException as exc:
                error = exc.args[0]
                if (
                    isinstance(error, KafkaError)
                    and error.code() == KafkaError.TOPIC_ALREADY_EXISTS
                ):
                    results.append(TopicResult(name, created=False))
                else:
                    raise
        _wait_for_leaders(admin, missing)
    return results


def _wait_for_leaders(
    admin: AdminClient, names: Sequence[str], timeout: float = ADMIN_TIMEOUT_SECONDS
) -> None:
    """Return once every partition of `names` has a leader: a created topic is not usable before."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        metadata = admin.list_topics(timeout=ADMIN_TIMEOUT_SECONDS).topics
        pending = [
            name
            for name in pending
            if name not in metadata
            or metadata[name].error is not None
            or not metadata[name].partitions
            or any(p.leader < 0 for p in metadata[name].partitions.values())
        ]
        if pending and time.monotonic() > deadline:
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, f"topics without a leader: {', '.join(pending)}")
            )
        if pending:
            time.sleep(0.1)


def partition_count(config: dict[str, Any], topic: str) -> int:
    """Partitions of `topic` (0 when it does not exist).

    Asks for every topic's metadata: a request naming the topic would have a broker with
    `auto.create.topics.enable` create it, with default settings, as a side effect.
    """
    metadata = admin_client(config).list_topics(timeout=ADMIN_TIMEOUT_SECONDS)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        return 0
    return len(found.partitions)

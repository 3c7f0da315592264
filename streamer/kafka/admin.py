"""Topic administration: create what is missing, leave what exists alone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

ADMIN_TIMEOUT_SECONDS = 30.0


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
    admin = AdminClient(config)
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


def _wait_for_leaders(admin: AdminClient, names: Sequence[str]) -> None:
    """Return once every partition of `names` has a leader: a created topic is not usable before."""
    deadline = time.monotonic() + ADMIN_TIMEOUT_SECONDS
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
    metadata = AdminClient(config).list_topics(timeout=ADMIN_TIMEOUT_SECONDS)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        return 0
    return len(found.partitions)

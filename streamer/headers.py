"""Kafka header names on verdicts, dead letters and replayed records (values are UTF-8 text)."""

from __future__ import annotations

from typing import Final

SOURCE_TOPIC: Final = "streamer.source.topic"
SOURCE_PARTITION: Final = "streamer.source.partition"
SOURCE_OFFSET: Final = "streamer.source.offset"
SOURCE_TIMESTAMP: Final = "streamer.source.timestamp"
"""The input record's Kafka timestamp, in ms (dead letters only)."""

ERROR_STAGE: Final = "streamer.error.stage"
"""decode, validate or score."""
ERROR_REASON: Final = "streamer.error.reason"
ERROR_CLASS: Final = "streamer.error.class"
ERROR_CAUSE: Final = "streamer.error.cause"
"""The underlying exception, `Class: message`, when there is one (dead letters only)."""
CONSUMER_GROUP: Final = "streamer.consumer.group"

CHANGELOG_POSITION: Final = "streamer.changelog.position"
"""On a state changelog record: the input position its state covers (every input offset before
it, of the same partition, is applied; none after)."""

REPLAY_OF: Final = "streamer.replay.of"
"""On a record `streamer dlq replay` put back on the input topic: the dead letter it copies,
`<dlq topic>/<partition>/<offset>`."""
REPLAY_SOURCE: Final = "streamer.replay.source"
"""The input record the dead letter was made from, `<topic>/<partition>/<offset>` (from the dead
letter's `streamer.source.*` headers; absent when it had none)."""
REPLAY_STAGE: Final = "streamer.replay.stage"
"""The dead letter's `streamer.error.stage`, carried over."""
REPLAY_REASON: Final = "streamer.replay.reason"
"""The dead letter's `streamer.error.reason`, carried over."""

Headers = list[tuple[str, str | bytes | None]]
"""Headers as the Kafka client takes them."""


def source_headers(topic: str, partition: int, offset: int) -> Headers:
    """The three headers that name the input record an output was made from."""
    return [*source_header_prefix(topic, partition), (SOURCE_OFFSET, str(offset).encode())]


def source_header_prefix(topic: str, partition: int) -> tuple[tuple[str, bytes], tuple[str, bytes]]:
    """The topic and partition headers of `source_headers`, to reuse for every record of a
    partition: `[*prefix, (SOURCE_OFFSET, str(offset).encode())]` equals `source_headers`."""
    return (SOURCE_TOPIC, topic.encode()), (SOURCE_PARTITION, str(partition).encode())


def header_map(headers: Headers | dict[str, str | bytes | None] | None) -> dict[str, str]:
    """Headers as a dict of text values (the last value wins for a repeated name)."""
    found: dict[str, str] = {}
    pairs = headers.items() if isinstance(headers, dict) else headers or ()
    for key, value in pairs:
        if isinstance(value, bytes):
            found[key] = value.decode("utf-8", "replace")
        elif isinstance(value, str):
            found[key] = value
    return found

"""Test doubles shared by the unit tests that drive the scorer without a broker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamer.headers import Headers, header_map
from streamer.kafka.clients import ClientErrors


@dataclass
class Produced:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]


@dataclass
class RecordingProducer:
    """Stands in for OutputProducer: keeps what is produced, acknowledges it on poll or flush."""

    produced: list[Produced] = field(default_factory=list)
    pending: list[Callable[[Any, Any], None]] = field(default_factory=list)
    errors: ClientErrors = field(default_factory=lambda: ClientErrors("producer"))

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        on_delivery: Callable[[Any, Any], None],
    ) -> None:
        self.produced.append(Produced(topic, key, value, header_map(headers)))
        self.pending.append(on_delivery)

    def poll(self, timeout: float = 0.0) -> None:
        for callback in self.pending:
            callback(None, None)
        self.pending.clear()

    def flush(self, timeout: float) -> int:
        self.poll()
        return 0

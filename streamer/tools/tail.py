"""`streamer tail`: print verdicts as they arrive, as JSON lines or a table."""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import structlog

from streamer.errors import DecodeError
from streamer.headers import SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC, header_map
from streamer.kafka.clients import ClientErrors, ReachabilityProbe, create_consumer
from streamer.serde import decode_verdict
from streamer.settings import Settings

log = structlog.get_logger(__name__)

TABLE_HEADER: Final = (
    f"{'scored_at (UTC)':<23} {'transaction_id':<36} {'card_id':<14} {'score':>6} "
    f"{'verdict':<7} source"
)


def describe_source(headers: Any) -> str:
    """`transactions[2]@1041` from a verdict's `streamer.source.*` headers."""
    found = header_map(headers)
    return (
        f"{found.get(SOURCE_TOPIC, '?')}[{found.get(SOURCE_PARTITION, '?')}]"
        f"@{found.get(SOURCE_OFFSET, '?')}"
    )


def format_verdict(verdict: dict[str, Any], source: str, output_format: str) -> str:
    if output_format == "json":
        return json.dumps({**verdict, "source": source}, separators=(",", ":"))
    scored_at = datetime.fromtimestamp(verdict["scored_at"] / 1000, tz=UTC)
    return (
        f"{scored_at:%Y-%m-%d %H:%M:%S.%f}"[:23]
        + f" {verdict['transaction_id']:<36.36} {verdict['card_id']:<14.14}"
        f" {verdict['score']:>6.3f} {'FRAUD' if verdict['is_fraud'] else 'ok':<7} {source}"
    )


def tail(
    settings: Settings,
    *,
    count: int | None,
    from_beginning: bool,
    output_format: str,
    out: TextIO = sys.stdout,
    idle_timeout: float | None = None,
) -> int:
    """Print verdicts until `count` were printed or SIGINT/SIGTERM; returns how many."""
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    config = settings.reader_config(group_id=f"streamer-tail-{uuid.uuid4()}")
    config["auto.offset.reset"] = "earliest" if from_beginning else "latest"
    errors = ClientErrors("tail")
    consumer = create_consumer(config, errors)
    consumer.subscribe([settings.output_topic])
    probe = ReachabilityProbe(consumer, [errors])
    printed = 0
    if output_format == "table":
        print(TABLE_HEADER, file=out, flush=True)
    last_seen = time.monotonic()
    try:
        while not stopping and (count is None or printed < count):
            messages = consumer.consume(500, 0.2)
            errors.raise_if_fatal()
            probe.check(time.monotonic())
            if not messages and idle_timeout is not None:
                if time.monotonic() - last_seen > idle_timeout:
                    break
                continue
            for message in messages:
                if message.error() is not None or message.value() is None:
                    continue
                last_seen = time.monotonic()
                try:
                    verdict = decode_verdict(message.value() or b"")
                except DecodeError as exc:
                    log.warning("undecodable verdict", offset=message.offset(), error=str(exc))
                    continue
                source = describe_source(message.headers())
                print(format_verdict(verdict, source, output_format), file=out)
                printed += 1
                if count is not None and printed >= count:
                    break
            out.flush()
    finally:
        consumer.close()
    return printed

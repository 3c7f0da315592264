"""`streamer produce`: publish synthetic transactions to the input topic at a steady rate."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import KafkaError

from streamer.errors import DeliveryFailedError
from streamer.kafka.clients import OutputProducer
from streamer.progress import Progress
from streamer.serde import encode_transaction
from streamer.settings import Settings
from streamer.synthetic import LabelledTransaction, SyntheticWorld

log = structlog.get_logger(__name__)

PACING_SLICE_SECONDS = 0.005
"""A paced producer sends in slices this long, so bursts stay small at any rate."""

FLUSH_SECONDS = 150.0
"""Longer than the producer's delivery.timeout.ms: by then every record has its report."""
INTERRUPTED_FLUSH_SECONDS = 5.0
"""After Ctrl-C, how long the records already sent may take to be acknowledged."""


@dataclass(slots=True)
class ProduceReport:
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def paced(items: Iterable[Any], rate: float | None) -> Iterator[Any]:
    """Yield `items` at `rate` per second on average (as fast as possible when None)."""
    if not rate:
        yield from items
        return
    started = time.monotonic()
    for index, item in enumerate(items):
        due = started + index / rate
        delay = due - time.monotonic()
        if delay > PACING_SLICE_SECONDS:
            time.sleep(delay)
        yield item


def publish(
    producer: OutputProducer,
    topic: str,
    events: Iterable[LabelledTransaction],
    *,
    rate: float | None = None,
    on_sent: Callable[[LabelledTransaction], None] | None = None,
    progress: Progress | None = None,
    report: ProduceReport | None = None,
) -> ProduceReport:
    """Produce `events` (key = card_id) and wait for every acknowledgement.

    Counts go to `report` (a new one by default), so a caller interrupted midway still has them.
    """
    report = ProduceReport() if report is None else report
    started = time.monotonic()

    def on_delivery(error: KafkaError | None, _message: Any) -> None:
        if error is None:
            report.acknowledged += 1
        else:
            report.failed += 1
            if len(report.errors) < 5:
                report.errors.append(error.str())

    for event in paced(events, rate):
        record = event.record
        producer.produce(
            topic, record["card_id"].encode(), encode_transaction(record), [], on_delivery
        )
        if on_sent is not None:
            on_sent(event)
        report.sent += 1
        producer.poll(0)
        if progress is not None:
            progress.update(report.sent)
    unreported = producer.flush(FLUSH_SECONDS)
    report.failed += unreported
    report.seconds = time.monotonic() - started
    if progress is not None:
        progress.close()
    return report


def produce_synthetic(
    settings: Settings, *, count: int, rate: float | None, seed: int
) -> ProduceReport:
    """`streamer produce`: `count` synthetic events from the world of `seed` at `rate`/s.

    Its card ids are `card-<seed>-<number>`: runs with other seeds feed a stateful scorer cards of
    their own, and a run with the same seed the same cards again.

    On Ctrl-C, waits a few seconds for what was sent to be acknowledged, logs how many events
    were delivered, and lets KeyboardInterrupt through (exit 130).
    """
    producer = OutputProducer(settings.producer_config())
    log.info("producing", topic=settings.input_topic, count=count, rate=rate, seed=seed)
    report = ProduceReport()
    progress = Progress("produce", count, interval=settings.progress_interval)
    try:
        publish(
            producer,
            settings.input_topic,
            SyntheticWorld(seed, card_prefix=f"card-{seed}-").generate(count),
            rate=rate,
            progress=progress,
            report=report,
        )
    except KeyboardInterrupt:
        if progress.on_terminal:
            print(file=sys.stderr)
        unacknowledged = producer.flush(INTERRUPTED_FLUSH_SECONDS)
        log.warning(
            "produce interrupted",
            delivered=report.acknowledged,
            sent=report.sent,
            failed=report.failed,
            unacknowledged=unacknowledged,
            of=count,
        )
        raise
    producer.errors.raise_if_fatal()
    log.info(
        "produced",
        sent=report.sent,
        acknowledged=report.acknowledged,
        failed=report.failed,
        seconds=round(report.seconds, 2),
        events_per_second=round(report.sent / max(report.seconds, 1e-9)),
    )
    if report.failed:
        raise DeliveryFailedError(
            f"{report.failed} of {report.sent} events were not delivered: {report.errors[0]}"
        )
    return report

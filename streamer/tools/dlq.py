"""`streamer dlq replay`: put dead letters back on the input topic, for a fixed upstream or model.

A dead letter carries the original key and value bytes unchanged; a replay produces exactly those
bytes to the input topic, where the scorer takes them as new input records (each gets its own
verdict or dead letter again). Replayed records carry headers saying what they are:
`streamer.replay.of` (`<dlq topic>/<partition>/<offset>` of the dead letter),
`streamer.replay.source` (the original input record, `<topic>/<partition>/<offset>`, from the
dead letter's `streamer.source.*` headers) and the dead letter's stage and reason as
`streamer.replay.stage` and `streamer.replay.reason`.

The dead-letter topic is read like `streamer audit` reads (read_committed, partitions assigned
directly, up to the end offsets taken at the start, done when the position gets there), one
partition after the other, oldest first: `--limit` takes the first matches in that order.
The producer is idempotent with acks=all, and the command waits for every acknowledgement.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import structlog
from confluent_kafka import KafkaError, KafkaException

from streamer.errors import ConfigError
from streamer.headers import (
    ERROR_REASON,
    ERROR_STAGE,
    REPLAY_OF,
    REPLAY_REASON,
    REPLAY_SOURCE,
    REPLAY_STAGE,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    Headers,
    header_map,
)
from streamer.kafka.clients import ClientErrors, OutputProducer, create_consumer
from streamer.progress import Progress
from streamer.settings import Settings
from streamer.tools.audit import (
    DEFAULT_TIMEOUT_SECONDS,
    PartitionRange,
    offsets_for_time,
    read_ranges,
    reader_config,
    watermarks,
)

log = structlog.get_logger(__name__)

STAGES: Final = ("decode", "validate", "score")
UNKNOWN_STAGE: Final = "unknown"
"""How a dead letter without a stage header is counted."""
FLUSH_SECONDS: Final = 150.0
"""Longer than the producer's delivery.timeout.ms: by then every record has its report."""
MAX_SHOWN_REASON: Final = 120


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which dead letters to replay; every condition given must hold.

    `stages`: empty means any stage. `since_ms`/`until_ms`: the dead letter's own timestamp is at
    or after `since_ms` and before `until_ms`. `partition`, with `from_offset`/`to_offset` (both
    inclusive): only that partition of the dead-letter topic, and only those offsets.
    """

    stages: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None
    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None

    def check(self) -> None:
        """Raise ConfigError when the options contradict each other."""
        unknown = self.stages - set(STAGES)
        if unknown:
            raise ConfigError(
                f"--stage: unknown stage {', '.join(sorted(unknown))}; one of {', '.join(STAGES)}"
            )
        if (self.from_offset is not None or self.to_offset is not None) and self.partition is None:
            raise ConfigError("--from-offset and --to-offset need --partition")
        if (
            self.from_offset is not None
            and self.to_offset is not None
            and self.from_offset > self.to_offset
        ):
            raise ConfigError(
                f"--from-offset {self.from_offset} is after --to-offset {self.to_offset}"
            )
        if (
            self.since_ms is not None
            and self.until_ms is not None
            and self.since_ms >= self.until_ms
        ):
            raise ConfigError("--since must be before --until")

    def offsets(self, partition: int, low: int, high: int) -> PartitionRange | None:
        """The offsets of `partition` to read, within [low, high); None if it is not wanted."""
        if self.partition is not None and partition != self.partition:
            return None
        start = max(low, self.from_offset if self.from_offset is not None else low)
        end = min(high, self.to_offset + 1 if self.to_offset is not None else high)
        return PartitionRange(partition, start, max(start, end))

    def matches(self, partition: int, offset: int, timestamp_ms: int, stage: str | None) -> bool:
        """Whether the dead letter at `partition`/`offset` with this timestamp and stage is wanted.

        A dead letter without a stage header matches only when no stage is asked for; one without
        a timestamp (-1) only when no time is.
        """
        if self.stages and stage not in self.stages:
            return False
        if self.partition is not None and partition != self.partition:
            return False
        if self.from_offset is not None and offset < self.from_offset:
            return False
        if self.to_offset is not None and offset > self.to_offset:
            return False
        if self.since_ms is not None and (timestamp_ms < 0 or timestamp_ms < self.since_ms):
            return False
        return not (
            self.until_ms is not None and (timestamp_ms < 0 or timestamp_ms >= self.until_ms)
        )


def replay_headers(dlq_topic: str, partition: int, offset: int, found: dict[str, str]) -> Headers:
    """Headers of the replay of the dead letter at `dlq_topic`/`partition`/`offset`.

    `found`: the dead letter's headers as text (`header_map`).
    """
    headers: Headers = [(REPLAY_OF, f"{dlq_topic}/{partition}/{offset}".encode())]
    source = (found.get(SOURCE_TOPIC), found.get(SOURCE_PARTITION), found.get(SOURCE_OFFSET))
    if all(source):
        headers.append((REPLAY_SOURCE, "/".join(str(part) for part in source).encode()))
    if ERROR_STAGE in found:
        headers.append((REPLAY_STAGE, found[ERROR_STAGE].encode()))
    if ERROR_REASON in found:
        headers.append((REPLAY_REASON, found[ERROR_REASON].encode()))
    return headers


@dataclass(slots=True)
class ReplayReport:
    dlq_topic: str
    input_topic: str
    dry_run: bool
    examined: int = 0
    """Dead letters read (matching or not)."""
    by_stage: Counter[str] = field(default_factory=Counter)
    """Replayed (or, in a dry run, to be replayed) per stage."""
    failed: list[str] = field(default_factory=list)
    """`<dlq topic>/<partition>/<offset>: <error>` of each replay the broker did not acknowledge."""

    @property
    def replayed(self) -> int:
        return sum(self.by_stage.values())

    def summary(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        stages = ", ".join(f"{stage} {count:,}" for stage, count in sorted(self.by_stage.items()))
        lines = [
            f"streamer dlq replay: {verb} {self.replayed:,} of {self.examined:,} dead letters "
            f"from {self.dlq_topic} to {self.input_topic}"
            + (" (dry run: nothing sent)" if self.dry_run else "")
        ]
        if stages:
            lines.append(f"  by stage: {stages}")
        if self.failed:
            lines.append(f"  NOT acknowledged: {len(self.failed):,} (listed on stderr)")
        return "\n".join(lines)


def replay_dead_letters(
    settings: Settings,
    selection: ReplayFilter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    out: TextIO = sys.stdout,
) -> ReplayReport:
    """Replay the dead letters `selection` picks (at most `limit`) onto the input topic.

    In a dry run, print one line per dead letter that would be replayed and send nothing.
    """
    selection.check()
    dlq_topic, input_topic = settings.dlq_topic, settings.input_topic
    report = ReplayReport(dlq_topic, input_topic, dry_run)
    marks = watermarks(settings, dlq_topic)
    if selection.partition is not None and selection.partition not in marks:
        raise ConfigError(
            f"--partition {selection.partition}: {dlq_topic} has partitions 0-{max(marks)}"
        )
    producer = None if dry_run else OutputProducer(settings.producer_config(), name="replay")

    def on_delivery_for(where: str) -> Any:
        def on_delivery(error: KafkaError | None, _message: Any) -> None:
            # Runs inside poll/flush: record only, never raise.
            if error is not None:
                report.failed.append(f"{where}: {error.str()}")

        return on_delivery

    errors = ClientErrors("dlq-reader")
    consumer = create_consumer(reader_config(settings, "dlq-replay"), errors)
    try:
        ranges = _ranges(settings, dlq_topic, marks, selection)
        progress = Progress(
            "dlq replay",
            sum(r.end - r.start for r in ranges),
            interval=settings.progress_interval,
        )
        chosen = _chosen(consumer, errors, dlq_topic, ranges, selection, timeout, report)
        for message, found, stage in chosen:
            progress.update(report.examined)
            partition, offset = message.partition(), message.offset()
            where = f"{dlq_topic}/{partition}/{offset}"
            if producer is None:
                print(_describe(where, input_topic, found), file=out)
            else:
                try:
                    producer.produce(
                        input_topic,
                        message.key(),
                        message.value(),
                        replay_headers(dlq_topic, partition, offset, found),
                        on_delivery_for(where),
                    )
                except KafkaException as exc:  # refused before sending (e.g. too large)
                    report.failed.append(f"{where}: {exc.args[0] if exc.args else exc}")
                    continue
                producer.poll(0)
            report.by_stage[stage or UNKNOWN_STAGE] += 1
            if limit is not None and report.replayed >= limit:
                break
        progress.close()
    except BaseException:
        log.error(
            "dlq replay stopped before the end; what was sent is being flushed",
            replayed=report.replayed,
            by_stage=dict(report.by_stage),
        )
        raise
    finally:
        consumer.close()
        # Also when reading failed: what was handed to the producer is delivered, or reported.
        if producer is not None:
            unreported = producer.flush(FLUSH_SECONDS)
            if unreported:
                report.failed.append(
                    f"{unreported} replays got no delivery report within {FLUSH_SECONDS:g} s"
                )
    if producer is not None:
        producer.errors.raise_if_fatal()
    log.info(
        "dlq replay done",
        dry_run=dry_run,
        examined=report.examined,
        replayed=report.replayed,
        failed=len(report.failed),
        by_stage=dict(report.by_stage),
    )
    return report


def _ranges(
    settings: Settings, topic: str, marks: dict[int, tuple[int, int]], selection: ReplayFilter
) -> list[PartitionRange]:
    partitions = sorted(marks)
    since = (
        offsets_for_time(settings, topic, partitions, selection.since_ms)
        if selection.since_ms is not None
        else {}
    )
    ranges = []
    for partition in partitions:
        low, high = marks[partition]
        wanted = selection.offsets(partition, low, high)
        if wanted is None:
            continue
        # Records before the first one at or after --since are all older: skip them unread.
        first = since.get(partition)
        start = wanted.start
        if first is not None:
            start = max(start, high if first < 0 else first)
        ranges.append(PartitionRange(partition, min(start, wanted.end), wanted.end))
    return ranges


def _chosen(
    consumer: Any,
    errors: ClientErrors,
    topic: str,
    ranges: list[PartitionRange],
    selection: ReplayFilter,
    timeout: float,
    report: ReplayReport,
) -> Iterator[tuple[Any, dict[str, str], str | None]]:
    """(message, headers as text, stage) of each dead letter `selection` picks, partition after
    partition in offset order; counts what was read in `report.examined`."""
    for wanted in ranges:
        for batch in read_ranges(consumer, errors, topic, [wanted], timeout=timeout):
            for message in batch:
                offset = message.offset()
                if offset >= wanted.end or message.partition() != wanted.partition:
                    continue
                report.examined += 1
                found = header_map(message.headers())
                stage = found.get(ERROR_STAGE)
                if selection.matches(message.partition(), offset, message.timestamp()[1], stage):
                    yield message, found, stage


def _describe(where: str, input_topic: str, found: dict[str, str]) -> str:
    source = "/".join(
        found.get(name, "?") for name in (SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET)
    )
    reason = found.get(ERROR_REASON, "")
    if len(reason) > MAX_SHOWN_REASON:
        reason = reason[: MAX_SHOWN_REASON - 3] + "..."
    return (
        f"{where} -> {input_topic}  stage={found.get(ERROR_STAGE, UNKNOWN_STAGE)}  "
        f"source={source}  reason={reason}"
    )


def run_replay(
    settings: Settings,
    selection: ReplayFilter,
    *,
    limit: int | None,
    dry_run: bool,
    timeout: float,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """`streamer dlq replay`: replay, print the per-stage summary; 1 when a replay failed."""
    report = replay_dead_letters(
        settings, selection, limit=limit, dry_run=dry_run, timeout=timeout, out=out
    )
    print(report.summary(), file=out)
    for failure in report.failed:
        print(f"streamer: replay not acknowledged: {failure}", file=err)
    return 1 if report.failed else 0

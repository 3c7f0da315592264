"""`streamer audit`: reconcile the input topic with the verdicts and dead letters made from it.

Every input record should end as exactly one verdict or one dead letter, and every output names
its input in the `streamer.source.*` headers. The audit reads the three topics and counts, per
input record, the outputs that name it:

- **missing**: an input record no output names (lost, or not processed yet);
- **duplicates**: an input record named by more than one output (at-least-once allows these after
  a crash; exactly-once does not), and how many extra outputs that makes;
- **orphans**: an output that names no input record: missing or unparsable source headers,
  another topic, a partition the input topic does not have, or an offset that is not a record
  of the input topic (a gap left by compaction or a transaction marker, or past its end);
- **outside range**: an output naming an input record outside the audited range; not counted.

What is read, and where reading stops:

- The end offsets of the three topics are taken once, at the start (outputs first, then the
  input: every output written before the snapshot names an input written before it). They are
  high watermarks, not last stable offsets: a transaction still open at the start is waited for.
- All three topics are read with `isolation.level=read_committed`, like the scorer reads its
  input: records of aborted transactions are not seen and do not count.
- A partition is done when the consumer's *position* reaches its end offset. The offset of the
  last record is not enough: transaction markers occupy offsets and are never delivered, and
  neither are aborted records. A partition whose position stops moving for `timeout` seconds
  (an open transaction holding the last stable offset back, an unreachable leader) stops the
  audit with an error naming it, rather than hanging.
- Partitions are assigned directly: no group join, no commits.

Counting is done in numpy arrays indexed by offset, one slot per offset of the audited range;
the per-message Python work is reading the three source headers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol, TextIO

import numpy as np
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streamer.errors import ConfigError, StreamerError
from streamer.headers import SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC
from streamer.kafka.clients import ClientErrors, KafkaMessage, create_consumer
from streamer.progress import Progress
from streamer.settings import Settings

log = structlog.get_logger(__name__)

Expect = Literal["at-least-once", "exactly-once"]
OutputKind = Literal["verdicts", "dead_letters"]

EXIT_CLEAN: Final = 0
EXIT_FINDINGS: Final = 1

DEFAULT_TIMEOUT_SECONDS: Final = 30.0
"""How long a partition may make no progress towards its end offset before the read fails."""
METADATA_TIMEOUT_SECONDS: Final = 30.0
READ_BATCH: Final = 10_000
"""Messages taken per `consume` call."""
CONSUME_WAIT_SECONDS: Final = 0.2
SAMPLE_SIZE: Final = 5
"""Offsets shown for each kind of finding."""

READER_OVERRIDES: Final[dict[str, Any]] = {
    # Aborted records are never seen; markers and aborted records are skipped by the position.
    "isolation.level": "read_committed",
    "enable.auto.commit": False,
    # A start offset deleted by retention while we read must fail the read, not jump to the end.
    "auto.offset.reset": "error",
    "enable.partition.eof": False,
    # Large fetches: reading a topic from the start is throughput-bound, not latency-bound
    # (several times fewer round trips than the 1 MiB default, for about 150 MB more memory).
    "max.partition.fetch.bytes": 10 * 1024 * 1024,
}

# Source codes of an output that names no partition of the input topic (partitions are >= 0).
NO_SOURCE: Final = -1
"""Missing or unparsable `streamer.source.*` headers."""
OTHER_TOPIC: Final = -2
"""`streamer.source.topic` names another topic."""
_MAX_DIGITS: Final = 18
"""Longer numbers do not fit an int64 offset; such a header is unparsable."""

ORPHAN_REASONS: Final = {
    "no_source_headers": "missing or unparsable streamer.source.* headers",
    "other_topic": "names another topic",
    "no_such_partition": "names a partition the input topic does not have",
    "not_a_record": "names an offset that is not a record of the input topic",
    "past_input_end": "names an offset past the input topic's end",
}


class AuditReadError(StreamerError):
    """A topic could not be read to its end offset (a stuck partition, a consumer error)."""


class HeaderedMessage(KafkaMessage, Protocol):
    """A Kafka message with its headers; unit tests stub it."""

    def headers(self) -> Any: ...


# -- headers ---------------------------------------------------------------------------------------


def source_of(headers: Any, input_topic: bytes) -> tuple[int, int]:
    """(partition, offset) of the input record an output names.

    `headers` as the client returns them (a list of name/value pairs, or None); the last value of
    a repeated name wins. Returns `(NO_SOURCE, 0)` when a header is missing or its value is not a
    plain decimal number, `(OTHER_TOPIC, 0)` when the topic header names another topic.
    """
    if not headers:
        return NO_SOURCE, 0
    found = dict(headers)
    topic = found.get(SOURCE_TOPIC)
    if topic != input_topic:
        if isinstance(topic, str):  # headers given as text rather than as the client's bytes
            topic = topic.encode()
        if not isinstance(topic, bytes):
            return NO_SOURCE, 0
        if topic != input_topic:
            return OTHER_TOPIC, 0
    partition = found.get(SOURCE_PARTITION)
    offset = found.get(SOURCE_OFFSET)
    if (
        isinstance(partition, bytes | str)
        and isinstance(offset, bytes | str)
        and 0 < len(partition) <= _MAX_DIGITS
        and 0 < len(offset) <= _MAX_DIGITS
        and partition.isascii()
        and offset.isascii()
        and partition.isdigit()
        and offset.isdigit()
    ):
        return int(partition), int(offset)
    return NO_SOURCE, 0


# -- ranges ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """The offsets [start, end) of one partition that are read."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def resolve_range(
    partition: int,
    low: int,
    high: int,
    since_offset: int | None = None,
    until_offset: int | None = None,
) -> PartitionRange:
    """The audited offsets of one input partition.

    `low`/`high`: the partition's watermarks at the snapshot. `since_offset`/`until_offset`: what
    `offsets_for_times` returned for `--since`/`--until` (the first offset whose timestamp is at
    or after that time; -1 when there is none), or None when the option was not given. The range
    starts at the first record at or after `--since` and ends before the first at or after
    `--until`; it never leaves [low, high).
    """
    # since_offset -1: every record is older than --since, nothing to audit.
    start = low if since_offset is None else high if since_offset < 0 else since_offset
    end = high if until_offset is None or until_offset < 0 else until_offset
    start = min(max(start, low), high)
    end = min(max(end, start), high)
    return PartitionRange(partition, start, end)


# -- counting --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionCounts:
    partition: int
    start_offset: int
    end_offset: int
    inputs: int
    verdicts: int
    dead_letters: int
    missing: int
    duplicates: int
    extra_outputs: int


@dataclass(frozen=True, slots=True)
class OutputRef:
    """Where an orphan output is, and why it is one."""

    topic: str
    partition: int
    offset: int
    reason: str
    names: str
    """The source it names, as read from its headers (`?` when unparsable)."""


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What an audit found; `exit_status` and the two renderings are derived from it."""

    input_topic: str
    output_topic: str
    dlq_topic: str
    since_ms: int | None
    until_ms: int | None
    inputs: int
    verdicts: int
    dead_letters: int
    missing: int
    duplicates: int
    extra_outputs: int
    orphans: int
    orphan_reasons: dict[str, int]
    outside_range: int
    partitions: list[PartitionCounts]
    missing_samples: list[tuple[int, int]]
    duplicate_samples: list[tuple[int, int, int]]
    """(partition, offset, outputs)"""
    orphan_samples: list[OutputRef]
    seconds: float = 0.0

    def exit_status(self, expect: Expect) -> int:
        """1 when an input has no output, or has several and exactly-once is expected; else 0."""
        if self.missing:
            return EXIT_FINDINGS
        if self.duplicates and expect == "exactly-once":
            return EXIT_FINDINGS
        return EXIT_CLEAN

    def as_dict(self, expect: Expect) -> dict[str, Any]:
        return {
            "input_topic": self.input_topic,
            "output_topic": self.output_topic,
            "dlq_topic": self.dlq_topic,
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
            "expect": expect,
            "inputs": self.inputs,
            "verdicts": self.verdicts,
            "dead_letters": self.dead_letters,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "extra_outputs": self.extra_outputs,
            "orphans": self.orphans,
            "orphan_reasons": self.orphan_reasons,
            "outside_range": self.outside_range,
            "partitions": [
                {
                    "partition": p.partition,
                    "start_offset": p.start_offset,
                    "end_offset": p.end_offset,
                    "inputs": p.inputs,
                    "verdicts": p.verdicts,
                    "dead_letters": p.dead_letters,
                    "missing": p.missing,
                    "duplicates": p.duplicates,
                    "extra_outputs": p.extra_outputs,
                }
                for p in self.partitions
            ],
            "samples": {
                "missing": [{"partition": p, "offset": o} for p, o in self.missing_samples],
                "duplicates": [
                    {"partition": p, "offset": o, "outputs": n}
                    for p, o, n in self.duplicate_samples
                ],
                "orphans": [
                    {
                        "topic": r.topic,
                        "partition": r.partition,
                        "offset": r.offset,
                        "reason": r.reason,
                        "names": r.names,
                    }
                    for r in self.orphan_samples
                ],
            },
            "exit_status": self.exit_status(expect),
            "seconds": round(self.seconds, 3),
        }


class Reconciliation:
    """Counts, per input record of the audited ranges, the verdicts and dead letters naming it.

    Feed every input batch (`add_inputs`) before the first output batch (`add_outputs`): whether
    an output names a record is decided as it arrives. Not thread-safe.
    """

    def __init__(
        self,
        input_topic: str,
        ranges: Sequence[PartitionRange],
        input_ends: Mapping[int, int],
    ) -> None:
        """`ranges`: the audited range of each input partition; `input_ends`: the high watermark
        of every input partition at the snapshot (offsets at or past it are no records)."""
        self.input_topic = input_topic
        self._topic_bytes = input_topic.encode()
        self.ranges = sorted(ranges, key=lambda r: r.partition)
        width = max([*input_ends, *(r.partition for r in ranges)], default=-1) + 1
        # Lookup tables indexed by input partition; a partition the topic lacks has known=False.
        self._known = np.zeros(width, dtype=bool)
        self._start = np.zeros(width, dtype=np.int64)
        self._end = np.zeros(width, dtype=np.int64)
        self._high = np.zeros(width, dtype=np.int64)
        self._base = np.zeros(width, dtype=np.int64)
        for partition, high in input_ends.items():
            self._known[partition] = True
            self._start[partition] = self._end[partition] = self._high[partition] = high
        base = 0
        for r in self.ranges:
            self._known[r.partition] = True
            self._start[r.partition], self._end[r.partition] = r.start, r.end
            self._high[r.partition] = max(int(self._high[r.partition]), r.end)
            self._base[r.partition] = base
            base += r.size
        # One slot per offset of every audited range, partition after partition (and one more,
        # never present, so that the index 0 of outputs outside every range is always valid).
        self._present = np.zeros(base + 1, dtype=bool)
        self._counts: dict[OutputKind, np.ndarray] = {
            "verdicts": np.zeros(base + 1, dtype=np.uint32),
            "dead_letters": np.zeros(base + 1, dtype=np.uint32),
        }
        self._outputs_seen = False
        self.outside_range = 0
        self.orphan_reasons: dict[str, int] = dict.fromkeys(ORPHAN_REASONS, 0)
        self.orphan_samples: list[OutputRef] = []

    def add_inputs(self, partitions: np.ndarray, offsets: np.ndarray) -> None:
        """Mark input records as present (offsets outside the audited ranges are ignored)."""
        if self._outputs_seen:
            raise RuntimeError("every input must be added before the first output")
        partitions = np.asarray(partitions, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        if partitions.size == 0:
            return
        index, inside = self._index(partitions, offsets)
        self._present[index[inside]] = True

    def add_outputs(
        self,
        kind: OutputKind,
        output_topic: str,
        messages: Sequence[HeaderedMessage],
        output_ends: np.ndarray | None = None,
    ) -> int:
        """Count a batch of outputs; returns how many were taken.

        Messages at or past `output_ends[partition]` (the output topic's snapshot, indexed by
        partition) are beyond the audit and skipped. No error events: `read_ranges` raises on
        them.
        """
        self._outputs_seen = True
        topic = self._topic_bytes
        out_partitions: list[int] = []
        out_offsets: list[int] = []
        src_partitions: list[int] = []
        src_offsets: list[int] = []
        for message in messages:
            out_partitions.append(message.partition() or 0)
            out_offsets.append(message.offset() or 0)
            headers = message.headers()
            # The hot path, inlined: a verdict's headers as the scorer writes them, exactly the
            # three source headers in this order. Anything else (dead letters carry more) goes
            # through source_of, which applies the same rules to any headers.
            if headers.__class__ is list and len(headers) == 3:
                (name_t, value_t), (name_p, partition), (name_o, offset) = headers
                if (
                    name_t == SOURCE_TOPIC
                    and name_p == SOURCE_PARTITION
                    and name_o == SOURCE_OFFSET
                    and value_t == topic
                    and partition.__class__ is bytes
                    and offset.__class__ is bytes
                    and partition.isdigit()
                    and offset.isdigit()
                    and len(partition) <= _MAX_DIGITS
                    and len(offset) <= _MAX_DIGITS
                ):
                    src_partitions.append(int(partition))
                    src_offsets.append(int(offset))
                    continue
            source = source_of(headers, topic)
            src_partitions.append(source[0])
            src_offsets.append(source[1])
        if not out_partitions:
            return 0
        out_p = np.array(out_partitions, dtype=np.int64)
        out_o = np.array(out_offsets, dtype=np.int64)
        src_p = np.array(src_partitions, dtype=np.int64)
        src_o = np.array(src_offsets, dtype=np.int64)
        if output_ends is not None:
            keep = out_o < output_ends[out_p]
            if not keep.all():
                out_p, out_o, src_p, src_o = out_p[keep], out_o[keep], src_p[keep], src_o[keep]

        known = (src_p >= 0) & (src_p < self._known.size)
        known[known] = self._known[src_p[known]]
        checked = np.where(known, src_p, 0)
        start, end, high = self._start[checked], self._end[checked], self._high[checked]
        in_range = known & (src_o >= start) & (src_o < end)
        index = np.where(in_range, self._base[checked] + src_o - start, 0)
        is_record = in_range & self._present[index]
        np.add.at(self._counts[kind], index[is_record], 1)

        past_end = known & (src_o >= high)
        outside = known & ~in_range & ~past_end
        self.outside_range += int(outside.sum())
        orphan_masks = {
            "no_source_headers": src_p == NO_SOURCE,
            "other_topic": src_p == OTHER_TOPIC,
            "no_such_partition": (src_p >= 0) & ~known,
            "not_a_record": in_range & ~is_record,
            "past_input_end": past_end,
        }
        for reason, mask in orphan_masks.items():
            count = int(mask.sum())
            if not count:
                continue
            self.orphan_reasons[reason] += count
            room = SAMPLE_SIZE - len(self.orphan_samples)
            for at in np.flatnonzero(mask)[: max(room, 0)].tolist():
                names = (
                    "?"
                    if src_p[at] == NO_SOURCE
                    else "another topic"
                    if src_p[at] == OTHER_TOPIC
                    else f"{self.input_topic}[{src_p[at]}]@{src_o[at]}"
                )
                self.orphan_samples.append(
                    OutputRef(output_topic, int(out_p[at]), int(out_o[at]), reason, names)
                )
        return int(out_p.size)

    def _index(self, partitions: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat slot of each (partition, offset), and whether it is inside an audited range."""
        known = (partitions >= 0) & (partitions < self._known.size)
        known[known] = self._known[partitions[known]]
        checked = np.where(known, partitions, 0)
        start = self._start[checked]
        inside = known & (offsets >= start) & (offsets < self._end[checked])
        return np.where(inside, self._base[checked] + offsets - start, 0), inside

    def report(
        self,
        *,
        output_topic: str,
        dlq_topic: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        seconds: float = 0.0,
    ) -> AuditReport:
        present = self._present
        verdicts = self._counts["verdicts"]
        dead_letters = self._counts["dead_letters"]
        outputs = verdicts.astype(np.int64) + dead_letters
        missing = present & (outputs == 0)
        duplicate = outputs > 1
        rows = []
        missing_samples: list[tuple[int, int]] = []
        duplicate_samples: list[tuple[int, int, int]] = []
        for r in self.ranges:
            base = int(self._base[r.partition])
            window = slice(base, base + r.size)
            rows.append(
                PartitionCounts(
                    partition=r.partition,
                    start_offset=r.start,
                    end_offset=r.end,
                    inputs=int(present[window].sum()),
                    verdicts=int(verdicts[window].sum()),
                    dead_letters=int(dead_letters[window].sum()),
                    missing=int(missing[window].sum()),
                    duplicates=int(duplicate[window].sum()),
                    extra_outputs=int((outputs[window][duplicate[window]] - 1).sum()),
                )
            )
            room = SAMPLE_SIZE - len(missing_samples)
            for at in np.flatnonzero(missing[window])[: max(room, 0)].tolist():
                missing_samples.append((r.partition, r.start + at))
            room = SAMPLE_SIZE - len(duplicate_samples)
            for at in np.flatnonzero(duplicate[window])[: max(room, 0)].tolist():
                duplicate_samples.append((r.partition, r.start + at, int(outputs[base + at])))
        return AuditReport(
            input_topic=self.input_topic,
            output_topic=output_topic,
            dlq_topic=dlq_topic,
            since_ms=since_ms,
            until_ms=until_ms,
            inputs=sum(row.inputs for row in rows),
            verdicts=sum(row.verdicts for row in rows),
            dead_letters=sum(row.dead_letters for row in rows),
            missing=sum(row.missing for row in rows),
            duplicates=sum(row.duplicates for row in rows),
            extra_outputs=sum(row.extra_outputs for row in rows),
            orphans=sum(self.orphan_reasons.values()),
            orphan_reasons=dict(self.orphan_reasons),
            outside_range=self.outside_range,
            partitions=rows,
            missing_samples=missing_samples,
            duplicate_samples=duplicate_samples,
            orphan_samples=list(self.orphan_samples),
            seconds=seconds,
        )


# -- rendering -------------------------------------------------------------------------------------


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def format_summary(report: AuditReport, expect: Expect) -> str:
    """The human summary: totals, per-partition counts, samples and the verdict on the whole."""
    if report.since_ms is None and report.until_ms is None:
        scope = "every record up to the end offsets at the start of the audit"
    else:
        since = _time(report.since_ms) if report.since_ms is not None else "the beginning"
        until = _time(report.until_ms) if report.until_ms is not None else "the end at the start"
        scope = f"input records from {since} until {until}"
    orphan_detail = ", ".join(
        f"{ORPHAN_REASONS[reason]}: {count:,}"
        for reason, count in report.orphan_reasons.items()
        if count
    )
    lines = [
        f"streamer audit: {report.input_topic} -> {report.output_topic} + {report.dlq_topic}",
        f"  {'range':<16} {scope} (read committed)",
        f"  {'inputs':<16} {report.inputs:>12,}",
        f"  {'verdicts':<16} {report.verdicts:>12,}",
        f"  {'dead letters':<16} {report.dead_letters:>12,}",
        f"  {'missing':<16} {report.missing:>12,}   inputs with no verdict and no dead letter",
        f"  {'duplicates':<16} {report.duplicates:>12,}   inputs with more than one output "
        f"({report.extra_outputs:,} extra)",
        f"  {'orphans':<16} {report.orphans:>12,}   outputs naming no input record"
        + (f":\n{'':<34}{orphan_detail}" if orphan_detail else ""),
        f"  {'outside range':<16} {report.outside_range:>12,}   outputs naming inputs outside "
        "the audited range (not counted)",
        "",
        f"  {'partition':>9}  {'offsets':<25} {'inputs':>10} {'verdicts':>10} "
        f"{'dead letters':>12} {'missing':>8} {'duplicates':>10}",
    ]
    for p in report.partitions:
        offsets = (
            f"[{p.start_offset:,}, {p.end_offset:,})" if p.end_offset > p.start_offset else "none"
        )
        lines.append(
            f"  {p.partition:>9}  {offsets:<25} {p.inputs:>10,} {p.verdicts:>10,} "
            f"{p.dead_letters:>12,} {p.missing:>8,} {p.duplicates:>10,}"
        )
    if report.missing_samples:
        lines.append(
            "  missing, e.g.    "
            + ", ".join(f"{report.input_topic}[{p}]@{o}" for p, o in report.missing_samples)
        )
    if report.duplicate_samples:
        lines.append(
            "  duplicates, e.g. "
            + ", ".join(
                f"{report.input_topic}[{p}]@{o} ({n} outputs)"
                for p, o, n in report.duplicate_samples
            )
        )
    for ref in report.orphan_samples:
        lines.append(
            f"  orphan           {ref.topic}[{ref.partition}]@{ref.offset}: "
            f"{ORPHAN_REASONS[ref.reason]}" + (f" ({ref.names})" if ref.names != "?" else "")
        )
    status = report.exit_status(expect)
    problems = []
    if report.missing:
        problems.append(f"missing {report.missing:,}")
    if report.duplicates:
        problems.append(f"duplicates {report.duplicates:,}")
    if report.orphans:
        problems.append(f"orphans {report.orphans:,}")
    if not problems:
        verdict = "clean"
    elif status == EXIT_CLEAN:
        verdict = f"within {expect} ({', '.join(problems)})"
    else:
        verdict = f"FAILED for {expect} ({', '.join(problems)})"
    if report.missing and report.until_ms is None:
        lines.append(
            "  note             a running scorer may not have written the outputs of its latest "
            "inputs yet; --until leaves them out"
        )
    lines += ["", f"  result: {verdict}; read in {report.seconds:.1f} s; exit status {status}"]
    return "\n".join(lines)


# -- reading ---------------------------------------------------------------------------------------


def reader_config(settings: Settings, purpose: str) -> dict[str, Any]:
    """A read_committed consumer config that never commits and fails on a lost start offset."""
    return {**settings.reader_config(f"streamer-{purpose}-{uuid.uuid4()}"), **READER_OVERRIDES}


def _log_view(settings: Settings) -> Consumer:
    """A consumer for offset queries that sees the whole log, open transactions included.

    librdkafka answers watermark and offsets-for-times queries at the consumer's isolation level:
    read_committed ones stop at the last stable offset, which an open transaction holds back.
    """
    config = {**reader_config(settings, "offsets"), "isolation.level": "read_uncommitted"}
    return create_consumer(config, ClientErrors("offsets"))


def watermarks(settings: Settings, topic: str) -> dict[int, tuple[int, int]]:
    """partition → (low, high) of `topic` now: the log start and the high watermark.

    The high watermark, not the last stable offset: a read_committed reader that stops at it has
    seen every transaction that was open when it was taken, once they are decided. Raises
    ConfigError when the topic does not exist.
    """
    consumer = _log_view(settings)
    try:
        metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_SECONDS).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            error = metadata.error if metadata is not None else None
            raise ConfigError(
                f"topic {topic!r} cannot be read: {error.str() if error else 'not found'}"
            )
        marks: dict[int, tuple[int, int]] = {}
        for partition in sorted(metadata.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_SECONDS, cached=False
            )
            marks[partition] = (low, high)
        return marks
    finally:
        consumer.close()


def offsets_for_time(
    settings: Settings, topic: str, partitions: Sequence[int], ms: int
) -> dict[int, int]:
    """partition → the first offset whose timestamp is at or after `ms` (-1: none), open
    transactions included."""
    consumer = _log_view(settings)
    try:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, ms) for p in partitions], timeout=METADATA_TIMEOUT_SECONDS
        )
    finally:
        consumer.close()
    for tp in found:
        if tp.error is not None:
            raise AuditReadError(f"{topic}[{tp.partition}]: offsets for time {ms}: {tp.error}")
    return {tp.partition: tp.offset for tp in found}


def read_ranges(
    consumer: Consumer,
    errors: ClientErrors,
    topic: str,
    ranges: Sequence[PartitionRange],
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    batch: int = READ_BATCH,
) -> Iterator[list[Any]]:
    """Batches of `topic`'s messages from each range's start until its end offset.

    Ends when the consumer's position reached every range's end (see the module docstring); a
    batch may hold messages at or past a range's end, which the caller drops. Raises
    AuditReadError when a partition makes no progress for `timeout` seconds or the consumer
    reports an error on a partition.
    """
    pending = {r.partition: r for r in ranges if r.end > r.start}
    if not pending:
        return
    consumer.assign([TopicPartition(topic, r.partition, r.start) for r in pending.values()])
    progress = {p: (r.start, time.monotonic()) for p, r in pending.items()}
    try:
        while pending:
            messages = consumer.consume(batch, CONSUME_WAIT_SECONDS)
            errors.raise_if_fatal()
            if messages:
                for message in messages:
                    if message.error() is not None:
                        _raise_message_error(topic, message)
                yield messages
            now = time.monotonic()
            done = []
            for tp in consumer.position([TopicPartition(topic, p) for p in pending]):
                r = pending[tp.partition]
                if tp.offset >= r.end:
                    done.append(tp)
                    continue
                position = max(tp.offset, r.start)
                if position > progress[tp.partition][0]:
                    progress[tp.partition] = (position, now)
                elif now - progress[tp.partition][1] > timeout:
                    raise AuditReadError(_stuck(consumer, topic, r, position, timeout))
            if done:
                consumer.pause(done)
                for tp in done:
                    del pending[tp.partition]
    finally:
        consumer.unassign()


def _raise_message_error(topic: str, message: Any) -> None:
    error: KafkaError = message.error()
    if error.code() == KafkaError._PARTITION_EOF:
        return
    raise AuditReadError(
        f"{message.topic() or topic}[{message.partition()}]: {error.str()} "
        f"(at offset {message.offset()})"
    )


def _stuck(consumer: Consumer, topic: str, r: PartitionRange, position: int, timeout: float) -> str:
    where = f"{topic}[{r.partition}]"
    try:
        # A read_committed consumer's watermark query answers with the last stable offset.
        _low, stable = consumer.get_watermark_offsets(
            TopicPartition(topic, r.partition), timeout=5, cached=False
        )
    except KafkaException:
        stable = None
    if stable is not None and stable < r.end:
        return (
            f"{where}: stuck at offset {position} for {timeout:g} s, below the end offset "
            f"{r.end} taken at the start: a transaction is still open there (last stable "
            f"offset {stable}); retry when it is committed or aborted, or raise --timeout"
        )
    return (
        f"{where}: no progress from offset {position} towards the end offset {r.end} "
        f"in {timeout:g} s (is the partition's leader reachable?)"
    )


class _Reader:
    """A read_committed consumer for `read_ranges`, closed on exit."""

    def __init__(self, settings: Settings, purpose: str) -> None:
        self.errors = ClientErrors(purpose)
        self.consumer = create_consumer(reader_config(settings, purpose), self.errors)

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *_: object) -> None:
        self.consumer.close()

    def read(
        self, topic: str, ranges: Sequence[PartitionRange], timeout: float
    ) -> Iterator[list[Any]]:
        return read_ranges(self.consumer, self.errors, topic, ranges, timeout=timeout)


@dataclass(frozen=True, slots=True)
class TopicRecord:
    """One record as read back (tests and tools that need whole records)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The last value of header `name` as text, or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return None if value is None else value.decode("utf-8", "replace")
        return None


def read_records(
    settings: Settings, topic: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> list[TopicRecord]:
    """Every committed record of `topic` up to its end offsets now, in partition/offset order."""
    ends = watermarks(settings, topic)
    ranges = [PartitionRange(p, low, high) for p, (low, high) in ends.items()]
    records: list[TopicRecord] = []
    with _Reader(settings, "reader") as reader:
        for batch in reader.read(topic, ranges, timeout):
            for message in batch:
                partition, offset = message.partition(), message.offset()
                if offset >= ends[partition][1]:
                    continue
                records.append(
                    TopicRecord(
                        topic,
                        partition,
                        offset,
                        message.timestamp()[1],
                        message.key(),
                        message.value(),
                        list(message.headers() or []),
                    )
                )
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


# -- the command -----------------------------------------------------------------------------------


def check_window(since_ms: int | None, until_ms: int | None) -> None:
    """Raise ConfigError when the audited window ends before it starts."""
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise ConfigError(f"--since ({_time(since_ms)}) must be before --until ({_time(until_ms)})")


def audit(
    settings: Settings,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> AuditReport:
    """Read the three topics and reconcile them; see the module docstring."""
    check_window(since_ms, until_ms)
    started = time.monotonic()
    # Outputs first: every output written before their snapshot names an input that is
    # already below the input's snapshot, so an offset past it is no record at all.
    output_marks = watermarks(settings, settings.output_topic)
    dlq_marks = watermarks(settings, settings.dlq_topic)
    input_marks = watermarks(settings, settings.input_topic)

    partitions = sorted(input_marks)
    since = (
        offsets_for_time(settings, settings.input_topic, partitions, since_ms)
        if since_ms is not None
        else {}
    )
    until = (
        offsets_for_time(settings, settings.input_topic, partitions, until_ms)
        if until_ms is not None
        else {}
    )
    ranges = [
        resolve_range(p, low, high, since.get(p), until.get(p))
        for p, (low, high) in input_marks.items()
    ]
    reconciliation = Reconciliation(
        settings.input_topic, ranges, {p: high for p, (_, high) in input_marks.items()}
    )
    log.info(
        "audit reading",
        input_topic=settings.input_topic,
        ranges={r.partition: [r.start, r.end] for r in ranges},
    )
    outputs: list[tuple[OutputKind, str, dict[int, tuple[int, int]]]] = [
        ("verdicts", settings.output_topic, output_marks),
        ("dead_letters", settings.dlq_topic, dlq_marks),
    ]
    # Offsets to read in all (an upper bound on records: markers and aborted records take some).
    total = sum(r.end - r.start for r in ranges) + sum(
        high - low for _, _, marks in outputs for low, high in marks.values()
    )
    progress = Progress("audit", total, interval=settings.progress_interval)
    read = 0
    with _Reader(settings, "audit") as reader:
        for batch in reader.read(settings.input_topic, ranges, timeout):
            read += len(batch)
            progress.update(read)
            partitions_read = np.fromiter(
                (m.partition() for m in batch), dtype=np.int64, count=len(batch)
            )
            offsets = np.fromiter((m.offset() for m in batch), dtype=np.int64, count=len(batch))
            reconciliation.add_inputs(partitions_read, offsets)

    for kind, topic, marks in outputs:
        ends = np.zeros(max(marks) + 1, dtype=np.int64)
        for p, (_, high) in marks.items():
            ends[p] = high
        output_ranges = [PartitionRange(p, low, high) for p, (low, high) in marks.items()]
        # A consumer per topic: nothing fetched for one topic can reach the other's count.
        with _Reader(settings, "audit") as reader:
            for batch in reader.read(topic, output_ranges, timeout):
                read += len(batch)
                progress.update(read)
                reconciliation.add_outputs(kind, topic, batch, ends)
    progress.close()
    return reconciliation.report(
        output_topic=settings.output_topic,
        dlq_topic=settings.dlq_topic,
        since_ms=since_ms,
        until_ms=until_ms,
        seconds=time.monotonic() - started,
    )


def run_audit(
    settings: Settings,
    *,
    since_ms: int | None,
    until_ms: int | None,
    expect: Expect,
    timeout: float,
    as_json: bool,
    out: TextIO,
) -> int:
    """`streamer audit`: print the report (text or one JSON object) and return the exit status."""
    report = audit(settings, since_ms=since_ms, until_ms=until_ms, timeout=timeout)
    if as_json:
        print(json.dumps(report.as_dict(expect), separators=(",", ":")), file=out)
    else:
        print(format_summary(report, expect), file=out)
    return report.exit_status(expect)

"""The bench's measuring instruments: processes, topics, output readers, a paced producer.

- `ChildProcess`: a processor in its own process; its peak RSS read from `/proc` while it runs,
  its CPU time from `os.wait4` when it is reaped.
- `read_outputs`: reads an output topic to its end, takes the span of its record timestamps and
  checks that every input record has an output (by the `streamer.source.*` headers), counting
  duplicates.
- `PacedRun` with `LatencyReader`: sends at a fixed rate from one thread, stamping each send
  with `perf_counter_ns` just before `produce`, learns its partition and offset from the delivery
  report, and between sends reads the output topic; output read - send is the latency. One thread
  does both so that neither waits for the other's GIL: sends go out in slices of at most 1 ms,
  and the reader blocks for at most 1 ms between them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.cimpl import NewTopic

from streamer.headers import SOURCE_OFFSET, SOURCE_PARTITION
from streamer.kafka.admin import admin_client
from streamer.kafka.clients import (
    ClientErrors,
    OutputProducer,
    create_consumer,
    poll_batch,
)
from streamer.settings import Settings
from streamer.tools.bench import BenchError

ADMIN_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 60.0
"""Longest wait for a processor to stop cleanly after SIGTERM."""
READ_TIMEOUT: Final = 180.0
PACING_SLICE_SECONDS: Final = 0.001
MB: Final = 1024 * 1024


_STARTED: Final = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, with the seconds since start; stdout carries the table only."""
    print(f"bench: [{time.monotonic() - _STARTED:4.0f} s] {message}", file=sys.stderr, flush=True)


# -- processes -----------------------------------------------------------------------------------


class ChildProcess:
    """A processor started as a process of its own, its output in a log file.

    The bench reaps it itself with `os.wait4`, which hands back the child's CPU time, exact. Its
    peak resident set size is the high-water mark the kernel keeps for the child's own memory
    (`VmHWM` in `/proc/<pid>/status`), read each time the bench checks on any child (every 50 ms
    while it waits for one) and kept when it exits. wait4's `ru_maxrss` would also count the
    bench itself: a child's peak carries over from the copy of its parent it ran as until
    `exec`. The mark only rises, so any reading after the peak is exact; a peak in a child's last
    50 ms may be missed. Without `/proc`, or if the child exits before a first reading,
    `ru_maxrss` is used.
    """

    _running: ClassVar[set[ChildProcess]] = set()
    """Children not yet reaped: each check on one reads the high-water mark of all of them, so a
    child that exits while the bench waits for another has its readings too."""

    def __init__(
        self, name: str, command: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log_file:
            self._popen = subprocess.Popen(
                list(command),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
            )
        self.status: int | None = None
        self.peak_rss_bytes: int | None = None
        self.cpu_seconds: float | None = None
        self._high_water_bytes: int | None = None
        ChildProcess._running.add(self)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def peak_rss_mb(self) -> float:
        return math.nan if self.peak_rss_bytes is None else self.peak_rss_bytes / MB

    def exit_status(self) -> int | None:
        """The exit status once it has exited (reaping it), else None."""
        return self._reap(None)

    def _reap(self, deadline: float | None) -> int | None:
        # Never Popen.poll/wait/send_signal: they would reap the child and lose its usage.
        while self.status is None:
            for child in list(ChildProcess._running):
                child._read_high_water()
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                ChildProcess._running.discard(self)
                self.status = os.waitstatus_to_exitcode(status)
                self._popen.returncode = self.status
                scale = 1 if sys.platform == "darwin" else 1024  # bytes there, KiB on Linux
                self.peak_rss_bytes = self._high_water_bytes or usage.ru_maxrss * scale
                self.cpu_seconds = usage.ru_utime + usage.ru_stime
                break
            if deadline is None or time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return self.status

    def _read_high_water(self) -> None:
        """Keep the child's peak RSS so far (`VmHWM`), if the kernel shows it."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):  # absent once the child is a zombie
                self._high_water_bytes = int(line.split()[1]) * 1024
                return

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; kill it and fail after `timeout` s."""
        status = self._reap(time.monotonic() + timeout)
        if status is None:
            self.kill()
            raise BenchError(
                f"{self.name} did not finish within {timeout:.0f} s; killed.\n{self.log_tail()}"
            )
        return status

    def stop(self) -> int:
        """SIGTERM, then wait for the clean stop (flush, commit) it promises; returns the status."""
        self._signal(signal.SIGTERM)
        return self.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL if still running, and reap."""
        if self._signal(signal.SIGKILL):
            self._reap(time.monotonic() + 10)

    def _signal(self, signum: int) -> bool:
        if self._reap(None) is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)
        return True

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"last lines of {self.log_path}:\n{tail}"

    def logged(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log line of the process whose event is `event`, in order."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == event:
                    found.append(entry)
        return found

    def error_reason(self) -> str:
        """The last error the process logged (JSON log lines), else its last line."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        for line in reversed(lines):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("level") == "error":
                    return str(entry.get("error") or entry.get("event"))
        return lines[-1] if lines else "no output"


def failed(process: ChildProcess, status: int) -> BenchError:
    return BenchError(f"{process.name} exited with status {status}.\n{process.log_tail()}")


# -- topics and records --------------------------------------------------------------------------


def create_topics(
    admin_config: Mapping[str, Any],
    names: Sequence[str],
    *,
    partitions: int,
    config: Mapping[str, str] | None = None,
) -> None:
    """Create `names` (which must not exist) and wait until every partition has a leader."""
    admin = admin_client(dict(admin_config), "bench-admin")
    futures = admin.create_topics(
        [NewTopic(name, partitions, 1, config=dict(config or {})) for name in names],
        operation_timeout=ADMIN_TIMEOUT,
        request_timeout=ADMIN_TIMEOUT,
    )
    for future in futures.values():
        future.result()
    deadline = time.monotonic() + ADMIN_TIMEOUT
    pending = list(names)
    while pending:
        topics = admin.list_topics(timeout=ADMIN_TIMEOUT).topics
        pending = [
            name
            for name in pending
            if name not in topics
            or topics[name].error is not None
            or len(topics[name].partitions) != partitions
            or any(p.leader < 0 for p in topics[name].partitions.values())
        ]
        if pending and time.monotonic() > deadline:
            raise BenchError(f"topics without a leader after {ADMIN_TIMEOUT:.0f} s: {pending}")
        if pending:
            time.sleep(0.1)


def delete_topics(admin_config: Mapping[str, Any], names: Sequence[str]) -> None:
    """Best effort: the bench's topics are big and of no use once it has read them."""
    if not names:
        return
    admin = admin_client(dict(admin_config), "bench-admin")
    for name, future in admin.delete_topics(list(names), operation_timeout=ADMIN_TIMEOUT).items():
        try:
            future.result()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue  # never created: a scorer that stopped before making its changelog
            log(f"could not delete topic {name}: {exc}")


def partition_sizes(settings: Settings, topic: str) -> dict[int, int]:
    """Partition → high watermark of `topic` (records, and transaction markers if any)."""
    consumer = create_consumer(
        settings.reader_config(group_id=f"bench-size-{uuid.uuid4()}"), ClientErrors("bench-size")
    )
    try:
        metadata = consumer.list_topics(topic, timeout=ADMIN_TIMEOUT).topics[topic]
        ends = {}
        for partition in metadata.partitions:
            _, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=ADMIN_TIMEOUT
            )
            ends[partition] = high
        return ends
    finally:
        consumer.close()


def source_of(
    headers: Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None,
) -> tuple[int, int] | None:
    """(source partition, source offset) from an output's `streamer.source.*` headers."""
    partition = offset = None
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for key, value in pairs:
        if key == SOURCE_PARTITION and value is not None:
            partition = int(value)
        elif key == SOURCE_OFFSET and value is not None:
            offset = int(value)
    if partition is None or offset is None:
        return None
    return partition, offset


@dataclass(slots=True)
class OutputSummary:
    count: int = 0
    duplicates: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    log_append_time: bool = True


def read_outputs(
    settings: Settings, topic: str, expected: Mapping[int, int], *, partitions: int
) -> OutputSummary:
    """Read `topic` to its end: count outputs, their append-time span, and check the sources.

    `expected` maps input partition → how many records it holds (offsets 0..n-1). Raises
    `BenchError` if an input record has no output or an output names no input.
    """
    config = {
        **settings.reader_config(group_id=f"bench-reader-{uuid.uuid4()}"),
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
    }
    errors = ClientErrors("bench-reader")
    consumer = create_consumer(config, errors)
    seen = {partition: bytearray(count) for partition, count in expected.items()}
    summary = OutputSummary()
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        at_end: set[int] = set()
        deadline = time.monotonic() + READ_TIMEOUT
        while len(at_end) < partitions:
            if time.monotonic() > deadline:
                raise BenchError(f"reading {topic} did not reach its end in {READ_TIMEOUT:.0f} s")
            errors.raise_if_fatal()
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(message.partition() or 0)
                        continue
                    raise BenchError(f"reading {topic}: {error.str()}")
                kind, stamp = message.timestamp()
                if kind != TIMESTAMP_LOG_APPEND_TIME:
                    summary.log_append_time = False
                if summary.first_ms is None or stamp < summary.first_ms:
                    summary.first_ms = stamp
                if summary.last_ms is None or stamp > summary.last_ms:
                    summary.last_ms = stamp
                source = source_of(message.headers())
                if source is None or source[0] not in seen or source[1] >= len(seen[source[0]]):
                    raise BenchError(f"{topic}: an output names no preloaded input: {source}")
                flags = seen[source[0]]
                if flags[source[1]]:
                    summary.duplicates += 1
                flags[source[1]] = 1
                summary.count += 1
    finally:
        consumer.close()
    missing = sum(len(flags) - sum(flags) for flags in seen.values())
    if missing:
        raise BenchError(f"{topic}: {missing:,} input records have no output")
    return summary


# -- latency -------------------------------------------------------------------------------------


class LatencyReader:
    """Reads a processor's output topic from the start, stamping when each output arrived.

    Joining an output to its send needs its headers, and reading them costs microseconds per
    record, so `read` only stamps and keeps the batch; `arrived` does the parsing when asked, after
    the paced run, where it does not compete with the processor being measured.
    """

    def __init__(self, settings: Settings, topic: str, partitions: int) -> None:
        self.errors = ClientErrors("bench-latency-reader")
        self._consumer = create_consumer(
            settings.reader_config(group_id=f"bench-latency-{uuid.uuid4()}"), self.errors
        )
        self._consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        )
        self._unparsed: list[tuple[int, list[Any]]] = []
        self._arrived: dict[tuple[int, int], int] = {}
        self.outputs = 0
        """Outputs read so far (duplicates included)."""

    def read(self, timeout: float) -> None:
        """Take what has arrived, waiting up to `timeout` s for the first output."""
        messages = poll_batch(self._consumer, 5_000, timeout)
        if messages:
            now = time.perf_counter_ns()
            for message in messages:
                error = message.error()
                if error is not None:
                    raise BenchError(f"latency reader: {error.str()}")
            self._unparsed.append((now, messages))
            self.outputs += len(messages)
        self.errors.raise_if_fatal()

    @property
    def arrived(self) -> dict[tuple[int, int], int]:
        """(source partition, source offset) → perf_counter_ns when its output was first read."""
        arrived = self._arrived
        for now, messages in self._unparsed:
            for message in messages:
                source = source_of(message.headers())
                if source is None:
                    raise BenchError("latency reader: an output without streamer.source headers")
                arrived.setdefault(source, now)
        self._unparsed.clear()
        return arrived

    def close(self) -> None:
        self._consumer.close()


class PacedRun:
    """Sends events at a fixed rate and joins each to its output read by `reader`."""

    def __init__(
        self,
        producer: OutputProducer,
        reader: LatencyReader,
        topic: str,
        events: Sequence[tuple[bytes, bytes]],
        process: ChildProcess,
    ) -> None:
        """`events`: the encoded (key, value) pairs to send, in order; `send` sends a prefix."""
        self._producer = producer
        self._reader = reader
        self._topic = topic
        self._events = events
        self._process = process
        self.sent_at: dict[tuple[int, int], int] = {}
        """Measured sends: (partition, offset) → perf_counter_ns just before produce."""
        self.delivered: list[tuple[int, int]] = []
        """(partition, offset) of every acknowledged send, warm-up included."""
        self._read_up_to = 0
        self._outputs_before = reader.outputs
        self.sent = 0
        self.failures: list[str] = []
        self._measured_window: tuple[int, int] = (0, 0)
        self._measured = 0

    def _on_delivery(self, sent_ns: int, measured: bool) -> Callable[[Any, Any], None]:
        def on_delivery(error: KafkaError | None, message: Any) -> None:
            # Runs inside producer.poll: record only.
            if error is not None:
                self.failures.append(error.str())
                return
            key = (message.partition(), message.offset())
            self.delivered.append(key)
            if measured:
                self.sent_at[key] = sent_ns

        return on_delivery

    def send(self, rate: float, total: int, *, warmup: int) -> None:
        """Send the first `total` events at `rate`/s; the first `warmup` are not measured.

        The garbage collector is off meanwhile: a collection pass over the bookkeeping would
        pause the sender and the reader, and show up as processor latency.
        """
        if total > len(self._events):
            raise ValueError(f"{total} events to send, {len(self._events)} given")
        gc.disable()
        try:
            self._send(rate, total, warmup)
        finally:
            gc.enable()

    def _send(self, rate: float, total: int, warmup: int) -> None:
        producer, reader, events, topic = self._producer, self._reader, self._events, self._topic
        produce = producer.produce
        clock = time.perf_counter_ns
        start = clock()
        first_measured = last_sent = start
        index = 0
        next_check = start
        while index < total:
            now = clock()
            due = min(total, int((now - start) * rate / 1e9) + 1)
            while index < due:
                key, value = events[index]
                stamp = clock()
                measured = index >= warmup
                if index == warmup:
                    first_measured = stamp
                produce(topic, key, value, [], self._on_delivery(stamp, measured))
                last_sent = stamp
                index += 1
            producer.poll(0)
            if now >= next_check:
                self._check_alive()
                next_check = now + 100_000_000
            # Read outputs until the next slice; never spin: at least 1 ms per read.
            reader.read(PACING_SLICE_SECONDS)
        self.sent = total
        self._measured = total - warmup
        self._measured_window = (first_measured, last_sent)

    def drain(self, timeout: float) -> bool:
        """Wait until every send is acknowledged and its output read; False after `timeout`.

        Outputs still missing then are the caller's to report: an overloaded processor is a
        result, not a failure. A send the broker refused is a failure.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._producer.poll(0)
            if self.failures:
                raise BenchError(
                    f"latency producer: {len(self.failures)} sends failed: {self.failures[0]}"
                )
            if self._all_read():
                return True
            self._check_alive()
            self._reader.read(0.05)
        if len(self.delivered) != self.sent:
            raise BenchError(
                f"latency producer: only {len(self.delivered)} of {self.sent} acknowledged"
            )
        return False

    def _all_read(self) -> bool:
        """Every send acknowledged and its output read (checked incrementally)."""
        delivered_count = len(self.delivered)
        if delivered_count != self.sent:
            return False
        if self._reader.outputs - self._outputs_before < delivered_count:
            return False  # cheap to know, and spares parsing headers while outputs still arrive
        arrived, delivered = self._reader.arrived, self.delivered
        while self._read_up_to < len(delivered) and delivered[self._read_up_to] in arrived:
            self._read_up_to += 1
        return self._read_up_to == len(delivered)

    def _check_alive(self) -> None:
        status = self._process.exit_status()
        if status is not None:
            raise failed(self._process, status)

    def measured_count(self) -> int:
        return self._measured

    def achieved_rate(self) -> float:
        first, last = self._measured_window
        if self._measured < 2 or last <= first:
            return math.nan
        return (self._measured - 1) / ((last - first) / 1e9)

    def latencies_ms(self) -> list[float]:
        arrived = self._reader.arrived
        return [(arrived[key] - sent) / 1e6 for key, sent in self.sent_at.items() if key in arrived]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a scorer's metrics)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Scraper:
    """Scrapes a scorer's `/metrics` every `interval` seconds from a daemon thread, as Prometheus
    would, so a throughput run pays what serving metrics costs.

    It waits for the endpoint to answer (the scorer is starting), then scrapes until the
    endpoint stops answering (the scorer has exited) or `stop` is called.
    """

    START_SECONDS: ClassVar[float] = 120.0

    def __init__(self, process: ChildProcess, port: int, interval: float) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"scrape-{process.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                if self.scrapes or time.monotonic() - started > self.START_SECONDS:
                    return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

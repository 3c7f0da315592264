"""`streamer demo`: the whole flow on one machine, with a summary a person can check.

Trains a model if none exists, creates the topics, starts a scorer (`streamer run`, a separate
process as in production), then feeds it synthetic transactions and reads every verdict back:
- a warm-up, until the scorer has joined its group and answers;
- a burst of `burst_count` events plus a handful of malformed records (throughput);
- a paced phase at `latency_rate` events/s (end-to-end latency: produce call → verdict read).
Precision and recall are computed against the generator's own fraud labels. Finally the scorer
is stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import math
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import structlog
from confluent_kafka import TopicPartition

from streamer.errors import DecodeError, StreamerError
from streamer.headers import ERROR_STAGE, header_map
from streamer.kafka.admin import ensure_topics
from streamer.kafka.clients import (
    ClientErrors,
    OutputProducer,
    create_consumer,
    poll_batch,
    topic_partitions,
    watermarks,
)
from streamer.progress import Progress
from streamer.serde import decode_verdict, encode_transaction
from streamer.settings import Settings
from streamer.synthetic import LabelledTransaction, SyntheticWorld
from streamer.tools.produce import publish

log = structlog.get_logger(__name__)

DEMO_DIR: Final = Path(".streamer")
WARM_UP_COUNT: Final = 200
WAIT_SECONDS: Final = 120.0


@dataclass
class Collected:
    """What the reader thread saw on the verdict and dead-letter topics."""

    verdicts: dict[str, tuple[float, bool]] = field(default_factory=dict)
    """transaction_id → (time read, is_fraud)"""
    dead_letters: Counter[str] = field(default_factory=Counter)
    """stage → count"""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def outputs(self) -> int:
        with self.lock:
            return len(self.verdicts) + sum(self.dead_letters.values())


class OutputReader(threading.Thread):
    """Reads verdicts and dead letters from their end offsets at start, stamping arrival time."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="demo-reader", daemon=True)
        self._settings = settings
        self.collected = Collected()
        self._stop_event = threading.Event()
        config = settings.reader_config(group_id=f"streamer-demo-{uuid.uuid4()}")
        self.errors = ClientErrors("demo-reader")
        self._consumer = create_consumer(config, self.errors)
        assignment = []
        for topic in (settings.output_topic, settings.dlq_topic):
            for partition in topic_partitions(self._consumer, topic, timeout=30):
                _, high = watermarks(self._consumer, topic, partition, timeout=30)
                assignment.append(TopicPartition(topic, partition, high))
        self._consumer.assign(assignment)

    def run(self) -> None:
        output_topic = self._settings.output_topic
        collected = self.collected
        while not self._stop_event.is_set():
            messages = poll_batch(self._consumer, 1000, 0.05)
            now = time.perf_counter()
            with collected.lock:
                for message in messages:
                    if message.error() is not None:
                        continue
                    if message.topic() == output_topic:
                        try:
                            verdict = decode_verdict(message.value() or b"")
                        except DecodeError:
                            continue
                        collected.verdicts[verdict["transaction_id"]] = (now, verdict["is_fraud"])
                    else:
                        stage = header_map(message.headers()).get(ERROR_STAGE, "?")
                        collected.dead_letters[stage] += 1
        self._consumer.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def malformed_records(
    card_id: str, template: LabelledTransaction
) -> list[tuple[bytes | None, bytes | None, str]]:
    """(key, value, expected stage) for every kind of bad input the scorer must dead-letter."""
    good = dict(template.record)
    value = encode_transaction(good)

    def variant(**changes: object) -> bytes:
        return encode_transaction({**good, **changes, "transaction_id": str(uuid.uuid4())})

    key = card_id.encode()
    return [
        (key, b"\x00\xffnot avro at all", "decode"),
        (key, value[: len(value) // 2], "decode"),
        (key, value + b"trailing", "decode"),
        (key, None, "decode"),
        (key, b"\x00" * (256 * 1024), "decode"),
        (key, variant(amount=-12.5), "validate"),
        (key, variant(amount=math.nan), "validate"),
        (key, variant(currency="XXX"), "validate"),
        (key, variant(country="ZZ"), "validate"),
        (None, variant(), "validate"),
    ]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


def run_demo(
    settings: Settings, *, burst_count: int, latency_rate: float, latency_count: int
) -> int:
    from streamer.model.train import train_model

    DEMO_DIR.mkdir(exist_ok=True)
    if not settings.model_path.exists():
        print(f"no model at {settings.model_path}: training one (about a minute)...", flush=True)
        train_model(settings.model_path, progress_interval=settings.progress_interval)
    ensure_topics(
        settings.admin_config(),
        [settings.input_topic, settings.output_topic, settings.dlq_topic],
        partitions=3,
    )
    reader = OutputReader(settings)
    reader.start()
    scorer_log = DEMO_DIR / "demo-scorer.log"
    scorer = _start_scorer(settings, scorer_log)
    producer = OutputProducer(settings.producer_config(), name="demo-producer")
    seed = secrets.randbelow(2**31)
    # Cards of their own: a second demo on the same broker must not meet the first one's
    # histories, which the scorer's group keeps in its changelog.
    world = SyntheticWorld(seed, card_prefix=f"card-{seed}-")
    sent_at: dict[str, float] = {}
    labels: dict[str, bool] = {}

    def remember(event: LabelledTransaction) -> None:
        transaction_id = event.record["transaction_id"]
        sent_at[transaction_id] = time.perf_counter()
        labels[transaction_id] = event.is_fraud

    try:
        print(f"scorer started (pid {scorer.pid}, log {scorer_log}); warming up...", flush=True)
        publish(producer, settings.input_topic, world.generate(WARM_UP_COUNT), on_sent=remember)
        _wait_for_outputs(reader.collected, WARM_UP_COUNT, scorer, scorer_log)

        burst = list(world.generate(burst_count))
        bad = malformed_records(burst[0].record["card_id"], burst[0])
        baseline = reader.collected.outputs()
        print(f"burst: {burst_count:,} events + {len(bad)} malformed records...", flush=True)
        started = time.perf_counter()
        for key, value, _stage in bad:
            # No delivery callback: each of these must come back as a dead letter, and the
            # wait below fails if one does not.
            producer.produce(settings.input_topic, key, value, [], None)
        publish(
            producer,
            settings.input_topic,
            burst,
            on_sent=remember,
            progress=Progress("burst", burst_count, interval=settings.progress_interval),
        )
        _wait_for_outputs(reader.collected, baseline + burst_count + len(bad), scorer, scorer_log)
        with reader.collected.lock:
            last_read = max(reader.collected.verdicts[e.record["transaction_id"]][0] for e in burst)
        throughput = burst_count / (last_read - started)

        print(f"paced: {latency_count:,} events at {latency_rate:,.0f}/s...", flush=True)
        paced = list(world.generate(latency_count))
        baseline = reader.collected.outputs()
        publish(producer, settings.input_topic, paced, rate=latency_rate, on_sent=remember)
        _wait_for_outputs(reader.collected, baseline + latency_count, scorer, scorer_log)
        producer.errors.raise_if_fatal()
        reader.errors.raise_if_fatal()
    except BaseException:
        scorer.kill()
        reader.stop()
        raise
    scorer.send_signal(signal.SIGTERM)
    try:
        scorer_exit = scorer.wait(timeout=60)
    except subprocess.TimeoutExpired:
        scorer.kill()
        scorer_exit = -9
    reader.stop()

    collected = reader.collected
    latencies = [
        (collected.verdicts[e.record["transaction_id"]][0] - sent_at[e.record["transaction_id"]])
        * 1000
        for e in paced
    ]
    predicted = {tid: flagged for tid, (_, flagged) in collected.verdicts.items() if tid in labels}
    true_pos = sum(1 for tid, flagged in predicted.items() if flagged and labels[tid])
    flagged_count = sum(predicted.values())
    actual = sum(labels[tid] for tid in predicted)
    precision = true_pos / flagged_count if flagged_count else math.nan
    recall = true_pos / actual if actual else math.nan
    events_in = len(labels) + len(bad)
    stages = ", ".join(
        f"{stage} {count}" for stage, count in sorted(collected.dead_letters.items())
    )
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    rows = [
        ("events in", f"{events_in:,}", f"{len(labels):,} synthetic + {len(bad)} malformed"),
        ("verdicts out", f"{len(predicted):,}", ""),
        ("dead letters", f"{sum(collected.dead_letters.values()):,}", stages),
        ("flagged as fraud", f"{flagged_count:,}", f"{actual:,} frauds in the generator's labels"),
        ("precision / recall", f"{precision:.3f} / {recall:.3f}", "against the generator's labels"),
        (
            "throughput",
            f"{throughput:,.0f} events/s",
            f"burst of {burst_count:,}: first send to last verdict read",
        ),
        (
            "latency p50 / p99",
            f"{p50:.1f} / {p99:.1f} ms",
            f"at {latency_rate:,.0f} events/s: send to verdict read",
        ),
        ("scorer exit status", str(scorer_exit), "after SIGTERM"),
    ]
    print(f"\nstreamer demo: summary (seed {seed})")
    for label, shown, note in rows:
        print(f"  {label:<20} {shown:>22}   {note}")
    missing = len(labels) - len(predicted)
    if missing or scorer_exit != 0:
        print(f"FAILED: {missing} events without a verdict, scorer exit {scorer_exit}")
        return 1
    return 0


def _start_scorer(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "streamer",
        "run",
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--input-topic",
        settings.input_topic,
        "--output-topic",
        settings.output_topic,
        "--dlq-topic",
        settings.dlq_topic,
        "--group-id",
        settings.group_id,
        "--model-path",
        str(settings.model_path),
        "--log-format",
        "json",
    ]
    if settings.threshold is not None:
        command += ["--threshold", str(settings.threshold)]
    # The scorer inherits this process's environment, so STREAMER_KAFKA_* settings reach it too.
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def _wait_for_outputs(
    collected: Collected, expected: int, scorer: subprocess.Popen[bytes], log_path: Path
) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while collected.outputs() < expected:
        if scorer.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise StreamerError(
                f"the scorer exited with status {scorer.returncode}:\n" + "\n".join(tail)
            )
        if time.monotonic() > deadline:
            raise StreamerError(
                f"only {collected.outputs()} of {expected} outputs after {WAIT_SECONDS:.0f} s; "
                f"see {log_path}"
            )
        time.sleep(0.02)

"""Helpers for integration tests: run the scorer as a process, produce, read topics back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from streamer.headers import header_map
from streamer.kafka.clients import OutputProducer
from streamer.synthetic import LabelledTransaction, SyntheticWorld
from streamer.tools.produce import publish
from tests.conftest import ROOT, Topics

SCORER_TIMEOUT = 180.0


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]


def scorer_env(bootstrap: str, topics: Topics, model_path: Path, **extra: str) -> dict[str, str]:
    """The environment a scorer process runs with in a test."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMER_")}
    env.update(
        {
            "STREAMER_BOOTSTRAP_SERVERS": bootstrap,
            "STREAMER_INPUT_TOPIC": topics.input,
            "STREAMER_OUTPUT_TOPIC": topics.output,
            "STREAMER_DLQ_TOPIC": topics.dlq,
            "STREAMER_GROUP_ID": topics.group,
            "STREAMER_MODEL_PATH": str(model_path),
            "STREAMER_LOG_FORMAT": "json",
            "STREAMER_PROGRESS_INTERVAL": "1",
            # Many scorers run at once (a group of three, other test sessions on the machine):
            # none serves metrics unless its test asks for a port of its own.
            "STREAMER_METRICS_PORT": "0",
        }
    )
    env.update(extra)
    return env


def streamer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer", *args]


def start_scorer(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        streamer_command("run", *args),
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_scorer(env: dict[str, str], until_idle: float = 3.0) -> subprocess.CompletedProcess[str]:
    """Run `streamer run --until-idle` to completion."""
    return subprocess.run(
        streamer_command("run", "--until-idle", str(until_idle)),
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SCORER_TIMEOUT,
    )


def produce_synthetic(
    bootstrap: str, topic: str, count: int, seed: int
) -> list[LabelledTransaction]:
    events = list(SyntheticWorld(seed).generate(count))
    report = publish(OutputProducer({"bootstrap.servers": bootstrap}), topic, events)
    assert report.acknowledged == count, report
    return events


def produce_raw(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    failures: list[str] = []

    def on_delivery(error: object, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    for key, value in records:
        producer.produce(topic, value, key, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert not failures, failures


def read_all(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Record]:
    """Every record of `topic` up to its end offsets now (read_committed: no aborted ones)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        ends: dict[int, int] = {}
        assignment = []
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
            if high > low:
                ends[partition] = high
                assignment.append(TopicPartition(topic, partition, low))
        consumer.assign(assignment)
        records: list[Record] = []
        remaining = dict(ends)
        deadline = time.monotonic() + timeout
        while remaining:
            assert time.monotonic() < deadline, f"timed out reading {topic}: {remaining}"
            for message in consumer.consume(1000, 0.2):
                if message.error() is not None:
                    continue
                partition, offset = message.partition(), message.offset()
                assert partition is not None
                assert offset is not None
                records.append(
                    Record(
                        partition,
                        offset,
                        message.key(),
                        message.value(),
                        header_map(message.headers()),
                    )
                )
            # Stop on the position, not the last offset seen: a transaction's commit marker
            # takes an offset and is never delivered.
            positions = consumer.position(
                [TopicPartition(topic, partition) for partition in remaining]
            )
            for tp in positions:
                if tp.offset >= remaining[tp.partition]:
                    del remaining[tp.partition]
        return records
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition → high watermark of `topic`."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-ends-{uuid.uuid4()}"})
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        return {
            partition: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)[
                1
            ]
            for partition in metadata.topics[topic].partitions
        }
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, topics: Topics) -> dict[int, int]:
    """The scorer group's committed offsets on the input topic (partition → offset; -1001 none).

    Read uncommitted: a read_committed consumer asks for stable offsets only (KIP-447), and while
    an exactly-once scorer's transaction holds offsets not yet committed (say it was frozen
    between sending them and committing) the broker answers "unstable" until the transaction
    ends, up to transaction.timeout.ms. Either way only committed offsets are returned.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": topics.group,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        metadata = consumer.list_topics(topics.input, timeout=30)
        partitions = [
            TopicPartition(topics.input, p) for p in metadata.topics[topics.input].partitions
        ]
        return {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=30)}
    finally:
        consumer.close()

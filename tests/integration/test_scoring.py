"""The scorer end to end on a real broker: verdicts, dead letters, clean stops, bad config."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from streamer.kafka.clients import OutputProducer
from streamer.model.artifact import load_model
from streamer.serde import decode_transaction, decode_verdict, encode_transaction
from streamer.synthetic import LabelledTransaction, SyntheticWorld
from streamer.tools.produce import publish
from tests.conftest import Topics
from tests.integration.support import (
    committed_offsets,
    produce_raw,
    produce_synthetic,
    read_all,
    run_scorer,
    scorer_env,
    start_scorer,
    streamer_command,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class TestScoring:
    def test_every_event_gets_exactly_one_verdict(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """10,000 events in, 10,000 verdicts out, one per transaction, fields and headers right."""
        events = produce_synthetic(bootstrap_servers, topics.input, 10_000, seed=101)
        result = run_scorer(scorer_env(bootstrap_servers, topics, model_path))
        assert result.returncode == 0, result.stderr[-3000:]

        card = load_model(model_path).card
        inputs = {(r.partition, r.offset): r for r in read_all(bootstrap_servers, topics.input)}
        verdicts = read_all(bootstrap_servers, topics.output)
        by_id = Counter(decode_verdict(v.value or b"")["transaction_id"] for v in verdicts)
        assert set(by_id) == {e.record["transaction_id"] for e in events}
        assert set(by_id.values()) == {1}
        assert read_all(bootstrap_servers, topics.dlq) == []

        for record in verdicts:
            verdict = decode_verdict(record.value or b"")
            assert record.headers["streamer.source.topic"] == topics.input
            source = inputs[
                (int(record.headers["streamer.source.partition"]),
                 int(record.headers["streamer.source.offset"]))
            ]  # fmt: skip
            transaction = decode_transaction(source.value or b"")
            assert transaction["transaction_id"] == verdict["transaction_id"]
            assert record.key == source.key == verdict["card_id"].encode()
            assert verdict["event_time"] == transaction["event_time"]
            assert 0.0 <= verdict["score"] <= 1.0
            assert verdict["is_fraud"] == (verdict["score"] >= verdict["threshold"])
            assert verdict["threshold"] == pytest.approx(card.threshold)
            assert (verdict["model_name"], verdict["model_version"]) == (card.name, card.version)
            assert abs(verdict["scored_at"] - time.time() * 1000) < 10 * 60 * 1000

        flagged = {decode_verdict(v.value or b"")["transaction_id"] for v in verdicts
                   if decode_verdict(v.value or b"")["is_fraud"]}  # fmt: skip
        frauds = {e.record["transaction_id"] for e in events if e.is_fraud}
        assert len(flagged & frauds) / len(frauds) > 0.3, "the model should catch real fraud"
        assert committed_offsets(bootstrap_servers, topics) == {
            p: max(o for (pp, o) in inputs if pp == p) + 1 for p in {p for (p, _) in inputs}
        }

    def test_threshold_override(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """STREAMER_THRESHOLD replaces the card's threshold in every verdict."""
        produce_synthetic(bootstrap_servers, topics.input, 300, seed=5)
        env = scorer_env(bootstrap_servers, topics, model_path, STREAMER_THRESHOLD="0.0")
        assert run_scorer(env).returncode == 0
        verdicts = [
            decode_verdict(r.value or b"") for r in read_all(bootstrap_servers, topics.output)
        ]
        assert len(verdicts) == 300
        assert all(v["threshold"] == 0.0 and v["is_fraud"] for v in verdicts)


class TestDeadLetters:
    def test_malformed_records_are_dead_lettered_and_good_ones_scored(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """Each kind of bad input lands in the DLQ with its stage; every good record is scored."""
        good = produce_synthetic(bootstrap_servers, topics.input, 2_000, seed=202)
        template = dict(good[0].record)

        def variant(**changes: object) -> bytes:
            return encode_transaction({**template, "transaction_id": str(uuid.uuid4()), **changes})

        key = template["card_id"].encode()
        valid = encode_transaction(template)
        bad: list[tuple[bytes | None, bytes | None, str, str]] = [
            (key, b"\x00\x01garbage\xff", "decode", "not an Avro Transaction"),
            (key, valid[:7], "decode", "not an Avro Transaction"),
            (key, valid + b"\x00\x00", "decode", "trailing bytes"),
            (key, None, "decode", "tombstone"),
            (key, b"\x02" * 100_000, "decode", "exceeds the limit"),
            (key, variant(amount=-3.0), "validate", "amount: Input should be greater than"),
            (key, variant(amount=math.nan), "validate", "amount: Input should be a finite number"),
            (key, variant(currency="ABC"), "validate", "unknown ISO 4217 currency code"),
            (key, variant(country="QQ"), "validate", "unknown ISO 3166-1 alpha-2"),
            (key, variant(channel="carrier-pigeon"), "validate", "unknown channel"),
            (None, variant(), "validate", "missing key"),
            (b"someone-else", variant(), "validate", "does not match card_id"),
        ]
        produce_raw(bootstrap_servers, topics.input, [(k, v) for k, v, _, _ in bad])
        produce_synthetic(bootstrap_servers, topics.input, 1_000, seed=203)

        result = run_scorer(scorer_env(bootstrap_servers, topics, model_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert '"dead letter"' in result.stderr

        dead = read_all(bootstrap_servers, topics.dlq)
        assert len(dead) == len(bad)
        by_value = {(d.key, d.value): d for d in dead}
        for key_bytes, value, stage, reason in bad:
            letter = by_value[(key_bytes, value)]  # key and value bytes unchanged
            assert letter.headers["streamer.error.stage"] == stage
            assert reason in letter.headers["streamer.error.reason"]
            assert letter.headers["streamer.error.class"].startswith("streamer.errors.")
            assert letter.headers["streamer.source.topic"] == topics.input
            assert letter.headers["streamer.consumer.group"] == topics.group
            int(letter.headers["streamer.source.partition"])
            int(letter.headers["streamer.source.offset"])

        verdict_ids = Counter(
            decode_verdict(r.value or b"")["transaction_id"]
            for r in read_all(bootstrap_servers, topics.output)
        )
        assert len(verdict_ids) == 3_000
        assert set(verdict_ids.values()) == {1}


class TestStopAndRestart:
    def test_sigterm_mid_stream_then_restart_loses_nothing(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """SIGTERM finishes in-flight work and exits 0; a restart completes the rest, once each."""
        # Enough that the stop lands mid-stream: the first commit shows after about a second,
        # and the scorer reads tens of thousands of events a second.
        total = 200_000
        events = produce_synthetic(bootstrap_servers, topics.input, total, seed=303)
        env = scorer_env(bootstrap_servers, topics, model_path, STREAMER_BATCH_SIZE="100")
        scorer = start_scorer(env)
        deadline = time.monotonic() + 120
        while not committed_progress(bootstrap_servers, topics):
            assert scorer.poll() is None, scorer.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the scorer made no progress"
            time.sleep(0.2)
        scorer.send_signal(signal.SIGTERM)
        _, stderr = scorer.communicate(timeout=60)
        assert scorer.returncode == 0, stderr[-3000:]
        assert '"stop requested"' in stderr

        first_run = len(read_all(bootstrap_servers, topics.output))
        assert 0 < first_run < total, "stop should land mid-stream"

        result = run_scorer(env)
        assert result.returncode == 0, result.stderr[-3000:]
        ids = Counter(
            decode_verdict(r.value or b"")["transaction_id"]
            for r in read_all(bootstrap_servers, topics.output)
        )
        assert set(ids) == {e.record["transaction_id"] for e in events}
        assert max(ids.values()) == 1, "a clean stop commits everything it produced"


class TestDeliveryFailure:
    def test_rejected_verdicts_stop_the_scorer_and_commit_nothing_past_them(
        self, bootstrap_servers: str, model_path: Path
    ) -> None:
        """When the broker refuses the outputs, the scorer exits 1 and the inputs stay unread."""
        suffix = uuid.uuid4().hex[:12]
        topics = Topics(f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}", f"group-{suffix}")
        admin = AdminClient({"bootstrap.servers": bootstrap_servers})
        futures = admin.create_topics(
            [
                NewTopic(topics.input, 1, 1),
                # Smaller than any record batch: every verdict is rejected by the broker.
                NewTopic(topics.output, 1, 1, config={"max.message.bytes": "16"}),
                NewTopic(topics.dlq, 1, 1),
            ]
        )
        for future in futures.values():
            future.result()
        produce_synthetic(bootstrap_servers, topics.input, 200, seed=17)

        result = run_scorer(scorer_env(bootstrap_servers, topics, model_path))
        assert result.returncode == 1, result.stderr[-3000:]
        assert "was not delivered" in result.stderr
        assert committed_offsets(bootstrap_servers, topics) == {0: -1001}
        assert read_all(bootstrap_servers, topics.dlq) == []


class TestRebalance:
    def test_second_scorer_joining_mid_stream_takes_over_cleanly(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """On revoke the first scorer commits what it finished: nothing lost, nothing repeated."""
        # Events flow at 5,000/s until the second scorer has joined the group, then 3 s more, so
        # the second always joins while the first is busy however slowly the processes start.
        joined = threading.Event()
        world = SyntheticWorld(404)

        def until_joined() -> Iterator[LabelledTransaction]:
            while not joined.is_set():
                yield from world.generate(1_000)
            yield from world.generate(15_000)

        events: list[LabelledTransaction] = []
        feed = threading.Thread(
            target=publish,
            args=(
                OutputProducer({"bootstrap.servers": bootstrap_servers}),
                topics.input,
                until_joined(),
            ),
            kwargs={"rate": 5_000.0, "on_sent": events.append},
        )
        env = scorer_env(bootstrap_servers, topics, model_path)
        first = start_scorer(env, "--until-idle", "3")
        feed.start()
        try:
            deadline = time.monotonic() + 120
            while not committed_progress(bootstrap_servers, topics):
                assert first.poll() is None, first.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the first scorer made no progress"
                time.sleep(0.2)
            second = start_scorer(env, "--until-idle", "3")
            while group_members(bootstrap_servers, topics) < 2:
                assert second.poll() is None, second.communicate()[1][-3000:]
                assert time.monotonic() < deadline + 120, "the second scorer did not join"
                time.sleep(0.2)
        finally:
            joined.set()
        feed.join(timeout=120)
        _, first_log = first.communicate(timeout=180)
        _, second_log = second.communicate(timeout=180)
        assert first.returncode == 0, first_log[-3000:]
        assert second.returncode == 0, second_log[-3000:]
        assert stopped_counters(first_log)["consumed"] > 0
        assert stopped_counters(second_log)["consumed"] > 0, "the second scorer should take part"

        ids = Counter(
            decode_verdict(r.value or b"")["transaction_id"]
            for r in read_all(bootstrap_servers, topics.output)
        )
        assert set(ids) == {e.record["transaction_id"] for e in events}
        assert max(ids.values()) == 1, "the hand-over should repeat nothing"


def stopped_counters(log: str) -> dict[str, int]:
    """The counters of a scorer's final "scorer stopped" JSON log line."""
    for line in reversed(log.splitlines()):
        if '"scorer stopped"' in line:
            entry: dict[str, int] = json.loads(line)
            return entry
    raise AssertionError("no 'scorer stopped' line in the log")


def group_members(bootstrap: str, topics: Topics) -> int:
    """How many members the scorer group has now."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    group = admin.describe_consumer_groups([topics.group])[topics.group].result(timeout=30)
    return len(group.members)


_COORDINATOR_NOT_READY = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    }
)


def committed_progress(bootstrap: str, topics: Topics) -> bool:
    """Some offset committed; False too while the group's coordinator is still being set up."""
    try:
        committed = committed_offsets(bootstrap, topics)
    except KafkaException as exc:
        if exc.args[0].code() in _COORDINATOR_NOT_READY:
            return False
        raise
    return any(offset > 0 for offset in committed.values())


class TestStartUpRefusals:
    def test_bad_config_exits_non_zero_naming_the_variable(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """An invalid variable stops the process before Kafka, naming the variable."""
        env = scorer_env(
            bootstrap_servers, topics, model_path, STREAMER_PROCESSING_GUARANTEE="sometimes"
        )
        result = run_scorer(env)
        assert result.returncode == 2
        assert "STREAMER_PROCESSING_GUARANTEE" in result.stderr
        assert "'sometimes'" in result.stderr

    def test_refused_model_consumes_and_commits_nothing(
        self, bootstrap_servers: str, topics: Topics, model_path: Path, tmp_path: Path
    ) -> None:
        """An artefact with one flipped byte stops the scorer before it reads a record."""
        broken = tmp_path / model_path.name
        data = bytearray(model_path.read_bytes())
        data[len(data) // 2] ^= 0x01
        broken.write_bytes(bytes(data))
        card = model_path.with_name(model_path.stem + ".card.json")
        broken.with_name(card.name).write_bytes(card.read_bytes())
        produce_synthetic(bootstrap_servers, topics.input, 50, seed=9)

        result = run_scorer(scorer_env(bootstrap_servers, topics, broken))
        assert result.returncode == 3
        assert "sha256" in result.stderr
        assert set(committed_offsets(bootstrap_servers, topics).values()) == {-1001}
        assert read_all(bootstrap_servers, topics.output) == []


class TestCommands:
    def test_produce_then_tail(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """`streamer produce` feeds the scorer and `streamer tail` shows its verdicts."""
        env = scorer_env(bootstrap_servers, topics, model_path)
        produced = subprocess.run(
            streamer_command("produce", "--count", "40", "--rate", "400", "--seed", "3"),
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert produced.returncode == 0, produced.stderr
        assert run_scorer(env).returncode == 0
        tailed = subprocess.run(
            streamer_command("tail", "--from-beginning", "--count", "40", "--format", "json"),
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert tailed.returncode == 0, tailed.stderr
        lines = tailed.stdout.strip().splitlines()
        assert len(lines) == 40
        assert all(f'"source":"{topics.input}[' in line for line in lines)

    def test_topics_create_is_idempotent(self, bootstrap_servers: str) -> None:
        """`streamer topics create` creates missing topics and leaves existing ones alone."""
        suffix = uuid.uuid4().hex[:8]
        args = [
            "topics", "create", "--partitions", "2",
            "--input-topic", f"in-{suffix}", "--output-topic", f"out-{suffix}",
            "--dlq-topic", f"dlq-{suffix}", "--bootstrap-servers", bootstrap_servers,
        ]  # fmt: skip
        env = {**os.environ, "STREAMER_GROUP_ID": f"group-{suffix}"}
        first = subprocess.run(
            streamer_command(*args), capture_output=True, text=True, timeout=60, env=env
        )
        assert first.returncode == 0, first.stderr
        assert first.stdout.count("created") == 4, "three topics and the state changelog"
        assert f"group-{suffix}-card-state-changelog: created" in first.stdout
        second = subprocess.run(
            streamer_command(*args), capture_output=True, text=True, timeout=60, env=env
        )
        assert second.stdout.count("exists") == 4

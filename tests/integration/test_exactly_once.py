"""Exactly-once mode on a real broker: transactions, read_committed readers, clean stops."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from streamer.serde import decode_verdict
from tests.conftest import Topics
from tests.integration.support import (
    committed_offsets,
    end_offsets,
    produce_raw,
    produce_synthetic,
    read_all,
    run_scorer,
    scorer_env,
    start_scorer,
)
from tests.integration.test_scoring import committed_progress, stopped_counters

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXACTLY_ONCE = {"STREAMER_PROCESSING_GUARANTEE": "exactly-once"}


def verdict_ids(bootstrap: str, topic: str) -> Counter[str]:
    return Counter(
        decode_verdict(r.value or b"")["transaction_id"] for r in read_all(bootstrap, topic)
    )


class TestExactlyOnce:
    def test_every_event_gets_one_committed_verdict_or_dead_letter(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """Verdicts and dead letters arrive in transactions; offsets commit with them."""
        events = produce_synthetic(bootstrap_servers, topics.input, 5_000, seed=11)
        produce_raw(bootstrap_servers, topics.input, [(b"card", b"\x00garbage"), (b"k", None)])
        events += produce_synthetic(bootstrap_servers, topics.input, 5_000, seed=12)
        env = scorer_env(bootstrap_servers, topics, model_path, **EXACTLY_ONCE)
        result = run_scorer(env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert '"transactions ready"' in result.stderr

        ids = verdict_ids(bootstrap_servers, topics.output)
        assert set(ids) == {e.record["transaction_id"] for e in events}
        assert set(ids.values()) == {1}
        dead = read_all(bootstrap_servers, topics.dlq)
        assert sorted(d.headers["streamer.error.stage"] for d in dead) == ["decode", "decode"]
        # Each transaction ends with a commit marker: the topics' end offsets lie past the
        # last record, which a reader that stopped at the last offset would never reach.
        assert sum(end_offsets(bootstrap_servers, topics.output).values()) > len(events)
        ends = end_offsets(bootstrap_servers, topics.input)
        assert committed_offsets(bootstrap_servers, topics) == ends
        counters = stopped_counters(result.stderr)
        assert counters["verdicts"] == 10_000
        assert counters["dead_letters"] == 2
        assert counters["aborted_transactions"] == 0

    def test_sigterm_mid_stream_then_restart_repeats_nothing(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """A clean stop commits the open transaction; the restart goes on from there."""
        events = produce_synthetic(bootstrap_servers, topics.input, 40_000, seed=13)
        env = scorer_env(
            bootstrap_servers, topics, model_path, STREAMER_BATCH_SIZE="100", **EXACTLY_ONCE
        )
        scorer = start_scorer(env)
        deadline = time.monotonic() + 120
        while not committed_progress(bootstrap_servers, topics):
            assert scorer.poll() is None, scorer.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the scorer made no progress"
            time.sleep(0.2)
        scorer.send_signal(signal.SIGTERM)
        _, stderr = scorer.communicate(timeout=60)
        assert scorer.returncode == 0, stderr[-3000:]
        first_run = sum(verdict_ids(bootstrap_servers, topics.output).values())
        assert 0 < first_run < 40_000, "stop should land mid-stream"

        result = run_scorer(env)
        assert result.returncode == 0, result.stderr[-3000:]
        ids = verdict_ids(bootstrap_servers, topics.output)
        assert set(ids) == {e.record["transaction_id"] for e in events}
        assert max(ids.values()) == 1

    def test_rejected_outputs_abort_and_stop_with_nothing_visible(
        self, bootstrap_servers: str, model_path: Path
    ) -> None:
        """A permanent delivery failure aborts the transaction and stops the scorer (exit 1)."""
        suffix = uuid.uuid4().hex[:12]
        topics = Topics(f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}", f"group-{suffix}")
        admin = AdminClient({"bootstrap.servers": bootstrap_servers})
        futures = admin.create_topics(
            [
                NewTopic(topics.input, 1, 1),
                NewTopic(topics.output, 1, 1),
                # The dead-letter topic refuses every record batch.
                NewTopic(topics.dlq, 1, 1, config={"max.message.bytes": "16"}),
            ]
        )
        for future in futures.values():
            future.result()
        produce_synthetic(bootstrap_servers, topics.input, 300, seed=17)
        produce_raw(bootstrap_servers, topics.input, [(b"card", b"\x00garbage")])
        produce_synthetic(bootstrap_servers, topics.input, 300, seed=18)

        env = scorer_env(bootstrap_servers, topics, model_path, **EXACTLY_ONCE)
        result = run_scorer(env)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "was not delivered" in result.stderr
        assert "the transaction is aborted" in result.stderr
        assert committed_offsets(bootstrap_servers, topics) == {0: -1001}
        assert read_all(bootstrap_servers, topics.output) == []
        assert read_all(bootstrap_servers, topics.dlq) == []

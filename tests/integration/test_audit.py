"""`streamer audit` on a real broker: a scorer's output audits clean; duplicates, orphans and
missing outputs are found; transactions (aborted, open) are read right and never hang the audit."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from streamer.headers import Headers, source_headers
from streamer.serde import encode_transaction
from streamer.settings import Settings
from streamer.synthetic import SyntheticWorld
from streamer.tools.audit import TopicRecord, read_records
from tests.conftest import ROOT, Topics
from tests.integration.support import (
    produce_raw,
    produce_synthetic,
    run_scorer,
    scorer_env,
    streamer_command,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


# -- helpers shared with test_dlq_replay ---------------------------------------------------------


def settings_for(bootstrap: str, topics: Topics) -> Settings:
    return Settings(
        bootstrap_servers=bootstrap,
        input_topic=topics.input,
        output_topic=topics.output,
        dlq_topic=topics.dlq,
        group_id=topics.group,
    )


def streamer(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a `streamer` command line to completion."""
    return subprocess.run(
        streamer_command(*args),
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def audit_json(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    """`streamer audit --json`: exit status and the report."""
    result = streamer(env, "audit", "--json", *args)
    assert result.stdout.strip(), result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["exit_status"] == result.returncode
    return result.returncode, report


def produce_with_headers(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None, Headers]],
    *,
    partition: int | None = None,
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    failures: list[str] = []

    def on_delivery(error: object, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    for key, value, headers in records:
        if partition is None:
            producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
        else:
            producer.produce(
                topic, value, key, partition=partition, headers=headers, on_delivery=on_delivery
            )
    assert producer.flush(30) == 0
    assert not failures, failures


def verdict_like(inputs: list[TopicRecord]) -> list[tuple[bytes | None, bytes | None, Headers]]:
    """Outputs naming `inputs`, shaped like the scorer's (the value is not read by the audit)."""
    return [(r.key, b"verdict", source_headers(r.topic, r.partition, r.offset)) for r in inputs]


def malformed(count_decode: int, count_validate: int) -> list[tuple[bytes | None, bytes | None]]:
    """Records the scorer dead-letters: undecodable bytes, and negative amounts."""
    template = next(iter(SyntheticWorld(77).generate(1))).record
    key = template["card_id"].encode()
    bad: list[tuple[bytes | None, bytes | None]] = [
        (key, b"\x00garbage-%d" % i) for i in range(count_decode)
    ]
    bad += [
        (key, encode_transaction({**template, "transaction_id": f"neg-{i}", "amount": -1.0 - i}))
        for i in range(count_validate)
    ]
    return bad


def expect_clean(report: dict[str, Any], inputs: int, verdicts: int, dead_letters: int) -> None:
    assert (report["inputs"], report["verdicts"], report["dead_letters"]) == (
        inputs,
        verdicts,
        dead_letters,
    )
    assert (report["missing"], report["duplicates"], report["orphans"]) == (0, 0, 0)
    assert sum(p["inputs"] for p in report["partitions"]) == inputs
    assert sum(p["verdicts"] + p["dead_letters"] for p in report["partitions"]) == inputs


# -- tests ---------------------------------------------------------------------------------------


class TestScorerOutput:
    def test_a_scorer_run_audits_clean_and_time_ranges_split_it(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """(a) N events plus malformed ones through the scorer: clean, with the right counts;
        --since/--until pick the events produced after/before a moment."""
        produce_synthetic(bootstrap_servers, topics.input, 600, seed=31)
        produce_raw(bootstrap_servers, topics.input, malformed(2, 1))
        time.sleep(0.05)
        boundary = int(time.time() * 1000)
        time.sleep(0.05)
        produce_synthetic(bootstrap_servers, topics.input, 400, seed=32)
        produce_raw(bootstrap_servers, topics.input, malformed(1, 1))
        env = scorer_env(bootstrap_servers, topics, model_path)
        scored = run_scorer(env)
        assert scored.returncode == 0, scored.stderr[-3000:]

        code, report = audit_json(env, "--expect", "exactly-once")
        assert code == 0
        expect_clean(report, inputs=1_005, verdicts=1_000, dead_letters=5)
        assert report["outside_range"] == 0

        code, after = audit_json(env, "--since", str(boundary))
        assert code == 0
        expect_clean(after, inputs=402, verdicts=400, dead_letters=2)
        assert after["outside_range"] == 603

        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(boundary // 1000))
        iso += f".{boundary % 1000:03d}Z"
        code, before = audit_json(env, "--until", iso)
        assert code == 0
        expect_clean(before, inputs=603, verdicts=600, dead_letters=3)
        assert before["outside_range"] == 402

        text = streamer(env, "audit")
        assert text.returncode == 0, text.stderr[-3000:]
        assert "result: clean" in text.stdout
        assert "1,005" in text.stdout

    def test_duplicates_and_orphans_are_counted(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """(b) A repeated verdict and outputs naming nothing: counted; only exactly-once fails."""
        produce_synthetic(bootstrap_servers, topics.input, 300, seed=33)
        env = scorer_env(bootstrap_servers, topics, model_path)
        assert run_scorer(env).returncode == 0
        settings = settings_for(bootstrap_servers, topics)
        first = read_records(settings, topics.output)[0]
        inputs = read_records(settings, topics.input)
        ends = {p: max(r.offset for r in inputs if r.partition == p) + 1 for p in range(3)}
        produce_with_headers(
            bootstrap_servers,
            topics.output,
            [
                (first.key, first.value, list(first.headers)),  # the same verdict again
                (b"k", b"v", []),  # no source headers
                (b"k", b"v", source_headers("payments", 0, 1)),  # another topic
                (b"k", b"v", source_headers(topics.input, 0, ends[0] + 1_000)),  # past the end
            ],
        )

        code, report = audit_json(env)
        assert code == 0, "at-least-once allows duplicates"
        assert (report["inputs"], report["missing"]) == (300, 0)
        assert (report["duplicates"], report["extra_outputs"], report["verdicts"]) == (1, 1, 301)
        assert report["orphans"] == 3
        assert report["orphan_reasons"] == {
            "no_source_headers": 1,
            "other_topic": 1,
            "no_such_partition": 0,
            "not_a_record": 0,
            "past_input_end": 1,
        }
        source = (int(first.header("streamer.source.partition") or -1),
                  int(first.header("streamer.source.offset") or -1))  # fmt: skip
        assert report["samples"]["duplicates"] == [
            {"partition": source[0], "offset": source[1], "outputs": 2}
        ]
        assert len(report["samples"]["orphans"]) == 3
        assert {o["topic"] for o in report["samples"]["orphans"]} == {topics.output}

        code, strict = audit_json(env, "--expect", "exactly-once")
        assert code == 1
        assert strict["duplicates"] == 1

    def test_an_input_without_output_is_missing(
        self, bootstrap_servers: str, topics: Topics
    ) -> None:
        """(c) Outputs for all inputs but one: that one is missing, named, and the audit fails."""
        produce_synthetic(bootstrap_servers, topics.input, 30, seed=34)
        settings = settings_for(bootstrap_servers, topics)
        inputs = read_records(settings, topics.input)
        skipped = inputs[17]
        produce_with_headers(
            bootstrap_servers, topics.output, verdict_like([r for r in inputs if r is not skipped])
        )
        env = scorer_env(bootstrap_servers, topics, Path("unused"))

        code, report = audit_json(env, "--expect", "at-least-once")
        assert code == 1
        assert (report["inputs"], report["verdicts"], report["missing"]) == (30, 29, 1)
        assert report["samples"]["missing"] == [
            {"partition": skipped.partition, "offset": skipped.offset}
        ]
        text = streamer(env, "audit")
        assert text.returncode == 1
        assert f"{topics.input}[{skipped.partition}]@{skipped.offset}" in text.stdout
        assert "FAILED" in text.stdout


class TestTransactions:
    def test_aborted_outputs_do_not_count_and_markers_do_not_hang(
        self, bootstrap_servers: str, topics: Topics
    ) -> None:
        """(d) Inputs and outputs written in transactions with aborted ones between: the aborted
        records are neither inputs nor outputs, and the audit ends on the markers."""
        settings = settings_for(bootstrap_servers, topics)
        world = SyntheticWorld(35).generate(40)
        events = [(e.record["card_id"].encode(), encode_transaction(e.record)) for e in world]
        with Transactional(bootstrap_servers, f"audit-in-{topics.group}") as feed:
            feed.commit(topics.input, [(k, v, []) for k, v in events[:20]], partition=0)
            feed.abort(topics.input, [(k, v, []) for k, v in events[20:30]], partition=0)
            feed.commit(topics.input, [(k, v, []) for k, v in events[30:]], partition=0)
        inputs = read_records(settings, topics.input)
        assert len(inputs) == 30
        assert inputs[-1].offset > 30, "the aborted records and the markers occupy offsets"

        outputs = verdict_like(inputs)
        with Transactional(bootstrap_servers, f"audit-out-{topics.group}") as scorer:
            scorer.commit(topics.output, outputs[:10], partition=1)
            scorer.abort(topics.output, outputs[10:] + outputs[:10], partition=1)  # would double
            scorer.abort(topics.dlq, outputs[10:15], partition=2)
            scorer.commit(topics.output, outputs[10:], partition=1)

        env = scorer_env(bootstrap_servers, topics, Path("unused"))
        started = time.monotonic()
        code, report = audit_json(env, "--expect", "exactly-once", "--timeout", "20")
        assert time.monotonic() - started < 60
        assert code == 0, report
        expect_clean(report, inputs=30, verdicts=30, dead_letters=0)
        assert report["partitions"][0]["end_offset"] == inputs[-1].offset + 2  # + commit marker

    def test_an_open_transaction_is_waited_for_then_reported(
        self, bootstrap_servers: str, topics: Topics
    ) -> None:
        """A transaction open at the snapshot: the audit waits for it to commit; if it stays
        open past --timeout, the audit fails naming the partition instead of hanging."""
        produce_synthetic(bootstrap_servers, topics.input, 10, seed=36)
        settings = settings_for(bootstrap_servers, topics)
        outputs = verdict_like(read_records(settings, topics.input))
        produce_with_headers(bootstrap_servers, topics.output, outputs[:5], partition=0)
        env = scorer_env(bootstrap_servers, topics, Path("unused"))

        with Transactional(bootstrap_servers, f"audit-open-{topics.group}") as scorer:
            scorer.begin(topics.output, outputs[5:], partition=2)
            stuck = streamer(env, "audit", "--timeout", "2")
            assert stuck.returncode == 1
            assert f"{topics.output}[2]" in stuck.stderr
            assert "transaction is still open" in stuck.stderr

            committer = threading.Timer(3.0, scorer.commit_open)
            committer.start()
            try:
                code, report = audit_json(env, "--timeout", "30")
            finally:
                committer.join()
        assert code == 0, report
        expect_clean(report, inputs=10, verdicts=10, dead_letters=0)


class Transactional:
    """A transactional producer for tests: commit or abort batches written to one partition."""

    def __init__(self, bootstrap: str, transactional_id: str) -> None:
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "transactional.id": transactional_id}
        )

    def __enter__(self) -> Transactional:
        self._producer.init_transactions(60)
        return self

    def __exit__(self, *_: object) -> None:
        self._producer.flush(30)

    def begin(
        self, topic: str, records: list[tuple[bytes | None, bytes | None, Headers]], partition: int
    ) -> None:
        """Open a transaction and write `records`, flushed to the broker (so they take offsets)."""
        self._producer.begin_transaction()
        for key, value, headers in records:
            self._producer.produce(topic, value, key, partition=partition, headers=headers)
        assert self._producer.flush(30) == 0

    def commit_open(self) -> None:
        self._producer.commit_transaction(30)

    def commit(
        self, topic: str, records: list[tuple[bytes | None, bytes | None, Headers]], partition: int
    ) -> None:
        self.begin(topic, records, partition)
        self.commit_open()

    def abort(
        self, topic: str, records: list[tuple[bytes | None, bytes | None, Headers]], partition: int
    ) -> None:
        self.begin(topic, records, partition)
        self._producer.abort_transaction(30)

"""Card history on a real broker: the changelog topic, restore after a restart, training parity."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.cimpl import NewTopic

from streamer.features import build_features
from streamer.headers import CHANGELOG_POSITION
from streamer.kafka.admin import ensure_topics
from streamer.kafka.changelog import (
    Restorer,
    ensure_changelog,
    positioned,
    value_position,
)
from streamer.kafka.clients import OutputProducer
from streamer.model.scorer import Scorer
from streamer.serde import decode_verdict
from streamer.settings import Settings
from streamer.state.card import (
    CARD_HISTORY_CODEC,
    HISTORY_FEATURES,
    CardHistory,
    history_features,
)
from streamer.state.store import KeyedStore
from streamer.synthetic import LabelledTransaction, SyntheticWorld
from streamer.tools.produce import publish
from tests.conftest import Topics
from tests.integration.support import read_all, run_scorer, scorer_env, streamer_command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODES = ("at-least-once", "exactly-once")


def changelog_of(topics: Topics) -> str:
    return f"{topics.group}-card-state-changelog"


def publish_events(bootstrap: str, topic: str, events: list[LabelledTransaction]) -> None:
    report = publish(OutputProducer({"bootstrap.servers": bootstrap}), topic, events)
    assert report.acknowledged == len(events), report


def scores_by_id(bootstrap: str, topic: str) -> dict[str, list[float]]:
    """Every verdict's score, by transaction id (duplicates kept)."""
    found: dict[str, list[float]] = defaultdict(list)
    for record in read_all(bootstrap, topic):
        verdict = decode_verdict(record.value or b"")
        found[verdict["transaction_id"]].append(verdict["score"])
    return dict(found)


def reference_scores(bootstrap: str, topics: Topics, model_path: Path) -> dict[str, list[float]]:
    """An uninterrupted scorer over the whole input topic, with a fresh group (fresh state)."""
    suffix = uuid.uuid4().hex[:8]
    reference = dataclasses.replace(
        topics, output=f"reference-{suffix}", group=f"reference-{suffix}"
    )
    ensure_topics({"bootstrap.servers": bootstrap}, [reference.output], partitions=3)
    result = run_scorer(scorer_env(bootstrap, reference, model_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return scores_by_id(bootstrap, reference.output)


def log_lines(stderr: str, event: str) -> list[dict[str, object]]:
    lines = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            parsed = json.loads(line)
            if parsed.get("event") == event:
                lines.append(parsed)
    return lines


class TestChangelogTopic:
    def test_topics_create_makes_a_compacted_changelog_like_the_input(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """`streamer topics create` adds the group's changelog: input's partitions, compacted."""
        group = f"streamer-{uuid.uuid4().hex[:8]}"
        env = scorer_env(bootstrap_servers, dataclasses.replace(topics, group=group), model_path)
        result = subprocess.run(
            streamer_command("topics", "create", "--partitions", "5"),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        changelog = f"{group}-card-state-changelog"
        assert f"{changelog}: created" in result.stdout
        admin = AdminClient({"bootstrap.servers": bootstrap_servers})
        metadata = admin.list_topics(changelog, timeout=30).topics[changelog]
        assert len(metadata.partitions) == 3, "partitioned like the existing input topic"
        resource = ConfigResource(ConfigResource.Type.TOPIC, changelog)
        config = admin.describe_configs([resource])[resource].result(timeout=30)
        assert config["cleanup.policy"].value == "compact"

    def test_a_changelog_unlike_the_input_is_refused(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """A changelog whose partitions do not match the input's stops the scorer at start."""
        admin = AdminClient({"bootstrap.servers": bootstrap_servers})
        futures = admin.create_topics([NewTopic(changelog_of(topics), 2, 1)])
        for future in futures.values():
            future.result(timeout=30)
        result = run_scorer(scorer_env(bootstrap_servers, topics, model_path), until_idle=1)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "has 2 partitions but input topic" in result.stderr
        assert read_all(bootstrap_servers, topics.output) == []


class TestRestore:
    @pytest.mark.parametrize("mode", MODES)
    def test_a_restarted_scorer_scores_as_one_that_never_stopped(
        self, bootstrap_servers: str, topics: Topics, model_path: Path, mode: str
    ) -> None:
        """Stop, restart from the changelog, go on: every score equals an uninterrupted run's."""
        events = list(SyntheticWorld(23, n_cards=300).generate(6_000))
        env = scorer_env(bootstrap_servers, topics, model_path, STREAMER_PROCESSING_GUARANTEE=mode)
        publish_events(bootstrap_servers, topics.input, events[:3_000])
        first = run_scorer(env)
        assert first.returncode == 0, first.stderr[-3000:]
        changelog = read_all(bootstrap_servers, changelog_of(topics))
        assert changelog, "the first scorer wrote its state to the changelog"
        values = [r.value for r in changelog if r.value is not None]
        assert values
        assert all(value_position(value)[0] is not None for value in values)

        publish_events(bootstrap_servers, topics.input, events[3_000:])
        second = run_scorer(env)
        assert second.returncode == 0, second.stderr[-3000:]
        restored = log_lines(second.stderr, "state restored")
        assert restored, "the second scorer restored state before scoring"
        assert int(str(restored[-1]["keys"])) > 250

        scores = scores_by_id(bootstrap_servers, topics.output)
        reference = reference_scores(bootstrap_servers, topics, model_path)
        assert set(scores) == {e.record["transaction_id"] for e in events}
        assert all(len(found) == 1 for found in scores.values())
        differing = [tid for tid, found in scores.items() if found != reference[tid]]
        assert differing == [], f"{len(differing)} scores differ from the uninterrupted run"


def _history(event_time: int, amount: float, merchant: str, country: str) -> CardHistory:
    """A card's history after one transaction."""
    histories: dict[str, CardHistory] = {}
    out = np.empty((1, len(HISTORY_FEATURES)))
    history_features(histories, ["c"], [event_time], [amount], [merchant], [country], out)
    return histories["c"]


def _restore_to_end(restorer: Restorer, seconds: float = 60) -> None:
    """Step `restorer` until no partition is left to restore; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while restorer.restoring:
        assert time.monotonic() < deadline, restorer.restoring
        restorer.step(0.1)


class TestRestoreLeavesOutUncommittedState:
    def test_positions_in_values_and_in_headers(
        self, bootstrap_servers: str, topics: Topics
    ) -> None:
        """A restore applies each record whose position the input's committed offset covers, and
        leaves out the rest, whether the position begins the value (as checkpoints write values),
        is a tombstone's header, or is the header of a value written before positions moved into
        values."""
        settings = Settings(bootstrap_servers=bootstrap_servers, group_id=topics.group)
        topic = changelog_of(topics)
        ensure_changelog(settings.admin_config(), topic, topics.input)
        old, new = _history(1_000, 5.0, "m", "DE"), _history(2_000, 9.0, "n", "FR")
        old_bytes, new_bytes = CARD_HISTORY_CODEC.encode(old), CARD_HISTORY_CODEC.encode(new)

        def header(position: int) -> list[tuple[str, str | bytes | None]]:
            return [(CHANGELOG_POSITION, str(position).encode())]

        records: list[tuple[str, bytes | None, list[tuple[str, str | bytes | None]]]] = [
            ("kept", positioned(4) + old_bytes, []),
            ("kept", positioned(11) + new_bytes, []),  # past the committed offset 10
            ("replaced", positioned(3) + old_bytes, []),
            ("replaced", positioned(10) + new_bytes, []),
            ("deleted", positioned(2) + old_bytes, []),
            ("deleted", None, header(9)),
            ("undeleted", positioned(2) + old_bytes, []),
            ("undeleted", None, header(12)),  # an uncommitted tombstone
            ("older", old_bytes, header(8)),
            ("older-uncommitted", new_bytes, header(30)),
        ]
        producer = OutputProducer({"bootstrap.servers": bootstrap_servers})
        for key, value, headers in records:
            producer.produce(topic, key.encode(), value, headers, None, 0)
        assert producer.flush(30) == 0

        store = KeyedStore("card-state", CARD_HISTORY_CODEC, keep_undo=False)
        restorer = Restorer(settings.changelog_reader_config(), store, topic)
        try:
            restorer.start({0: 10})
            _restore_to_end(restorer)
        finally:
            restorer.close()
        assert store.position(0) == 10
        assert store.values(0) == {"kept": old, "replaced": new, "undeleted": old, "older": old}
        assert restorer.records == 7  # the records whose positions are covered


class TestRestoreWaitsForTransactions:
    def test_read_committed_restore_ends_only_once_no_transaction_is_pending(
        self, bootstrap_servers: str, topics: Topics
    ) -> None:
        """Exactly-once: a changelog transaction still completing when the restore reaches the
        last stable offset is waited for, and its records are applied once committed (its
        commit can be decided, and the offsets it carries committed, before its records are
        readable)."""
        settings = Settings(
            bootstrap_servers=bootstrap_servers,
            group_id=topics.group,
            processing_guarantee="exactly-once",
        )
        topic = changelog_of(topics)
        ensure_changelog(settings.admin_config(), topic, topics.input)
        first, second = _history(1_000, 5.0, "m", "DE"), _history(2_000, 9.0, "n", "FR")
        producer = Producer(
            {
                "bootstrap.servers": bootstrap_servers,
                "transactional.id": f"{topics.group}-writer",
            }
        )
        producer.init_transactions(30)
        producer.begin_transaction()
        producer.produce(
            topic, positioned(1) + CARD_HISTORY_CODEC.encode(first), b"first", partition=0
        )
        producer.commit_transaction(30)
        producer.begin_transaction()
        producer.produce(
            topic, positioned(2) + CARD_HISTORY_CODEC.encode(second), b"second", partition=0
        )
        assert producer.flush(30) == 0  # on the broker, the transaction still open

        store = KeyedStore("card-state", CARD_HISTORY_CODEC, keep_undo=True)
        config = settings.changelog_reader_config()
        assert config["isolation.level"] == "read_committed"
        restorer = Restorer(config, store, topic)
        try:
            restorer.start({0: 10})
            waited_until = time.monotonic() + 3
            while time.monotonic() < waited_until:
                restorer.step(0.1)
            assert restorer.restoring == [0], "the restore ended before the open transaction"
            producer.commit_transaction(30)
            _restore_to_end(restorer)
        finally:
            restorer.close()
        assert store.values(0) == {"first": first, "second": second}


class TestTrainingParity:
    def test_the_stream_scores_what_the_training_path_scores(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """Every verdict's score equals the training path's (`build_features`, time order)."""
        events = list(SyntheticWorld(31, n_cards=400).generate(5_000))
        publish_events(bootstrap_servers, topics.input, events)
        result = run_scorer(scorer_env(bootstrap_servers, topics, model_path))
        assert result.returncode == 0, result.stderr[-3000:]

        features = build_features([event.record for event in events])
        expected = Scorer.from_path(model_path).score(features)
        scores = scores_by_id(bootstrap_servers, topics.output)
        differing = [
            event.record["transaction_id"]
            for event, score in zip(events, expected.tolist(), strict=True)
            if scores[event.record["transaction_id"]] != [score]
        ]
        assert differing == [], f"{len(differing)} of {len(events)} scores differ"
        assert np.isfinite(expected).all()

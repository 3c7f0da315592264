"""`streamer dlq replay` on a real broker: filtered dead letters go back to the input topic
unchanged, marked as replays; a fixed scorer then scores them and the audit stays clean."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

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
    source_headers,
)
from streamer.serde import decode_verdict, encode_transaction
from streamer.synthetic import SyntheticWorld
from streamer.tools.audit import TopicRecord, read_records
from tests.conftest import Topics
from tests.integration.support import produce_raw, produce_synthetic, run_scorer, scorer_env
from tests.integration.test_audit import (
    audit_json,
    expect_clean,
    malformed,
    produce_with_headers,
    settings_for,
    streamer,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SMALL_LIMIT = "250"
"""STREAMER_MAX_EVENT_BYTES of the first scorer run: the oversized events below are dead-lettered
(stage decode) by it, and scored by a scorer with the default limit."""


def oversized(count: int) -> list[tuple[bytes | None, bytes | None]]:
    """Valid transactions of about 300 bytes (long ids), each with its own transaction id."""
    events = SyntheticWorld(51).generate(count)
    return [
        (
            e.record["card_id"].encode(),
            encode_transaction(
                {**e.record, "merchant_id": "m" * 120, "transaction_id": f"big-{i}-" + "t" * 90}
            ),
        )
        for i, e in enumerate(events)
    ]


def replays(records: list[TopicRecord]) -> list[TopicRecord]:
    return [r for r in records if r.header(REPLAY_OF) is not None]


class TestReplay:
    def test_replayed_dead_letters_are_scored_by_a_fixed_scorer(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """(e) Replay the decode-stage dead letters: same key and value on the input topic, with
        the replay headers; a scorer with a larger size limit scores the oversized ones, the
        garbage is dead-lettered again, and the audit is clean."""
        produce_synthetic(bootstrap_servers, topics.input, 300, seed=52)
        big = oversized(3)
        produce_raw(bootstrap_servers, topics.input, big + malformed(1, 2))
        # Good events last, so that every partition ends with verdicts: this test is about
        # replays, not about how a restarted scorer treats a batch that ended in dead letters.
        produce_synthetic(bootstrap_servers, topics.input, 60, seed=53)
        env = scorer_env(bootstrap_servers, topics, model_path)
        first = run_scorer({**env, "STREAMER_MAX_EVENT_BYTES": SMALL_LIMIT})
        assert first.returncode == 0, first.stderr[-3000:]
        settings = settings_for(bootstrap_servers, topics)
        dead = read_records(settings, topics.dlq)
        stages = sorted(d.header(ERROR_STAGE) or "" for d in dead)
        assert stages == ["decode"] * 4 + ["validate"] * 2
        inputs_before = read_records(settings, topics.input)

        dry = streamer(env, "dlq", "replay", "--stage", "decode", "--dry-run")
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert "would replay 4 of 6 dead letters" in dry.stdout
        assert dry.stdout.count(f"-> {topics.input}") == 4
        assert len(read_records(settings, topics.input)) == len(inputs_before), "dry run sent"

        done = streamer(env, "dlq", "replay", "--stage", "decode")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "replayed 4 of 6 dead letters" in done.stdout
        assert "by stage: decode 4" in done.stdout

        replayed = replays(read_records(settings, topics.input))
        assert len(replayed) == 4
        letters = {f"{topics.dlq}/{d.partition}/{d.offset}": d for d in dead}
        for record in replayed:
            letter = letters[record.header(REPLAY_OF) or ""]
            assert (record.key, record.value) == (letter.key, letter.value)
            assert record.header(REPLAY_SOURCE) == "/".join(
                letter.header(name) or ""
                for name in (SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET)
            )
            assert record.header(REPLAY_STAGE) == "decode"
            assert record.header(REPLAY_REASON) == letter.header(ERROR_REASON)
        assert {r.value for r in replayed} == {v for _, v in big} | {malformed(1, 0)[0][1]}

        between = int(time.time() * 1000)
        second = run_scorer(env)
        assert second.returncode == 0, second.stderr[-3000:]
        verdict_ids = {
            decode_verdict(v.value or b"")["transaction_id"]
            for v in read_records(settings, topics.output)
        }
        assert {tid for tid in verdict_ids if tid.startswith("big-")} == {
            f"big-{i}-" + "t" * 90 for i in range(3)
        }
        code, report = audit_json(env, "--expect", "exactly-once")
        assert code == 0, report
        expect_clean(report, inputs=370, verdicts=363, dead_letters=7)

        again = streamer(env, "dlq", "replay", "--since", str(between), "--dry-run")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "would replay 1 of 1 dead letters" in again.stdout, "only the new dead letter"

    def test_partition_offsets_and_limit_pick_the_dead_letters(
        self, bootstrap_servers: str, topics: Topics, model_path: Path
    ) -> None:
        """--partition with --from-offset/--to-offset picks exactly those; --limit stops early,
        taking the first matches partition by partition, oldest first."""
        produce_raw(bootstrap_servers, topics.input, malformed(4, 4))
        env = scorer_env(bootstrap_servers, topics, model_path)
        assert run_scorer(env).returncode == 0
        settings = settings_for(bootstrap_servers, topics)
        dead = read_records(settings, topics.dlq)
        assert len(dead) == 8
        chosen = dead[len(dead) // 2]

        picked = streamer(
            env, "dlq", "replay", "--partition", str(chosen.partition),
            "--from-offset", str(chosen.offset), "--to-offset", str(chosen.offset),
        )  # fmt: skip
        assert picked.returncode == 0, picked.stderr[-3000:]
        assert "replayed 1 of 1 dead letters" in picked.stdout
        (one,) = replays(read_records(settings, topics.input))
        assert one.header(REPLAY_OF) == f"{topics.dlq}/{chosen.partition}/{chosen.offset}"

        validate = [d for d in dead if d.header(ERROR_STAGE) == "validate"]
        limited = streamer(env, "dlq", "replay", "--stage", "validate", "--limit", "2")
        assert limited.returncode == 0, limited.stderr[-3000:]
        assert "replayed 2 of" in limited.stdout
        assert "by stage: validate 2" in limited.stdout
        of = Counter(r.header(REPLAY_OF) for r in replays(read_records(settings, topics.input)))
        of[one.header(REPLAY_OF)] -= 1
        assert +of == Counter(f"{topics.dlq}/{d.partition}/{d.offset}" for d in validate[:2])

    def test_an_unacknowledged_replay_exits_1_naming_it(self, bootstrap_servers: str) -> None:
        """An input topic that refuses the records: exit 1, each failed replay named."""
        suffix = uuid.uuid4().hex[:12]
        topics = Topics(f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}", f"group-{suffix}")
        admin = AdminClient({"bootstrap.servers": bootstrap_servers})
        futures = admin.create_topics(
            [
                # Smaller than any record batch: every replay is rejected by the broker.
                NewTopic(topics.input, 1, 1, config={"max.message.bytes": "16"}),
                NewTopic(topics.output, 1, 1),
                NewTopic(topics.dlq, 1, 1),
            ]
        )
        for future in futures.values():
            future.result()
        letters = [
            (b"card", b"garbage", [(ERROR_STAGE, b"decode"), *source_headers(topics.input, 0, i)])
            for i in range(2)
        ]
        produce_with_headers(bootstrap_servers, topics.dlq, letters)
        env = scorer_env(bootstrap_servers, topics, Path("unused"))

        result = streamer(env, "dlq", "replay")
        assert result.returncode == 1
        assert "NOT acknowledged: 2" in result.stdout
        assert f"{topics.dlq}/0/0" in result.stderr
        assert f"{topics.dlq}/0/1" in result.stderr

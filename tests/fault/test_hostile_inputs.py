"""Hostile input and a hostile environment: malformed and fuzzed records, an output topic that
refuses every write, a tampered model artefact, and a canary password under `debug=all`.

Each case runs the real scorer process against the session's broker and reconciles with
`streamer audit`. What must hold: the scorer never crashes on a record; it stops (rather than
drops or skips) when it cannot write an output; it never loads a model it cannot vouch for; and
a secret in its Kafka configuration appears in no log line, header or output.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import re
import secrets
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

# Imported from where they are defined: confluent_kafka.admin does not re-export them for mypy.
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from streamer.errors import RecordError
from streamer.events import validate_transaction
from streamer.model.artifact import card_path_for
from streamer.serde import decode_transaction, decode_verdict, encode_transaction
from streamer.settings import Settings
from streamer.synthetic import SyntheticWorld
from tests.conftest import Topics
from tests.fault.support import MODES, audit, fault_env, record, scaled
from tests.integration.support import (
    Record,
    committed_offsets,
    end_offsets,
    read_all,
    run_scorer,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(600)]

MAX_EVENT_BYTES: Final = Settings.model_fields["max_event_bytes"].default
STAGE_CLASSES: Final = {
    "decode": "streamer.errors.DecodeError",
    "validate": "streamer.errors.ValidationError",
    "score": "streamer.errors.ScoreError",
}
VERDICT: Final = "verdict"
"""The expected outcome of a record that decodes and validates."""


@dataclass(frozen=True)
class Input:
    """One record for the input topic and what should become of it."""

    kind: str
    key: bytes | None
    value: bytes | None
    outcome: str
    """VERDICT, or the dead-letter stage; "dead letter" when any stage will do."""
    reason: str = ""
    """Text the dead letter's reason must contain (known malformed kinds only)."""


@dataclass(frozen=True)
class Placed:
    """Where the broker put a produced record."""

    partition: int
    offset: int
    timestamp: int


def produce_tracked(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> list[Placed]:
    """Produce `records` in order; where each landed (partition, offset, timestamp)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    placed: dict[int, Placed] = {}
    failures: list[str] = []

    def on_delivery(index: int) -> Callable[[KafkaError | None, Message], None]:
        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                failures.append(error.str())
                return
            partition, offset = message.partition(), message.offset()
            assert partition is not None
            assert offset is not None
            placed[index] = Placed(partition, offset, message.timestamp()[1])

        return report

    for index, (key, value) in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=on_delivery(index))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0, "records left unacknowledged"
    assert not failures, failures[:5]
    return [placed[index] for index in range(len(records))]


def expected_outcome(key: bytes | None, value: bytes | None) -> str:
    """What the per-record reference path (decode, then validate) makes of a record."""
    if value is None or len(value) > MAX_EVENT_BYTES:
        return "decode"
    try:
        validate_transaction(decode_transaction(value), key)
    except RecordError as exc:
        return exc.stage
    return VERDICT


def outputs_by_source(
    records: list[Record], input_topic: str
) -> dict[tuple[int, int], list[Record]]:
    """Outputs grouped by the input record their headers name, (partition, offset)."""
    found: dict[tuple[int, int], list[Record]] = defaultdict(list)
    for output in records:
        assert output.headers["streamer.source.topic"] == input_topic, output.headers
        source = (
            int(output.headers["streamer.source.partition"]),
            int(output.headers["streamer.source.offset"]),
        )
        found[source].append(output)
    return found


# -- a flood of malformed and fuzzed records ------------------------------------------------------


def known_malformed(template: dict[str, Any]) -> list[Input]:
    """Every kind of bad input the core scorer dead-letters, with its stage and reason."""

    def variant(**changes: object) -> bytes:
        return encode_transaction({**template, "transaction_id": str(uuid.uuid4()), **changes})

    key = template["card_id"].encode()
    valid = encode_transaction(template)
    return [
        Input("garbage", key, b"\x00\x01garbage\xff", "decode", "not an Avro Transaction"),
        Input("truncated", key, valid[:7], "decode", "not an Avro Transaction"),
        Input("trailing bytes", key, valid + b"\x00\x00", "decode", "trailing bytes"),
        Input("tombstone", key, None, "decode", "tombstone"),
        Input("oversized", key, b"\x02" * 100_000, "decode", "exceeds the limit"),
        Input("empty", key, b"", "decode", "not an Avro Transaction"),
        Input("negative amount", key, variant(amount=-3.0), "validate", "greater than"),
        Input("nan amount", key, variant(amount=math.nan), "validate", "finite number"),
        Input("unknown currency", key, variant(currency="ABC"), "validate", "ISO 4217"),
        Input("unknown country", key, variant(country="QQ"), "validate", "ISO 3166-1"),
        Input("unknown channel", key, variant(channel="carrier-pigeon"), "validate", "channel"),
        Input("missing key", None, variant(), "validate", "missing key"),
        Input("wrong key", b"someone-else", variant(), "validate", "does not match card_id"),
    ]


def fuzzed(rng: random.Random, valid: list[tuple[bytes, bytes]], count: int) -> list[Input]:
    """Random bytes, truncated records and records with one flipped bit, in equal parts.

    Random bytes and truncations can never be a Transaction (a truncated record runs out of
    bytes where the full one ended); a flipped bit may still decode and validate, so its outcome
    is whatever the reference path makes of it.
    """
    inputs: list[Input] = []
    for index in range(count):
        key, value = valid[rng.randrange(len(valid))]
        match index % 3:
            case 0:
                noise = rng.randbytes(rng.randrange(0, 300))
                noise_key = key if rng.random() < 0.5 else rng.randbytes(rng.randrange(1, 40))
                inputs.append(Input("random bytes", noise_key, noise, "dead letter"))
            case 1:
                cut = value[: rng.randrange(len(value))]
                inputs.append(Input("truncated at random", key, cut, "decode"))
            case _:
                flipped = bytearray(value)
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
                outcome = expected_outcome(key, bytes(flipped))
                inputs.append(Input("bit flipped", key, bytes(flipped), outcome))
    return inputs


def check_dead_letter(letter: Record, sent: Input, placed: Placed, topics: Topics) -> None:
    headers = letter.headers
    assert (letter.key, letter.value) == (sent.key, sent.value), "bytes must be unchanged"
    stage = headers["streamer.error.stage"]
    if sent.outcome == "dead letter":
        assert stage in ("decode", "validate"), (sent.kind, headers)
    else:
        assert stage == sent.outcome, (sent.kind, headers)
    assert sent.reason in headers["streamer.error.reason"], (sent.kind, headers)
    assert headers["streamer.error.class"] == STAGE_CLASSES[stage], headers
    assert headers["streamer.source.timestamp"] == str(placed.timestamp), headers
    assert headers["streamer.consumer.group"] == topics.group, headers


@pytest.mark.parametrize("mode", MODES)
def test_flood_of_malformed_records(
    bootstrap_servers: str, topics: Topics, model_path: Path, mode: str
) -> None:
    """Malformed and fuzzed records among good ones: each gets exactly one verdict or dead letter.

    The scorer finishes (exit 0); every known malformed kind is dead-lettered with its stage and
    reason, every fuzzed record goes where the reference decode-and-validate path sends it, and
    every good record gets its verdict.
    """
    rng = random.Random(31)
    events = list(SyntheticWorld(3101).generate(scaled(2_000, 50_000)))
    good = [(e.record["card_id"].encode(), encode_transaction(e.record)) for e in events]
    inputs = [Input("good", key, value, VERDICT) for key, value in good]
    for _ in range(scaled(2, 20)):
        inputs += known_malformed(dict(events[rng.randrange(len(events))].record))
    fuzz = fuzzed(rng, good, scaled(600, 15_000))
    inputs += fuzz
    rng.shuffle(inputs)
    placed = produce_tracked(
        bootstrap_servers, topics.input, [(sent.key, sent.value) for sent in inputs]
    )

    env = fault_env(bootstrap_servers, topics, model_path, mode)
    result = run_scorer(env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]

    verdicts = outputs_by_source(read_all(bootstrap_servers, topics.output), topics.input)
    letters = outputs_by_source(read_all(bootstrap_servers, topics.dlq), topics.input)
    wrong: list[str] = []
    for sent, where in zip(inputs, placed, strict=True):
        source = (where.partition, where.offset)
        made = verdicts.get(source, []) + letters.get(source, [])
        if len(made) != 1:
            wrong.append(f"{sent.kind} at {source}: {len(made)} outputs")
        elif sent.outcome == VERDICT:
            if source not in verdicts:
                wrong.append(f"{sent.kind} at {source}: dead-lettered, expected a verdict")
                continue
            assert sent.value is not None
            verdict = decode_verdict(verdicts[source][0].value or b"")
            assert verdict["transaction_id"] == decode_transaction(sent.value)["transaction_id"]
            assert verdicts[source][0].key == sent.key
        elif source not in letters:
            wrong.append(f"{sent.kind} at {source}: a verdict, expected a dead letter")
        else:
            check_dead_letter(letters[source][0], sent, where, topics)
    assert not wrong, f"{len(wrong)} records went wrong, e.g. {wrong[:10]}"

    report = audit(env, mode)
    expected_verdicts = sum(sent.outcome == VERDICT for sent in inputs)
    record(
        "malformed flood",
        mode,
        inputs=report["inputs"],
        missing=report["missing"],
        duplicates=report["duplicates"],
        verdicts=report["verdicts"],
        dead_letters=report["dead_letters"],
        fuzzed=len(fuzz),
        flips_still_valid=sum(sent.outcome == VERDICT for sent in fuzz),
    )
    assert report["inputs"] == len(inputs)
    assert report["verdicts"] == expected_verdicts
    assert report["dead_letters"] == len(inputs) - expected_verdicts
    assert (report["missing"], report["duplicates"], report["orphans"]) == (0, 0, 0), report
    assert report["returncode"] == 0, report


# -- an output topic the broker refuses to write --------------------------------------------------

REFUSING_LIMIT: Final = "100"
"""`max.message.bytes` that makes the broker refuse every batch of dead letters or verdicts.

Any of our batches is larger: a record batch header takes 61 bytes and the headers we add take
more than 39 after compression. A transaction marker (a 78-byte control batch) still fits, and
must: below that (16, say) the broker's transaction coordinator cannot write the abort marker,
fails it with RecordTooLargeException ("Received fatal error ... while sending txn marker") and
leaves the transactional id stuck in PrepareAbort, a broker-side wedge no scorer could clear.
"""
NOT_DELIVERED: Final = re.compile(r"output for (\S+)\[(\d+)\]@(\d+) was not delivered")

UNWRITABLE_CASES: Final = [
    pytest.param("at-least-once", "dead letters"),
    pytest.param("exactly-once", "dead letters"),
    pytest.param("at-least-once", "verdicts"),
    pytest.param("exactly-once", "verdicts"),
]


def create_topics(bootstrap: str, topics: list[NewTopic]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics(topics).values():
        future.result(timeout=30)


def topic_config(bootstrap: str, topic: str, name: str) -> str | None:
    resource = ConfigResource(ResourceType.TOPIC, topic)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    configs = admin.describe_configs([resource])[resource].result(timeout=30)
    entry = configs.get(name)
    return None if entry is None else entry.value


def reset_topic_config(bootstrap: str, topic: str, name: str) -> None:
    """Delete the topic's override of `name` (back to the broker default) and wait for it."""
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(name, None, incremental_operation=AlterConfigOpType.DELETE)
        ],
    )
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.incremental_alter_configs([resource])[resource].result(timeout=30)
    deadline = time.monotonic() + 30
    while topic_config(bootstrap, topic, name) == REFUSING_LIMIT:
        assert time.monotonic() < deadline, f"{topic}: {name} is still {REFUSING_LIMIT}"
        time.sleep(0.2)


@pytest.mark.parametrize(("mode", "refused"), UNWRITABLE_CASES)
def test_unwritable_output_topic_stops_the_scorer(
    bootstrap_servers: str, model_path: Path, mode: str, refused: str
) -> None:
    """The broker refuses every dead letter (or every verdict) of a batch holding both kinds.

    The scorer exits 1 naming a refused record and commits nothing past the first refused one;
    exactly-once shows nothing of the failed transaction. `streamer audit` reports the records
    missing; once the topic is fixed, a second run completes them: nothing missing (exactly-once:
    nothing repeated).
    """
    suffix = uuid.uuid4().hex[:12]
    topics = Topics(f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}", f"group-{suffix}")
    refusing = {"max.message.bytes": REFUSING_LIMIT}
    create_topics(
        bootstrap_servers,
        [
            NewTopic(topics.input, 1, 1),
            NewTopic(topics.output, 1, 1, config=refusing if refused == "verdicts" else {}),
            NewTopic(topics.dlq, 1, 1, config=refusing if refused == "dead letters" else {}),
        ],
    )
    refusing_topic = topics.output if refused == "verdicts" else topics.dlq
    events = list(SyntheticWorld(3201).generate(scaled(600, 20_000)))
    good = [(e.record["card_id"].encode(), encode_transaction(e.record)) for e in events]
    # The malformed record sits inside the first poll batch (up to 500 records), after some good
    # ones: that batch holds verdicts of earlier records and the dead letter of a later one.
    good_first = 100
    placed = produce_tracked(
        bootstrap_servers,
        topics.input,
        [*good[:good_first], (good[0][0], b"\x00\x01not avro\xff"), *good[good_first:]],
    )
    bad = placed[good_first].offset
    refused_offsets = (
        [bad] if refused == "dead letters" else [p.offset for p in placed if p.offset != bad]
    )
    first_refused = min(refused_offsets)
    env = fault_env(bootstrap_servers, topics, model_path, mode, STREAMER_INSTANCE_ID="refused")
    measured: dict[str, Any] = {"refused": refused, "first_refused_offset": first_refused}
    try:
        result = run_scorer(env)
        assert result.returncode == 1, result.stderr[-3000:]
        named = NOT_DELIVERED.search(result.stderr)
        assert named is not None, result.stderr[-3000:]
        assert (named[1], int(named[2])) == (topics.input, 0)
        assert int(named[3]) in refused_offsets, named[0]
        committed = committed_offsets(bootstrap_servers, topics)[0]
        measured["committed_at_stop"] = committed
        assert committed <= first_refused, f"committed {committed} past refused {first_refused}"

        visible = sorted(
            int(output.headers["streamer.source.offset"])
            for output in read_all(bootstrap_servers, topics.output)
            + read_all(bootstrap_servers, topics.dlq)
        )
        measured["outputs_past_commit_visible"] = sum(o >= committed for o in visible)
        if mode == "exactly-once":
            # Only committed transactions are visible, and they end where the offsets do.
            assert visible == list(range(max(committed, 0))), (committed, visible[-5:])
        before = audit(env, mode)
        measured["missing_before_fix"] = before["missing"]
        assert before["returncode"] == 1, before
        expected_first = first_refused if mode == "at-least-once" else max(committed, 0)
        assert before["samples"]["missing"][0] == {"partition": 0, "offset": expected_first}

        reset_topic_config(bootstrap_servers, refusing_topic, "max.message.bytes")
        rerun = run_scorer(env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        after = audit(env, mode)
        measured.update(
            inputs=after["inputs"], missing=after["missing"], duplicates=after["duplicates"]
        )
        assert after["inputs"] == len(placed)
        # At-least-once may repeat the outputs that were delivered before the stop (the dead
        # letter past the refused verdicts, say); exactly-once never shows them twice.
        if mode == "exactly-once":
            assert after["dead_letters"] == 1
        else:
            assert 1 <= after["dead_letters"] <= 2
        assert after["missing"] == 0, after
        if mode == "exactly-once":
            assert after["duplicates"] == 0, after
        assert after["returncode"] == 0, after
    finally:
        record(f"{refused} refused, then fixed", mode, **measured)


# -- a tampered model artefact ------------------------------------------------------------------


class TouchOnUnpickle:
    """A pickle payload: unpickling it opens (so creates) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def tampered_copy(model_path: Path, folder: Path, how: str, marker: Path) -> Path:
    """A copy of the artefact and its card, changed as `how` says."""
    folder.mkdir()
    copy = folder / model_path.name
    shutil.copy(model_path, copy)
    shutil.copy(card_path_for(model_path), card_path_for(copy))
    if how == "flipped byte":
        data = bytearray(copy.read_bytes())
        data[len(data) // 2] ^= 0x01
        copy.write_bytes(bytes(data))
    else:
        # A pickle in the artefact's place with a card that vouches for it: only the format
        # check stands between the payload and the process.
        copy.write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
        card_path = card_path_for(copy)
        card = json.loads(card_path.read_text())
        card["sha256"] = hashlib.sha256(copy.read_bytes()).hexdigest()
        card_path.write_text(json.dumps(card))
    return copy


def group_exists(bootstrap: str, group: str) -> bool:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    listing = admin.list_consumer_groups(request_timeout=30).result(timeout=30)
    return any(found.group_id == group for found in listing.valid)


@pytest.mark.parametrize("how", ["flipped byte", "pickle payload"])
def test_tampered_model_is_refused(
    bootstrap_servers: str, topics: Topics, model_path: Path, how: str, tmp_path: Path
) -> None:
    """`streamer run` refuses the model (exit 3): nothing consumed or committed, no code run.

    One mode: the model is verified before any Kafka client exists, whichever the guarantee.
    """
    mode = "exactly-once"
    marker = tmp_path / "payload-ran"
    tampered = tampered_copy(model_path, tmp_path / "model", how, marker)
    events = list(SyntheticWorld(3301).generate(100))
    produce_tracked(
        bootstrap_servers,
        topics.input,
        [(e.record["card_id"].encode(), encode_transaction(e.record)) for e in events],
    )
    env = fault_env(bootstrap_servers, topics, tampered, mode)

    result = run_scorer(env)

    committed = committed_offsets(bootstrap_servers, topics)
    joined = group_exists(bootstrap_servers, topics.group)
    written = sum(end_offsets(bootstrap_servers, topics.output).values()) + sum(
        end_offsets(bootstrap_servers, topics.dlq).values()
    )
    record(
        f"model: {how}",
        mode,
        exit_status=result.returncode,
        committed_partitions=sum(offset >= 0 for offset in committed.values()),
        group_joined=joined,
        outputs=written,
        payload_ran=marker.exists(),
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert '"model refused"' in result.stderr
    assert ("sha256" if how == "flipped byte" else "is a pickle") in result.stderr
    assert not marker.exists(), "the payload ran"
    assert all(offset < 0 for offset in committed.values()), committed
    assert not joined, "the scorer joined its group"
    assert written == 0
    if how == "pickle payload":
        # Control: the same payload does run when unpickled, so the check above could fail.
        pickle.loads(tampered.read_bytes()).close()
        assert marker.exists()


# -- a canary password under debug=all ------------------------------------------------------------


def client_log_line(line: str, text: str) -> bool:
    """`line` is a JSON log line from librdkafka (logger streamer.kafka.client) that has `text`."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return False
    return entry.get("logger") == "streamer.kafka.client" and text in entry.get("event", "")


@pytest.mark.parametrize("mode", MODES)
def test_sasl_password_never_leaks(
    bootstrap_servers: str, topics: Topics, model_path: Path, mode: str
) -> None:
    """A canary SASL password with librdkafka's `debug=all`: in no log line, header or output.

    The local broker has no SASL listener, so the connection stays PLAINTEXT; librdkafka still
    takes the sasl.* settings into its configuration (warning that the protocol is not SASL) and
    `debug=all` dumps that configuration, which is where a password would leak.
    """
    token = secrets.token_hex(16)
    canary = f"canary-{token}"
    # Searched for by a fragment, so a truncated or re-quoted leak is found as well.
    fragment = token[:12]
    events = list(SyntheticWorld(3401).generate(300))
    good = [(e.record["card_id"].encode(), encode_transaction(e.record)) for e in events]
    produce_tracked(
        bootstrap_servers,
        topics.input,
        [
            *good[:150],
            (good[0][0], b"\x00\x01not avro\xff"),
            (b"someone-else", good[1][1]),
            *good[150:],
        ],
    )
    env = fault_env(
        bootstrap_servers,
        topics,
        model_path,
        mode,
        STREAMER_KAFKA_SASL_MECHANISM="PLAIN",
        STREAMER_KAFKA_SASL_USERNAME="streamer-canary",
        STREAMER_KAFKA_SASL_PASSWORD=canary,
        STREAMER_KAFKA_DEBUG="all",
        STREAMER_LOG_LEVEL="debug",
    )

    result = run_scorer(env)

    assert result.returncode == 0, result.stderr[-3000:]
    logs = result.stdout + result.stderr
    # The leak paths were exercised: librdkafka dumped its configuration, sasl.password
    # included, through the scorer's log, and the progress lines were written.
    dumped = [line for line in logs.splitlines() if client_log_line(line, "sasl.password")]
    assert dumped, "librdkafka's configuration dump is not in the log"
    assert '"progress"' in logs
    leaks = [line[:300] for line in logs.splitlines() if fragment in line]
    outputs = read_all(bootstrap_servers, topics.output) + read_all(bootstrap_servers, topics.dlq)
    leaked_outputs = [
        (output.partition, output.offset)
        for output in outputs
        if fragment.encode() in (output.key or b"") + (output.value or b"")
        or any(fragment in name + value for name, value in output.headers.items())
    ]
    report = audit(env, mode)
    record(
        "canary password, debug=all",
        mode,
        inputs=report["inputs"],
        missing=report["missing"],
        log_lines=len(logs.splitlines()),
        leaked_lines=len(leaks),
        leaked_outputs=len(leaked_outputs),
    )
    assert not leaks, leaks[:3]
    assert not leaked_outputs
    assert report["dead_letters"] == 2
    assert report["missing"] == 0, report
    assert report["returncode"] == 0, report

"""The batch hot path against the per-record one: same outcomes, same reasons, same bytes.

`decode_and_validate` must give every record what the per-record path gives it (the good record,
or the same error with the same reason and cause), `encode_verdicts` the bytes fastavro writes,
and `events.screen_transactions` must never pass a record that `validate_transaction` refuses.
The inputs are seeded random mixes of sound records, every rule broken near its edge, every
malformed kind of the integration tests, non-canonical but valid encodings and fuzzed bytes.
"""

from __future__ import annotations

import math
import random
import re
import struct
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from streamer import serde
from streamer.errors import DecodeError, RecordError, ValidationError
from streamer.events import (
    CHANNELS,
    MAX_AMOUNT,
    Transaction,
    screen_transactions,
    validate_transaction,
)
from streamer.serde import (
    TRANSACTION_FIELDS,
    TransactionBatch,
    decode_and_validate,
    decode_transaction,
    encode_transaction,
    encode_verdict,
    encode_verdicts,
)
from streamer.synthetic import SyntheticWorld

MAX_BYTES = 65_536
LONG_MAX = 2**63 - 1


def per_record(value: bytes | None, key: bytes | None, max_bytes: int) -> Any:
    """The per-record path as the scoring loop ran it: the good record, or its RecordError."""
    try:
        if value is None:
            raise DecodeError("tombstone: the record has no value")
        if len(value) > max_bytes:
            raise DecodeError(f"value of {len(value)} bytes exceeds the limit of {max_bytes} bytes")
        record = decode_transaction(value)
        validate_transaction(record, key)
    except RecordError as exc:
        return exc
    return record


def exact(value: Any) -> Any:
    """A value with float bits and types made visible, so -0.0 != 0.0 and True != 1."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, dict):
        return [(name, exact(item)) for name, item in value.items()]
    return (type(value).__name__, value)


def error_shape(error: BaseException) -> tuple[Any, ...]:
    """Class, reason and cause; fastavro names its BytesIO in some reasons, by address."""
    cause = error.__cause__

    def text(exc: BaseException) -> str:
        return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "<BytesIO>", str(exc))

    return (
        type(error),
        text(error),
        None if cause is None else (type(cause), text(cause)),
        error.__suppress_context__,
    )


def assert_same_outcomes(
    values: Sequence[bytes | None], keys: Sequence[bytes | None], max_bytes: int = MAX_BYTES
) -> TransactionBatch:
    """decode_and_validate agrees with the per-record path on every record of the batch."""
    batch = decode_and_validate(values, keys, max_bytes)
    expected = [per_record(v, k, max_bytes) for v, k in zip(values, keys, strict=True)]
    good = [i for i, outcome in enumerate(expected) if isinstance(outcome, dict)]
    assert batch.indexes == good
    assert [exact(r) for r in batch.records] == [exact(expected[i]) for i in good]
    assert [index for index, _ in batch.errors] == [
        i for i, outcome in enumerate(expected) if not isinstance(outcome, dict)
    ]
    for index, error in batch.errors:
        assert error_shape(error) == error_shape(expected[index]), (values[index], keys[index])
    return batch


def sound_records(count: int, seed: int = 11) -> list[dict[str, Any]]:
    return [t.record for t in SyntheticWorld(seed).generate(count)]


# Values near and past every rule of `Transaction`, and a few ordinary ones.
EDGE_VALUES: dict[str, list[Any]] = {
    "transaction_id": [
        "", "a", " ", "\x00", "x" * 63, "x" * 64, "x" * 128, "x" * 129, "é" * 64, "é" * 100,
        "é" * 129, "😀" * 128, "😀" * 129, "\u2028", str(uuid.UUID(int=7)),
    ],
    "event_time": [0, 1, -1, 63, 64, -64, 2**62 - 1, 2**62, LONG_MAX, -(2**63), 1_767_225_600_000],
    "merchant_id": ["", "m", "x" * 128, "x" * 129, "ü" * 128],
    "merchant_category": ["", "grocery", "x" * 64, "x" * 65, "é" * 64, "space_tourism", "GROCERY"],
    "amount": [
        0.0, -0.0, -5e-324, 5e-324, 1.5, MAX_AMOUNT, math.nextafter(MAX_AMOUNT, math.inf),
        math.nan, -math.nan, math.inf, -math.inf, -3.0, 1e308,
    ],
    "currency": ["EUR", "eur", "", "XXX", "ABC", "EURO", "€", "EU"],
    "country": ["DE", "de", "UK", "QQ", "", "DEU", "D"],
    "channel": [*CHANNELS, "POS", "", "pos ", "carrier-pigeon"],
    "card_present": [True, False],
    "card_country": [None, "DE", "XX", "", "de"],
    "card_avg_amount": [
        None, 0.0, -0.0, 5e-324, 1.0, math.inf, math.nan, -1.0, 1.7976931348623157e308,
    ],
}  # fmt: skip


def mutated(record: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The record with one to three fields set to edge values."""
    changed = dict(record)
    for name in rng.sample(sorted(EDGE_VALUES), rng.randint(1, 3)):
        changed[name] = rng.choice(EDGE_VALUES[name])
    return changed


def key_for(record: dict[str, Any], rng: random.Random) -> bytes | None:
    """Mostly the card id; sometimes missing, empty or someone else's."""
    card: bytes = record["card_id"].encode()
    roll = rng.random()
    if roll < 0.85:
        return card
    return rng.choice([None, b"", b"someone-else", card[:-1], card + b"\x00", card.upper()])


def non_canonical(record: dict[str, Any], rng: random.Random) -> bytes:
    """The record in another spelling, valid or not, that the hand-written reader refuses.

    Overlong or negative lengths, booleans other than 0 and 1, odd union branches, trailing bytes.
    """
    value = encode_transaction(record)
    card_country = record["card_country"]
    country_size = 1 if card_country is None else 2 + len(card_country.encode())  # short ones
    present_at = len(value) - 1 - country_size - (1 if record["card_avg_amount"] is None else 9)
    length = value[0]
    choice = rng.randrange(7)
    if choice == 0 and length < 0x80:  # the transaction_id length as an overlong varint
        return bytes([length | 0x80, 0x00]) + value[1:]
    if choice == 5 and length < 0x80:  # event_time as a varint of 10 bytes or more
        time_at = 1 + (length >> 1)
        time_end = time_at
        while value[time_end] & 0x80:
            time_end += 1
        spelled = rng.choice(
            [
                b"\xfe" + b"\xff" * 8 + b"\x01",
                b"\x80" * 9 + b"\x01",
                b"\xfe" * 9 + b"\x7f",
                bytes(b | 0x80 for b in value[time_at : time_end + 1]) + b"\x80" * 3 + b"\x00",
            ]
        )
        return value[:time_at] + spelled + value[time_end + 1 :]
    if choice == 1 and length < 0x7F:  # a negative length of the same magnitude
        return bytes([length | 1]) + value[1:]
    if choice == 2:  # a boolean byte other than 0 and 1
        flag = bytes([rng.choice([2, 0x7F, 0xFF])])
        return value[:present_at] + flag + value[present_at + 1 :]
    odd_branch = rng.choice([b"\x80\x00", b"\x04", b"\x01", b"\x03", b"\x06"])
    if choice == 3 and card_country is None:
        return value[: present_at + 1] + odd_branch + value[present_at + 2 :]
    if choice == 4 and record["card_avg_amount"] is None:
        return value[:-1] + odd_branch
    return value + b"\x00" * rng.randint(1, 3)  # trailing bytes


def fuzzed(value: bytes, rng: random.Random) -> bytes:
    """The bytes truncated, extended, flipped or replaced by garbage."""
    choice = rng.randrange(6)
    if choice == 0:
        return value[: rng.randrange(len(value))]
    if choice == 1:
        return value + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    if choice == 2:
        at = rng.randrange(len(value))
        return value[:at] + bytes([value[at] ^ (1 << rng.randrange(8))]) + value[at + 1 :]
    if choice == 3:
        at = rng.randrange(len(value))
        return value[:at] + bytes([rng.randrange(256)]) + value[at:]
    if choice == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    at = rng.randrange(len(value))
    return value[:at] + b"\xff" * rng.randint(1, 12) + value[at:]


def encodable(record: dict[str, Any]) -> bytes | None:
    try:
        return encode_transaction(record)
    except (ValueError, TypeError, OverflowError):
        return None  # not expressible in Avro (e.g. an event_time beyond a long)


class TestDecodeAndValidate:
    def test_sound_records_all_pass(self) -> None:
        """A batch of synthetic records comes back whole, as the per-record path decodes it."""
        records = sound_records(1_000)
        batch = assert_same_outcomes(
            [encode_transaction(r) for r in records], [r["card_id"].encode() for r in records]
        )
        assert batch.errors == []
        assert batch.indexes == list(range(1_000))

    def test_columns_hold_the_records_by_field(self) -> None:
        """columns maps each field, in schema order, to the good records' values."""
        records = sound_records(5)
        values: list[bytes | None] = [encode_transaction(r) for r in records]
        values.insert(2, None)
        keys = [r["card_id"].encode() for r in records]
        keys.insert(2, b"x")
        batch = decode_and_validate(values, keys, MAX_BYTES)
        assert tuple(batch.columns) == TRANSACTION_FIELDS
        assert batch.columns["transaction_id"] == tuple(r["transaction_id"] for r in records)
        assert batch.indexes == [0, 1, 3, 4, 5]

    def test_every_malformed_kind_of_the_integration_test(self) -> None:
        """Garbage, truncated, trailing, tombstone, too large, broken rules, wrong or no key."""
        template = sound_records(1)[0]
        key = template["card_id"].encode()
        valid = encode_transaction(template)

        def variant(**changes: object) -> bytes:
            return encode_transaction({**template, **changes})

        cases: list[tuple[bytes | None, bytes | None, str]] = [
            (key, b"\x00\x01garbage\xff", "not an Avro Transaction"),
            (key, valid[:7], "not an Avro Transaction"),
            (key, valid + b"\x00\x00", "trailing bytes"),
            (key, None, "tombstone"),
            (key, b"\x02" * 100_000, "exceeds the limit"),
            (key, variant(amount=-3.0), "amount: Input should be greater than"),
            (key, variant(amount=math.nan), "amount: Input should be a finite number"),
            (key, variant(currency="ABC"), "unknown ISO 4217 currency code"),
            (key, variant(country="QQ"), "unknown ISO 3166-1 alpha-2"),
            (key, variant(channel="carrier-pigeon"), "unknown channel"),
            (None, variant(), "missing key"),
            (b"someone-else", variant(), "does not match card_id"),
        ]
        values = [valid, *(value for _, value, _ in cases), valid]
        keys = [key, *(k for k, _, _ in cases), key]
        batch = assert_same_outcomes(values, keys)
        assert batch.indexes == [0, len(values) - 1]
        for (index, error), (_, _, reason) in zip(batch.errors, cases, strict=True):
            assert reason in str(error), index

    def test_decode_errors_keep_their_cause(self) -> None:
        """A value fastavro cannot read carries fastavro's exception as its cause."""
        batch = decode_and_validate([b"\x02\x80"], [b"k"], MAX_BYTES)
        [(_, error)] = batch.errors
        assert isinstance(error, DecodeError)
        assert isinstance(error.__cause__, UnicodeDecodeError)

    def test_size_limit_is_inclusive(self) -> None:
        """A value of exactly max_bytes is read; one byte more is refused unread."""
        record = sound_records(1)[0]
        value = encode_transaction(record)
        key = record["card_id"].encode()
        assert_same_outcomes([value, value], [key, key], max_bytes=len(value))
        batch = assert_same_outcomes([value], [key], max_bytes=len(value) - 1)
        assert "exceeds the limit" in str(batch.errors[0][1])

    def test_empty_batch(self) -> None:
        """No records: no good records, no errors, empty columns."""
        batch = decode_and_validate([], [], MAX_BYTES)
        assert (batch.indexes, batch.errors, batch.records) == ([], [], [])
        assert all(column == () for column in batch.columns.values())

    def test_values_and_keys_must_pair_up(self) -> None:
        """A key list of another length is a programming error, not a dead letter."""
        with pytest.raises(ValueError, match="2 values but 1 keys"):
            decode_and_validate([b"", b""], [b""], MAX_BYTES)

    @pytest.mark.parametrize("seed", range(6))
    def test_edge_values_give_the_per_record_outcome(self, seed: int) -> None:
        """Records with rules broken at their edges: same verdict, reason and cause."""
        rng = random.Random(seed)
        values: list[bytes | None] = []
        keys: list[bytes | None] = []
        for record in sound_records(600, seed=seed):
            if rng.random() < 0.6:
                record = mutated(record, rng)
            value = encodable(record)
            if value is not None:
                values.append(value)
                keys.append(key_for(record, rng))
        assert_same_outcomes(values, keys)

    @pytest.mark.parametrize("seed", range(6))
    def test_odd_and_fuzzed_bytes_give_the_per_record_outcome(self, seed: int) -> None:
        """Non-canonical spellings, truncations, flips and garbage: same outcome and reason."""
        rng = random.Random(100 + seed)
        values: list[bytes | None] = []
        keys: list[bytes | None] = []
        for record in sound_records(600, seed=seed):
            candidate = mutated(record, rng) if rng.random() < 0.2 else record
            value = encodable(candidate)
            if value is None:
                continue
            roll = rng.random()
            if roll < 0.3:
                value = non_canonical(candidate, rng)
            elif roll < 0.8:
                value = fuzzed(value, rng)
            elif roll < 0.85:
                values.append(None)
                keys.append(record["card_id"].encode())
                continue
            values.append(value)
            keys.append(key_for(record, rng))
        batch = assert_same_outcomes(values, keys, max_bytes=rng.choice([90, MAX_BYTES]))
        assert batch.errors, "the fuzzing should break some records"

    def test_long_and_unicode_ids_take_the_long_length_way(self) -> None:
        """Ids of 64 bytes and more (two-byte lengths) and multi-byte characters read right."""
        template = sound_records(1)[0]
        records = [
            {**template, "transaction_id": tid, "card_id": card}
            for tid in ("t" * 64, "é" * 100, "😀" * 128, "😀" * 129, "x" * 8_000)
            for card in ("c" * 63, "c" * 128, "ü" * 70)
        ]
        values = [encode_transaction(r) for r in records]
        batch = assert_same_outcomes(values, [r["card_id"].encode() for r in records])
        assert len(batch.indexes) == 3 * 3  # 129 emoji and 8,000 x are too long
        for value in values:  # read by hand, not left to fastavro (which would only be slower)
            serde._read_transaction(value)

    def test_sound_records_are_read_by_hand(self) -> None:
        """Synthetic records never fall back to fastavro: the fast way is the common one."""
        for record in sound_records(2_000):
            row = serde._read_transaction(encode_transaction(record))
            assert [exact(v) for v in row[: len(TRANSACTION_FIELDS)]] == [
                exact(record[name]) for name in TRANSACTION_FIELDS
            ]


# Verdict fields the generator draws from: edges of every type and encoding length.
SCORES = [0.0, 1.0, -0.0, 5e-324, 0.5, math.nextafter(1.0, 0.0), math.nan, math.inf, -1.0]
THRESHOLDS = [0.0, 1.0, 0.5, 0.266, math.nextafter(0.0, 1.0)]
NAMES = ["", "fraud-hgb", "é" * 40, "m" * 63, "m" * 64, "😀" * 70, "\x00"]
TIMES = [0, 1, 63, 64, 8191, 8192, 1_767_225_600_000, 2**62 - 1, 2**62, LONG_MAX]


def verdicts_of(batch: TransactionBatch, scores: Sequence[float], **context: Any) -> list[bytes]:
    """The per-record way: one dict and one fastavro call per verdict."""
    return [
        encode_verdict(
            {
                "transaction_id": record["transaction_id"],
                "card_id": record["card_id"],
                "score": score,
                "is_fraud": score >= context["threshold"],
                "threshold": context["threshold"],
                "model_name": context["model_name"],
                "model_version": context["model_version"],
                "event_time": record["event_time"],
                "scored_at": context["scored_at"],
            }
        )
        for record, score in zip(batch.records, scores, strict=True)
    ]


class TestEncodeVerdicts:
    @pytest.mark.parametrize("seed", range(5))
    def test_bytes_equal_fastavro(self, seed: int) -> None:
        """Random verdicts, edge values included, encode byte for byte as fastavro does."""
        rng = random.Random(seed)
        template = sound_records(1)[0]
        records = []
        for record in sound_records(400, seed=seed):
            if rng.random() < 0.5:
                record = {
                    **record,
                    "transaction_id": rng.choice(EDGE_VALUES["transaction_id"][1:]),
                    "card_id": rng.choice(["c", "ü" * 64, "x" * 128, template["card_id"]]),
                    "event_time": rng.choice(TIMES),
                }
            records.append(record)
        values = [encode_transaction(r) for r in records]
        if seed % 2:  # rows read by fastavro rather than by hand
            values = [
                non_canonical(r, rng) if rng.random() < 0.5 else v
                for r, v in zip(records, values, strict=True)
            ]
        keys = [r["card_id"].encode() for r in records]
        batch = assert_same_outcomes(values, keys)
        scores = [rng.choice(SCORES) if rng.random() < 0.3 else rng.random() for _ in batch.indexes]
        context: dict[str, Any] = {
            "threshold": rng.choice(THRESHOLDS),
            "model_name": rng.choice(NAMES),
            "model_version": rng.choice(NAMES),
            "scored_at": rng.choice(TIMES),
        }
        assert encode_verdicts(batch, scores, **context) == verdicts_of(batch, scores, **context)

    def test_is_fraud_is_score_at_or_above_threshold(self) -> None:
        """A score equal to the threshold is flagged; one just below is not."""
        records = sound_records(2)
        batch = decode_and_validate(
            [encode_transaction(r) for r in records],
            [r["card_id"].encode() for r in records],
            MAX_BYTES,
        )
        below = math.nextafter(0.3, 0.0)
        context: dict[str, Any] = {
            "threshold": 0.3, "model_name": "m", "model_version": "1", "scored_at": 5,
        }  # fmt: skip
        encoded = encode_verdicts(batch, [0.3, below], **context)
        assert encoded == verdicts_of(batch, [0.3, below], **context)
        assert encoded[0][len(encoded[0]) - len(encoded[1]) :] != encoded[1]

    def test_empty_batch_gives_no_verdicts(self) -> None:
        """Nothing in, nothing out."""
        batch = decode_and_validate([], [], MAX_BYTES)
        assert (
            encode_verdicts(
                batch, [], threshold=0.5, model_name="m", model_version="1", scored_at=0
            )
            == []
        )

    def test_one_score_per_record(self) -> None:
        """A score list of another length is refused."""
        records = sound_records(2)
        batch = decode_and_validate(
            [encode_transaction(r) for r in records],
            [r["card_id"].encode() for r in records],
            MAX_BYTES,
        )
        with pytest.raises(ValueError, match="1 scores for 2 records"):
            encode_verdicts(
                batch, [0.1], threshold=0.5, model_name="m", model_version="1", scored_at=0
            )

    def test_scored_at_must_fit_a_long(self) -> None:
        """A timestamp beyond an Avro long is an error, not wrapped bytes."""
        batch = decode_and_validate([], [], MAX_BYTES)
        with pytest.raises(ValueError, match="does not fit an Avro long"):
            encode_verdicts(
                batch, [], threshold=0.5, model_name="m", model_version="1", scored_at=2**63
            )


ANY_TYPE_VALUES: list[Any] = [
    True, False, 0, 1, -1, 3, 2**70, 2.5, -0.0, math.nan, None, "", "EUR", "DE", "pos", b"x",
    b"EUR", ["m"], ("pos",),
]  # fmt: skip


def columns_of(records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [r[name] for r in records] for name in Transaction.model_fields}


class TestScreen:
    @pytest.mark.parametrize("seed", range(8))
    def test_never_passes_a_record_validation_refuses(self, seed: int) -> None:
        """Whatever the screen does not name passes validate_transaction."""
        rng = random.Random(1_000 + seed)
        records = [
            mutated(r, rng) if rng.random() < 0.5 else r for r in sound_records(400, seed=seed)
        ]
        keys = [key_for(r, rng) for r in records]
        passed = 0
        for start in range(0, len(records), 20):
            batch, batch_keys = records[start : start + 20], keys[start : start + 20]
            if rng.random() < 0.5:  # a value no Avro decoder gives, in any field
                batch[rng.randrange(20)][rng.choice(TRANSACTION_FIELDS)] = rng.choice(
                    ANY_TYPE_VALUES
                )
            suspect = set(screen_transactions(columns_of(batch), batch_keys))
            for index, (record, key) in enumerate(zip(batch, batch_keys, strict=True)):
                if index not in suspect:
                    validate_transaction(record, key)
                    passed += 1
        assert passed > 100, "most records should get past the screen"

    def test_sound_records_are_not_suspect(self) -> None:
        """Synthetic records give no suspects, so the fast path is the common one."""
        records = sound_records(2_000)
        keys = [r["card_id"].encode() for r in records]
        assert screen_transactions(columns_of(records), keys) == []

    def test_each_broken_rule_is_named(self) -> None:
        """A record breaking any one rule is suspect, and only that record."""
        base = sound_records(1)[0]
        for name, edges in EDGE_VALUES.items():
            for edge in edges:
                record = {**base, name: edge}
                try:
                    validate_transaction(record, record["card_id"].encode())
                except ValidationError:
                    records = [base, record, base]
                    keys = [r["card_id"].encode() for r in records]
                    assert screen_transactions(columns_of(records), keys) == [1], (name, edge)

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("event_time", True),
            ("event_time", 5.0),
            ("card_present", 1),
            ("amount", 3),
            ("amount", True),
            ("card_avg_amount", 2),
            ("card_avg_amount", False),
            ("transaction_id", b"t-1"),
            ("card_id", 7),
            ("merchant_id", ["m"]),
            ("merchant_category", None),
            ("currency", b"EUR"),
            ("country", None),
            ("channel", 0),
            ("card_country", 0),
        ],
    )
    def test_values_of_other_types_are_suspect(self, name: str, value: object) -> None:
        """A value of another type than the decoder gives leaves the verdict to pydantic."""
        records = sound_records(3)
        records[1][name] = value
        keys = [r["card_id"].encode() if isinstance(r["card_id"], str) else b"" for r in records]
        suspect = screen_transactions(columns_of(records), keys)
        assert 1 in suspect
        for index in set(range(3)) - set(suspect):
            validate_transaction(records[index], keys[index])

    @pytest.mark.parametrize("extra", [True, False], ids=["extra-field", "missing-field"])
    def test_other_fields_make_every_record_suspect(self, extra: bool) -> None:
        """Columns that are not exactly the Transaction fields leave the verdict to pydantic."""
        records = sound_records(2)
        columns = columns_of(records)
        if extra:
            columns["note"] = ["x", "y"]
        else:
            del columns["card_avg_amount"]
        keys = [r["card_id"].encode() for r in records]
        assert screen_transactions(columns, keys) == [0, 1]

    def test_empty(self) -> None:
        """No records, no suspects."""
        assert screen_transactions(columns_of([]), []) == []

"""The card history: determinism across batching and restores, expiry, bounds and its codec."""

from __future__ import annotations

import itertools
import math
import random
import struct
import sys
import tracemalloc
from array import array
from dataclasses import dataclass

import numpy as np
import pytest

from streamer.state.card import (
    CARD_HISTORY_CODEC,
    DAY_MS,
    HISTORY_FEATURES,
    HOUR_MS,
    MAX_EVENTS,
    MAX_REMEMBERED,
    RETENTION_MS,
    CardHistory,
    StateDecodeError,
    decode_history,
    encode_history,
    history_features,
    is_expired,
    is_expired_encoded,
)

# 2026-01-01 00:00:00 UTC
START_MS = 1_767_225_600_000
MINUTE_MS = 60_000


@dataclass(frozen=True)
class Tx:
    card: str
    time: int
    amount: float
    merchant: str = "m-1"
    country: str = "FR"


def score(histories: dict[str, CardHistory], records: list[Tx]) -> np.ndarray:
    """The history columns of `records`, applying them to `histories`."""
    out = np.full((len(records), len(HISTORY_FEATURES)), -1.0)
    history_features(
        histories,
        [r.card for r in records],
        [r.time for r in records],
        [r.amount for r in records],
        [r.merchant for r in records],
        [r.country for r in records],
        out,
    )
    return out


def history_of(records: list[Tx]) -> CardHistory:
    histories: dict[str, CardHistory] = {}
    score(histories, records)
    (history,) = histories.values()
    return history


def stream(seed: int, count: int = 3_000, cards: int = 50) -> list[Tx]:
    """A messy stream: skewed card activity, bursts, out-of-order events and multi-day gaps."""
    rng = random.Random(seed)
    ids = [f"card-{i:03d}" for i in range(cards)]
    weights = [1.0 / (i + 1) for i in range(cards)]  # a few busy cards, many that go idle
    pools = {card: [f"m-{rng.randrange(40)}" for _ in range(5)] for card in ids}
    # The busiest card shops everywhere: it outgrows what a card remembers of its merchants.
    pools[ids[0]] = [f"wide-{i}" for i in range(3 * MAX_REMEMBERED)]
    homes = {card: rng.choice(["FR", "DE", "ES", "IT"]) for card in ids}
    # The whole stream goes quiet twice: once for longer than the longest window.
    quiet = {count // 3: 35 * DAY_MS, 2 * count // 3: 3 * DAY_MS}
    clock = START_MS
    records: list[Tx] = []
    while len(records) < count:
        roll = rng.random()
        clock += quiet.pop(len(records), 0)
        clock += int(rng.expovariate(1 / (20 * MINUTE_MS)))
        card = rng.choices(ids, weights)[0]
        burst = rng.randrange(10, 40) if roll > 0.985 else 1
        for _ in range(burst):
            lateness = rng.randrange(3 * HOUR_MS) if rng.random() < 0.05 else 0
            records.append(
                Tx(
                    card=card,
                    time=clock - lateness,
                    amount=rng.choice([0.0, 1.0, round(rng.lognormvariate(3.0, 1.2), 2)]),
                    merchant=rng.choice(pools[card]),
                    country=homes[card] if rng.random() < 0.9 else rng.choice(["US", "BR"]),
                )
            )
            if burst > 1:
                clock += rng.randrange(1_000, 90_000)
    return records[:count]


def chunks(records: list[Tx], seed: int) -> list[list[Tx]]:
    rng = random.Random(seed)
    out: list[list[Tx]] = []
    start = 0
    while start < len(records):
        size = rng.choice([1, 2, 7, 50, 333])
        out.append(records[start : start + size])
        start += size
    return out


def round_trip(histories: dict[str, CardHistory]) -> dict[str, CardHistory]:
    return {card: decode_history(encode_history(h)) for card, h in histories.items()}


FORMAT_1_HISTORY = (
    "01030002000200020000a8da769b0100000504017c9b01000080f2377c9b0100000000000000002940000000"
    "0000000840000000000000d03f0100010000000200000000000000000029400000000000000a400500030005"
    "04017c9b01000080f2377c9b010000020002000504017c9b01000080f2377c9b010000636166c3a96d2d3144"
    "454652"
)
"""A history of three records (`test_format_1_bytes_still_decode`) as format 1, written by the
encoder of that format."""


def _encode_format_1(history: CardHistory) -> bytes:
    """The history as format 1 (days before the latest as u8, counts as u32, sums; each id with
    its UTF-8 length): the encoder that wrote it, kept to test that it is still read."""
    h = history
    merchants = [key.encode() for key in h._merchant_seen]
    countries = [key.encode() for key in h._country_seen]
    times = h._times
    if times:
        days = h._days
        latest_day = times[-1] // DAY_MS
        days_ago = bytes([latest_day - int(day) for day in days[4::3]]) + b"\0"
        day_counts = array("I", map(int, days[5::3]))
        day_counts.append(int(days[0]))
        day_sums = days[6::3]
        day_sums.append(days[1])
    else:
        days_ago, day_counts, day_sums = b"", array("I"), array("d")
    parts = [
        struct.pack("<BHHHH", 1, len(times), len(days_ago), len(merchants), len(countries)),
        times.tobytes(),
        h._amounts.tobytes(),
        days_ago,
        day_counts.tobytes(),
        day_sums.tobytes(),
        array("H", map(len, merchants)).tobytes(),
        h._merchant_times.tobytes(),
        array("H", map(len, countries)).tobytes(),
        h._country_times.tobytes(),
    ]
    assert sys.byteorder == "little", "format 1 is little-endian"
    return b"".join((*parts, *merchants, *countries))


class TestDeterminism:
    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_batching_does_not_change_a_bit(self, seed: int) -> None:
        """One call, many small calls, or a restore between every two give identical features."""
        records = stream(seed)
        whole_state: dict[str, CardHistory] = {}
        whole = score(whole_state, records)

        small_state: dict[str, CardHistory] = {}
        small = np.vstack([score(small_state, part) for part in chunks(records, seed)])

        restored_state: dict[str, CardHistory] = {}
        parts = []
        for part in chunks(records, seed + 100):
            restored_state = round_trip(restored_state)
            parts.append(score(restored_state, part))
        restored = np.vstack(parts)

        assert np.array_equal(whole, small, equal_nan=True)
        assert np.array_equal(whole, restored, equal_nan=True)
        assert whole_state == small_state == restored_state

    def test_stream_exercises_every_rule(self) -> None:
        """The random stream reaches the paths the determinism test is meant to cover."""
        records = stream(1)
        matrix = score({}, records)
        column = {name: matrix[:, i] for i, name in enumerate(HISTORY_FEATURES)}

        assert (column["seconds_since_previous"] == 0.0).sum() > 50  # out of order or bursts
        assert np.isnan(column["seconds_since_previous"]).sum() > 50  # first or after 30 days
        assert column["card_count_1h"].max() >= 10  # bursts
        assert column["card_merchants_7d"].max() == MAX_REMEMBERED  # the cap
        assert np.isinf(column["amount_to_card_mean_30d"]).any()  # zero means
        assert any(b.time < a.time for a, b in itertools.pairwise(records))

    def test_round_trip_after_every_record(self) -> None:
        """Restoring before each single record still gives the same features."""
        records = stream(4, count=600, cards=8)
        expected = score({}, records)
        state: dict[str, CardHistory] = {}
        rows = []
        for record in records:
            state = round_trip(state)
            rows.append(score(state, [record]))

        assert np.array_equal(np.vstack(rows), expected, equal_nan=True)


class TestExpiry:
    def test_dropping_idle_cards_changes_no_feature(self) -> None:
        """A store that drops expired cards gives the features of one that keeps them all."""
        records = stream(5, count=4_000)
        kept: dict[str, CardHistory] = {}
        expected = score(kept, records)

        pruned: dict[str, CardHistory] = {}
        parts = []
        dropped = 0
        groups = chunks(records, 5)
        position = 0
        for part in groups:
            # No record from here on is earlier than this: the stream's low watermark.
            now = min(r.time for r in records[position:])
            for card in [c for c, h in pruned.items() if is_expired(h, now)]:
                del pruned[card]
                dropped += 1
            parts.append(score(pruned, part))
            position += len(part)

        assert dropped > 10
        assert np.array_equal(np.vstack(parts), expected, equal_nan=True)
        assert all(kept[card] == history for card, history in pruned.items())

    def test_expired_exactly_at_retention(self) -> None:
        """A card is expired once its latest time is RETENTION_MS or more before now."""
        history = history_of([Tx("c", START_MS, 5.0)])

        assert not is_expired(history, START_MS + RETENTION_MS - 1)
        assert is_expired(history, START_MS + RETENTION_MS)

    def test_empty_history_is_expired(self) -> None:
        """A history with nothing in it can always be dropped."""
        assert is_expired(CardHistory(), START_MS)

    def test_idle_card_is_reset_by_its_next_record(self) -> None:
        """After 30 idle days the history equals a new card's: nothing old is kept."""
        old = history_of([Tx("c", START_MS + i * HOUR_MS, 5.0, f"m-{i}") for i in range(20)])
        later = START_MS + 19 * HOUR_MS + RETENTION_MS
        score({"c": old}, [Tx("c", later, 7.0)])

        assert old == history_of([Tx("c", later, 7.0)])


class TestBounds:
    def test_a_year_of_daily_use_stays_small(self) -> None:
        """A card used 5 times a day for a year holds a week of transactions and 30 days."""
        rng = random.Random(6)
        records = [
            Tx(
                "c",
                START_MS + i * DAY_MS // 5,
                float(rng.randrange(1, 500)),
                f"m-{rng.randrange(300)}",
                rng.choice(["FR", "DE", "ES"]),
            )
            for i in range(5 * 365)
        ]
        history = history_of(records)
        encoded = encode_history(history)
        (transactions, days, merchants, countries) = struct.unpack_from("<HHHH", encoded, 1)

        assert transactions == 35
        assert days == 30
        assert merchants == MAX_REMEMBERED
        assert countries == 3
        assert len(encoded) < 4_000

    def test_a_hammered_card_keeps_max_events(self) -> None:
        """A burst beyond MAX_EVENTS keeps the most recent ones; the window counts saturate."""
        burst = [Tx("c", START_MS + i, 1.0) for i in range(MAX_EVENTS + 500)]
        matrix = score({}, [*burst, Tx("c", START_MS + 10_000, 1.0)])
        last = dict(zip(HISTORY_FEATURES, matrix[-1].tolist(), strict=True))

        assert last["card_count_1h"] == MAX_EVENTS
        assert last["card_amount_sum_1h"] == MAX_EVENTS
        assert last["amount_to_card_mean_30d"] == 1.0  # the day buckets count every one


class TestHistoryFeatures:
    def test_writes_into_a_column_slice(self) -> None:
        """`out` may be a view of some columns of a bigger matrix; the others are untouched."""
        records = stream(7, count=100)
        big = np.full((len(records), len(HISTORY_FEATURES) + 3), 7.0)
        history_features(
            {},
            [r.card for r in records],
            [r.time for r in records],
            [r.amount for r in records],
            [r.merchant for r in records],
            [r.country for r in records],
            big[:, 2:-1],
        )

        assert np.array_equal(big[:, 2:-1], score({}, records), equal_nan=True)
        assert (big[:, :2] == 7.0).all()
        assert (big[:, -1] == 7.0).all()

    def test_numpy_columns_give_the_same_features(self) -> None:
        """Times and amounts as numpy arrays score as the plain lists do."""
        records = stream(8, count=300)
        out = np.empty((len(records), len(HISTORY_FEATURES)))
        state: dict[str, CardHistory] = {}
        history_features(
            state,
            np.array([r.card for r in records]).tolist(),
            np.array([r.time for r in records], dtype=np.int64),
            np.array([r.amount for r in records]),
            [r.merchant for r in records],
            [r.country for r in records],
            out,
        )

        assert np.array_equal(out, score({}, records), equal_nan=True)
        assert encode_history(state[records[0].card]) == encode_history(
            history_of([r for r in records if r.card == records[0].card])
        )

    def test_wrong_shape_is_refused(self) -> None:
        """An `out` whose shape does not match the records raises ValueError."""
        with pytest.raises(ValueError, match="shape"):
            history_features({}, ["c"], [START_MS], [1.0], ["m"], ["FR"], np.empty((1, 3)))

    def test_no_records_leave_state_alone(self) -> None:
        """Zero records write nothing and add no card."""
        state: dict[str, CardHistory] = {}
        history_features(state, [], [], [], [], [], np.empty((0, len(HISTORY_FEATURES))))

        assert state == {}

    def test_an_empty_history_in_the_view_is_a_new_card(self) -> None:
        """A CardHistory() put in the view scores like an absent card."""
        records = [Tx("c", START_MS, 3.0), Tx("c", START_MS + 5, 4.0)]
        given = {"c": CardHistory()}

        assert np.array_equal(score(given, records), score({}, records), equal_nan=True)


class TestCopy:
    def test_copy_is_independent(self) -> None:
        """Applying records to a copy leaves the original as it was, and vice versa."""
        original = history_of(stream(9, count=200, cards=1))
        snapshot = decode_history(encode_history(original))
        twin = original.copy()
        assert twin == original

        score({"card-000": twin}, [Tx("card-000", twin.latest_ms + 1, 9.0, "m-new", "JP")])

        assert original == snapshot
        assert twin != original

    def test_codec_object_bundles_the_functions(self) -> None:
        """CARD_HISTORY_CODEC encodes, decodes, copies and expires card histories."""
        history = history_of([Tx("c", START_MS, 5.0)])
        codec = CARD_HISTORY_CODEC

        assert codec.decode(codec.encode(history)) == history
        assert codec.copy(history) == history
        assert codec.copy(history) is not history
        assert codec.expired(history, START_MS + RETENTION_MS)


class TestCodec:
    def test_round_trip_keeps_every_bit(self) -> None:
        """Amounts such as -0.0, subnormals and NaN come back with the same bits."""
        odd = [-0.0, 5e-324, math.nan, 1e308, 0.1]
        history = history_of([Tx("c", START_MS + i, a, f"m-{i}") for i, a in enumerate(odd)])
        back = decode_history(encode_history(history))

        assert back == history
        assert encode_history(back) == encode_history(history)

    def test_round_trip_of_an_empty_history(self) -> None:
        """An empty history encodes and decodes to an empty history."""
        assert decode_history(encode_history(CardHistory())) == CardHistory()

    def test_non_ascii_ids_round_trip(self) -> None:
        """Merchant and country ids are UTF-8."""
        history = history_of([Tx("c", START_MS, 1.0, "café-ß-日本", "ÉÉ")])

        assert decode_history(encode_history(history)) == history

    def test_first_byte_is_the_format_version(self) -> None:
        """The format version leads the bytes; an unknown one is refused by name."""
        data = encode_history(history_of([Tx("c", START_MS, 1.0)]))
        assert data[0] == 2

        with pytest.raises(StateDecodeError, match="format 3"):
            decode_history(b"\x03" + data[1:])

    def test_format_1_bytes_still_decode(self) -> None:
        """Bytes an earlier version wrote (format 1) decode to the history they were written
        from, which encodes as format 2."""
        records = [
            Tx("c", START_MS, 12.5, "m-1", "FR"),
            Tx("c", START_MS + DAY_MS + 5, 3.0, "café", "DE"),
            Tx("c", START_MS + DAY_MS + HOUR_MS, 0.25, "m-1", "FR"),
        ]
        history = decode_history(bytes.fromhex(FORMAT_1_HISTORY))

        assert history == history_of(records)
        assert encode_history(history)[0] == 2
        assert history == decode_history(encode_history(history))
        assert _encode_format_1(history).hex() == FORMAT_1_HISTORY

    @pytest.mark.parametrize("seed", [1, 2])
    def test_format_1_round_trips_every_history(self, seed: int) -> None:
        """Every history of a messy stream comes back equal from format 1 as from format 2,
        and scores the next records alike."""
        records = stream(seed, count=1_500, cards=20)
        histories: dict[str, CardHistory] = {}
        score(histories, records[:1_000])
        from_1 = {card: decode_history(_encode_format_1(h)) for card, h in histories.items()}
        from_2 = round_trip(histories)

        assert from_1 == from_2 == histories
        later = records[1_000:]
        assert np.array_equal(score(from_1, later), score(from_2, later), equal_nan=True)

    @pytest.mark.parametrize("seed", [1, 2])
    def test_expiry_is_judged_from_the_bytes_as_from_the_history(self, seed: int) -> None:
        """`is_expired_encoded` of either format's bytes agrees with `is_expired` of the
        history at every stream time around its expiry."""
        histories: dict[str, CardHistory] = {}
        score(histories, stream(seed, count=1_000, cards=20))
        histories["empty"] = CardHistory()
        for history in histories.values():
            expires = history.latest_ms + RETENTION_MS if history.latest_ms > 0 else START_MS
            for data in (encode_history(history), _encode_format_1(history)):
                for now in (expires - 1, expires, expires + 1, START_MS):
                    assert is_expired_encoded(data, now) == is_expired(history, now)

    def test_bytes_expiry_cannot_judge_are_kept(self) -> None:
        """Bytes too short for their times, or of an unknown format, are not expired: the card's
        next record decodes them and says what is wrong."""
        data = encode_history(history_of([Tx("c", START_MS, 1.0)]))
        late = START_MS + 10 * RETENTION_MS
        assert is_expired_encoded(data, late)
        assert not is_expired_encoded(data[:12], late)
        assert not is_expired_encoded(b"\x03" + data[1:], late)
        assert not is_expired_encoded(b"", late)

    def test_decode_error_is_a_value_error(self) -> None:
        """Stores catch ValueError for bytes they cannot read."""
        assert issubclass(StateDecodeError, ValueError)

    def test_empty_bytes_are_refused(self) -> None:
        """No bytes: no version."""
        with pytest.raises(StateDecodeError, match="empty"):
            decode_history(b"")

    def test_every_truncation_is_refused(self) -> None:
        """Each proper prefix of a valid encoding raises StateDecodeError."""
        data = encode_history(history_of(stream(10, count=100, cards=1)))
        for end in range(len(data)):
            with pytest.raises(StateDecodeError):
                decode_history(data[:end])

    def test_trailing_bytes_are_refused(self) -> None:
        """Bytes after the last field mean the data is not what it claims."""
        data = encode_history(history_of([Tx("c", START_MS, 1.0)]))

        with pytest.raises(StateDecodeError, match="after its last field"):
            decode_history(data + b"\x00")

    @pytest.mark.parametrize("version", [1, 2])
    def test_huge_claimed_lengths_cost_nothing(self, version: int) -> None:
        """A header claiming the most of everything, with no data, fails before allocating."""
        hostile = struct.pack("<BHHHH", version, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF)
        tracemalloc.start()
        try:
            with pytest.raises(StateDecodeError, match="truncated"):
                decode_history(hostile)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert peak < 64_000

    def test_day_totals_that_do_not_add_up_are_refused(self) -> None:
        """The earlier days' stored totals must be their days added up: a new day adds to them."""
        history = history_of([Tx("c", START_MS, 1.0), Tx("c", START_MS + DAY_MS, 2.0)])
        data = bytearray(encode_history(history))
        days_at = 9 + 2 * 16  # header, then two transactions' times and amounts
        assert struct.unpack_from("<4d", data, days_at) == (1.0, 2.0, 1.0, 1.0)
        struct.pack_into("<d", data, days_at + 24, 1.5)

        with pytest.raises(StateDecodeError, match="do not add up"):
            decode_history(bytes(data))

    def test_a_day_that_is_not_whole_is_refused(self) -> None:
        """Day numbers and counts are whole numbers."""
        history = history_of([Tx("c", START_MS, 1.0), Tx("c", START_MS + DAY_MS, 2.0)])
        data = bytearray(encode_history(history))
        days_at = 9 + 2 * 16
        struct.pack_into("<d", data, days_at + 32, START_MS // DAY_MS + 0.5)

        with pytest.raises(StateDecodeError, match="not whole"):
            decode_history(bytes(data))

    def test_bad_utf8_is_refused(self) -> None:
        """An id that is not UTF-8 raises StateDecodeError."""
        data = bytearray(encode_history(history_of([Tx("c", START_MS, 1.0, "mm", "FR")])))
        data[-4:-2] = b"\xff\xfe"

        with pytest.raises(StateDecodeError, match="UTF-8"):
            decode_history(bytes(data))

    def test_times_out_of_order_are_refused(self) -> None:
        """Transaction times that descend would break the windows: refused."""
        history = history_of([Tx("c", START_MS, 1.0), Tx("c", START_MS + 1, 2.0)])
        data = bytearray(encode_history(history))
        first, second = data[9:17], data[17:25]
        data[9:17], data[17:25] = second, first

        with pytest.raises(StateDecodeError, match="ascending"):
            decode_history(bytes(data))

    def test_a_merchant_remembered_twice_is_refused(self) -> None:
        """Two entries for one id cannot come from a history: refused."""
        history = history_of([Tx("c", START_MS, 1.0, "ab"), Tx("c", START_MS + 1, 1.0, "cd")])
        data = encode_history(history).replace(b"cd", b"ab")

        with pytest.raises(StateDecodeError, match="twice"):
            decode_history(data)

    @pytest.mark.parametrize("seed", range(4))
    @pytest.mark.parametrize("version", [1, 2])
    def test_random_damage_never_escapes(self, seed: int, version: int) -> None:
        """Damaged or random bytes raise StateDecodeError or decode to a usable history."""
        rng = random.Random(seed)
        history = history_of(stream(seed, count=80, cards=1))
        valid = encode_history(history) if version == 2 else _encode_format_1(history)
        for _ in range(400):
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            candidates = [bytes(data), bytes([version]) + rng.randbytes(rng.randrange(40))]
            for candidate in candidates:
                try:
                    history = decode_history(candidate)
                except StateDecodeError:
                    continue
                # Whatever decodes scores and encodes again.
                score({"c": history}, [Tx("c", START_MS + 40 * DAY_MS, 1.0)])
                decode_history(encode_history(history))

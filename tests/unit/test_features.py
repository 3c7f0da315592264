"""build_features: the column contract, missing enrichment, unknown codes, the card history."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from streamer.events import CHANNELS
from streamer.features import (
    CATEGORICAL_FEATURES,
    FEATURE_ORDER,
    HISTORY_FEATURES,
    MERCHANT_CATEGORIES,
    UNKNOWN_CODE,
    build_features,
    build_features_from_columns,
)
from streamer.serde import decode_and_validate, encode_transaction
from streamer.state.card import MAX_REMEMBERED, CardHistory
from streamer.synthetic import SyntheticWorld

# 2026-01-01 03:30:00 UTC
NIGHT_MS = 1_767_238_200_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
RECORD_COLUMNS = 8
"""The columns made from the record alone; the history columns follow."""


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "transaction_id": "tx-1",
        "event_time": NIGHT_MS,
        "card_id": "card-000001",
        "merchant_id": "merch-00001",
        "merchant_category": "electronics",
        "amount": 199.0,
        "currency": "EUR",
        "country": "FR",
        "channel": "ecommerce",
        "card_present": False,
        "card_country": "DE",
        "card_avg_amount": 50.0,
    }
    return record | changes


def _column(matrix: np.ndarray, name: str) -> np.ndarray:
    return matrix[:, FEATURE_ORDER.index(name)]


def _row(**changes: Any) -> dict[str, float]:
    """The record columns of one record on its own."""
    matrix = build_features([_record(**changes)])
    return dict(
        zip(FEATURE_ORDER[:RECORD_COLUMNS], matrix[0, :RECORD_COLUMNS].tolist(), strict=True)
    )


def _last_history_row(*records: dict[str, Any]) -> dict[str, float]:
    """The history columns of the last record, after the ones before it on the same card."""
    matrix = build_features(list(records))
    return dict(zip(HISTORY_FEATURES, matrix[-1, RECORD_COLUMNS:].tolist(), strict=True))


def _at(ms: int, **changes: Any) -> dict[str, Any]:
    return _record(event_time=ms, **changes)


class TestShape:
    def test_one_row_per_record_one_column_per_feature(self) -> None:
        """The matrix is float64 with shape (records, len(FEATURE_ORDER))."""
        matrix = build_features([_record(), _record(), _record()])

        assert matrix.dtype == np.float64
        assert matrix.shape == (3, len(FEATURE_ORDER))

    def test_empty_batch_gives_empty_matrix(self) -> None:
        """No records give a (0, n) matrix, not an error."""
        assert build_features([]).shape == (0, len(FEATURE_ORDER))

    def test_rows_follow_record_order(self) -> None:
        """Row i describes record i."""
        matrix = build_features([_record(amount=1.0), _record(amount=1000.0)])

        assert _column(matrix, "log_amount").tolist() == [math.log1p(1.0), math.log1p(1000.0)]


class TestColumns:
    def test_values_follow_feature_order(self) -> None:
        """A known record gives the documented value in each named column."""
        assert _row() == {
            "log_amount": math.log1p(199.0),
            "amount_to_card_avg": 199.0 / 50.0,
            "is_foreign": 1.0,
            "card_present": 0.0,
            "channel": float(CHANNELS.index("ecommerce")),
            "merchant_category": float(MERCHANT_CATEGORIES.index("electronics")),
            "hour_of_day": 3.0,
            "is_night": 1.0,
        }

    def test_domestic_is_not_foreign(self) -> None:
        """country == card_country gives is_foreign 0."""
        assert _row(country="DE")["is_foreign"] == 0.0

    def test_card_present_is_one(self) -> None:
        """card_present True gives 1."""
        assert _row(channel="pos", card_present=True)["card_present"] == 1.0

    def test_afternoon_is_not_night(self) -> None:
        """12 hours after 03:30 is hour 15, not night."""
        row = _row(event_time=NIGHT_MS + 12 * HOUR_MS)

        assert (row["hour_of_day"], row["is_night"]) == (15.0, 0.0)

    def test_six_oclock_is_no_longer_night(self) -> None:
        """Night ends at 06:00 UTC."""
        assert _row(event_time=NIGHT_MS + 3 * HOUR_MS)["is_night"] == 0.0

    def test_every_known_category_gets_its_index(self) -> None:
        """Each category in MERCHANT_CATEGORIES is coded by its position."""
        matrix = build_features([_record(merchant_category=c) for c in MERCHANT_CATEGORIES])

        assert _column(matrix, "merchant_category").tolist() == list(
            range(len(MERCHANT_CATEGORIES))
        )

    def test_every_channel_gets_its_index(self) -> None:
        """Each channel in events.CHANNELS is coded by its position."""
        matrix = build_features([_record(channel=c) for c in CHANNELS])

        assert _column(matrix, "channel").tolist() == list(range(len(CHANNELS)))


class TestMissingAndUnknown:
    def test_unknown_card_average_gives_nan_ratio(self) -> None:
        """card_avg_amount None makes amount_to_card_avg NaN and leaves the rest finite."""
        row = _row(card_avg_amount=None)

        assert math.isnan(row.pop("amount_to_card_avg"))
        assert all(math.isfinite(value) for value in row.values())

    def test_unknown_card_country_gives_nan_foreign(self) -> None:
        """card_country None makes is_foreign NaN."""
        assert math.isnan(_row(card_country=None)["is_foreign"])

    def test_unknown_category_is_missing(self) -> None:
        """A category the model never saw is a missing value (NaN), not an error or a rank."""
        assert math.isnan(UNKNOWN_CODE)
        assert math.isnan(_row(merchant_category="space_tourism")["merchant_category"])

    def test_unknown_channel_is_missing(self) -> None:
        """A channel outside CHANNELS (validation rejects those upstream) is NaN too."""
        columns = {name: [value] for name, value in _record(channel="telepathy").items()}
        matrix = build_features_from_columns(columns, {})

        assert math.isnan(matrix[0, FEATURE_ORDER.index("channel")])

    def test_synthetic_records_are_nan_only_where_documented(self) -> None:
        """On synthetic data, NaN appears only where enrichment or history can be missing."""
        matrix = build_features([i.record for i in SyntheticWorld(3).generate(5_000)])
        nan_columns = {FEATURE_ORDER[j] for j in np.flatnonzero(np.isnan(matrix).any(axis=0))}

        assert nan_columns == {
            "amount_to_card_avg",
            "is_foreign",
            "card_amount_mean_1h",
            "card_amount_mean_24h",
            "card_amount_mean_7d",
            "amount_to_card_mean_30d",
            "seconds_since_previous",
        }


class TestContract:
    def test_feature_names_are_unique(self) -> None:
        """No column name repeats."""
        assert len(set(FEATURE_ORDER)) == len(FEATURE_ORDER)

    def test_history_columns_follow_the_record_columns(self) -> None:
        """FEATURE_ORDER is the record columns, then state.card's history columns in order."""
        assert FEATURE_ORDER[RECORD_COLUMNS:] == HISTORY_FEATURES
        assert FEATURE_ORDER[RECORD_COLUMNS - 1] == "is_night"

    def test_categorical_features_are_columns(self) -> None:
        """CATEGORICAL_FEATURES names columns of FEATURE_ORDER."""
        assert set(CATEGORICAL_FEATURES) <= set(FEATURE_ORDER)

    @pytest.mark.parametrize("name", ["channel", "merchant_category"])
    def test_codes_are_categorical(self, name: str) -> None:
        """The code columns are declared categorical, which the model card records."""
        assert name in CATEGORICAL_FEATURES

    def test_synthetic_world_uses_only_known_categories(self) -> None:
        """The training data never produces an unknown category: every code indexes the list."""
        matrix = build_features([i.record for i in SyntheticWorld(3).generate(5_000)])
        codes = _column(matrix, "merchant_category")

        assert set(codes.tolist()) <= set(map(float, range(len(MERCHANT_CATEGORIES))))


def row_by_row(records: list[dict[str, Any]]) -> np.ndarray:
    """The record columns as the first, record-at-a-time builder made them: the columnar oracle."""
    rows = []
    for r in records:
        amount, average, country = r["amount"], r["card_avg_amount"], r["card_country"]
        hour = r["event_time"] // HOUR_MS % 24
        rows.append(
            (
                amount,
                math.nan if average is None else average,
                math.nan if country is None else float(r["country"] != country),
                float(r["card_present"]),
                float(CHANNELS.index(r["channel"])) if r["channel"] in CHANNELS
                else UNKNOWN_CODE,
                float(MERCHANT_CATEGORIES.index(r["merchant_category"]))
                if r["merchant_category"] in MERCHANT_CATEGORIES else UNKNOWN_CODE,
                hour,
            )
        )  # fmt: skip
    raw = np.array(rows, dtype=np.float64).reshape(len(rows), 7)
    out = np.empty((len(rows), RECORD_COLUMNS))
    out[:, 0] = np.log1p(raw[:, 0])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out[:, 1] = raw[:, 0] / raw[:, 1]
    out[:, 2:7] = raw[:, 2:7]
    out[:, 7] = raw[:, 6] < 6
    return out


def edge_records() -> list[dict[str, Any]]:
    """Records at the edges: no enrichment, unknown codes, extreme amounts and times."""
    return [
        _record(card_avg_amount=None),
        _record(card_country=None),
        _record(card_country=None, card_avg_amount=None),
        _record(merchant_category="space_tourism"),
        _record(channel="telepathy"),
        _record(amount=0.0, event_time=0),
        _record(amount=-0.0),
        _record(amount=10_000_000.0, card_avg_amount=5e-324),
        _record(amount=5e-324, card_avg_amount=1.7976931348623157e308),
        _record(event_time=2**63 - 1),
        _record(event_time=NIGHT_MS + 2 * HOUR_MS + HOUR_MS - 1),
    ]


class TestFromColumns:
    def test_same_matrix_as_row_by_row_on_synthetic_batches(self) -> None:
        """Batches sharing histories match the oracle and training's one pass, bit for bit."""
        records = [i.record for i in SyntheticWorld(9).generate(3_000)]
        whole = build_features(records)
        histories: dict[str, CardHistory] = {}
        for start in range(0, len(records), 500):
            chunk = records[start : start + 500]
            batch = decode_and_validate(
                [encode_transaction(r) for r in chunk],
                [r["card_id"].encode() for r in chunk],
                65_536,
            )
            matrix = build_features_from_columns(batch.columns, histories)
            assert matrix[:, :RECORD_COLUMNS].tobytes() == row_by_row(chunk).tobytes()
            assert matrix.tobytes() == whole[start : start + 500].tobytes()

    def test_same_matrix_on_edge_records(self) -> None:
        """Missing enrichment, unknown codes and extreme values agree bit for bit too."""
        records = edge_records()
        columns = {name: [r[name] for r in records] for name in records[0]}
        from_columns = build_features_from_columns(columns, {})
        from_records = build_features(records)
        assert from_columns[:, :RECORD_COLUMNS].tobytes() == row_by_row(records).tobytes()
        assert from_columns.tobytes() == from_records.tobytes()

    def test_empty_columns_give_empty_matrix(self) -> None:
        """No values give a (0, n) matrix."""
        columns: dict[str, list[Any]] = {name: [] for name in _record()}
        assert build_features_from_columns(columns, {}).shape == (0, len(FEATURE_ORDER))


class TestPointInTime:
    def test_first_transaction_of_a_card(self) -> None:
        """A card's first record has no history: zero counts, NaN means and gaps, all new."""
        assert _last_history_row(_record()) == pytest.approx(
            {
                "card_count_1h": 0.0,
                "card_amount_sum_1h": 0.0,
                "card_amount_mean_1h": math.nan,
                "card_count_24h": 0.0,
                "card_amount_sum_24h": 0.0,
                "card_amount_mean_24h": math.nan,
                "card_count_7d": 0.0,
                "card_amount_sum_7d": 0.0,
                "card_amount_mean_7d": math.nan,
                "amount_to_card_mean_30d": math.nan,
                "seconds_since_previous": math.nan,
                "card_merchants_24h": 0.0,
                "card_merchants_7d": 0.0,
                "card_countries_24h": 0.0,
                "card_countries_7d": 0.0,
                "is_new_merchant": 1.0,
                "is_new_country": 1.0,
            },
            nan_ok=True,
        )

    def test_a_record_never_sees_itself_or_later_ones(self) -> None:
        """Row i describes the records before i only."""
        matrix = build_features([_at(NIGHT_MS + i * 60_000, amount=10.0 * i) for i in range(4)])
        counts = matrix[:, FEATURE_ORDER.index("card_count_1h")]
        sums = matrix[:, FEATURE_ORDER.index("card_amount_sum_1h")]

        assert counts.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert sums.tolist() == [0.0, 0.0, 10.0, 30.0]

    def test_cards_do_not_mix(self) -> None:
        """Another card's transactions are not in this card's history."""
        other = _record(card_id="card-000002", amount=500.0)

        assert _last_history_row(other, _record())["card_count_1h"] == 0.0

    def test_each_call_starts_fresh_by_default(self) -> None:
        """build_features without histories gives the same matrix every time."""
        records = [_at(NIGHT_MS + i, amount=float(i)) for i in range(5)]

        assert build_features(records).tobytes() == build_features(records).tobytes()

    def test_histories_carry_over_between_calls(self) -> None:
        """Two calls sharing histories give the matrix of one call over both."""
        records = [i.record for i in SyntheticWorld(4).generate(1_000)]
        histories: dict[str, CardHistory] = {}
        split = np.vstack(
            [build_features(records[:400], histories), build_features(records[400:], histories)]
        )

        assert split.tobytes() == build_features(records).tobytes()
        assert set(histories) == {r["card_id"] for r in records}


class TestWindows:
    @pytest.mark.parametrize(
        ("suffix", "width"), [("1h", HOUR_MS), ("24h", DAY_MS), ("7d", 7 * DAY_MS)]
    )
    def test_a_transaction_exactly_one_window_before_is_out(self, suffix: str, width: int) -> None:
        """The window is (t - w, t]: a transaction at t - w is out, one a millisecond later in."""
        t = NIGHT_MS + 8 * DAY_MS
        edge = _last_history_row(_at(t - width, amount=40.0), _at(t))
        inside = _last_history_row(_at(t - width + 1, amount=40.0), _at(t))

        assert (edge[f"card_count_{suffix}"], edge[f"card_amount_sum_{suffix}"]) == (0.0, 0.0)
        assert math.isnan(edge[f"card_amount_mean_{suffix}"])
        assert (inside[f"card_count_{suffix}"], inside[f"card_amount_sum_{suffix}"]) == (1.0, 40.0)
        assert inside[f"card_amount_mean_{suffix}"] == 40.0

    def test_counts_sums_and_means_per_window(self) -> None:
        """Transactions 30 minutes, 5 hours and 3 days back fall in the windows that hold them."""
        t = NIGHT_MS + 8 * DAY_MS
        row = _last_history_row(
            _at(t - 3 * DAY_MS, amount=100.0),
            _at(t - 5 * HOUR_MS, amount=20.0),
            _at(t - 30 * 60_000, amount=10.0),
            _at(t),
        )

        assert row["card_count_1h"] == 1.0
        assert (row["card_amount_sum_1h"], row["card_amount_mean_1h"]) == (10.0, 10.0)
        assert row["card_count_24h"] == 2.0
        assert (row["card_amount_sum_24h"], row["card_amount_mean_24h"]) == (30.0, 15.0)
        assert row["card_count_7d"] == 3.0
        assert (row["card_amount_sum_7d"], row["card_amount_mean_7d"]) == (130.0, 130.0 / 3)

    def test_distinct_merchants_and_countries(self) -> None:
        """Distinct merchants and countries of the previous transactions, per window."""
        t = NIGHT_MS + 8 * DAY_MS
        row = _last_history_row(
            _at(t - 3 * DAY_MS, merchant_id="a", country="DE"),
            _at(t - 2 * DAY_MS, merchant_id="b", country="DE"),
            _at(t - 2 * HOUR_MS, merchant_id="a", country="FR"),
            _at(t - 1 * HOUR_MS, merchant_id="a", country="FR"),
            _at(t, merchant_id="c", country="IT"),
        )

        assert (row["card_merchants_24h"], row["card_merchants_7d"]) == (1.0, 2.0)
        assert (row["card_countries_24h"], row["card_countries_7d"]) == (1.0, 2.0)

    def test_distinct_merchants_stop_at_what_the_card_remembers(self) -> None:
        """More distinct merchants in a window than MAX_REMEMBERED count as MAX_REMEMBERED."""
        records = [_at(NIGHT_MS + i, merchant_id=f"m-{i}") for i in range(MAX_REMEMBERED + 10)]

        assert _last_history_row(*records)["card_merchants_24h"] == MAX_REMEMBERED


class TestThirtyDayMean:
    def test_ratio_to_the_mean_of_previous_transactions(self) -> None:
        """amount / the mean amount of the card's previous transactions."""
        row = _last_history_row(
            _at(NIGHT_MS, amount=10.0),
            _at(NIGHT_MS + 1, amount=30.0),
            _at(NIGHT_MS + 2, amount=60.0),
        )

        assert row["amount_to_card_mean_30d"] == 3.0

    def test_the_window_is_whole_utc_days(self) -> None:
        """The record's UTC day and the 29 before count; the day before them not, even if < 30 d."""
        midnight = NIGHT_MS - NIGHT_MS % DAY_MS
        t = midnight + 23 * HOUR_MS
        first_day_in = midnight - 29 * DAY_MS
        row = _last_history_row(
            _at(first_day_in - 60_000, amount=1000.0),  # 23:59 the day before: 29 d 23 h 1 min
            _at(first_day_in, amount=10.0),  # 00:00 of the first day in
            _at(t, amount=20.0),
        )

        assert row["amount_to_card_mean_30d"] == 2.0

    def test_zero_mean_gives_inf_and_zero_amount_nan(self) -> None:
        """A zero mean gives inf, and NaN for a zero amount, like amount_to_card_avg."""
        assert (
            _last_history_row(_at(NIGHT_MS, amount=0.0), _at(NIGHT_MS + 1, amount=5.0))[
                "amount_to_card_mean_30d"
            ]
            == math.inf
        )
        assert math.isnan(
            _last_history_row(_at(NIGHT_MS, amount=0.0), _at(NIGHT_MS + 1, amount=0.0))[
                "amount_to_card_mean_30d"
            ]
        )


class TestSecondsSincePrevious:
    def test_time_since_the_previous_transaction(self) -> None:
        """Seconds between the previous transaction and this one."""
        row = _last_history_row(_at(NIGHT_MS), _at(NIGHT_MS + 90_500))

        assert row["seconds_since_previous"] == 90.5

    def test_nothing_in_the_last_30_days_is_nan(self) -> None:
        """A previous transaction exactly 30 days back is outside; a millisecond later, inside."""
        t = NIGHT_MS + 40 * DAY_MS
        outside = _last_history_row(_at(t - 30 * DAY_MS), _at(t))
        inside = _last_history_row(_at(t - 30 * DAY_MS + 1), _at(t))

        assert math.isnan(outside["seconds_since_previous"])
        assert inside["seconds_since_previous"] == (30 * DAY_MS - 1) / 1000


class TestNewMerchantAndCountry:
    @pytest.mark.parametrize(
        ("days_ago", "new"), [(29, 0.0), (30, 1.0), (31, 1.0)], ids=["29d", "30d", "31d"]
    )
    def test_seen_within_30_days_is_not_new(self, days_ago: int, new: float) -> None:
        """A merchant or country seen in (t - 30 days, t] is known; seen before that, new."""
        t = NIGHT_MS + 40 * DAY_MS
        row = _last_history_row(
            _at(t - days_ago * DAY_MS, merchant_id="shop", country="JP"),
            _at(t - HOUR_MS, merchant_id="other", country="FR"),
            _at(t, merchant_id="shop", country="JP"),
        )

        assert (row["is_new_merchant"], row["is_new_country"]) == (new, new)

    def test_never_seen_is_new(self) -> None:
        """A merchant and country the card never used are new; the ones it used are not."""
        row = _last_history_row(_at(NIGHT_MS, merchant_id="a"), _at(NIGHT_MS + 1, merchant_id="b"))
        again = _last_history_row(
            _at(NIGHT_MS, merchant_id="a"), _at(NIGHT_MS + 1, merchant_id="a")
        )

        assert (row["is_new_merchant"], row["is_new_country"]) == (1.0, 0.0)
        assert again["is_new_merchant"] == 0.0

    def test_a_forgotten_merchant_is_new_again(self) -> None:
        """Past MAX_REMEMBERED merchants, the least recently seen is forgotten: new again."""
        others = [_at(NIGHT_MS + 1 + i, merchant_id=f"m-{i}") for i in range(MAX_REMEMBERED)]
        records = [
            _at(NIGHT_MS, merchant_id="first"),
            *others,
            _at(NIGHT_MS + DAY_MS, merchant_id="first"),
        ]

        assert _last_history_row(*records)["is_new_merchant"] == 1.0
        assert _last_history_row(*records[1:-1], others[0])["is_new_merchant"] == 0.0


class TestOutOfOrder:
    def test_late_record_is_placed_at_the_cards_latest_time(self) -> None:
        """A record earlier than the card's latest is scored as though it happened then."""
        t = NIGHT_MS + 8 * DAY_MS
        late = _at(t - 2 * HOUR_MS, amount=7.0)
        row = _last_history_row(_at(t - 3 * HOUR_MS, amount=1.0), _at(t, amount=2.0), late)

        assert row["seconds_since_previous"] == 0.0
        # Both previous transactions are within 24 hours of t, only one within an hour of it.
        assert (row["card_count_1h"], row["card_count_24h"]) == (1.0, 2.0)

    def test_late_record_is_applied_at_the_cards_latest_time(self) -> None:
        """The next record sees the late one at the card's latest time, not at its own."""
        t = NIGHT_MS + 8 * DAY_MS
        row = _last_history_row(
            _at(t, amount=2.0), _at(t - 5 * HOUR_MS, amount=7.0), _at(t + 90 * 60_000, amount=1.0)
        )

        assert (row["card_count_1h"], row["card_amount_sum_1h"]) == (0.0, 0.0)
        assert (row["card_count_24h"], row["card_amount_sum_24h"]) == (2.0, 9.0)
        assert row["seconds_since_previous"] == 90 * 60.0

    def test_record_columns_keep_the_records_own_time(self) -> None:
        """hour_of_day comes from the record's event_time, even when it arrives late."""
        matrix = build_features([_at(NIGHT_MS + 12 * HOUR_MS), _at(NIGHT_MS)])

        assert matrix[1, FEATURE_ORDER.index("hour_of_day")] == 3.0

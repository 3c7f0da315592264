"""build_features: the column contract, missing enrichment, unknown codes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from streamer.events import CHANNELS
from streamer.features import (
    CATEGORICAL_FEATURES,
    FEATURE_ORDER,
    MERCHANT_CATEGORIES,
    UNKNOWN_CODE,
    build_features,
    build_features_from_columns,
)
from streamer.serde import decode_and_validate, encode_transaction
from streamer.synthetic import SyntheticWorld

# 2026-01-01 03:30:00 UTC
NIGHT_MS = 1_767_238_200_000
HOUR_MS = 3_600_000


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
    matrix = build_features([_record(**changes)])
    return dict(zip(FEATURE_ORDER, matrix[0].tolist(), strict=True))


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

        assert math.isnan(build_features_from_columns(columns)[0, FEATURE_ORDER.index("channel")])

    def test_synthetic_records_are_nan_only_where_enrichment_is_missing(self) -> None:
        """On synthetic data, NaN appears only in the two enrichment-derived columns."""
        matrix = build_features([i.record for i in SyntheticWorld(3).generate(5_000)])
        nan_columns = {FEATURE_ORDER[j] for j in np.flatnonzero(np.isnan(matrix).any(axis=0))}

        assert nan_columns == {"amount_to_card_avg", "is_foreign"}


class TestContract:
    def test_feature_names_are_unique(self) -> None:
        """No column name repeats."""
        assert len(set(FEATURE_ORDER)) == len(FEATURE_ORDER)

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
    """The matrix as the first, record-at-a-time builder made it: the oracle of the columnar one."""
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
    out = np.empty((len(rows), len(FEATURE_ORDER)))
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
        """Decoded batches give, bit for bit, the matrix of the record-at-a-time builder."""
        records = [i.record for i in SyntheticWorld(9).generate(3_000)]
        for start in range(0, len(records), 500):
            chunk = records[start : start + 500]
            batch = decode_and_validate(
                [encode_transaction(r) for r in chunk],
                [r["card_id"].encode() for r in chunk],
                65_536,
            )
            expected = row_by_row(chunk).tobytes()
            assert build_features_from_columns(batch.columns).tobytes() == expected
            assert build_features(chunk).tobytes() == expected

    def test_same_matrix_on_edge_records(self) -> None:
        """Missing enrichment, unknown codes and extreme values agree bit for bit too."""
        records = edge_records()
        columns = {name: [r[name] for r in records] for name in records[0]}
        expected = row_by_row(records).tobytes()
        assert build_features_from_columns(columns).tobytes() == expected
        assert build_features(records).tobytes() == expected

    def test_empty_columns_give_empty_matrix(self) -> None:
        """No values give a (0, n) matrix."""
        columns: dict[str, list[Any]] = {name: [] for name in _record()}
        assert build_features_from_columns(columns).shape == (0, len(FEATURE_ORDER))

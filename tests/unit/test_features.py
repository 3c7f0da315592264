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
    UNKNOWN_CATEGORY_CODE,
    build_features,
)
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

    def test_unknown_category_gets_unknown_code(self) -> None:
        """A category the model never saw is coded UNKNOWN_CATEGORY_CODE, not an error."""
        assert _row(merchant_category="space_tourism")["merchant_category"] == UNKNOWN_CATEGORY_CODE

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
        """The code columns are declared categorical, so trees do not treat codes as amounts."""
        assert name in CATEGORICAL_FEATURES

    def test_synthetic_world_uses_only_known_categories(self) -> None:
        """The training data never produces the unknown category code."""
        matrix = build_features([i.record for i in SyntheticWorld(3).generate(5_000)])

        assert _column(matrix, "merchant_category").max() < UNKNOWN_CATEGORY_CODE

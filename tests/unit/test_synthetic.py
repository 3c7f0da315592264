"""The synthetic world: deterministic, schema-valid, with learnable but noisy fraud."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streamer.events import CHANNELS, validate_transaction
from streamer.synthetic import LabelledTransaction, SyntheticWorld

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "transaction.avsc"
RISKY_CATEGORIES = {"electronics", "jewelry", "gift_cards", "digital_goods", "crypto_exchange"}


@pytest.fixture(scope="module")
def stream() -> list[LabelledTransaction]:
    """100,000 labelled transactions from seed 7: about a day of activity."""
    return list(SyntheticWorld(7).generate(100_000))


def _records(items: list[LabelledTransaction]) -> list[tuple[object, ...]]:
    return [(*item.record.values(), item.is_fraud) for item in items]


def _legit_and_fraud(
    items: list[LabelledTransaction],
) -> tuple[list[LabelledTransaction], list[LabelledTransaction]]:
    return [i for i in items if not i.is_fraud], [i for i in items if i.is_fraud]


def _hour(item: LabelledTransaction) -> int:
    hour: int = item.record["event_time"] // 3_600_000 % 24
    return hour


class TestDeterminism:
    def test_same_seed_gives_same_stream(self) -> None:
        """Two worlds with one seed yield identical records and labels."""
        first = _records(list(SyntheticWorld(11).generate(5_000)))
        second = _records(list(SyntheticWorld(11).generate(5_000)))

        assert first == second

    def test_other_seed_gives_other_stream(self) -> None:
        """A different seed yields different records."""
        first = [i.record["transaction_id"] for i in SyntheticWorld(11).generate(100)]
        second = [i.record["transaction_id"] for i in SyntheticWorld(12).generate(100)]

        assert set(first).isdisjoint(second)

    def test_successive_calls_continue_the_stream(self) -> None:
        """A second generate call moves time on and brings new transaction ids."""
        world = SyntheticWorld(11)
        first = list(world.generate(3_000))
        second = list(world.generate(3_000))

        assert second[0].record["event_time"] >= first[-1].record["event_time"]
        assert {i.record["transaction_id"] for i in first}.isdisjoint(
            i.record["transaction_id"] for i in second
        )

    def test_generates_lazily(self) -> None:
        """Taking a few items from a huge request returns at once without building it all."""
        items = SyntheticWorld(11).generate(10**9)

        assert next(items).record["transaction_id"]


class TestRecords:
    def test_records_pass_domain_validation(self, stream: list[LabelledTransaction]) -> None:
        """Every record validates as a Transaction keyed by its card id."""
        for item in stream[:5_000]:
            validate_transaction(item.record, item.record["card_id"].encode())

    def test_records_carry_every_schema_field(self, stream: list[LabelledTransaction]) -> None:
        """Record keys are exactly the fields of schemas/transaction.avsc."""
        fields = {field["name"] for field in json.loads(SCHEMA_PATH.read_text())["fields"]}

        assert {frozenset(item.record) for item in stream} == {frozenset(fields)}

    def test_event_times_never_go_back(self, stream: list[LabelledTransaction]) -> None:
        """Event times are non-decreasing integers (ms UTC)."""
        times = np.array([item.record["event_time"] for item in stream])

        assert (np.diff(times) >= 0).all()

    def test_about_a_day_per_hundred_thousand(self, stream: list[LabelledTransaction]) -> None:
        """100,000 events span roughly one day."""
        span_hours = (stream[-1].record["event_time"] - stream[0].record["event_time"]) / 3.6e6

        assert 20 < span_hours < 28

    def test_transaction_ids_are_unique(self, stream: list[LabelledTransaction]) -> None:
        """No transaction id repeats."""
        ids = [item.record["transaction_id"] for item in stream]

        assert len(set(ids)) == len(ids)

    def test_card_present_follows_channel(self, stream: list[LabelledTransaction]) -> None:
        """card_present is true for pos and atm, false for ecommerce and moto."""
        pairs = {(item.record["channel"], item.record["card_present"]) for item in stream}

        assert pairs == {("pos", True), ("atm", True), ("ecommerce", False), ("moto", False)}

    def test_every_channel_occurs(self, stream: list[LabelledTransaction]) -> None:
        """All of events.CHANNELS appear."""
        assert {item.record["channel"] for item in stream} == set(CHANNELS)

    def test_some_enrichment_is_unknown(self, stream: list[LabelledTransaction]) -> None:
        """A few percent of records lack card_country or card_avg_amount."""
        no_country = np.mean([item.record["card_country"] is None for item in stream])
        no_average = np.mean([item.record["card_avg_amount"] is None for item in stream])

        assert 0.02 < no_country < 0.08
        assert 0.03 < no_average < 0.10

    def test_currency_mostly_matches_country(self, stream: list[LabelledTransaction]) -> None:
        """Most records are in the currency of the country they happen in."""
        currency_of = {"US": "USD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "CA": "CAD"}
        matched = [
            item.record["currency"] == currency_of[item.record["country"]]
            for item in stream
            if item.record["country"] in currency_of
        ]

        assert np.mean(matched) > 0.9

    def test_legit_spend_is_mostly_domestic(self, stream: list[LabelledTransaction]) -> None:
        """Legitimate transactions mostly happen in the card's home country."""
        legit, _ = _legit_and_fraud(stream)
        known = [i.record for i in legit if i.record["card_country"] is not None]
        domestic = np.mean([r["country"] == r["card_country"] for r in known])

        assert domestic > 0.9

    def test_night_is_quieter_than_afternoon(self, stream: list[LabelledTransaction]) -> None:
        """Hour-of-day follows a diurnal curve: 03:00 sees far fewer events than 15:00."""
        hours = Counter(_hour(item) for item in stream)

        assert hours[3] * 4 < hours[15]


class TestFraud:
    def test_fraud_rate_in_band(self, stream: list[LabelledTransaction]) -> None:
        """Between 1% and 2% of transactions are fraud."""
        rate = np.mean([item.is_fraud for item in stream])

        assert 0.01 <= rate <= 0.02

    def test_fraud_spends_several_times_the_usual(self, stream: list[LabelledTransaction]) -> None:
        """The median amount / card average is at least twice as high for fraud."""

        def median_ratio(items: list[LabelledTransaction]) -> float:
            ratios = [
                i.record["amount"] / i.record["card_avg_amount"]
                for i in items
                if i.record["card_avg_amount"] is not None
            ]
            return float(np.median(ratios))

        legit, fraud = _legit_and_fraud(stream)

        assert median_ratio(fraud) > 2 * median_ratio(legit)

    def test_fraud_is_more_often_abroad(self, stream: list[LabelledTransaction]) -> None:
        """Fraud happens outside the card's country far more often, but legit also travels."""

        def foreign_share(items: list[LabelledTransaction]) -> float:
            known = [i.record for i in items if i.record["card_country"] is not None]
            return float(np.mean([r["country"] != r["card_country"] for r in known]))

        legit, fraud = _legit_and_fraud(stream)

        assert foreign_share(fraud) > 4 * foreign_share(legit)
        assert foreign_share(legit) > 0.01

    def test_fraud_is_more_often_card_not_present(self, stream: list[LabelledTransaction]) -> None:
        """Most fraud is card-not-present; most legitimate spend is not."""
        legit, fraud = _legit_and_fraud(stream)

        assert np.mean([not i.record["card_present"] for i in fraud]) > 0.6
        assert np.mean([not i.record["card_present"] for i in legit]) < 0.4

    def test_fraud_favours_night(self, stream: list[LabelledTransaction]) -> None:
        """A larger share of fraud than of legitimate spend happens before 06:00 UTC."""
        legit, fraud = _legit_and_fraud(stream)

        assert np.mean([_hour(i) < 6 for i in fraud]) > 2 * np.mean([_hour(i) < 6 for i in legit])

    def test_fraud_favours_risky_merchants(self, stream: list[LabelledTransaction]) -> None:
        """Risky categories take a much larger share of fraud than of legitimate spend."""

        def risky_share(items: list[LabelledTransaction]) -> float:
            return float(
                np.mean([i.record["merchant_category"] in RISKY_CATEGORIES for i in items])
            )

        legit, fraud = _legit_and_fraud(stream)

        assert risky_share(fraud) > 3 * risky_share(legit)

    def test_fraud_comes_in_bursts(self, stream: list[LabelledTransaction]) -> None:
        """Many compromised cards are used more than once."""
        _, fraud = _legit_and_fraud(stream)
        uses = Counter(i.record["card_id"] for i in fraud)

        assert sum(1 for n in uses.values() if n > 1) > 0.3 * len(uses)


class TestArguments:
    def test_zero_count_yields_nothing(self) -> None:
        """generate(0) is empty."""
        assert list(SyntheticWorld(1).generate(0)) == []

    def test_negative_count_is_refused(self) -> None:
        """A negative count raises ValueError."""
        with pytest.raises(ValueError, match="count"):
            list(SyntheticWorld(1).generate(-1))

    def test_too_few_merchants_is_refused(self) -> None:
        """Fewer merchants than (country, category) pairs raises ValueError."""
        with pytest.raises(ValueError, match="n_merchants"):
            SyntheticWorld(1, n_merchants=10)

    def test_small_world_uses_its_cards(self) -> None:
        """n_cards bounds the card ids used."""
        cards = {i.record["card_id"] for i in SyntheticWorld(1, n_cards=5).generate(2_000)}

        assert cards <= {f"card-{n:06d}" for n in range(5)}

"""The synthetic world: deterministic, schema-valid, with learnable but noisy fraud."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamer.events import CHANNELS, validate_transaction
from streamer.synthetic import (
    DEFAULT_EVENTS_PER_DAY,
    EVENTS_PER_CARD_PER_DAY,
    LabelledTransaction,
    SyntheticWorld,
)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "transaction.avsc"
RISKY_CATEGORIES = {"electronics", "jewelry", "gift_cards", "digital_goods", "crypto_exchange"}
STREAM_SIZE = 100_000
MINUTE_MS = 60_000
TINY = 3.0  # card-testing probes are below this amount
LARGE = 30.0  # ten times the largest probe


@pytest.fixture(scope="module")
def stream() -> list[LabelledTransaction]:
    """100,000 labelled transactions from seed 7 in the default world: about four days."""
    return list(SyntheticWorld(7).generate(STREAM_SIZE))


@dataclass(frozen=True)
class Seen:
    """One transaction and what its card had done before it in the stream."""

    item: LabelledTransaction
    previous_uses: int
    new_merchant: bool
    new_country: bool
    since_previous_ms: int | None
    previous_was_fraud: bool


@pytest.fixture(scope="module")
def seen(stream: list[LabelledTransaction]) -> list[Seen]:
    """The stream with each transaction's card history, as the scorer's state would hold it."""
    merchants: defaultdict[str, set[str]] = defaultdict(set)
    countries: defaultdict[str, set[str]] = defaultdict(set)
    previous: dict[str, tuple[int, bool]] = {}
    out = []
    for item in stream:
        record = item.record
        card = record["card_id"]
        last = previous.get(card)
        out.append(
            Seen(
                item,
                len(merchants[card]),
                record["merchant_id"] not in merchants[card],
                record["country"] not in countries[card],
                None if last is None else record["event_time"] - last[0],
                last is not None and last[1],
            )
        )
        merchants[card].add(record["merchant_id"])
        countries[card].add(record["country"])
        previous[card] = (record["event_time"], item.is_fraud)
    return out


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

    def test_default_world_runs_at_its_daily_rate(self, stream: list[LabelledTransaction]) -> None:
        """100,000 events of the default world span 100,000 / DEFAULT_EVENTS_PER_DAY days."""
        span_days = (stream[-1].record["event_time"] - stream[0].record["event_time"]) / 86.4e6

        assert span_days == pytest.approx(STREAM_SIZE / DEFAULT_EVENTS_PER_DAY, rel=0.05)

    def test_events_per_day_sets_the_pace(self) -> None:
        """A world of 2,000 events a day spans about three days with 6,000 events."""
        items = list(SyntheticWorld(3, events_per_day=2_000).generate(6_000))
        span_days = (items[-1].record["event_time"] - items[0].record["event_time"]) / 86.4e6

        assert span_days == pytest.approx(3.0, rel=0.05)

    def test_cards_follow_from_events_per_day(self) -> None:
        """Unless given, the number of cards is events_per_day / EVENTS_PER_CARD_PER_DAY."""
        world = SyntheticWorld(3, events_per_day=3_000)

        assert world.n_cards == round(3_000 / EVENTS_PER_CARD_PER_DAY)

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


class TestHabits:
    def test_cards_have_a_history(self, seen: list[Seen]) -> None:
        """Most transactions come from a card already seen in the stream."""
        assert np.mean([s.previous_uses > 0 for s in seen]) > 0.8

    def test_cards_are_used_a_few_times_a_day(self, stream: list[LabelledTransaction]) -> None:
        """The median card is used between 0.5 and 3 times a day."""
        span_days = (stream[-1].record["event_time"] - stream[0].record["event_time"]) / 86.4e6
        uses = Counter(item.record["card_id"] for item in stream)

        assert 0.5 < np.median(list(uses.values())) / span_days < 3.0

    def test_legit_spend_mostly_returns_to_known_merchants(self, seen: list[Seen]) -> None:
        """With some history, legit spend is mostly at merchants the card used, not always."""
        new = np.mean([s.new_merchant for s in seen if not s.item.is_fraud and s.previous_uses > 2])

        assert 0.1 < new < 0.5

    def test_legit_spend_now_and_then_in_a_new_country(self, seen: list[Seen]) -> None:
        """With some history, a few legit uses are in a country the card never used (travel)."""
        new = np.mean([s.new_country for s in seen if not s.item.is_fraud and s.previous_uses > 2])

        assert 0.005 < new < 0.05

    def test_trips_return_to_the_same_country(self, seen: list[Seen]) -> None:
        """Legit spend abroad is often in a country the card used before: trips last days."""
        abroad = [
            s.new_country
            for s in seen
            if not s.item.is_fraud
            and s.previous_uses > 0
            and s.item.record["card_country"] not in (None, s.item.record["country"])
        ]

        assert 0.2 < np.mean(abroad) < 0.7

    def test_some_legit_uses_come_minutes_apart(self, seen: list[Seen]) -> None:
        """A few legit uses follow the card's previous one within 10 minutes (noise for bursts)."""
        quick = [
            s.since_previous_ms < 10 * MINUTE_MS
            for s in seen
            if not s.item.is_fraud and s.since_previous_ms is not None
        ]

        assert 0.02 < np.mean(quick) < 0.15


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

    def test_compromised_cards_are_used_minutes_apart(self, seen: list[Seen]) -> None:
        """A fraud following a fraud on its card comes a few minutes later, rarely so for legit."""
        gaps = [
            s.since_previous_ms
            for s in seen
            if s.item.is_fraud and s.previous_was_fraud and s.since_previous_ms is not None
        ]
        legit_quick = np.mean(
            [
                s.since_previous_ms < 10 * MINUTE_MS
                for s in seen
                if not s.item.is_fraud and s.since_previous_ms is not None
            ]
        )

        assert np.median(gaps) < 5 * MINUTE_MS
        assert np.mean(np.array(gaps) < 10 * MINUTE_MS) > 5 * legit_quick

    def test_fraud_starts_at_a_new_merchant(self, seen: list[Seen]) -> None:
        """An incident's first fraud is at a merchant its card never used."""
        first = [
            s.new_merchant
            for s in seen
            if s.item.is_fraud and s.previous_uses > 0 and not s.previous_was_fraud
        ]

        assert len(first) > 200
        assert np.mean(first) > 0.95

    def test_fraud_abroad_starts_in_a_new_country(self, seen: list[Seen]) -> None:
        """An incident abroad starts in a country its card never used; legit abroad often did."""

        def new_country_share(fraud: bool) -> float:
            return float(
                np.mean(
                    [
                        s.new_country
                        for s in seen
                        if s.item.is_fraud == fraud
                        and not s.previous_was_fraud
                        and s.previous_uses > 0
                        and s.item.record["card_country"] not in (None, s.item.record["country"])
                    ]
                )
            )

        assert new_country_share(fraud=True) > 0.9
        assert new_country_share(fraud=True) > 1.5 * new_country_share(fraud=False)

    def test_card_testing_probes_then_buys_big(self, stream: list[LabelledTransaction]) -> None:
        """Runs of 2-6 tiny frauds at one merchant, minutes apart, end in a large fraud."""
        frauds: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for item in stream:
            if item.is_fraud:
                frauds[item.record["card_id"]].append(item.record)
        runs: list[tuple[list[dict[str, Any]], dict[str, Any] | None]] = []
        for records in frauds.values():
            run: list[dict[str, Any]] = []
            for record in [*records, None]:
                if record is not None and record["amount"] < TINY:
                    run.append(record)
                    continue
                if len(run) >= 2:
                    runs.append((run, record))
                run = []

        def probed_and_bought(run: list[dict[str, Any]], after: dict[str, Any] | None) -> bool:
            times = [r["event_time"] for r in run]
            return (
                2 <= len(run) <= 6
                and len({r["merchant_id"] for r in run}) == 1
                and max(np.diff(times)) < 10 * MINUTE_MS
                and after is not None
                and after["amount"] >= LARGE
                and after["event_time"] - times[-1] < 30 * MINUTE_MS
            )

        assert len(runs) > 20
        assert np.mean([probed_and_bought(run, after) for run, after in runs]) > 0.9

    def test_tiny_amounts_are_no_rule(self, stream: list[LabelledTransaction]) -> None:
        """Legit spend has tiny amounts too, so a tiny amount alone does not mean fraud."""
        legit, fraud = _legit_and_fraud(stream)

        assert sum(i.record["amount"] < TINY for i in legit) > sum(
            i.record["amount"] < TINY for i in fraud
        )


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


def test_a_card_prefix_gives_a_world_cards_of_its_own() -> None:
    """Feeding one stateful scorer two worlds: with their own prefixes no card id is shared, and
    the prefix changes nothing else."""
    plain = [e.record for e in SyntheticWorld(3).generate(2_000)]
    own = [e.record for e in SyntheticWorld(3, card_prefix="card-3-").generate(2_000)]
    assert all(r["card_id"].startswith("card-3-") for r in own)
    assert not {r["card_id"] for r in own} & {r["card_id"] for r in plain}
    for a, b in zip(plain, own, strict=True):
        assert {**a, "card_id": b["card_id"]} == b

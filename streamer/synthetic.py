"""The seeded transaction world: labelled card transactions for training and for `streamer produce`.

A `SyntheticWorld` holds a fixed population of cards and merchants drawn from its seed, and
generates a stream of transactions over it. Legitimate spend follows each card's habits (home
country, typical amount, a diurnal clock); fraud is mixed in as bursts on compromised cards,
with amounts several times the card's usual, more often abroad, card-not-present, at night and
at risky merchants. Every signal is noisy on purpose (travellers abroad, big legitimate
purchases, small card-testing fraud) so a model learns something realistic, not a rule.

Simplifications worth knowing: amounts are not converted between currencies (the world only uses
currencies of similar magnitude), and the diurnal clock is UTC for every country.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from streamer.events import CHANNELS
from streamer.features import MERCHANT_CATEGORIES


@dataclass(frozen=True, slots=True)
class LabelledTransaction:
    """One transaction record (every field of `schemas/transaction.avsc`) and its fraud label."""

    record: dict[str, Any]
    is_fraud: bool


# (country, currency, share of cards and merchants). Currencies of similar magnitude only, since
# amounts are not converted.
_COUNTRY_TABLE: Final = (
    ("US", "USD", 0.30),
    ("DE", "EUR", 0.13),
    ("GB", "GBP", 0.12),
    ("FR", "EUR", 0.09),
    ("ES", "EUR", 0.06),
    ("IT", "EUR", 0.06),
    ("NL", "EUR", 0.05),
    ("CA", "CAD", 0.05),
    ("AU", "AUD", 0.04),
    ("IE", "EUR", 0.025),
    ("CH", "CHF", 0.02),
    ("BE", "EUR", 0.02),
    ("SG", "SGD", 0.02),
    ("NZ", "NZD", 0.015),
)

# category: (legit share, fraud share, log amount shift, channel probabilities in CHANNELS order).
# The fraud share over the legit share is the category's base risk.
_CATEGORY_TABLE: Final[dict[str, tuple[float, float, float, tuple[float, float, float, float]]]] = {
    "grocery": (0.21, 0.03, 0.0, (0.93, 0.07, 0.0, 0.0)),
    "restaurant": (0.15, 0.02, -0.2, (0.90, 0.08, 0.0, 0.02)),
    "fuel": (0.09, 0.03, 0.1, (0.98, 0.02, 0.0, 0.0)),
    "travel": (0.03, 0.05, 1.3, (0.25, 0.60, 0.0, 0.15)),
    "electronics": (0.045, 0.17, 1.0, (0.50, 0.48, 0.0, 0.02)),
    "jewelry": (0.01, 0.07, 1.3, (0.75, 0.22, 0.0, 0.03)),
    "gift_cards": (0.015, 0.13, 0.3, (0.40, 0.60, 0.0, 0.0)),
    "digital_goods": (0.06, 0.15, -0.8, (0.0, 1.0, 0.0, 0.0)),
    "fashion": (0.09, 0.08, 0.3, (0.60, 0.40, 0.0, 0.0)),
    "pharmacy": (0.06, 0.02, -0.5, (0.85, 0.15, 0.0, 0.0)),
    "entertainment": (0.07, 0.04, -0.3, (0.40, 0.60, 0.0, 0.0)),
    "crypto_exchange": (0.008, 0.08, 0.8, (0.0, 1.0, 0.0, 0.0)),
    "cash_withdrawal": (0.07, 0.10, 0.5, (0.0, 0.0, 1.0, 0.0)),
    "utilities": (0.05, 0.03, 0.4, (0.0, 0.75, 0.0, 0.25)),
}

# Stolen card details are mostly used card-not-present: the fraud channel mix reweights each
# category's channels by these factors (pos, ecommerce, atm, moto).
_FRAUD_CHANNEL_FACTORS: Final = (0.35, 2.5, 1.0, 2.0)

EVENTS_PER_DAY: Final = 100_000
"""Mean number of transactions per simulated day, across all cards."""

FRAUD_RATE: Final = 0.015
"""Target share of fraudulent transactions (bursts overlap a little, so slightly less)."""

CHUNK_SIZE: Final = 10_000
"""Transactions generated per vectorised step."""

_MS_PER_DAY: Final = 86_400_000
_AMOUNT_SIGMA: Final = 0.7  # spread of one card's amounts around its level (log scale)
_FOREIGN_SHARE: Final = 0.04  # legitimate transactions abroad, ordinary cards
_TRAVELLER_SHARE: Final = 0.06  # cards whose holders travel: legitimately abroad often
_TRAVELLER_FOREIGN_SHARE: Final = 0.35
_BIG_PURCHASE_SHARE: Final = 0.015  # legitimate purchases several times the card's usual
_PROFILE_MISSING_SHARE: Final = 0.04  # upstream card profile unknown: both enrichments None
_AVG_MISSING_SHARE: Final = 0.02  # new card, no history yet: only card_avg_amount None
_USD_ONLINE_SHARE: Final = 0.08  # cross-border web shops charge USD regardless of country
_FRAUD_FOREIGN_SHARE: Final = 0.6  # compromised cards used abroad (country != card_country)
_FRAUD_NIGHT_WEIGHT: Final = 4.0  # fraud incidents start this much more readily at night
_NIGHT_END_MINUTE: Final = 6 * 60  # night is 00:00 to 06:00 UTC
_FRAUD_LOG_MULTIPLIER: Final = 1.3  # fraud amounts: about e**1.3 ~ 3.7 times the usual
_CARD_TESTING_SHARE: Final = 0.12  # fraud that probes the card with tiny amounts first
_MEAN_EXTRA_BURST: Final = 1.2  # a compromised card is used 1 + Poisson(this) times
_MAX_BURST_GAP: Final = 200  # events between uses in a burst (a few minutes)


def _diurnal_intensity(hours: np.ndarray) -> np.ndarray:
    """Relative transaction rate by UTC hour: quietest around 04:00, busiest around 16:00."""
    return 0.12 + 0.88 * (0.5 - 0.5 * np.cos(2 * np.pi * (hours - 4.0) / 24.0)) ** 1.5


class SyntheticWorld:
    """A seeded population of cards and merchants, and the transaction stream over it.

    The same seed and the same sequence of `generate` calls give the same records. Not
    thread-safe: `generate` advances the world's clock and random state as it yields.
    `n_merchants` must be at least one per (country, category) pair.
    """

    def __init__(
        self,
        seed: int,
        *,
        n_cards: int = 20_000,
        n_merchants: int = 5_000,
        start_ms: int = 1_767_225_600_000,
    ) -> None:
        n_countries = len(_COUNTRY_TABLE)
        n_categories = len(MERCHANT_CATEGORIES)
        if n_cards < 1:
            raise ValueError(f"n_cards must be at least 1, got {n_cards}")
        if n_merchants < n_countries * n_categories:
            raise ValueError(
                f"n_merchants must be at least {n_countries * n_categories} (one per country and"
                f" category), got {n_merchants}"
            )
        if start_ms < 0:
            raise ValueError(f"start_ms must be >= 0, got {start_ms}")
        rng = np.random.default_rng(seed)
        self._rng = rng
        self._start_ms = start_ms
        self._position = 0.0  # expected events elapsed: the clock in "intensity" units

        self._country_codes = np.array([c for c, _, _ in _COUNTRY_TABLE], dtype=object)
        self._currency_codes = np.array([c for _, c, _ in _COUNTRY_TABLE], dtype=object)
        self._usd = self._currency_codes.tolist().index("USD")
        shares = np.array([s for _, _, s in _COUNTRY_TABLE])
        self._country_p = shares / shares.sum()

        table = [_CATEGORY_TABLE[name] for name in MERCHANT_CATEGORIES]
        self._category_names = np.array(MERCHANT_CATEGORIES, dtype=object)
        legit_p = np.array([row[0] for row in table])
        fraud_p = np.array([row[1] for row in table])
        self._legit_category_cdf = np.cumsum(legit_p / legit_p.sum())
        self._fraud_category_cdf = np.cumsum(fraud_p / fraud_p.sum())
        self._amount_shift = np.array([row[2] for row in table])
        channel_p = np.array([row[3] for row in table])
        fraud_channel_p = channel_p * np.array(_FRAUD_CHANNEL_FACTORS)
        self._legit_channel_cdf = np.cumsum(channel_p / channel_p.sum(1, keepdims=True), axis=1)
        self._fraud_channel_cdf = np.cumsum(
            fraud_channel_p / fraud_channel_p.sum(1, keepdims=True), axis=1
        )
        self._channel_names = np.array(CHANNELS, dtype=object)
        self._card_present_channels = np.array([c in ("pos", "atm") for c in CHANNELS])

        # Cards: home country, spend level, how active, whether the holder travels.
        self._card_ids = np.array([f"card-{i:06d}" for i in range(n_cards)], dtype=object)
        self._card_home = rng.choice(n_countries, size=n_cards, p=self._country_p)
        self._card_level = np.log(40.0) + 0.6 * rng.standard_normal(n_cards)
        activity = rng.lognormal(0.0, 0.8, size=n_cards)
        self._card_activity_cdf = np.cumsum(activity / activity.sum())
        is_traveller = rng.random(n_cards) < _TRAVELLER_SHARE
        self._card_foreign_p = np.where(is_traveller, _TRAVELLER_FOREIGN_SHARE, _FOREIGN_SHARE)
        # What an upstream card profile reports: the mean of the card's everyday amounts.
        typical = np.exp(self._card_level + _AMOUNT_SIGMA**2 / 2)
        self._card_avg = np.maximum(np.round(typical, 2), 1.0)

        # Merchants: every (country, category) pair has at least one, the rest follow the shares.
        n_pairs = n_countries * n_categories
        n_extra = n_merchants - n_pairs
        merchant_country = np.concatenate(
            [
                np.repeat(np.arange(n_countries), n_categories),
                rng.choice(n_countries, size=n_extra, p=self._country_p),
            ]
        )
        merchant_category = np.concatenate(
            [
                np.tile(np.arange(n_categories), n_countries),
                np.searchsorted(self._legit_category_cdf, rng.random(n_extra), side="right"),
            ]
        )
        merchant_category = np.minimum(merchant_category, n_categories - 1)
        group = merchant_country * n_categories + merchant_category
        order = np.argsort(group, kind="stable")
        ids = rng.permutation(n_merchants)
        self._merchant_ids = np.array([f"merch-{ids[i]:05d}" for i in order], dtype=object)
        counts = np.bincount(group, minlength=n_pairs)
        self._group_count = counts
        self._group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._n_categories = n_categories

        # Cumulative diurnal intensity over one day on a minute grid, scaled to EVENTS_PER_DAY,
        # to map the Poisson clock onto wall time.
        minutes = np.arange(24 * 60 + 1, dtype=np.float64)
        rate = _diurnal_intensity(minutes / 60.0)
        cumulative = np.concatenate([[0.0], np.cumsum((rate[1:] + rate[:-1]) / 2)])
        self._day_curve = cumulative / cumulative[-1] * EVENTS_PER_DAY
        self._day_curve_ms = minutes * 60_000.0
        # Fraud weights night slots up; dividing by the day's mean weight keeps FRAUD_RATE overall
        # while a night-time chunk gets more incidents than a daytime one.
        night_share = cumulative[_NIGHT_END_MINUTE] / cumulative[-1]
        self._mean_fraud_weight = 1.0 + (_FRAUD_NIGHT_WEIGHT - 1.0) * night_share

    def generate(self, count: int) -> Iterator[LabelledTransaction]:
        """Yield `count` labelled transactions, in event-time order, lazily in chunks.

        Successive calls continue the stream: time moves on and ids are new. The world's state
        advances as chunks are produced, so interleaving two unfinished generators interleaves
        their chunks.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        remaining = count
        while remaining > 0:
            size = min(CHUNK_SIZE, remaining)
            remaining -= size
            yield from self._chunk(size)

    def _event_times(self, n: int) -> np.ndarray:
        """Poisson arrivals following the diurnal curve, as int64 ms UTC, non-decreasing."""
        position = self._position + np.cumsum(self._rng.exponential(1.0, size=n))
        self._position = float(position[-1])
        day, within = np.divmod(position, EVENTS_PER_DAY)
        offset = np.interp(within, self._day_curve, self._day_curve_ms)
        times: np.ndarray = (
            self._start_ms + day.astype(np.int64) * _MS_PER_DAY + offset.astype(np.int64)
        )
        return times

    def _pick(self, cdf: np.ndarray, n: int) -> np.ndarray:
        """Draw n indices from a cumulative distribution (inverse CDF)."""
        drawn = np.searchsorted(cdf, self._rng.random(n), side="right")
        return np.minimum(drawn, len(cdf) - 1)

    def _pick_channel(self, cdf: np.ndarray, category: np.ndarray) -> np.ndarray:
        """Draw a channel per row from the per-category channel CDFs."""
        u = self._rng.random(len(category))
        drawn = (u[:, None] >= cdf[category]).sum(axis=1)
        channel: np.ndarray = np.minimum(drawn, len(CHANNELS) - 1)
        return channel

    def _foreign_country(self, home: np.ndarray) -> np.ndarray:
        """A country other than `home`, weighted by the country shares."""
        rng = self._rng
        n_countries = len(self._country_p)
        country = rng.choice(n_countries, size=len(home), p=self._country_p)
        same = country == home
        shift = rng.integers(1, n_countries, size=int(same.sum()))
        country[same] = (home[same] + shift) % n_countries
        return country

    def _chunk(self, n: int) -> Iterator[LabelledTransaction]:
        """One vectorised step: n legitimate slots, some overwritten by fraud bursts."""
        rng = self._rng
        times = self._event_times(n)

        # Legitimate activity: the card's habits.
        card = self._pick(self._card_activity_cdf, n)
        home = self._card_home[card]
        abroad = rng.random(n) < self._card_foreign_p[card]
        country = np.where(abroad, self._foreign_country(home), home)
        category = self._pick(self._legit_category_cdf, n)
        channel = self._pick_channel(self._legit_channel_cdf, category)
        log_amount = (
            self._card_level[card]
            + self._amount_shift[category]
            + _AMOUNT_SIGMA * rng.standard_normal(n)
        )
        big = rng.random(n) < _BIG_PURCHASE_SHARE
        log_amount[big] += rng.normal(1.5, 0.5, size=int(big.sum()))
        is_fraud = np.zeros(n, dtype=bool)

        # Fraud: bursts on compromised cards, starting more readily at night.
        hours = (times // 3_600_000) % 24
        weight = np.where(hours * 60 < _NIGHT_END_MINUTE, _FRAUD_NIGHT_WEIGHT, 1.0)
        expected_events = weight.sum() / self._mean_fraud_weight * FRAUD_RATE
        n_incidents = int(rng.poisson(expected_events / (1 + _MEAN_EXTRA_BURST)))
        if n_incidents:
            start = rng.choice(n, size=n_incidents, p=weight / weight.sum())
            length = 1 + rng.poisson(_MEAN_EXTRA_BURST, size=n_incidents)
            gap = rng.integers(1, _MAX_BURST_GAP, size=n_incidents)
            victim = rng.integers(0, len(self._card_ids), size=n_incidents)
            victim_abroad = rng.random(n_incidents) < _FRAUD_FOREIGN_SHARE
            victim_country = np.where(
                victim_abroad,
                self._foreign_country(self._card_home[victim]),
                self._card_home[victim],
            )
            incident = np.repeat(np.arange(n_incidents), length)
            step = np.arange(len(incident)) - np.repeat(np.cumsum(length) - length, length)
            slot = start[incident] + step * gap[incident]
            # Keep slots inside the chunk, and one incident per slot where bursts collide.
            inside = slot < n
            slot, incident = slot[inside], incident[inside]
            slot, first = np.unique(slot, return_index=True)
            incident = incident[first]
            m = len(slot)

            card[slot] = victim[incident]
            country[slot] = victim_country[incident]
            fraud_category = self._pick(self._fraud_category_cdf, m)
            category[slot] = fraud_category
            channel[slot] = self._pick_channel(self._fraud_channel_cdf, fraud_category)
            fraud_log_amount = (
                self._card_level[victim[incident]]
                + self._amount_shift[fraud_category]
                + rng.normal(_FRAUD_LOG_MULTIPLIER, 0.7, size=m)
                + _AMOUNT_SIGMA * rng.standard_normal(m)
            )
            testing = rng.random(m) < _CARD_TESTING_SHARE
            fraud_log_amount[testing] = np.log(rng.uniform(0.5, 5.0, size=int(testing.sum())))
            log_amount[slot] = fraud_log_amount
            is_fraud[slot] = True

        yield from self._records(times, card, country, category, channel, log_amount, is_fraud)

    def _records(
        self,
        times: np.ndarray,
        card: np.ndarray,
        country: np.ndarray,
        category: np.ndarray,
        channel: np.ndarray,
        log_amount: np.ndarray,
        is_fraud: np.ndarray,
    ) -> Iterator[LabelledTransaction]:
        """Turn one chunk's columns into records, with Python scalars (pydantic is strict)."""
        rng = self._rng
        n = len(times)
        amount = np.clip(np.round(np.exp(log_amount), 2), 0.01, 1_000_000.0)

        group = country * self._n_categories + category
        within_group = (rng.random(n) * self._group_count[group]).astype(np.int64)
        merchant = self._group_start[group] + within_group

        currency_index = country.copy()
        online = channel == CHANNELS.index("ecommerce")
        usd = online & (rng.random(n) < _USD_ONLINE_SHARE)
        currency_index[usd] = self._usd

        card_country = self._country_codes[self._card_home[card]]
        card_avg = self._card_avg[card].astype(object)
        roll = rng.random(n)
        profile_missing = roll < _PROFILE_MISSING_SHARE
        card_country[profile_missing] = None
        card_avg[roll < _PROFILE_MISSING_SHARE + _AVG_MISSING_SHARE] = None

        # Random version-4 UUIDs drawn from the seeded generator, so ids repeat for a seed.
        raw = np.frombuffer(rng.bytes(16 * n), dtype=np.uint8).reshape(n, 16).copy()
        raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
        raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
        hexes = raw.tobytes().hex()
        transaction_ids = [
            f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
            for h in (hexes[i : i + 32] for i in range(0, 32 * n, 32))
        ]

        columns = zip(
            transaction_ids,
            times.tolist(),
            self._card_ids[card].tolist(),
            self._merchant_ids[merchant].tolist(),
            self._category_names[category].tolist(),
            amount.tolist(),
            self._currency_codes[currency_index].tolist(),
            self._country_codes[country].tolist(),
            self._channel_names[channel].tolist(),
            self._card_present_channels[channel].tolist(),
            card_country.tolist(),
            card_avg.tolist(),
            is_fraud.tolist(),
            strict=True,
        )
        for tid, t, cid, mid, cat, amt, cur, ctry, chan, present, ccountry, cavg, fraud in columns:
            yield LabelledTransaction(
                {
                    "transaction_id": tid,
                    "event_time": t,
                    "card_id": cid,
                    "merchant_id": mid,
                    "merchant_category": cat,
                    "amount": amt,
                    "currency": cur,
                    "country": ctry,
                    "channel": chan,
                    "card_present": present,
                    "card_country": ccountry,
                    "card_avg_amount": cavg,
                },
                fraud,
            )

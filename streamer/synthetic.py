"""The seeded transaction world: labelled card transactions for training and for `streamer produce`.

A `SyntheticWorld` holds a fixed population of cards and merchants drawn from its seed, and
generates a stream of transactions over it, in event-time order.

Legitimate spend follows each card's habits. A card is used about `EVENTS_PER_CARD_PER_DAY` times
a day on average (some cards far more, many less), on a diurnal clock, mostly at a few favourite
merchants in its home country, at amounts around its own level. Now and then the holder tries a
new shop, buys from a web shop abroad, makes a second purchase minutes after the first, or
travels: a trip lasts days and happens at merchants and in a country the card may never have
used, which is exactly what fraud looks like from the card's history.

Fraud comes as incidents on compromised cards, starting more readily at night:

- a burst: the card is used 1 + Poisson(`_MEAN_EXTRA_BURST`) times, minutes apart, at amounts
  several times its usual, at risky merchants, mostly card-not-present;
- card testing (`_CARD_TESTING_SHARE` of incidents): 2 to 6 tiny amounts at one web merchant
  within a few minutes, then one large purchase on the same card;
- either way the fraudster's merchants are new to the card, and in `_FRAUD_FOREIGN_SHARE` of
  incidents so is the country.

Every signal is noisy on purpose (travellers, new shops, quick legitimate repeats, big legitimate
purchases, tiny legitimate web purchases, compromised cards with no history yet) so a model learns
something realistic, not a rule.

Simplifications worth knowing: amounts are not converted between currencies (the world only uses
currencies of similar magnitude), the diurnal clock is UTC for every country, and a compromised
card's holder goes on using it as usual.
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

DEFAULT_EVENTS_PER_DAY: Final = 25_000
"""Mean number of transactions per simulated day, across all cards, unless a world is given one.

`streamer train` by default learns from a world at this rate, so `streamer produce` streams the
world the default model was trained on."""

EVENTS_PER_CARD_PER_DAY: Final = 1.5
"""Mean uses of one card per day, which sets a world's number of cards unless it is given one.

Real cards see about 0.5 to 3 transactions a day; history features (a card's last hour, day and
week) only mean something when most cards come back within the days a model is trained on.
"""

DEFAULT_START_MS: Final = 1_767_225_600_000
"""When a world's clock starts unless it is given a time: 2026-01-01T00:00:00Z, a UTC midnight."""

FRAUD_RATE: Final = 0.015
"""Target share of fraudulent transactions."""

CHUNK_SIZE: Final = 10_000
"""Transactions generated per vectorised step."""

_MS_PER_DAY: Final = 86_400_000
_MS_PER_MINUTE: Final = 60_000
_AMOUNT_SIGMA: Final = 0.7  # spread of one card's amounts around its level (log scale)
_BIG_PURCHASE_SHARE: Final = 0.015  # legitimate purchases several times the card's usual
_PROFILE_MISSING_SHARE: Final = 0.04  # upstream card profile unknown: both enrichments None
_AVG_MISSING_SHARE: Final = 0.02  # new card, no history yet: only card_avg_amount None
_USD_ONLINE_SHARE: Final = 0.08  # cross-border web shops charge USD regardless of country

# Habits. A card has 2 to `_MAX_FAVOURITES` favourite merchants at home, the first visited most
# (weights 1, 1/2, 1/3, ...); `_FAVOURITE_SHARE` of its uses at home go to one of them, the rest
# to any merchant of a category drawn afresh, which is usually one the card has not used.
_MAX_FAVOURITES: Final = 8
_MEAN_EXTRA_FAVOURITES: Final = 2.0  # favourites per card: 2 + Poisson(this), at most the max
_FAVOURITE_SHARE: Final = 0.85
_SESSION_SHARE: Final = 0.05  # legitimate uses followed by another on the card minutes later
_SESSION_MEAN_GAP_MS: Final = 8 * _MS_PER_MINUTE
_CROSS_BORDER_SHARE: Final = 0.015  # legitimate one-off purchases abroad (web shops, mostly)

# Trips: a card's holder goes abroad to one country for 1 + Exponential(3) days, during which
# `_TRIP_ABROAD_SHARE` of the card's uses happen there. Travellers go every two weeks or so
# (abroad about a fifth of the time), everyone else about twice a year.
_TRAVELLER_SHARE: Final = 0.06
_TRAVELLER_TRIPS_PER_DAY: Final = 1 / 15
_TRIPS_PER_DAY: Final = 1 / 180
_TRIP_MIN_DAYS: Final = 1.0
_TRIP_EXTRA_MEAN_DAYS: Final = 3.0
_TRIP_ABROAD_SHARE: Final = 0.9

# Fraud incidents.
_FRAUD_FOREIGN_SHARE: Final = 0.6  # incidents abroad (country != card_country)
_FRAUD_NIGHT_WEIGHT: Final = 4.0  # incidents start this much more readily at night
_NIGHT_END_MINUTE: Final = 6 * 60  # night is 00:00 to 06:00 UTC
_FRAUD_LOG_MULTIPLIER: Final = 1.3  # burst amounts: about e**1.3 ~ 3.7 times the usual
_MEAN_EXTRA_BURST: Final = 1.2  # a burst uses the card 1 + Poisson(this) times
_BURST_MEAN_GAP_MS: Final = 3 * _MS_PER_MINUTE  # between uses in a burst (plus _MIN_GAP_MS)
_CARD_TESTING_SHARE: Final = 0.1  # incidents that probe the card with tiny amounts first
_PROBES: Final = (2, 6)  # tiny probes per card-testing incident, inclusive bounds
_PROBE_AMOUNT: Final = (0.5, 3.0)  # a probe's amount, uniform between these
_PROBE_CATEGORY: Final = "digital_goods"  # probed at one web merchant of this category
_PROBE_MEAN_GAP_MS: Final = 40_000  # between probes (plus _MIN_GAP_MS): a script
_CASH_OUT_MEAN_GAP_MS: Final = 4 * _MS_PER_MINUTE  # last probe to the large purchase
_CASH_OUT_LOG_MULTIPLIER: Final = 2.0  # the large purchase: about e**2 ~ 7 times the usual
_CASH_OUT_CATEGORIES: Final = ("travel", "electronics", "jewelry", "gift_cards", "crypto_exchange")
_MIN_GAP_MS: Final = 5_000  # shortest time between two uses in an incident or a session
# Events per incident on average, to turn FRAUD_RATE into a number of incidents.
_MEAN_INCIDENT_EVENTS: Final = (1 - _CARD_TESTING_SHARE) * (1 + _MEAN_EXTRA_BURST) + (
    _CARD_TESTING_SHARE * ((_PROBES[0] + _PROBES[1]) / 2 + 1)
)


def _diurnal_intensity(hours: np.ndarray) -> np.ndarray:
    """Relative transaction rate by UTC hour: quietest around 04:00, busiest around 16:00."""
    return 0.12 + 0.88 * (0.5 - 0.5 * np.cos(2 * np.pi * (hours - 4.0) / 24.0)) ** 1.5


_COLUMNS: Final = (
    "time",
    "card",
    "country",
    "category",
    "channel",
    "merchant",
    "log_amount",
    "is_fraud",
)


@dataclass(slots=True)
class _Columns:
    """Transactions as the world decides them, one array per column, row i one transaction."""

    time: np.ndarray  # int64 ms UTC
    card: np.ndarray  # index into the card arrays
    country: np.ndarray  # index into _COUNTRY_TABLE: where the card is used
    category: np.ndarray  # index into MERCHANT_CATEGORIES
    channel: np.ndarray  # index into CHANNELS
    merchant: np.ndarray  # index into the merchant arrays
    log_amount: np.ndarray
    is_fraud: np.ndarray

    @classmethod
    def empty(cls) -> _Columns:
        """No rows."""
        ints = np.empty(0, dtype=np.int64)
        return cls(ints, ints, ints, ints, ints, ints, np.empty(0), np.empty(0, dtype=bool))

    def __len__(self) -> int:
        return len(self.time)

    def take(self, rows: np.ndarray) -> _Columns:
        """A copy of the given rows, in that order."""
        return _Columns(**{name: getattr(self, name)[rows] for name in _COLUMNS})

    def put(self, rows: np.ndarray, values: _Columns) -> None:
        """Overwrite the given rows with `values`, row for row."""
        for name in _COLUMNS:
            getattr(self, name)[rows] = getattr(values, name)

    def concat(self, other: _Columns) -> _Columns:
        """These rows, then `other`'s."""
        return _Columns(
            **{
                name: np.concatenate([getattr(self, name), getattr(other, name)])
                for name in _COLUMNS
            }
        )


class SyntheticWorld:
    """A seeded population of cards and merchants, and the transaction stream over it.

    `events_per_day` is the mean number of transactions per simulated day; the number of cards
    follows from it (`events_per_day / EVENTS_PER_CARD_PER_DAY`) unless `n_cards` is given, so a
    larger world has more cards, each with the same habits. The clock starts at `start_ms`.
    The same arguments and the same sequence of `generate` calls give the same records. Not
    thread-safe: `generate` advances the world's clock and random state as it yields.
    `n_merchants` must be at least one per (country, category) pair. Card ids are
    `card_prefix` and a six-digit number: worlds of different seeds share card ids and a clock
    unless their prefixes differ, so a tool that feeds a stateful scorer one world after another
    gives each its own prefix (their cards would otherwise meet the histories of the other
    world's cards of the same id, from its future).
    """

    def __init__(
        self,
        seed: int,
        *,
        events_per_day: float = DEFAULT_EVENTS_PER_DAY,
        n_cards: int | None = None,
        n_merchants: int = 5_000,
        start_ms: int = DEFAULT_START_MS,
        card_prefix: str = "card-",
    ) -> None:
        n_countries = len(_COUNTRY_TABLE)
        n_categories = len(MERCHANT_CATEGORIES)
        if not (np.isfinite(events_per_day) and events_per_day > 0):
            raise ValueError(f"events_per_day must be a positive number, got {events_per_day}")
        if n_cards is None:
            n_cards = max(1, round(events_per_day / EVENTS_PER_CARD_PER_DAY))
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
        self._events_per_day = float(events_per_day)
        self._n_cards = n_cards
        self._start_ms = start_ms
        self._position = 0.0  # expected events elapsed: the clock in "intensity" units
        self._pending = _Columns.empty()  # fraud due after the last chunk generated

        self._country_codes = np.array([c for c, _, _ in _COUNTRY_TABLE], dtype=object)
        self._currency_codes = np.array([c for _, c, _ in _COUNTRY_TABLE], dtype=object)
        self._usd = self._currency_codes.tolist().index("USD")
        shares = np.array([s for _, _, s in _COUNTRY_TABLE])
        self._country_p = shares / shares.sum()

        table = [_CATEGORY_TABLE[name] for name in MERCHANT_CATEGORIES]
        self._category_names = np.array(MERCHANT_CATEGORIES, dtype=object)
        legit_p = np.array([row[0] for row in table])
        fraud_p = np.array([row[1] for row in table])
        cash_out_p = fraud_p * np.isin(MERCHANT_CATEGORIES, _CASH_OUT_CATEGORIES)
        self._legit_category_cdf = np.cumsum(legit_p / legit_p.sum())
        self._fraud_category_cdf = np.cumsum(fraud_p / fraud_p.sum())
        self._cash_out_category_cdf = np.cumsum(cash_out_p / cash_out_p.sum())
        self._probe_category = MERCHANT_CATEGORIES.index(_PROBE_CATEGORY)
        self._amount_shift = np.array([row[2] for row in table])
        channel_p = np.array([row[3] for row in table])
        fraud_channel_p = channel_p * np.array(_FRAUD_CHANNEL_FACTORS)
        self._legit_channel_cdf = np.cumsum(channel_p / channel_p.sum(1, keepdims=True), axis=1)
        self._fraud_channel_cdf = np.cumsum(
            fraud_channel_p / fraud_channel_p.sum(1, keepdims=True), axis=1
        )
        self._channel_names = np.array(CHANNELS, dtype=object)
        self._card_present_channels = np.array([c in ("pos", "atm") for c in CHANNELS])

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

        # Cards: home country, spend level, how active, favourite merchants, trips abroad.
        self._card_ids = np.array([f"{card_prefix}{i:06d}" for i in range(n_cards)], dtype=object)
        self._card_home = rng.choice(n_countries, size=n_cards, p=self._country_p)
        self._card_level = np.log(40.0) + 0.6 * rng.standard_normal(n_cards)
        activity = rng.lognormal(0.0, 0.8, size=n_cards)
        self._card_activity_cdf = np.cumsum(activity / activity.sum())
        # What an upstream card profile reports: the mean of the card's everyday amounts.
        typical = np.exp(self._card_level + _AMOUNT_SIGMA**2 / 2)
        self._card_avg = np.maximum(np.round(typical, 2), 1.0)

        n_favourites = np.minimum(2 + rng.poisson(_MEAN_EXTRA_FAVOURITES, n_cards), _MAX_FAVOURITES)
        rank = np.arange(_MAX_FAVOURITES)
        favourite_weight = (rank[None, :] < n_favourites[:, None]) / (rank[None, :] + 1.0)
        self._card_favourite_cdf = np.cumsum(
            favourite_weight / favourite_weight.sum(1, keepdims=True), axis=1
        )
        self._card_favourite_count = n_favourites
        favourite_category = self._pick(
            self._legit_category_cdf, n_cards * _MAX_FAVOURITES
        ).reshape(n_cards, _MAX_FAVOURITES)
        self._card_favourite_category = favourite_category
        self._card_favourite = self._any_merchant(
            np.repeat(self._card_home[:, None], _MAX_FAVOURITES, axis=1), favourite_category
        )

        is_traveller = rng.random(n_cards) < _TRAVELLER_SHARE
        self._card_trip_rate = np.where(is_traveller, _TRAVELLER_TRIPS_PER_DAY, _TRIPS_PER_DAY)
        # Start in the steady state: the share of cards abroad at any moment is already there.
        mean_trip_days = _TRIP_MIN_DAYS + _TRIP_EXTRA_MEAN_DAYS
        away_share = self._card_trip_rate * mean_trip_days
        away = rng.random(n_cards) < away_share / (1 + away_share)
        duration = self._trip_durations(n_cards)
        trip_start = start_ms - (rng.random(n_cards) * duration).astype(np.int64)
        self._trip_start = np.where(away, trip_start, 0)
        self._trip_end = np.where(away, trip_start + duration, 0)
        self._trip_country = self._foreign_country(self._card_home)
        self._trip_clock = start_ms  # trips are decided up to here

        # Cumulative diurnal intensity over one day on a minute grid, scaled to events_per_day,
        # to map the Poisson clock onto wall time.
        minutes = np.arange(24 * 60 + 1, dtype=np.float64)
        rate = _diurnal_intensity(minutes / 60.0)
        cumulative = np.concatenate([[0.0], np.cumsum((rate[1:] + rate[:-1]) / 2)])
        self._day_curve = cumulative / cumulative[-1] * self._events_per_day
        self._day_curve_ms = minutes * 60_000.0
        # Fraud weights night slots up; dividing by the day's mean weight keeps FRAUD_RATE overall
        # while a night-time chunk gets more incidents than a daytime one.
        night_share = cumulative[_NIGHT_END_MINUTE] / cumulative[-1]
        self._mean_fraud_weight = 1.0 + (_FRAUD_NIGHT_WEIGHT - 1.0) * night_share

    @property
    def start_ms(self) -> int:
        """When the world's clock starts (ms UTC): no event is earlier."""
        return self._start_ms

    @property
    def n_cards(self) -> int:
        """How many cards the world holds."""
        return self._n_cards

    def generate(self, count: int) -> Iterator[LabelledTransaction]:
        """Yield `count` labelled transactions, in event-time order, lazily in chunks.

        Successive calls continue the stream: time moves on and ids are new, and a fraud
        incident cut by the end of one chunk goes on in the next. The world's state advances as
        chunks are produced, so interleaving two unfinished generators interleaves their chunks.
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
        day, within = np.divmod(position, self._events_per_day)
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

    def _any_merchant(self, country: np.ndarray, category: np.ndarray) -> np.ndarray:
        """A merchant of each (country, category), uniformly among that pair's merchants."""
        group = country * self._n_categories + category
        within = (self._rng.random(group.shape) * self._group_count[group]).astype(np.int64)
        merchant: np.ndarray = self._group_start[group] + within
        return merchant

    def _foreign_country(self, home: np.ndarray) -> np.ndarray:
        """A country other than `home`, weighted by the country shares."""
        rng = self._rng
        n_countries = len(self._country_p)
        country = rng.choice(n_countries, size=len(home), p=self._country_p)
        same = country == home
        shift = rng.integers(1, n_countries, size=int(same.sum()))
        country[same] = (home[same] + shift) % n_countries
        return country

    def _trip_durations(self, n: int) -> np.ndarray:
        """n trip lengths in ms: 1 + Exponential(3) days."""
        days = _TRIP_MIN_DAYS + self._rng.exponential(_TRIP_EXTRA_MEAN_DAYS, size=n)
        durations: np.ndarray = (days * _MS_PER_DAY).astype(np.int64)
        return durations

    def _free_slots(self, taken: np.ndarray, k: int) -> np.ndarray:
        """Up to k distinct random rows not yet taken, and mark them taken."""
        free = np.flatnonzero(~taken)
        slots = self._rng.choice(free, size=min(k, len(free)), replace=False)
        taken[slots] = True
        return slots

    def _chunk(self, n: int) -> Iterator[LabelledTransaction]:
        """One vectorised step: n transactions, legitimate ones with some replaced by fraud.

        Arrivals come first, then quick repeat visits and fraud events take the place of randomly
        chosen arrivals (with their own card, merchant and time), and the chunk is sorted by time
        again.
        Replacing keeps the count exact; choosing the replaced rows at random keeps the diurnal
        curve, since the new events follow it already.
        """
        times = self._event_times(n)
        # The last arrival, kept apart: a replaced row may be the last one.
        end = int(times[-1])
        self._advance_trips(end)
        card = self._pick(self._card_activity_cdf, n)
        taken = np.zeros(n, dtype=bool)
        self._add_sessions(times, card, taken, end)
        chunk = self._legit(times, card)
        self._add_fraud(chunk, taken, end)
        chunk = chunk.take(np.argsort(chunk.time, kind="stable"))
        yield from self._records(chunk)

    def _advance_trips(self, until_ms: int) -> None:
        """Decide which cards set off abroad between the last chunk and `until_ms`."""
        span = until_ms - self._trip_clock
        if span <= 0:
            return
        rng = self._rng
        idle = self._trip_end <= self._trip_clock
        chance = -np.expm1(-self._card_trip_rate * (span / _MS_PER_DAY))
        leaving = np.flatnonzero(idle & (rng.random(self._n_cards) < chance))
        start = self._trip_clock + (rng.random(len(leaving)) * span).astype(np.int64)
        self._trip_start[leaving] = start
        self._trip_end[leaving] = start + self._trip_durations(len(leaving))
        self._trip_country[leaving] = self._foreign_country(self._card_home[leaving])
        self._trip_clock = until_ms

    def _add_sessions(
        self, times: np.ndarray, card: np.ndarray, taken: np.ndarray, end: int
    ) -> None:
        """Follow some uses with another by the same card minutes later (several shops in a row).

        Without them only fraud would come minutes apart, and time since the previous use would
        be a rule instead of a clue. Follow-ups after `end`, the chunk's last arrival, are dropped.
        """
        rng = self._rng
        first = np.flatnonzero(rng.random(len(times)) < _SESSION_SHARE)
        gap = _MIN_GAP_MS + rng.exponential(_SESSION_MEAN_GAP_MS, size=len(first))
        follow_time = times[first] + gap.astype(np.int64)
        inside = follow_time <= end
        first, follow_time = first[inside], follow_time[inside]
        taken[first] = True
        slots = self._free_slots(taken, len(first))
        card[slots] = card[first[: len(slots)]]
        times[slots] = follow_time[: len(slots)]

    def _legit(self, times: np.ndarray, card: np.ndarray) -> _Columns:
        """The legitimate use of `card` at `times`, following each card's habits."""
        rng = self._rng
        n = len(times)
        home = self._card_home[card]
        travelling = (self._trip_start[card] <= times) & (times < self._trip_end[card])
        on_trip = travelling & (rng.random(n) < _TRIP_ABROAD_SHARE)
        cross_border = ~on_trip & (rng.random(n) < _CROSS_BORDER_SHARE)
        country = home.copy()
        country[on_trip] = self._trip_country[card[on_trip]]
        country[cross_border] = self._foreign_country(home[cross_border])
        category = self._pick(self._legit_category_cdf, n)
        merchant = self._any_merchant(country, category)

        usual = np.flatnonzero(~on_trip & ~cross_border & (rng.random(n) < _FAVOURITE_SHARE))
        regular = card[usual]
        rank = (rng.random(len(usual))[:, None] >= self._card_favourite_cdf[regular]).sum(axis=1)
        # Rounding can leave a cumulative weight a hair under 1: never pick past the last one.
        rank = np.minimum(rank, self._card_favourite_count[regular] - 1)
        merchant[usual] = self._card_favourite[regular, rank]
        category[usual] = self._card_favourite_category[regular, rank]

        channel = self._pick_channel(self._legit_channel_cdf, category)
        log_amount = (
            self._card_level[card]
            + self._amount_shift[category]
            + _AMOUNT_SIGMA * rng.standard_normal(n)
        )
        big = rng.random(n) < _BIG_PURCHASE_SHARE
        log_amount[big] += rng.normal(1.5, 0.5, size=int(big.sum()))
        is_fraud = np.zeros(n, dtype=bool)
        return _Columns(times, card, country, category, channel, merchant, log_amount, is_fraud)

    def _add_fraud(self, chunk: _Columns, taken: np.ndarray, end: int) -> None:
        """Start this chunk's fraud incidents and place every fraud event due within it.

        Events after `end`, the chunk's last arrival, wait in `_pending` for the next chunk, so an
        incident is never cut short by a chunk boundary (only by the end of the stream).
        """
        rng = self._rng
        n = len(chunk)
        hours = (chunk.time // 3_600_000) % 24
        weight = np.where(hours * 60 < _NIGHT_END_MINUTE, _FRAUD_NIGHT_WEIGHT, 1.0)
        expected_events = weight.sum() / self._mean_fraud_weight * FRAUD_RATE
        n_incidents = int(rng.poisson(expected_events / _MEAN_INCIDENT_EVENTS))
        start = chunk.time[rng.choice(n, size=n_incidents, p=weight / weight.sum())]
        events = self._pending.concat(self._incidents(start))
        due = np.flatnonzero(events.time <= end)
        due = due[np.argsort(events.time[due], kind="stable")]
        slots = self._free_slots(taken, len(due))
        placed = due[: len(slots)]
        chunk.put(slots, events.take(placed))
        waiting = np.ones(len(events), dtype=bool)
        waiting[placed] = False
        self._pending = events.take(np.flatnonzero(waiting))

    def _incidents(self, start: np.ndarray) -> _Columns:
        """Every fraud event of incidents starting at `start` (ms), on random cards."""
        rng = self._rng
        k = len(start)
        testing = rng.random(k) < _CARD_TESTING_SHARE
        probes = rng.integers(_PROBES[0], _PROBES[1] + 1, size=k)
        length = np.where(testing, probes + 1, 1 + rng.poisson(_MEAN_EXTRA_BURST, size=k))
        incident = np.repeat(np.arange(k), length)
        first = np.cumsum(length) - length
        step = np.arange(len(incident)) - first[incident]
        tested = testing[incident]
        probe = tested & (step < length[incident] - 1)
        cash_out = tested & ~probe
        mean_gap = np.where(
            cash_out,
            _CASH_OUT_MEAN_GAP_MS,
            np.where(tested, _PROBE_MEAN_GAP_MS, _BURST_MEAN_GAP_MS),
        )
        gap = _MIN_GAP_MS + mean_gap * rng.exponential(1.0, size=len(incident))
        gap[first] = 0.0
        elapsed = np.cumsum(gap)
        time = start[incident] + (elapsed - elapsed[first][incident]).astype(np.int64)

        victim = rng.integers(0, self._n_cards, size=k)
        home = self._card_home[victim]
        where = np.where(rng.random(k) < _FRAUD_FOREIGN_SHARE, self._foreign_country(home), home)
        card = victim[incident]
        country = where[incident]
        m = len(incident)
        category = self._pick(self._fraud_category_cdf, m)
        category[cash_out] = self._pick(self._cash_out_category_cdf, int(cash_out.sum()))
        category[probe] = self._probe_category
        channel = self._pick_channel(self._fraud_channel_cdf, category)
        # The fraudster's merchants are drawn afresh, so almost never ones the card has used;
        # card testing hits one merchant again and again.
        merchant = self._any_merchant(country, category)
        probe_merchant = self._any_merchant(where, np.full(k, self._probe_category))
        merchant[probe] = probe_merchant[incident[probe]]

        log_amount = (
            self._card_level[card]
            + self._amount_shift[category]
            + rng.normal(_FRAUD_LOG_MULTIPLIER, 0.7, size=m)
            + _AMOUNT_SIGMA * rng.standard_normal(m)
        )
        log_amount[cash_out] += _CASH_OUT_LOG_MULTIPLIER - _FRAUD_LOG_MULTIPLIER
        log_amount[probe] = np.log(rng.uniform(*_PROBE_AMOUNT, size=int(probe.sum())))
        is_fraud = np.ones(m, dtype=bool)
        events = _Columns(time, card, country, category, channel, merchant, log_amount, is_fraud)
        return events.take(np.argsort(time, kind="stable"))

    def _records(self, chunk: _Columns) -> Iterator[LabelledTransaction]:
        """Turn one chunk's columns into records, with Python scalars (pydantic is strict)."""
        rng = self._rng
        n = len(chunk)
        card = chunk.card
        amount = np.clip(np.round(np.exp(chunk.log_amount), 2), 0.01, 1_000_000.0)

        currency_index = chunk.country.copy()
        online = chunk.channel == CHANNELS.index("ecommerce")
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
            chunk.time.tolist(),
            self._card_ids[card].tolist(),
            self._merchant_ids[chunk.merchant].tolist(),
            self._category_names[chunk.category].tolist(),
            amount.tolist(),
            self._currency_codes[currency_index].tolist(),
            self._country_codes[chunk.country].tolist(),
            self._channel_names[chunk.channel].tolist(),
            self._card_present_channels[chunk.channel].tolist(),
            card_country.tolist(),
            card_avg.tolist(),
            chunk.is_fraud.tolist(),
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

"""One card's recent history, the features read from it, and its changelog codec.

The stream keeps a `CardHistory` per card in a keyed store; `history_features` reads each
record's features from its card's history and then applies the record to it. No Kafka, no I/O.

Rules every history feature follows (`features.FEATURE_ORDER` defines each one):

- Time is event time in ms. A record's *effective time* t is max(event_time, the card's latest
  effective time). A record earlier than one its card already applied (out of order) is scored
  and applied as though it happened at the card's latest time: histories only move forward, and
  such a record has seconds_since_previous 0.
- A record's features come from its card's history strictly before it. A window of length w
  holds the card's previous transactions with effective time in (t - w, t].
- Nothing at or before t - `RETENTION_MS` (30 days, the longest window) changes a feature. A
  card idle that long is reset by its next record, and `is_expired` lets a store drop it before
  then: both give the same features as keeping it.

Memory per card is bounded: the time and amount of each transaction of the last 7 days (at most
`MAX_EVENTS`), in arrays; a (count, sum) bucket per UTC day of the last 30 days; and the
last-seen time of at most `MAX_REMEMBERED` merchants and as many countries, pruned to 30 days.
Those last-seen maps are kept in the order the ids were last seen, so their times ascend and the
distinct counts of a window are one bisection. Ids are interned, so cards share one string each.

The history is a pure function of the records applied to it, whatever the batching, and
`encode_history` / `decode_history` round-trip it exactly (floats by their bits). A store rebuilt
from its changelog after a crash therefore gives the same features, bit for bit, as one that
never stopped.

Not thread-safe: a history belongs to the loop that scores its card.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate, chain, islice
from typing import Any, Final

import numpy as np

from streamer.errors import StreamerError
from streamer.state.store import StateCodec

HOUR_MS: Final[int] = 3_600_000
DAY_MS: Final[int] = 24 * HOUR_MS
WEEK_MS: Final[int] = 7 * DAY_MS
"""The longest window over single transactions; older ones are dropped on apply."""
RETENTION_DAYS: Final = 30
RETENTION_MS: Final = RETENTION_DAYS * DAY_MS
"""The longest window; nothing older is kept, and nothing older changes a feature."""

MAX_EVENTS: Final = 1_000
"""Transactions of the last 7 days kept per card, the most recent ones.

Far above a person's week (5 a day make 35); it bounds the memory and the per-record cost of a
card hammered by a burst, whose window counts, sums and means then cover its latest
`MAX_EVENTS` transactions.
"""

MAX_REMEMBERED: Final = 64
"""Merchants (and, separately, countries) whose last-seen time a card keeps.

One more forgets the least recently seen, which then counts as new again. The card remembers its
64 most recently seen merchants, so a distinct count over a window is exact up to 64, then 64.
"""

HISTORY_FEATURES: Final[tuple[str, ...]] = (
    "card_count_1h",
    "card_amount_sum_1h",
    "card_amount_mean_1h",
    "card_count_24h",
    "card_amount_sum_24h",
    "card_amount_mean_24h",
    "card_count_7d",
    "card_amount_sum_7d",
    "card_amount_mean_7d",
    "amount_to_card_mean_30d",
    "seconds_since_previous",
    "card_merchants_24h",
    "card_merchants_7d",
    "card_countries_24h",
    "card_countries_7d",
    "is_new_merchant",
    "is_new_country",
)
"""The columns `history_features` writes, in order; `features.FEATURE_ORDER` defines each."""

_NAN: Final = math.nan
_NEVER: Final = -(2**62)
"""Latest time of a card with no history: before the window of any event time."""
_WIDTH: Final = len(HISTORY_FEATURES)
_RATIO_COLUMN: Final = HISTORY_FEATURES.index("amount_to_card_mean_30d")
# `CardHistory._days`, one float64 array (days and counts are exact in a double): the latest
# UTC day's transaction count and amount sum, the totals of the earlier days, then per earlier
# day in the window (ascending) its day number (days since the epoch), count and sum.
_TODAY_COUNT: Final = 0
_TODAY_SUM: Final = 1
_EARLIER_COUNT: Final = 2
_EARLIER_SUM: Final = 3
_EARLIER: Final = 4
_NO_DAYS: Final = (0.0, 0.0, 0.0, 0.0)
# A record's row as `CardHistory._score_and_apply` gives it: the count and sum of each window
# (1 hour, 24 hours, 7 days, 30 days), the milliseconds since the card's latest record, then the
# last six features as they are. `history_features` divides for the means, the 30-day ratio and
# the seconds, a column at a time.
_ROW_WIDTH: Final = 15
_ROW_COUNT_SUMS: Final = slice(0, 6)
_OUT_COUNT_SUMS: Final = [0, 1, 3, 4, 6, 7]
_MEANS: Final = ((0, 2), (2, 5), (4, 8))
"""(row column of a window's count, followed by its sum; out column of its mean)."""
_ROW_30D: Final = 6
_ROW_GAP: Final = 8
_GAP_COLUMN: Final = HISTORY_FEATURES.index("seconds_since_previous")
_ROW_LAST: Final = slice(9, None)
_OUT_LAST: Final = slice(_WIDTH - 6, None)
_FIRST_ROW: Final[tuple[float, ...]] = (0.0,) * 8 + (_NAN,) + (0.0,) * 4 + (1.0, 1.0)
"""The row of a card's first transaction (or its first after 30 idle days)."""


class StateDecodeError(StreamerError, ValueError):
    """Bytes that are not a card history this code wrote: truncated, garbage or a newer format."""


class CardHistory:
    """One card's history: mutable, changed only by `history_features`.

    A new instance is an empty history. Equality compares the whole state, floats by their bits
    (for tests and restores); `copy` gives an independent history.
    """

    # Few objects per card, and arrays rather than lists of boxed numbers: with many cards the
    # cost of a record is mostly the memory it touches, and a store may hold millions.
    __slots__ = (
        "_amounts",
        "_country_seen",
        "_country_times",
        "_days",
        "_merchant_seen",
        "_merchant_times",
        "_times",
    )

    def __init__(self) -> None:
        # The transactions of the last 7 days, oldest first: effective times ascend, and the
        # last one is the card's latest.
        self._times = array("q")
        self._amounts = array("d")
        # The 30-day window by UTC day, see `_TODAY_COUNT` and the constants after it.
        self._days = array("d", _NO_DAYS)
        # Id -> effective time last seen, in that order (an id seen again moves to the end),
        # and the same times in an array, ascending: a window's distinct ids are its tail.
        self._merchant_seen: dict[str, int] = {}
        self._merchant_times = array("q")
        self._country_seen: dict[str, int] = {}
        self._country_times = array("q")

    @classmethod
    def _holding(
        cls,
        times: array[int],
        amounts: array[float],
        days: array[float],
        merchant_seen: dict[str, int],
        merchant_times: array[int],
        country_seen: dict[str, int],
        country_times: array[int],
    ) -> CardHistory:
        """A history holding these containers, as they are (not copied, not checked)."""
        history = cls.__new__(cls)
        history._times = times
        history._amounts = amounts
        history._days = days
        history._merchant_seen = merchant_seen
        history._merchant_times = merchant_times
        history._country_seen = country_seen
        history._country_times = country_times
        return history

    @classmethod
    def _first(cls, t: int, amount: float, merchant: str, country: str) -> CardHistory:
        """A history holding one record, at effective time `t`: arrays of the exact size."""
        return cls._holding(
            array("q", (t,)),
            array("d", (amount,)),
            array("d", (1.0, amount, 0.0, 0.0)),
            {merchant: t},
            array("q", (t,)),
            {country: t},
            array("q", (t,)),
        )

    @property
    def latest_ms(self) -> int:
        """Effective time of the last record applied; far in the past for an empty history."""
        return self._times[-1] if self._times else _NEVER

    def copy(self) -> CardHistory:
        """An independent copy: containers are copied, their immutable items shared."""
        return CardHistory._holding(
            self._times[:],
            self._amounts[:],
            self._days[:],
            self._merchant_seen.copy(),
            self._merchant_times[:],
            self._country_seen.copy(),
            self._country_times[:],
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CardHistory):
            return NotImplemented
        # Float arrays compare by their bytes, so a NaN that round-tripped is still equal; the
        # last-seen maps by their order too, which decides what is forgotten first.
        return (
            self._times == other._times
            and self._amounts.tobytes() == other._amounts.tobytes()
            and self._days.tobytes() == other._days.tobytes()
            and list(self._merchant_seen.items()) == list(other._merchant_seen.items())
            and list(self._country_seen.items()) == list(other._country_seen.items())
        )

    def __repr__(self) -> str:
        days = bool(self._times) + (len(self._days) - _EARLIER) // 3
        return (
            f"CardHistory(latest_ms={self.latest_ms}, transactions={len(self._times)},"
            f" days={days}, merchants={len(self._merchant_seen)},"
            f" countries={len(self._country_seen)})"
        )

    def _become(self, other: CardHistory) -> None:
        """Hold what `other` holds (which is not used afterwards)."""
        self._times = other._times
        self._amounts = other._amounts
        self._days = other._days
        self._merchant_seen = other._merchant_seen
        self._merchant_times = other._merchant_times
        self._country_seen = other._country_seen
        self._country_times = other._country_times

    def _score_and_apply(
        self, event_time: int, amount: float, merchant: str, country: str
    ) -> tuple[float, ...]:
        """The record's row (`_ROW_WIDTH` values) from the history before it; then apply it.

        `history_features` makes the row's counts and sums into `HISTORY_FEATURES`, dividing a
        column at a time. The ids must be interned.
        """
        times = self._times
        latest = times[-1] if times else _NEVER
        t = event_time if event_time > latest else latest
        cutoff_30d = t - RETENTION_MS
        if latest <= cutoff_30d:
            # First transaction, or first after the longest window: nothing held counts, and
            # starting afresh leaves the state a card dropped by the store would have.
            self._become(CardHistory._first(t, amount, merchant, country))
            return _FIRST_ROW

        cutoff_7d = t - WEEK_MS
        cutoff_24h = t - DAY_MS
        amounts = self._amounts
        held = len(times)
        merchant_times = self._merchant_times
        country_times = self._country_times
        merchants = len(merchant_times)
        countries = len(country_times)
        # Each window is a tail of the ascending times (and so is each window's ids); the windows
        # nest, so each amount is summed once: the 24-hour sum continues from the 1-hour one,
        # the 7-day from that. A window the card's latest record is not in is empty: no
        # bisection and no slice (the hour, mostly; the day, for a card used daily or less).
        start_7d = bisect_right(times, cutoff_7d)
        merchants_7d = bisect_right(merchant_times, cutoff_7d)
        countries_7d = bisect_right(country_times, cutoff_7d)
        if latest > cutoff_24h:
            start_24h = bisect_right(times, cutoff_24h, start_7d)
            merchants_24h = bisect_right(merchant_times, cutoff_24h, merchants_7d)
            countries_24h = bisect_right(country_times, cutoff_24h, countries_7d)
            cutoff_1h = t - HOUR_MS
            if latest > cutoff_1h:
                start_1h = bisect_right(times, cutoff_1h, start_24h)
                count_1h = held - start_1h
                sum_1h = sum(amounts[start_1h:], 0.0)
            else:
                start_1h = held
                count_1h = 0
                sum_1h = 0.0
            count_24h = held - start_24h
            sum_24h = sum(amounts[start_24h:start_1h], sum_1h) if start_24h < start_1h else sum_1h
        else:
            start_24h = held
            merchants_24h = merchants
            countries_24h = countries
            count_1h = count_24h = 0
            sum_1h = sum_24h = 0.0
        count_7d = held - start_7d
        sum_7d = sum(amounts[start_7d:start_24h], sum_24h) if start_7d < start_24h else sum_24h

        day = t // DAY_MS
        days = self._days
        latest_day = latest // DAY_MS
        # The earlier days' totals are sums from the oldest day on, so adding the latest day's
        # gives the window's total as summing every day would.
        count_30d = days[_EARLIER_COUNT] + days[_TODAY_COUNT]
        sum_30d = days[_EARLIER_SUM] + days[_TODAY_SUM]
        if day != latest_day:
            # A new day (once a day is enough to drop what the window no longer holds): the
            # latest day joins the earlier ones, and those before the window go.
            days.extend((latest_day, days[_TODAY_COUNT], days[_TODAY_SUM]))
            first_kept = day - (RETENTION_DAYS - 1)
            if days[_EARLIER] < first_kept:
                del days[_EARLIER : _EARLIER + 3 * bisect_left(days[_EARLIER::3], first_kept)]
                count_30d = _day_total(days[_EARLIER + 1 :: 3])
                sum_30d = _day_total(days[_EARLIER + 2 :: 3])

        # The ids seen again move to the end of their map, at time t. In the array any entry with
        # the id's old time will do: the last one, the common case, takes t in place. A new id
        # past `MAX_REMEMBERED` forgets the least recently seen.
        merchant_seen = self._merchant_seen
        merchant_last = merchant_seen.pop(merchant, _NEVER)
        merchant_seen[merchant] = t
        if merchant_last == merchant_times[-1]:
            merchant_times[-1] = t
        elif merchant_last != _NEVER:
            del merchant_times[bisect_left(merchant_times, merchant_last)]
            merchant_times.append(t)
        else:
            if merchants >= MAX_REMEMBERED:
                del merchant_seen[next(iter(merchant_seen))], merchant_times[0]
            merchant_times.append(t)
        country_seen = self._country_seen
        country_last = country_seen.pop(country, _NEVER)
        country_seen[country] = t
        if country_last == country_times[-1]:
            country_times[-1] = t
        elif country_last != _NEVER:
            del country_times[bisect_left(country_times, country_last)]
            country_times.append(t)
        else:
            if countries >= MAX_REMEMBERED:
                del country_seen[next(iter(country_seen))], country_times[0]
            country_times.append(t)

        row = (
            count_1h,
            sum_1h,
            count_24h,
            sum_24h,
            count_7d,
            sum_7d,
            count_30d,
            sum_30d,
            t - latest,
            merchants - merchants_24h,
            merchants - merchants_7d,
            countries - countries_24h,
            countries - countries_7d,
            1.0 if merchant_last <= cutoff_30d else 0.0,
            1.0 if country_last <= cutoff_30d else 0.0,
        )

        # Apply. What leaves the 7-day window now is outside every later window too.
        times.append(t)
        amounts.append(amount)
        drop = start_7d if held < MAX_EVENTS else max(start_7d, held + 1 - MAX_EVENTS)
        if drop:
            del times[:drop], amounts[:drop]
        if day == latest_day:
            days[_TODAY_COUNT] += 1.0
            days[_TODAY_SUM] += amount
        else:
            days[_TODAY_COUNT] = 1.0
            days[_TODAY_SUM] = amount
            days[_EARLIER_COUNT] = count_30d
            days[_EARLIER_SUM] = sum_30d
            # This record's ids are at t now, inside the window: the ids forgotten are the first.
            if merchant_times[0] <= cutoff_30d:
                _forget_until(merchant_seen, merchant_times, cutoff_30d)
            if country_times[0] <= cutoff_30d:
                _forget_until(country_seen, country_times, cutoff_30d)
        return row


# The day totals are added one day at a time, oldest first: a new day adds its total to the
# earlier days' stored one, and a recount must give the same bits. sum() adds floats that way
# up to 3.11 (the image's Python); from 3.12 on it compensates, so it would not.
if sys.version_info >= (3, 12):

    def _day_total(values: array[float]) -> float:
        return functools.reduce(operator.add, values, 0.0)

else:

    def _day_total(values: array[float]) -> float:
        return sum(values, 0.0)


def _forget_until(seen: dict[str, int], times: array[int], cutoff: int) -> None:
    """Drop the ids last seen at or before `cutoff`: the first ones, as times ascend."""
    stale = bisect_right(times, cutoff)
    if stale:
        for key in list(islice(seen, stale)):
            del seen[key]
        del times[:stale]


def history_features(
    histories: dict[str, CardHistory],
    card_ids: Sequence[str],
    event_times: Sequence[int] | np.ndarray,
    amounts: Sequence[float] | np.ndarray,
    merchants: Sequence[str],
    countries: Sequence[str],
    out: np.ndarray,
) -> None:
    """Write each record's `HISTORY_FEATURES` into `out`, applying the records as it goes.

    Record i (card_ids[i], event_times[i], ...) gets the features of its card's history before
    it in out[i]; then it is applied to that history, so a later record of the same card in the
    same call sees it. `histories` is the state view: read, updated in place, and given a new
    `CardHistory` for a card it lacks. `out` is float64 of shape (n, len(HISTORY_FEATURES)),
    possibly a column slice of a bigger matrix. The columns hold plain Python values (a decoded
    batch); numpy arrays are converted first. Raises `ValueError` when the shapes disagree.
    """
    count = len(card_ids)
    if out.shape != (count, _WIDTH):
        raise ValueError(
            f"out must have shape ({count}, {_WIDTH}) for {count} records, got {out.shape}"
        )
    if not count:
        return
    # Per-record Python below: numpy scalars would be slower and would leak into the state.
    times_in = _plain(event_times)
    amounts_in = _plain(amounts)
    intern = sys.intern
    if not len(times_in) == len(amounts_in) == len(merchants) == len(countries) == count:
        raise ValueError("the columns must all have one value per record")
    # A card without a history gets an empty one, which its first record starts.
    for card_id in set(card_ids).difference(histories):
        histories[card_id] = CardHistory()
    rows = list(  # `_ROW_WIDTH` values each
        map(
            CardHistory._score_and_apply,
            map(histories.__getitem__, card_ids),
            times_in,
            amounts_in,
            map(intern, merchants),
            map(intern, countries),
        )
    )
    row = np.fromiter(chain.from_iterable(rows), np.float64, count * _ROW_WIDTH).reshape(
        count, _ROW_WIDTH
    )
    out[:, _OUT_COUNT_SUMS] = row[:, _ROW_COUNT_SUMS]
    out[:, _OUT_LAST] = row[:, _ROW_LAST]
    # Each division is the one Python would do (counts are exact in a double); a window without
    # transactions has no mean (NaN).
    np.divide(row[:, _ROW_GAP], 1000.0, out=out[:, _GAP_COLUMN])
    ratio = out[:, _RATIO_COLUMN]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for count_column, column in (*_MEANS, (_ROW_30D, _RATIO_COLUMN)):
            counts = row[:, count_column]
            mean = out[:, column]
            mean.fill(_NAN)
            np.divide(row[:, count_column + 1], counts, out=mean, where=counts != 0.0)
        # The ratio column holds the 30-day mean: divide as numpy does the profile ratio, so a
        # zero mean gives inf (NaN for a zero amount) and no mean gives NaN.
        np.divide(np.asarray(amounts_in, dtype=np.float64), ratio, out=ratio)


def _plain(values: Sequence[Any] | np.ndarray) -> Sequence[Any]:
    if isinstance(values, np.ndarray):
        converted: list[Any] = values.tolist()
        return converted
    return values


def is_expired(history: CardHistory, now_ms: int) -> bool:
    """Whether the card has been idle for the longest window at `now_ms`: it can be dropped.

    latest_ms <= now_ms - RETENTION_MS. Dropping it changes no feature of a later record whose
    event time is at least `now_ms`: that record would reset the history anyway. A record of the
    card earlier than `now_ms` (late against the stream) can still see the history, so a store
    that expires at its stream time makes such a record's features depend on when expiry ran;
    expiring at the stream time minus the lateness it tolerates keeps them deterministic.
    """
    return history.latest_ms <= now_ms - RETENTION_MS


# -- the changelog codec -------------------------------------------------------------------------

_FORMAT_VERSION: Final = 2
_FORMAT_1: Final = 1
"""The format before the day buckets were written as held; still read."""
_HEADER: Final = struct.Struct("<BHHHH")
"""Format version, then how many transactions, days (the latest included), merchants and
countries."""
_TIME: Final = struct.Struct("<q")
"""A transaction time as written: both formats put the times, ascending, right after the header."""
_BIG_ENDIAN: Final = sys.byteorder == "big"
_MAX_DAY_COUNT: Final = 2**31
"""Far above any card's day, and far enough below the u32 field that counting on cannot reach it."""


def encode_history(history: CardHistory) -> bytes:
    """The history as compact little-endian bytes; `decode_history` reads them back equal.

    Format 2, after `_HEADER` (whose first byte is the version): the transactions' effective
    times (i64) and amounts (f64); the day buckets as held (f64: the latest day's count and sum,
    the earlier days' totals, then per earlier day, oldest first, its day number, count and
    sum); the merchants' last-seen times (i64), the countries' (i64); each merchant's, then each
    country's, id length in code points (u16); then all the ids, merchants first, as one UTF-8
    text. Every part is an array copied as it is (the ids joined), so encoding costs no step
    per day or per id. Ids longer than 65,535 code points raise `OverflowError` (validation caps
    them at 128 characters).
    """
    h = history
    times = h._times
    days = h._days
    merchant_seen = h._merchant_seen
    country_seen = h._country_seen
    arrays: tuple[array[Any], ...] = (
        times,
        h._amounts,
        days,
        h._merchant_times,
        h._country_times,
        array("H", map(len, chain(merchant_seen, country_seen))),
    )
    if _BIG_ENDIAN:
        arrays = tuple(map(_swapped, arrays))
    head = _HEADER.pack(
        _FORMAT_VERSION,
        len(times),
        (len(days) - _EARLIER) // 3 + bool(times),
        len(merchant_seen),
        len(country_seen),
    )
    a, b, c, d, e, f = [values.tobytes() for values in arrays]
    return b"".join((head, a, b, c, d, e, f, "".join(chain(merchant_seen, country_seen)).encode()))


def decode_history(data: bytes) -> CardHistory:
    """A history from `encode_history` bytes, of format 2 or 1; raises `StateDecodeError` saying
    what is wrong.

    Every length is checked against the bytes left before anything is built, so hostile bytes
    cost no more than their size. Nothing is unpickled.
    """
    if not data:
        raise StateDecodeError("card history is empty: no format version")
    if data[0] == _FORMAT_1:
        return _decode_format_1(data)
    if data[0] != _FORMAT_VERSION:
        raise StateDecodeError(
            f"card history format {data[0]} is not {_FORMAT_VERSION} or {_FORMAT_1}, the ones"
            " this code reads (written by a newer version, or not a card history)"
        )
    reader = _Reader(data)
    _, n_events, n_days, n_merchants, n_countries = _HEADER.unpack(
        reader.take(_HEADER.size, "header")
    )
    if (n_days == 0) != (n_events == 0):
        raise StateDecodeError(f"card history has {n_events} transactions over {n_days} days")
    times = reader.numbers("q", n_events, "transaction times")
    amounts = reader.numbers("d", n_events, "amounts")
    days = reader.numbers("d", _EARLIER + 3 * max(n_days - 1, 0), "day buckets")
    merchant_times = reader.numbers("q", n_merchants, "merchant times")
    country_times = reader.numbers("q", n_countries, "country times")
    lengths = reader.numbers("H", n_merchants + n_countries, "id lengths")
    try:
        text = data[reader.position :].decode()
    except UnicodeDecodeError as exc:
        raise StateDecodeError(f"card history ids are not UTF-8: {exc}") from None
    ends = list(accumulate(lengths))
    held = ends[-1] if ends else 0
    if held != len(text):
        raise StateDecodeError(
            f"card history is truncated: ids need {held} code points, {len(text)} left"
            if held > len(text)
            else f"card history has {len(text) - held} code points after its last field"
        )
    ids = list(map(sys.intern, map(text.__getitem__, map(slice, chain((0,), ends), ends))))
    merchant_seen = _last_seen(ids[:n_merchants], merchant_times, "merchant")
    country_seen = _last_seen(ids[n_merchants:], country_times, "country")
    _check_invariants(times, merchant_times, country_times)
    _check_days(times, days)

    return CardHistory._holding(
        times, amounts, days, merchant_seen, merchant_times, country_seen, country_times
    )


def _last_seen(ids: list[str], times: array[int], what: str) -> dict[str, int]:
    seen = dict(zip(ids, times, strict=True))
    if len(seen) != len(times):
        raise StateDecodeError(f"card history remembers a {what} twice")
    return seen


def _check_days(times: array[int], days: array[float]) -> None:
    """Refuse format 2 day buckets `history_features` could not have left.

    Without transactions, all zero and no earlier day. With: counts are whole and at most
    `_MAX_DAY_COUNT`, earlier days whole and ascending before the latest transaction's day, and
    the earlier days' totals are their counts and sums added up as a new day adds them.
    """
    if not times:
        if days.tobytes() != bytes(8 * _EARLIER):
            raise StateDecodeError("card history without transactions holds days")
        return
    earlier_days = days[_EARLIER::3]
    counts = days[_EARLIER + 1 :: 3]
    counts.append(days[_TODAY_COUNT])
    if not all(map(float.is_integer, chain(earlier_days, counts))):
        raise StateDecodeError("card history has a day or a day count that is not whole")
    if not 0 <= min(counts) <= max(counts) <= _MAX_DAY_COUNT:
        raise StateDecodeError(f"card history day count {max(counts)} is implausible")
    if not all(map(operator.lt, earlier_days, islice(earlier_days, 1, None))):
        raise StateDecodeError("card history days are not in ascending order")
    if earlier_days and earlier_days[-1] >= times[-1] // DAY_MS:
        raise StateDecodeError("card history has an earlier day after its latest")
    totals = array("d", (_day_total(counts[:-1]), _day_total(days[_EARLIER + 2 :: 3])))
    if totals.tobytes() != days[_EARLIER_COUNT:_EARLIER].tobytes():
        raise StateDecodeError("card history day totals do not add up")


def _decode_format_1(data: bytes) -> CardHistory:
    """A history from format 1 bytes (day buckets as days before the latest, u32 counts and
    sums, the latest day last; ids each with its UTF-8 length)."""
    reader = _Reader(data)
    _, n_events, n_days, n_merchants, n_countries = _HEADER.unpack(
        reader.take(_HEADER.size, "header")
    )
    times = reader.numbers("q", n_events, "transaction times")
    amounts = reader.numbers("d", n_events, "amounts")
    days_ago = reader.take(n_days, "days")
    day_counts = reader.numbers("I", n_days, "day counts")
    day_sums = reader.numbers("d", n_days, "day sums")
    merchant_lengths = reader.numbers("H", n_merchants, "merchant id lengths")
    merchant_times = reader.numbers("q", n_merchants, "merchant times")
    country_lengths = reader.numbers("H", n_countries, "country id lengths")
    country_times = reader.numbers("q", n_countries, "country times")
    merchant_seen = reader.ids(merchant_lengths, merchant_times, "merchant")
    country_seen = reader.ids(country_lengths, country_times, "country")
    if reader.position != len(data):
        raise StateDecodeError(
            f"card history has {len(data) - reader.position} bytes after its last field"
        )
    _check_invariants(times, merchant_times, country_times)
    _check_days_format_1(times, days_ago, day_counts)

    days = array("d", _NO_DAYS)
    if times:
        latest_day = times[-1] // DAY_MS
        days = array("d", (float(day_counts[-1]), day_sums[-1], 0.0, 0.0))
        for ago, count, total in zip(days_ago[:-1], day_counts[:-1], day_sums[:-1], strict=True):
            days.extend((latest_day - ago, count, total))
        # Summed as a new day sums them, so the totals come back bit for bit.
        days[_EARLIER_COUNT] = _day_total(days[_EARLIER + 1 :: 3])
        days[_EARLIER_SUM] = _day_total(days[_EARLIER + 2 :: 3])
    return CardHistory._holding(
        times, amounts, days, merchant_seen, merchant_times, country_seen, country_times
    )


def _check_invariants(
    times: array[int], merchant_times: array[int], country_times: array[int]
) -> None:
    """Refuse decoded times and ids `history_features` could not have left: it relies on them.

    Times ascend (windows are bisected) and none is after the latest transaction; a card with
    transactions remembers the merchant and country of its latest transaction at least, one
    without has no ids at all.
    """
    for values, what in (
        (times, "transaction times"),
        (merchant_times, "merchant times"),
        (country_times, "country times"),
    ):
        if not _ascending(values):
            raise StateDecodeError(f"card history {what} are not in ascending order")
    if not times:
        if merchant_times or country_times:
            raise StateDecodeError("card history without transactions holds ids")
        return
    if not merchant_times or not country_times:
        raise StateDecodeError("card history has no merchant or country for its transactions")
    if max(merchant_times[-1], country_times[-1]) > times[-1]:
        raise StateDecodeError("card history saw an id after its latest transaction")


def _check_days_format_1(times: array[int], days_ago: bytes, day_counts: array[int]) -> None:
    """Refuse format 1 day buckets: a card with transactions has a bucket for its latest day,
    one without has none."""
    if not times:
        if days_ago:
            raise StateDecodeError("card history without transactions holds days")
        return
    if not days_ago or days_ago[-1] != 0:
        raise StateDecodeError("card history has no bucket for its latest day")
    if not all(map(operator.gt, days_ago, days_ago[1:])):
        raise StateDecodeError("card history days are not in ascending order")
    if max(day_counts) > _MAX_DAY_COUNT:
        raise StateDecodeError(f"card history day count {max(day_counts)} is implausible")


def _ascending(values: array[int]) -> bool:
    return all(map(operator.le, values, islice(values, 1, None)))


def _swapped(values: array[Any]) -> array[Any]:
    """A copy of the array with its items' bytes in the other order."""
    values = values[:]
    values.byteswap()
    return values


def _le(values: array[Any]) -> bytes:
    """The array's bytes in little-endian order."""
    return (_swapped(values) if _BIG_ENDIAN else values).tobytes()


class _Reader:
    """Reads `decode_history` fields in order; every read is checked against the bytes left."""

    __slots__ = ("data", "position")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.position + size
        if end > len(self.data):
            raise StateDecodeError(
                f"card history is truncated: {what} need {size} bytes at offset"
                f" {self.position}, {len(self.data) - self.position} left"
            )
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def numbers(self, code: str, count: int, what: str) -> array[Any]:
        values = array(code)
        values.frombytes(self.take(count * values.itemsize, what))
        if _BIG_ENDIAN:
            values.byteswap()
        return values

    def ids(self, lengths: Iterable[int], times: array[int], what: str) -> dict[str, int]:
        """Read the ids of the given UTF-8 lengths, as a last-seen map with `times`."""
        intern = sys.intern
        try:
            seen = {
                intern(self.take(length, f"{what} ids").decode()): when
                for length, when in zip(lengths, times, strict=True)
            }
        except UnicodeDecodeError as exc:
            raise StateDecodeError(f"card history {what} id is not UTF-8: {exc}") from None
        if len(seen) != len(times):
            raise StateDecodeError(f"card history remembers a {what} twice")
        return seen


def is_expired_encoded(data: bytes, now_ms: int) -> bool:
    """`is_expired` of the history `encode_history` gave `data` (format 2 or 1), from its header
    and latest transaction time alone: a sweep judges restored histories without decoding them.

    Bytes too short for those, or of another format, are not expired: they stay until their
    card's next record decodes them, which says what is wrong.
    """
    if len(data) < _HEADER.size or data[0] not in (_FORMAT_VERSION, _FORMAT_1):
        return False
    n_events = _HEADER.unpack_from(data)[1]
    if n_events == 0:
        return True  # an empty history, as `is_expired` judges it
    end = _HEADER.size + 8 * n_events
    if len(data) < end:
        return False
    latest: int = _TIME.unpack_from(data, end - 8)[0]
    return latest <= now_ms - RETENTION_MS


CARD_HISTORY_CODEC: Final[StateCodec[CardHistory]] = StateCodec(
    encode=encode_history,
    decode=decode_history,
    copy=CardHistory.copy,
    expired=is_expired,
    expired_encoded=is_expired_encoded,
)
"""How a keyed store writes, reads, copies and expires card histories."""

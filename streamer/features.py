"""The one place that turns transaction events into the model's feature matrix.

Training (`streamer.model.train`) calls `build_features` on record dicts; the scoring loop calls
`build_features_from_columns` on a decoded batch held by field, which the former also delegates
to, so the model always sees the columns in the same order with the same encoding.

The first columns come from the record itself (plus the card profile the upstream put in it).
The rest come from the card's own recent history (`state.card`), so the builder is not
stateless: it reads each record's features from its card's history before the record, then
applies the record to that history. The stream passes the histories its keyed store holds;
training starts from none and replays its records in order, so each row sees exactly the past
the stream would have seen, never itself or the future.

Missing card enrichment (`card_country` or `card_avg_amount` is None) becomes NaN, which the
gradient-boosted trees route down their learned missing-value branch instead of guessing a value.
A history feature with nothing to describe (a mean over no transactions, the time since a
previous transaction the card does not have) is NaN for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from streamer.events import CHANNELS
from streamer.state.card import HISTORY_FEATURES as HISTORY_FEATURES  # re-exported
from streamer.state.card import CardHistory, history_features

MERCHANT_CATEGORIES: Final[tuple[str, ...]] = (
    "grocery",
    "restaurant",
    "fuel",
    "travel",
    "electronics",
    "jewelry",
    "gift_cards",
    "digital_goods",
    "fashion",
    "pharmacy",
    "entertainment",
    "crypto_exchange",
    "cash_withdrawal",
    "utilities",
)
"""The merchant categories the model knows, in code order. Append only: a code is an index here."""

UNKNOWN_CODE: Final = math.nan
"""Code of a merchant category not in `MERCHANT_CATEGORIES`, or a channel not in `events.CHANNELS`.

Live data may carry categories the model was never trained on; they must score, not crash. An
unknown code is a missing value, which the trees send down their missing-value branch (the side
most training rows took when the column had no missing values), rather than a number that would
rank it next to whichever category happens to have the last code. Validation rejects unknown
channels; for them this is a safety net.
"""

NIGHT_HOURS_END: Final = 6
"""Hours 0 to 5 UTC count as night, when legitimate card use is rarest."""

FEATURE_ORDER: Final[tuple[str, ...]] = (
    "log_amount",
    "amount_to_card_avg",
    "is_foreign",
    "card_present",
    "channel",
    "merchant_category",
    "hour_of_day",
    "is_night",
    *HISTORY_FEATURES,
)
"""The columns of the feature matrix, in order. The model card records them; load checks them.

- log_amount: log1p(amount), so the trees see spend on a relative scale.
- amount_to_card_avg: amount / card_avg_amount; NaN when the card profile is unknown.
- is_foreign: 1.0 when country != card_country, else 0.0; NaN when card_country is unknown.
- card_present: 1.0 or 0.0.
- channel: index in `events.CHANNELS`, `UNKNOWN_CODE` (NaN) otherwise.
- merchant_category: index in `MERCHANT_CATEGORIES`, `UNKNOWN_CODE` (NaN) otherwise.
- hour_of_day: UTC hour of event_time, 0 to 23.
- is_night: 1.0 for hours before `NIGHT_HOURS_END`, else 0.0.

The history columns (`state.card.HISTORY_FEATURES`) describe the card's previous transactions.
t is the record's effective time: its event_time, or the card's latest time when the record
arrives out of order. A window of length w holds the card's previous transactions with
effective time in (t - w, t]; one at exactly t - w is out.

- card_count_1h, card_amount_sum_1h, card_amount_mean_1h: how many previous transactions in the
  last hour, the sum of their amounts and its mean (sum / count). With none: 0.0, 0.0 and NaN.
- card_count_24h, card_amount_sum_24h, card_amount_mean_24h: the same over 24 hours.
- card_count_7d, card_amount_sum_7d, card_amount_mean_7d: the same over 7 days.
  A card keeps its latest `state.card.MAX_EVENTS` (1,000) transactions of a week: these nine
  columns cover those, so they stop growing for a card hammered by a burst.
- amount_to_card_mean_30d: amount / the mean amount of the card's previous transactions on the
  UTC day of t (up to t) and the 29 UTC days before it. NaN with none; a zero mean gives inf
  (NaN for a zero amount), as amount_to_card_avg does.
- seconds_since_previous: (t - the effective time of the card's previous transaction) / 1000;
  0.0 for a record out of order. NaN when the card has none in the last 30 days.
- card_merchants_24h, card_merchants_7d: how many distinct merchants the card's previous
  transactions in the window were at; 0.0 with none. Counted among the merchants the card
  remembers (`state.card.MAX_REMEMBERED`, its 64 most recently seen), so exact up to 64.
- card_countries_24h, card_countries_7d: the same for countries.
- is_new_merchant: 1.0 when none of the card's previous transactions in the last 30 days was at
  this merchant (or the card has forgotten it: it was not among its 64 most recently seen),
  else 0.0. A merchant last seen exactly 30 days before t is new.
- is_new_country: the same for the country.
"""

CATEGORICAL_FEATURES: Final[tuple[str, ...]] = ("channel", "merchant_category")
"""The columns of `FEATURE_ORDER` that hold category codes, not quantities.

The model takes them as ordered numbers (see `model.train.HGB_PARAMS`); the model card records
them, and load refuses a model whose card names other ones.
"""

_MS_PER_HOUR: Final = 3_600_000
_FIRST_HISTORY_COLUMN: Final = FEATURE_ORDER.index(HISTORY_FEATURES[0])
_NAN: Final = math.nan
_CHANNEL_CODES: Final[dict[str, float]] = {name: float(i) for i, name in enumerate(CHANNELS)}
_CATEGORY_CODES: Final[dict[str, float]] = {
    name: float(i) for i, name in enumerate(MERCHANT_CATEGORIES)
}
_INPUT_FIELDS: Final = (
    "card_id",
    "merchant_id",
    "amount",
    "card_avg_amount",
    "country",
    "card_country",
    "card_present",
    "channel",
    "merchant_category",
    "event_time",
)
"""The transaction fields the features are made of."""


def build_features(
    records: Sequence[Mapping[str, Any]], histories: dict[str, CardHistory] | None = None
) -> np.ndarray:
    """Build the float64 feature matrix, shape (len(records), len(FEATURE_ORDER)).

    Records are decoded transaction dicts that passed `events.validate_transaction`, so every
    field is present with the schema's type, in the order the stream sees them: each card's in
    event-time order. Unknown categories and channels get `UNKNOWN_CODE`; missing card enrichment
    gives NaN. An empty batch gives an empty (0, n) matrix.

    `histories` (card_id to `CardHistory`) is read and updated as in
    `build_features_from_columns`; by default a fresh one, so every row sees only the records
    before it in `records`: the point-in-time features training needs.
    """
    # Transposing the dicts and building column-wise costs less than a tuple per record.
    return build_features_from_columns(
        {name: [record[name] for record in records] for name in _INPUT_FIELDS},
        {} if histories is None else histories,
    )


def build_features_from_columns(
    columns: Mapping[str, Sequence[Any]], histories: dict[str, CardHistory]
) -> np.ndarray:
    """`build_features` for records held by field: each field name to one value per record.

    Takes `serde.TransactionBatch.columns` (or any mapping with the fields `build_features`
    reads) and gives the same matrix as `build_features` on the same records, bit for bit,
    without a dict per record.

    `histories` is the state view, card_id to `CardHistory`: each record's history columns come
    from its card's history before it, then the record is applied to it (a card it lacks is
    added). So the call is not idempotent: building the same batch twice, the second sees the
    first.
    """
    # Hot path: numpy over whole columns; a comprehension only where a value needs a lookup.
    amount = np.array(columns["amount"], dtype=np.float64)
    count = len(amount)
    out = np.empty((count, len(FEATURE_ORDER)), dtype=np.float64)
    np.log1p(amount, out=out[:, 0])
    # None becomes NaN in the float conversion, so the ratio is NaN too; a tiny average gives inf.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(amount, np.array(columns["card_avg_amount"], dtype=np.float64), out=out[:, 1])
    out[:, 2] = [
        _NAN if card is None else float(where != card)
        for where, card in zip(columns["country"], columns["card_country"], strict=True)
    ]
    out[:, 3] = columns["card_present"]
    channel_codes = _CHANNEL_CODES
    out[:, 4] = [channel_codes.get(c, UNKNOWN_CODE) for c in columns["channel"]]
    category_codes = _CATEGORY_CODES
    out[:, 5] = [category_codes.get(c, UNKNOWN_CODE) for c in columns["merchant_category"]]
    out[:, 6] = [millis // _MS_PER_HOUR % 24 for millis in columns["event_time"]]
    out[:, 7] = out[:, 6] < NIGHT_HOURS_END
    history_features(
        histories,
        columns["card_id"],
        columns["event_time"],
        columns["amount"],
        columns["merchant_id"],
        columns["country"],
        out[:, _FIRST_HISTORY_COLUMN:],
    )
    return out

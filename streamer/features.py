"""The one place that turns transaction events into the model's feature matrix.

Training (`streamer.model.train`) calls `build_features` on record dicts; the scoring loop calls
`build_features_from_columns` on a decoded batch held by field, which the former also delegates
to, so the model always sees the columns in the same order with the same encoding. The builder is
stateless: every feature comes from the record itself (plus the card profile the upstream put in
it), so a batch can be scored without looking anything up.

Missing card enrichment (`card_country` or `card_avg_amount` is None) becomes NaN, which the
gradient-boosted trees route down their learned missing-value branch instead of guessing a value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from streamer.events import CHANNELS

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
"""

CATEGORICAL_FEATURES: Final[tuple[str, ...]] = ("channel", "merchant_category")
"""The columns of `FEATURE_ORDER` that hold category codes, not quantities.

The model takes them as ordered numbers (see `model.train.HGB_PARAMS`); the model card records
them, and load refuses a model whose card names other ones.
"""

_MS_PER_HOUR: Final = 3_600_000
_NAN: Final = math.nan
_CHANNEL_CODES: Final[dict[str, float]] = {name: float(i) for i, name in enumerate(CHANNELS)}
_CATEGORY_CODES: Final[dict[str, float]] = {
    name: float(i) for i, name in enumerate(MERCHANT_CATEGORIES)
}
_INPUT_FIELDS: Final = (
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


def build_features(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Build the float64 feature matrix, shape (len(records), len(FEATURE_ORDER)).

    Records are decoded transaction dicts that passed `events.validate_transaction`, so every
    field is present with the schema's type. Unknown categories and channels get `UNKNOWN_CODE`;
    missing card enrichment gives NaN. An empty batch gives an empty (0, n) matrix.
    """
    # Transposing the dicts and building column-wise costs less than a tuple per record.
    return build_features_from_columns(
        {name: [record[name] for record in records] for name in _INPUT_FIELDS}
    )


def build_features_from_columns(columns: Mapping[str, Sequence[Any]]) -> np.ndarray:
    """`build_features` for records held by field: each field name to one value per record.

    Takes `serde.TransactionBatch.columns` (or any mapping with the fields `build_features`
    reads) and gives the same matrix as `build_features` on the same records, bit for bit,
    without a dict per record.
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
    return out

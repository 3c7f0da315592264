"""Transaction and Verdict: the two messages, as pydantic models, with the domain rules.

`Transaction` states every rule an input event must meet; `validate_transaction` applies them to
a decoded record and turns a failure into one human-readable reason. `screen_transactions` checks
a whole batch against the same rules column by column, for the scoring loop, and names the few
records that need `validate_transaction`. Timestamps are integer milliseconds since the epoch
(UTC), as on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final

import numpy as np
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from streamer.errors import ValidationError

CHANNELS: Final = ("pos", "ecommerce", "atm", "moto")
"""Where a card was used: point of sale, online, cash machine, mail or telephone order."""

# ISO 4217 alphabetic codes of current currencies (and the precious-metal / testing codes excluded).
CURRENCIES: Final = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD
    BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR
    FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD
    JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT
    MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG
    QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS
    TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER
    ZAR ZMW ZWG""".split()
)

# ISO 3166-1 alpha-2 officially assigned codes.
COUNTRIES: Final = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN
    BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE
    DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN
    GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE
    KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK
    ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA
    PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK
    SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG
    UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW""".split()
)

MAX_AMOUNT: Final = 10_000_000.0
"""Amounts above this are treated as corrupt rather than scored."""

MAX_ID_LENGTH: Final = 128

MAX_CATEGORY_LENGTH: Final = 64

_Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
_Millis = Annotated[int, Field(ge=0)]


class Transaction(BaseModel):
    """A card transaction, as `schemas/transaction.avsc` carries it, with its domain rules."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    transaction_id: _Id
    event_time: _Millis
    card_id: _Id
    merchant_id: _Id
    merchant_category: Annotated[str, Field(min_length=1, max_length=MAX_CATEGORY_LENGTH)]
    amount: Annotated[float, Field(ge=0.0, le=MAX_AMOUNT, allow_inf_nan=False)]
    currency: str
    country: str
    channel: str
    card_present: bool
    card_country: str | None = None
    card_avg_amount: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        if value not in CURRENCIES:
            raise ValueError("unknown ISO 4217 currency code")
        return value

    @field_validator("country", "card_country")
    @classmethod
    def _known_country(cls, value: str | None) -> str | None:
        if value is not None and value not in COUNTRIES:
            raise ValueError("unknown ISO 3166-1 alpha-2 country code")
        return value

    @field_validator("channel")
    @classmethod
    def _known_channel(cls, value: str) -> str:
        if value not in CHANNELS:
            raise ValueError(f"unknown channel, expected one of {', '.join(CHANNELS)}")
        return value


class Verdict(BaseModel):
    """The fraud verdict for one transaction, as `schemas/verdict.avsc` carries it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transaction_id: str
    card_id: str
    score: Annotated[float, Field(ge=0.0, le=1.0)]
    is_fraud: bool
    threshold: float
    model_name: str
    model_version: str
    event_time: int
    scored_at: int


def validate_transaction(record: dict[str, Any], key: bytes | None) -> Transaction:
    """Check a decoded record and its message key against the domain rules.

    Raises `ValidationError` with one line naming every broken rule. The key must be present and
    equal the card id, because partitioning (and so per-card ordering) depends on it.
    """
    if key is None:
        raise ValidationError("missing key: the message key must be the card_id")
    try:
        transaction = Transaction.model_validate(record)
    except pydantic.ValidationError as exc:
        raise ValidationError(describe_validation_error(exc)) from None
    if key != transaction.card_id.encode():
        raise ValidationError(
            f"key {key[:64]!r} does not match card_id {transaction.card_id[:64]!r}"
        )
    return transaction


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    """One line per broken rule, `field: message (got value)`, joined by '; '."""
    parts = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "record"
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        shown = "nan" if isinstance(value, float) and math.isnan(value) else repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        parts.append(f"{field}: {message} (got {shown})")
    return "; ".join(parts)


_FIELDS: Final = frozenset(Transaction.model_fields)
_NONE_TYPE: Final = type(None)
_VALUE_TYPES: Final[tuple[tuple[str, frozenset[type]], ...]] = (
    ("event_time", frozenset({int})),
    ("amount", frozenset({float})),
    ("card_present", frozenset({bool})),
    ("card_avg_amount", frozenset({float, _NONE_TYPE})),
)
"""Fields whose value checks below would pass a value of another type (True for 1, 3 for 3.0),
with the exact types the Avro decoder gives them."""
_LENGTH_LIMITS: Final = (
    ("transaction_id", MAX_ID_LENGTH),
    ("card_id", MAX_ID_LENGTH),
    ("merchant_id", MAX_ID_LENGTH),
    ("merchant_category", MAX_CATEGORY_LENGTH),
)
_KNOWN_CODES: Final[tuple[tuple[str, frozenset[str | None]], ...]] = (
    ("currency", frozenset(CURRENCIES)),
    ("country", frozenset(COUNTRIES)),
    ("channel", frozenset(CHANNELS)),
    ("card_country", frozenset({*COUNTRIES, None})),
)


def screen_transactions(
    columns: Mapping[str, Sequence[Any]], keys: Sequence[bytes | None]
) -> list[int]:
    """Indexes of the records that may break a rule; every other record meets all of them.

    The batch counterpart of `validate_transaction`, for the hot path: `columns` maps each field
    of `Transaction` to one value per record, `keys` holds the message keys. A few whole-column
    passes (set inclusion, min and max, numpy comparisons) check every rule; only a column that
    fails one is looked at record by record. A record it does not name would pass
    `validate_transaction`; a record it names need not fail it: call `validate_transaction` on
    those for the verdict and the reason. Columns that are not exactly the fields of
    `Transaction`, or values of another type than the Avro decoder gives (an int for a float or
    a bool, bytes for a str), make every record suspect.
    """
    count = len(keys)
    if count == 0:
        return []
    every = list(range(count))
    if columns.keys() != _FIELDS or any(len(column) != count for column in columns.values()):
        return every
    for name, types in _VALUE_TYPES:
        if not types.issuperset(map(type, columns[name])):
            return every
    suspect: set[int] = set()
    for name, limit in _LENGTH_LIMITS:
        column = columns[name]
        try:
            "".join(column)  # the cheapest proof that every value is a str, as pydantic wants
        except TypeError:
            return every
        lengths = list(map(len, column))
        if min(lengths) < 1 or max(lengths) > limit:
            suspect.update(i for i, length in enumerate(lengths) if not 1 <= length <= limit)
    for name, known in _KNOWN_CODES:  # only a str (or None) can be in these sets
        column = columns[name]
        try:
            if not known.issuperset(column):
                suspect.update(i for i, code in enumerate(column) if code not in known)
        except TypeError:  # an unhashable value: certainly not a str
            return every
    event_times = columns["event_time"]
    if min(event_times) < 0:
        suspect.update(i for i, millis in enumerate(event_times) if millis < 0)
    amounts = np.array(columns["amount"], dtype=np.float64)
    # NaN fails both comparisons, infinity the second.
    suspect.update(np.flatnonzero(~((amounts >= 0.0) & (amounts <= MAX_AMOUNT))).tolist())
    averages = columns["card_avg_amount"]
    # None becomes NaN here, so look again at what fails: only a float there is wrong.
    as_floats = np.array(averages, dtype=np.float64)
    for i in np.flatnonzero(~((as_floats > 0.0) & (as_floats < math.inf))).tolist():
        if averages[i] is not None:
            suspect.add(i)
    try:
        card_ids = list(map(str.encode, columns["card_id"]))
    except UnicodeEncodeError:  # a lone surrogate, which no UTF-8 decoder gives
        return every
    if card_ids != list(keys):
        suspect.update(i for i, key in enumerate(keys) if key != card_ids[i])
    return sorted(suspect)

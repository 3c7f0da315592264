"""Schemas, Avro round trips and the domain rules of a transaction."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from streamer import serde
from streamer.errors import DecodeError, ValidationError
from streamer.events import Transaction, Verdict, validate_transaction
from streamer.serde import (
    decode_transaction,
    decode_verdict,
    encode_transaction,
    encode_verdict,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def _transaction(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "transaction_id": "6f1c7c1e-0000-4000-8000-000000000001",
        "event_time": 1_767_225_600_000,
        "card_id": "card-000001",
        "merchant_id": "m-42",
        "merchant_category": "grocery",
        "amount": 23.5,
        "currency": "EUR",
        "country": "DE",
        "channel": "pos",
        "card_present": True,
        "card_country": "DE",
        "card_avg_amount": 40.0,
    }
    record.update(changes)
    return record


class TestSchemas:
    def test_transaction_schema_has_the_contract_fields(self) -> None:
        """transaction.avsc carries every field the contract names, with its type."""
        schema = json.loads((SCHEMAS / "transaction.avsc").read_text())
        fields = {field["name"]: field["type"] for field in schema["fields"]}
        assert schema["name"] == "Transaction"
        assert fields["event_time"] == {"type": "long", "logicalType": "timestamp-millis"}
        assert fields["amount"] == "double"
        assert fields["card_present"] == "boolean"
        for name in ("transaction_id", "card_id", "merchant_id", "merchant_category"):
            assert fields[name] == "string"

    def test_optional_fields_have_defaults(self) -> None:
        """Fields beyond the contract's are optional with a default, so old writers still work."""
        schema = json.loads((SCHEMAS / "transaction.avsc").read_text())
        contract = {
            "transaction_id", "event_time", "card_id", "merchant_id", "merchant_category",
            "amount", "currency", "country", "channel", "card_present",
        }  # fmt: skip
        for field in schema["fields"]:
            if field["name"] not in contract:
                assert "default" in field, field["name"]

    def test_verdict_schema_has_the_contract_fields(self) -> None:
        """verdict.avsc carries every field the contract names."""
        schema = json.loads((SCHEMAS / "verdict.avsc").read_text())
        names = {field["name"] for field in schema["fields"]}
        assert schema["name"] == "Verdict"
        assert set(Verdict.model_fields) == names

    @pytest.mark.parametrize("name", ["transaction.avsc", "verdict.avsc"])
    def test_package_copy_equals_the_documented_schema(self, name: str) -> None:
        """streamer/schemas/ (what the package reads) is byte for byte the top-level schemas/."""
        packaged = serde.SCHEMAS.joinpath(name).read_bytes()
        assert packaged == (SCHEMAS / name).read_bytes(), (
            f"streamer/schemas/{name} differs from schemas/{name}: copy the top-level one over"
        )

    def test_package_ships_no_other_schema(self) -> None:
        """Every schema of the top level is in the package and the other way round."""
        packaged = {entry.name for entry in serde.SCHEMAS.iterdir() if entry.name.endswith(".avsc")}
        assert packaged == {path.name for path in SCHEMAS.glob("*.avsc")}


class TestAvro:
    def test_transaction_round_trip(self) -> None:
        """Encoding then decoding gives back the same record, timestamps as integer ms."""
        record = _transaction()
        assert decode_transaction(encode_transaction(record)) == record

    def test_missing_optional_fields_decode_as_none(self) -> None:
        """A record written without the optional fields reads them as None."""
        record = _transaction()
        del record["card_country"], record["card_avg_amount"]
        decoded = decode_transaction(encode_transaction(record))
        assert decoded["card_country"] is None
        assert decoded["card_avg_amount"] is None

    @pytest.mark.parametrize(
        "value",
        [b"", b"\xff\xff\xff\xff", b"\x02\x80", b'{"json": true}'],
        ids=["empty", "bad-varint", "bad-utf8", "json"],
    )
    def test_garbage_is_a_decode_error(self, value: bytes) -> None:
        """Bytes that are not a Transaction raise DecodeError with a reason."""
        with pytest.raises(DecodeError, match="not an Avro Transaction"):
            decode_transaction(value)

    def test_trailing_bytes_are_a_decode_error(self) -> None:
        """A valid record followed by extra bytes is not one record."""
        with pytest.raises(DecodeError, match="trailing bytes"):
            decode_transaction(encode_transaction(_transaction()) + b"\x00")

    def test_truncated_record_is_a_decode_error(self) -> None:
        """Half a record is refused."""
        value = encode_transaction(_transaction())
        with pytest.raises(DecodeError):
            decode_transaction(value[: len(value) // 2])

    def test_verdict_round_trip(self) -> None:
        """Verdicts round-trip through Avro."""
        verdict = {
            "transaction_id": "t-1",
            "card_id": "card-1",
            "score": 0.25,
            "is_fraud": False,
            "threshold": 0.5,
            "model_name": "fraud-hgb",
            "model_version": "1",
            "event_time": 1,
            "scored_at": 2,
        }
        assert decode_verdict(encode_verdict(verdict)) == verdict
        Verdict.model_validate(verdict)


class TestValidation:
    def test_valid_record_passes(self) -> None:
        """A well-formed record with a matching key validates."""
        transaction = validate_transaction(_transaction(), b"card-000001")
        assert isinstance(transaction, Transaction)

    @pytest.mark.parametrize(
        ("changes", "expected"),
        [
            ({"amount": -1.0}, "amount: Input should be greater than or equal to 0"),
            ({"amount": math.nan}, "amount: Input should be a finite number (got nan)"),
            ({"amount": math.inf}, "amount: Input should be a finite number"),
            ({"currency": "XYZ"}, "currency: unknown ISO 4217 currency code (got 'XYZ')"),
            ({"currency": "eur"}, "currency: unknown ISO 4217"),
            ({"country": "UK"}, "country: unknown ISO 3166-1 alpha-2 country code"),
            ({"card_country": "XX"}, "card_country: unknown ISO 3166-1"),
            ({"channel": "telepathy"}, "channel: unknown channel"),
            ({"transaction_id": ""}, "transaction_id: String should have at least 1 character"),
            ({"event_time": -5}, "event_time: Input should be greater than or equal to 0"),
            ({"card_avg_amount": 0.0}, "card_avg_amount"),
        ],
    )
    def test_domain_rule_violations(self, changes: dict[str, Any], expected: str) -> None:
        """Each broken rule is a ValidationError whose reason names the field and the value."""
        with pytest.raises(ValidationError) as caught:
            validate_transaction(_transaction(**changes), b"card-000001")
        assert expected in str(caught.value)

    def test_every_broken_rule_is_reported(self) -> None:
        """Two broken rules give one reason naming both."""
        with pytest.raises(ValidationError) as caught:
            validate_transaction(_transaction(amount=-1.0, currency="XYZ"), b"card-000001")
        assert "amount" in str(caught.value)
        assert "currency" in str(caught.value)

    def test_missing_key(self) -> None:
        """A record without a key cannot be partitioned by card and is refused."""
        with pytest.raises(ValidationError, match="missing key"):
            validate_transaction(_transaction(), None)

    def test_key_must_match_card(self) -> None:
        """The key must be the card_id."""
        with pytest.raises(ValidationError, match="does not match card_id"):
            validate_transaction(_transaction(), b"card-999999")

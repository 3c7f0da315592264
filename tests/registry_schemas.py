"""Writer schemas of the Schema Registry tests (unit and integration): one that Avro resolves to
`transaction.avsc`, one it cannot."""

from __future__ import annotations

import copy
from typing import Any

from streamer.serde import TRANSACTION_SCHEMA


def evolved_writer() -> dict[str, Any]:
    """transaction.avsc reordered, with one optional field more and one optional field less."""
    schema = copy.deepcopy(TRANSACTION_SCHEMA)
    fields = [f for f in schema["fields"] if f["name"] != "card_avg_amount"]
    fields.reverse()
    fields.insert(3, {"name": "device_id", "type": ["null", "string"], "default": None})
    schema["fields"] = fields
    return schema


def incompatible_writer() -> dict[str, Any]:
    """transaction.avsc with amount as a string: no Avro resolution reads it as a double."""
    schema = copy.deepcopy(TRANSACTION_SCHEMA)
    for field in schema["fields"]:
        if field["name"] == "amount":
            field["type"] = "string"
    return schema

"""Scoring JSON transactions with the stream's pipeline and a replica's card histories. No HTTP.

A request's transactions take the stream's path: each JSON object becomes the Avro record it
stands for (event time in epoch milliseconds or RFC 3339, a JSON integer amount as a double),
is encoded with `serde.encode_transaction`, and the encoded values go through
`Pipeline.process`, which decodes, validates, builds features and scores them exactly as it does
a polled batch. A transaction the pipeline refuses gets the stream's dead-letter reason, word for
word; one that is not even an Avro Transaction (a field missing or of the wrong JSON type) gets
the reason the same domain rules give for it (`events.validate_transaction`).

The card histories come from a `CardSource` (the changelog replica). Each request scores against
new copies decoded from the replica's bytes, so a request never changes the history the next one
sees: the transaction reaches the stream too, and is applied there. Within one batch, a card's
transactions are scored in order, each after the batch's earlier ones, as the stream would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import fastavro
import fastavro.validation
import pydantic

from streamer.errors import RecordError, ValidationError
from streamer.events import Transaction, validate_transaction
from streamer.pipeline import Pipeline
from streamer.serde import (
    TRANSACTION_FIELDS,
    TRANSACTION_SCHEMA,
    decode_verdict,
    encode_transaction,
)
from streamer.serve.replica import CardEntry
from streamer.state.card import CardHistory

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)
_SCHEMA: Final = fastavro.parse_schema(TRANSACTION_SCHEMA)
_DOUBLE_FIELDS: Final = ("amount", "card_avg_amount")
_OPTIONAL_FIELDS: Final = tuple(
    name for name, info in Transaction.model_fields.items() if not info.is_required()
)


class CardSource(Protocol):
    """Where card histories come from (`replica.CardReplica`)."""

    def card(self, card_id: str) -> CardEntry | None:
        """The card's latest history entry (None: no history)."""
        ...

    def history(self, card_id: str, entry: CardEntry) -> CardHistory:
        """A history equal to `entry`'s that the caller owns (may change)."""
        ...


@dataclass(frozen=True, slots=True)
class ItemError:
    """Why one transaction was not scored."""

    stage: str
    """`decode`, `validate` or `score`: the dead-letter stage the stream would give it."""
    reason: str
    """The stream's dead-letter reason, word for word."""
    fields: list[str] = field(default_factory=list)
    """The transaction's fields the reason names (empty when it names none)."""

    def as_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "reason": self.reason, "fields": self.fields}


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One transaction's outcome: a verdict with its history's freshness, or an error."""

    verdict: dict[str, Any] | None
    history: dict[str, Any] | None
    error: ItemError | None

    def as_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error.as_json()}
        return {"verdict": self.verdict, "history": self.history}


def parse_event_time(value: Any) -> Any:
    """Epoch milliseconds as they are; an RFC 3339 string as epoch milliseconds.

    Raises `ValidationError` for a string that is not an RFC 3339 time with an offset. Anything
    else is returned unchanged, for the domain rules to judge.
    """
    if not isinstance(value, str):
        return value
    shown = repr(value if len(value) <= 80 else value[:77] + "...")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"event_time: not epoch milliseconds or an RFC 3339 time (got {shown})"
        ) from None
    if moment.tzinfo is None:
        raise ValidationError(
            f"event_time: an RFC 3339 time needs an offset, Z or +hh:mm (got {shown})"
        )
    return (moment - _EPOCH) // _MILLISECOND


def to_record(item: Any) -> dict[str, Any]:
    """The Avro record a JSON transaction stands for (not validated yet).

    Raises `ValidationError` for what is not a JSON object, or a malformed event time.
    """
    if not isinstance(item, dict):
        raise ValidationError(f"record: expected a JSON object (got {type(item).__name__})")
    record = dict(item)
    for name in _OPTIONAL_FIELDS:  # the schema's defaults, as an Avro writer fills them in
        record.setdefault(name, None)
    if "event_time" in record:
        record["event_time"] = parse_event_time(record["event_time"])
    for name in _DOUBLE_FIELDS:
        if type(record.get(name)) is int:  # JSON has one number type; Avro's double takes 12
            record[name] = float(record[name])
    return record


def encode_item(item: Any) -> tuple[bytes, bytes]:
    """The Avro value and message key the stream would receive for this JSON transaction.

    Raises `ValidationError` (the domain rules' reason) when it cannot be an Avro Transaction.
    """
    record = to_record(item)
    card_id = record.get("card_id")
    unknown = record.keys() - set(TRANSACTION_FIELDS)
    failure = f"unknown fields {sorted(unknown)}"
    # fastavro's writer coerces some values ("12.5" for a double); its validator does not.
    if not unknown and fastavro.validation.validate(record, _SCHEMA, raise_errors=False):
        try:
            return encode_transaction(record), card_id.encode()  # type: ignore[union-attr]
        except Exception as exc:  # a lone surrogate in a string: the domain rules say it better
            failure = str(exc)
    elif not unknown:
        failure = "a field's type is not the schema's"
    key = card_id.encode(errors="replace") if isinstance(card_id, str) else None
    try:
        validate_transaction(record, key)  # raises with the stream's words, as it should here
    except UnicodeError:  # a lone surrogate ("\\ud800"), which JSON allows and UTF-8 does not
        raise ValidationError("record: a string is not valid Unicode") from None
    raise ValidationError(f"record: not an Avro Transaction ({failure})")


def fields_named(record: Any) -> list[str]:
    """The fields of `record` that break a domain rule (for a refusal's `fields`)."""
    try:
        Transaction.model_validate(to_record(record))
    except pydantic.ValidationError as exc:
        return sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]})
    except ValidationError as exc:
        return ["event_time"] if str(exc).startswith("event_time:") else []
    return []


class _ReplicaView:
    """A `StateView` of copies: histories decoded anew from the replica for each request."""

    def __init__(self, source: CardSource) -> None:
        self._source = source
        self.used: dict[str, CardEntry | None] = {}

    def checkout(self, rows: Sequence[int], card_ids: Sequence[str]) -> dict[str, CardHistory]:
        histories: dict[str, CardHistory] = {}
        for card_id in card_ids:
            if card_id in self.used:
                continue
            entry = self.used[card_id] = self._source.card(card_id)
            if entry is not None:
                histories[card_id] = self._source.history(card_id, entry)
        return histories


class OnlineScorer:
    """Scores JSON transactions; `pipeline.scorer` is the model slot, read once per call.

    Not thread-safe, like the pipeline: call it from one thread (the server's event loop).
    """

    def __init__(self, pipeline: Pipeline, source: CardSource) -> None:
        self.pipeline = pipeline
        self.source = source

    def score(self, items: Sequence[Any], *, scored_at: int | None = None) -> list[ItemResult]:
        """Each item's outcome, in order; never raises for a bad item."""
        results: list[ItemResult | None] = [None] * len(items)
        values: list[bytes | None] = []
        keys: list[bytes | None] = []
        positions: list[int] = []
        for index, item in enumerate(items):
            try:
                value, key = encode_item(item)
            except RecordError as exc:
                results[index] = ItemResult(None, None, self._error(exc, item))
                continue
            values.append(value)
            keys.append(key)
            positions.append(index)
        if values:
            view = _ReplicaView(self.source)
            now = time.time_ns() // 1_000_000 if scored_at is None else scored_at
            scored = self.pipeline.process(values, keys, view, scored_at=now)
            for position, index in enumerate(positions):
                error = scored.errors.get(position)
                if error is not None:
                    results[index] = ItemResult(None, None, self._error(error, items[index]))
                    continue
                verdict = decode_verdict(scored.verdicts[position] or b"")
                entry = view.used.get(verdict["card_id"])
                results[index] = ItemResult(verdict, _freshness(entry), None)
        return [result for result in results if result is not None]

    @staticmethod
    def _error(error: RecordError, item: Any) -> ItemError:
        fields = fields_named(item) if error.stage == "validate" else []
        return ItemError(error.stage, str(error), fields)


def _freshness(entry: CardEntry | None) -> dict[str, Any]:
    """Which changelog record the card's history came from (all None: no history known)."""
    if entry is None:
        return {"found": False, "partition": None, "changelog_offset": None, "updated_at": None}
    return {
        "found": True,
        "partition": entry.partition,
        "changelog_offset": entry.offset,
        "updated_at": entry.timestamp,
    }


_SETTLE_TURNS: Final = 8
"""Most event loop turns a scoring call waits for requests still on their way to the queue."""


class OverloadedError(Exception):
    """Too many transactions are waiting to be scored; the request is refused unscored."""


class Coalescer:
    """Scores the requests that wait at the same time in one pipeline call.

    The model costs about as much for one row as for hundreds (a predict call has a fixed cost of
    milliseconds), so a process that scored request after request would top out at a few hundred
    a second. Instead, each request waits in a queue, and `run` (a task on the event loop) scores
    everything queued when it gets its turn, in one call, then hands each request its results.
    Under light load a request is scored alone at once; under heavy load, requests that arrived
    while a call was running go together in the next. Nothing waits on a timer.

    Two requests with a card in common never share a call (the pipeline applies a call's
    transactions of a card one after another, and one request must not see another's), and a
    call takes requests in arrival order up to `max_items` transactions (the first always).
    At most `max_queued` transactions wait (default twice `max_items`, a fraction of a second of
    scoring); beyond that a request is refused at once (`OverloadedError`).
    """

    def __init__(self, scorer: OnlineScorer, max_items: int, max_queued: int | None = None) -> None:
        self.scorer = scorer
        self._max_items = max_items
        self._max_queued = 2 * max_items if max_queued is None else max_queued
        self._queued = 0
        self._queue: list[tuple[Sequence[Any], asyncio.Future[list[ItemResult]]]] = []
        self._wake = asyncio.Event()

    async def score(self, items: Sequence[Any]) -> list[ItemResult]:
        """`OnlineScorer.score(items)`, scored with whatever else is waiting.

        Raises `OverloadedError` when more than `max_queued` transactions are waiting already:
        a server that queued without bound would answer every request late, and go on scoring
        requests whose clients have given up.
        """
        if self._queued + len(items) > self._max_queued and self._queue:
            raise OverloadedError(
                f"{self._queued} transactions are waiting to be scored (limit {self._max_queued})"
            )
        future: asyncio.Future[list[ItemResult]] = asyncio.get_running_loop().create_future()
        self._queue.append((items, future))
        self._queued += len(items)
        self._wake.set()
        return await future

    async def run(self) -> None:
        """Score queued requests until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                # Requests read while the last call ran need a few turns of the event loop to
                # reach the queue: wait until it stops growing, so they go in this call.
                for _ in range(_SETTLE_TURNS):
                    waiting = len(self._queue)
                    await asyncio.sleep(0)
                    if len(self._queue) == waiting:
                        break
                round_ = self._take()
                self._queued -= sum(len(items) for items, _ in round_)
                self._score(round_)

    def _take(self) -> list[tuple[Sequence[Any], asyncio.Future[list[ItemResult]]]]:
        taken: list[tuple[Sequence[Any], asyncio.Future[list[ItemResult]]]] = []
        left: list[tuple[Sequence[Any], asyncio.Future[list[ItemResult]]]] = []
        cards: set[str] = set()
        size = 0
        for request in self._queue:
            items = request[0]
            mine = _cards(items)
            if taken and (size + len(items) > self._max_items or not cards.isdisjoint(mine)):
                left.append(request)
                continue
            taken.append(request)
            cards |= mine
            size += len(items)
        self._queue = left
        return taken

    def _score(self, round_: list[tuple[Sequence[Any], asyncio.Future[list[ItemResult]]]]) -> None:
        live = [(items, future) for items, future in round_ if not future.done()]
        if not live:
            return
        try:
            results = self.scorer.score([item for items, _ in live for item in items])
        except Exception:  # one request's failure must not fail the others: score each alone
            for items, future in live:
                try:
                    future.set_result(self.scorer.score(items))
                except Exception as exc:  # the handler turns it into a logged 500
                    future.set_exception(exc)
            return
        start = 0
        for items, future in live:
            future.set_result(results[start : start + len(items)])
            start += len(items)


def _cards(items: Sequence[Any]) -> set[str]:
    return {
        item["card_id"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("card_id"), str)
    }

"""The scoring pipeline: values and keys in, verdicts and per-record errors out. No Kafka.

One call scores one batch: decode and validate every value (`serde.decode_and_validate`), build
the feature matrix with the card histories the caller hands in (`features`), score it in one model
call, and encode the verdicts. The stream (`streamer.app`) calls it per polled batch with the
state of the batch's partitions; a file job or a request handler calls it the same way with a state
of their own, so every mode scores with the same code.

The state is passed in explicitly, as a `StateView`: the pipeline asks it for the histories of the
batch's good records and updates them in place (each record sees its card's history before it,
then is added to it). Records that fail decoding or validation never touch the state; a record the
model fails on has already been added (it happened, whatever its score).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import structlog

from streamer.errors import RecordError, ScoreError
from streamer.features import build_features_from_columns
from streamer.model.scorer import Scorer
from streamer.serde import (
    TransactionBatch,
    decode_and_validate,
    encode_verdicts,
    validate_columns,
)
from streamer.state.card import CardHistory

log = structlog.get_logger(__name__)


class StateView(Protocol):
    """The card histories a batch is scored with."""

    def checkout(self, rows: Sequence[int], card_ids: Sequence[str]) -> dict[str, CardHistory]:
        """The histories of `card_ids` (of the batch's records `rows`), to read and update.

        The pipeline updates them in place and adds a history for a card that has none; the
        caller decides what happens to them afterwards.
        """
        ...


class Histories:
    """A `StateView` over one dict of histories that the pipeline updates (files, training)."""

    def __init__(self, histories: dict[str, CardHistory] | None = None) -> None:
        self.histories: dict[str, CardHistory] = {} if histories is None else histories

    def checkout(self, rows: Sequence[int], card_ids: Sequence[str]) -> dict[str, CardHistory]:
        return self.histories


class BatchDecoder(Protocol):
    """Values, keys and the size limit in, a decoded and validated batch out
    (`serde.decode_and_validate`, or `registry.RegistryDecoder.decode_and_validate` for a topic
    written through a Schema Registry); `lap("decode")` between decoding and validation."""

    def __call__(
        self,
        values: Sequence[bytes | None],
        keys: Sequence[bytes | None],
        max_bytes: int,
        *,
        lap: Callable[[str], None] | None = None,
    ) -> TransactionBatch: ...


class Laps(Protocol):
    """Receives the end of each stage: decode, validate, features, predict, encode.

    The bench's breakdown and the scorer's metrics time the pipeline with it.
    """

    def lap(self, stage: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Scored:
    """One batch after the pipeline."""

    batch: TransactionBatch
    """The decoded good records (columns) and the decode and validation errors."""
    scores: np.ndarray
    """P(fraud) of each good record, in the order of `batch.indexes` (NaN: the model failed)."""
    features: np.ndarray
    """The feature matrix the scores come from, a row per good record."""
    verdicts: list[bytes | None]
    """Per input record: its encoded verdict (b"" when not asked to encode), or None when
    `errors` has its error."""
    errors: dict[int, RecordError]
    """Per failed input record (by index): why (stage decode, validate or score)."""
    flagged: int
    """Verdicts with is_fraud true."""
    model_name: str
    model_version: str
    threshold: float


class Pipeline:
    """Scores batches of Avro-encoded transactions with one model; not thread-safe."""

    def __init__(
        self,
        scorer: Scorer,
        *,
        max_event_bytes: int,
        decode: BatchDecoder = decode_and_validate,
    ) -> None:
        self.scorer = scorer
        self._max_event_bytes = max_event_bytes
        self._decode = decode

    def process(
        self,
        values: Sequence[bytes | None],
        keys: Sequence[bytes | None],
        state: StateView,
        *,
        scored_at: int | None = None,
        laps: Laps | None = None,
    ) -> Scored:
        """Score record i = (`values[i]`, `keys[i]`) for every i, with the histories of `state`.

        `scored_at` (ms) goes in every verdict; default now. Never raises for a bad record: its
        error is in `Scored.errors` and its verdict is None. What the decoder raises for the
        whole batch (`SchemaRegistryUnavailableError`) it raises before `state` is touched.
        """
        batch = self._decode(
            values, keys, self._max_event_bytes, lap=None if laps is None else laps.lap
        )
        if laps is not None:
            laps.lap("validate")
        return self._score_batch(batch, len(values), state, scored_at, laps)

    def process_columns(
        self,
        columns: Mapping[str, Sequence[Any]],
        state: StateView,
        *,
        scored_at: int | None = None,
        encode: bool = True,
    ) -> Scored:
        """`process` for records held by field (a file's rows): record i is columns[name][i].

        `columns` is as `serde.validate_columns` takes it; validation, features, scoring and
        verdicts are those of `process`, and indexes in `Scored` are positions in the columns.
        With `encode` false the verdicts are not encoded (a caller that writes them another
        way): `Scored.verdicts` then holds b"" for each record with a verdict.
        """
        batch = validate_columns(columns, wire=encode)
        count = len(columns["transaction_id"])
        return self._score_batch(batch, count, state, scored_at, None, encode=encode)

    def _score_batch(
        self,
        batch: TransactionBatch,
        count: int,
        state: StateView,
        scored_at: int | None,
        laps: Laps | None,
        *,
        encode: bool = True,
    ) -> Scored:
        """Features, scores and verdicts of the good records of `batch` (of `count` records)."""
        scorer = self.scorer  # read once: a batch is scored by one model throughout
        histories = state.checkout(batch.indexes, batch.columns["card_id"])
        features = build_features_from_columns(batch.columns, histories)
        if laps is not None:
            laps.lap("features")
        scores = self._score(scorer, features)
        if laps is not None:
            laps.lap("predict")
        threshold = scorer.threshold
        score_list: list[float] = scores.tolist()
        encoded = (
            encode_verdicts(
                batch,
                score_list,
                threshold=threshold,
                model_name=scorer.name,
                model_version=scorer.version,
                scored_at=time.time_ns() // 1_000_000 if scored_at is None else scored_at,
            )
            if encode
            else [b""] * len(score_list)
        )
        verdicts: list[bytes | None] = [None] * count
        errors: dict[int, RecordError] = dict(batch.errors)
        flagged = 0
        for index, score, value in zip(batch.indexes, score_list, encoded, strict=True):
            if not 0.0 <= score <= 1.0:  # also catches NaN
                errors[index] = ScoreError(f"model returned score {score!r}")
                continue
            verdicts[index] = value
            flagged += score >= threshold
        if laps is not None:
            laps.lap("encode")
        return Scored(
            batch,
            scores,
            features,
            verdicts,
            errors,
            flagged,
            scorer.name,
            scorer.version,
            threshold,
        )

    @staticmethod
    def _score(scorer: Scorer, features: np.ndarray) -> np.ndarray:
        """Score the matrix in one call; if the model fails, isolate the rows it fails on."""
        try:
            return scorer.score(features)
        except Exception as exc:  # the model is third-party code; a failure must not lose records
            log.warning("batch scoring failed, scoring records one by one", error=repr(exc))
        scores = np.empty(len(features))
        for index in range(len(features)):
            try:
                scores[index] = scorer.score(features[index : index + 1])[0]
            except Exception as exc:  # as above; NaN routes the record to the dead-letter topic
                log.warning("record scoring failed", error=repr(exc))
                scores[index] = np.nan
        return scores

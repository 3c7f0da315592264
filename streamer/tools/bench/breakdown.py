"""What the scorer's hot loop and its card state cost, measured in process.

`time_hot_loop` runs the scorer's pipeline and produce loop (`ScoringApp.process`) over batches
prepared in memory, and adds up per stage both wall time (`perf_counter`) and this thread's CPU
time (`thread_time`). On a busy machine wall time also counts the moments the thread waited for a
core; CPU time does not, but misses librdkafka's own threads (compression, network). Consuming is
left out (the pass-through measures Kafka's share). When the hot path in `streamer/app.py`
changes, change this one function to match.

`card_histories` builds the card state a stream of records leaves behind, for the breakdown to
start from; `held_state_bytes` measures what such a state holds in memory.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from streamer.app import CARD_STORE, BatchState
from streamer.headers import SOURCE_OFFSET, source_header_prefix
from streamer.kafka.clients import OutputProducer
from streamer.kafka.delivery import DeliveryTracker
from streamer.model.scorer import Scorer
from streamer.pipeline import Pipeline
from streamer.state.card import CARD_HISTORY_CODEC, HISTORY_FEATURES, CardHistory, history_features
from streamer.state.store import KeyedStore
from streamer.tools.bench import BenchError

STAGES: Final = ("decode", "validate", "features", "predict", "encode", "produce")

InputRecord = tuple[bytes, bytes, int, int]
"""(key, value, source partition, source offset) of one input record."""

FLUSH_SECONDS: Final = 60.0


@dataclass(slots=True)
class StageTimes:
    """Seconds per stage, wall clock and CPU time of the calling thread, in `STAGES` order."""

    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    _last: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        self._last = (time.perf_counter(), time.thread_time())

    def lap(self, stage: str) -> None:
        """Charge the time since the last `start` or `lap` to `stage`."""
        now = (time.perf_counter(), time.thread_time())
        self.wall[stage] += now[0] - self._last[0]
        self.cpu[stage] += now[1] - self._last[1]
        self._last = now


def time_hot_loop(
    batches: Sequence[Sequence[InputRecord]],
    scorer: Scorer,
    producer: OutputProducer,
    *,
    source_topic: str,
    output_topic: str,
    max_event_bytes: int,
    state: Mapping[str, bytes] | None = None,
) -> StageTimes:
    """Time spent per stage (`STAGES`) turning `batches` into produced, acknowledged verdicts.

    The batches go through the scorer's own pipeline (`pipeline.Pipeline`, timed by its laps)
    with a card state kept across batches, as the scorer keeps it (`app.BatchState`; taking the
    histories back counts as `features`). The state starts from `state` (card id → history
    encoded by `CARD_HISTORY_CODEC`), restored into the partition of the card's first record as
    a scorer restores its changelog and decoded, both untimed, so every call starts from the same
    histories; without it, from empty. A scorer decodes a restored card once, at its first
    record after the restore (when its store defers decoding): a cost of restoring, not of the
    steady state timed here. Decoding and validation are one call in the pipeline
    (`serde.decode_and_validate`), which laps `decode` once the values are decoded, before
    validation. `produce` includes serving delivery reports (the offset tracking callbacks) and
    the final flush, as the scorer pays for both. Raises `BenchError` if a record fails a stage or
    an output is not delivered: the breakdown is only meaningful for the happy path.
    """
    times = StageTimes()
    tracker = DeliveryTracker()
    pipeline = Pipeline(scorer, max_event_bytes=max_event_bytes)
    store = KeyedStore(CARD_STORE, CARD_HISTORY_CODEC, keep_undo=False)
    restored: set[bytes] = set()
    for batch in batches:
        for key, _value, partition, _offset in batch:
            if partition not in store.partitions:
                store.assign(partition)
            if state and key not in restored:
                restored.add(key)
                card = key.decode()
                if card in state:
                    store.restore(partition, [(key, state[card])])
    for partition in store.partitions:
        store.values(partition)  # decodes whatever the restore kept as bytes
    for batch in batches:
        times.start()
        keys = [key for key, _value, _partition, _offset in batch]
        sources = [(source_topic, partition, offset) for _key, _value, partition, offset in batch]
        batch_state = BatchState(store, [partition for _, partition, _ in sources])
        scored = pipeline.process(
            [value for _key, value, _partition, _offset in batch], keys, batch_state, laps=times
        )
        columns = scored.batch.columns
        batch_state.checkin(columns["card_id"], columns["event_time"], sources)
        times.lap("features")
        if scored.errors:
            index, error = min(scored.errors.items())
            raise BenchError(f"record {index} of a synthetic batch was refused: {error}")
        callbacks = tracker.track_batch(sources, keys, scored.verdicts)
        prefixes = {(t, p): source_header_prefix(t, p) for t, p, _ in sources}
        for (key, _value, partition, offset), value, on_delivery in zip(
            batch, scored.verdicts, callbacks, strict=True
        ):
            topic_header, partition_header = prefixes[(source_topic, partition)]
            producer.produce(
                output_topic,
                key,
                value,
                [topic_header, partition_header, (SOURCE_OFFSET, str(offset).encode())],
                on_delivery,
            )
        producer.poll(0)
        times.lap("produce")
    times.start()
    remaining = producer.flush(FLUSH_SECONDS)
    times.lap("produce")
    producer.errors.raise_if_fatal()
    if remaining or tracker.failures:
        raise BenchError(
            f"{remaining} outputs unacknowledged and {len(tracker.failures)} failed during the"
            " hot-loop breakdown"
        )
    return times


def card_histories(records: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, CardHistory]:
    """Each card's history after `records` (transaction dicts, in stream order), by card id.

    Built by `history_features`, as the scorer builds it, `batch_size` records at a time.
    """
    histories: dict[str, CardHistory] = {}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        _apply(histories, batch, [record["card_id"] for record in batch])
    return histories


def held_state_bytes(records: Sequence[Mapping[str, Any]], batch_size: int) -> tuple[int, int, int]:
    """(cards, bytes restored, bytes in use) a card store holds for `records`, by tracemalloc.

    The histories are built from the records (`card_histories`) and encoded as the changelog
    holds them. Then, traced, an empty `KeyedStore` restores them the way the restorer applies
    changelog records (new bytes, card ids decoded from them): "restored" is what it holds then,
    the changelog's bytes when the store decodes a value only at its first use. Every value is
    then decoded (`KeyedStore.values`), as each card's next record would: "in use" is what it
    holds then, the dict, one card id string per card and the histories. A decoded history's
    arrays and dicts are sized to fit; one that keeps growing in a running scorer carries some
    spare room too, so "in use" is less than after hours of scoring, by that room (not measured
    here). Merchant and country ids are interned and shared by all cards; those already alive
    here are not counted, a few hundred KB in all. Building the store under tracing instead
    would be exact for a running scorer, but tracing every allocation slows `history_features`
    more than tenfold.
    """
    encode = CARD_HISTORY_CODEC.encode
    # Held as bytearrays: a changelog record's key and value arrive as new bytes objects, which
    # `bytes()` makes under tracing (bytes of bytes would be the same object, not counted).
    changelog = [
        (bytearray(card.encode()), bytearray(encode(history)))
        for card, history in card_histories(records, batch_size).items()
    ]
    store = KeyedStore(CARD_STORE, CARD_HISTORY_CODEC, keep_undo=False)
    partition = 0
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store.assign(partition)
        for key, value in changelog:
            store.restore(partition, [(bytes(key), bytes(value))])
        store.restored(partition, len(records))
        gc.collect()
        restored = tracemalloc.get_traced_memory()[0] - before
        store.values(partition)
        gc.collect()
        in_use = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return len(store), restored, in_use


def _apply(
    histories: dict[str, CardHistory],
    batch: Sequence[Mapping[str, Any]],
    card_ids: Sequence[str],
) -> None:
    """Apply one batch of transaction dicts (card i: `card_ids[i]`) to `histories`."""
    out = np.empty((len(batch), len(HISTORY_FEATURES)), dtype=np.float64)
    history_features(
        histories,
        card_ids,
        [record["event_time"] for record in batch],
        [record["amount"] for record in batch],
        [record["merchant_id"] for record in batch],
        [record["country"] for record in batch],
        out,
    )

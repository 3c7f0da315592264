"""Per-record cost of each stage of the scorer's hot loop, measured in process.

`time_hot_loop` runs the steps `ScoringApp.process` runs, with the same functions, over batches
prepared in memory, and adds up per stage both wall time (`perf_counter`) and this thread's CPU
time (`thread_time`). On a busy machine wall time also counts the moments the thread waited for a
core; CPU time does not, but misses librdkafka's own threads (compression, network). Consuming is
left out (the pass-through measures Kafka's share). When the hot path in `streamer/app.py`
changes, change this one function to match.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from streamer.events import screen_transactions
from streamer.features import build_features_from_columns
from streamer.headers import SOURCE_OFFSET, source_header_prefix
from streamer.kafka.clients import OutputProducer
from streamer.kafka.delivery import DeliveryTracker
from streamer.model.scorer import Scorer
from streamer.serde import decode_and_validate, encode_verdicts
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

    def move_lap(self, source: str, stage: str) -> None:
        """Charge the time since the last lap to `stage` and take it off `source`.

        For a step timed once more on its own, to split a call that does two stages' work.
        """
        now = (time.perf_counter(), time.thread_time())
        wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
        self.wall[stage] += wall
        self.cpu[stage] += cpu
        self.wall[source] -= wall
        self.cpu[source] -= cpu
        self._last = now


def time_hot_loop(
    batches: Sequence[Sequence[InputRecord]],
    scorer: Scorer,
    producer: OutputProducer,
    *,
    source_topic: str,
    output_topic: str,
    max_event_bytes: int,
) -> StageTimes:
    """Time spent per stage (`STAGES`) turning `batches` into produced, acknowledged verdicts.

    Decoding and validation are one call in the scorer (`serde.decode_and_validate`), whose
    validation is `events.screen_transactions` over the decoded columns; that screen is timed once
    more on its own and moved from `decode` to `validate`. `produce` includes serving delivery
    reports (the offset tracking callbacks) and the final flush, as the scorer pays for both.
    Raises `BenchError` if a record fails a stage or an output is not delivered: the breakdown is
    only meaningful for the happy path.
    """
    times = StageTimes()
    tracker = DeliveryTracker()
    model_name, model_version, threshold = scorer.name, scorer.version, scorer.threshold
    for batch in batches:
        times.start()
        keys = [key for key, _value, _partition, _offset in batch]
        decoded = decode_and_validate(
            [value for _key, value, _partition, _offset in batch], keys, max_event_bytes
        )
        times.lap("decode")
        if decoded.errors:
            index, error = decoded.errors[0]
            raise BenchError(f"record {index} of a synthetic batch was refused: {error}")
        screen_transactions(decoded.columns, keys)
        times.move_lap("decode", "validate")
        features = build_features_from_columns(decoded.columns)
        times.lap("features")
        scores: list[float] = scorer.score(features).tolist()
        times.lap("predict")
        values = encode_verdicts(
            decoded,
            scores,
            threshold=threshold,
            model_name=model_name,
            model_version=model_version,
            scored_at=time.time_ns() // 1_000_000,
        )
        times.lap("encode")
        sources = [(source_topic, partition, offset) for _key, _value, partition, offset in batch]
        callbacks = tracker.track_batch(sources, keys, values)
        prefixes = {(t, p): source_header_prefix(t, p) for t, p, _ in sources}
        for (key, _value, partition, offset), value, score, on_delivery in zip(
            batch, values, scores, callbacks, strict=True
        ):
            if not 0.0 <= score <= 1.0:
                raise BenchError(f"model returned score {score!r}")
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

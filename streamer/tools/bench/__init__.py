"""`scripts/bench`: the scorer measured against the raw-Kafka limit on a real broker.

`python -m streamer.tools.bench run` preloads synthetic events and measures, in one run: the
throughput of a pass-through (the limit) and of `streamer run` in both guarantee modes, with card
state and without it, and with a challenger model scored beside its model, end-to-end latency at
fixed rates for both processors, the scorer's peak memory, scale-out to two processes, how fast a
scorer restores card state from its changelog, what a million cards in state cost in memory, and
the per-record cost of each hot-loop stage.
`python -m streamer.tools.bench passthrough` is the limit itself, run as a process of its own.
See `harness` for how each number is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from streamer.errors import StreamerError


class BenchError(StreamerError):
    """A bench run cannot go on: a process failed, outputs went missing, a wait timed out."""


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """Sizes of one run; the defaults are the full bench, `QUICK` a short one for development."""

    events: int = 500_000
    partitions: int = 4
    throughput_repeats: int = 3
    """Drains per throughput run; the median is reported."""
    rates: tuple[float, ...] = (1_000.0, 5_000.0, 20_000.0)
    latency_seconds: float = 20.0
    """Measured seconds per processor and rate, split over `latency_rounds`.

    Long enough that one stall of the shared machine (at 5,000 events/s a 150 ms pause delays
    about 750 events) stays under 1% of the samples, so it does not decide the p99 alone.
    """
    latency_rounds: int = 10
    warmup_seconds: float = 0.5
    """Unmeasured seconds before each round."""
    breakdown_records: int = 20_000
    state_cards: int = 1_000_000
    """Distinct cards of the state memory run: as many events, each of a card not seen before."""
    until_idle: float = 3.0
    """`--until-idle` of every processor: it exits after this long with nothing to consume.

    The scorer counts it from its partition assignment, so it must outlast the restore of a new
    group's (empty) state, about a second on a busy two-core machine.
    """
    seed: int = 20_240_601
    quick: bool = False
    out_root: Path = Path("bench-results")
    kafka_version: str = "unknown"


QUICK: Final = BenchOptions(
    events=50_000,
    throughput_repeats=1,
    latency_seconds=3.0,
    latency_rounds=2,
    breakdown_records=5_000,
    state_cards=50_000,
    quick=True,
)

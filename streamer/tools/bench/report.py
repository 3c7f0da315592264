"""What a bench run found, judged against the targets, as a table, JSON and a latency plot.

Pure functions over plain data: the harness measures, this module computes percentiles, decides
pass or fail per target and renders. Nothing here touches Kafka; matplotlib is imported only by
`plot_latency_cdfs` (it comes with the `bench` extra).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from streamer.tools.bench import BenchOptions

JSON_SCHEMA: Final = "streamer-bench/1"

PERCENTILES: Final[tuple[tuple[str, float], ...]] = (
    ("p50", 50.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)

# The targets of the performance issue.
MIN_THROUGHPUT_RATIO: Final = 0.5
"""The scorer (at-least-once, full validation) reaches at least this share of the pass-through."""
LATENCY_RATE: Final = 5_000.0
"""Events/s at which the p99 of the scorer is compared with the pass-through's."""
MAX_P99_EXCESS_MS: Final = 5.0
"""The scorer's p99 may exceed the pass-through's by at most this many milliseconds."""
MAX_PEAK_RSS_MB: Final = 300.0
MIN_SCALE_OUT: Final = 1.7
"""Two scorer processes in one group reach at least this multiple of one."""
MIN_STATE_RATIO: Final = 0.7
"""The scorer with card state reaches at least this share of the stateless scorer's throughput."""
MIN_RESTORE_RATE: Final = 200_000.0
"""Changelog records per second a scorer applies when it restores card state."""
MAX_STATEFUL_P99_EXCESS_MS: Final = 10.0
"""The stateful scorer's p99 at `LATENCY_RATE` may exceed the pass-through's by this many ms."""
MIN_METRICS_RATIO: Final = 0.95
"""The scorer serving metrics reaches at least this share of its throughput without them."""
MIN_FILE_SCORE_RATIO: Final = 1.0
"""`streamer score` over a file of the preloaded events reaches at least the stateful scorer's
events/s (at-least-once, one process)."""
MB: Final = 1024 * 1024

SLOW_SENDER: Final = 0.95
"""A paced run that sent below this share of its rate gets a footnote."""

METRICS_PAIR: Final = "metrics on / off"
"""The `PairedRatio` of the scorer users run over the same scorer without metrics."""
STATE_PAIR: Final = "stateful / stateless"
"""The `PairedRatio` of the scorer users run over the same scorer without card state."""

PASSTHROUGH: Final = "pass-through"
SCORER: Final = "scorer"
FILE_SCORER: Final = "streamer score, file"

Status = Literal["pass", "FAIL", "n/a"]


@dataclass(frozen=True, slots=True)
class Throughput:
    """One throughput run over the preloaded topic."""

    name: str
    """`pass-through` or `scorer`."""
    guarantee: str
    processes: int
    events: int = 0
    """Outputs read back (each input exactly once, verified)."""
    seconds: float = math.nan
    """First to last output, by the output records' timestamps."""
    peak_rss_mb: float = math.nan
    """Largest peak RSS among the run's processes."""
    cpu_seconds: float = math.nan
    """User + system CPU time of the run's processes, start-up and idle wait included."""
    available: bool = True
    note: str = ""
    card_state: bool = True
    """The scorer kept card history (`STREAMER_CARD_STATE`); False for the stateless baseline.

    The pass-through keeps no state; its value is not read.
    """
    metrics: bool = True
    """The scorer served metrics (`STREAMER_METRICS_PORT`); False for the metrics-cost baseline."""
    shadow: bool = False
    """A challenger scored beside the scorer's model (`STREAMER_SHADOW_MODEL_PATH`), its verdicts
    produced to a shadow topic; True only for the run that measures what that costs."""

    @property
    def events_per_second(self) -> float:
        if not self.available or not self.seconds > 0:
            return math.nan
        return self.events / self.seconds

    @property
    def label(self) -> str:
        """The processor, what the scorer left out and what it added: "scorer, stateless"."""
        if self.name == PASSTHROUGH:
            return self.name
        left_out = [
            what
            for what, kept in (("stateless", self.card_state), ("no metrics", self.metrics))
            if not kept
        ]
        added = ["shadow model"] if self.shadow else []
        return ", ".join([self.name, *left_out, *added])


@dataclass(frozen=True, slots=True)
class Restore:
    """One scorer restoring card state from its changelog, as its "state restored" line says."""

    source: str
    """What wrote the changelog, e.g. "500,000-event drain"."""
    changelog_records: int
    """Records in the changelog topic when the restore began (the sum of its end offsets)."""
    records: int
    """Changelog records the scorer applied."""
    keys: int
    """Cards in the store once restored."""
    seconds: float
    """From the restore's start (consumer created, partitions assigned) to its last partition."""
    peak_rss_mb: float = math.nan
    """Of the restoring process, over its whole life (start-up and idle wait included)."""
    note: str = ""

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True, slots=True)
class StateMemory:
    """The scorer with and without card state over the same events, one per card never seen.

    Every card's history then holds a single transaction, the smallest a history can be, so
    `bytes_per_card` is a floor for cards with more history (see `HeldState`).
    """

    cards: int
    stateful: Throughput
    stateless: Throughput
    restore: Restore | None = None
    """A scorer restoring the stateful run's changelog: every card, once."""

    @property
    def bytes_per_card(self) -> float:
        """(stateful peak RSS - stateless peak RSS) / cards."""
        if self.cards < 1:
            return math.nan
        return (self.stateful.peak_rss_mb - self.stateless.peak_rss_mb) * MB / self.cards


@dataclass(frozen=True, slots=True)
class HeldState:
    """Bytes a card store holds after applying some records, measured in process (tracemalloc)."""

    what: str
    cards: int
    records: int
    held_bytes: int

    @property
    def bytes_per_card(self) -> float:
        return self.held_bytes / self.cards if self.cards else math.nan


@dataclass(frozen=True, slots=True)
class Latency:
    """End-to-end latency of one processor at one paced rate."""

    processor: str
    rate: float
    """Events/s asked for."""
    achieved_rate: float
    """Events/s actually sent during the measured window."""
    sent: int
    received: int
    percentiles_ms: Mapping[str, float]
    max_ms: float

    @property
    def missing(self) -> int:
        return self.sent - self.received


@dataclass(frozen=True, slots=True)
class StageCost:
    stage: str
    micros_per_record: float
    """Wall time."""
    cpu_micros_per_record: float
    """CPU time of the thread running the loop."""
    share: float
    """Of the total CPU time."""


@dataclass(frozen=True, slots=True)
class PairedRatio:
    """The scorer users run over a baseline drained right before or after it, round by round.

    A ratio of two medians compares drains taken minutes apart, and on a shared machine one
    drain can be 20% off the next: more than the 5% a target may hinge on. The baseline runs
    next to the scorer in every round (the order alternates), so each round's ratio compares two
    drains that met the same machine; the median of those ratios is the figure judged.
    """

    name: str
    """What is compared, as the target names it: "metrics on / off", "stateful / stateless"."""
    ratios: tuple[float, ...]
    """Per round: the scorer's events/s over the baseline's (rounds where either drain was
    unavailable are left out)."""

    @property
    def median(self) -> float:
        """The median of the rounds' ratios (the lower of the middle two); NaN with none."""
        return statistics.median_low(self.ratios) if self.ratios else math.nan

    @property
    def measured(self) -> str:
        """The median, and each round's ratio when there are several: "0.97 x (0.95 · 0.97 ·
        1.01 by round)"."""
        if len(self.ratios) < 2:
            return f"{self.median:.2f} x"
        rounds = " · ".join(f"{ratio:.2f}" for ratio in self.ratios)
        return f"{self.median:.2f} x ({rounds} by round)"


def paired_ratio(
    name: str, ours: Sequence[Throughput], baseline: Sequence[Throughput]
) -> PairedRatio:
    """`ours` over `baseline` per round: both lists hold one drain per round, in round order."""
    ratios = tuple(
        mine.events_per_second / theirs.events_per_second
        for mine, theirs in zip(ours, baseline, strict=False)
        if math.isfinite(mine.events_per_second) and theirs.events_per_second > 0
    )
    return PairedRatio(name, ratios)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    goal: str
    measured: str
    status: Status


@dataclass(slots=True)
class Report:
    """Everything a run measured; `targets` is filled by `evaluate_targets`."""

    started_at: str
    duration_seconds: float
    quick: bool
    machine: Mapping[str, str]
    config: Mapping[str, Any]
    preload: Mapping[str, float]
    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    breakdown: list[StageCost] = field(default_factory=list)
    breakdown_records: int = 0
    breakdown_cards: int = 0
    """Distinct cards among the timed records."""
    breakdown_with_history: float = math.nan
    """Share of the timed records whose card already had a history."""
    breakdown_history_days: float = 0.0
    """Days of the synthetic world applied to the card state before the timed records."""
    restore: Restore | None = None
    """The restore after a stateful throughput drain (the median of those taken)."""
    state_memory: StateMemory | None = None
    held_state: list[HeldState] = field(default_factory=list)
    paired: list[PairedRatio] = field(default_factory=list)
    """The scorer users run against its baselines, round by round (`PairedRatio`)."""
    targets: list[Target] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase of the run, in order."""


# -- statistics ----------------------------------------------------------------------------------


def latency_percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and p99.9 of `samples_ms`; NaN for each when there are no samples.

    Nearest rank ("inverted CDF"): the smallest sample with at least q% of samples at or below
    it, so a percentile is always a latency that was actually observed.
    """
    count = len(samples_ms)
    if count == 0:
        return {name: math.nan for name, _ in PERCENTILES}
    ordered = np.sort(np.asarray(samples_ms, dtype=np.float64))
    # rank = ceil(q% of n), rounded first so that 99.9% of 1000 is 999, not 999.0000000000001.
    ranks = {name: max(1, math.ceil(round(q * count / 100, 6))) for name, q in PERCENTILES}
    return {name: float(ordered[rank - 1]) for name, rank in ranks.items()}


def stage_costs(
    wall_seconds: Mapping[str, float], cpu_seconds: Mapping[str, float], records: int
) -> list[StageCost]:
    """Microseconds per record (wall and CPU) and share of the CPU total, per stage in order."""
    if records < 1:
        raise ValueError(f"records must be at least 1, got {records}")
    if wall_seconds.keys() != cpu_seconds.keys():
        raise ValueError("wall and CPU times must name the same stages")
    total = sum(cpu_seconds.values())
    return [
        StageCost(
            stage=stage,
            micros_per_record=wall / records * 1e6,
            cpu_micros_per_record=cpu_seconds[stage] / records * 1e6,
            share=cpu_seconds[stage] / total if total > 0 else math.nan,
        )
        for stage, wall in wall_seconds.items()
    ]


# -- targets -------------------------------------------------------------------------------------


def _find_throughput(
    runs: Sequence[Throughput],
    name: str,
    guarantee: str,
    processes: int,
    *,
    card_state: bool | None = None,
    metrics: bool | None = True,
    shadow: bool = False,
) -> Throughput | None:
    """The run of that processor, guarantee and process count; `card_state` None: either.

    `metrics`: whether the scorer served metrics (None: either); `shadow`: whether a challenger
    scored beside it. By default the scorer as users run it: serving metrics, no challenger.
    """
    for run in runs:
        if (
            (run.name, run.guarantee, run.processes) == (name, guarantee, processes)
            and (card_state is None or run.card_state == card_state)
            and (metrics is None or run.name == PASSTHROUGH or run.metrics == metrics)
            and run.shadow == shadow
        ):
            return run
    return None


@dataclass(frozen=True, slots=True)
class ShadowCost:
    """The scorer with a challenger beside its model against the same scorer without one."""

    with_shadow: Throughput
    without: Throughput
    """The scorer users run (card state, metrics, at-least-once, one process), same drains."""

    @property
    def throughput_ratio(self) -> float:
        """Events/s with the challenger over events/s without it."""
        without = self.without.events_per_second
        return self.with_shadow.events_per_second / without if without > 0 else math.nan

    @property
    def added_peak_rss_mb(self) -> float:
        return self.with_shadow.peak_rss_mb - self.without.peak_rss_mb


def shadow_cost(runs: Sequence[Throughput]) -> ShadowCost | None:
    """What a challenger costs the scorer users run; None when either run is missing."""
    with_shadow = _find_throughput(runs, SCORER, "at-least-once", 1, card_state=True, shadow=True)
    without = _find_throughput(runs, SCORER, "at-least-once", 1, card_state=True)
    if with_shadow is None or without is None or not with_shadow.available:
        return None
    return ShadowCost(with_shadow, without)


def _find_latency(runs: Sequence[Latency], processor: str, rate: float) -> Latency | None:
    for run in runs:
        if run.processor == processor and math.isclose(run.rate, rate):
            return run
    return None


def _judge(ok: bool) -> Status:
    return "pass" if ok else "FAIL"


def evaluate_targets(report: Report) -> list[Target]:
    """Every target, each pass, FAIL, or n/a when the run did not measure it.

    The scorer of the first four is the one users run, with card state; the stateless scorer is
    only the baseline of the state's own targets, which follow. A challenger's cost has no
    target: `shadow_cost` gives it, and the throughput section says it.
    """
    runs = report.throughput
    limit = _find_throughput(runs, PASSTHROUGH, "at-least-once", 1)
    one = _find_throughput(runs, SCORER, "at-least-once", 1, card_state=True)
    two = _find_throughput(runs, SCORER, "at-least-once", 2, card_state=True)
    targets = []

    goal = f">= {MIN_THROUGHPUT_RATIO:.2f} x pass-through"
    name = "scorer throughput (at-least-once)"
    if limit is None or one is None or not (limit.events_per_second > 0):
        targets.append(Target(name, goal, "not measured", "n/a"))
    else:
        ratio = one.events_per_second / limit.events_per_second
        targets.append(Target(name, goal, f"{ratio:.2f} x", _judge(ratio >= MIN_THROUGHPUT_RATIO)))

    targets.append(_p99_target(report, f"p99 latency at {LATENCY_RATE:,.0f}/s", MAX_P99_EXCESS_MS))

    goal = f"<= {MAX_PEAK_RSS_MB:.0f} MB"
    name = "scorer peak RSS"
    # A challenger is a second model, loaded by choice: its memory is its own row's figure.
    peaks = [
        r.peak_rss_mb
        for r in runs
        if r.name == SCORER and not r.shadow and not math.isnan(r.peak_rss_mb)
    ]
    if not peaks:
        targets.append(Target(name, goal, "not measured", "n/a"))
    else:
        peak = max(peaks)
        targets.append(Target(name, goal, f"{peak:.0f} MB", _judge(peak <= MAX_PEAK_RSS_MB)))

    goal = f">= {MIN_SCALE_OUT:.2f} x one process"
    name = "scale-out, 2 processes"
    if one is None or two is None or not (one.events_per_second > 0):
        targets.append(Target(name, goal, "not measured", "n/a"))
    else:
        factor = two.events_per_second / one.events_per_second
        targets.append(Target(name, goal, f"{factor:.2f} x", _judge(factor >= MIN_SCALE_OUT)))

    stateless = _find_throughput(runs, SCORER, "at-least-once", 1, card_state=False)
    targets.append(
        _ratio_target(
            report,
            STATE_PAIR,
            f">= {MIN_STATE_RATIO:.2f} x stateless",
            MIN_STATE_RATIO,
            one,
            stateless,
        )
    )

    goal = f">= {MIN_RESTORE_RATE:,.0f} records/s"
    name = "state restore rate"
    restore = report.restore
    if restore is None or not (restore.records_per_second > 0):
        targets.append(Target(name, goal, "not measured", "n/a"))
    else:
        rate = restore.records_per_second
        measured = f"{rate:,.0f} records/s ({restore.records:,} records)"
        targets.append(Target(name, goal, measured, _judge(rate >= MIN_RESTORE_RATE)))

    targets.append(
        _p99_target(
            report, f"stateful scorer p99 at {LATENCY_RATE:,.0f}/s", MAX_STATEFUL_P99_EXCESS_MS
        )
    )

    goal = f">= {MIN_FILE_SCORE_RATIO:.2f} x stateful scorer"
    name = "file scoring throughput"
    file_run = _find_throughput(runs, FILE_SCORER, "-", 1)
    if one is None or file_run is None or not (one.events_per_second > 0):
        targets.append(Target(name, goal, "not measured", "n/a"))
    else:
        ratio = file_run.events_per_second / one.events_per_second
        targets.append(Target(name, goal, f"{ratio:.2f} x", _judge(ratio >= MIN_FILE_SCORE_RATIO)))

    quiet = _find_throughput(runs, SCORER, "at-least-once", 1, card_state=True, metrics=False)
    targets.append(
        _ratio_target(
            report,
            METRICS_PAIR,
            f">= {MIN_METRICS_RATIO:.2f} x without metrics",
            MIN_METRICS_RATIO,
            one,
            quiet,
        )
    )
    return targets


def _ratio_target(
    report: Report,
    pair: str,
    goal: str,
    minimum: float,
    ours: Throughput | None,
    baseline: Throughput | None,
) -> Target:
    """The target "`pair` throughput": the median of the rounds' paired ratios when the run
    paired them (`Report.paired`), else the ratio of the two runs shown (their medians)."""
    name = f"{pair} throughput"
    for paired in report.paired:
        if paired.name == pair and paired.ratios:
            return Target(name, goal, paired.measured, _judge(paired.median >= minimum))
    if ours is None or baseline is None or not (baseline.events_per_second > 0):
        return Target(name, goal, "not measured", "n/a")
    ratio = ours.events_per_second / baseline.events_per_second
    return Target(name, goal, f"{ratio:.2f} x", _judge(ratio >= minimum))


def _p99_target(report: Report, name: str, excess_ms: float) -> Target:
    """The scorer's p99 at `LATENCY_RATE` against the pass-through's plus `excess_ms`.

    Outputs that never arrived fail it: a percentile over those that did would flatter an
    overloaded scorer.
    """
    goal = f"<= pass-through p99 + {excess_ms:g} ms"
    scorer_latency = _find_latency(report.latency, SCORER, LATENCY_RATE)
    limit_latency = _find_latency(report.latency, PASSTHROUGH, LATENCY_RATE)
    if scorer_latency is None or limit_latency is None:
        return Target(name, goal, "not measured", "n/a")
    if scorer_latency.missing or limit_latency.missing:
        lost = scorer_latency.missing + limit_latency.missing
        return Target(name, goal, f"{lost:,} outputs missing", "FAIL")
    ours = scorer_latency.percentiles_ms["p99"]
    theirs = limit_latency.percentiles_ms["p99"]
    excess = ours - theirs
    return Target(
        name,
        goal,
        f"{ours:.1f} vs {theirs:.1f} ms ({excess:+.1f})",
        _judge(excess <= excess_ms),
    )


# -- rendering -----------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool) -> str:
    """A table with the first column left-aligned and the others right-aligned.

    `markdown=True` gives a GitHub pipe table; otherwise aligned plain text for a terminal.
    """
    width = len(header)
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, the header has {width}")
    if markdown:
        cells = [[cell.replace("|", "\\|") for cell in row] for row in [header, *rows]]
        rule = ["---", *["---:"] * (width - 1)]
        lines = [cells[0], rule, *cells[1:]]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(width)]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _number(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _throughput_rows(report: Report) -> list[list[str]]:
    limit = _find_throughput(report.throughput, PASSTHROUGH, "at-least-once", 1)
    limit_rate = limit.events_per_second if limit is not None else math.nan
    rows = []
    for run in report.throughput:
        label = "pass-through (the limit)" if run.name == PASSTHROUGH else run.label
        if not run.available:
            rows.append(
                [label, run.guarantee, str(run.processes), "not available", "-", "-", "-", "-"]
            )
            continue
        rate = run.events_per_second
        rows.append(
            [
                label,
                run.guarantee,
                str(run.processes),
                _number(rate),
                f"{rate / limit_rate:.2f}" if limit_rate > 0 else "-",
                _number(run.seconds, 1),
                _number(run.cpu_seconds, 1),
                _number(run.peak_rss_mb),
            ]
        )
    return rows


def _latency_rows(report: Report) -> list[list[str]]:
    rows = []
    for run in report.latency:
        shown = [_number(run.percentiles_ms[name], 1) for name, _ in PERCENTILES]
        rows.append(
            [
                run.processor,
                _number(run.rate),
                _number(run.achieved_rate),
                *shown,
                _number(run.max_ms, 1),
                f"{run.missing:,}",
            ]
        )
    return rows


@dataclass(frozen=True, slots=True)
class _Section:
    heading: str
    note: str
    header: Sequence[str]
    rows: list[list[str]]
    footnotes: list[str] = field(default_factory=list)


def _breakdown_rows(report: Report) -> list[list[str]]:
    costs = report.breakdown
    rows = [
        [
            c.stage,
            f"{c.micros_per_record:.2f}",
            f"{c.cpu_micros_per_record:.2f}",
            f"{c.share:.0%}",
        ]
        for c in costs
    ]
    if costs:
        wall = sum(c.micros_per_record for c in costs)
        cpu = sum(c.cpu_micros_per_record for c in costs)
        rows.append(["total", f"{wall:.2f}", f"{cpu:.2f}", "100%"])
        rows.append(["one core at this CPU cost", "", f"{1e6 / cpu:,.0f}/s", ""])
    return rows


def _restore_rows(report: Report) -> list[list[str]]:
    restores = [report.restore]
    if report.state_memory is not None:
        restores.append(report.state_memory.restore)
    return [
        [
            restore.source,
            f"{restore.changelog_records:,}",
            f"{restore.records:,}",
            f"{restore.keys:,}",
            _number(restore.seconds, 2),
            _number(restore.records_per_second),
            _number(restore.peak_rss_mb),
        ]
        for restore in restores
        if restore is not None
    ]


def _memory_rows(report: Report) -> list[list[str]]:
    rows = []
    memory = report.state_memory
    if memory is not None:
        for run in (memory.stateful, memory.stateless):
            rows.append(
                [
                    f"{run.label}{', card state' if run.card_state else ''}: peak RSS",
                    f"{memory.cards:,}",
                    f"{run.events:,}",
                    _number(run.events_per_second),
                    _number(run.peak_rss_mb),
                    "-",
                ]
            )
        state_mb = memory.stateful.peak_rss_mb - memory.stateless.peak_rss_mb
        rows.append(
            [
                "the state: the difference",
                f"{memory.cards:,}",
                "-",
                "-",
                _number(state_mb),
                _number(memory.bytes_per_card),
            ]
        )
    for held in report.held_state:
        rows.append(
            [
                f"store alone: {held.what}",
                f"{held.cards:,}",
                f"{held.records:,}",
                "-",
                _number(held.held_bytes / MB),
                _number(held.bytes_per_card),
            ]
        )
    return rows


def _memory_note(report: Report) -> str:
    memory = report.state_memory
    parts = []
    if memory is not None:
        parts.append(
            f"the scorer over {memory.stateful.events:,} events, each of a card not seen before,"
            " so each history holds one transaction (the smallest a history can be)"
        )
        full = BenchOptions().state_cards
        if report.quick and memory.cards != full:
            parts.append(f"a quick run: {memory.cards:,} cards, not the full bench's {full:,}")
    parts.append(
        "MB: peak RSS (VmHWM) of a scorer process, or what a card store alone holds (in this"
        " process, traced by tracemalloc) just restored from its changelog, and in use: every"
        " card decoded, as its next record decodes it"
    )
    return "; ".join(parts)


def _run_notes(runs: Sequence[Throughput]) -> list[str]:
    return [f"{run.label} {run.guarantee} x{run.processes}: {run.note}" for run in runs if run.note]


def _shadow_note(report: Report) -> list[str]:
    """What the challenger costs, against the same scorer without one, when both were measured."""
    cost = shadow_cost(report.throughput)
    if cost is None:
        return []
    challenger = report.config.get("challenger", {})
    named = f" ({challenger['name']} {challenger['version']})" if challenger else ""
    added = "-" if math.isnan(cost.added_peak_rss_mb) else f"{cost.added_peak_rss_mb:+,.0f}"
    return [
        f"{cost.with_shadow.label}: a challenger{named} scores every batch's feature matrix"
        " beside the model and its verdicts go to a topic of their own;"
        f" {_number(cost.throughput_ratio, 2)} x the events/s of the same scorer without one"
        f" ({_number(cost.without.events_per_second)}/s), peak RSS {added} MB"
    ]


def _paired_notes(report: Report) -> list[str]:
    """Each paired comparison, round by round (the baseline drained next to the scorer)."""
    return [
        f"{paired.name}: the scorer and its baseline drained back to back in each round,"
        f" {paired.measured} (the median is the target's figure)"
        for paired in report.paired
        if paired.ratios
    ]


def _breakdown_note(report: Report) -> str:
    note = (
        f"{report.breakdown_records:,} records in batches of "
        f"{report.config.get('batch_size', '?')}, in process; CPU: the loop's thread only"
    )
    if report.breakdown_cards:
        note += (
            f"; card state built from {report.breakdown_history_days:g} days of the synthetic"
            f" world before them: {report.breakdown_cards:,} cards in the timed records,"
            f" {report.breakdown_with_history:.0%} of those records with a history"
        )
    return note


def _latency_footnotes(report: Report) -> list[str]:
    notes = []
    for run in report.latency:
        where = f"{run.processor} at {run.rate:,.0f}/s"
        if run.achieved_rate < SLOW_SENDER * run.rate:
            notes.append(f"{where}: the load generator sent only {run.achieved_rate:,.0f}/s")
        if run.missing:
            notes.append(
                f"{where}: {run.missing:,} of {run.sent:,} outputs had not arrived when the bench "
                "stopped waiting; the percentiles cover those that did"
            )
    return notes


def _sections(report: Report) -> list[_Section]:
    config = report.config
    preload = report.preload
    preload_note = (
        f"; preloaded at {preload['events_per_second']:,.0f} events/s"
        if preload.get("events_per_second")
        else ""
    )
    return [
        _Section(
            "Throughput",
            f"{config.get('events', 0):,} preloaded events, {config.get('partitions', '?')} "
            "partitions; events/s from the first to the last output record (LogAppendTime); "
            f"x limit: against the at-least-once pass-through{preload_note}",
            [
                "run",
                "guarantee",
                "processes",
                "events/s",
                "x limit",
                "seconds",
                "CPU s",
                "peak RSS MB",
            ],
            _throughput_rows(report),
            _run_notes(report.throughput) + _shadow_note(report) + _paired_notes(report),
        ),
        _Section(
            "Latency",
            "end to end in ms, producer send to output read; each rate "
            f"{config.get('latency_seconds', '?')} s per processor in"
            f" {config.get('latency_rounds', '?')} rounds alternating between the processors,"
            f" each after a {config.get('warmup_seconds', '?')} s warm-up",
            ["processor", "rate/s", "sent/s", *[n for n, _ in PERCENTILES], "max", "missing"],
            _latency_rows(report),
            _latency_footnotes(report),
        ),
        _Section(
            "State restore",
            "one more scorer joins the group of a finished stateful run, with nothing left to"
            " consume, and restores the run's card state from its changelog; figures from its"
            ' "state restored" log line',
            [
                "changelog of",
                "changelog records",
                "records applied",
                "keys",
                "seconds",
                "records/s",
                "peak RSS MB",
            ],
            _restore_rows(report),
            [
                f"{restore.source}: {restore.note}"
                for restore in (
                    report.restore,
                    None if report.state_memory is None else report.state_memory.restore,
                )
                if restore is not None and restore.note
            ],
        ),
        _Section(
            "State memory",
            _memory_note(report),
            ["measure", "cards", "events", "events/s", "MB", "bytes per card"],
            _memory_rows(report),
            []
            if report.state_memory is None
            else _run_notes([report.state_memory.stateful, report.state_memory.stateless]),
        ),
        _Section(
            "Hot loop cost per record",
            _breakdown_note(report),
            ["stage", "wall us/record", "CPU us/record", "CPU share"],
            _breakdown_rows(report),
        ),
        _Section(
            "Targets",
            "",
            ["target", "goal", "measured", "result"],
            [[t.name, t.goal, t.measured, t.status] for t in report.targets],
        ),
    ]


def render(report: Report, *, markdown: bool) -> str:
    """The whole report as text (terminal) or markdown, in sections."""
    title = (
        f"streamer bench, {report.started_at}"
        f" ({'quick run, ' if report.quick else ''}{report.duration_seconds:.0f} s)"
    )
    machine_line = ", ".join(f"{key} {value}" for key, value in report.machine.items())
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.phase_seconds.items())
    if markdown:
        parts = [f"# {title}", "", f"Machine: {machine_line}"]
        for section in _sections(report):
            parts += ["", f"## {section.heading}", ""]
            if section.note:
                parts += [section.note, ""]
            parts.append(format_table(section.header, section.rows, markdown=True))
            if section.footnotes:
                parts += ["", *(f"- {line}" for line in section.footnotes)]
        if phases:
            parts += ["", f"Run time by phase: {phases}."]
        return "\n".join(parts) + "\n"
    parts = [title, f"machine: {machine_line}"]
    for section in _sections(report):
        parts += ["", f"{section.heading}{': ' + section.note if section.note else ''}"]
        parts.append(format_table(section.header, section.rows, markdown=False))
        parts += [f"  * {line}" for line in section.footnotes]
    if phases:
        parts += ["", f"run time by phase: {phases}"]
    return "\n".join(parts) + "\n"


def _finite(value: Any) -> Any:
    """NaN and infinities become None, recursively: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def report_to_json(report: Report) -> dict[str, Any]:
    """The report as strict-JSON-ready data (no NaN), with derived rates included."""
    data = asdict(report)
    for run, shown in zip(report.throughput, data["throughput"], strict=True):
        shown["events_per_second"] = run.events_per_second
    for latency, shown in zip(report.latency, data["latency"], strict=True):
        shown["missing"] = latency.missing
    if report.restore is not None:
        data["restore"]["records_per_second"] = report.restore.records_per_second
    for paired, shown in zip(report.paired, data["paired"], strict=True):
        shown["median"] = paired.median
    cost = shadow_cost(report.throughput)
    data["shadow_cost"] = (
        None
        if cost is None
        else {
            "throughput_ratio": cost.throughput_ratio,
            "added_peak_rss_mb": cost.added_peak_rss_mb,
        }
    )
    memory = report.state_memory
    if memory is not None:
        shown_memory = data["state_memory"]
        shown_memory["bytes_per_card"] = memory.bytes_per_card
        shown_memory["stateful"]["events_per_second"] = memory.stateful.events_per_second
        shown_memory["stateless"]["events_per_second"] = memory.stateless.events_per_second
        if memory.restore is not None:
            shown_memory["restore"]["records_per_second"] = memory.restore.records_per_second
    for held, shown in zip(report.held_state, data["held_state"], strict=True):
        shown["bytes_per_card"] = held.bytes_per_card
    shown_breakdown = data.pop("breakdown")
    data["breakdown"] = {
        "records": data.pop("breakdown_records"),
        "cards": data.pop("breakdown_cards"),
        "with_history": data.pop("breakdown_with_history"),
        "history_days": data.pop("breakdown_history_days"),
        "stages": shown_breakdown,
        "total_micros_per_record": sum(c.micros_per_record for c in report.breakdown),
        "total_cpu_micros_per_record": sum(c.cpu_micros_per_record for c in report.breakdown),
    }
    result: dict[str, Any] = _finite({"schema": JSON_SCHEMA, **data})
    return result


def plot_latency_cdfs(samples: Mapping[tuple[str, float], Sequence[float]], path: Path) -> None:
    """One panel per rate, a CDF line per processor, latency on a log axis; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({rate for _, rate in samples})
    if not rates:
        raise ValueError("no latency samples to plot")
    figure, axes = plt.subplots(
        1, len(rates), figsize=(4.2 * len(rates), 3.6), sharey=True, squeeze=False
    )
    for axis, rate in zip(axes[0], rates, strict=True):
        for processor in (PASSTHROUGH, SCORER):
            values = np.sort(np.asarray(samples.get((processor, rate), ()), dtype=np.float64))
            if len(values) == 0:
                continue
            fraction = np.arange(1, len(values) + 1) / len(values)
            axis.plot(values, fraction, label=processor, linewidth=1.4)
        axis.set_xscale("log")
        axis.set_title(f"{rate:,.0f} events/s")
        axis.set_xlabel("end-to-end latency (ms)")
        axis.grid(True, which="both", alpha=0.3)
        axis.axhline(0.99, color="grey", linewidth=0.6, linestyle="--")
    axes[0][0].set_ylabel("fraction of events")
    axes[0][0].legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

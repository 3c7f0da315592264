"""The bench run: preload, hot-loop breakdown, throughput, state, latency, memory and scale-out.

How each number is taken, and why:

- **Preload.** `events` synthetic transactions (the `streamer produce` generator and producer) go
  once into an input topic with `partitions` partitions. Every throughput run reads that same
  topic from the start with a fresh consumer group and its own output topic.
- **Throughput.** Each run is repeated `throughput_repeats` times, round robin, and the one with the
  median events/s is reported (the others in its note): on a shared machine one drain can be 20% off
  the next. Every other round takes the scorer's runs in reverse order (`round_order`), so no run is
  always the first after the pass-through: the runs compared with one another (metrics on and off,
  with and without state) meet the machine's drifts alike. The two baselines (no metrics, no
  state) drain right before and after the scorer users run in every round, whichever way it goes
  (`THROUGHPUT_RUNS`), and their targets judge the median of the rounds' ratios (`PairedRatio`),
  not the ratio of two medians taken minutes apart. The processor runs as a process of its
  own, exactly as users run it (`streamer run --until-idle S`; the pass-through with the same
  flags), and exits by itself when the topic is drained. Output topics are created with
  `message.timestamp.type=LogAppendTime`, so each output record carries the time the broker appended
  it, i.e. acknowledged it. Events/s is outputs / (last append time - first append time): process
  start-up, group join and the idle wait at the end are left out; so is the time to process the
  first batch, one batch of hundreds. Every output is then read back (read_committed) and its source
  headers checked: an input without an output fails the run; duplicates (at-least-once allows them)
  are counted.
- **Memory and CPU.** Each process's peak RSS is the kernel's high-water mark of its own memory
  (`VmHWM`), read while it runs (`ru_maxrss` would also count this bench process, which every
  child is a copy of until it execs); its user + system CPU time comes from `os.wait4`, exactly.
- **Scale-out.** Two scorer processes in one group over the same preloaded topic, measured as
  above; the group's first rebalance is part of the window.
- **Card state.** The scorer runs as users run it, keeping card history and writing it to its
  changelog at every commit; one more throughput run (`STREAMER_CARD_STATE=false`) is the
  stateless baseline it is compared with. After the throughput runs, one more scorer joins the
  group of each stateful at-least-once drain: assigned every partition, it restores the drain's
  state from the changelog, finds nothing left to consume and exits after the idle wait; its
  "state restored" log line gives records, keys and seconds (the median restore is reported).
- **Metrics.** Every scorer serves its metrics (`STREAMER_METRICS_PORT`, a free port each), as
  users run it, and the bench scrapes each one's `/metrics` every `SCRAPE_SECONDS` (what a
  Prometheus server would cost it, many times over); one more throughput run with metrics off
  (`STREAMER_METRICS_PORT=0`) is the baseline of the metrics cost.
- **Shadow scoring.** One more throughput run with a challenger beside the model
  (`STREAMER_SHADOW_MODEL_PATH`), its verdicts produced to a shadow topic of the run's own,
  created as the other topics are; its events/s against the scorer's without one is what a
  challenger costs. The challenger is trained at the start of the run by `streamer train` in a
  process of its own, with the model's training seed plus one: the same code and settings as
  the model `scripts/bench` trains, a model of the same kind, not the same file. The run checks
  that the challenger loaded and gave a verdict for every input.
- **State memory.** `state_cards` events, each of a card never seen before, drained by a
  stateful and a stateless scorer (measured as throughput runs): the difference of their peak
  RSS over the cards is what the state costs a card, for the smallest history there is (one
  transaction). A scorer then restores that state: every card once. In this process,
  `breakdown.held_state_bytes` traces what a store holds per card for such cards and for cards
  after a month of use, which the process-level figure cannot show.
- **Latency.** Both processors run at once, each on fresh topics, already caught up. Per rate,
  `latency_rounds` rounds feed one processor, then the other (the order alternates), for
  `latency_seconds / latency_rounds` each after `warmup_seconds` that are sent but not counted:
  a stall of the shared machine, such as a pause of the broker's garbage collector, lands in
  either processor's samples alike instead of in whichever ran at that moment. Each processor's
  events continue a synthetic world of its own (`LatencyFeed`, the same seed for both), never
  sending an event twice, so card histories age as event time moves on. One thread paces
  sends (in slices of at most 1 ms), stamps each send with `perf_counter_ns` just before
  `produce`, learns the record's partition and offset from its delivery report, and between sends
  reads the output topic; an output is joined to its send by the
  `streamer.source.partition`/`.offset` headers both processors copy. Latency = output read -
  send.
- **File scoring.** The preloaded events (the same seed, so the same events) written to a Parquet
  file and scored by `streamer score` in a process of its own, as users run it; events/s is rows
  / the seconds of its "file scored" log line, from reading the file to the verdicts written
  (start-up and loading the model left out, as the stream's window leaves them out). Shown in
  the throughput table; its target is the stateful scorer's events/s.
- **Breakdown.** `breakdown.time_hot_loop` in this process, the median of `BREAKDOWN_PASSES`
  passes by CPU total, on a quiet machine (no processor running yet), with the garbage collector
  set as `streamer run` sets it. The card state starts from `BREAKDOWN_HISTORY_DAYS` of the
  synthetic world, so the timed records meet histories, not empty cards.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, Final, TypeVar

import confluent_kafka

from streamer.app import CARD_STORE
from streamer.cli import tune_garbage_collector
from streamer.kafka.changelog import changelog_topic, ensure_changelog
from streamer.kafka.clients import OutputProducer
from streamer.model.scorer import Scorer
from streamer.model.train import DEFAULT_SEED
from streamer.progress import Progress
from streamer.serde import encode_transaction
from streamer.settings import Settings
from streamer.state.card import CARD_HISTORY_CODEC
from streamer.synthetic import (
    DEFAULT_EVENTS_PER_DAY,
    EVENTS_PER_CARD_PER_DAY,
    LabelledTransaction,
    SyntheticWorld,
)
from streamer.tools.bench import BenchError, BenchOptions
from streamer.tools.bench.breakdown import (
    InputRecord,
    StageTimes,
    card_histories,
    held_state_bytes,
    time_hot_loop,
)
from streamer.tools.bench.instruments import (
    ChildProcess,
    LatencyReader,
    PacedRun,
    Scraper,
    create_topics,
    delete_topics,
    failed,
    free_port,
    log,
    partition_sizes,
    read_outputs,
)
from streamer.tools.bench.report import (
    FILE_SCORER,
    METRICS_PAIR,
    PASSTHROUGH,
    SCORER,
    STATE_PAIR,
    HeldState,
    Latency,
    Report,
    Restore,
    StateMemory,
    Throughput,
    evaluate_targets,
    latency_percentiles,
    paired_ratio,
    plot_latency_cdfs,
    render,
    report_to_json,
    stage_costs,
)
from streamer.tools.produce import publish

START_TIMEOUT: Final = 120.0
"""Longest wait for a started processor to answer its first records (imports, model, join)."""
DRAIN_TIMEOUT: Final = 60.0
"""After a paced run, longest wait for the outputs still on their way."""
FIRST_WARMUP_EVENTS: Final = 200
SCRAPE_SECONDS: Final = 1.0
"""Seconds between two scrapes of a scorer's metrics: 15 times as often as Prometheus's default."""
BREAKDOWN_PASSES: Final = 3
BREAKDOWN_HISTORY_DAYS: Final = 7.0
"""Days of the synthetic world applied to the card state before the breakdown's timed records.

A week is the longest window over single transactions, the part of a history whose size (and
cost per record) grows with the card's use; the timed records then meet histories as full as in
a stream that has run for a week or more.
"""
HELD_CARDS: Final = 5_000
"""Cards of one transaction each whose in-process size is traced (they barely differ)."""
HISTORY_WORLD_EVENTS_PER_DAY: Final = 2_500.0
"""The world whose histories are traced after `HISTORY_WORLD_DAYS`: about 1,700 cards, each as
busy as a card of the default world, so a sample of histories without 30 days of the default
world's 750,000 events."""
HISTORY_WORLD_DAYS: Final = 35.0
"""Past the longest window (30 days), so every part of a history has reached its usual size."""
CHALLENGER_TRAIN_TIMEOUT: Final = 900.0
"""Longest wait for `streamer train` to write the challenger (about 20 s on two idle cores)."""
SHADOW_VARIABLES: Final = ("STREAMER_SHADOW_MODEL_PATH", "STREAMER_SHADOW_TOPIC")
"""Set for the shadow run only, whatever the bench's own environment holds."""
STATE_EVENTS_PER_DAY: Final = 1_000_000.0
"""Clock of the state memory run's events, whatever their number: they must span less than the
30 days after which an idle card's history expires, or the state would lose its first cards."""


# -- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lane:
    """A processor running for the latency phase: its input topic and its output's reader."""

    topic: str
    reader: LatencyReader
    process: ChildProcess
    feed: LatencyFeed


@dataclass(frozen=True)
class _Drain:
    """Where a throughput run drained: enough for one more scorer to join its group."""

    label: str
    input_topic: str
    output_topic: str
    dlq_topic: str
    group: str


@dataclass
class Bench:
    """One bench run against the broker in `settings`; `run()` returns the report."""

    settings: Settings
    options: BenchOptions
    out_dir: Path
    model_path: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    topics: list[str] = field(default_factory=list)
    processes: list[ChildProcess] = field(default_factory=list)
    scrapers: list[Scraper] = field(default_factory=list)
    latency_samples: dict[tuple[str, float], list[float]] = field(default_factory=dict)

    @property
    def challenger_path(self) -> Path:
        """The shadow run's challenger artefact (`train_challenger` writes it)."""
        return self.out_dir / "challenger.skops"

    def topic(self, role: str) -> str:
        name = f"bench-{self.run_id}-{role}"
        self.topics.append(name)
        return name

    # -- processes --

    def start(
        self,
        kind: str,
        *,
        label: str,
        input_topic: str,
        output_topic: str,
        dlq_topic: str,
        group: str,
        guarantee: str = "at-least-once",
        card_state: bool = True,
        metrics: bool = True,
        shadow_topic: str | None = None,
        until_idle: float | None = None,
    ) -> ChildProcess:
        """Start `streamer run` (kind `scorer`) or the pass-through with the same flags.

        For a scorer with `card_state`, the group's changelog topic is created first, as
        `streamer topics create` creates it before a deployment's first scorer, and deleted with
        the bench's own topics at the end. With `shadow_topic`, the scorer scores the challenger
        (`challenger_path`) beside its model and produces its verdicts there.
        """
        common = [
            "--bootstrap-servers",
            self.settings.bootstrap_servers,
            "--input-topic",
            input_topic,
            "--output-topic",
            output_topic,
            "--dlq-topic",
            dlq_topic,
            "--group-id",
            group,
            "--log-format",
            "json",
        ]
        if until_idle is not None:
            common += ["--until-idle", str(until_idle)]
        if kind == SCORER:
            command = [
                sys.executable,
                "-m",
                "streamer",
                "run",
                "--model-path",
                str(self.model_path),
            ]
        else:
            command = [sys.executable, "-m", "streamer.tools.bench", "passthrough"]
        metrics_port = free_port() if kind == SCORER and metrics else 0
        shadow = None if shadow_topic is None else (self.challenger_path, shadow_topic)
        env = run_environment(
            os.environ,
            guarantee=guarantee,
            card_state=card_state,
            metrics_port=metrics_port,
            shadow=shadow,
        )
        if kind == SCORER and card_state:
            changelog = changelog_topic(group, CARD_STORE)
            if changelog not in self.topics:
                self.topics.append(changelog)
                # Left to the scorer, the topic is created as it starts, and its changelog reader
                # can find a partition unknown for a moment: that partition's restore then never
                # ends ("desired partition is not available" on Kafka 4.4), and neither does the
                # run. Created here, it has existed for seconds when the scorer reads it.
                ensure_changelog(self.settings.admin_config(), changelog, input_topic)
        logs = self.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        process = ChildProcess(label, [*command, *common], env, logs / f"{label}.log")
        self.processes.append(process)
        if metrics_port:
            self.scrapers.append(Scraper(process, metrics_port, SCRAPE_SECONDS))
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()
        for scraper in self.scrapers:
            scraper.stop()

    # -- phases --

    def preload(
        self, role: str, count: int, events: Iterable[LabelledTransaction]
    ) -> tuple[str, dict[int, int], dict[str, float]]:
        """A new input topic filled with `count` `events`: its name, partition sizes and timing."""
        options = self.options
        topic = self.topic(role)
        create_topics(self.settings.admin_config(), [topic], partitions=options.partitions)
        log(f"preloading {count:,} events into {topic} ({options.partitions} partitions)")
        producer = OutputProducer(self.settings.producer_config(), name="bench-preload")
        report = publish(producer, topic, events, progress=Progress("preload", count))
        producer.errors.raise_if_fatal()
        if report.failed or report.acknowledged != count:
            raise BenchError(
                f"preload: {report.failed} of {report.sent} events not delivered: {report.errors}"
            )
        sizes = partition_sizes(self.settings, topic)
        if sum(sizes.values()) != count:
            raise BenchError(f"preload: {topic} holds {sum(sizes.values())} records, not {count}")
        rate = count / report.seconds
        log(f"preloaded in {report.seconds:.1f} s ({rate:,.0f} events/s)")
        return topic, sizes, {"events": count, "seconds": report.seconds, "events_per_second": rate}

    def breakdown(self, scorer: Scorer, report: Report) -> StageTimes:
        """Time per hot-loop stage over `breakdown_records` synthetic records.

        The card state starts from `BREAKDOWN_HISTORY_DAYS` of the same world's events before the
        timed ones, so most timed records meet a history of a week, as in a stream that has run
        that long; from an empty state most would be their card's first. The records go through
        `BREAKDOWN_PASSES` times, each from that same state; the pass with the median CPU total
        is kept: on a shared virtual machine one pass can cost a third more than the next. Fills
        the report's breakdown fields.
        """
        settings = self.settings
        size = settings.batch_size
        world = SyntheticWorld(self.options.seed + 1)
        before = round(BREAKDOWN_HISTORY_DAYS * DEFAULT_EVENTS_PER_DAY)
        log(f"hot-loop breakdown: card state from {before:,} events first")
        histories = card_histories([event.record for event in world.generate(before)], size)
        encode = CARD_HISTORY_CODEC.encode
        state = {card: encode(history) for card, history in histories.items()}
        records: list[InputRecord] = [
            (event.record["card_id"].encode(), encode_transaction(event.record), 0, offset)
            for offset, event in enumerate(world.generate(self.options.breakdown_records + size))
        ]
        batches = [records[i : i + size] for i in range(0, len(records), size)]
        output = self.topic("breakdown")
        create_topics(settings.admin_config(), [output], partitions=self.options.partitions)
        producer = OutputProducer(settings.producer_config(), name="bench-breakdown")
        kwargs: dict[str, Any] = {
            "source_topic": "bench-breakdown-input",
            "output_topic": output,
            "max_event_bytes": settings.max_event_bytes,
            "state": state,
        }
        # One batch first, not counted: first calls pay for imports, caches and connections.
        time_hot_loop(batches[:1], scorer, producer, **kwargs)
        measured = batches[1:]
        count = sum(map(len, measured))
        known = set(state)
        with_history = 0
        for batch in measured:
            for key, _value, _partition, _offset in batch:
                card = key.decode()
                with_history += card in known
                known.add(card)
        cards = len({key for batch in measured for key, _, _, _ in batch})
        log(f"hot-loop breakdown: {BREAKDOWN_PASSES} passes over {count:,} records")
        passes = []
        with scorer_garbage_collector():
            for _ in range(BREAKDOWN_PASSES):
                passes.append(time_hot_loop(measured, scorer, producer, **kwargs))
        passes.sort(key=lambda times: sum(times.cpu.values()))
        report.breakdown_records = count
        report.breakdown_cards = cards
        report.breakdown_with_history = with_history / count if count else math.nan
        report.breakdown_history_days = BREAKDOWN_HISTORY_DAYS
        return passes[(len(passes) - 1) // 2]

    def held_state(self) -> list[HeldState]:
        """What a card store holds per card, in this process (`breakdown.held_state_bytes`).

        For cards of one transaction each, as in the state memory run, to set its process-level
        figure against, and for cards after `HISTORY_WORLD_DAYS` of use; each just restored
        and in use.
        """
        size = self.settings.batch_size

        def both(what: str, records: Sequence[Mapping[str, Any]]) -> list[HeldState]:
            cards, restored, in_use = held_state_bytes(records, size)
            what = what.format(per_card=len(records) / cards if cards else math.nan)
            return [
                HeldState(f"{what}, restored", cards, len(records), restored),
                HeldState(f"{what}, in use", cards, len(records), in_use),
            ]

        log(f"state held: {HELD_CARDS:,} cards of one transaction each")
        one = [event.record for event in new_card_events(self.options.seed + 4, HELD_CARDS)]
        results = both("one transaction per card", one)
        world = SyntheticWorld(self.options.seed + 5, events_per_day=HISTORY_WORLD_EVENTS_PER_DAY)
        log(f"state held: {world.n_cards:,} cards after {HISTORY_WORLD_DAYS:g} days")
        count = round(HISTORY_WORLD_DAYS * HISTORY_WORLD_EVENTS_PER_DAY)
        used = [event.record for event in world.generate(count)]
        what = f"{HISTORY_WORLD_DAYS:g} days of use, {{per_card:.0f}} transactions per card"
        return results + both(what, used)

    def throughput(
        self,
        kind: str,
        input_topic: str,
        sizes: Mapping[int, int],
        *,
        guarantee: str = "at-least-once",
        processes: int = 1,
        card_state: bool = True,
        metrics: bool = True,
        shadow: bool = False,
        repeat: int = 0,
        tag: str = "",
    ) -> tuple[Throughput, _Drain]:
        """One drain of `input_topic` by `processes` processors in one group.

        `card_state` False runs the scorer without state (`STREAMER_CARD_STATE=false`),
        `metrics` False without metrics (`STREAMER_METRICS_PORT=0`), `shadow` True with the
        challenger beside its model (then every input must have a challenger verdict too); `tag`
        tells apart the topics and group of runs over different inputs.
        """
        stateless = kind == SCORER and not card_state
        quiet = kind == SCORER and not metrics
        shadowed = kind == SCORER and shadow
        label = (
            f"{kind}-{guarantee}-x{processes}"
            + ("-stateless" if stateless else "")
            + ("-nometrics" if quiet else "")
            + ("-shadow" if shadowed else "")
            + (f"-{tag}" if tag else "")
            + (f"-{repeat + 1}" if repeat else "")
        )
        output, dlq = self.topic(f"{label}-out"), self.topic(f"{label}-dlq")
        shadow_topic = self.topic(f"{label}-shadow") if shadowed else None
        group = f"bench-{self.run_id}-{label}"
        admin = self.settings.admin_config()
        partitions = self.options.partitions
        create_topics(
            admin,
            [output],
            partitions=partitions,
            config={"message.timestamp.type": "LogAppendTime"},
        )
        create_topics(
            admin, [dlq] if shadow_topic is None else [dlq, shadow_topic], partitions=partitions
        )
        log(f"throughput: {label}")
        started = [
            self.start(
                kind,
                label=f"{label}-{index}",
                input_topic=input_topic,
                output_topic=output,
                dlq_topic=dlq,
                group=group,
                guarantee=guarantee,
                card_state=card_state,
                metrics=metrics,
                shadow_topic=shadow_topic,
                until_idle=self.options.until_idle,
            )
            for index in range(processes)
        ]
        drain = _Drain(label, input_topic, output, dlq, group)
        timeout = START_TIMEOUT + sum(sizes.values()) / 1_000
        for process in started:
            status = process.wait(timeout)
            if status == 2 and guarantee == "exactly-once":
                reason = process.error_reason()
                log(f"{label}: not available ({reason})")
                for other in started:
                    other.kill()
                unavailable = Throughput(
                    kind,
                    guarantee,
                    processes,
                    available=False,
                    note=reason,
                    card_state=card_state,
                )
                return unavailable, drain
            if status != 0:
                raise failed(process, status)
        if kind == SCORER:
            self._check_consumed(label, started, sum(sizes.values()))
        if shadow_topic is not None:
            self._check_shadowed(label, started, shadow_topic, sum(sizes.values()))
        peak = max((p.peak_rss_mb for p in started), default=math.nan)
        cpu = sum(p.cpu_seconds or 0.0 for p in started)
        dead_letters = sum(partition_sizes(self.settings, dlq).values())
        if dead_letters:
            raise BenchError(f"{label}: {dead_letters} dead letters for valid synthetic events")
        read_started = time.monotonic()
        summary = read_outputs(self.settings, output, sizes, partitions=partitions)
        log(
            f"{label}: read back and checked {summary.count:,} outputs in "
            f"{time.monotonic() - read_started:.1f} s"
        )
        assert summary.first_ms is not None
        assert summary.last_ms is not None
        seconds = (summary.last_ms - summary.first_ms) / 1000
        notes = []
        if summary.duplicates:
            notes.append(f"{summary.duplicates:,} duplicate outputs (at-least-once)")
        if not summary.log_append_time:
            notes.append("output timestamps are CreateTime, not LogAppendTime")
        cores = usable_cores()
        if processes > 1 and cores < processes + 1:
            notes.append(f"{processes} processes and the broker share {cores} cores")
        result = Throughput(
            kind,
            guarantee,
            processes,
            events=summary.count,
            seconds=seconds,
            peak_rss_mb=peak,
            cpu_seconds=cpu,
            note="; ".join(notes),
            card_state=card_state if kind == SCORER else False,
            metrics=metrics if kind == SCORER else False,
            shadow=shadowed,
        )
        log(
            f"{label}: {result.events_per_second:,.0f} events/s over {seconds:.1f} s, "
            f"peak RSS {peak:.0f} MB, {cpu:.1f} CPU s"
        )
        return result, drain

    def _check_consumed(self, label: str, started: Sequence[ChildProcess], records: int) -> None:
        """Fail, saying why, when the scorers stopped before consuming every input record.

        `--until-idle` counts from the partition assignment, and a restore happens after it: a
        restore longer than the idle time stops a scorer before its first record.
        """
        consumed = 0
        for process in started:
            stopped = process.logged("scorer stopped")
            consumed += int(stopped[-1].get("consumed", 0)) if stopped else 0
        if consumed >= records:
            return
        restores = ", ".join(
            f"{float(line.get('seconds', math.nan)):.1f}"
            for process in started
            for line in process.logged("state restored")
        )
        raise BenchError(
            f"{label}: the scorer consumed {consumed:,} of {records:,} records before "
            f"--until-idle {self.options.until_idle:g} s stopped it; its restores took "
            f"{restores or 'no'} s, counted as idle (from the partition assignment).\n"
            f"{started[0].log_tail()}"
        )

    def _check_shadowed(
        self, label: str, started: Sequence[ChildProcess], topic: str, records: int
    ) -> None:
        """Fail unless the challenger loaded, stayed on and gave a verdict for every input.

        A challenger refused at start-up or switched off mid-run leaves the scorer scoring alone,
        which would show a challenger as costing nothing.
        """
        loaded = all(process.logged("shadow model loaded") for process in started)
        shadowed = sum(partition_sizes(self.settings, topic).values())
        if loaded and shadowed >= records:
            return
        raise BenchError(
            f"{label}: the challenger gave {shadowed:,} verdicts for {records:,} records"
            f" ({'loaded' if loaded else 'not loaded'}).\n{started[0].log_tail()}"
        )

    def train_challenger(self, model: Scorer) -> Scorer:
        """`streamer train` of the shadow run's challenger, in a process of its own.

        The model's training on another world: its seed plus one (`challenger_seed`), the
        default size and days, written to `challenger_path` with its card.
        """
        seed = challenger_seed(model.card.training)
        log(f"challenger: streamer train --seed {seed}")
        command = [
            sys.executable,
            "-m",
            "streamer",
            "train",
            "--model-path",
            str(self.challenger_path),
            "--seed",
            str(seed),
            "--log-format",
            "json",
        ]
        logs = self.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        process = ChildProcess(
            "challenger-train", command, dict(os.environ), logs / "challenger-train.log"
        )
        self.processes.append(process)
        status = process.wait(CHALLENGER_TRAIN_TIMEOUT)
        if status != 0:
            raise failed(process, status)
        challenger = Scorer.from_path(self.challenger_path)
        log(f"challenger: {challenger.name} {challenger.version} beside {model.version}")
        return challenger

    def file_score(self) -> Throughput:
        """`streamer score` over a Parquet file of the preloaded events, in a process of its own."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from streamer.serde import TRANSACTION_FIELDS

        options = self.options
        folder = self.out_dir / "file-score"
        folder.mkdir(parents=True, exist_ok=True)
        data, output = folder / "events.parquet", folder / "verdicts.parquet"
        columns: dict[str, list[Any]] = {name: [] for name in TRANSACTION_FIELDS}
        for item in SyntheticWorld(options.seed).generate(options.events):
            for name in TRANSACTION_FIELDS:
                columns[name].append(item.record[name])
        pq.write_table(pa.table(columns), data)
        del columns
        log(f"file score: {options.events:,} rows")
        command = [
            sys.executable,
            "-m",
            "streamer",
            "score",
            "--input",
            str(data),
            "--output",
            str(output),
            "--model-path",
            str(self.model_path),
            "--log-format",
            "json",
        ]
        logs = self.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        process = ChildProcess("file-score", command, dict(os.environ), logs / "file-score.log")
        self.processes.append(process)
        status = process.wait(START_TIMEOUT + options.events / 1_000)
        if status != 0:
            raise failed(process, status)
        (line,) = process.logged("file scored")
        if line["scored"] != options.events:
            raise BenchError(f"file score: {line['scored']} of {options.events} rows scored")
        data.unlink()
        output.unlink()
        folder.rmdir()
        result = Throughput(
            FILE_SCORER,
            "-",
            1,
            events=int(line["scored"]),
            seconds=float(line["seconds"]),
            peak_rss_mb=process.peak_rss_mb,
            cpu_seconds=process.cpu_seconds or math.nan,
        )
        log(
            f"file score: {result.events_per_second:,.0f} events/s, "
            f"peak RSS {result.peak_rss_mb:.0f} MB"
        )
        return result

    def restore(self, drain: _Drain, source: str) -> Restore:
        """One more scorer in the group of a finished stateful drain, timed restoring its state.

        It is assigned every partition, restores the card state from the group's changelog
        (whose records all lie within the committed offsets: the drain ended with a clean stop),
        finds nothing left to consume and exits after the idle wait. The figures are those of
        its "state restored" log line (`kafka.changelog.Restorer`).
        """
        label = f"{drain.label}-restore"
        changelog = changelog_topic(drain.group, CARD_STORE)
        changelog_records = sum(partition_sizes(self.settings, changelog).values())
        log(f"restore: {label} from {changelog_records:,} changelog records")
        process = self.start(
            SCORER,
            label=label,
            input_topic=drain.input_topic,
            output_topic=drain.output_topic,
            dlq_topic=drain.dlq_topic,
            group=drain.group,
            until_idle=self.options.until_idle,
        )
        status = process.wait(START_TIMEOUT + changelog_records / 5_000)
        if status != 0:
            raise failed(process, status)
        restored = process.logged("state restored")
        if not restored:
            raise BenchError(f'{label}: no "state restored" line.\n{process.log_tail()}')
        line = restored[0]
        notes = []
        if len(restored) > 1:
            notes.append(f"restored {len(restored)} times (a rebalance); the first is shown")
        stopped = process.logged("scorer stopped")
        consumed = int(stopped[-1].get("consumed", 0)) if stopped else 0
        if consumed:
            notes.append(f"it also consumed {consumed:,} records")
        records = int(line["records"])
        if records != changelog_records:
            notes.append(f"{changelog_records - records:,} changelog records left out")
        result = Restore(
            source=source,
            changelog_records=changelog_records,
            records=records,
            keys=int(line["keys"]),
            seconds=float(line["seconds"]),
            peak_rss_mb=process.peak_rss_mb,
            note="; ".join(notes),
        )
        log(
            f"{label}: {result.records:,} records, {result.keys:,} keys in "
            f"{result.seconds:.2f} s ({result.records_per_second:,.0f} records/s), "
            f"peak RSS {result.peak_rss_mb:.0f} MB"
        )
        return result

    def state_memory(self) -> StateMemory:
        """The scorer with and without card state over `state_cards` events of new cards.

        Both drain the same preloaded topic (measured and checked as every throughput run);
        the state is the difference of their peak RSS. Then a scorer restores the stateful
        run's changelog: every card once.
        """
        cards = self.options.state_cards
        topic, sizes, _ = self.preload(
            "cards-input", cards, new_card_events(self.options.seed + 3, cards)
        )
        stateful, drain = self.throughput(SCORER, topic, sizes, card_state=True, tag="cards")
        stateless, _ = self.throughput(SCORER, topic, sizes, card_state=False, tag="cards")
        restore = self.restore(drain, f"{cards:,} new cards")
        memory = StateMemory(cards, stateful, stateless, restore)
        log(
            f"state memory: {cards:,} cards, peak RSS {stateful.peak_rss_mb:,.0f} MB with state, "
            f"{stateless.peak_rss_mb:,.0f} MB without: {memory.bytes_per_card:,.0f} bytes a card"
        )
        return memory

    def latency(self) -> list[Latency]:
        """Both processors, each on fresh topics, measured in alternating rounds at each rate.

        Returns one result per processor and rate. Rounds alternate which processor goes first,
        so a stall of the shared machine (a broker garbage collection, say) is as likely to land
        in either's samples; both keep running throughout, the one not fed idles. Each processor's
        events continue one synthetic world (`LatencyFeed`), encoded before the round that sends
        them.
        """
        options = self.options
        producer = OutputProducer(self.settings.producer_config(), name="bench-latency")
        kinds = (PASSTHROUGH, SCORER)
        lanes: dict[str, _Lane] = {}
        try:
            for kind in kinds:
                lanes[kind] = self._start_lane(kind, producer)
            round_seconds = options.latency_seconds / options.latency_rounds
            results = []
            for rate in options.rates:
                total = math.ceil(rate * (options.warmup_seconds + round_seconds))
                warmup = math.ceil(rate * options.warmup_seconds)
                samples: dict[str, list[float]] = {kind: [] for kind in kinds}
                sent = dict.fromkeys(kinds, 0)
                rates: dict[str, list[float]] = {kind: [] for kind in kinds}
                for number in range(options.latency_rounds):
                    for kind in kinds if number % 2 == 0 else kinds[::-1]:
                        lane = lanes[kind]
                        events = lane.feed.take(total)
                        run = PacedRun(producer, lane.reader, lane.topic, events, lane.process)
                        run.send(rate, total, warmup=warmup)
                        if not run.drain(DRAIN_TIMEOUT):
                            log(f"latency: {kind} at {rate:,.0f}/s: outputs still missing")
                        samples[kind] += run.latencies_ms()
                        sent[kind] += run.measured_count()
                        rates[kind].append(run.achieved_rate())
                for kind in kinds:
                    shown = latency_percentiles(samples[kind])
                    self.latency_samples[(kind, rate)] = samples[kind]
                    result = Latency(
                        processor=kind,
                        rate=rate,
                        achieved_rate=statistics.fmean(rates[kind]),
                        sent=sent[kind],
                        received=len(samples[kind]),
                        percentiles_ms=shown,
                        max_ms=max(samples[kind], default=math.nan),
                    )
                    results.append(result)
                    log(
                        f"latency: {kind} at {rate:,.0f}/s: p50 {shown['p50']:.1f} ms, "
                        f"p99 {shown['p99']:.1f} ms, missing {result.missing}"
                    )
            for lane in lanes.values():
                status = lane.process.stop()
                if status != 0:
                    raise failed(lane.process, status)
        finally:
            for lane in lanes.values():
                lane.process.kill()
                lane.reader.close()
        results.sort(key=lambda result: kinds.index(result.processor))
        return results

    def _start_lane(self, kind: str, producer: OutputProducer) -> _Lane:
        """Start `kind` on fresh topics and wait until it answers its first records."""
        settings = self.settings
        label = f"{kind}-latency"
        input_topic = self.topic(f"{label}-in")
        output = self.topic(f"{label}-out")
        dlq = self.topic(f"{label}-dlq")
        create_topics(
            settings.admin_config(), [input_topic, output, dlq], partitions=self.options.partitions
        )
        reader = LatencyReader(settings, output, self.options.partitions)
        process = self.start(
            kind,
            label=label,
            input_topic=input_topic,
            output_topic=output,
            dlq_topic=dlq,
            group=f"bench-{self.run_id}-{label}",
        )
        feed = LatencyFeed(self.options.seed + 2)
        lane = _Lane(input_topic, reader, process, feed)
        log(f"latency: {kind} started (pid {process.pid}); waiting for it to answer")
        first = PacedRun(producer, reader, input_topic, feed.take(FIRST_WARMUP_EVENTS), process)
        first.send(1_000.0, FIRST_WARMUP_EVENTS, warmup=FIRST_WARMUP_EVENTS)
        if not first.drain(START_TIMEOUT):
            lane.process.kill()
            reader.close()
            raise BenchError(
                f"{kind} gave no output for its first {FIRST_WARMUP_EVENTS} events within "
                f"{START_TIMEOUT:.0f} s.\n{process.log_tail()}"
            )
        return lane

    def run(self) -> Report:
        options = self.options
        started_at = datetime.now(UTC)
        clock = time.monotonic()
        scorer = Scorer.from_path(self.model_path)
        report = Report(
            started_at=started_at.strftime("%Y-%m-%d %H:%M UTC"),
            duration_seconds=math.nan,
            quick=options.quick,
            machine=machine_info(options.kafka_version),
            config={},
            preload={},
        )
        phases = report.phase_seconds
        try:
            with timed(phases, "challenger"):
                challenger = self.train_challenger(scorer)
            report.config = self.config_snapshot(scorer, challenger)
            with timed(phases, "preload"):
                input_topic, sizes, report.preload = self.preload(
                    "input", options.events, SyntheticWorld(options.seed).generate(options.events)
                )
            # In this process, before any processor runs: on a quiet machine.
            with timed(phases, "breakdown"):
                times = self.breakdown(scorer, report)
            report.breakdown = stage_costs(times.wall, times.cpu, report.breakdown_records)
            with timed(phases, "state held"):
                report.held_state = self.held_state()
            repeats: dict[_ThroughputRun, list[Throughput]] = {r: [] for r in THROUGHPUT_RUNS}
            stateful_drains: list[_Drain] = []
            with timed(phases, "throughput"):
                for repeat in range(options.throughput_repeats):
                    for run in round_order(THROUGHPUT_RUNS, repeat):
                        done = repeats[run]
                        if done and not done[0].available:
                            continue
                        kind, guarantee, processes, card_state, metrics, shadow = run
                        result, drain = self.throughput(
                            kind,
                            input_topic,
                            sizes,
                            guarantee=guarantee,
                            processes=processes,
                            card_state=card_state,
                            metrics=metrics,
                            shadow=shadow,
                            repeat=repeat,
                        )
                        done.append(result)
                        if run == USERS_SCORER:
                            stateful_drains.append(drain)
            report.throughput = [median_run(done) for done in repeats.values()]
            report.paired = [
                paired_ratio(METRICS_PAIR, repeats[USERS_SCORER], repeats[NO_METRICS]),
                paired_ratio(STATE_PAIR, repeats[USERS_SCORER], repeats[STATELESS]),
            ]
            with timed(phases, "file score"):
                report.throughput.append(self.file_score())
            with timed(phases, "restore"):
                source = f"{options.events:,}-event drain"
                report.restore = median_restore(
                    [self.restore(drain, source) for drain in stateful_drains]
                )
            with timed(phases, "state memory"):
                report.state_memory = self.state_memory()
            with timed(phases, "latency"):
                report.latency = self.latency()
        finally:
            self.kill_all()
            delete_topics(self.settings.admin_config(), self.topics)
        report.duration_seconds = time.monotonic() - clock
        report.targets = evaluate_targets(report)
        return report

    def config_snapshot(self, scorer: Scorer, challenger: Scorer) -> dict[str, Any]:
        """What shapes the numbers (no secrets: only these client settings are shown)."""
        options, settings = self.options, self.settings
        producer = settings.producer_config()
        consumer = settings.consumer_config()
        return {
            "events": options.events,
            "partitions": options.partitions,
            "rates": list(options.rates),
            "throughput_repeats": options.throughput_repeats,
            "latency_seconds": options.latency_seconds,
            "latency_rounds": options.latency_rounds,
            "warmup_seconds": options.warmup_seconds,
            "until_idle_seconds": options.until_idle,
            "state_cards": options.state_cards,
            "breakdown_history_days": BREAKDOWN_HISTORY_DAYS,
            "seed": options.seed,
            "batch_size": settings.batch_size,
            "poll_timeout": settings.poll_timeout,
            "model": {"name": scorer.name, "version": scorer.version},
            "challenger": {
                "name": challenger.name,
                "version": challenger.version,
                "seed": challenger.card.training["seed"],
            },
            "producer": {
                key: str(producer[key])
                for key in (
                    "acks",
                    "enable.idempotence",
                    "linger.ms",
                    "batch.num.messages",
                    "compression.type",
                )
                if key in producer
            },
            "consumer": {
                key: str(consumer[key])
                for key in ("fetch.wait.max.ms", "fetch.min.bytes", "auto.commit.interval.ms")
                if key in consumer
            },
        }


_ThroughputRun = tuple[str, str, int, bool, bool, bool]
"""(kind, guarantee, processes, card state, metrics, shadow)."""
USERS_SCORER: Final[_ThroughputRun] = (SCORER, "at-least-once", 1, True, True, False)
"""The scorer as users run it: card state and metrics, at-least-once, one process."""
NO_METRICS: Final[_ThroughputRun] = (SCORER, "at-least-once", 1, True, False, False)
STATELESS: Final[_ThroughputRun] = (SCORER, "at-least-once", 1, False, True, False)
THROUGHPUT_RUNS: Final[tuple[_ThroughputRun, ...]] = (
    (PASSTHROUGH, "at-least-once", 1, False, False, False),
    NO_METRICS,
    USERS_SCORER,
    STATELESS,
    (SCORER, "at-least-once", 1, True, True, True),
    (SCORER, "exactly-once", 1, True, True, False),
    (SCORER, "at-least-once", 2, True, True, False),
)
"""The throughput runs of a round: the scorer as users run it, in both modes and two processes;
without metrics and without state, its baselines, drained right before and after it (whichever
way `round_order` takes the round) so each round's ratio is a fair pair (`paired_ratio`); with a
challenger, whose baseline is the scorer as users run it."""

_Run = TypeVar("_Run")


def round_order(runs: Sequence[_Run], repeat: int) -> list[_Run]:
    """The order of the throughput runs in round `repeat`: the first (the pass-through) first,
    the others as given in even rounds and reversed in odd ones."""
    if repeat % 2 == 0 or len(runs) < 2:
        return list(runs)
    return [runs[0], *reversed(runs[1:])]


def run_environment(
    base: Mapping[str, str],
    *,
    guarantee: str,
    card_state: bool,
    metrics_port: int,
    shadow: tuple[Path, str] | None,
) -> dict[str, str]:
    """The environment of a processor: `base` with the run's own settings.

    Children inherit STREAMER_* (e.g. STREAMER_KAFKA_*); the guarantee, whether the scorer keeps
    card state, its metrics port and its challenger are the run's own. `shadow`: the challenger's
    artefact and the topic of its verdicts, for the shadow run; for any other run a challenger
    set in `base` is left out.
    """
    env = {name: value for name, value in base.items() if name not in SHADOW_VARIABLES}
    env |= {
        "STREAMER_PROCESSING_GUARANTEE": guarantee,
        "STREAMER_CARD_STATE": "true" if card_state else "false",
        "STREAMER_METRICS_PORT": str(metrics_port),
    }
    if shadow is not None:
        model_path, topic = shadow
        env |= {"STREAMER_SHADOW_MODEL_PATH": str(model_path), "STREAMER_SHADOW_TOPIC": topic}
    return env


def challenger_seed(training: Mapping[str, Any]) -> int:
    """The seed of the challenger's world: the model's seed plus one, so never the model's own.

    A model trained on a file or imported has no seed: the default's plus one then.
    """
    seed = training.get("seed")
    return (seed if isinstance(seed, int) else DEFAULT_SEED) + 1


@contextlib.contextmanager
def scorer_garbage_collector() -> Iterator[None]:
    """The garbage collector as `streamer run` sets it (`cli.tune_garbage_collector`), then back."""
    threshold = gc.get_threshold()
    tune_garbage_collector()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


_Measured = TypeVar("_Measured", Throughput, Restore)


def _median(items: Sequence[_Measured], rate: Callable[[_Measured], float], what: str) -> _Measured:
    """The item with the median `rate` (the lower of the middle two), noting the others'.

    `what` names the items and the rate's unit in the note, e.g. "runs", "events/s".
    """
    ranked = sorted(items, key=rate)
    chosen = ranked[(len(ranked) - 1) // 2]
    if len(ranked) < 2:
        return chosen
    noun, unit = what.split(" ", 1)
    rates = ", ".join(f"{rate(item):,.0f}" for item in items)
    spread = f"median of {len(items)} {noun} ({rates} {unit})"
    return replace(chosen, note="; ".join(filter(None, [spread, chosen.note])))


def median_run(runs: Sequence[Throughput]) -> Throughput:
    """The run with the median events/s (the lower of the middle two), noting the others."""
    return _median(runs, lambda run: run.events_per_second, "runs events/s")


def median_restore(restores: Sequence[Restore]) -> Restore | None:
    """The restore with the median records/s (the lower of the middle two), noting the others."""
    if not restores:
        return None
    return _median(restores, lambda restore: restore.records_per_second, "restores records/s")


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Record how long the block took under `name` (where the ten minutes go)."""
    started = time.monotonic()
    try:
        yield
    finally:
        phases[name] = time.monotonic() - started


def new_card_events(seed: int, count: int) -> Iterator[LabelledTransaction]:
    """`count` synthetic events, each of a card of its own (`new-card-0000000`, ...).

    The events are the synthetic world's with the card id replaced, so a scorer keeps `count`
    histories of one transaction each. They span a day at most (`STATE_EVENTS_PER_DAY`): no card
    expires meanwhile.
    """
    world = SyntheticWorld(
        seed,
        events_per_day=max(STATE_EVENTS_PER_DAY, float(count)),
        n_cards=round(DEFAULT_EVENTS_PER_DAY / EVENTS_PER_CARD_PER_DAY),
    )
    for index, event in enumerate(world.generate(count)):
        record = {**event.record, "card_id": f"new-card-{index:07d}"}
        yield LabelledTransaction(record, event.is_fraud)


class LatencyFeed:
    """The events of one processor's latency lane: a synthetic world's stream, encoded.

    Each `take` continues where the last one ended, so no event is sent twice and event time
    moves on as in a live stream. (Events sent again would be new transactions of their cards at
    each card's latest time, which never goes back: every pass would add to histories that never
    age, and the stateful scorer would be timed on cards far busier than any the world has.)
    """

    def __init__(self, seed: int) -> None:
        self._events = SyntheticWorld(seed).generate(sys.maxsize)

    def take(self, count: int) -> list[tuple[bytes, bytes]]:
        """The next `count` events as (key, value) bytes."""
        return [
            (event.record["card_id"].encode(), encode_transaction(event.record))
            for event in islice(self._events, count)
        ]


# -- machine -------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info(kafka_version: str) -> dict[str, str]:
    """CPU, cores, memory, OS and the versions that matter for the numbers."""
    cpu = platform.processor() or platform.machine()
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = "unknown"
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
            break

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu,
        "cores": str(usable_cores()),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "confluent-kafka": version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka": kafka_version,
        "numpy": version("numpy"),
        "scikit-learn": version("scikit-learn"),
        "fastavro": version("fastavro"),
    }


# -- entry point ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Written:
    directory: Path
    table: str


def run_bench(settings: Settings, options: BenchOptions, model_path: Path) -> Written:
    """Run the bench, write report.json, report.md and latency-cdf.png; returns the table."""
    if not model_path.exists():
        raise BenchError(f"no model at {model_path}; run `streamer train` first")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = options.out_root / stamp
    out_dir.mkdir(parents=True, exist_ok=False)
    log(f"writing results to {out_dir}")
    bench = Bench(settings, options, out_dir, model_path)
    report = bench.run()
    (out_dir / "report.json").write_text(
        json.dumps(report_to_json(report), indent=2, allow_nan=False) + "\n"
    )
    (out_dir / "report.md").write_text(render(report, markdown=True))
    if bench.latency_samples:
        plot_latency_cdfs(bench.latency_samples, out_dir / "latency-cdf.png")
    return Written(out_dir, render(report, markdown=False))

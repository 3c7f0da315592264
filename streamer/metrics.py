"""Prometheus metrics and health checks of `streamer run`, served by one small HTTP thread.

`/metrics` is the Prometheus text format of the scorer's own registry (single process: no
multiprocess mode, which would lose the custom collectors and the info metric). `/livez` says
whether the scoring loop is turning; `/readyz` whether the scorer is scoring (see `HealthServer`).

The hot loop pays per batch, never per record in Python: counters are the loop's own integers
(`app.Counters`), read when Prometheus scrapes; stage durations are one `observe` per stage and
batch (the pipeline's `Laps` seam); the per-record histograms (end-to-end latency, score) are
bucketed with numpy once per batch (`BatchHistogram`). Consumer lag comes from librdkafka's
statistics (`statistics.interval.ms`, `stats_cb`), parsed every `STATISTICS_INTERVAL_MS` inside
the consumer's poll. No card id or transaction id is ever a label.

Counters only go up: work in an aborted transaction stays counted, and the abort is counted too.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from streamer.errors import ConfigError

log = structlog.get_logger(__name__)

PREFIX: Final = "streamer_"
STAGES: Final = ("decode", "validate", "features", "predict", "encode", "produce", "commit")
"""Stages of `streamer_stage_duration_seconds`: the pipeline's laps (`pipeline.Pipeline`), then
producing the batch's outputs, then a commit (at-least-once: changelog, flush, offsets;
exactly-once: a transaction)."""
DEAD_LETTER_STAGES: Final = ("decode", "validate", "score")
REBALANCE_EVENTS: Final = ("assigned", "revoked", "lost")
LIVENESS_SECONDS: Final = 60.0
"""`/livez` fails once the loop has not turned for this long. A turn legitimately blocks for a
commit's flush (up to 30 s, `checkpoint.FLUSH_SECONDS`) or a transactional call (20 s, retried);
a call stuck past its timeout is ended by the watchdog (`kafka.watchdog`) after 30 s."""
STATISTICS_INTERVAL_MS: Final = 5_000
"""librdkafka statistics (consumer lag) every 5 s; `STREAMER_KAFKA_STATISTICS_INTERVAL_MS`
overrides it."""
STATE_EVERY_SECONDS: Final = 1.0
"""How often the loop refreshes the state gauges (keys, restore progress)."""

BATCH_SIZE_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 100_000)
STAGE_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
LATENCY_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)
SHADOW_AGREEMENT_THRESHOLDS: Final = ("champion", "challenger", "own")
"""The `threshold` label of `streamer_shadow_agreements_total` (see `shadow.compare`)."""
SCORE_DIFFERENCE_BUCKETS: Final = (
    -0.5,
    -0.2,
    -0.1,
    -0.05,
    -0.02,
    -0.01,
    0.0,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
)
SCORE_BUCKETS: Final = (
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    0.98,
    0.99,
    1.0,
)


class BatchHistogram:
    """A Prometheus histogram fed a numpy array at a time: one bucket count per batch.

    prometheus-client's `Histogram.observe` costs about a microsecond per value; this costs a
    `searchsorted` and a `bincount` per batch. Safe to scrape from another thread.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self._documentation = documentation
        self._bounds = np.asarray(buckets, dtype=np.float64)
        # The library's own spelling of `le`, so our buckets read like its histograms'.
        self._labels = [floatToGoString(bound) for bound in buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray) -> None:
        """Count every value of `values` (finite floats; the caller leaves out the rest)."""
        if values.size == 0:
            return
        # Bucket i holds values in (bounds[i-1], bounds[i]]: Prometheus buckets are `le`.
        index = np.searchsorted(self._bounds, values, side="left")
        counts = np.bincount(index, minlength=len(self._counts))
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        yield HistogramMetricFamily(
            self.name,
            self._documentation,
            buckets=list(zip(self._labels, cumulative, strict=True)),
            sum_value=total,
        )


class ConsumerLag:
    """Consumer lag per partition from librdkafka's statistics: the consumer's `stats_cb`.

    librdkafka calls it inside `poll`/`consume`, on the loop's thread, every
    `statistics.interval.ms`. Only the partitions assigned to this scorer are kept (the
    statistics list every partition of the topic); partition -1 (the topic's internal one) and
    negative lags (not known yet) are left out. Exposed like kafka_exporter's
    `kafka_consumergroup_lag{consumergroup,topic,partition}`: under read_committed the lag is
    measured to the last stable offset.

    Under exactly-once the offsets are committed by the producer's transactions, which the
    consumer's statistics never see (they keep the offset committed when the partition was
    assigned): `committed` gives the positions the transactions committed, and the lag is
    measured from the later of the two.
    """

    def __init__(self, group: str) -> None:
        self._group = group
        self._lags: dict[tuple[str, int], int] = {}
        self.assigned: frozenset[tuple[str, int]] = frozenset()
        """The partitions the scorer holds; set by the loop at each rebalance."""
        self.committed: Mapping[tuple[str, int], int] = {}
        """Positions committed that the consumer does not know of (exactly-once)."""
        self.read_committed = False
        self._failed = False

    def __call__(self, statistics: str) -> None:
        # Runs inside librdkafka's poll: never raise.
        try:
            self._lags = self.parse(statistics)
        except Exception as exc:  # a malformed report must not stop the loop; say so once
            if not self._failed:
                self._failed = True
                log.warning("librdkafka statistics not understood", error=repr(exc))

    def parse(self, statistics: str) -> dict[tuple[str, int], int]:
        """(topic, partition) → lag, for the assigned partitions, from one statistics report."""
        report = json.loads(statistics)
        assigned, committed = self.assigned, self.committed
        end_offset = "ls_offset" if self.read_committed else "hi_offset"
        lags: dict[tuple[str, int], int] = {}
        for topic, topic_report in (report.get("topics") or {}).items():
            for key, partition_report in (topic_report.get("partitions") or {}).items():
                partition = int(key)
                if partition < 0 or (topic, partition) not in assigned:
                    continue
                lag = partition_report.get("consumer_lag")
                known = committed.get((topic, partition), -1)
                if known > partition_report.get("committed_offset", -1):
                    end = partition_report.get(end_offset, -1)
                    lag = end - known if isinstance(end, int) and end >= 0 else -1
                if isinstance(lag, int) and lag >= 0:
                    lags[(topic, partition)] = lag
        return lags

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "consumergroup_lag",
            "Records not yet committed per partition of this scorer: high watermark (last "
            "stable offset under read_committed) minus the committed offset (librdkafka "
            "statistics)",
            labels=["consumergroup", "topic", "partition"],
        )
        assigned = self.assigned
        for (topic, partition), lag in sorted(self._lags.items()):
            if (topic, partition) in assigned:
                family.add_metric([self._group, topic, str(partition)], lag)
        yield family


class StageTimer:
    """The pipeline's `Laps`: adds the time since the previous lap to the stage it names."""

    __slots__ = ("_last", "seconds")

    def __init__(self) -> None:
        self._last = 0.0
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        self._last = time.perf_counter()
        self.seconds = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        seconds = self.seconds
        seconds[stage] = seconds.get(stage, 0.0) + now - self._last
        self._last = now


class Health(Protocol):
    """What `/livez` and `/readyz` ask; answered from the HTTP server's thread."""

    def readiness(self) -> list[str]:
        """The readiness checks that fail (empty: ready)."""
        ...

    def liveness(self) -> str | None:
        """Why the scorer is not live (None: it is)."""
        ...


class Observed(Health, Protocol):
    """What the scrape-time collector reads from the scorer (plain numbers, any thread)."""

    def metric_counts(self) -> Mapping[str, int]:
        """consumed, verdicts, flagged, commits, aborted_transactions: totals since start."""
        ...

    def dead_letter_counts(self) -> Mapping[str, int]:
        """Dead letters per stage since start."""
        ...

    def model_info(self) -> Mapping[str, str]:
        """name, version, sha256, threshold of the model in use."""
        ...

    def assigned_partitions(self) -> int: ...


_COUNTS: Final = (
    ("consumed", "records_consumed", "Input records consumed (errors of the consumer excluded)"),
    ("verdicts", "verdicts", "Verdicts produced"),
    ("flagged", "flagged", "Verdicts with is_fraud true"),
    (
        "commits",
        "commits",
        "Commits: at-least-once, offsets committed after the outputs and changelog were "
        "acknowledged; exactly-once, transactions committed",
    ),
    ("aborted_transactions", "transactions_aborted", "Exactly-once: transactions aborted"),
)


class _ScorerCollector:
    """Reads the scorer's own counters and state when Prometheus scrapes."""

    def __init__(self, observed: Observed) -> None:
        self._observed = observed

    def collect(self) -> Iterator[Metric]:
        observed = self._observed
        counts = observed.metric_counts()
        for key, name, documentation in _COUNTS:
            yield CounterMetricFamily(PREFIX + name, documentation, value=counts.get(key, 0))
        dead = CounterMetricFamily(
            PREFIX + "dead_letters",
            "Records sent to the dead-letter topic, by the stage that refused them",
            labels=["stage"],
        )
        for stage, count in observed.dead_letter_counts().items():
            dead.add_metric([stage], count)
        yield dead
        info = observed.model_info()
        model = InfoMetricFamily(
            PREFIX + "model", "The model scoring the verdicts", labels=sorted(info)
        )
        model.add_metric([info[name] for name in sorted(info)], {})
        yield model
        yield GaugeMetricFamily(
            PREFIX + "assigned_partitions",
            "Input partitions assigned to this scorer",
            value=observed.assigned_partitions(),
        )
        yield GaugeMetricFamily(
            PREFIX + "ready",
            "1 when /readyz answers 200: partitions assigned, state restored, producer healthy",
            value=0 if observed.readiness() else 1,
        )


class ScorerMetrics:
    """The scorer's registry and the instruments the loop feeds; not thread-safe to feed."""

    def __init__(self, group: str) -> None:
        # `_created` series double the exposition for nothing a dashboard uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.batch_size = Histogram(
            PREFIX + "batch_size",
            "Records per polled batch",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        stage = Histogram(
            PREFIX + "stage_duration_seconds",
            "Seconds per batch spent in each stage (decode, validate, features, predict, "
            "encode, produce) and per commit (commit)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self._stages = {name: stage.labels(name) for name in STAGES}
        self.latency = BatchHistogram(
            PREFIX + "end_to_end_latency_seconds",
            "Verdict produced minus the input record's Kafka timestamp, in seconds",
            LATENCY_BUCKETS,
        )
        self.scores = BatchHistogram(
            PREFIX + "score", "Model scores (P(fraud)) of the verdicts", SCORE_BUCKETS
        )
        self.registry.register(self.latency)
        self.registry.register(self.scores)
        self.rebalances = Counter(
            PREFIX + "rebalances",
            "Consumer group rebalance events: partitions assigned, revoked or lost",
            ["event"],
            registry=self.registry,
        )
        for event in REBALANCE_EVENTS:
            self.rebalances.labels(event)
        self.model_reload_failures = Counter(
            PREFIX + "model_reload_failures",
            "New model artefacts refused while the running model kept serving",
            registry=self.registry,
        )
        self.model_reloads = Counter(
            PREFIX + "model_reloads",
            "New model artefacts verified and swapped in without a restart",
            registry=self.registry,
        )
        self.shadow_active = Gauge(
            PREFIX + "shadow_active",
            "1 while a challenger model scores beside the model (0: none, or switched off)",
            registry=self.registry,
        )
        self.shadow_records = Counter(
            PREFIX + "shadow_records",
            "Records scored by both the model and the challenger",
            registry=self.registry,
        )
        shadow_agreements = Counter(
            PREFIX + "shadow_agreements",
            "Records on which model and challenger agree (both flag or neither), at the model's"
            " threshold, at the challenger's, and each at its own",
            ["threshold"],
            registry=self.registry,
        )
        self._shadow_agreements = {
            label: shadow_agreements.labels(label) for label in SHADOW_AGREEMENT_THRESHOLDS
        }
        self.shadow_difference = BatchHistogram(
            PREFIX + "shadow_score_difference",
            "Challenger score minus model score, per record scored by both",
            SCORE_DIFFERENCE_BUCKETS,
        )
        self.registry.register(self.shadow_difference)
        self.shadow_delivery_failures = Counter(
            PREFIX + "shadow_delivery_failures",
            "Challenger verdicts the broker did not take (at-least-once: best effort)",
            registry=self.registry,
        )
        self.state_keys = Gauge(
            PREFIX + "state_keys", "Keys held in a state store", ["store"], registry=self.registry
        )
        self.restoring = Gauge(
            PREFIX + "state_restoring_partitions",
            "Partitions whose state is being restored from the changelog (paused meanwhile)",
            ["store"],
            registry=self.registry,
        )
        self.restored_records = Counter(
            PREFIX + "state_restore_records",
            "Changelog records applied while restoring state",
            ["store"],
            registry=self.registry,
        )
        self._remaining = Gauge(
            PREFIX + "state_restore_remaining_records",
            "Changelog records still to read per partition being restored",
            ["store", "partition"],
            registry=self.registry,
        )
        self._remaining_partitions: set[tuple[str, str]] = set()
        self._restored_seen: dict[str, int] = {}
        self.lag = ConsumerLag(group)
        self.registry.register(self.lag)
        self.timer = StageTimer()
        self._clock = time.time
        """Wall-clock seconds (the latency is measured against Kafka timestamps)."""

    def observe(self, observed: Observed) -> None:
        """Read the scorer's counters, model and health at every scrape."""
        self.registry.register(_ScorerCollector(observed))

    # -- fed by the loop ---------------------------------------------------------------------------

    def batch(
        self,
        size: int,
        stage_seconds: Mapping[str, float],
        timestamps_ms: Sequence[int],
        scored: Sequence[int] | None,
        scores: np.ndarray,
    ) -> None:
        """One batch: its size, its stages' seconds, and the latency and score of its verdicts.

        `timestamps_ms`: each consumed record's Kafka timestamp (ms); `scored`: the indexes of
        the records that got a verdict (None: all of them); `scores`: their scores (NaN: none).
        """
        produced_ms = int(self._clock() * 1000.0)
        self.batch_size.observe(size)
        stages = self._stages
        for stage, seconds in stage_seconds.items():
            stages[stage].observe(seconds)
        stamps = np.array(timestamps_ms, dtype=np.int64)
        if scored is not None:
            stamps = stamps[np.array(scored, dtype=np.intp)]
        stamps = stamps[stamps > 0]  # a record without a timestamp says -1
        self.latency.observe_many((produced_ms - stamps) * 0.001)
        finite = scores[np.isfinite(scores)]
        self.scores.observe_many(finite)

    def shadow(self, records: int, agreements: Mapping[str, int], differences: np.ndarray) -> None:
        """One batch scored by the challenger too (see `shadow.compare`)."""
        self.shadow_records.inc(records)
        for label, count in agreements.items():
            self._shadow_agreements[label].inc(count)
        self.shadow_difference.observe_many(differences)

    def stage(self, stage: str, seconds: float) -> None:
        self._stages[stage].observe(seconds)

    def rebalanced(self, event: str, partitions: Iterable[tuple[str, int]]) -> None:
        """A rebalance callback ran; `partitions`: what the scorer holds now."""
        self.rebalances.labels(event).inc()
        self.lag.assigned = frozenset(partitions)

    def state(
        self,
        store: str,
        keys: int,
        restoring: int,
        restored_records: int,
        remaining: Mapping[int, int],
    ) -> None:
        """A store's size and restore progress; `restored_records` is a running total."""
        self.state_keys.labels(store).set(keys)
        self.restoring.labels(store).set(restoring)
        seen = self._restored_seen.get(store, 0)
        if restored_records > seen:
            self.restored_records.labels(store).inc(restored_records - seen)
            self._restored_seen[store] = restored_records
        current = {(store, str(partition)) for partition in remaining}
        for gone in self._remaining_partitions - current:
            self._remaining.remove(*gone)
        for partition, count in remaining.items():
            self._remaining.labels(store, str(partition)).set(count)
        self._remaining_partitions = current


# -- the HTTP server -----------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log: stay quiet."""


class _Starting:
    """Health before the scorer exists: live for `LIVENESS_SECONDS`, never ready."""

    def __init__(self) -> None:
        self._since = time.monotonic()

    def readiness(self) -> list[str]:
        return ["starting: connecting to Kafka"]

    def liveness(self) -> str | None:
        waited = time.monotonic() - self._since
        if waited > LIVENESS_SECONDS:
            return f"still starting after {waited:.0f}s"
        return None


class HealthServer:
    """`/metrics`, `/livez` and `/readyz` on one port, from a daemon thread.

    - `/livez`: 200 while the scoring loop has turned within `LIVENESS_SECONDS` (so it is not
      stuck in a client call); 503 otherwise. It checks the process, never its dependencies: a
      broker outage does not make a scorer "dead" (restarting it would not help).
    - `/readyz`: 200 when partitions are assigned, their state restored, the model loaded and
      neither Kafka client has a fatal error; 503 naming each failing check otherwise (also
      while starting and stopping).

    Bodies are short JSON: `{"status": "ok"}` or `{"status": "fail", "checks": [...]}`.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        """Bind `host:port` now; raises `ConfigError` naming the variable when it cannot."""
        self._metrics_app = make_wsgi_app(registry)
        self._health: Health = _Starting()
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = make_server(
                host, port, self._route, server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"STREAMER_METRICS_PORT: port {port} on {host} is already in use; choose "
                    "another port, or 0 to serve no metrics"
                ) from None
            if exc.errno == errno.EACCES:
                raise ConfigError(
                    f"STREAMER_METRICS_PORT: not allowed to listen on port {port} ({exc.strerror})"
                ) from None
            raise ConfigError(
                f"STREAMER_METRICS_HOST: cannot listen on {host}:{port} ({exc})"
            ) from None
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="streamer-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def watch(self, health: Health) -> None:
        """Answer `/livez` and `/readyz` from `health` from now on."""
        self._health = health

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def _route(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        if path == "/livez":
            reason = self._health.liveness()
            return _answer(start_response, [] if reason is None else [reason])
        if path == "/readyz":
            return _answer(start_response, self._health.readiness())
        body = b'{"status": "not found", "paths": ["/metrics", "/livez", "/readyz"]}\n'
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [body]


def _answer(start_response: Callable[..., Any], failing: list[str]) -> list[bytes]:
    if failing:
        status, body = "503 Service Unavailable", {"status": "fail", "checks": failing}
    else:
        status, body = "200 OK", {"status": "ok"}
    data = (json.dumps(body) + "\n").encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]

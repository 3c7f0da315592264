"""`streamer serve`'s Prometheus metrics: `streamer_http_*` for requests, `streamer_replica_*`.

They live in a registry of their own (not prometheus-client's global one), so the server exposes
exactly these, and a test can build as many servers as it likes. Counters only go up. Labels
are bounded: `route` is one of the server's routes (anything else counts as `other`), `status`
an HTTP status code, `stage` a dead-letter stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamer.serve.replica import ReplicaStatus

LATENCY_BUCKETS: Final = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
"""Request durations (s): fine around the 20 ms a checkout can wait."""


class ServeMetrics:
    """The server's metrics and their registry."""

    def __init__(self, replica_status: Callable[[], ReplicaStatus]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "streamer_http_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "streamer_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scored = Counter(
            "streamer_http_transactions_scored",
            "Transactions scored (a verdict returned).",
            registry=self.registry,
        )
        self.flagged = Counter(
            "streamer_http_transactions_flagged",
            "Transactions whose verdict says fraud.",
            registry=self.registry,
        )
        self.refused = Counter(
            "streamer_http_transactions_refused",
            "Transactions refused, by the dead-letter stage the stream would give them.",
            ["stage"],
            registry=self.registry,
        )
        self.overloaded = Counter(
            "streamer_http_overloaded_requests",
            "Requests refused (503) because too many transactions were waiting to be scored.",
            registry=self.registry,
        )
        self.model_reloads = Counter(
            "streamer_http_model_reloads",
            "New models swapped in without a restart (a new artefact renamed into place).",
            registry=self.registry,
        )
        self.model_reload_failures = Counter(
            "streamer_http_model_reload_failures",
            "New models refused at reload; the model in use kept serving.",
            registry=self.registry,
        )
        self.registry.register(_ReplicaCollector(replica_status))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector(Collector):
    """Reads the replica's status at scrape time."""

    def __init__(self, status: Callable[[], ReplicaStatus]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        yield GaugeMetricFamily(
            "streamer_replica_lag_records",
            "Card history changelog records the replica has not read yet.",
            value=status.lag_records,
        )
        since = status.seconds_since_caught_up
        yield GaugeMetricFamily(
            "streamer_replica_seconds_since_caught_up",
            "Seconds since every changelog partition was last read to its end (0: now; "
            "NaN: never).",
            value=float("nan") if since is None else since,
        )
        yield GaugeMetricFamily(
            "streamer_replica_ready",
            "1 once the replica has read every changelog partition to its end.",
            value=int(status.caught_up_once and status.error is None),
        )
        yield GaugeMetricFamily(
            "streamer_replica_cards", "Cards whose history the replica holds.", value=status.cards
        )
        yield CounterMetricFamily(
            "streamer_replica_records",
            "Changelog records the replica has read.",
            value=status.records,
        )


class MetricsMiddleware:
    """Times every HTTP request and counts it by route and status (pure ASGI: no extra task)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: Iterable[str]) -> None:
        self._app = app
        self._metrics = metrics
        self._routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        route = path if path in self._routes else "other"
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_and_record)
        finally:
            self._metrics.requests.labels(route, str(status)).inc()
            self._metrics.duration.labels(route).observe(time.perf_counter() - started)

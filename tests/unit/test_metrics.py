"""Metrics and health of `streamer run`: the instruments, the exposition, the HTTP endpoints."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, TopicPartition
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamer.cli import EXIT_USAGE, main
from streamer.errors import ConfigError
from streamer.metrics import (
    LIVENESS_SECONDS,
    STAGES,
    BatchHistogram,
    ConsumerLag,
    HealthServer,
    ScorerMetrics,
    StageTimer,
)
from streamer.model.scorer import Scorer
from streamer.serde import encode_transaction
from streamer.settings import Settings
from streamer.synthetic import SyntheticWorld
from tests.unit.fakes import AppRig, app_on_fakes
from tests.unit.test_app import StubMessage

GROUP = "fraud-group"


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's exposition: (name, sorted labels) → value."""
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(registry: CollectorRegistry, metric: str, /, **labels: str) -> float:
    return samples(registry)[(metric, tuple(sorted(labels.items())))]


def _messages(count: int, start_offset: int = 0) -> list[StubMessage]:
    events = SyntheticWorld(3).generate(count)
    return [
        StubMessage(encode_transaction(e.record), e.record["card_id"].encode(), start_offset + i)
        for i, e in enumerate(events)
    ]


@pytest.fixture
def scorer(model_path: Path) -> Scorer:
    return Scorer.from_path(model_path)


@pytest.fixture
def rig(scorer: Scorer) -> AppRig:
    metrics = ScorerMetrics(GROUP)
    rig = app_on_fakes(scorer, Settings(max_event_bytes=4096), metrics=metrics)
    metrics.observe(rig.app)
    return rig


def _metrics(rig: AppRig) -> ScorerMetrics:
    metrics = rig.app._metrics
    assert metrics is not None
    return metrics


class TestBatchHistogram:
    def test_matches_prometheus_client_histogram(self) -> None:
        """Bucketing a batch with numpy gives the library's own per-value histogram exactly."""
        buckets = (0.1, 0.5, 1.0, 2.0)
        values = np.array([0.0, 0.1, 0.10001, 0.5, 0.7, 1.0, 2.0, 2.5, 100.0, 0.3])
        ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
        ours = BatchHistogram("x_seconds", "x", buckets)
        ours_registry.register(ours)
        theirs = Histogram("x_seconds", "x", buckets=buckets, registry=theirs_registry)
        ours.observe_many(values[:4])
        ours.observe_many(values[4:])
        for item in values:
            theirs.observe(float(item))
        expected = {k: v for k, v in samples(theirs_registry).items() if "_created" not in k[0]}
        assert samples(ours_registry) == pytest.approx(expected)

    def test_empty_batch_counts_nothing(self) -> None:
        registry = CollectorRegistry()
        histogram = BatchHistogram("y", "y", (1.0,))
        registry.register(histogram)
        histogram.observe_many(np.array([]))
        assert value(registry, "y_count") == 0


class TestConsumerLag:
    def _report(self) -> str:
        return json.dumps(
            {
                "topics": {
                    "tx": {
                        "partitions": {
                            "0": {"consumer_lag": 12},
                            "1": {"consumer_lag": -1},
                            "2": {"consumer_lag": 7},
                            "-1": {"consumer_lag": 99},
                        }
                    }
                }
            }
        )

    def test_lag_of_assigned_partitions_only(self) -> None:
        """Partition -1, unknown (negative) lags and partitions held elsewhere are left out."""
        lag = ConsumerLag(GROUP)
        lag.assigned = frozenset({("tx", 0), ("tx", 1)})
        lag(self._report())
        registry = CollectorRegistry()
        registry.register(lag)
        found = {k: v for k, v in samples(registry).items() if k[0].endswith("_lag")}
        labels = (("consumergroup", GROUP), ("partition", "0"), ("topic", "tx"))
        assert found == {("streamer_consumergroup_lag", labels): 12}

    def test_revoked_partitions_disappear_at_once(self) -> None:
        lag = ConsumerLag(GROUP)
        lag.assigned = frozenset({("tx", 0)})
        lag(self._report())
        lag.assigned = frozenset()
        registry = CollectorRegistry()
        registry.register(lag)
        assert not [k for k in samples(registry) if k[0] == "streamer_consumergroup_lag"]

    def test_a_malformed_report_never_raises(self) -> None:
        """The callback runs inside librdkafka's poll: it must not raise."""
        lag = ConsumerLag(GROUP)
        lag("{not json")
        lag(json.dumps({"topics": {"tx": {"partitions": {"x": {}}}}}))


class TestStageTimer:
    def test_laps_add_up_per_stage(self) -> None:
        timer = StageTimer()
        timer.start()
        timer.lap("decode")
        timer.lap("features")
        timer.lap("features")
        assert set(timer.seconds) == {"decode", "features"}
        assert all(seconds >= 0 for seconds in timer.seconds.values())


class TestScorerMetrics:
    def test_a_batch_is_counted(self, rig: AppRig) -> None:
        """Consumed, verdicts, dead letters by stage, scores, latency, every stage timed."""
        good = _messages(30)
        bad = [StubMessage(b"\xff\xfe", b"k", 100), StubMessage(good[0].value(), None, 101)]
        rig.app.process([*good, *bad])
        registry = _metrics(rig).registry
        assert value(registry, "streamer_records_consumed_total") == 32
        assert value(registry, "streamer_verdicts_total") == 30
        assert value(registry, "streamer_dead_letters_total", stage="decode") == 1
        assert value(registry, "streamer_dead_letters_total", stage="validate") == 1
        assert value(registry, "streamer_dead_letters_total", stage="score") == 0
        assert value(registry, "streamer_flagged_total") == rig.app.counters.flagged
        assert value(registry, "streamer_score_count") == 30
        assert value(registry, "streamer_end_to_end_latency_seconds_count") == 30
        assert value(registry, "streamer_batch_size_count") == 1
        assert value(registry, "streamer_batch_size_sum") == 32
        for stage in STAGES[:-1]:  # every stage but commit, which the loop times
            assert value(registry, "streamer_stage_duration_seconds_count", stage=stage) == 1

    def test_latency_is_now_minus_the_record_timestamp(self, rig: AppRig) -> None:
        """A record stamped 2 s ago lands in the (1, 2.5] s bucket."""
        metrics = _metrics(rig)
        metrics._clock = lambda: 1_000_000.0
        stamps = [1_000_000_000 - 2_000, -1]  # the second has no timestamp
        metrics.batch(2, {}, stamps, [0, 1], np.array([0.5, np.nan]))
        registry = metrics.registry
        bucket = "streamer_end_to_end_latency_seconds_bucket"
        assert value(registry, bucket, le="1.0") == 0
        assert value(registry, bucket, le="2.5") == 1
        assert value(registry, "streamer_end_to_end_latency_seconds_sum") == pytest.approx(2.0)
        assert value(registry, "streamer_score_count") == 1  # NaN is no score

    def test_model_info(self, rig: AppRig, scorer: Scorer) -> None:
        labels = {
            "name": scorer.name,
            "version": scorer.version,
            "sha256": scorer.sha256,
            "threshold": repr(scorer.threshold),
        }
        assert value(_metrics(rig).registry, "streamer_model_info", **labels) == 1

    def test_counters_that_start_at_zero(self, rig: AppRig) -> None:
        """Counters a dashboard or alert reads exist before anything happens."""
        registry = _metrics(rig).registry
        assert value(registry, "streamer_model_reload_failures_total") == 0
        assert value(registry, "streamer_transactions_aborted_total") == 0
        for event in ("assigned", "revoked", "lost"):
            assert value(registry, "streamer_rebalances_total", event=event) == 0

    def test_rebalances_and_assignment(self, rig: AppRig) -> None:
        app = rig.app
        partitions = [TopicPartition("transactions", p) for p in (0, 1)]
        app._on_assign(rig.consumer, partitions)  # type: ignore[arg-type]
        registry = _metrics(rig).registry
        assert value(registry, "streamer_rebalances_total", event="assigned") == 1
        assert value(registry, "streamer_assigned_partitions") == 2
        assert _metrics(rig).lag.assigned == {("transactions", 0), ("transactions", 1)}
        app._on_revoke(rig.consumer, partitions)  # type: ignore[arg-type]
        assert value(registry, "streamer_rebalances_total", event="revoked") == 1
        assert value(registry, "streamer_assigned_partitions") == 0
        assert not _metrics(rig).lag.assigned

    def test_state_gauges_follow_a_restore(self, rig: AppRig) -> None:
        metrics = _metrics(rig)
        metrics.state("card-state", 10, 2, 500, {0: 30, 1: 0})
        metrics.state("card-state", 12, 0, 800, {})
        registry = metrics.registry
        assert value(registry, "streamer_state_keys", store="card-state") == 12
        assert value(registry, "streamer_state_restoring_partitions", store="card-state") == 0
        assert value(registry, "streamer_state_restore_records_total", store="card-state") == 800
        remaining = [k for k in samples(registry) if "remaining" in k[0]]
        assert remaining == []

    def test_commit_counted_and_timed(self, rig: AppRig) -> None:
        """A loop turn that commits times the commit and counts it; the counter only grows.

        At-least-once commits on the turn after the one that writes the snapshot (when the
        acknowledgements are in)."""
        rig.app.process(_messages(5))
        metrics = _metrics(rig)
        rig.app._maintain_timed(metrics)
        rig.app._maintain_timed(metrics)
        registry = metrics.registry
        assert value(registry, "streamer_commits_total") == 1
        assert value(registry, "streamer_stage_duration_seconds_count", stage="commit") == 1


class TestHealth:
    def test_readiness_names_what_fails(self, rig: AppRig) -> None:
        app = rig.app
        assert app.readiness() == ["no partitions assigned"]
        app._on_assign(rig.consumer, [TopicPartition("transactions", 0)])  # type: ignore[arg-type]
        assert app.readiness() == []
        rig.producer.errors.fatal = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
        assert app.readiness() == ["producer fatal error: fenced"]
        app.stop()
        assert app.readiness()[0] == "stopping"

    def test_liveness_follows_the_loop(self, rig: AppRig) -> None:
        app = rig.app
        assert app.liveness() is None
        app._turned_at -= LIVENESS_SECONDS + 1
        reason = app.liveness()
        assert reason is not None
        assert "has not turned" in reason


class FixedHealth:
    def __init__(self, ready: list[str], live: str | None) -> None:
        self.ready, self.live = ready, live

    def readiness(self) -> list[str]:
        return self.ready

    def liveness(self) -> str | None:
        return self.live


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server() -> Iterator[HealthServer]:
    metrics = ScorerMetrics(GROUP)
    served = HealthServer("127.0.0.1", 0, metrics.registry)
    served.start()
    yield served
    served.close()


class TestHealthServer:
    def test_metrics_endpoint(self, server: HealthServer) -> None:
        status, body = _get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
        assert "streamer_model_reload_failures_total 0.0" in body
        assert "process_resident_memory_bytes" in body

    def test_starting_is_live_and_not_ready(self, server: HealthServer) -> None:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(f"{base}/livez") == (200, '{"status": "ok"}\n')
        status, body = _get(f"{base}/readyz")
        assert status == 503
        assert json.loads(body)["checks"] == ["starting: connecting to Kafka"]

    def test_health_answers_with_the_failing_checks(self, server: HealthServer) -> None:
        base = f"http://127.0.0.1:{server.port}"
        server.watch(FixedHealth(["no partitions assigned"], "loop stuck"))
        assert _get(f"{base}/readyz") == (
            503,
            '{"status": "fail", "checks": ["no partitions assigned"]}\n',
        )
        assert _get(f"{base}/livez")[0] == 503
        server.watch(FixedHealth([], None))
        assert _get(f"{base}/readyz") == (200, '{"status": "ok"}\n')
        assert _get(f"{base}/other")[0] == 404

    def test_port_in_use_names_the_variable(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError, match=r"STREAMER_METRICS_PORT: port .* already in use"):
                HealthServer("127.0.0.1", port, CollectorRegistry())

    def test_an_address_it_cannot_listen_on_names_the_host_variable(self) -> None:
        with pytest.raises(
            ConfigError, match=r"STREAMER_METRICS_HOST: cannot listen on 256\.1\.1\.1"
        ):
            HealthServer("256.1.1.1", 0, CollectorRegistry())

    def test_run_exits_2_when_the_port_is_taken(
        self, model_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
    ) -> None:
        """`streamer run` stops at start-up, before Kafka, naming STREAMER_METRICS_PORT."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            monkeypatch.setenv("STREAMER_METRICS_PORT", str(taken.getsockname()[1]))
            argv = ["run", "--model-path", str(model_path), "--bootstrap-servers", "127.0.0.1:1"]
            assert main([*argv, "--log-format", "json"]) == EXIT_USAGE
        assert "STREAMER_METRICS_PORT" in capsys.readouterr().err

    @pytest.mark.parametrize("port", ["-1", "65536", "x"])
    def test_bad_port_is_a_config_error(self, port: str, monkeypatch: Any) -> None:
        monkeypatch.setenv("STREAMER_METRICS_PORT", port)
        assert main(["run"]) == EXIT_USAGE


class TestExactlyOnceLag:
    def test_lag_counts_from_the_offsets_the_transactions_committed(self) -> None:
        """Statistics keep the offset committed at assignment; the transactions moved on since."""
        lag = ConsumerLag(GROUP)
        lag.assigned = frozenset({("tx", 0), ("tx", 1)})
        lag.read_committed = True
        lag.committed = {("tx", 0): 950}
        partitions = {
            "0": {
                "consumer_lag": 900,
                "committed_offset": 100,
                "hi_offset": 1001,
                "ls_offset": 1000,
            },
            "1": {"consumer_lag": 40, "committed_offset": 60, "hi_offset": 100, "ls_offset": 100},
        }
        assert lag.parse(json.dumps({"topics": {"tx": {"partitions": partitions}}})) == {
            ("tx", 0): 50,
            ("tx", 1): 40,
        }

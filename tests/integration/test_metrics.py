"""A real Prometheus server scrapes a working scorer: lag, throughput and the model, by its API.

Needs the `prometheus` binary (Debian's package; `.ci/run` installs it). Without it the test
fails, saying so: a metrics endpoint nobody has scraped is not tested.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamer.app import CARD_STORE
from streamer.headers import CHANGELOG_POSITION
from streamer.kafka.changelog import Restorer, changelog_topic, ensure_changelog
from streamer.kafka.clients import OutputProducer
from streamer.model.artifact import load_model
from streamer.settings import Settings
from streamer.state.card import CARD_HISTORY_CODEC
from streamer.state.store import KeyedStore
from streamer.synthetic import SyntheticWorld
from streamer.tools.produce import publish
from tests.conftest import ROOT, Topics
from tests.integration.support import produce_synthetic, scorer_env, start_scorer

CHANGELOG_RECORDS = 30_000

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BACKLOG = 4_000
FEED = 3_000
FEED_RATE = 500.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


class PrometheusServer:
    """A Prometheus process scraping one target every second, with the project's alert rules."""

    def __init__(self, folder: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "the prometheus binary is not installed: `apt-get install -y "
                "--no-install-recommends prometheus` (.ci/run installs it)"
            )
        self.port = _free_port()
        rules = ROOT / "deploy" / "prometheus" / "alerts.yml"
        config = folder / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [
                        {"job_name": "streamer", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--storage.tsdb.path={folder / 'data'}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        status, body = _get(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}")
        if status != 200:
            return None
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expression)
        return [] if data is None else list(data["result"])

    def wait_for(self, expression: str, check: Any, timeout: float = 40.0) -> list[dict[str, Any]]:
        """Query until `check(result)` holds; fail with the last result and the log."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            result = self.query(expression)
            if result and check(result):
                return result
            time.sleep(0.5)
        pytest.fail(f"{expression}: not as expected within {timeout}s: {result}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def scorer_port() -> int:
    return _free_port()


@pytest.fixture
def prometheus(tmp_path: Path, scorer_port: int) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path, f"127.0.0.1:{scorer_port}")
    try:
        yield server
    finally:
        server.stop()


def _feed(bootstrap: str, topic: str) -> None:
    """FEED events at FEED_RATE, so the scorer has work while Prometheus watches it."""
    events = SyntheticWorld(77).generate(FEED)
    report = publish(
        OutputProducer({"bootstrap.servers": bootstrap}), topic, events, rate=FEED_RATE
    )
    assert report.acknowledged == FEED, report


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


class TestPrometheusScrapesTheScorer:
    @pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
    def test_lag_throughput_and_model_through_the_prometheus_api(
        self,
        guarantee: str,
        bootstrap_servers: str,
        topics: Topics,
        model_path: Path,
        scorer_port: int,
        prometheus: PrometheusServer,
    ) -> None:
        """While the scorer works, Prometheus sees its lag per partition, its rate of records
        consumed and the model it scores with; at the end, exactly the records sent, and no lag
        (exactly-once commits offsets through transactions, which the consumer does not see)."""
        produce_synthetic(bootstrap_servers, topics.input, BACKLOG, seed=5)
        env = scorer_env(
            bootstrap_servers,
            topics,
            model_path,
            STREAMER_METRICS_PORT=str(scorer_port),
            STREAMER_PROCESSING_GUARANTEE=guarantee,
            STREAMER_KAFKA_STATISTICS_INTERVAL_MS="500",
        )
        scorer = start_scorer(env)
        feeder = threading.Thread(target=_feed, args=(bootstrap_servers, topics.input))
        try:
            base = f"http://127.0.0.1:{scorer_port}"
            deadline = time.monotonic() + 60
            while _get(f"{base}/readyz")[0] != 200:
                assert scorer.poll() is None, scorer.communicate()[1][-3000:]
                assert time.monotonic() < deadline, _get(f"{base}/readyz")
                time.sleep(0.2)
            assert _get(f"{base}/livez") == (200, '{"status": "ok"}\n')
            feeder.start()

            group = f'consumergroup="{topics.group}",topic="{topics.input}"'
            lag = prometheus.wait_for(
                f"streamer_consumergroup_lag{{{group}}}", lambda r: len(r) == 3
            )
            assert {series["metric"]["partition"] for series in lag} == {"0", "1", "2"}
            assert all(value >= 0 for value in _values(lag))
            # Between two commits the records fetched but not committed are lag.
            prometheus.wait_for(
                f"max_over_time(sum(streamer_consumergroup_lag{{{group}}})[1m:500ms])",
                lambda r: _values(r)[0] > 0,
            )
            rate = prometheus.wait_for(
                "rate(streamer_records_consumed_total[5s])", lambda r: _values(r)[0] > 0
            )
            assert rate[0]["metric"]["job"] == "streamer"

            card = load_model(model_path).card
            info = prometheus.wait_for("streamer_model_info", lambda r: len(r) == 1)
            labels = info[0]["metric"]
            assert (labels["name"], labels["version"], labels["sha256"]) == (
                card.name,
                card.version,
                card.sha256,
            )
            assert float(labels["threshold"]) == card.threshold

            feeder.join(60)
            total = BACKLOG + FEED
            prometheus.wait_for("streamer_records_consumed_total", lambda r: _values(r) == [total])
            prometheus.wait_for("streamer_verdicts_total", lambda r: _values(r) == [total])
            prometheus.wait_for(
                f"sum(streamer_consumergroup_lag{{{group}}})", lambda r: _values(r) == [0]
            )
            latency = prometheus.query("streamer_end_to_end_latency_seconds_count")
            assert _values(latency) == [total]
            rules = prometheus.api("rules")
            loaded = {rule["name"]: rule for g in rules["groups"] for rule in g["rules"]}
            assert "StreamerNoProgress" in loaded
            assert all(rule["health"] != "err" for rule in loaded.values()), loaded
            commits = prometheus.query("streamer_commits_total")
            assert _values(commits)[0] > 0
            aborted = prometheus.query("streamer_transactions_aborted_total")
            assert _values(aborted) == [0]
        finally:
            if feeder.is_alive():
                feeder.join(60)
            scorer.send_signal(signal.SIGTERM)
            _, stderr = scorer.communicate(timeout=60)
        assert scorer.returncode == 0, stderr[-3000:]


class TestRestoreProgress:
    def test_remaining_records_fall_to_the_end_and_records_add_up(
        self, bootstrap_servers: str, topics: Topics
    ) -> None:
        """What `streamer_state_restore_remaining_records` and `..._records_total` report."""
        settings = Settings(bootstrap_servers=bootstrap_servers, group_id=topics.group)
        topic = changelog_topic(topics.group, CARD_STORE)
        ensure_changelog(settings.admin_config(), topic, topics.input)
        producer = OutputProducer({"bootstrap.servers": bootstrap_servers})
        for index in range(CHANGELOG_RECORDS):
            producer.produce(
                topic, f"card-{index}".encode(), b"x", [(CHANGELOG_POSITION, b"1")], None, 0
            )
        assert producer.flush(30) == 0
        store = KeyedStore(CARD_STORE, CARD_HISTORY_CODEC, keep_undo=False)
        restorer = Restorer(settings.changelog_reader_config(), store, topic)
        try:
            assert restorer.remaining() == {}
            restorer.start({0: 10, 1: 10, 2: 10})
            seen: list[int] = []
            deadline = time.monotonic() + 60
            while restorer.restoring:
                assert time.monotonic() < deadline, restorer.restoring
                restorer.step(1e-6)  # one consume call (at most 10,000 records) per step
                seen.append(restorer.remaining().get(0, -1))
            assert restorer.records == CHANGELOG_RECORDS
            assert len(store) == CHANGELOG_RECORDS
            known = [left for left in seen if left >= 0]
            assert known
            assert any(0 < left < CHANGELOG_RECORDS for left in known)
            assert known == sorted(known, reverse=True)  # it only falls
            assert restorer.remaining() == {}
            restorer.start({0: 10})  # a second restore adds to the running total
            while restorer.restoring:
                assert time.monotonic() < deadline, restorer.restoring
                restorer.step(0.1)
            assert restorer.records == 2 * CHANGELOG_RECORDS
        finally:
            restorer.close()

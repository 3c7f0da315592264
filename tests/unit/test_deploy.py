"""The operator's files: alert rules (checked and tested by promtool), the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamer.metrics import ScorerMetrics
from streamer.model.scorer import Scorer
from streamer.settings import Settings
from tests.unit.fakes import app_on_fakes
from tests.unit.test_metrics import _messages

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "streamer-dashboard.json"
METRIC_NAME = re.compile(r"\b(?:streamer|process)_[a-zA-Z0-9_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool in deploy/prometheus; missing, it fails the test (CI installs it)."""
    if shutil.which("promtool") is None:
        pytest.fail(
            "promtool is not installed: `apt-get install -y --no-install-recommends prometheus` "
            "(.ci/run installs it)"
        )
    return subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def exposed(model_path: Path) -> set[str]:
    """Every sample name a scorer exposes once it has scored, rebalanced and restored."""
    metrics = ScorerMetrics("group")
    rig = app_on_fakes(Scorer.from_path(model_path), Settings(), metrics=metrics)
    metrics.observe(rig.app)
    rig.app._on_assign(rig.consumer, [TopicPartition("transactions", 0)])  # type: ignore[arg-type]
    rig.app.process(_messages(20))
    report = {"topics": {"transactions": {"partitions": {"0": {"consumer_lag": 3}}}}}
    metrics.lag(json.dumps(report))
    metrics.state("card-state", 5, 1, 10, {0: 4})
    text = generate_latest(metrics.registry).decode()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


class TestAlertRules:
    def test_rules_are_valid(self) -> None:
        result = promtool("check", "rules", "alerts.yml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rules_fire_as_written(self) -> None:
        """alerts.test.yml: each alert fires on its symptom and not on a healthy scorer."""
        result = promtool("test", "rules", "alerts.test.yml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_prometheus_config_is_valid(self) -> None:
        result = promtool("check", "config", "prometheus.yml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rules_read_metrics_the_scorer_exposes(self, exposed: set[str]) -> None:
        text = (PROMETHEUS / "alerts.yml").read_text()
        expressions = re.findall(r"expr: (?:\|\n)?((?:.+\n)+?)\s+(?:for|labels):", text)
        assert len(expressions) == text.count("- alert:")
        for expression in expressions:
            for name in METRIC_NAME.findall(expression):
                assert name in exposed, name


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


class TestDashboard:
    def test_every_panel_queries_metrics_that_exist(
        self, dashboard: dict[str, Any], exposed: set[str]
    ) -> None:
        """Each panel has a query, and every metric name in it is in the scorer's /metrics."""
        panels = dashboard["panels"]
        assert panels
        for panel in panels:
            expressions = [target["expr"] for target in panel["targets"]]
            assert expressions, panel["title"]
            names = {name for e in expressions for name in METRIC_NAME.findall(e)}
            assert names, panel["title"]
            assert names <= exposed, (panel["title"], names - exposed)

    def test_panels_do_not_overlap(self, dashboard: dict[str, Any]) -> None:
        cells = set()
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, panel["title"]
                    cells.add((x, y))

"""docker-compose.yml and the Dockerfile cannot run here; keep them honest against the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.cli import build_parser
from streamer.settings import ENV_PREFIX, KAFKA_ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _streamer_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("build") == "."}


class TestCompose:
    def test_expected_services(self, compose: dict[str, Any]) -> None:
        """Broker, topics, training, scorer, Prometheus and an optional producer are there."""
        assert set(compose["services"]) >= {
            "kafka", "topics", "train", "streamer", "prometheus", "producer"
        }  # fmt: skip
        assert compose["services"]["producer"]["profiles"] == ["producer"]

    def test_broker_image_matches_the_local_broker_version(self, compose: dict[str, Any]) -> None:
        """The compose broker runs the same Kafka release as scripts/kafka-local."""
        pom = (ROOT / "scripts" / "kafka-pom.xml").read_text()
        match = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
        assert match is not None
        assert compose["services"]["kafka"]["image"] == f"apache/kafka:{match.group(1)}"

    def test_broker_is_kraft(self, compose: dict[str, Any]) -> None:
        """The broker runs broker and controller in one node (no ZooKeeper)."""
        environment = compose["services"]["kafka"]["environment"]
        assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert not any("ZOOKEEPER" in key for key in environment)

    def test_environment_names_real_settings(self, compose: dict[str, Any]) -> None:
        """Every STREAMER_ variable in the file is a setting the code reads."""
        known = {ENV_PREFIX + name.upper() for name in Settings.model_fields if name != "kafka"}
        for name, service in _streamer_services(compose).items():
            for variable in service.get("environment", {}):
                assert variable in known or variable.startswith(KAFKA_ENV_PREFIX), (name, variable)

    def test_environment_values_are_valid(self, compose: dict[str, Any]) -> None:
        """The values given would pass the settings' own validation."""
        for service in _streamer_services(compose).values():
            values = {
                key.removeprefix(ENV_PREFIX).lower(): value
                for key, value in service.get("environment", {}).items()
            }
            Settings.model_validate(values)

    def test_commands_parse(self, compose: dict[str, Any]) -> None:
        """Each service's command is a valid `streamer` command line."""
        parser = build_parser()
        for service in _streamer_services(compose).values():
            parser.parse_args(service["command"])

    def test_scorer_bootstraps_to_the_broker_service(self, compose: dict[str, Any]) -> None:
        """The scorer's bootstrap address is a listener the broker advertises."""
        advertised = compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        bootstrap = compose["services"]["streamer"]["environment"]["STREAMER_BOOTSTRAP_SERVERS"]
        assert f"//{bootstrap}" in advertised

    def test_model_volume_is_shared(self, compose: dict[str, Any]) -> None:
        """The scorer reads the model where the training service wrote it."""
        train = compose["services"]["train"]
        scorer = compose["services"]["streamer"]
        path = train["environment"]["STREAMER_MODEL_PATH"]
        assert scorer["environment"]["STREAMER_MODEL_PATH"] == path
        assert train["volumes"] == scorer["volumes"]
        assert any(path.startswith(v.split(":")[1]) for v in scorer["volumes"])


class TestDockerfile:
    def test_entrypoint_is_the_console_script(self) -> None:
        """The image's entrypoint is `streamer`, so compose commands are its arguments."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        assert 'ENTRYPOINT ["streamer"]' in dockerfile

    def test_copies_what_the_package_needs(self) -> None:
        """The image gets the package and the schemas it loads at import."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        for needed in ("schemas", "streamer", "pyproject.toml"):
            assert re.search(rf"^COPY .*\b{needed}\b", dockerfile, re.MULTILINE), needed


class TestPrometheus:
    def test_scorer_listens_where_prometheus_scrapes(self, compose: dict[str, Any]) -> None:
        """The scrape target is the scorer service on its metrics port, on every interface."""
        environment = compose["services"]["streamer"]["environment"]
        settings = Settings.model_validate(
            {k.removeprefix(ENV_PREFIX).lower(): v for k, v in environment.items()}
        )
        assert settings.metrics_host == "0.0.0.0"
        config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        targets = [
            target
            for job in config["scrape_configs"]
            for static in job["static_configs"]
            for target in static["targets"]
        ]
        assert targets == [f"streamer:{settings.metrics_port}"]

    def test_prometheus_loads_the_rules(self, compose: dict[str, Any]) -> None:
        """The official image gets the config and the alert rules beside it, read-only."""
        service = compose["services"]["prometheus"]
        assert service["image"].startswith("prom/prometheus:")
        assert "./deploy/prometheus:/etc/prometheus:ro" in service["volumes"]
        assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
        config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        for rules in config["rule_files"]:
            assert (ROOT / "deploy" / "prometheus" / rules).is_file()

    def test_scorer_healthcheck_asks_readyz_with_the_image_python(
        self, compose: dict[str, Any]
    ) -> None:
        """The healthcheck is Python (the image has no curl) asking /readyz on the metrics port."""
        scorer = compose["services"]["streamer"]
        test = scorer["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]
        compile(test[3], "healthcheck", "exec")
        port = scorer["environment"]["STREAMER_METRICS_PORT"]
        assert f"http://127.0.0.1:{port}/readyz" in test[3]
        assert f"{port}:{port}" in scorer["ports"]

"""docker-compose.yml and the Dockerfile cannot run here; keep them honest against the code."""

from __future__ import annotations

import re
import tomllib
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
    """The services that run the image built from the Dockerfile."""
    image = compose["services"]["streamer"]["image"]
    return {name: s for name, s in compose["services"].items() if s.get("image") == image}


class TestCompose:
    def test_expected_services(self, compose: dict[str, Any]) -> None:
        """Broker, topics, training, scorer, Prometheus, the HTTP server and an optional producer
        are there."""
        assert set(compose["services"]) >= {
            "kafka", "topics", "train", "streamer", "prometheus", "serve", "producer"
        }  # fmt: skip
        assert compose["services"]["producer"]["profiles"] == ["producer"]

    def test_builds_the_image_once(self, compose: dict[str, Any]) -> None:
        """Only the scorer builds; topics, train, serve and producer run its image, never pulled."""
        builders = {name for name, s in compose["services"].items() if "build" in s}
        assert builders == {"streamer"}
        assert compose["services"]["streamer"]["build"] == "."
        users = set(_streamer_services(compose)) - builders
        assert users == {"topics", "train", "serve", "producer"}
        for name in users:
            assert compose["services"][name]["pull_policy"] == "never", name

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

    def test_serve_follows_the_scorers_state(self, compose: dict[str, Any]) -> None:
        """`serve` reads the scorer's changelog (same group and broker) and model, on a port."""
        serve = compose["services"]["serve"]["environment"]
        scorer = compose["services"]["streamer"]["environment"]
        for name in ("STREAMER_GROUP_ID", "STREAMER_BOOTSTRAP_SERVERS", "STREAMER_MODEL_PATH"):
            assert serve[name] == scorer[name], name
        assert serve["STREAMER_HTTP_HOST"] == "0.0.0.0"
        port = serve["STREAMER_HTTP_PORT"]
        assert compose["services"]["serve"]["ports"] == [f"{port}:{port}"]


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        pending += " " + stripped.removesuffix("\\") if pending else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            instruction, _, arguments = pending.partition(" ")
            lines.append((instruction.upper(), " ".join(arguments.split())))
            pending = ""
    return lines


def _copy_sources() -> list[tuple[int, list[str]]]:
    """For each COPY from the build context: its index among the instructions and its sources."""
    copies = []
    for index, (instruction, arguments) in enumerate(_instructions()):
        if instruction != "COPY":
            continue
        words = arguments.split()
        assert not any(w.startswith("--from") for w in words), "COPY --from is not checked here"
        paths = [w for w in words if not w.startswith("--")]
        copies.append((index, paths[:-1]))
    return copies


def _dockerignore_patterns() -> list[str]:
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            assert not line.startswith("!"), "exceptions (!) are not modelled by this test"
            patterns.append(line.strip("/"))
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _ignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: it or a parent matches."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(
        _pattern_regex(pattern).fullmatch(prefix)
        for pattern in _dockerignore_patterns()
        for prefix in prefixes
    )


class TestDockerfile:
    def test_entrypoint_is_the_console_script(self) -> None:
        """The image's entrypoint is `streamer`, so compose commands are its arguments."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        assert 'ENTRYPOINT ["streamer"]' in dockerfile

    def test_copies_what_the_package_needs(self) -> None:
        """The image gets the lock, the package (schemas inside it) and what its build reads."""
        copied = {source for _, sources in _copy_sources() for source in sources}
        with (ROOT / "pyproject.toml").open("rb") as file:
            readme = tomllib.load(file)["project"]["readme"]
        assert copied >= {"requirements.lock", "pyproject.toml", readme, "streamer"}

    def test_copies_only_existing_paths(self) -> None:
        """Every COPY source is in the repository (a renamed file breaks the build here first)."""
        for _, sources in _copy_sources():
            for source in sources:
                assert (ROOT / source).exists(), source

    def test_dependencies_are_a_layer_before_the_code(self) -> None:
        """Only the lock is copied before the dependencies install; the code comes after."""
        instructions = _instructions()
        install = next(
            index
            for index, (instruction, arguments) in enumerate(instructions)
            if instruction == "RUN" and "pip install -r requirements.lock" in arguments
        )
        for index, sources in _copy_sources():
            if index < install:
                assert sources == ["requirements.lock"], sources
        assert any(index > install and "streamer" in sources for index, sources in _copy_sources())

    def test_package_installs_without_dependencies(self) -> None:
        """The package step adds no unlocked dependency and fetches no build backend."""
        package = [
            arguments
            for instruction, arguments in _instructions()
            if instruction == "RUN" and "pip install" in arguments and "-r " not in arguments
        ]
        assert len(package) == 1, package
        assert "--no-deps" in package[0]
        assert "--no-build-isolation" in package[0]


class TestDockerignore:
    def test_keeps_everything_the_dockerfile_copies(self) -> None:
        """No file under a COPY source, package data included, is left out of the context."""
        for _, sources in _copy_sources():
            for source in sources:
                path = ROOT / source
                files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    if "__pycache__" not in relative:
                        assert not _ignored(relative), relative
        assert any(
            not _ignored(f"streamer/schemas/{f.name}")
            for f in (ROOT / "streamer" / "schemas").glob("*.avsc")
        )

    @pytest.mark.parametrize(
        "path",
        [
            ".git/HEAD",
            ".venv/bin/python",
            ".ci/run",
            "models/fraud-model.skops",
            "bench-results/latest.json",
            "tests/unit/test_compose.py",
            "streamer/__pycache__/cli.cpython-311.pyc",
            "streamer/kafka/__pycache__/admin.cpython-311.pyc",
            ".mypy_cache/3.11/x.json",
            "requirements-dev.lock",
        ],
    )
    def test_leaves_out_what_the_image_does_not_need(self, path: str) -> None:
        """Environments, caches, models, results and tests stay out of the build context."""
        assert _ignored(path)


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
